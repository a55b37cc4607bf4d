"""Guided Integrated Gradients (Kapishnikov et al., CVPR 2021), PAIR saliency's algorithm, batched over examples."""

from __future__ import annotations

from typing import Any

from fastig.core.inputs import format_baselines, format_inputs, format_output
from fastig.attr._path_common import (
    PathAttribution,
    check_flag,
    check_number,
    check_steps,
    per_target_examples,
    per_target_results,
)
from fastig.core.engine import integrate_idgi, integrate_moves
from fastig.core.paths import GuidedPath


class GuidedIntegratedGradients(PathAttribution):
    """Guided IG: an adaptive path from the baseline to the input that, at each of ``n_steps`` steps, moves the
    features with the smallest absolute gradient first.

    The numbers are those of PAIR saliency's ``GuidedIG.GetMask`` (``saliency.core.guided_ig``), with its
    defaults: ``n_steps=200`` (PAIR's ``x_steps``), ``fraction=0.25``, ``max_dist=0.02``, baseline zeros. At each
    step k (target alpha ``(k+1)/n_steps``) the features whose |gradient| is at or below the ``fraction``-quantile
    move towards the input until the L1 distance to the input has shrunk to ``1 - (k+1)/n_steps`` of the total,
    no feature straying more than ``max_dist`` (in alpha) from the straight line; the attribution is the sum over
    steps of (move) * (gradient at the step's start point). ``max_dist=0`` is straight-line IG with the left
    Riemann rule, ``max_dist=1`` the unbounded method.

    Differences from PAIR, none of which changes a number: all examples of the batch advance together (one
    forward+backward pass per step for the whole batch, instead of one image at a time with batch-of-one
    passes), the step runs in torch on the inputs' device (float64 state, as PAIR's numpy), several input
    tensors count as one feature vector, and a step where no feature can be selected any more stops instead of
    looping forever.

    ``idgi=True`` applies IDGI to the same path: gradients at x_0 .. x_{n-1} (the points Guided IG evaluates
    anyway) and one forward pass at the path's end x_n; attributions then sum to f(x_n) - f(baseline), with
    x_n the input up to PAIR's 1e-9 tolerance. ``output="probability"`` explains the softmax probability.

    ``precision`` and several targets per example (``target=[[a, b], ...]``, an [N, K] tensor or ``top_k=K``) as
    in :class:`~fastig.attr.IntegratedGradients`. The path depends on the target's gradients, so each (example,
    target) pair follows its own path (the K paths of an example advance together in one batch); attributions
    are [N, K, ...].
    """

    def attribute(
        self,
        inputs: Any,
        baselines: Any = None,
        target: Any = None,
        additional_forward_args: Any = None,
        n_steps: int = 200,
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
        *,
        fraction: float = 0.25,
        max_dist: float = 0.02,
        idgi: bool = False,
        output: str = "logit",
        precision: str = "fp32",
        top_k: int | None = None,
    ) -> Any:
        check_steps(n_steps)
        fraction = check_number("fraction", fraction, 0.0, 1.0)
        max_dist = check_number("max_dist", max_dist, 0.0, 1.0)
        check_flag("idgi", idgi)
        xs, is_tuple = format_inputs(inputs)
        bs = format_baselines(baselines, xs)
        tgt, args, engine = self._setup(xs, target, additional_forward_args, output, internal_batch_size, precision, top_k)
        k = tgt.k
        if k is not None:  # one path per (example, target)
            xs, bs, tgt, args = per_target_examples(xs, bs, tgt, args)
        path = GuidedPath(xs, bs, n_steps, fraction, max_dist)

        if idgi:
            totals, outputs = integrate_idgi(engine, path, tgt, args)
            end = outputs[-1]
        else:
            totals, outputs = integrate_moves(engine, path, tgt, args, n_steps=n_steps)
            end = None  # the path's end is the input, which the steps never evaluate
        attributions = tuple(total.to(x.dtype) for total, x in zip(totals, xs))
        if k is None:
            result = format_output(attributions, is_tuple)
        else:
            result = format_output(per_target_results(attributions, k), is_tuple)
        if not return_convergence_delta:
            return result
        delta = self._delta(engine, attributions, xs, bs, tgt, args, outputs[0], end)
        return result, (delta if k is None else delta.reshape(-1, k))
