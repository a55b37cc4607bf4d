"""The model zoo: torchvision-compatible ImageNet classifiers, a Places365 scene classifier and the center-pixel
toy model, behind one registry.

>>> model = fastig.models.get("resnet50")            # weights from checkpoints/resnet50-0676ba61.pth
>>> model = fastig.models.get("resnet50", weights="none")   # random initialization (smoke tests)
>>> fastig.models.info("resnet50").mean               # how its inputs are normalized

``weights="auto"`` reads the file named by :func:`info` from :func:`checkpoint_dir` (``$FASTIG_CHECKPOINTS`` or
``checkpoints/`` at the repository root); when it is not there it is downloaded from the official URL (checked,
see :mod:`fastig.models.download`), unless ``FASTIG_OFFLINE=1``: then, or when the download fails, a
:class:`~fastig.errors.CheckpointError` names the file and where to get it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fastig.errors import CheckpointError, UnknownNameError
from fastig.io.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401  (also fastig.models.IMAGENET_*)
from fastig.models import alexnet, centerpixel, googlenet, resnet, vgg  # architecture modules
from fastig.models.checkpoints import (
    apply_state_dict,
    checkpoint_dir,
    file_sha256,
    hash_prefix_from_name,
    load_checkpoint,
    read_verified,
)
from fastig.models.googlenet import GoogLeNet

__all__ = ["ModelInfo", "get", "names", "info", "checkpoint_dir", "checkpoint_path", "load_checkpoint",
           "weights_identity"]

TORCHVISION_URL = "https://download.pytorch.org/models/"


@dataclass(frozen=True)
class ModelInfo:
    """What a zoo model needs: its weight file and how its inputs are prepared.

    ``filename``/``url``: the weight file expected under :func:`checkpoint_dir` and where to download it (None
    for models that need no file). ``sha256``: the file's sha256 digest or a prefix of it (torchvision's
    file names carry its first 8 hex digits), checked on loading; None when unknown. Inputs are resized so the
    short side is ``resize_size`` (or, when it is a ``(height, width)`` pair, to exactly that size: the Places365
    scene classifier sees whole scenes squashed to 256x256, see :mod:`fastig.io.places365`), center-cropped to
    ``input_size`` x ``input_size``, scaled to [0, 1] and
    normalized per channel as ``(x - mean) / std`` (identity for the center-pixel model). ``builder()`` returns
    the architecture, randomly initialized, exactly as its weight file expects it.
    """

    name: str
    filename: str | None
    url: str | None
    sha256: str | None
    input_size: int
    resize_size: int | tuple[int, int]
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
            sha256=None, input_size=224, resize_size=(256, 256), mean=IMAGENET_MEAN, std=IMAGENET_STD, channels=3,
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
        seed: int | None = None, nonfinite: str = "warn") -> nn.Module:
    """Build a zoo model, load its weights, and return it in eval mode (on ``device`` if given).

    ``weights``: ``"auto"`` loads the model's file from :func:`checkpoint_dir`, downloading it first when it is
    not there (unless ``FASTIG_OFFLINE=1``), and raises a :class:`~fastig.errors.CheckpointError` naming the file
    and its source URL when it cannot be had; ``"none"`` keeps the random initialization (deterministic under
    ``torch.manual_seed``; for smoke tests); anything else is the path of a weight file. The center-pixel model
    needs no file: its weights are computed in closed form for both ``"auto"`` and ``"none"``.

    ``seed``: the random initialization is drawn from a generator seeded with it (torch's global generator is
    left as it was), so ``weights="none"`` gives the same model in every process; None draws it from torch's
    global generator (deterministic under ``torch.manual_seed``).

    GoogLeNet is built with its auxiliary heads (torchvision's file holds them) and returned without them, as
    torchvision does when ``aux_logits`` is not requested; it keeps ``transform_input=True``, so every ImageNet
    model takes the same ImageNet-normalized input.

    ``nonfinite``: a weight file holding NaN or infinite values is loaded with a warning (``"warn"``) or refused
    (``"refuse"``, as dataset runs and the CLI do).
    """
    spec = info(name)
    if seed is None:
        model = spec.builder()
    else:
        _check_seed(seed)
        with torch.random.fork_rng(devices=[]):  # the builder initializes on the CPU
            torch.manual_seed(seed)
            model = spec.builder()
    if isinstance(weights, str) and weights == "auto":
        if spec.filename is not None:
            _load(model, _auto_file(spec), spec.sha256, nonfinite)
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


def weights_identity(name: str, weights: str | os.PathLike = "auto", seed: int | None = None) -> str:
    """What decides the numbers of ``get(name, weights, seed=seed)``: ``"sha256:<hex>"`` of the weight file,
    ``"random:<seed>"`` for ``weights="none"``, ``"closed-form"`` for a model whose weights need no file.

    Reads the whole file once (about 0.3 s per 100 MB); raises like :func:`get` when the file is missing.
    """
    spec = info(name)
    if isinstance(weights, str) and weights in ("auto", "none") and spec.filename is None:
        return "closed-form"
    if isinstance(weights, str) and weights == "none":
        if seed is None:
            raise ValueError("weights='none' draws the model at random: give a seed to identify it")
        _check_seed(seed)
        return f"random:{seed}"
    if isinstance(weights, str) and weights == "auto":
        path = _auto_file(spec)
    elif isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        if not path.is_file():
            raise CheckpointError(f"weights={str(weights)!r}: no such file (weights is 'auto', 'none' or the path of "
                                  "a weight file)")
    else:
        raise TypeError(f"weights must be 'auto', 'none' or a path, got {type(weights).__name__}")
    return "sha256:" + file_sha256(path)


def _auto_file(spec: ModelInfo) -> Path:
    """The weight file ``weights="auto"`` loads, downloaded first when it is missing and downloads are allowed;
    CheckpointError naming it and its source when it cannot be had."""
    from fastig.models.download import ensure

    return ensure(spec.name, checkpoint_dir() / spec.filename, spec.url, spec.sha256)


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def _load(model: nn.Module, path: Path, sha256: str | None, nonfinite: str) -> None:
    state_dict = read_verified(path, sha256)
    if isinstance(model, GoogLeNet) and not any(k.startswith(("aux1.", "aux2.")) for k in state_dict):
        model.drop_aux_heads()  # a file saved from the zoo model (torchvision's own file holds the aux heads)
    apply_state_dict(model, state_dict, path, nonfinite)
