"""Quadrature rules for path integrals: Captum's five, bit-compatible with captum 0.8/0.9.

``alphas`` are the positions on [0, 1] where the integrand is evaluated, ``weights`` the step sizes they are
multiplied by. The Riemann rules take their alphas from a float32 ``torch.linspace`` (as Captum does, so the
points are exactly Captum's) and their weights are 1/n (halved at both ends for the trapezoid rule, whose weights
therefore sum to 1 - 1/n, as in Captum). Gauss-Legendre uses numpy's float64 nodes and weights.
Captum rounds the weights to float32 before multiplying; :func:`rule` does the same.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

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


def check_rule(method: str, n_steps: int) -> None:
    if method not in RULES:
        raise ValueError(f"unknown integration method {method!r}; choose one of {', '.join(RULES)}")
    minimum = 1 if method == "gausslegendre" else 2
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < minimum:
        raise ValueError(f"n_steps must be an integer >= {minimum} for {method}, got {n_steps!r}")


def alphas(method: str, n_steps: int) -> list[float]:
    check_rule(method, n_steps)
    n = n_steps
    if method == "gausslegendre":
        return list(0.5 * (1 + np.polynomial.legendre.leggauss(n)[0]))
    start, end = {
        "riemann_trapezoid": (0, 1),
        "riemann_left": (0, 1 - 1 / n),
        "riemann_middle": (1 / (2 * n), 1 - 1 / (2 * n)),
        "riemann_right": (1 / n, 1),
    }[method]
    return torch.linspace(start, end, n).tolist()


def step_sizes(method: str, n_steps: int) -> list[float]:
    check_rule(method, n_steps)
    n = n_steps
    if method == "gausslegendre":
        return list(0.5 * np.polynomial.legendre.leggauss(n)[1])
    deltas = [1 / n] * n
    if method == "riemann_trapezoid":
        deltas[0] /= 2
        deltas[-1] /= 2
    return deltas


def rule(method: str, n_steps: int) -> Rule:
    """Alphas and float32 weights of ``method`` with ``n_steps`` points."""
    return Rule(alphas(method, n_steps), torch.tensor(step_sizes(method, n_steps)).float())


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
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 2:
        raise ValueError(f"max_steps must be an integer >= 2 (the error estimate needs two gradients), got {max_steps!r}")
    return float(tolerance), max_steps


def _is_pair(value) -> bool:
    """An ``(alphas, weights)`` pair (a :class:`Rule` is one), not a tuple of two alphas."""
    return isinstance(value, tuple) and len(value) == 2 and all(
        isinstance(v, (list, tuple, np.ndarray)) or (isinstance(v, torch.Tensor) and v.dim() == 1) for v in value)
