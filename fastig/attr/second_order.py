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
form exactly. The products of many (example, location) pairs run in one batched double-backward pass.

Piecewise-linear networks: if everything after the layer is built from ReLUs, max-pooling, linear and conv
layers (and the score is a logit), ``s`` is piecewise linear in ``a`` and its Hessian is zero almost everywhere, so
the second term vanishes and 2ndG equals its first-order term. The second term matters for smooth networks
(softplus, tanh, GELU, SiLU, ...) or smooth scores (a softmax probability, a difficulty score).

Batched rows must be independent of each other: put the model in eval mode (BatchNorm in train mode mixes rows).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastig.attr._base import Attribution
from fastig.attr._inputs import format_inputs
from fastig.attr.noise_tunnel import expand_target
from fastig.core.engine import Chunk, Engine, grid, target_vjps
from fastig.core.targets import Target, format_additional_args


def resolve_layer(model: torch.nn.Module, layer: torch.nn.Module | str) -> torch.nn.Module:
    """A submodule of ``model``, given as the module itself or by its dotted name (``"layer4"``, ``"features.42"``)."""
    if isinstance(layer, torch.nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError(f"layer {type(layer).__name__} is not a submodule of the model")
        return layer
    if isinstance(layer, str):
        try:
            return model.get_submodule(layer)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n]
            raise ValueError(f"the model has no submodule {layer!r}; some names: {', '.join(names[:20])}") from None
    raise TypeError(f"layer must be a torch.nn.Module or a submodule name, got {type(layer).__name__}")


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


class _Capture:
    """Forward hook that replaces the layer's output with a leaf tensor, so derivatives w.r.t. it can be taken."""

    def __init__(self, layer: torch.nn.Module):
        self.layer = layer
        self.leaf: torch.Tensor | None = None

    def __call__(self, module, _inputs, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"the layer must return a tensor, got {type(output).__name__}")
        if self.leaf is not None:
            raise ValueError("the layer is called more than once per forward pass; choose a layer used once")
        if output.dim() < 2:
            raise ValueError(f"the layer output must be [N, C, ...], got shape {tuple(output.shape)}")
        self.leaf = output.detach().requires_grad_()
        return self.leaf


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

    With K targets per example (``target=[[a, b], ...]``, [N, K], or ``top_k=K``) both are [N, K, *spatial]: one
    forward pass per batch of rows, then per target one backward pass (first term) or one gradient and one
    Hessian-vector product over the retained graph (second term).
    """
    n = inputs[0].shape[0]
    args = format_additional_args(additional_forward_args)
    engine = Engine(model, rows_per_pass, precision)
    example_target = engine.resolve_target(target, top_k, inputs, args)
    k = example_target.k

    def run(rows: torch.Tensor, row_target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward on the given example rows; (layer activations as a leaf, explained scores [B, K])."""
        capture = _Capture(layer)
        handle = layer.register_forward_hook(capture)
        try:
            row_args = tuple(
                a[rows] if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n else a for a in args
            )
            scores = row_target.select(engine.call(tuple(x[rows] for x in inputs), row_args))
        finally:
            handle.remove()
        if capture.leaf is None:
            raise ValueError("the layer was not called during the forward pass")
        return capture.leaf, scores if k is not None else scores.unsqueeze(1)

    bytes_per_row = sum(x[0].numel() * x.element_size() for x in inputs)

    # First-order term: one forward and K backward passes per batch of examples.
    def first_order(chunk: Chunk) -> torch.Tensor:
        e = chunk.examples
        with torch.enable_grad():
            acts, scores = run(torch.arange(e.start, e.stop), example_target.for_batch(e, 1))
            (grads,) = target_vjps(scores, (acts,))  # [B, K, C, *spatial]
        return (acts.detach().unsqueeze(1) * grads.clamp(min=0)).sum(2)

    size = engine.rows_per_batch(bytes_per_row, n)
    first = torch.cat([out for _, out in engine.run_chunks(grid(1, n, 1, size), first_order, bytes_per_row=bytes_per_row)])

    # Second-order term: one Hessian-vector product per (example, location) row and target, many rows per pass.
    spatial = tuple(first.shape[2:])
    n_loc = math.prod(spatial)
    row_target = Target(expand_target(example_target.multi if k is not None else target, n_loc), n * n_loc)

    def second_order(chunk: Chunk) -> torch.Tensor:
        pairs = torch.arange(chunk.examples.start, chunk.examples.stop)
        examples, locations = pairs // n_loc, pairs % n_loc
        quad = torch.zeros((len(pairs), first.shape[1]), dtype=first.dtype, device=first.device)
        with torch.enable_grad():
            acts, scores = run(examples, row_target.for_batch(chunk.examples, 1))
            flat = acts.detach().reshape(len(pairs), acts.shape[1], n_loc)
            rows = torch.arange(len(pairs))
            at_location = flat[rows, :, locations]  # [R, C]: a_p of each row
            direction = torch.zeros_like(flat)
            direction[rows, :, locations] = at_location
            for j in range(scores.shape[1]):
                last = j == scores.shape[1] - 1
                (grad,) = torch.autograd.grad(scores[:, j].sum(), acts, create_graph=True, retain_graph=True)
                if not grad.requires_grad:  # the score is linear in the activations here: H = 0
                    continue
                (hvp,) = torch.autograd.grad(grad, acts, grad_outputs=direction.reshape(acts.shape), allow_unused=True,
                                             retain_graph=not last)
                if hvp is not None:
                    quad[:, j] = (at_location * hvp.reshape(len(pairs), acts.shape[1], n_loc)[rows, :, locations]).sum(1)
        return quad

    size = engine.rows_per_batch(bytes_per_row, n * n_loc)
    quad = torch.cat([out for _, out in engine.run_chunks(grid(1, n * n_loc, 1, size), second_order,
                                                          bytes_per_row=bytes_per_row)])
    quad = quad.reshape((n, n_loc, first.shape[1])).transpose(1, 2).reshape(first.shape)
    if k is None:
        return first[:, 0], quad[:, 0]
    return first, quad


class SecondOrderGradients(Attribution):
    """2ndG attribution maps at a layer (see the module docstring for exactly what is computed).

    ``layer``: a submodule of ``forward_func`` or its dotted name; None picks the last layer with a spatial output.
    ``attribute()`` returns [N, 1, *spatial] at the layer's resolution (like Captum's ``LayerGradCam``), or at the
    input's resolution with ``upsample_to_input=True`` (bilinear). ``internal_batch_size``: rows per double-backward
    pass, one row being one (example, location) pair; None lets the engine choose (a small number on the CPU).
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
        if internal_batch_size is not None and (
            isinstance(internal_batch_size, bool) or not isinstance(internal_batch_size, int) or internal_batch_size < 1
        ):
            raise ValueError(f"internal_batch_size must be a positive integer or None, got {internal_batch_size!r}")
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
