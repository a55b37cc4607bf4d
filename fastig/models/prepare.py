"""``fastig.prepare(model)``: an opt-in inference speed-up that keeps input gradients working.

What it does (each step leaves the function the model computes unchanged up to float rounding):

1. eval mode (BatchNorm uses its running statistics, dropout is off);
2. freezes the parameters (``requires_grad=False``): attribution needs gradients with respect to the *input*
   only, so autograd stops computing and storing weight gradients;
3. folds each BatchNorm2d into the Conv2d that feeds it (``W' = W * g / sqrt(v + eps)``,
   ``b' = (b - m) * g / sqrt(v + eps) + beta``, computed in float64) and replaces the BatchNorm by ``nn.Identity``;
4. converts 4-D weights to the channels_last memory format (faster convolutions on recent CPUs and GPUs).

Folding is applied only where the dataflow is known: a Conv2d immediately followed by a BatchNorm2d inside a plain
``nn.Sequential``, and the named conv/bn pairs of the ResNet and GoogLeNet blocks of ``fastig.models`` (and of
``torchvision.models``, whose classes have the same layout). Other modules are left alone.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# (conv, bn) attribute pairs whose conv output feeds only that bn, per block class of the zoo (same in torchvision).
_NAMED_PAIRS = {
    "ResNet": (("conv1", "bn1"),),
    "BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
    "Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    "BasicConv2d": (("conv", "bn"),),
}
_KNOWN_PACKAGES = ("fastig.models.", "torchvision.models.")


def prepare(
    model: nn.Module, *, inplace: bool = False, fold_batchnorm: bool = True, channels_last: bool = True,
    compile: bool = False,
) -> nn.Module:
    """Return a copy of ``model`` prepared for fast attribution (``inplace=True`` prepares ``model`` itself).

    The prepared model is in eval mode, its parameters are frozen, BatchNorm layers that follow a convolution are
    folded into it (and replaced by ``nn.Identity``, so its ``state_dict`` no longer matches the original's: it is
    meant for inference and attribution, not for saving or training), and its 4-D weights are channels_last.
    Gradients with respect to the input work as before (attribution needs them) and keep the input's layout: a
    forward pre-hook hands the convolutions a channels_last copy of each 4-D input and returns its gradient
    contiguous.

    Numerical error, measured (``tests/test_prepare.py`` and the same comparison over more seeds) with random
    weights and randomized BatchNorm statistics on 2 x 3 x 64 x 64 inputs, prepared vs unprepared model:

    - float64: logits and input gradients agree to ~1e-15 (relative): the folding itself is exact;
    - float32, logits: max |difference| / max |logit| ~1e-6 (resnet18 9.6e-7, resnet50 1.1e-6);
    - float32, input gradients: relative L2 difference ~1e-6 (resnet18 1.3e-6, resnet50 2.4e-6), except when a
      ReLU or max-pool decision sits within float32 rounding of its threshold and flips: then a few entries move
      (2 of 4 seeds: resnet50 1.7e-4, resnet18 8.7e-3). The unprepared float32 model deviates from a float64
      evaluation by similar amounts at such inputs: it is float32's resolution of a kinked function, not an
      error of the folding.

    ``compile=True`` (opt-in) also wraps the prepared model in ``torch.compile`` (inductor): the first pass at each
    new batch shape compiles (minutes on a small CPU), later passes run the compiled graph. Measured on this
    project's 2-core AVX2 CPU (benchmarks/test_bench_compile.py, see the README) it does not pay there; it is
    meant for GPUs, where ``scripts/gpu_check.sh`` measures it. Use it with the gradient and path methods; the
    methods that patch module behaviour while they run (DeepLift, LRP, guided backprop) need the uncompiled model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare() takes a torch.nn.Module, got {type(model).__name__}")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # a torch.compile wrapper: prepare what it wraps
        model = model._orig_mod
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    model.requires_grad_(False)
    if fold_batchnorm:
        fold_batchnorms(model)
    if channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
        if _inputs_to_channels_last not in model._forward_pre_hooks.values():  # preparing twice adds no second hook
            model.register_forward_pre_hook(_inputs_to_channels_last)
    if compile:
        return torch.compile(model)
    return model


class _ChannelsLast(torch.autograd.Function):
    """Identity that hands the model a channels_last copy of its input and gives the gradient back in the
    input's own layout (a plain contiguous gradient for a contiguous input), so callers see no layout change."""

    @staticmethod
    def forward(ctx, x):
        ctx.input_contiguous = x.is_contiguous()
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous() if ctx.input_contiguous else grad


def _inputs_to_channels_last(module, args):
    return tuple(_ChannelsLast.apply(a) if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)


def fold_batchnorms(model: nn.Module) -> int:
    """Fold every foldable (Conv2d -> BatchNorm2d) pair of ``model`` in place (see the module docstring); the
    BatchNorm becomes ``nn.Identity``. Returns the number of pairs folded. The model must be in eval mode."""
    if model.training:
        raise ValueError("fold_batchnorms() needs a model in eval mode: training-mode BatchNorm uses batch statistics")
    folded = 0
    for parent in list(model.modules()):
        for conv_name, bn_name in _pairs(parent):
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            if _foldable(conv, bn):
                fold_conv_bn(conv, bn)
                setattr(parent, bn_name, nn.Identity())
                folded += 1
    return folded


def _pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) child names of ``parent`` where the conv's output goes to that bn and nowhere else."""
    if type(parent) is nn.Sequential:  # a subclass could override forward: only the plain class is trusted
        names = list(parent._modules)
        return list(zip(names[:-1], names[1:]))
    cls = type(parent)
    if cls.__module__.startswith(_KNOWN_PACKAGES):
        return [p for p in _NAMED_PAIRS.get(cls.__name__, ()) if all(hasattr(parent, n) for n in p)]
    return []


def _foldable(conv, bn) -> bool:
    return (
        type(conv) is nn.Conv2d
        and type(bn) is nn.BatchNorm2d
        and bn.running_mean is not None
        and bn.running_var is not None
        and bn.num_features == conv.out_channels
    )


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Rewrite ``conv`` in place so that ``conv(x) == bn(conv_before(x))`` with ``bn`` in eval mode."""
    dtype = conv.weight.dtype
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    weight = conv.weight.double() * scale.reshape(-1, 1, 1, 1)
    conv.weight = nn.Parameter(weight.to(dtype), requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter(bias.to(dtype), requires_grad=conv.weight.requires_grad)
