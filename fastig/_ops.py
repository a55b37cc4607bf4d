"""The one door to fastig's compiled ops.

Every op has a pure-torch reference here (``*_reference``). When the compiled extension ``fastig._C`` is built and
provides the op, ``torch.ops.fastig.<op>`` is used; otherwise the reference runs, and fastig says so once.
"""

from __future__ import annotations

import math
import warnings

import torch

try:  # importing the extension registers torch.ops.fastig.*
    from fastig import _C  # noqa: F401

    _EXTENSION_ERROR: str | None = None
except ImportError as exc:  # the package keeps working on its pure-torch paths
    _EXTENSION_ERROR = str(exc)

_warned = False


def _compiled(name: str):
    """The compiled op ``name``, or None when the extension is absent or lacks it."""
    global _warned
    if _EXTENSION_ERROR is not None:
        if not _warned:
            _warned = True
            warnings.warn(
                f"fastig: compiled extension unavailable ({_EXTENSION_ERROR}); using pure-torch ops",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    return getattr(torch.ops.fastig, name, None) if hasattr(torch.ops, "fastig") else None


def extension_available() -> bool:
    return _EXTENSION_ERROR is None


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 accumulates in fp64, everything else in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- path_points -------------------------------------------------------------------------------------------


def path_points_reference(input: torch.Tensor, baseline: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """``baseline + alpha_k * (input - baseline)`` for every alpha, stacked step-major: [K * N, ...].

    ``baseline`` broadcasts against ``input``. Arithmetic runs in fp32 (fp64 for fp64 inputs), like PyTorch's own
    scalar arithmetic, so each point equals Captum's ``baseline + alpha * (input - baseline)``.
    """
    compute = accumulation_dtype(input.dtype)
    x = input.to(compute)
    b = baseline.to(compute).expand_as(x)
    a = alphas.to(compute).reshape((-1,) + (1,) * x.dim())
    points = b.unsqueeze(0) + a * (x - b).unsqueeze(0)
    return points.reshape((-1,) + tuple(x.shape[1:])).to(input.dtype)


def path_points(input: torch.Tensor, baseline: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Path points [K * N, ...], step-major (row ``k * N + n``); see :func:`path_points_reference`."""
    _check_floating("input", input)
    if input.dim() < 1:
        raise ValueError("input must have shape [N, ...], got a 0-dim tensor")
    _check_floating("baseline", baseline)
    if baseline.dtype != input.dtype:
        raise TypeError(f"baseline dtype {baseline.dtype} differs from input dtype {input.dtype}")
    try:
        expanded = baseline.expand_as(input)
    except RuntimeError:
        raise ValueError(f"baseline of shape {tuple(baseline.shape)} does not broadcast to input shape "
                         f"{tuple(input.shape)}") from None
    if alphas.dim() != 1:
        raise ValueError(f"alphas must be 1-D [K], got shape {tuple(alphas.shape)}")
    op = _compiled("path_points")
    if op is not None:
        return op(input.detach(), expanded.detach(), alphas.detach().to(device=input.device, dtype=torch.float64))
    return path_points_reference(input, baseline, alphas)


# --- accumulate --------------------------------------------------------------------------------------------


def accumulate_reference(grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Riemann accumulation ``sum_k weights[k] * grads[k]`` over the leading step axis: [K, N, ...] -> [N, ...]."""
    acc = accumulation_dtype(grads.dtype)
    w = weights.to(acc).reshape((-1,) + (1,) * (grads.dim() - 1))
    return (grads.to(acc) * w).sum(0)


def accumulate(grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Riemann accumulation grads [K, N, ...], weights [K] -> [N, ...]; see :func:`accumulate_reference`."""
    _check_grads(grads)
    _check_floating("weights", weights)
    if tuple(weights.shape) != (grads.shape[0],):
        raise ValueError(f"weights must have shape [K] = [{grads.shape[0]}] for grads {tuple(grads.shape)}, "
                         f"got {tuple(weights.shape)}")
    op = _compiled("accumulate")
    if op is not None:
        return op(grads.detach(), weights.detach())
    return accumulate_reference(grads, weights)


def squared_norms_reference(grads: torch.Tensor) -> torch.Tensor:
    """``||g_{k,n}||^2`` over all features of each step and example: [K, N, ...] -> [K, N] (fp32, fp64 for fp64)."""
    g = grads.to(accumulation_dtype(grads.dtype))
    return (g * g).reshape(g.shape[0], g.shape[1], -1).sum(-1)


def accumulate_idgi_reference(grads: torch.Tensor, outputs: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """IDGI: ``sum_k g_k * g_k * (f_{k+1} - f_k) / sq_norms_k``: grads [K, N, ...], outputs [K+1, N], sq_norms [K, N].

    ``sq_norms`` is passed in because with several input tensors the norm runs over all of them jointly.
    Steps with a zero norm contribute nothing (no NaN).
    """
    acc = accumulation_dtype(grads.dtype)
    g = grads.to(acc)
    df = (outputs[1:] - outputs[:-1]).to(acc)
    norms = sq_norms.to(acc)
    scale = torch.where(norms > 0, df / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.zeros_like(norms))
    return (g * g * scale.reshape(scale.shape + (1,) * (g.dim() - 2))).sum(0)


def squared_norms(grads: torch.Tensor) -> torch.Tensor:
    """``||g_{k,n}||^2`` per step and example: grads [K, N, ...] -> [K, N] (fp32, fp64 for fp64 grads)."""
    _check_grads(grads)
    op = _compiled("squared_norms")
    if op is not None and _compiled_dtype_ok(grads):
        return op(grads.detach())
    return squared_norms_reference(grads)


def accumulate_idgi(grads: torch.Tensor, outputs: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """IDGI accumulation (see :func:`accumulate_idgi_reference`): grads [K, N, ...] -> [N, ...]."""
    _check_idgi(grads, outputs, sq_norms)
    op = _compiled("accumulate_idgi")
    if op is not None and _compiled_dtype_ok(grads):
        return op(grads.detach(), outputs.detach(), sq_norms.detach())
    return accumulate_idgi_reference(grads, outputs, sq_norms)


# --- argument checks (shared by the references and the dispatchers) ----------------------------------------

_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _compiled_dtype_ok(t: torch.Tensor) -> bool:
    return t.dtype in _FLOATING


def _check_floating(name: str, t: torch.Tensor, allowed=_FLOATING) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype {names}; got {str(t.dtype).replace('torch.', '')}")


def _check_grads(grads: torch.Tensor) -> None:
    _check_floating("grads", grads)
    if grads.dim() < 2:
        raise ValueError(f"grads must have shape [K, N, ...] (at least 2 dims), got {tuple(grads.shape)}")


def _check_idgi(grads: torch.Tensor, outputs: torch.Tensor, sq_norms: torch.Tensor) -> None:
    _check_grads(grads)
    _check_floating("outputs", outputs)
    _check_floating("sq_norms", sq_norms)
    k, n = grads.shape[0], grads.shape[1]
    if tuple(outputs.shape) != (k + 1, n):
        raise ValueError(f"outputs must have shape [K+1, N] = {[k + 1, n]} for grads {tuple(grads.shape)}, "
                         f"got {tuple(outputs.shape)}")
    if tuple(sq_norms.shape) != (k, n):
        raise ValueError(f"sq_norms must have shape [K, N] = {[k, n]}, got {tuple(sq_norms.shape)}")


# --- perturb (insertion / deletion batches) ----------------------------------------------------------------


def _check_perturb(image, substrate, rank, counts) -> None:
    _check_floating("image", image)
    _check_floating("substrate", substrate)
    if image.dim() != 4:
        raise ValueError(f"image must have shape [N, C, H, W], got {tuple(image.shape)}")
    if substrate.dtype != image.dtype:
        raise TypeError(f"substrate dtype {substrate.dtype} differs from image dtype {image.dtype}")
    try:
        torch.broadcast_shapes(substrate.shape, image.shape)
        if torch.broadcast_shapes(substrate.shape, image.shape) != image.shape:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"substrate of shape {tuple(substrate.shape)} does not broadcast to image shape "
                         f"{tuple(image.shape)}") from None
    if not isinstance(rank, torch.Tensor) or rank.dtype != torch.int64:
        raise TypeError(f"rank must be an int64 tensor, got {getattr(rank, 'dtype', type(rank).__name__)}")
    if not isinstance(counts, torch.Tensor) or counts.dtype != torch.int64:
        raise TypeError(f"counts must be an int64 tensor, got {getattr(counts, 'dtype', type(counts).__name__)}")
    n, _, h, w = image.shape
    if tuple(rank.shape) != (n, h, w):
        raise ValueError(f"rank must have shape [N, H, W] = {[n, h, w]}, got {tuple(rank.shape)}")
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D [K], got shape {tuple(counts.shape)}")
    for name, t in (("substrate", substrate), ("rank", rank), ("counts", counts)):
        if t.device != image.device:
            raise ValueError(f"{name} is on {t.device} but image is on {image.device}")


def perturb_reference(
    image: torch.Tensor, substrate: torch.Tensor, rank: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Insertion/deletion batch: for every image and every pixel count, the image's most salient pixels.

    Args:
        image: [N, C, H, W] float tensor (float32/float64/float16/bfloat16).
        substrate: same dtype, broadcastable to ``image`` (e.g. the blurred image for insertion, a baseline such
            as zeros [1, C, H, W] for deletion).
        rank: [N, H, W] int64, the saliency rank of each pixel of each image (0 = most salient). Ranks need not
            be a permutation: any int64 values work, the rule below is all that matters.
        counts: [K] int64 pixel counts, in any order.

    Returns:
        [N * K, C, H, W], image-major: row ``n * K + k`` (i.e. ``out.view(N, K, C, H, W)[n, k]``) is image ``n``
        with ``counts[k]`` pixels shown: pixel (h, w) is ``image[n, :, h, w]`` where ``rank[n, h, w] < counts[k]``
        and ``substrate[n, :, h, w]`` elsewhere; all channels of a pixel move together. The values are copied
        exactly (no arithmetic). Image-major order means that the model's scores on the batch reshape to the
        per-image curves ``scores.view(N, K)``.

    Insertion: ``perturb(image, blurred, rank, counts)``; deletion: ``perturb(baseline, image, rank, counts)``
    (the ``counts[k]`` most salient pixels removed).
    """
    _check_perturb(image, substrate, rank, counts)
    n, c, h, w = image.shape
    k = counts.shape[0]
    shown = rank.unsqueeze(1) < counts.reshape(1, k, 1, 1)  # [N, K, H, W]
    out = torch.where(shown.unsqueeze(2), image.unsqueeze(1), substrate.expand_as(image).unsqueeze(1))
    return out.reshape(n * k, c, h, w)


def perturb(image: torch.Tensor, substrate: torch.Tensor, rank: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Insertion/deletion batch ``[N * K, C, H, W]``, image-major; see :func:`perturb_reference` for the semantics."""
    _check_perturb(image, substrate, rank, counts)
    op = _compiled("perturb")
    if op is not None:
        return op(image.detach(), substrate.detach(), rank, counts)
    return perturb_reference(image, substrate, rank, counts)


# --- guided_step (one step of Guided IG) --------------------------------------------------------------------

# math.isclose tolerances of PAIR saliency's Guided IG loop (its EPSILON).
GUIDED_IG_EPSILON = 1e-9


def _check_guided(x, input, baseline, grad, fraction, alpha_min, alpha_max, l1_target) -> None:
    allowed = (torch.float32, torch.float64)
    _check_floating("x", x, allowed)
    for name, t in (("input", input), ("baseline", baseline), ("grad", grad)):
        _check_floating(name, t, allowed)
        if t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from x dtype {x.dtype}")
        if t.shape != x.shape:
            raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dim() < 1:
        raise ValueError("x must have shape [N, ...] (at least 1 dim)")
    _check_floating("l1_target", l1_target)
    if tuple(l1_target.shape) != (x.shape[0],):
        raise ValueError(f"l1_target must have shape [N] = [{x.shape[0]}], got {tuple(l1_target.shape)}")
    if l1_target.device != x.device:
        raise ValueError(f"l1_target is on {l1_target.device} but x is on {x.device}")
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if not 0.0 <= float(alpha_min) <= float(alpha_max) <= 1.0:
        raise ValueError(f"need 0 <= alpha_min <= alpha_max <= 1, got alpha_min={alpha_min}, alpha_max={alpha_max}")


def guided_step_reference(
    x: torch.Tensor,
    input: torch.Tensor,
    baseline: torch.Tensor,
    grad: torch.Tensor,
    fraction: float,
    alpha_min: float,
    alpha_max: float,
    l1_target: torch.Tensor,
) -> torch.Tensor:
    """One step of Guided IG (Kapishnikov et al. 2021) exactly as PAIR saliency's ``guided_ig_impl`` loop does it.

    Batched over N independent examples; each example's features are all its elements (``x[n].flatten()``, D of
    them). PAIR's driver does, for step ``s`` of ``steps``: ``alpha = (s + 1) / steps``,
    ``alpha_min = max(alpha - max_dist, 0)``, ``alpha_max = min(alpha + max_dist, 1)``,
    ``l1_target = l1_total * (1 - (s + 1) / steps)`` with ``l1_total = sum |input - baseline|``; it then calls
    this step with the gradient at ``x`` and adds ``(x_next - x) * grad`` to the attribution.

    Args:
        x: [N, ...] the current point of each example's path (float32 or float64).
        input, baseline, grad: [N, ...], same shape and dtype as ``x``; ``grad`` is the gradient at ``x``.
        fraction: in [0, 1], the quantile of |grad| that selects the features to move in each round.
        alpha_min, alpha_max: 0 <= alpha_min <= alpha_max <= 1, the band of this step.
        l1_target: [N] float tensor, the L1 distance ``sum |x_next - input|`` each example should end at.

    Returns:
        x_next, with the shape and dtype of ``x`` (channels_last when ``x`` is).

    Per example, with ``d = input - baseline``, ``x_min = baseline + d * alpha_min`` and
    ``x_max = baseline + d * alpha_max`` (element-wise, in x's dtype, alpha rounded to x's dtype), rounds repeat:

    1. Laggards: ``a = (x - baseline) / d`` (``a = alpha_max`` where ``d == 0``); where ``a < alpha_min``,
       ``x = x_min``. Features with ``input == baseline`` are thus never laggards.
    2. ``l1 = sum |x - input|`` (terms in x's dtype, summed in float64). The step ends when
       ``l1 - l1_target <= max(1e-9 * max(|l1|, |l1_target|), 1e-9)``: PAIR's ``math.isclose`` stop, extended to
       an ``l1`` already below the target (where PAIR would fail an assertion or loop forever).
    3. Selection: features with ``x == x_max`` (exactly) get key +inf, the others key ``|grad|`` (a NaN or
       infinite gradient also gets +inf). ``threshold`` = the ``floor(fraction * (D - 1))``-th smallest key
       (0-based) over ALL D features, the +inf keys included: ``np.quantile(..., interpolation='lower')`` as PAIR
       calls it (not numpy's default linear rule). Selected: key ``<= threshold`` and key finite, so ties at the
       threshold are all selected, and features at ``x_max`` (among them every feature with ``input == baseline``
       and ``x == baseline``) never are.
    4. ``l1_s = sum over selected |x - x_max|`` (float64). If nothing is selected (``l1_s == 0``) the step ends
       (PAIR would loop forever). ``gamma = (l1 - l1_target) / l1_s``. If ``gamma > 1`` the selected features
       move to ``x_max`` and another round follows; otherwise they move to ``x + (x_max - x) * gamma`` (gamma
       rounded to x's dtype) and the step ends.

    Every continuing round moves at least one more feature onto ``x_max``, so a step takes at most D + 1 rounds.
    """
    _check_guided(x, input, baseline, grad, fraction, alpha_min, alpha_max, l1_target)
    n = x.shape[0]
    if n == 0 or x.numel() == 0:
        return x.clone()
    dt = x.dtype
    a_min = torch.tensor(alpha_min, dtype=dt, device=x.device)
    a_max = torch.tensor(alpha_max, dtype=dt, device=x.device)
    inp, base = input.reshape(n, -1), baseline.reshape(n, -1)
    cur = x.reshape(n, -1).clone()
    d = inp - base
    x_min, x_max = base + d * a_min, base + d * a_max
    abs_grad = grad.reshape(n, -1).abs()
    abs_grad = torch.where(torch.isfinite(abs_grad), abs_grad, torch.full_like(abs_grad, float("inf")))
    target = l1_target.to(torch.float64)
    n_features = cur.shape[1]
    kth = math.floor(float(fraction) * (n_features - 1))  # 0-based index of np.quantile's 'lower' rule
    inf = torch.tensor(float("inf"), dtype=dt, device=x.device)
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    for _ in range(n_features + 2):
        alpha = torch.where(d != 0, (cur - base) / d, a_max)
        cur = torch.where(active.unsqueeze(1) & (alpha < a_min), x_min, cur)
        l1 = (cur - inp).abs().to(torch.float64).sum(1)
        tol = torch.clamp(GUIDED_IG_EPSILON * torch.maximum(l1.abs(), target.abs()), min=GUIDED_IG_EPSILON)
        active = active & (l1 - target > tol)
        if not bool(active.any()):
            break
        key = torch.where(cur == x_max, inf, abs_grad)
        threshold = key.kthvalue(kth + 1, dim=1).values
        selected = active.unsqueeze(1) & (key <= threshold.unsqueeze(1)) & torch.isfinite(key)
        l1_s = torch.where(selected, (cur - x_max).abs(), torch.zeros_like(cur)).to(torch.float64).sum(1)
        gamma = (l1 - target) / torch.where(l1_s > 0, l1_s, torch.ones_like(l1_s))
        full = gamma > 1
        partial = cur + (x_max - cur) * gamma.to(dt).unsqueeze(1)
        cur = torch.where(selected, torch.where(full.unsqueeze(1), x_max, partial), cur)
        active = active & full & (l1_s > 0)
    out = torch.empty_like(x)
    out.copy_(cur.reshape(x.shape))
    return out


def guided_step(
    x: torch.Tensor,
    input: torch.Tensor,
    baseline: torch.Tensor,
    grad: torch.Tensor,
    fraction: float,
    alpha_min: float,
    alpha_max: float,
    l1_target: torch.Tensor,
) -> torch.Tensor:
    """One Guided IG step for N examples: x [N, ...] -> x_next; see :func:`guided_step_reference`."""
    _check_guided(x, input, baseline, grad, fraction, alpha_min, alpha_max, l1_target)
    op = _compiled("guided_step")
    if op is not None:
        return op(x.detach(), input.detach(), baseline.detach(), grad.detach(), float(fraction), float(alpha_min),
                  float(alpha_max), l1_target.detach().to(torch.float64))
    return guided_step_reference(x, input, baseline, grad, fraction, alpha_min, alpha_max, l1_target)


def backend(name: str) -> str:
    """"cuda-kernel", "cpu-kernel" or "reference": what op ``name`` runs on this machine (see fastig.ops.backends)."""
    if _EXTENSION_ERROR is not None or not hasattr(torch.ops, "fastig"):
        return "reference"
    def has(key: str) -> bool:
        try:
            return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastig::{name}", key)
        except RuntimeError:  # the op is not registered
            return False

    if torch.cuda.is_available() and has("CUDA"):
        return "cuda-kernel"
    if has("CPU"):
        return "cpu-kernel"
    return "reference"


# --- torch.compile support: shape/dtype/stride-only ("fake") implementations of the compiled ops --------------


def _channels_last_order(t: torch.Tensor, lead: int) -> bool:
    """Mirror of csrc/common.h channels_last_order: [.., C, H, W] stored as [.., H, W, C] (and not contiguous)."""
    if t.dim() != lead + 3 or t.is_contiguous():
        return False
    return t.permute(*range(lead), lead + 1, lead + 2, lead).is_contiguous()


def _empty_in_order(sizes, lead: int, channels_last: bool, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """Mirror of csrc/common.h empty_in_order."""
    dtype = like.dtype if dtype is None else dtype
    if not channels_last:
        return like.new_empty(sizes, dtype=dtype)
    sizes = list(sizes)
    stored = sizes[:lead] + [sizes[lead + 1], sizes[lead + 2], sizes[lead]]
    return like.new_empty(stored, dtype=dtype).permute(*range(lead), lead + 2, lead, lead + 1)


def _register_fakes() -> None:
    register = torch.library.register_fake

    @register("fastig::path_points")
    def _(input, baseline, alphas):
        sizes = [alphas.shape[0] * input.shape[0]] + list(input.shape[1:])
        return _empty_in_order(sizes, 1, _channels_last_order(input, 1), input)

    def accumulated(grads):
        return _empty_in_order(list(grads.shape[1:]), 1, _channels_last_order(grads, 2), grads,
                               accumulation_dtype(grads.dtype))

    @register("fastig::accumulate")
    def _(grads, weights):
        return accumulated(grads)

    @register("fastig::accumulate_idgi")
    def _(grads, outputs, sq_norms):
        return accumulated(grads)

    @register("fastig::squared_norms")
    def _(grads):
        return grads.new_empty(grads.shape[:2], dtype=accumulation_dtype(grads.dtype))

    @register("fastig::perturb")
    def _(image, substrate, rank, counts):
        n, c, h, w = image.shape
        return _empty_in_order([n * counts.shape[0], c, h, w], 1, _channels_last_order(image, 1), image)

    @register("fastig::guided_step")
    def _(x, input, baseline, grad, fraction, alpha_min, alpha_max, l1_target):
        return _empty_in_order(list(x.shape), 1, _channels_last_order(x, 1), x)


if _EXTENSION_ERROR is None and hasattr(torch.ops, "fastig") and hasattr(torch.ops.fastig, "guided_step"):
    _register_fakes()
