"""The model zoo: torchvision-compatible ImageNet classifiers, a Places365 scene classifier and the center-pixel
toy model, behind one registry.

>>> model = fastig.models.get("resnet50")            # weights from checkpoints/resnet50-0676ba61.pth
>>> model = fastig.models.get("resnet50", weights="none")   # random initialization (smoke tests)
>>> fastig.models.info("resnet50").mean               # how its inputs are normalized

Weight files are never downloaded: ``weights="auto"`` reads the file named by :func:`info` from
:func:`checkpoint_dir` (``$FASTIG_CHECKPOINTS`` or ``checkpoints/`` at the repository root) and, when it is not
there, raises a :class:`~fastig.errors.CheckpointError` naming the file and where to get it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fastig.errors import CheckpointError, UnknownNameError
from fastig.models import alexnet, centerpixel, googlenet, resnet, vgg  # architecture modules
from fastig.models.checkpoints import (
    apply_state_dict,
    checkpoint_dir,
    hash_prefix_from_name,
    load_checkpoint,
    read_verified,
)
from fastig.models.googlenet import GoogLeNet

__all__ = ["ModelInfo", "get", "names", "info", "checkpoint_dir", "checkpoint_path", "load_checkpoint"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_URL = "https://download.pytorch.org/models/"


@dataclass(frozen=True)
class ModelInfo:
    """What a zoo model needs: its weight file and how its inputs are prepared.

    ``filename``/``url``: the weight file expected under :func:`checkpoint_dir` and where to download it (None
    for models that need no file). ``sha256``: the file's sha256 digest or a prefix of it (torchvision's
    file names carry its first 8 hex digits), checked on loading; None when unknown. Inputs are resized so the
    short side is ``resize_size``, center-cropped to ``input_size`` x ``input_size``, scaled to [0, 1] and
    normalized per channel as ``(x - mean) / std`` (identity for the center-pixel model). ``builder()`` returns
    the architecture, randomly initialized, exactly as its weight file expects it.
    """

    name: str
    filename: str | None
    url: str | None
    sha256: str | None
    input_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    num_classes: int
    builder: Callable[[], nn.Module]
    description: str = ""


def _torchvision(name: str, filename: str, builder: Callable[[], nn.Module], description: str) -> ModelInfo:
    return ModelInfo(
        name=name, filename=filename, url=TORCHVISION_URL + filename, sha256=hash_prefix_from_name(filename),
        input_size=224, resize_size=256, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels=3, num_classes=1000,
        builder=builder, description=description,
    )


_REGISTRY: dict[str, ModelInfo] = {
    m.name: m
    for m in [
        _torchvision("resnet18", "resnet18-f37072fd.pth", resnet.resnet18, "ResNet-18, ImageNet (torchvision V1)"),
        _torchvision("resnet34", "resnet34-b627a593.pth", resnet.resnet34, "ResNet-34, ImageNet (torchvision V1)"),
        _torchvision("resnet50", "resnet50-0676ba61.pth", resnet.resnet50, "ResNet-50, ImageNet (torchvision V1)"),
        _torchvision("vgg16", "vgg16-397923af.pth", vgg.vgg16, "VGG-16, ImageNet (torchvision V1)"),
        _torchvision("vgg19", "vgg19-dcbb9e9d.pth", vgg.vgg19, "VGG-19, ImageNet (torchvision V1)"),
        _torchvision("alexnet", "alexnet-owt-7be5be79.pth", alexnet.alexnet, "AlexNet, ImageNet (torchvision V1)"),
        _torchvision("googlenet", "googlenet-1378be20.pth", googlenet.googlenet,
                     "GoogLeNet (Inception v1), ImageNet (torchvision V1, ported from TensorFlow)"),
        ModelInfo(
            name="sascenenet_rgb", filename="RGB_ResNet18_Places.pth.tar",
            url="https://dauam-my.sharepoint.com/:u:/g/personal/alejandro_lopezc01_estudiante_uam_es/"
            "EUaPpF5MpkNCqDd04GMVnYEB6BnH5inElN9ve_trAiWg-A?download=1",
            sha256=None, input_size=224, resize_size=256, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels=3,
            num_classes=365, builder=resnet.sascenenet_rgb,
            description="SASceneNet RGB branch (ResNet-18), Places365 scenes (vpulab/Semantic-Aware-Scene-Recognition)",
        ),
        ModelInfo(
            name="centerpixel", filename=None, url=None, sha256=None, input_size=227, resize_size=227,
            mean=(0.0,), std=(1.0,), channels=1, num_classes=256, builder=centerpixel.centerpixel,
            description="toy model: the class is the center pixel's intensity 0..255 (closed-form weights)",
        ),
    ]
}


def names() -> tuple[str, ...]:
    """The names :func:`get` accepts."""
    return tuple(_REGISTRY)


def info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a zoo model; :class:`~fastig.errors.UnknownNameError` for an unknown name."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownNameError(f"unknown model {name!r}; known models: {', '.join(names())}") from None


def checkpoint_path(name: str) -> Path | None:
    """Where ``weights="auto"`` looks for the model's weight file (None for a model that needs none)."""
    filename = info(name).filename
    return None if filename is None else checkpoint_dir() / filename


def get(name: str, weights: str | os.PathLike = "auto", device: str | torch.device | None = None,
        nonfinite: str = "warn") -> nn.Module:
    """Build a zoo model, load its weights, and return it in eval mode (on ``device`` if given).

    ``weights``: ``"auto"`` loads the model's file from :func:`checkpoint_dir` and raises a
    :class:`~fastig.errors.CheckpointError` naming the file and its source URL when it is not there; ``"none"``
    keeps the random initialization (deterministic under ``torch.manual_seed``; for smoke tests); anything else
    is the path of a weight file. The center-pixel model needs no file: its weights are computed in closed form
    for both ``"auto"`` and ``"none"``.

    GoogLeNet is built with its auxiliary heads (torchvision's file holds them) and returned without them, as
    torchvision does when ``aux_logits`` is not requested; it keeps ``transform_input=True``, so every ImageNet
    model takes the same ImageNet-normalized input.

    ``nonfinite``: a weight file holding NaN or infinite values is loaded with a warning (``"warn"``) or refused
    (``"refuse"``, as dataset runs and the CLI do).
    """
    spec = info(name)
    model = spec.builder()
    if isinstance(weights, str) and weights == "auto":
        if spec.filename is not None:
            path = checkpoint_dir() / spec.filename
            if not path.exists():
                raise CheckpointError(
                    f"model {name!r} needs its weight file {spec.filename!r} in {checkpoint_dir()} (set "
                    f"FASTIG_CHECKPOINTS to use another folder); download it from {spec.url}"
                )
            _load(model, path, spec.sha256, nonfinite)
    elif isinstance(weights, str) and weights == "none":
        pass
    elif isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        if not path.exists():
            raise CheckpointError(
                f"weights={str(weights)!r}: no such file (weights is 'auto', 'none' or the path of a weight file)"
            )
        _load(model, path, spec.sha256 if path.name == spec.filename else None, nonfinite)
    else:
        raise TypeError(f"weights must be 'auto', 'none' or a path, got {type(weights).__name__}")
    if isinstance(model, GoogLeNet):
        model.drop_aux_heads()
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _load(model: nn.Module, path: Path, sha256: str | None, nonfinite: str) -> None:
    state_dict = read_verified(path, sha256)
    if isinstance(model, GoogLeNet) and not any(k.startswith(("aux1.", "aux2.")) for k in state_dict):
        model.drop_aux_heads()  # a file saved from the zoo model (torchvision's own file holds the aux heads)
    apply_state_dict(model, state_dict, path, nonfinite)
