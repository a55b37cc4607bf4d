"""Adaptive quadrature for path methods (``n_steps="auto"``) and fitted non-uniform schedules.

A path method integrates a vector field along a path ``gamma(alpha)``, alpha in [0, 1]: Integrated Gradients
``int grad f(gamma) * gamma' dalpha`` (with ``gamma' = input - baseline``), Blur IG the same along the blur path,
IDGI ``int grad f * grad f / ||grad f||^2 df``. For ReLU networks ``f`` is piecewise linear along any line, so the
integrand is a step function with many small jumps (every unit that switches on the way adds one): the error of
any n-point rule falls as 1/n, set by the jumps and their positions, and no rule of higher order helps. What
does help is putting the points where the jumps are, and knowing when to stop (how much placement can gain at
most, measured in ``benchmarks/test_bench_adaptive.py``: 1.04-1.07x over the uniform rule on random resnets, 1.66x
on a trained CNN whose jumps crowd near the baseline). Per example:

1. **Evaluate** gradients at the planned points, first at both ends (alpha 0 and 1, moved :data:`END_INSET`
   inside: every gap then has evidence at both its ends, and f there, which the completeness check needs,
   comes with them); the requests of all examples are packed into full engine batches. A forward pass gives f at every
   point a gradient is taken; with ``probes > 0`` f is also probed, forward only (each pass costing
   :data:`FORWARD_COST` of a forward+backward pass), at that many interior points, where it checks the rule
   inside the gaps it falls in (a gap whose two ends agree can still hide a rise and a fall of f).
2. **Estimate the error**, at no extra cost, from what the passes gave: with the nearest-node rule
   (:func:`~fastig.core.quadrature.nearest_node_weights`) a jump inside the gap between two points costs at
   most half the jump times the gap, and for jumps at unknown places the expected error of a gap is
   ``||V_{k+1} - V_k|| * gap / sqrt(12)`` (``V`` the integrand vector at the points: the difference of the two
   one-sided rules on the gap, scaled). Summed in quadrature over gaps and divided by ``||attribution||`` this
   is the *map error* estimate, which the benchmarks check against thousand-step references. Because f is known
   at every point a gradient was taken (its forward pass gives it) the *completeness gap* is measured too, per
   gap and in total: ``|sum(attr) - (f(1) - f(0))|`` relative to the total variation of f along the path. A nested check calibrates the estimate: the last round's points are a subset of the
   current ones, so the change of the map since then is about the last round's error; where it exceeds what
   was estimated then, the current estimate is scaled up by the same factor. No estimate from fewer than
   :data:`MIN_STEPS` points is trusted, unless it is at rounding level (f linear along the path).
3. **Refine**: split the gaps whose error (the larger of the two, each relative to its own scale) is largest,
   into as many parts as minimise the number of new points that bring the predicted error under the tolerance
   (the points of one gap then share its error equally), at most doubling the points per round and never past
   ``max_steps``. Repeat from 1 until both the map error and the completeness gap meet the tolerance.

Examples finish after different numbers of rounds; the requests of the examples still running are packed
together into full batches. Everything is deterministic for the same inputs (no random draws).

A completeness gap can be closed without bringing the map any closer to the integral (IDGI closes it by
construction; moving the nearest-node boundaries so that every gap is complete was tried and made the maps of a
trained CNN worse), so it is a second criterion here, never the only one.
"""

from __future__ import annotations

import bisect
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from fastig import _ops
from fastig.core import quadrature
from fastig.core.engine import Engine
from fastig.core.inputs import format_baselines, format_inputs
from fastig.core.targets import Target, format_additional_args
from fastig.errors import InputError, check_int

# A forward-only pass costs this much of a forward+backward pass (input gradient only). Measured on this project's
# 2-core CPU machine with torch 2.13: resnet18 0.45, resnet50 0.44, vgg16 0.48 (224x224, batches of 4-8), a small
# digits CNN 0.58 (batch 64, overhead-bound). The benchmarks measure it again and use their own figure.
FORWARD_COST = 0.45

# fewest gradients whose error estimate is trusted (unless it is exactly zero: a path on which f is linear): on
# fewer points a gap can hold a whole rise and fall of the integrand that its two ends do not see
MIN_STEPS = 8
GROWTH = 1.0  # at most this fraction of the points already taken is added per round (1.0: at most doubling)
# node vectors kept per example (all of them: inserting a point changes its neighbours' weights); examples are
# refined in groups that keep at most this many bytes of node vectors at ``max_steps``
NODE_MEMORY_BYTES = 1 << 30
INTERIOR_SPREAD = 1 / math.sqrt(12)  # RMS of (jump position - gap midpoint) / gap, for a uniform position
ONE_SIDED_SPREAD = 1 / math.sqrt(3)  # RMS of (jump position - left end) / gap: a rule taking one end (IDGI)
UNKNOWN = 1e30  # an error that cannot be estimated yet
# the end points are taken this far inside [0, 1]: the baseline is often a point where every ReLU sits exactly at
# its kink (a zero input through a network without biases), where autograd returns relu's derivative 0 at 0, a
# gradient that holds on no interval. f moves by about END_INSET * f' there, far below any tolerance.
END_INSET = 1e-5


class Curve(Protocol):
    """A path with points at any alpha for any example, as the adaptive driver needs it.

    ``points(rows, alphas)``: the points of examples ``rows`` [k] at ``alphas`` [k] (float64), a tuple of [k, ...]
    tensors (one per input). ``tangents(rows, alphas)``: what the gradient there is multiplied by to give the
    integrand (d gamma / d alpha, signed so that the attributions explain ``sign * (f(1) - f(0))``), or None for
    the gradient itself. ``sign``: +1 when the attributions sum to f(alpha=1) - f(alpha=0), -1 when they sum to
    f(0) - f(1) (Blur IG runs from the input at 0 to the blurred input at 1), None when the integrand has no
    completeness relation (IG with ``multiply_by_inputs=False``). ``complete``: whether the integral of the
    integrand is exactly ``sign * (f(1) - f(0))``, so that the completeness gap can be a stopping criterion (not
    for Blur IG, whose path derivative is PAIR's forward difference: its integral misses f's change by the
    difference quotient's error, which no number of steps removes).
    """

    n: int
    sign: float | None
    complete: bool

    def points(self, rows: torch.Tensor, alphas: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def tangents(self, rows: torch.Tensor, alphas: torch.Tensor) -> tuple[torch.Tensor, ...] | None: ...


class StraightCurve:
    """IG's straight line ``baseline + alpha * (input - baseline)``, whose tangent is ``input - baseline``
    (``multiply=False``: no tangent, the integrand is the gradient; Captum's ``multiply_by_inputs=False``)."""

    def __init__(self, inputs: tuple[torch.Tensor, ...], baselines: tuple[torch.Tensor, ...], multiply: bool = True):
        self.inputs, self.baselines, self.multiply = inputs, baselines, multiply
        self.n = inputs[0].shape[0]
        self.sign = 1.0 if multiply else None
        self.complete = multiply

    def _baseline(self, b: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return b.expand((len(rows),) + tuple(b.shape[1:])) if b.shape[0] == 1 else b[rows]

    def points(self, rows, alphas):
        out = []
        for x, b in zip(self.inputs, self.baselines):
            compute = _ops.accumulation_dtype(x.dtype)  # as _ops.path_points: fp32 (fp64) arithmetic
            xr, br = x[rows].to(compute), self._baseline(b, rows).to(compute)
            a = alphas.to(device=x.device, dtype=compute).reshape((-1,) + (1,) * (x.dim() - 1))
            out.append((br + a * (xr - br)).to(x.dtype))
        return tuple(out)

    def tangents(self, rows, alphas):
        if not self.multiply:
            return None
        return tuple(x[rows] - self._baseline(b, rows) for x, b in zip(self.inputs, self.baselines))


class BlurCurve:
    """Blur IG's path over alpha in [0, 1]: the input blurred with ``sigma = alpha * max_sigma`` over H and W, and
    PAIR's path derivative ``-max_sigma * (blur(x, sigma + grad_step) - blur(x, sigma)) / grad_step`` (negated so
    that the attributions explain f(input) - f(most blurred), as Blur IG's)."""

    sign = -1.0
    complete = False

    def __init__(self, inputs: tuple[torch.Tensor, ...], max_sigma: float, grad_step: float):
        from fastig.core.paths import gaussian_blur

        self._blur = gaussian_blur
        self.inputs, self.max_sigma, self.grad_step = inputs, float(max_sigma), float(grad_step)
        self.n = inputs[0].shape[0]

    def points(self, rows, alphas):
        sigmas = (alphas * self.max_sigma).tolist()
        return tuple(torch.cat([self._blur(x[r : r + 1], s) for r, s in zip(rows.tolist(), sigmas)]) for x in self.inputs)

    def tangents(self, rows, alphas):
        out = []
        for x in self.inputs:
            per_point = []
            for r, a in zip(rows.tolist(), alphas.tolist()):
                x64, sigma = x[r : r + 1].to(torch.float64), a * self.max_sigma
                slope = (self._blur(x64, sigma + self.grad_step) - self._blur(x64, sigma)) / self.grad_step
                per_point.append((-self.max_sigma * slope).to(x.dtype))
            out.append(torch.cat(per_point))
        return tuple(out)


@dataclass
class AdaptiveInfo:
    """What ``n_steps="auto"`` did, per example (tensors [n]; lists with one entry per example).

    ``passes``: forward+backward passes (gradients); ``forward_passes``: forward-only passes (the interior
    probes of ``probes=``; none by default: f at every point comes with its gradient's forward pass); ``cost``:
    ``passes + forward_cost * forward_passes``, in forward+backward passes.
    ``error``: the error estimate reached, the larger of ``map_error`` (estimated relative L2 distance of the
    attributions to the integral) and ``completeness`` (``|sum(attr) - f difference|`` over the total variation
    of f along the path; 0 where the method has no exact completeness relation: IG with
    ``multiply_by_inputs=False``, Blur IG; see :class:`Curve`). ``converged``: error <= tolerance
    (False: ``max_steps`` was spent first). ``alphas``/``weights``: the points used (increasing, on [0, 1]) and
    their weights (IDGI: the f difference each point's direction is multiplied by).
    """

    tolerance: float
    max_steps: int
    forward_cost: float
    passes: torch.Tensor
    forward_passes: torch.Tensor
    map_error: torch.Tensor
    completeness: torch.Tensor
    alphas: list[torch.Tensor] = field(repr=False)
    weights: list[torch.Tensor] = field(repr=False)

    @property
    def cost(self) -> torch.Tensor:
        return self.passes.double() + self.forward_cost * self.forward_passes.double()

    @property
    def error(self) -> torch.Tensor:
        return torch.maximum(self.map_error, self.completeness)

    @property
    def converged(self) -> torch.Tensor:
        return self.error <= self.tolerance

    def summary(self) -> str:
        n = len(self.passes)
        done = int(self.converged.sum())
        return (f"n_steps='auto' (tolerance {self.tolerance:g}, max_steps {self.max_steps}): {done}/{n} examples "
                f"met the tolerance; gradients per example {int(self.passes.min())}..{int(self.passes.max())} "
                f"(median {float(self.passes.double().median()):g}), cost median {float(self.cost.median()):.1f} "
                f"forward+backward passes, error estimate max {float(self.error.max()):.2g}")


class ToleranceNotReached(UserWarning):
    """``n_steps="auto"`` spent ``max_steps`` on some examples before their error estimate met the tolerance."""


# --- the driver ----------------------------------------------------------------------------------------------


def integrate_adaptive(
    engine: Engine,
    curve: Curve,
    target: Target,
    args: tuple,
    tolerance: float,
    max_steps: int,
    *,
    idgi: bool = False,
    probes: int = 0,
    forward_cost: float = FORWARD_COST,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor, AdaptiveInfo]:
    """Attributions along ``curve`` to within ``tolerance`` (see the module docstring), per example.

    Returns the attributions (a tuple shaped like the curve's inputs, in the accumulation dtype), f at the first
    and the last point ([n] each; :data:`END_INSET` inside 0 and 1: not exactly f at the ends, which the
    convergence delta needs) and the :class:`AdaptiveInfo`. With ``idgi=True`` the attributions are IDGI's over the chosen points (each point's
    ``g * g / ||g||^2`` times the f difference to the next point), summing to ``sign * (f(1) - f(0))`` up to
    points whose gradient is zero. ``probes``: forward-only passes at that many equally spaced interior alphas,
    whose f values check the rule inside the gaps they fall in. Warns with :class:`ToleranceNotReached` when
    ``max_steps`` is spent before the tolerance is met.
    """
    tolerance, max_steps = quadrature.check_auto_steps(tolerance, max_steps)
    check_int("probes", probes, 0)
    n = curve.n
    sample = curve.points(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.float64))
    shapes = [tuple(p.shape[1:]) for p in sample]
    dtype = _ops.accumulation_dtype(sample[0].dtype)
    width = sum(math.prod(s) for s in shapes)
    check_points_fit(max_steps, width * torch.finfo(dtype).bits // 8)
    probe_alphas = [(j + 1) / (probes + 1) for j in range(probes)]
    probe_f = torch.stack([_forward(engine, curve, target, args, a).to(torch.float64).cpu() for a in probe_alphas], 1) \
        if probes else torch.zeros((n, 0), dtype=torch.float64)
    group = max(1, min(n, NODE_MEMORY_BYTES // max(1, max_steps * width * torch.finfo(dtype).bits // 8)))
    # an error this small is rounding (a deep float32 network's gradients at two points of a line on which f is
    # linear differ by about 1e-6): the path is linear
    exact = 1000 * torch.finfo(dtype).eps
    states = [_Example(e, curve.sign, curve.complete or idgi, idgi, probe_alphas, probe_f[e].tolist(), exact)
              for e in range(n)]
    totals = torch.zeros((n, width), dtype=dtype, device=sample[0].device)
    for g0 in range(0, n, group):
        running = states[g0 : g0 + group]
        # both ends first: every gap then has evidence at its ends
        requests = {s.row: [END_INSET, 1.0 - END_INSET] for s in running}
        while requests:
            rows = torch.tensor([r for r, alphas in requests.items() for _ in alphas], dtype=torch.long)
            alphas = torch.tensor([a for r in requests for a in requests[r]], dtype=torch.float64)
            f, slopes, vectors = _gradients(engine, curve, target, args, rows, alphas, idgi, dtype)
            for k, (r, a) in enumerate(zip(rows.tolist(), alphas.tolist())):
                states[r].insert(a, float(f[k]), float(slopes[k]), vectors[k])
            requests = {}
            for s in running:
                if not s.done:
                    s.estimate()
                    new = s.plan(tolerance, max_steps)
                    if new:
                        requests[s.row] = new
                    else:
                        s.done = True
        for s in running:
            totals[s.row] = s.attribution()
            s.vectors = []  # free the group's node vectors before the next group starts
    info = AdaptiveInfo(
        tolerance=tolerance,
        max_steps=max_steps,
        forward_cost=forward_cost,
        passes=torch.tensor([len(s.alphas) for s in states]),
        forward_passes=torch.full((n,), probes),
        map_error=torch.tensor([s.map_error for s in states], dtype=torch.float64),
        completeness=torch.tensor([s.completeness for s in states], dtype=torch.float64),
        alphas=[torch.tensor(s.alphas, dtype=torch.float64) for s in states],
        weights=[s.final_weights for s in states],
    )
    missed = (~info.converged).nonzero().flatten().tolist()
    if missed:
        shown = ", ".join(f"{e} ({float(info.error[e]):.2g})" for e in missed[:8]) + (", ..." if len(missed) > 8 else "")
        warnings.warn(f"n_steps='auto': {len(missed)} of {n} examples did not reach tolerance {tolerance:g} within "
                      f"max_steps={max_steps}; their error estimates: {shown}", ToleranceNotReached, stacklevel=3)
    attributions = tuple(part.reshape((n,) + s) for part, s in zip(totals.split([math.prod(s) for s in shapes], 1), shapes))
    ends = torch.tensor([[s.f[0], s.f[-1]] for s in states], dtype=dtype, device=sample[0].device)
    return attributions, ends[:, 0], ends[:, 1], info


def check_points_fit(max_steps: int, bytes_per_point: int, budget: int | None = None) -> None:
    """Refuse, before any pass, a ``max_steps`` whose node vectors cannot be held: an example keeps the integrand
    vector of every point it takes (``bytes_per_point`` each) until it is done, so one example at ``max_steps``
    must fit in ``budget`` bytes (default: :data:`quadrature.STEP_MEMORY_SHARE` of the memory available)."""
    if budget is None:
        available = quadrature.available_memory()
        if available is None:
            return
        budget = int(quadrature.STEP_MEMORY_SHARE * available)
    if max_steps * bytes_per_point <= budget:
        return
    fits = budget // bytes_per_point
    raise InputError(f"max_steps={max_steps:,} does not fit in memory: n_steps='auto' keeps every point's gradient "
                     f"({quadrature.format_bytes(bytes_per_point)} each) until an example is done, and at most "
                     f"{fits:,} of them fit in {quadrature.format_bytes(budget)}; pass a smaller max_steps")


class _Example:
    """One example's points (always including both ends), f values, slopes and integrand vectors; its error
    estimate and its refinement plan."""

    def __init__(self, row: int, sign: float | None, complete: bool, idgi: bool, probe_alphas, probe_f, exact: float):
        self.row, self.sign, self.complete, self.idgi, self.exact = row, sign, complete, idgi, exact
        self.probe_alphas, self.probe_f = list(probe_alphas), list(probe_f)  # f known without a gradient
        self.alphas: list[float] = []
        self.f: list[float] = []
        self.slopes: list[float] = []  # the scalar integrand: sum of the features of grad * tangent = sign * df/dalpha
        self.vectors: list[torch.Tensor] = []
        self.done = False
        self.map_error = math.inf
        self.completeness = math.inf
        self.final_weights = torch.empty(0, dtype=torch.float64)
        self._gaps: list[float] = []  # relative error of each gap between neighbouring points
        self._previous: tuple[torch.Tensor, float] | None = None  # last round's attribution and raw estimate
        self.calibration = 1.0

    def insert(self, alpha: float, f: float, slope: float, vector: torch.Tensor) -> None:
        k = bisect.bisect_left(self.alphas, alpha)
        self.alphas.insert(k, alpha)
        self.f.insert(k, f)
        self.slopes.insert(k, slope)
        self.vectors.insert(k, vector)

    # -- the rule and its error ---------------------------------------------------------------------------

    def end_values(self) -> tuple[float, float]:
        """f at alpha 0 and 1, extrapolated from the end points (END_INSET inside) along their slopes."""
        t, f, h, sign = self.alphas, self.f, self.slopes, self.sign or 1.0
        return f[0] - t[0] * h[0] / sign, f[-1] + (1 - t[-1]) * h[-1] / sign

    def weights(self) -> torch.Tensor:
        """Nearest-node weights; IDGI: the f difference to the next point (the first point also covers [0, t_0],
        the last one [t_last, 1])."""
        if not self.idgi:
            return quadrature.nearest_node_weights(self.alphas)
        f0, f1 = self.end_values()
        ends = [f0] + self.f[1:] + [f1]
        sign = self.sign or 1.0
        return torch.tensor([sign * (ends[k + 1] - ends[k]) for k in range(len(self.f))], dtype=torch.float64)

    def attribution(self) -> torch.Tensor:
        self.final_weights = self.weights()
        stacked = torch.stack(self.vectors)
        return (self.final_weights.to(stacked.dtype).reshape(-1, 1) * stacked).sum(0)

    def estimate(self) -> None:
        """The map error and completeness gap of the current points, and the relative error of every gap."""
        t, f, h, n = self.alphas, self.f, self.slopes, len(self.alphas)
        stacked = torch.stack(self.vectors)
        total = (self.weights().to(stacked.dtype).reshape(-1, 1) * stacked).sum(0)
        norm = float(total.norm())
        jumps = (stacked[1:] - stacked[:-1]).norm(dim=1).double().tolist()
        gaps = [t[k + 1] - t[k] for k in range(n - 1)]
        if self.idgi:  # IDGI takes each segment's left direction: jumps weigh with the segment's f variation
            variation = [max(abs(f[k + 1] - f[k]), (abs(h[k]) + abs(h[k + 1])) / 2 * gaps[k]) for k in range(n - 1)]
            errors = [ONE_SIDED_SPREAD * jumps[k] * variation[k] for k in range(n - 1)]
        else:
            errors = [INTERIOR_SPREAD * jumps[k] * gaps[k] for k in range(n - 1)]
        raw = math.sqrt(sum(e * e for e in errors)) / norm if norm > 0 else (0.0 if max(errors) == 0 else UNKNOWN)
        raw = min(raw, UNKNOWN)
        # the nested check: the last round's points are a subset of these, so the change of the attribution since
        # then is about the last round's error; where that exceeds what was estimated then (gaps that hid a rise
        # and a fall), the estimate is scaled up by the same factor now. Until there is a last round, only an
        # error at rounding level (a path on which f is linear) is trusted.
        if self._previous is not None:
            before, estimated = self._previous
            change = float((total - before).norm()) / norm if norm > 0 else 0.0
            self.calibration = max(1.0, change / estimated) if estimated > 0 else (1.0 if change <= self.exact else UNKNOWN)
        elif raw > self.exact:
            self.calibration = UNKNOWN
        self._previous = (total, raw)
        self.map_error = min(raw * self.calibration, UNKNOWN)
        scale_up = 1.0 if self.calibration >= UNKNOWN else self.calibration
        relative = [scale_up * e / norm if norm > 0 else (0.0 if e == 0 else UNKNOWN) for e in errors]
        self.completeness = 0.0
        if self.complete:
            f0, f1 = self.end_values()
            known = sorted(zip([0.0] + t + self.probe_alphas + [1.0], [f0] + f + self.probe_f + [f1]))
            scale = sum(abs(b[1] - a[1]) for a, b in zip(known, known[1:]))  # f's variation along the path
            gap = abs(float(total.sum()) - self.sign * (f1 - f0))
            self.completeness = gap / scale if scale > 0 else (0.0 if gap == 0 else UNKNOWN)
            if not self.idgi and scale > 0:  # per gap: the rule's share against f's change (also at any probe)
                relative = [max(r, self._gap_completeness(k) / scale) for k, r in enumerate(relative)]
        self._gaps = relative

    def _gap_completeness(self, k: int) -> float:
        """Largest |rule's integral of the slope - sign * f change| from point k to any f-known alpha up to k+1."""
        a, b = self.alphas[k], self.alphas[k + 1]
        middle = (a + b) / 2
        checks = [(b, self.f[k + 1])] + [(p, fp) for p, fp in zip(self.probe_alphas, self.probe_f) if a < p < b]
        worst = 0.0
        for alpha, f_there in checks:
            share = self.slopes[k] * (min(alpha, middle) - a) + self.slopes[k + 1] * max(alpha - middle, 0.0)
            worst = max(worst, abs(share - self.sign * (f_there - self.f[k])))
        return worst

    def plan(self, tolerance: float, max_steps: int) -> list[float]:
        """New points: none once the error meets the tolerance or ``max_steps`` is reached; otherwise each gap is
        cut into the number of equal parts that (predicting a part's error as its gap's divided by the number of
        parts) brings the total under the tolerance with the fewest points, taking the largest gains first and at
        most ``GROWTH`` times the points already there."""
        n = len(self.alphas)
        error = max(self.map_error, self.completeness)
        if n >= max_steps or (error <= tolerance and (n >= MIN_STEPS or error <= self.exact)):
            return []
        budget = min(max_steps - n, max(1, math.ceil(GROWTH * n)))
        parts = [1] * len(self._gaps)
        predicted = sum(e * e for e in self._gaps)
        target = tolerance * tolerance
        added = 0
        # gains of the next cut of each gap: e^2 (1/p^2 - 1/(p+1)^2); a max-heap would do, the lists are short
        while added < budget and (predicted > target or added == 0 or n + added < MIN_STEPS):
            k = max(range(len(parts)), key=lambda j: self._gaps[j] ** 2 * (1 / parts[j] ** 2 - 1 / (parts[j] + 1) ** 2))
            gain = self._gaps[k] ** 2 * (1 / parts[k] ** 2 - 1 / (parts[k] + 1) ** 2)
            if gain <= 0 and added > 0 and n + added >= MIN_STEPS:
                break
            parts[k] += 1
            predicted -= gain
            added += 1
        new = []
        for k, p in enumerate(parts):
            lo, hi = self.alphas[k], self.alphas[k + 1]
            new += [lo + (hi - lo) * j / p for j in range(1, p)]
        return [a for a in new if a not in self.alphas]


# --- model passes --------------------------------------------------------------------------------------------


class _Requests:
    """Requested points (one per "example" of the engine: row ``rows[i]`` at ``alphas[i]``), so that the engine
    packs the requests of all examples into full batches with its usual sizing and out-of-memory back-off."""

    n_steps = 1

    def __init__(self, curve: Curve, rows: torch.Tensor, alphas: torch.Tensor):
        self.curve, self.rows, self.alphas = curve, rows, alphas

    def points(self, steps: slice, examples: slice) -> tuple[torch.Tensor, ...]:
        return self.curve.points(self.rows[examples], self.alphas[examples])


def rows_target(target: Target, rows: torch.Tensor) -> Target:
    """The target of the examples ``rows`` (any order, repeats allowed)."""
    part = Target(None, len(rows))
    part.common = target.common
    if target.per_example is not None:
        part.per_example = target.per_example[rows]
    elif target.tuples is not None:
        part.tuples = [target.tuples[r] for r in rows.tolist()]
    return part


def rows_args(args: tuple, n: int, rows: torch.Tensor) -> tuple:
    """Per-example tensor arguments (first dimension ``n``) taken at ``rows``; anything else unchanged."""
    return tuple(a[rows.to(a.device)] if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n else a
                 for a in args)


def _forward(engine: Engine, curve: Curve, target: Target, args: tuple, alpha: float) -> torch.Tensor:
    """f of every example at one alpha (forward passes only), [n] on the model's device."""
    rows = torch.arange(curve.n)
    points = curve.points(rows, torch.full((curve.n,), alpha, dtype=torch.float64))
    return engine.outputs(points, target, args).detach()


def _evaluated(engine, curve, target, args, rows, alphas, idgi, dtype):
    """Per engine batch: (its slice of the requests, f there [m], the slope ``sum(grad * tangent)`` [m] (float64 on
    the CPU), the integrand vectors [m, D] with all inputs flattened and joined): ``grad * tangent`` (the gradient
    alone without a tangent), or IDGI's ``grad * grad / ||grad||^2``)."""
    path = _Requests(curve, rows, alphas)
    for batch in engine.batches(path, rows_target(target, rows), rows_args(args, target.n, rows)):
        e = batch.examples
        grads = [g[0].to(dtype).flatten(1) for g in batch.grads]
        tangents = curve.tangents(rows[e], alphas[e])
        products = grads if tangents is None else [g * t.to(device=g.device, dtype=dtype).flatten(1)
                                                   for g, t in zip(grads, tangents)]
        slopes = sum(p.sum(1) for p in products).to(torch.float64).cpu()
        if idgi:
            flat = torch.cat(grads, 1)
            norms = (flat * flat).sum(1, keepdim=True)
            vec = torch.where(norms > 0, flat * flat / torch.where(norms > 0, norms, torch.ones_like(norms)), 0.0)
        else:
            vec = torch.cat(products, 1)
        yield e, batch.outputs[0].detach().to(torch.float64).cpu(), slopes, vec


def _gradients(engine, curve, target, args, rows, alphas, idgi, dtype):
    """f [k], slopes [k] and the integrand vectors [k, D] at the requested points (see :func:`_evaluated`)."""
    f, slopes = torch.empty(len(rows), dtype=torch.float64), torch.empty(len(rows), dtype=torch.float64)
    vectors: torch.Tensor | None = None
    for e, f_part, slope_part, vec in _evaluated(engine, curve, target, args, rows, alphas, idgi, dtype):
        if vectors is None:
            vectors = torch.empty((len(rows), vec.shape[1]), dtype=dtype, device=vec.device)
        vectors[e], f[e], slopes[e] = vec, f_part, slope_part
    return f, slopes, vectors


def integrate_schedule(engine: Engine, curve: Curve, target: Target, args: tuple, rule: quadrature.Rule
                       ) -> tuple[torch.Tensor, ...]:
    """``sum_k weights[k] * integrand(alphas[k])`` per example along ``curve`` for a fixed rule (the same points for
    every example), accumulated batch by batch (no more than one batch of integrand vectors is held)."""
    n, k = curve.n, len(rule.alphas)
    rows = torch.arange(n).repeat(k)  # step-major, as the engine's own batches
    alphas = torch.tensor(rule.alphas, dtype=torch.float64).repeat_interleave(n)
    weights = torch.as_tensor(rule.weights, dtype=torch.float64).repeat_interleave(n)
    sample = curve.points(rows[:1], alphas[:1])
    shapes = [tuple(p.shape[1:]) for p in sample]
    dtype = _ops.accumulation_dtype(sample[0].dtype)
    totals = torch.zeros((n, sum(math.prod(s) for s in shapes)), dtype=dtype, device=sample[0].device)
    for e, _, _, vec in _evaluated(engine, curve, target, args, rows, alphas, False, dtype):
        totals.index_add_(0, rows[e].to(vec.device), vec * weights[e].to(device=vec.device, dtype=dtype).reshape(-1, 1))
    return tuple(part.reshape((n,) + s) for part, s in zip(totals.split([math.prod(s) for s in shapes], 1), shapes))


# --- fitted schedules (RiemannOpt-style) ---------------------------------------------------------------------


def fit_schedule(
    forward_func: Callable,
    inputs: torch.Tensor,
    n_steps: int | Sequence[int],
    *,
    baselines=None,
    target=None,
    additional_forward_args=None,
    method: str = "ig",
    fit_steps: int = 128,
    max_sigma: float = 50.0,
    grad_step: float = 0.01,
    internal_batch_size: int | None = None,
) -> quadrature.Rule | list[quadrature.Rule]:
    """A fixed non-uniform schedule of ``n_steps`` points, fitted on a few ``inputs`` and meant for the rest
    (``attribute(..., alphas=fit_schedule(...))``), in the spirit of RiemannOpt (Swain & Singhi 2024): sample the
    integrand on a fine uniform grid, find where the error of a rule comes from, and place the points to minimise
    the modelled error of the median image.

    Here the error model is the one ``n_steps="auto"`` uses: on a ReLU network the integrand jumps, a gap of
    width h holding jump energy j h costs about ``j h^3 / 12``, so for n points the error is smallest with a point
    density proportional to ``j^(1/3)``. The energy density ``j`` is measured from the ``fit_steps`` midpoint
    gradients of each input (normalised so that every input weighs the same), its median over the inputs taken
    per cell and lightly smoothed; the points are the midpoints of ``n_steps`` equal parts of the cumulative
    density and their weights the nearest-node weights. ``method``: ``"ig"`` (straight line from ``baselines``)
    or ``"blur_ig"`` (alpha = sigma / max_sigma). Costs ``fit_steps`` gradients per input, once; a list of step
    counts gives one rule per count from the same gradients.
    """
    if method not in ("ig", "blur_ig"):
        raise ValueError(f"fit_schedule fits 'ig' or 'blur_ig' paths, got method={method!r}")
    counts = [n_steps] if isinstance(n_steps, int) and not isinstance(n_steps, bool) else list(n_steps)
    for name, value, low in [("n_steps", c, 1) for c in counts] + [("fit_steps", fit_steps, 4)]:
        check_int(name, value, low)
    xs, _ = format_inputs(inputs)
    curve = (StraightCurve(xs, format_baselines(baselines, xs)) if method == "ig"
             else BlurCurve(xs, max_sigma, grad_step))
    engine = Engine(forward_func, internal_batch_size)
    tgt = Target(target, curve.n)
    args = format_additional_args(additional_forward_args)
    grid = (torch.arange(fit_steps, dtype=torch.float64) + 0.5) / fit_steps
    dtype = _ops.accumulation_dtype(xs[0].dtype)
    energies = []
    for e in range(curve.n):
        rows = torch.full((fit_steps,), e, dtype=torch.long)
        _, _, vectors = _gradients(engine, curve, tgt, args, rows, grid, False, dtype)
        jumps = (vectors[1:] - vectors[:-1]).norm(dim=1).double() ** 2  # jump energy per grid gap [fit_steps - 1]
        energies.append(jumps / max(float(jumps.sum()), 1e-300))
    density = torch.stack(energies).median(0).values  # per interior grid gap
    density = torch.nn.functional.avg_pool1d(density.reshape(1, 1, -1), 5, 1, 2, count_include_pad=False).flatten()
    density = density + 1e-3 * float(density.mean())  # no part of the path is left without points
    cells = torch.cat([density[:1], density, density[-1:]]) ** (1 / 3)  # [0, g_0], the grid gaps, [g_last, 1]
    edges = torch.cat([torch.zeros(1, dtype=torch.float64), grid, torch.ones(1, dtype=torch.float64)])
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(cells * (edges[1:] - edges[:-1]), 0)])
    rules = []
    for count in counts:
        quantiles = (torch.arange(count, dtype=torch.float64) + 0.5) / count * cumulative[-1]
        rules.append(quadrature.custom_rule(_interpolate(quantiles, cumulative, edges).tolist()))
    return rules[0] if isinstance(n_steps, int) else rules


def _interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """numpy.interp for increasing ``xp``."""
    k = torch.searchsorted(xp, x, right=True).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp[k - 1], xp[k], fp[k - 1], fp[k]
    return y0 + (y1 - y0) * (x - x0) / torch.where(x1 > x0, x1 - x0, torch.ones_like(x1))
