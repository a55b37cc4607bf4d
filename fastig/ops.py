"""Public wrappers of fastig's compiled ops, each next to its pure-torch reference.

``fastig.ops.<op>`` runs the compiled kernel for the tensor's device when fastig._C provides one and the pure-torch
``<op>_reference`` otherwise; both follow the same documented semantics (see each reference's docstring).
:func:`backends` says which one each op uses on this machine. None of these ops is differentiable: they work on
detached tensors, as the engine uses them.
"""

from __future__ import annotations

from fastig import _ops
from fastig._ops import (
    accumulate,
    accumulate_idgi,
    accumulate_idgi_reference,
    accumulate_reference,
    guided_step,
    guided_step_reference,
    path_points,
    path_points_reference,
    perturb,
    perturb_reference,
    squared_norms,
    squared_norms_reference,
)

__all__ = [
    "accumulate",
    "accumulate_idgi",
    "accumulate_idgi_reference",
    "accumulate_reference",
    "backends",
    "guided_step",
    "guided_step_reference",
    "path_points",
    "path_points_reference",
    "perturb",
    "perturb_reference",
    "squared_norms",
    "squared_norms_reference",
]

OP_NAMES = ("path_points", "accumulate", "squared_norms", "accumulate_idgi", "perturb", "guided_step")


def backends() -> dict[str, str]:
    """Which implementation each op runs: ``{"path_points": "cpu-kernel" | "cuda-kernel" | "reference", ...}``.

    "cuda-kernel" when the op has a compiled CUDA kernel and a GPU is usable (CPU tensors still use the CPU
    kernel), "cpu-kernel" when it has a compiled CPU kernel, "reference" when fastig._C is absent or lacks it.
    """
    return {name: _ops.backend(name) for name in OP_NAMES}
