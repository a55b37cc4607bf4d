"""Targets and additional forward arguments, in Captum's conventions, sliced per engine batch.

A bad target raises :class:`fastig.errors.InvalidArgumentError` / ``InvalidTypeError``: a ValueError / TypeError
that is also the AssertionError Captum raises for it.

A batch holds ``k`` path steps of a contiguous range of examples, step-major. Captum repeats targets and tensor
arguments once per step (``torch.cat([arg] * n_steps)``); here the same happens per batch, for the batch's
examples only.
"""

from __future__ import annotations

from typing import Any

import torch

from fastig.errors import InvalidArgumentError, InvalidTypeError


class Target:
    """A validated Captum target for ``n`` examples: None, one index for all, one index per example, or K classes
    per example.

    K classes per example (fastig's extension) come as a list of lists (``[[a, b, c], ...]``, one list of K
    classes per example) or an integer tensor [n, K] with K >= 2; the explained outputs are then [B, K] (one column
    per target). Captum's list of *tuples* keeps its meaning: one multi-dimensional index per example.
    """

    def __init__(self, target: Any, n: int):
        self.n = n
        self.common: tuple | None = None  # the same index (as a tuple) for every example
        self.per_example: torch.Tensor | None = None  # [n] class indices into a 2-D output
        self.tuples: list[tuple] | None = None  # per-example index tuples
        self.multi: torch.Tensor | None = None  # [n, K] class indices into a 2-D output: K targets per example
        if target is None:
            return
        if isinstance(target, torch.Tensor):
            # [n, 1] is refused, not read as K=1: Captum would read it as one index per example (ambiguous)
            if target.dim() == 2 and target.shape[0] == n and target.shape[1] >= 2 and not target.is_floating_point():
                self.multi = target.long()
                return
            if target.numel() == 1 and not target.is_floating_point():
                target = int(target.item())
            elif target.dim() == 1 and target.numel() == n and not target.is_floating_point():
                self.per_example = target.long()
                return
            else:
                raise InvalidArgumentError(
                    f"target tensor must hold one integer, one integer per example ({n}) or K >= 2 integers per "
                    f"example [{n}, K], got shape {tuple(target.shape)} and dtype {target.dtype}"
                )
        if isinstance(target, bool):
            raise InvalidTypeError("target must be an int, a tuple, a list or an integer tensor, not a bool")
        if isinstance(target, int):
            self.common = (target,)
        elif isinstance(target, tuple):
            if not all(isinstance(t, int) for t in target):
                raise InvalidTypeError(f"a tuple target must hold integers, got {target!r}")
            self.common = target
        elif isinstance(target, list):
            if len(target) != n:
                raise InvalidArgumentError(f"target list has {len(target)} entries but there are {n} examples")
            if all(isinstance(t, int) and not isinstance(t, bool) for t in target):
                self.per_example = torch.tensor(target, dtype=torch.long)
            elif all(isinstance(t, tuple) for t in target):
                self.tuples = list(target)
            elif all(isinstance(t, list) for t in target):
                lengths = {len(t) for t in target}
                if len(lengths) > 1 or 0 in lengths or not all(
                    isinstance(c, int) and not isinstance(c, bool) for t in target for c in t
                ):
                    raise InvalidArgumentError("a list of target lists must hold the same number (>= 1) of integer "
                                               f"classes for every example, got {target!r}")
                self.multi = torch.tensor(target, dtype=torch.long).reshape(n, -1)
            else:
                raise InvalidTypeError(
                    "a target list must hold only ints, only tuples or only lists (K classes per example)")
        else:
            raise InvalidTypeError(
                f"target must be None, an int, a tuple, a list or a tensor, not {type(target).__name__}"
            )

    @property
    def k(self) -> int | None:
        """The number of targets per example when there are several (K), else None."""
        return None if self.multi is None else self.multi.shape[1]

    def per_pair(self) -> "Target":
        """K targets per example as one target per (example, target) pair, example-major (``n * K`` rows)."""
        pairs = Target(None, 0)
        pairs.per_example = self.multi.reshape(-1)
        pairs.n = pairs.per_example.numel()
        return pairs

    def for_batch(self, examples: slice, repeats: int) -> "Target":
        """The target of a batch holding ``repeats`` steps of ``examples`` (step-major)."""
        part = Target(None, 0)
        part.common = self.common
        if self.multi is not None:
            part.multi = self.multi[examples].repeat(repeats, 1)
            part.n = part.multi.shape[0]
        elif self.per_example is not None:
            part.per_example = self.per_example[examples].repeat(repeats)
            part.n = part.per_example.numel()
        elif self.tuples is not None:
            part.tuples = self.tuples[examples] * repeats
            part.n = len(part.tuples)
        return part

    def select(self, output: torch.Tensor) -> torch.Tensor:
        """The scalar per row of ``output`` that is explained, as a 1-D tensor."""
        if not isinstance(output, torch.Tensor):
            raise InvalidTypeError(f"the model must return a tensor, got {type(output).__name__}")
        if self.common is not None:
            if len(self.common) > output.dim() - 1:
                raise InvalidArgumentError(
                    f"target {self.common} has more indices than the model output's non-batch dimensions "
                    f"(output shape {tuple(output.shape)})"
                )
            for index, size in zip(self.common, output.shape[1:]):
                if not -size <= index < size:
                    raise InvalidArgumentError(f"target {index} is out of range for the model's output of shape "
                                                f"[N, {', '.join(map(str, output.shape[1:]))}] ({size} classes)")
            selected = output[(slice(None), *self.common)]
        elif self.per_example is not None:
            if output.dim() != 2:
                raise InvalidArgumentError(
                    f"per-example targets need a 2-D model output, got shape {tuple(output.shape)}"
                )
            index = self.per_example.to(output.device)
            if index.numel() and (index.min() < 0 or index.max() >= output.shape[1]):
                raise InvalidArgumentError(f"target out of range for model output with {output.shape[1]} classes")
            selected = output.gather(1, index.reshape(-1, 1))
        elif self.tuples is not None:
            selected = torch.stack([output[(i, *t)] for i, t in enumerate(self.tuples)])
        elif self.multi is not None:
            if output.dim() != 2:
                raise InvalidArgumentError(f"K targets per example need a 2-D model output, got shape {tuple(output.shape)}")
            index = self.multi.to(output.device)
            if index.numel() and (index.min() < 0 or index.max() >= output.shape[1]):
                raise InvalidArgumentError(f"target out of range for model output with {output.shape[1]} classes")
            return output.gather(1, index)
        else:
            selected = output
        if selected.dim() > 1 and selected[0].numel() != 1:
            raise InvalidArgumentError(
                f"the model output has shape {tuple(output.shape)}: give a target to choose the scalar to explain"
            )
        return selected.reshape(selected.shape[0])


def format_additional_args(additional_forward_args: Any) -> tuple:
    if additional_forward_args is None:
        return ()
    if isinstance(additional_forward_args, tuple):
        return additional_forward_args
    return (additional_forward_args,)


def args_for_batch(args: tuple, n: int, examples: slice, repeats: int) -> tuple:
    """Captum's repeat expansion of tensor arguments; per-example tensors (first dim ``n``) are sliced first."""
    out = []
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.dim() > 0:
            if arg.shape[0] == n:
                arg = arg[examples]
            arg = arg.repeat((repeats,) + (1,) * (arg.dim() - 1)) if repeats > 1 else arg
        out.append(arg)
    return tuple(out)


def expand_target(target: Any, n_samples: int) -> Any:
    """Captum's repeat_interleave expansion of a per-example target."""
    if isinstance(target, list):
        return [t for t in target for _ in range(n_samples)]
    if isinstance(target, torch.Tensor) and target.numel() > 1:
        return target.repeat_interleave(n_samples, dim=0)
    return target


def expand_additional_args(args: Any, n_samples: int) -> Any:
    """Captum's repeat_interleave expansion of every non-scalar tensor argument."""
    if args is None:
        return None
    args = args if isinstance(args, tuple) else (args,)
    return tuple(
        a.repeat_interleave(n_samples, dim=0) if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args
    )
