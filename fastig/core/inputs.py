"""Checking and formatting of the inputs every attribution method takes (Captum's conventions, clear errors:
an :class:`~fastig.errors.InputError` naming the argument and what it must be)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fastig.errors import InputError


def format_inputs(inputs: Any, same_batch: bool = True) -> tuple[tuple[torch.Tensor, ...], bool]:
    """(inputs as a tuple of tensors, whether the caller gave a tuple).

    ``same_batch=False`` lets inputs after the first have another first dimension (the perturbation methods take
    EmbeddingBag-style index lists and empty tensors beside the batch, as Captum does).
    """
    is_tuple = isinstance(inputs, tuple)
    tensors = inputs if is_tuple else (inputs,)
    if not tensors:
        raise InputError("inputs is an empty tuple")
    for i, x in enumerate(tensors):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"inputs[{i}] must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0:
            raise InputError(f"inputs[{i}] is a scalar; inputs need a leading batch dimension")
        if x.shape[0] == 0 and (same_batch or i == 0):  # other inputs may be empty where the batch is inputs[0]
            raise InputError(f"inputs[{i}] holds no example (shape {tuple(x.shape)}); give at least one")
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise InputError(f"inputs[{i}] contains NaN or infinite values")
    n = tensors[0].shape[0]
    for i, x in enumerate(tensors[1:] if same_batch else (), 1):
        if x.shape[0] != n:
            raise InputError(f"all inputs need the same batch size: inputs[0] has {n}, inputs[{i}] has {x.shape[0]}")
    return tuple(tensors), is_tuple


def format_baselines(baselines: Any, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Baselines as tensors of each input's dtype and device, either [N, ...] or broadcastable [1, ...].

    Accepts None (zeros), a number, a tensor, or a tuple of those, one per input (Captum's rules).
    """
    if baselines is None:
        baselines = (0,) * len(inputs)
    elif not isinstance(baselines, tuple):
        baselines = (baselines,)
    if len(baselines) != len(inputs):
        raise InputError(f"got {len(baselines)} baselines for {len(inputs)} inputs")
    out = []
    for i, (b, x) in enumerate(zip(baselines, inputs)):
        if isinstance(b, (int, float)) and not isinstance(b, bool):
            b = torch.full((1,) + tuple(x.shape[1:]), b, dtype=x.dtype, device=x.device)
        elif isinstance(b, torch.Tensor):
            if b.dim() == 0:
                b = b.reshape((1,) * x.dim())
            if not (b.shape == x.shape or (b.dim() == x.dim() and b.shape[0] == 1)):
                raise InputError(
                    f"baselines[{i}] has shape {tuple(b.shape)}; it must equal the input's shape {tuple(x.shape)} "
                    "or have batch size 1 and broadcast to it"
                )
            try:
                torch.broadcast_shapes(b.shape, x.shape)
            except RuntimeError:
                raise InputError(f"baselines[{i}] of shape {tuple(b.shape)} does not broadcast to {tuple(x.shape)}")
            if b.is_floating_point() and not torch.isfinite(b).all():
                raise InputError(f"baselines[{i}] contains NaN or infinite values")
            b = b.to(device=x.device, dtype=x.dtype)
        else:
            raise TypeError(f"baselines[{i}] must be a tensor or a number, got {type(b).__name__}")
        out.append(b)
    return tuple(out)


def format_output(values: tuple[torch.Tensor, ...], is_tuple: bool) -> Any:
    return values if is_tuple else values[0]


def row_sums(values: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-example sum over every element of every tensor (Captum's ``_sum_rows`` summed across inputs)."""
    return torch.stack([v.reshape(v.shape[0], -1).sum(1) for v in values]).sum(0)


# --- random copies: noisy inputs and baselines drawn from a distribution (SmoothGrad, NoiseTunnel, GradientShap) ---


def check_stdevs(stdevs: Any, n_inputs: int) -> tuple[float, ...]:
    if isinstance(stdevs, tuple):
        if len(stdevs) != n_inputs:
            raise InputError(f"got {len(stdevs)} stdevs for {n_inputs} inputs")
    else:
        stdevs = (stdevs,) * n_inputs
    for s in stdevs:
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise TypeError(f"stdevs must be a float or a tuple of floats, got {type(s).__name__}")
        if not (s >= 0 and math.isfinite(s)):
            raise InputError(f"stdevs must be a finite number >= 0, got {s}")
    return tuple(float(s) for s in stdevs)


def noisy_copies(x: torch.Tensor, stdev: float, n_samples: int) -> torch.Tensor:
    """``n_samples`` copies of each example of ``x`` (example-major) plus N(0, stdev^2) noise, drawn as Captum does:
    one draw of the whole [N * n_samples, ...] block in the default dtype. A stdev so large that the noisy
    copies overflow is named here, rather than blamed on the inputs by the method that receives them."""
    shape = (x.shape[0] * n_samples,) + tuple(x.shape[1:])
    noise = torch.randn(shape, dtype=torch.get_default_dtype(), device=x.device) * stdev  # == torch.normal(0, stdev)
    noisy = x.repeat_interleave(n_samples, dim=0) + noise
    if noisy.is_floating_point() and not torch.isfinite(noisy).all():
        raise InputError(f"stdevs={stdev:g} makes the noisy inputs overflow {noisy.dtype}: choose a smaller stdevs")
    return noisy


def draw_baselines(baselines: tuple, n_rows: int) -> tuple:
    """Baseline rows drawn uniformly with replacement (``numpy.random.choice``, one draw per tensor, as Captum)."""
    return tuple(
        b[np.random.choice(b.shape[0], n_rows).tolist()] if isinstance(b, torch.Tensor) else b for b in baselines
    )
