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
