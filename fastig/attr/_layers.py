"""Layers of a model: finding one by name, recording its value during a forward pass (as leaf tensors that
gradients can be taken w.r.t.), replacing its value, and several vector-Jacobian products from one backward graph.

Used by the layer attributions (:mod:`fastig.attr.layer`), 2ndG (:mod:`fastig.attr.second_order`) and the
insecurity maps (:mod:`fastig.deliberative`).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch


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


def check_layer(forward_func: Callable, layer: Any) -> torch.nn.Module:
    """The layer as a module: a module (of ``forward_func`` when that is a module) or a dotted submodule name."""
    if isinstance(layer, (list, tuple)):
        raise TypeError("a list of layers is not supported: give one layer (a torch.nn.Module)")
    if isinstance(forward_func, torch.nn.Module):
        return resolve_layer(forward_func, layer)
    if not isinstance(layer, torch.nn.Module):
        raise TypeError(f"layer must be a torch.nn.Module, got {type(layer).__name__}")
    return layer


def _as_tuple(values: Any, what: str) -> tuple[torch.Tensor, ...]:
    values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        raise TypeError(f"the layer's {what} must be a tensor or a tuple of tensors")
    return values


@contextmanager
def capture(layer: torch.nn.Module, to_input: bool = False) -> Iterator[list]:
    """Record the layer's output (``to_input``: its positional inputs) during one forward pass as leaf tensors.

    Yields a list that holds, after the pass, one tuple of leaves (detached copies that require grad); the rest of
    the network gets clones of them, so in-place operations after the layer leave the recorded values intact.
    """
    found: list[tuple[torch.Tensor, ...]] = []

    def leaves_of(values, what):
        if found:
            raise ValueError(f"the layer {type(layer).__name__} is called more than once per forward pass; "
                             "choose a layer that is used once")
        tensors = _as_tuple(values, what)
        leaves = tuple(t.detach().requires_grad_(t.is_floating_point() or t.is_complex()) for t in tensors)
        found.append(leaves)
        return tuple(leaf.clone() for leaf in leaves)

    def on_output(_module, _inputs, output):
        clones = leaves_of(output, "output")
        return clones if isinstance(output, (tuple, list)) else clones[0]

    def on_input(_module, inputs):
        return leaves_of(inputs, "input")

    handle = layer.register_forward_pre_hook(on_input) if to_input else layer.register_forward_hook(on_output)
    try:
        yield found
    finally:
        handle.remove()
    if not found:
        raise ValueError(f"the layer {type(layer).__name__} was not called during the forward pass")


@contextmanager
def substitute(layer: torch.nn.Module, values: tuple[torch.Tensor, ...], to_input: bool = False) -> Iterator[None]:
    """During the block, the layer's output (``to_input``: its positional inputs) is replaced by clones of
    ``values`` (clones, so that in-place operations after the layer cannot touch them)."""

    def on_output(_module, _inputs, output):
        clones = tuple(v.clone() for v in values)
        return clones if isinstance(output, (tuple, list)) else clones[0]

    def on_input(_module, _inputs):
        return tuple(v.clone() for v in values)

    handle = layer.register_forward_pre_hook(on_input) if to_input else layer.register_forward_hook(on_output)
    try:
        yield
    finally:
        handle.remove()


def batched_vjp(outputs: torch.Tensor, inputs: torch.Tensor, cotangents: torch.Tensor,
                create_graph: bool = False) -> torch.Tensor:
    """``J`` vector-Jacobian products of ``outputs`` w.r.t. ``inputs`` from one backward graph: ``cotangents`` is
    [J, *outputs.shape], the result [J, *inputs.shape]. The graph is kept (it is freed with ``outputs``).

    One vectorized backward pass (``torch.autograd.grad(..., is_grads_batched=True)``); where an operation of the
    graph has no batching rule, the products are taken one by one instead (same numbers, slower).
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Bb]atching rule.*")
            (result,) = torch.autograd.grad(outputs, inputs, cotangents, retain_graph=True, create_graph=create_graph,
                                            is_grads_batched=True, allow_unused=True)
        rows = None if result is None else result
    except RuntimeError:
        rows = [torch.autograd.grad(outputs, inputs, c, retain_graph=True, create_graph=create_graph,
                                    allow_unused=True)[0] for c in cotangents]
        rows = torch.stack([torch.zeros_like(inputs) if r is None else r for r in rows])
    if rows is None:  # the outputs do not depend on the inputs
        return torch.zeros((len(cotangents),) + tuple(inputs.shape), dtype=inputs.dtype, device=inputs.device)
    return rows
