"""2ndG: second-order attributions at a layer (Wang & Vasconcelos, "Deliberative Explanations: visualizing network
insecurities", NeurIPS 2019), computed with Hessian-vector products.

What is computed. Let ``a`` [C, *spatial] be the activations of the chosen layer for one example, ``s(a)`` the
explained score (the target output of the model, with everything before the layer held fixed), ``a_p`` [C] the
activation vector at spatial location ``p``, ``g_p = ds/da_p`` and ``H_pp = d^2 s / da_p da_p`` [C, C] the block of
the Hessian of ``s`` w.r.t. the layer activations that couples the channels *at the same location* ``p``. Then

    A(p) = sum_d a_{p,d} * max(g_{p,d}, 0)  +  0.5 * | a_p^T H_pp a_p |

This is the paper's second-order Taylor attribution ``g^T a + 1/2 a^T H a`` per location as the authors' released
code evaluates it (``insecurity_*_2ndG.py``): the first-order term uses the positive part of the gradient, the
second-order term its absolute value, and the Hessian is restricted to the per-location channel block (cross-
location curvature is ignored). The released code builds ``H_pp`` row by row with one backward pass per channel
and location (14 x 14 x 512 = 100,352 passes per VGG image). Here each location costs one Hessian-vector product:
with ``v`` equal to ``a`` at ``p`` and zero elsewhere, ``(H v)_p = H_pp a_p``, so ``a_p^T (H v)_p`` is the quadratic
form exactly. Where no convolution follows the layer, one forward pass serves all locations of its examples: its
retained graph gives the products of chunks of locations in one vectorized double-backward pass through the part
of the network after the layer. Where a convolution follows, the vectorized pass is slow (it has no batching rule
for a convolution's double backward, loops over the products inside and stacks their results: on resnet18
``layer3`` at 112x112 with Softplus, 32 s for the products against 9-10 s for a whole call of the previous
version), and so is one pass per location (12.5 s there: a convolution on one small feature map costs about as much
as on many); there each chunk of (example, location) pairs gets a forward pass on copies of its examples, one
location per copy, and one double-backward pass in that real batch.

Piecewise-linear networks: if everything after the layer is built from ReLUs, max-pooling, linear and conv
layers (and the score is a logit), ``s`` is piecewise linear in ``a`` and its Hessian is zero almost everywhere, so
the second term vanishes and 2ndG equals its first-order term; one Hessian-vector product with a random
direction finds this (it is exactly zero) and the per-location products are skipped. The second term matters for
smooth networks (softplus, tanh, GELU, SiLU, ...) or smooth scores (a softmax probability, a difficulty score).

Batched rows must be independent of each other: put the model in eval mode (BatchNorm in train mode mixes rows).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastig.attr._base import Attribution
from fastig.core.inputs import format_inputs
from fastig.attr._layers import batched_vjp, capture, resolve_layer
from fastig.core.engine import Chunk, Engine, grid
from fastig.core.targets import Target, format_additional_args
from fastig.errors import check_int

# Bytes of Hessian-vector-product directions per vectorized double-backward pass (as many again for the results).
HVP_BYTES = 64 << 20


def last_spatial_layer(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], args: tuple) -> torch.nn.Module:
    """The module that last produced a tensor with a spatial extent > 1 during a forward pass on one example
    (the last convolutional feature map, e.g. ``layer4`` of a ResNet, ``features`` of a VGG)."""
    found: list[torch.nn.Module] = []

    def record(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() >= 3 and math.prod(output.shape[2:]) > 1:
            found.append(module)

    handles = [m.register_forward_hook(record) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            Engine(model).call(tuple(x[:1] for x in inputs), args)
    finally:
        for h in handles:
            h.remove()
    if not found:
        raise ValueError("the model has no layer with a spatial output; pass layer=... explicitly")
    return found[-1]


def second_order_terms(
    model: torch.nn.Module,
    layer: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    target: Any = None,
    additional_forward_args: Any = None,
    rows_per_pass: int | None = None,
    precision: str = "fp32",
    top_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, quadratic), each [N, *spatial]: ``sum_d a_d max(g_d, 0)`` and the signed ``a_p^T H_pp a_p``.

    One forward pass per chunk of examples (through the engine); its backward graph (built with ``create_graph``)
    gives the gradient and then the Hessian-vector products of all (example, location) rows, vectorized over that
    graph or, after a convolution, in forward passes on copies of the examples (:func:`_quadratic_forms`).
    ``rows_per_pass`` caps the examples per forward pass and the rows per double-backward pass; None sizes both
    from memory.

    With K targets per example (``target=[[a, b], ...]``, [N, K], or ``top_k=K``) both are [N, K, *spatial]: the
    same forward pass serves all K, then per target one gradient and its Hessian-vector products.
    """
    n = inputs[0].shape[0]
    args = format_additional_args(additional_forward_args)
    engine = Engine(model, rows_per_pass, precision)
    example_target = engine.resolve_target(target, top_k, inputs, args)
    bytes_per_row = sum(x[0].numel() * x.element_size() for x in inputs)

    def forward(rows: slice, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's activations (a leaf) and the explained scores [copies * m, K] of ``copies`` copies of the
        examples ``rows`` (copy-major)."""
        def repeat(t):
            return t[rows].repeat((copies,) + (1,) * (t.dim() - 1))

        row_args = tuple(repeat(a) if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n else a
                         for a in args)
        with capture(layer) as found:
            scores = example_target.for_batch(rows, copies).select(engine.call(tuple(map(repeat, inputs)), row_args))
        if len(found[0]) != 1 or found[0][0].dim() < 2:
            raise ValueError("the layer output must be one tensor [N, C, ...], got "
                             f"{[tuple(t.shape) for t in found[0]]}")
        return found[0][0], scores if example_target.k is not None else scores.unsqueeze(1)

    def terms(chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        rows = chunk.examples
        with torch.enable_grad():
            acts, scores = forward(rows, 1)
            grads = _score_gradients(acts, scores)

            def gradients_of_copies(copies: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
                copy_acts, copy_scores = forward(rows, copies)
                return copy_acts, _score_gradients(copy_acts, copy_scores)

            copies_per_pass = rows_per_pass or engine.rows_per_batch(bytes_per_row, acts[0, 0].numel() * len(acts))
            quads = _quadratic_forms(grads, acts, rows_per_pass, gradients_of_copies=gradients_of_copies,
                                     copies_per_pass=max(1, copies_per_pass // len(acts)))
        firsts = [(acts.detach() * grad.detach().clamp(min=0)).sum(1) for grad in grads]
        return torch.stack(firsts, 1), quads

    size = engine.rows_per_batch(bytes_per_row, n)
    parts = [out for _, out in engine.run_chunks(grid(1, n, 1, size), terms, bytes_per_row=bytes_per_row)]
    first, quad = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if example_target.k is None:
        return first[:, 0], quad[:, 0]
    return first, quad


def _score_gradients(acts: torch.Tensor, scores: torch.Tensor) -> list[torch.Tensor]:
    """``d scores[:, j] / d acts`` for every target j, with their graphs (for the Hessian-vector products)."""
    return [torch.autograd.grad(scores[:, j].sum(), acts, create_graph=True, retain_graph=True)[0]
            for j in range(scores.shape[1])]


def _quadratic_forms(grads: list[torch.Tensor], acts: torch.Tensor, rows_per_pass: int | None,
                     batched: bool | None = None, gradients_of_copies: Callable | None = None,
                     copies_per_pass: int = 1) -> torch.Tensor:
    """``a_p^T H_pp a_p`` [m, K, *spatial] for every example, target and location, from the K gradients
    ``grads[j] = ds_j/da`` (with their graph): the Hessian-vector product with ``a`` at ``p`` (zero elsewhere) read
    at ``p``, for chunks of locations.

    ``batched``: the products of a chunk of locations in one vectorized double-backward pass over the gradient's
    graph (:func:`batched_vjp`), or (False) in a real batch: ``gradients_of_copies(L)`` gives the activations and
    K gradients of a new forward pass on L copies of the m examples, [L * m, ...], and copy ``l`` carries location
    ``start + l``; ``copies_per_pass`` copies per pass. None chooses (:func:`_batched_is_faster`; False needs
    ``gradients_of_copies``). Both give the same numbers to rounding. Zero curvature (a piecewise-linear network
    after the layer) is found with one product per target first.
    """
    m, c = acts.shape[:2]
    spatial = tuple(acts.shape[2:])
    n_loc = math.prod(spatial)
    quad = torch.zeros(m, len(grads), n_loc, dtype=acts.dtype, device=acts.device)
    curved = [j for j, grad in enumerate(grads) if grad.requires_grad and not _curvature_is_zero(grad, acts)]
    if not curved:
        return quad.reshape((m, len(grads)) + spatial)
    if batched is None:
        batched = gradients_of_copies is None or _batched_is_faster(grads[curved[0]])
    flat = acts.detach().reshape(m, c, n_loc)
    if not batched:
        per_pass = copies_per_pass
    elif rows_per_pass:
        per_pass = max(1, rows_per_pass // m)
    else:
        per_pass = max(1, HVP_BYTES // max(flat.numel() * flat.element_size(), 1))
    for start in range(0, n_loc, per_pass):
        locations = torch.arange(start, min(start + per_pass, n_loc), device=acts.device)
        chunk = torch.arange(len(locations), device=acts.device)
        if batched:
            values, chunk_grads = acts, grads
            at_location = flat[:, :, locations].permute(2, 0, 1)  # [L, m, C]: a_p of each example
        else:  # a forward pass on L copies of the examples: copy l's direction is a at its location
            values, chunk_grads = gradients_of_copies(len(locations))
            at_location = values.detach().reshape(len(locations), m, c, n_loc)[chunk, :, :, locations]
        directions = torch.zeros((len(locations), m, c, n_loc), dtype=flat.dtype, device=flat.device)
        directions[chunk, :, :, locations] = at_location
        for j in curved:
            if batched:
                hvp = batched_vjp(grads[j], acts, directions.reshape((len(locations),) + tuple(acts.shape)))
            else:
                (hvp,) = torch.autograd.grad(chunk_grads[j], values, directions.reshape(values.shape),
                                             retain_graph=True, allow_unused=True)
                hvp = torch.zeros_like(directions) if hvp is None else hvp
            hvp_at_location = hvp.reshape(directions.shape)[chunk, :, :, locations]
            quad[:, j, start:start + len(locations)] = (at_location * hvp_at_location).sum(2).T
    return quad.reshape((m, len(grads)) + spatial)


def _curvature_is_zero(grad: torch.Tensor, acts: torch.Tensor) -> bool:
    """Whether the Hessian of the score w.r.t. the layer activations is zero at ``acts``: one Hessian-vector
    product with a random direction (fixed seed) is exactly zero. After a piecewise-linear tail (ReLU, max-pooling,
    linear and conv layers) the double-backward pass yields exact zeros whatever the direction, so every
    per-location product would be zero too; for curved tails a dense random direction gives a non-zero product
    (a zero by cancellation has probability zero), and the work goes on with one product more."""
    seeded = torch.Generator(device=acts.device).manual_seed(0)
    probe = torch.randn(acts.shape, generator=seeded, dtype=acts.dtype, device=acts.device)
    (hvp,) = torch.autograd.grad(grad, acts, probe, retain_graph=True, allow_unused=True)
    return hvp is None or not bool(hvp.any())


# Backward nodes whose double backward has no batching rule in the vectorized backward pass
# (``is_grads_batched``): it runs them once per product and then stacks the results, which is slower than a
# forward pass on copies of the examples (see the module docstring).
_UNBATCHED_DOUBLE_BACKWARD = frozenset({"ConvolutionBackwardBackward0"})


def _batched_is_faster(grad: torch.Tensor) -> bool:
    """False when the graph of ``grad`` (the backward pass after the layer) holds a node of
    :data:`_UNBATCHED_DOUBLE_BACKWARD`, i.e. a convolution after the layer; True otherwise (the vectorized pass
    needs no further forward passes)."""
    seen, todo = set(), [grad.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        if type(node).__name__ in _UNBATCHED_DOUBLE_BACKWARD:
            return False
        seen.add(node)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return True


class SecondOrderGradients(Attribution):
    """2ndG attribution maps at a layer (see the module docstring for exactly what is computed).

    ``layer``: a submodule of ``forward_func`` or its dotted name; None picks the last layer with a spatial output.
    ``attribute()`` returns [N, 1, *spatial] at the layer's resolution (like Captum's ``LayerGradCam``), or at the
    input's resolution with ``upsample_to_input=True`` (bilinear). ``internal_batch_size``: rows per double-backward
    pass, one row being one (example, location) pair, and examples per forward pass; None sizes both from memory.
    ``precision``: autocast of the model's passes (:mod:`fastig.core.engine`). Several targets per example
    (``target=[[a, b], ...]``, an [N, K] tensor, or ``top_k=K``) give [N, K, 1, *spatial] maps from one forward
    pass per batch of rows.
    """

    def __init__(self, forward_func: torch.nn.Module, layer: torch.nn.Module | str | None = None) -> None:
        if not isinstance(forward_func, torch.nn.Module):
            raise TypeError(f"SecondOrderGradients needs a torch.nn.Module, got {type(forward_func).__name__}")
        super().__init__(forward_func)
        self.layer = None if layer is None else resolve_layer(forward_func, layer)

    multiplies_by_inputs = True

    def attribute(
        self,
        inputs: Any,
        target: Any = None,
        additional_forward_args: Any = None,
        internal_batch_size: int | None = None,
        upsample_to_input: bool = False,
        layer: torch.nn.Module | str | None = None,
        *,
        precision: str = "fp32",
        top_k: int | None = None,
    ) -> torch.Tensor:
        """2ndG maps for ``inputs``; ``layer`` overrides the constructor's choice for this call."""
        xs, _ = format_inputs(inputs)
        check_int("internal_batch_size", internal_batch_size, none_ok=True)
        args = format_additional_args(additional_forward_args)
        if layer is not None:
            chosen = resolve_layer(self.forward_func, layer)
        elif self.layer is not None:
            chosen = self.layer
        else:
            chosen = last_spatial_layer(self.forward_func, xs, args)
        first, quad = second_order_terms(self.forward_func, chosen, xs, target, args, internal_batch_size, precision,
                                         top_k)
        several = top_k is not None or Target(target, xs[0].shape[0]).k is not None  # maps [N, K, 1, ...]
        maps = (first + 0.5 * quad.abs()).unsqueeze(2 if several else 1)
        flat = maps.flatten(0, 1) if several else maps
        if upsample_to_input and flat.dim() > 2:
            modes = {3: "linear", 4: "bilinear", 5: "trilinear"}
            if flat.dim() not in modes or xs[0].dim() != flat.dim():
                raise ValueError(f"cannot upsample a map of shape {tuple(maps.shape)} to inputs of shape {tuple(xs[0].shape)}")
            flat = F.interpolate(flat, size=tuple(xs[0].shape[2:]), mode=modes[flat.dim()], align_corners=False)
            maps = flat.reshape(tuple(maps.shape[:3]) + tuple(flat.shape[2:])) if several else flat
        return maps
