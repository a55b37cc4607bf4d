"""Paths from a baseline to the input, evaluated by the engine a batch at a time.

A path has ``n_steps`` points per example. ``points(steps, examples)`` returns the points of a range of steps for a
range of examples, step-major (``[k * m, ...]`` per input tensor), generated on demand so that no more than one
batch of points is ever alive.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

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


def gaussian_blur_matrix(size: int, sigma: float, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """[size, size] matrix M with ``M @ v`` = 1-D Gaussian blur of ``v`` with zero padding, as
    ``scipy.ndimage.gaussian_filter1d(v, sigma, mode="constant")`` computes it: a kernel of radius
    ``int(4 * sigma + 0.5)``, normalized over that radius, built in float64."""
    return _blur_matrix(int(size), float(sigma)).to(dtype=dtype, device=device, copy=True)


@functools.lru_cache(maxsize=512)
def _blur_matrix(size: int, sigma: float) -> torch.Tensor:
    if sigma == 0:
        return torch.eye(size, dtype=torch.float64)
    radius = int(BLUR_TRUNCATE * sigma + 0.5)
    taps = torch.arange(radius + 1, dtype=torch.float64)
    half = torch.exp(-0.5 / (sigma * sigma) * taps**2)  # the kernel from its center out; it is symmetric
    half = half / (2 * half.sum() - half[0])
    by_distance = torch.zeros(size, dtype=torch.float64)
    by_distance[: min(radius + 1, size)] = half[:size]
    index = torch.arange(size)
    return by_distance[(index.reshape(1, -1) - index.reshape(-1, 1)).abs()]


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

