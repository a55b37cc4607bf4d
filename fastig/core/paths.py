"""Paths from a baseline to the input, evaluated by the engine a batch at a time.

A path has ``n_steps`` points per example. ``points(steps, examples)`` returns the points of a range of steps for a
range of examples, step-major (``[k * m, ...]`` per input tensor), generated on demand so that no more than one
batch of points is ever alive.

Paths here: :class:`StraightLine` (IG), :class:`BlurPath` (Blur IG), :class:`GuidedPath` (Guided IG) and
:class:`LatentPath` (Latent IG: through a latent space, :class:`LatentSpace`; the DALL-E dVAE's is
:class:`fastig.models.dvae.DVAEImageSpace`).
"""

from __future__ import annotations

import functools
import math
from typing import Protocol, Sequence

import torch

from fastig import _ops


class StraightLine:
    """``baseline + alpha * (input - baseline)`` for each alpha (the path of Integrated Gradients)."""

    def __init__(self, inputs: tuple[torch.Tensor, ...], baselines: tuple[torch.Tensor, ...], alphas: Sequence[float]):
        self.inputs = inputs
        self.baselines = baselines
        self.alphas = torch.tensor(list(alphas), dtype=torch.float64)
        self.n_steps = len(self.alphas)

    def points(self, steps: slice, examples: slice) -> tuple[torch.Tensor, ...]:
        alphas = self.alphas[steps]
        return tuple(
            _ops.path_points(x[examples], b if b.shape[0] == 1 else b[examples], alphas)
            for x, b in zip(self.inputs, self.baselines)
        )


# --- blur path (Blur IG) -----------------------------------------------------------------------------------

# scipy.ndimage's default: the Gaussian kernel is cut at this many standard deviations
BLUR_TRUNCATE = 4.0


# the kernel's normalization is summed tap by tap up to this radius (sigma ~ 16000), in closed form beyond it
DIRECT_RADIUS = 1 << 16


@functools.lru_cache(maxsize=512)
def _blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """[size, size] float64 matrix M with ``M @ v`` = 1-D Gaussian blur of ``v`` with zero padding, as
    ``scipy.ndimage.gaussian_filter1d(v, sigma, mode="constant")`` computes it: a kernel of radius
    ``int(4 * sigma + 0.5)``, normalized over that radius. Cached: callers only read it.

    Only the taps an image of ``size`` pixels reaches are built (the radius clamped to the image), so memory
    does not grow with sigma; past :data:`DIRECT_RADIUS` the normalization is computed in closed form. As sigma
    grows every entry tends to ``1 / Z`` (``Z ~ sigma sqrt(2 pi) erf(2 sqrt 2)``, the kernel's sum): the kernel's
    mass falls outside the image, so the zero-padded blur tends to zero, not to the image's mean. (scipy, and so
    PAIR, builds all ``2 r + 1`` taps: 64 GB at sigma = 1e9.)"""
    if sigma == 0:
        return torch.eye(size, dtype=torch.float64)
    radius = int(BLUR_TRUNCATE * sigma + 0.5)
    if radius <= DIRECT_RADIUS:
        half = torch.exp(-0.5 / (sigma * sigma) * torch.arange(radius + 1, dtype=torch.float64) ** 2)
        half = half / (2 * half.sum() - half[0])  # the kernel from its center out; it is symmetric
    else:
        taps = torch.arange(min(radius, size - 1) + 1, dtype=torch.float64)
        half = torch.exp(-0.5 / (sigma * sigma) * taps**2) / _kernel_sum(sigma, radius)
    by_distance = torch.zeros(size, dtype=torch.float64)
    by_distance[: min(radius + 1, size)] = half[:size]
    index = torch.arange(size)
    return by_distance[(index.reshape(1, -1) - index.reshape(-1, 1)).abs()]


def _kernel_sum(sigma: float, radius: int) -> float:
    """sum of exp(-t^2 / (2 sigma^2)) over |t| <= radius, by Euler-Maclaurin: the integral, the end terms and the
    first derivative correction. The next term is ~ f(radius) / sigma^3 and the Poisson (aliasing) term
    ~ exp(-2 pi^2 sigma^2): both far below float64 rounding once the radius exceeds DIRECT_RADIUS."""
    end = math.exp(-0.5 * (radius / sigma) ** 2)
    integral = sigma * math.sqrt(2 * math.pi) * math.erf(radius / (sigma * math.sqrt(2)))
    return integral + end - radius * end / (6 * sigma * sigma)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``x`` over its last two dimensions (H and W of each channel), zero padding, truncate=4:
    ``scipy.ndimage.gaussian_filter(image, [sigma, sigma, 0], mode="constant")`` on an HWC image, as PAIR's
    Blur IG calls it. Computed as two matrix products in float64 and returned in ``x``'s dtype."""
    if x.dim() < 2:
        raise ValueError(f"a blur needs at least two (spatial) dimensions, got shape {tuple(x.shape)}")
    if sigma == 0:
        return x
    h, w = x.shape[-2], x.shape[-1]
    rows = _blur_matrix(h, float(sigma)).to(x.device)  # cached; only read
    cols = _blur_matrix(w, float(sigma)).to(x.device)
    return (rows @ x.to(torch.float64) @ cols.T).to(x.dtype)


class BlurPath:
    """Blur IG's path: the inputs blurred with ``sigmas[k]`` (sigma 0 = the input itself), over H and W.

    ``moves(steps, examples)`` is PAIR's path derivative times the step: ``-(sigma_{k+1} - sigma_k) *
    (blur(x, sigma_k + grad_step) - blur(x, sigma_k)) / grad_step``, the minus sign making attributions explain
    f(input) - f(most blurred). Defined for every point but the last.
    """

    def __init__(self, inputs: tuple[torch.Tensor, ...], sigmas: Sequence[float], grad_step: float):
        for i, x in enumerate(inputs):
            if x.dim() < 3:
                raise ValueError(
                    f"Blur IG blurs the last two (H, W) dimensions: inputs[{i}] needs shape [N, ..., H, W], "
                    f"got {tuple(x.shape)}"
                )
        self.inputs = inputs
        self.sigmas = [float(s) for s in sigmas]
        self.grad_step = float(grad_step)
        self.n_steps = len(self.sigmas)

    def points(self, steps: slice, examples: slice) -> tuple[torch.Tensor, ...]:
        return tuple(torch.cat([gaussian_blur(x[examples], s) for s in self.sigmas[steps]]) for x in self.inputs)

    def moves(self, steps: slice, examples: slice) -> tuple[torch.Tensor, ...]:
        out = []
        for x in self.inputs:
            x64 = x[examples].to(torch.float64)
            per_step = []
            for k in range(steps.start, steps.stop):
                sigma, spacing = self.sigmas[k], self.sigmas[k + 1] - self.sigmas[k]
                slope = (gaussian_blur(x64, sigma + self.grad_step) - gaussian_blur(x64, sigma)) / self.grad_step
                per_step.append(-spacing * slope)
            out.append(torch.stack(per_step))
        return tuple(out)


# --- guided path (Guided IG) -------------------------------------------------------------------------------


class GuidedPath:
    """Guided IG's path (Kapishnikov et al. 2021, PAIR saliency's algorithm), batched over examples.

    Points x_0 = baseline, ..., x_S = input (``n_steps = S + 1``). Step k moves, from x_k, the features with the
    smallest |gradient at x_k| towards the input until the L1 distance to the input is ``(1 - (k+1)/S)`` of the
    total, keeping every feature within ``max_dist`` (in alpha) of the straight line's alpha ``(k+1)/S``. All
    input tensors of an example form one feature vector (L1 distance and gradient quantile run over all of
    them). The state is held in float64, as in PAIR; points are handed to the model in the inputs' dtype.
    """

    sequential = True

    def __init__(
        self,
        inputs: tuple[torch.Tensor, ...],
        baselines: tuple[torch.Tensor, ...],
        n_steps: int,
        fraction: float,
        max_dist: float,
    ):
        n = inputs[0].shape[0]
        self.shapes = [tuple(x.shape[1:]) for x in inputs]
        self.dtypes = [x.dtype for x in inputs]
        self.input = torch.cat([x.reshape(n, -1).to(torch.float64) for x in inputs], 1)
        self.baseline = torch.cat([b.expand_as(x).reshape(n, -1).to(torch.float64) for x, b in zip(inputs, baselines)], 1)
        self.x = self.baseline.clone()
        self.l1_total = (self.input - self.baseline).abs().sum(1)
        self.guided_steps = n_steps
        self.n_steps = n_steps + 1
        self.fraction = float(fraction)
        self.max_dist = float(max_dist)

    def points(self, steps: slice, examples: slice) -> tuple[torch.Tensor, ...]:
        # the current state: a sequential path is only ever asked for the step it has reached
        return tuple(part.to(dtype) for part, dtype in zip(self._split(self.x[examples]), self.dtypes))

    def advance(self, batch) -> tuple[torch.Tensor, ...]:
        step, e = batch.steps.start, batch.examples
        m = e.stop - e.start
        grad = torch.cat([g[0].reshape(m, -1) for g in batch.grads], 1)
        alpha = (step + 1.0) / self.guided_steps
        l1_target = self.l1_total[e] * (1 - (step + 1) / self.guided_steps)
        new = _ops.guided_step(
            self.x[e], self.input[e], self.baseline[e], grad.to(torch.float64), self.fraction,
            max(alpha - self.max_dist, 0.0), min(alpha + self.max_dist, 1.0), l1_target,
        )
        moves = new - self.x[e]
        self.x[e] = new
        return tuple(part.unsqueeze(0) for part in self._split(moves))

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        sizes = [math.prod(s) for s in self.shapes]
        return [part.reshape((flat.shape[0],) + s) for part, s in zip(flat.split(sizes, 1), self.shapes)]



# --- latent path (Latent IG: through a latent space, the DALL-E dVAE's for one) ----------------------------

INTERPOLATIONS = ("lerp", "slerp")
# slerp falls back to lerp where the two latent vectors are this close to (anti-)parallel: |cos angle| above it
# (about 1.8 degrees), where sin(angle) is too small to divide by safely
SLERP_PARALLEL_COS = 0.9995


def lerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(1 - t) z0 + t z1`` for every t: z0, z1 [m, ...], t [k] -> [k, m, ...]; exactly z0 at t = 0 and z1 at t = 1."""
    t = t.to(device=z0.device, dtype=z0.dtype).reshape((-1,) + (1,) * z0.dim())
    return torch.lerp(z0.unsqueeze(0), z1.unsqueeze(0), t)


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Great-circle interpolation of the vectors along ``dim`` (per example and per latent position for [m, C, h, w]
    latents): ``sin((1 - t) w) / sin(w) z0 + sin(t w) / sin(w) z1`` with w the angle between them, so a
    point's norm moves smoothly between the two norms. Where the two vectors are nearly parallel or opposite
    (|cos w| > :data:`SLERP_PARALLEL_COS`) or one is zero, it is :func:`lerp`. z0, z1 [m, ...], t [k] ->
    [k, m, ...]; the coefficients are computed in float64; exactly z0 at t = 0 and z1 at t = 1."""
    a, b = z0.to(torch.float64), z1.to(torch.float64)
    norms = a.norm(dim=dim, keepdim=True) * b.norm(dim=dim, keepdim=True)
    cos = ((a * b).sum(dim=dim, keepdim=True) / norms.clamp_min(torch.finfo(torch.float64).tiny)).clamp(-1, 1)
    straight = (cos.abs() > SLERP_PARALLEL_COS) | (norms == 0)
    angle = torch.where(straight, torch.zeros_like(cos), torch.acos(cos))  # [m, ...] with size 1 along dim
    sin = torch.where(straight, torch.ones_like(cos), torch.sin(angle))
    t = t.to(device=z0.device, dtype=torch.float64).reshape((-1,) + (1,) * z0.dim())
    w0 = torch.where(straight, 1 - t, torch.sin((1 - t) * angle) / sin)
    w1 = torch.where(straight, t, torch.sin(t * angle) / sin)
    return (w0 * a + w1 * b).to(z0.dtype)


class LatentSpace(Protocol):
    """What a latent path needs of its latent space (:class:`fastig.models.dvae.DVAEImageSpace` is one): both
    conversions run without gradients, the points being constants to the classifier."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Classifier inputs [n, C, H, W] -> latents [n, ...]."""

    def decode(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Latents [n, ...] -> classifier inputs [n, C, *size]."""


class LatentPath:
    """Latent IG's path: the baseline and the input encoded, interpolated in latent space, each point decoded,
    and straight pixel-space segments closing the gaps to the real baseline and input.

    The points, ``M + 1 = 2 G + K + 1`` per example (``G = gap_steps``, ``K = latent_steps``), in the
    classifier's input space:

    - ``p = 0 .. G``: ``lerp(baseline, D_0, p / G)``, from the baseline to the decoded baseline D_0;
    - ``p = G + k``, ``k = 0 .. K``: ``D(t_k)``, the decoding of ``interpolate(z_baseline, z_input, t_k)`` with
      ``t_k = k / K``, or ``latent_alphas[k]`` when given (increasing, from 0 to 1) (D_0 = D(0), D_1 = D(1));
    - ``p = G + K + j``, ``j = 0 .. G``: ``lerp(D_1, input, j / G)``, from the decoded input to the input.

    So the first point is the baseline and the last is the input, exactly. The encoder runs once per example
    (baselines and inputs in one pass; a baseline shared by all examples once) and so does the decoding of the
    endpoints; the interior decoded points of a batch of steps go through the decoder in one batched pass,
    generated when the engine asks for them.

    ``moves(steps, examples)`` is what the gradient at each point is multiplied by, by ``rule``: the left rule
    ``x_{p+1} - x_p`` (``sum_p grad f(x_p) . (x_{p+1} - x_p)`` over p = 0 .. M-1) or the trapezoid rule
    ``(x_{p+1} - x_{p-1}) / 2`` (one-sided at both ends, p = 0 .. M). Decoded points are cached for the next
    request (a batch's right neighbour is the next batch's first point), so no point is decoded twice in order.
    """

    def __init__(self, inputs: torch.Tensor, baselines: torch.Tensor, space: LatentSpace, interpolation: str,
                 latent_steps: int, gap_steps: int, rule: str = "riemann_left", latent_alphas=None):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(map(repr, INTERPOLATIONS))}, got {interpolation!r}")
        if rule not in ("riemann_left", "riemann_trapezoid"):
            raise ValueError(f"a latent path's rule is 'riemann_left' or 'riemann_trapezoid', got {rule!r}")
        n = inputs.shape[0]
        self.inputs, self.baselines = inputs, baselines.expand_as(inputs)
        self.space, self.interpolation, self.rule = space, interpolation, rule
        self.latent_steps, self.gap_steps = int(latent_steps), int(gap_steps)
        if latent_alphas is None:
            self.latent_alphas = [k / self.latent_steps for k in range(self.latent_steps + 1)]
        else:
            self.latent_alphas = [float(t) for t in latent_alphas]
            if (len(self.latent_alphas) != self.latent_steps + 1 or self.latent_alphas[0] != 0.0
                    or self.latent_alphas[-1] != 1.0 or any(b <= a for a, b in zip(self.latent_alphas, self.latent_alphas[1:]))):
                raise ValueError(f"latent_alphas must be {self.latent_steps + 1} increasing values from 0 to 1")
        self.size = tuple(inputs.shape[-2:])
        # a baseline shared by all examples ([1, ...]) is encoded and decoded once
        nb = baselines.shape[0] if baselines.shape[0] == 1 else n
        z = space.encode(torch.cat([baselines.expand((nb,) + tuple(inputs.shape[1:])), inputs]))
        decoded = space.decode(z, self.size)
        self.z_start, self.z_end = z[:nb].expand_as(z[nb:]), z[nb:]
        self.decoded_start, self.decoded_end = decoded[:nb].expand_as(inputs), decoded[nb:]
        self.n_steps = 2 * self.gap_steps + self.latent_steps + 1  # points per example (the engine's n_steps)
        self._cache: dict[int, torch.Tensor] = {}
        self._cached_examples: tuple[int, int] | None = None

    @property
    def last(self) -> int:
        """Index M of the last point (the input)."""
        return self.n_steps - 1

    def points(self, steps: slice, examples: slice) -> tuple[torch.Tensor, ...]:
        indices = range(steps.start, steps.stop)
        if not 0 <= steps.start <= steps.stop <= self.n_steps:
            raise IndexError(f"steps {steps.start} .. {steps.stop} are outside the path's {self.n_steps} points")
        # the right neighbour is decoded in the same pass: the moves of this batch's last step need it
        found = self._points(range(steps.start, min(steps.stop + 1, self.n_steps)), examples)
        return (torch.cat([found[p] for p in indices]),)

    def moves(self, steps: slice, examples: slice) -> tuple[torch.Tensor, ...]:
        last = self.last
        if self.rule == "riemann_left":
            pairs = [(p + 1, p, 1.0) for p in range(steps.start, steps.stop)]
        else:
            pairs = [(min(p + 1, last), max(p - 1, 0), 0.5) for p in range(steps.start, steps.stop)]
        found = self._points(sorted({q for pair in pairs for q in pair[:2]}), examples)
        return (torch.stack([(found[right] - found[left]) * scale for right, left, scale in pairs]),)

    def _points(self, indices, examples: slice) -> dict[int, torch.Tensor]:
        """Points [m, ...] by index, decoding the missing interior latent points in one batched pass."""
        key = (examples.start, examples.stop)
        if self._cached_examples != key:
            self._cache, self._cached_examples = {}, key
        G, K = self.gap_steps, self.latent_steps
        found = {p: self._cache[p] for p in indices if p in self._cache}
        to_decode = []
        for p in indices:
            if p in found:
                continue
            if not 0 <= p <= self.last:
                raise IndexError(f"point {p} is outside the path's 0 .. {self.last}")
            if p <= G:
                found[p] = self._segment(self.baselines[examples], self.decoded_start[examples], p, G)
            elif p >= G + K:
                found[p] = self._segment(self.decoded_end[examples], self.inputs[examples], p - G - K, G)
            else:
                to_decode.append(p)
        if to_decode:
            t = torch.tensor([self.latent_alphas[p - G] for p in to_decode], dtype=torch.float64)
            interpolate = lerp if self.interpolation == "lerp" else slerp
            z = interpolate(self.z_start[examples], self.z_end[examples], t)
            decoded = self.space.decode(z.reshape((-1,) + tuple(z.shape[2:])), self.size)
            found.update(zip(to_decode, decoded.reshape((len(to_decode), -1) + tuple(decoded.shape[1:])).unbind(0)))
        lowest = min(indices) - 1  # keep what the next request can reuse: this one's points and its left neighbour
        self._cache = {p: v for p, v in {**self._cache, **found}.items() if p >= lowest}
        return found

    @staticmethod
    def _segment(start: torch.Tensor, end: torch.Tensor, j: int, count: int) -> torch.Tensor:
        if j == 0:
            return start
        if j == count:
            return end
        return torch.lerp(start, end, j / count)
