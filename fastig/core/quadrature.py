"""Quadrature rules for path integrals: Captum's five, bit-compatible with captum 0.8/0.9.

``alphas`` are the positions on [0, 1] where the integrand is evaluated, ``weights`` the step sizes they are
multiplied by. The Riemann rules take their alphas from a float32 ``torch.linspace`` (as Captum does, so the
points are exactly Captum's) and their weights are 1/n (halved at both ends for the trapezoid rule, whose weights
therefore sum to 1 - 1/n, as in Captum). Gauss-Legendre uses numpy's float64 nodes and weights.
Captum rounds the weights to float32 before multiplying; :func:`named_rule` does the same.

Inside fastig the quadrature rule is called ``rule`` (a name of :data:`RULES`, or a :class:`Rule` of alphas and
weights). Only the Captum-facing ``attribute()`` signatures (``IntegratedGradients``, ``LayerIntegratedGradients``
and the classes called like them) keep Captum's name for it, ``method=``; ``fastig.attribute`` and the CLI say
``rule`` (``--rule``), since there ``method`` names the attribution method.
"""

from __future__ import annotations

import functools
import math
import os
import resource
from typing import NamedTuple

import numpy as np
import torch

from fastig.errors import InputError, check_int

RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


class Rule(NamedTuple):
    alphas: list[float]  # python floats, exactly Captum's values
    weights: torch.Tensor  # float32 [n], Captum's step sizes after its ``.float()``

    @property
    def includes_start(self) -> bool:
        return self.alphas[0] == 0.0

    @property
    def includes_end(self) -> bool:
        return self.alphas[-1] == 1.0


def check_rule(rule: str, n_steps: int) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown integration method {rule!r}; choose one of {', '.join(RULES)}")
    check_int("n_steps", n_steps, 1 if rule == "gausslegendre" else 2, why=f"for {rule}")
    check_steps_fit(rule, n_steps)


def alphas(rule: str, n_steps: int) -> list[float]:
    check_rule(rule, n_steps)
    n = n_steps
    if rule == "gausslegendre":
        return list(0.5 * (1 + _gauss_legendre(n)[0]))
    start, end = {
        "riemann_trapezoid": (0, 1),
        "riemann_left": (0, 1 - 1 / n),
        "riemann_middle": (1 / (2 * n), 1 - 1 / (2 * n)),
        "riemann_right": (1 / n, 1),
    }[rule]
    return torch.linspace(start, end, n).tolist()


def step_sizes(rule: str, n_steps: int) -> list[float]:
    check_rule(rule, n_steps)
    n = n_steps
    if rule == "gausslegendre":
        return list(0.5 * _gauss_legendre(n)[1])
    deltas = [1 / n] * n
    if rule == "riemann_trapezoid":
        deltas[0] /= 2
        deltas[-1] /= 2
    return deltas


@functools.lru_cache(maxsize=32)
def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy's Gauss-Legendre nodes and weights on [-1, 1] (O(n^3) to compute: kept for the step counts in use)."""
    nodes, weights = np.polynomial.legendre.leggauss(n)
    nodes.flags.writeable = weights.flags.writeable = False
    return nodes, weights


def named_rule(rule: str, n_steps: int) -> Rule:
    """The rule named ``rule`` (one of :data:`RULES`) with ``n_steps`` points: its alphas and float32 weights."""
    return Rule(alphas(rule, n_steps), torch.tensor(step_sizes(rule, n_steps)).float())


# --- non-uniform rules: user-given points (``alphas=``), fitted schedules, adaptive nodes ---------------------


def nearest_node_weights(alphas) -> torch.Tensor:
    """Weights of the nearest-node rule on [0, 1] for increasing, distinct ``alphas``: each point weighs the part
    of [0, 1] closer to it than to any other point (half-way to its neighbours; out to 0 and to 1 at the ends).

    On uniform midpoints this is the midpoint rule; on any points it integrates constants exactly (the weights sum
    to 1), and for the step-like integrands of ReLU networks its error per gap is at most half the jump times the
    gap. float64 [n].
    """
    a = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    edges = torch.cat([a.new_zeros(1), (a[1:] + a[:-1]) / 2, a.new_ones(1)])
    return edges[1:] - edges[:-1]


def custom_rule(alphas, weights=None) -> Rule:
    """A rule from user-given points on [0, 1] (``alphas``, increasing and distinct) and their weights (default:
    :func:`nearest_node_weights`). Weights must be finite; they need not sum to 1 (a rule that does not integrates
    constants wrongly, and the convergence delta shows it). A :class:`Rule` (e.g. from ``fit_schedule``) or an
    ``(alphas, weights)`` pair is accepted as ``alphas`` too."""
    if weights is None and _is_pair(alphas):
        alphas, weights = alphas
    try:
        a = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"alphas must be a sequence of numbers in [0, 1], got {alphas!r}") from None
    if a.numel() == 0 or not torch.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise ValueError(f"alphas must be a non-empty sequence of numbers in [0, 1], got {a.tolist()}")
    if a.numel() > 1 and not (a[1:] > a[:-1]).all():
        raise ValueError("alphas must be increasing and distinct")
    if weights is None:
        w = nearest_node_weights(a)
    else:
        try:
            w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"weights must be a sequence of numbers, got {weights!r}") from None
        if w.numel() != a.numel() or not torch.isfinite(w).all():
            raise ValueError(f"weights must be {a.numel()} finite numbers (one per alpha), got {w.tolist()}")
    return Rule(a.tolist(), w)


def check_auto_steps(tolerance, max_steps) -> tuple[float, int]:
    """The options of ``n_steps="auto"``: a tolerance in (0, 1) and an integer ``max_steps >= 2``."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a number in (0, 1) (a relative error, e.g. 0.01), got {tolerance!r}")
    return float(tolerance), check_int("max_steps", max_steps, 2, why="the error estimate needs two gradients")


def _is_pair(value) -> bool:
    """An ``(alphas, weights)`` pair (a :class:`Rule` is one), not a tuple of two alphas."""
    return isinstance(value, tuple) and len(value) == 2 and all(
        isinstance(v, (list, tuple, np.ndarray)) or (isinstance(v, torch.Tensor) and v.dim() == 1) for v in value)


# --- the work n_steps asks for, bounded before anything is built ----------------------------------------------

# Memory per step of a path: the rule's alphas and weights (Python floats and float32/float64 tensors, as
# Captum's), the path's own alpha table and IDGI's sorted copy -- measured 112 bytes with a Riemann rule -- and
# the output value a path method keeps for every step and example (float64 at most).
BYTES_PER_STEP = 128
BYTES_PER_STEP_AND_EXAMPLE = 8
# numpy's leggauss (Captum's Gauss-Legendre nodes, kept for bit-compatibility) takes the eigenvalues of an n x n
# companion matrix: about 24 n^2 bytes (measured ~18 n^2) and O(n^3) time, 13 s for n = 2000 on a 2-core CPU.
GAUSS_LEGENDRE_BYTES_PER_STEP_SQUARED = 24
GAUSS_LEGENDRE_MAX_STEPS = 4096
# step tables this small always fit (Gauss-Legendre's n^2 workspace: 24 MiB at 1024 steps)
SMALL_STEPS = 1024
SMALL_BYTES = 64 << 20
# a path's tables may take at most this share of the memory available when it starts (the model needs the rest)
STEP_MEMORY_SHARE = 0.5


def available_memory() -> int | None:
    """Bytes this process can still allocate: the system's available memory and the room left under the address-
    space limit (RLIMIT_AS), whichever is smaller; None where neither can be read."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        limits.append(int(fields["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm") as f:
                mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            limits.append(max(soft - mapped, 0))
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None


def max_steps(rule: str | None = None, examples: int = 1, budget: int | None = None) -> int | None:
    """The most steps a path with ``rule``'s tables (None: a path without a quadrature rule) and ``examples``
    examples may have: their memory within ``budget`` bytes (default: :data:`STEP_MEMORY_SHARE` of
    :func:`available_memory`), and at most :data:`GAUSS_LEGENDRE_MAX_STEPS` Gauss-Legendre nodes. None when the
    memory available is unknown and the rule sets no limit of its own."""
    if budget is None:
        available = available_memory()
        budget = None if available is None else int(available * STEP_MEMORY_SHARE)
    fits = None if budget is None else budget // (BYTES_PER_STEP + BYTES_PER_STEP_AND_EXAMPLE * max(examples, 1))
    if rule == "gausslegendre":
        nodes = GAUSS_LEGENDRE_MAX_STEPS
        if budget is not None:
            nodes = min(nodes, int(math.isqrt(budget // GAUSS_LEGENDRE_BYTES_PER_STEP_SQUARED)))
        fits = nodes if fits is None else min(fits, nodes)
    return fits


def check_steps_fit(rule: str | None, n_steps: int, examples: int = 1, budget: int | None = None) -> None:
    """Refuse, in one line that says what fits, a number of steps whose tables cannot be built here."""
    small = n_steps <= SMALL_STEPS and n_steps * (BYTES_PER_STEP + BYTES_PER_STEP_AND_EXAMPLE * examples) <= SMALL_BYTES
    if budget is None and small:  # tables of a few MiB at most: not worth reading the memory available
        return
    fits = max_steps(rule, examples, budget)
    if fits is None or n_steps <= fits:
        return
    asked = f"n_steps={n_steps:,}" + (f" with {rule}" if rule else "")
    if rule == "gausslegendre" and fits == GAUSS_LEGENDRE_MAX_STEPS:
        raise InputError(f"{asked}: at most {fits:,} steps are allowed (Captum's nodes, numpy's leggauss, take "
                         f"O(n^3) time and {GAUSS_LEGENDRE_BYTES_PER_STEP_SQUARED} n^2 bytes); use a riemann rule "
                         "for more")
    need = (BYTES_PER_STEP + BYTES_PER_STEP_AND_EXAMPLE * max(examples, 1)) * n_steps
    if rule == "gausslegendre":
        need += GAUSS_LEGENDRE_BYTES_PER_STEP_SQUARED * n_steps**2
    if budget is None:
        limit = f"more than {STEP_MEMORY_SHARE:.0%} of the {format_bytes(available_memory() or 0)} available"
    else:
        limit = f"more than the {format_bytes(budget)} allowed"
    raise InputError(f"{asked} does not fit in memory: at most {fits:,} steps fit (the step tables need about "
                     f"{format_bytes(need)}, {limit})")


def format_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB", "EB"):
        if n < 1000 or unit == "EB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} EB"
