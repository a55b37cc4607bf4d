"""The one door to fastig's compiled ops.

Every op has a pure-torch reference here (``*_reference``). When the compiled extension ``fastig._C`` is built and
provides the op, ``torch.ops.fastig.<op>`` is used; otherwise the reference runs, and fastig says so once.
"""

from __future__ import annotations

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
    op = _compiled("path_points")
    if op is not None:
        return op(input, baseline.expand_as(input), alphas.to(torch.float64))
    return path_points_reference(input, baseline, alphas)


# --- accumulate --------------------------------------------------------------------------------------------


def accumulate_reference(grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Riemann accumulation ``sum_k weights[k] * grads[k]`` over the leading step axis: [K, N, ...] -> [N, ...]."""
    acc = accumulation_dtype(grads.dtype)
    w = weights.to(acc).reshape((-1,) + (1,) * (grads.dim() - 1))
    return (grads.to(acc) * w).sum(0)


def accumulate(grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    op = _compiled("accumulate")
    if op is not None:
        return op(grads, weights)
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
