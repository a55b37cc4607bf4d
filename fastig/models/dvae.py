"""The DALL-E discrete VAE (dVAE): encoder, decoder and a safe loader for OpenAI's weight files.

The architecture is OpenAI's (github.com/openai/DALL-E, ``dall_e/encoder.py``, ``decoder.py``, ``utils.py``), with
the same module names, so a state_dict of fastig's modules has exactly the keys of OpenAI's modules:

- :class:`Encoder`: 7x7 input conv 3 -> n_hid, four groups of ``n_blk_per_group`` residual blocks with widths
  n_hid, 2 n_hid, 4 n_hid, 8 n_hid and 2x2 max-pooling after the first three groups, then ReLU and a 1x1 conv to
  ``vocab_size`` logits. An image [N, 3, H, W] (H and W divisible by 8) gives logits [N, 8192, H/8, W/8].
- :class:`Decoder`: 1x1 conv vocab_size -> n_init (the *embedding*, linear in the codes), four groups of residual
  blocks with widths 8 n_hid, 4 n_hid, 2 n_hid, n_hid and nearest 2x upsampling after the first three, then ReLU
  and a 1x1 conv to 2 x output_channels: the logit-Laplace means (first half) and log-scales (second half).
- Residual blocks: ``id_path(x) + post_gain * res_path(x)``, post_gain = 1 / (4 * n_blk_per_group)^2.
- :func:`map_pixels` / :func:`unmap_pixels`: the affine map [0, 1] <-> [0.1, 0.9] (eps 0.1) around the dVAE.
- :class:`DVAEImageSpace`: the classifier's (normalized) inputs <-> the dVAE's latents, the two conversions of
  latent IG's path (:class:`fastig.core.paths.LatentPath`).

Full size (the defaults): 53,786,240 encoder and 43,829,766 decoder parameters. OpenAI's convolutions cast to
float16 on CUDA; fastig's compute in the dtype of their input (weights are cast to it when they differ).

Weight files
------------
:func:`load_encoder` / :func:`load_decoder` accept either OpenAI's ``encoder.pkl`` / ``decoder.pkl`` or the plain
state_dict files written by :func:`convert` (``fastig convert-dvae``): ``dvae_encoder.pt`` and ``dvae_decoder.pt``
(:data:`ENCODER_FILE`, :data:`DECODER_FILE`), float32 ``{name: tensor}`` dicts that ``torch.load(path,
weights_only=True)`` reads and ``Encoder().load_state_dict`` accepts. The kind of file is detected from its content.

Safety model of the loader
--------------------------
OpenAI's files are whole pickled ``nn.Module`` objects of the ``dall_e`` package. ``torch.load(weights_only=False)``
would import ``dall_e`` and call whatever the pickle names, so a tampered file could run arbitrary code. fastig
reads them without the ``dall_e`` package and without calling anything the file chooses:

1. *Container.* fastig reads the torch.save container itself (``zipfile`` for the zip format, a few lines for the
   legacy format); ``torch.load`` is never called on these files, so nothing can dispatch to TorchScript or tar
   handling, and environment variables that change ``torch.load`` do not apply.
2. *Unpickling.* A ``pickle.Unpickler`` whose ``find_class`` -- the only way a pickle can reach a callable --
   admits a fixed allow-list (:data:`ALLOWED_GLOBALS`) and maps every entry onto something inert:

   - the five ``dall_e`` classes and the five ``torch.nn`` layer classes the dVAE uses become :class:`_Record`
     objects that only keep the class name and the pickled ``__dict__``; neither dall_e's nor torch's code runs;
   - ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` become fastig's own functions that view bytes
     read from the file (bounds-checked); ``torch.*Storage`` names become dtype markers;
   - ``collections.OrderedDict``, ``builtins.set`` and ``torch.device`` (kept as a string) complete the list.

   Any other global -- ``os.system``, ``builtins.eval``, ``torch.nn.Linear``, an unknown ``dall_e`` class -- raises
   :class:`~fastig.errors.CheckpointError` naming it when the unpickler meets the reference, before anything could
   call it. Persistent ids other than tensor storages are refused the same way.
3. *Structure.* The records are then checked against fastig's own module tree: the class at every path, parameter
   names and shapes, the hyper-parameters the original forward uses (conv sizes, pooling, upsampling, post-gain).
   Only then are the tensors copied into a fresh :class:`Encoder` / :class:`Decoder`.

Missing, truncated, corrupt or mismatched files raise :class:`~fastig.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import struct
import tempfile
import time
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastig.errors import CheckpointError, check_int

__all__ = [
    "Encoder",
    "Decoder",
    "EncoderBlock",
    "DecoderBlock",
    "Conv2d",
    "map_pixels",
    "unmap_pixels",
    "soft_codes",
    "hard_codes",
    "load_encoder",
    "load_decoder",
    "convert",
    "ENCODER_FILE",
    "DECODER_FILE",
    "LOGIT_LAPLACE_EPS",
    "DVAEImageSpace",
    "LATENTS",
]

LOGIT_LAPLACE_EPS = 0.1
ENCODER_FILE = "dvae_encoder.pt"
DECODER_FILE = "dvae_decoder.pt"
GROUP_COUNT = 4  # OpenAI's architecture has exactly four groups (its group_count is a class constant)
# The most a dVAE file may declare, checked before anything is read or allocated: the tensor bytes of the larger
# full-size model (the encoder, 53,786,240 parameters; the decoder holds 175 MB in float32) even in float64, and
# its pickled module structure (~100 modules: tens of kB).
MAX_STORAGE_BYTES = 8 * 53_786_240
MAX_PICKLE_BYTES = 16 << 20


# ----------------------------------------------------------------------------------------------------------------
# Pixels and codes
# ----------------------------------------------------------------------------------------------------------------


def _check_float(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """Map pixels in [0, 1] to the dVAE's input range [eps, 1 - eps], eps = 0.1."""
    _check_float(x, "map_pixels input")
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to [0, 1]."""
    _check_float(x, "unmap_pixels input")
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


def soft_codes(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Encoder logits [N, V, h, w] -> code probabilities (softmax over the vocabulary, dim 1)."""
    _check_float(logits, "logits")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return torch.softmax(logits / temperature, dim=1)


def hard_codes(logits: torch.Tensor) -> torch.Tensor:
    """Encoder logits [N, V, h, w] -> one-hot codes of the argmax token, in the logits' dtype (OpenAI's usage)."""
    _check_float(logits, "logits")
    if logits.dim() != 4:
        raise ValueError(f"logits must be 4-D [N, V, h, w], got shape {tuple(logits.shape)}")
    tokens = logits.argmax(dim=1)
    return F.one_hot(tokens, num_classes=logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Modules (names and attributes follow OpenAI's, so state_dict keys coincide)
# ----------------------------------------------------------------------------------------------------------------


class Conv2d(nn.Module):
    """OpenAI's convolution: weight ``w`` [n_out, n_in, kw, kw], bias ``b``, 'same' padding, odd kw.

    Computes in the dtype of its input (OpenAI's casts to float16 on CUDA and to float32 otherwise).
    """

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        if n_in < 1 or n_out < 1 or kw < 1 or kw % 2 == 0:
            raise ValueError(f"Conv2d needs n_in, n_out >= 1 and an odd kw, got {n_in}, {n_out}, {kw}")
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        w = torch.empty(n_out, n_in, kw, kw)
        if not w.is_meta:  # (normal_ under a meta-device context would import torch._dynamo: seconds)
            w.normal_(std=1 / math.sqrt(n_in * kw**2))
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.w, self.b
        if w.dtype != x.dtype:
            w, b = w.to(x.dtype), b.to(x.dtype)
        return F.conv2d(x, w, b, padding=(self.kw - 1) // 2)


class _ResidualBlock(nn.Module):
    """``id_path(x) + post_gain * res_path(x)``; res_path = 4 x (ReLU, conv) with a bottleneck of n_out / 4."""

    kernel_widths: tuple[int, int, int, int]

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        if n_out % 4 != 0:
            raise ValueError(f"{type(self).__name__} needs n_out divisible by 4, got {n_out}")
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.n_hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, self.n_hid, self.n_hid, self.n_hid, n_out]
        layers = []
        for i, kw in enumerate(self.kernel_widths):
            layers.append((f"relu_{i + 1}", nn.ReLU()))
            layers.append((f"conv_{i + 1}", Conv2d(widths[i], widths[i + 1], kw)))
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class EncoderBlock(_ResidualBlock):
    """Encoder residual block: 3x3, 3x3, 3x3, 1x1 convolutions."""

    kernel_widths = (3, 3, 3, 1)


class DecoderBlock(_ResidualBlock):
    """Decoder residual block: 1x1, 3x3, 3x3, 3x3 convolutions."""

    kernel_widths = (1, 3, 3, 3)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        check_int(name, value)


def _check_image_batch(x: torch.Tensor, channels: int, what: str) -> None:
    _check_float(x, what)
    if x.dim() != 4:
        raise ValueError(f"{what} must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{what} has {x.shape[1]} channels but the model was built for {channels}")


class Encoder(nn.Module):
    """DALL-E dVAE encoder: images [N, C, H, W] (mapped with :func:`map_pixels`) -> logits [N, V, H/8, W/8].

    Defaults are the full-size model; the widths are configurable (``n_hid`` divisible by 4) for small tests.
    """

    group_count = GROUP_COUNT

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, input_channels: int = 3,
                 vocab_size: int = 8192):
        super().__init__()
        _check_positive(n_hid=n_hid, n_blk_per_group=n_blk_per_group, input_channels=input_channels,
                        vocab_size=vocab_size)
        self.n_hid, self.n_blk_per_group = n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        n_layers = GROUP_COUNT * n_blk_per_group
        widths = [n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]

        stages = [("input", Conv2d(input_channels, n_hid, 7))]
        n_in = n_hid
        for g, width in enumerate(widths):
            group = [(f"block_{i + 1}", EncoderBlock(n_in if i == 0 else width, width, n_layers))
                     for i in range(n_blk_per_group)]
            if g < GROUP_COUNT - 1:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            stages.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
            n_in = width
        stages.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()),
            ("conv", Conv2d(8 * n_hid, vocab_size, 1)),
        ]))))
        self.blocks = nn.Sequential(OrderedDict(stages))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image_batch(x, self.input_channels, "Encoder input")
        if x.shape[2] % 8 or x.shape[3] % 8:
            raise ValueError(f"Encoder input height and width must be divisible by 8, got {tuple(x.shape[2:])}")
        return self.blocks(x)


class Decoder(nn.Module):
    """DALL-E dVAE decoder: codes [N, V, h, w] (one-hot or soft) -> statistics [N, 2 C, 8 h, 8 w].

    ``forward(codes) == from_embedding(embed(codes))``. :meth:`embed` is the first 1x1 convolution, linear (affine)
    in the codes, so interpolating soft codes is interpolating in this n_init-channel embedding space.
    :meth:`to_image` turns statistics into an image in [0, 1]; :meth:`reconstruct` does both steps.
    """

    group_count = GROUP_COUNT

    def __init__(self, n_init: int = 128, n_hid: int = 256, n_blk_per_group: int = 2, output_channels: int = 3,
                 vocab_size: int = 8192):
        super().__init__()
        _check_positive(n_init=n_init, n_hid=n_hid, n_blk_per_group=n_blk_per_group,
                        output_channels=output_channels, vocab_size=vocab_size)
        self.n_init, self.n_hid, self.n_blk_per_group = n_init, n_hid, n_blk_per_group
        self.output_channels, self.vocab_size = output_channels, vocab_size
        n_layers = GROUP_COUNT * n_blk_per_group
        widths = [8 * n_hid, 4 * n_hid, 2 * n_hid, n_hid]

        stages = [("input", Conv2d(vocab_size, n_init, 1))]
        n_in = n_init
        for g, width in enumerate(widths):
            group = [(f"block_{i + 1}", DecoderBlock(n_in if i == 0 else width, width, n_layers))
                     for i in range(n_blk_per_group)]
            if g < GROUP_COUNT - 1:
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            stages.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
            n_in = width
        stages.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()),
            ("conv", Conv2d(n_hid, 2 * output_channels, 1)),
        ]))))
        self.blocks = nn.Sequential(OrderedDict(stages))

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [N, V, h, w] -> embedding [N, n_init, h, w] (the first, affine, 1x1 convolution)."""
        _check_image_batch(codes, self.vocab_size, "Decoder codes")
        return self.blocks.input(codes)

    def from_embedding(self, z: torch.Tensor) -> torch.Tensor:
        """Embedding [N, n_init, h, w] -> statistics [N, 2 C, 8 h, 8 w] (everything after :meth:`embed`)."""
        _check_image_batch(z, self.n_init, "Decoder embedding")
        for name, stage in self.blocks.named_children():
            if name != "input":
                z = stage(z)
        return z

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.from_embedding(self.embed(codes))

    def to_image(self, stats: torch.Tensor) -> torch.Tensor:
        """Statistics -> image in [0, 1]: ``unmap_pixels(sigmoid(means))``, as in OpenAI's usage notebook."""
        return unmap_pixels(torch.sigmoid(stats[:, : self.output_channels]))

    def reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes -> image in [0, 1]."""
        return self.to_image(self(codes))


# ----------------------------------------------------------------------------------------------------------------
# The classifier's input space <-> the dVAE's latents (latent IG's path, fastig.core.paths.LatentPath, reads them)
# ----------------------------------------------------------------------------------------------------------------

LATENTS = ("embedding", "probs", "logits")
# on the CPU, the decoder's passes hold at most this many bytes in their largest activation (n_hid channels at
# full resolution: 51 MB per 224x224 image for OpenAI's model, so 5 images per pass); on CUDA one pass decodes all
# the points of an engine batch (the engine halves its batches when the device runs out of memory)
DECODER_CPU_BYTES = 256 << 20


def resize_images(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of [N, C, H, W] images to ``size`` (antialiased when shrinking); unchanged if already there."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


class DVAEImageSpace:
    """The two conversions between the classifier's input space and a latent space of the DALL-E dVAE.

    ``encode(x)``: classifier inputs [n, 3, H, W] (normalized as ``(pixels - mean) / std``) -> unnormalized and
    clamped to [0, 1] -> resized to the dVAE's size -> :func:`map_pixels` -> encoder logits
    -> the chosen latent. ``decode(z, size)``: latent -> decoder -> image in [0, 1] (``Decoder.to_image``) ->
    resized to ``size`` -> normalized again. Both run without gradients: the path's points are constants to the
    classifier, whose gradient is taken at each of them.

    ``latent`` picks what is interpolated:

    - ``"embedding"`` (default): the decoder's first 1x1 convolution applied to the soft codes (softmax of the
      logits), [n, 128, h, w] for OpenAI's model. That convolution is affine, so lerp here gives exactly the same
      path as lerp of the soft codes, at 1/64 of the size (128 channels instead of 8192: less memory per step,
      and the decoder's widest layer runs twice per image instead of once per path point); slerp here follows the
      great circle in the space the rest of the decoder actually reads.
    - ``"probs"``: the soft codes themselves, [n, 8192, h, w] (slerp of probability vectors leaves the simplex).
    - ``"logits"``: the encoder's logits; every point is decoded from their softmax, so even lerp bends through
      the softmax.

    ``size``: the (H, W) the dVAE sees; None rounds the classifier's H and W up to multiples of 8 (224 stays
    224). OpenAI's dVAE was trained at 256. Time spent in the encoder and decoder is added to ``seconds``
    (synchronized on CUDA); ``decoder_passes`` and ``decoded_images`` count the decoder's calls and images.
    """

    def __init__(self, encoder, decoder, mean: Sequence[float], std: Sequence[float], latent: str = "embedding",
                 size: tuple[int, int] | None = None):
        if latent not in LATENTS:
            raise ValueError(f"latent must be one of {', '.join(map(repr, LATENTS))}, got {latent!r}")
        if size is not None and (len(size) != 2 or any(s < 8 or s % 8 for s in size)):
            raise ValueError(f"the dVAE's image size must be a positive multiple of 8 per side, got {tuple(size)}")
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need one entry per channel and std > 0, got mean {mean}, std {std}")
        self.encoder, self.decoder = encoder, decoder
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.latent, self.size = latent, size
        self.seconds = {"encoder": 0.0, "decoder": 0.0}
        self.decoder_passes = 0
        self.decoded_images = 0

    def dvae_size(self, classifier_size: tuple[int, int]) -> tuple[int, int]:
        return self.size if self.size is not None else tuple(-(-int(s) // 8) * 8 for s in classifier_size)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, len(self.mean), 1, 1)
        if x.shape[1] != len(self.mean):
            raise ValueError(f"the images have {x.shape[1]} channels but mean/std have {len(self.mean)} entries")
        return (torch.tensor(self.mean, dtype=x.dtype, device=x.device).reshape(shape),
                torch.tensor(self.std, dtype=x.dtype, device=x.device).reshape(shape))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        started = _clock(x.device)
        mean, std = self._stats(x)
        pixels = resize_images((x * std + mean).clamp(0, 1), self.dvae_size(x.shape[-2:]))
        logits = self.encoder(map_pixels(pixels))
        if self.latent == "logits":
            z = logits
        else:
            z = soft_codes(logits)
            if self.latent == "embedding":
                z = self.decoder.embed(z)
        self.seconds["encoder"] += _clock(x.device) - started
        return z

    @torch.no_grad()
    def decode(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Latents [N, ...] -> classifier inputs [N, C, size]: one decoder pass (on the CPU, passes of at most
        :data:`DECODER_CPU_BYTES` of the decoder's largest activation each)."""
        started = _clock(z.device)
        per_pass = z.shape[0]
        if z.device.type == "cpu":  # full-resolution activations are ~100x an image: bound the memory per pass
            largest = self.decoder.n_hid * 64 * z.shape[-2] * z.shape[-1] * z.element_size()
            per_pass = max(1, DECODER_CPU_BYTES // largest)
        parts = []
        for chunk in z.split(per_pass):
            if self.latent == "embedding":
                stats = self.decoder.from_embedding(chunk)
            else:
                stats = self.decoder(soft_codes(chunk) if self.latent == "logits" else chunk)
            parts.append(resize_images(self.decoder.to_image(stats), size))
            self.decoder_passes += 1
        pixels = torch.cat(parts)
        mean, std = self._stats(pixels)
        x = (pixels - mean) / std
        self.seconds["decoder"] += _clock(z.device) - started
        self.decoded_images += z.shape[0]
        return x


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------------------------
# Restricted unpickling (see "Safety model" in the module docstring)
# ----------------------------------------------------------------------------------------------------------------


class _Refused(Exception):
    """Raised inside the unpickler; turned into a CheckpointError naming the file."""


class _Record:
    """Inert stand-in for a pickled module: the class name the pickle used and the state it carried."""

    pickled_name = ""
    state: dict = {}  # replaced by the pickled state; stays empty if the pickle never gives one

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise _Refused(f"{self.pickled_name} carries a {type(state).__name__} state, expected a dict")
        self.state = state

    def __repr__(self) -> str:
        return f"<record of {self.pickled_name}>"


_RECORD_NAMES = [
    "dall_e.encoder.Encoder",
    "dall_e.encoder.EncoderBlock",
    "dall_e.decoder.Decoder",
    "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.upsampling.Upsample",
    "torch.nn.modules.linear.Identity",
]
_RECORD_CLASSES = {name: type("_Record", (_Record,), {"pickled_name": name}) for name in _RECORD_NAMES}

# The class OpenAI's pickle must hold at each place of fastig's tree, and the attributes that must agree there.
_PICKLED_NAME = {
    Encoder: "dall_e.encoder.Encoder",
    EncoderBlock: "dall_e.encoder.EncoderBlock",
    Decoder: "dall_e.decoder.Decoder",
    DecoderBlock: "dall_e.decoder.DecoderBlock",
    Conv2d: "dall_e.utils.Conv2d",
    nn.Sequential: "torch.nn.modules.container.Sequential",
    nn.ReLU: "torch.nn.modules.activation.ReLU",
    nn.MaxPool2d: "torch.nn.modules.pooling.MaxPool2d",
    nn.Upsample: "torch.nn.modules.upsampling.Upsample",
    nn.Identity: "torch.nn.modules.linear.Identity",
}
_SETTINGS = {
    Encoder: ("n_hid", "n_blk_per_group", "input_channels", "vocab_size"),
    Decoder: ("n_init", "n_hid", "n_blk_per_group", "output_channels", "vocab_size"),
    EncoderBlock: ("n_in", "n_out", "n_hid", "n_layers", "post_gain"),
    DecoderBlock: ("n_in", "n_out", "n_hid", "n_layers", "post_gain"),
    Conv2d: ("n_in", "n_out", "kw"),
    nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"),
    nn.Upsample: ("size", "scale_factor", "mode", "align_corners"),
    nn.ReLU: ("inplace",),
}


class _StorageType:
    """Marker for a ``torch.<Type>Storage`` name in a pickle: only its dtype is used."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}


class _Storage:
    """A tensor storage read from the file, as a flat tensor; the only thing :func:`_rebuild_tensor` accepts."""

    __slots__ = ("flat",)

    def __init__(self, flat: torch.Tensor):
        self.flat = flat


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None):
    """fastig's replacement for torch._utils._rebuild_tensor_v2: a bounds-checked view of a storage read here."""
    if not isinstance(storage, _Storage):
        raise _Refused("a tensor refers to something other than a storage of the file")
    storage = storage.flat
    if metadata:
        raise _Refused("tensors with extra metadata (conjugate/negative bits) are not part of a dVAE file")
    ints = (storage_offset, *size, *stride)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints) or len(size) != len(stride):
        raise _Refused(f"bad tensor geometry: offset {storage_offset!r}, size {size!r}, stride {stride!r}")
    if all(size):  # an empty tensor reads nothing
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel():
            raise _Refused(f"tensor of size {tuple(size)} reaches past the end of its storage")
    if math.prod(size) > storage.numel():  # saved weights never repeat elements; this bounds memory use
        raise _Refused(f"tensor of size {tuple(size)} is larger than its storage")
    return storage.as_strided(tuple(size), tuple(stride), storage_offset)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """fastig's replacement for torch._utils._rebuild_parameter: just the tensor."""
    if not isinstance(data, torch.Tensor):
        raise _Refused("a parameter does not hold a tensor")
    return data


def _device_name(kind, index=None) -> str:
    """Stands in for torch.device in pickles: kept as text, never used (fastig loads to the CPU)."""
    return f"{kind}:{index}" if index is not None else str(kind)


ALLOWED_GLOBALS = {
    **_RECORD_CLASSES,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "torch.device": _device_name,
    **{f"{module}.{name}": _StorageType(dtype) for module in ("torch", "torch.cuda")
       for name, dtype in _STORAGE_DTYPES.items()},
}
"""Every global a dVAE file may reference, mapped onto the inert object fastig uses in its place."""


class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_GLOBALS` and tensor-storage persistent ids, and sets the state
    (BUILD) only of objects this load created that carry one: module records and OrderedDicts.

    BUILD is the one opcode that writes attributes. On the allow-listed objects themselves (the shared storage
    markers, a record class, a stand-in function's ``__defaults__``) it would change this module for every later
    load, and on a tensor it runs ``Tensor.__setstate__``, whose ``set_`` resizes storage to any size; so it is
    refused on anything else. Python's own unpickler class is used because the C one offers no hook per opcode.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, load_storage):
        super().__init__(file, encoding="utf-8")
        self._load_storage = load_storage

    def load_build(self):
        target = self.stack[-2]  # the state is on top, the object below it
        if not (isinstance(target, _Record) or type(target) is OrderedDict):
            what = f"the class {target.__qualname__}" if isinstance(target, type) else f"a {type(target).__name__}"
            raise _Refused(f"the pickle sets the state of {what}, which a dVAE file never does")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module, name):
        module = "builtins" if module == "__builtin__" else module  # protocol-2 pickles use Python 2's name
        qualified = f"{module}.{name}"
        if qualified not in ALLOWED_GLOBALS:
            raise _Refused(f"the pickle references {qualified}, which is not part of the DALL-E dVAE")
        return ALLOWED_GLOBALS[qualified]

    def persistent_load(self, pid):
        kind = pid[0] if isinstance(pid, tuple) and pid else None
        if kind in ("module", b"module") and len(pid) == 4:
            # The legacy format names each module class as ('module', class, source file, source code).
            # The class already went through find_class; the source text is ignored.
            if not (isinstance(pid[1], type) and issubclass(pid[1], _Record)):
                raise _Refused("a legacy module reference to something other than a dVAE module class")
            return pid[1]
        if kind not in ("storage", b"storage") or len(pid) < 5:
            raise _Refused(f"the pickle asks for an unknown persistent object of kind {kind!r:.40}")
        if self._load_storage is None:
            raise _Refused("tensor storage inside a metadata pickle")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(storage_type, _StorageType):
            raise _Refused("a storage reference without a storage type")
        if not isinstance(numel, int) or numel < 0:
            raise _Refused(f"bad storage size {numel!r}")
        if len(pid) > 5 and pid[5] is not None:
            raise _Refused("storage views (files from torch < 0.4) are not supported")
        return self._load_storage(str(key), storage_type.dtype, numel)


def _unpickle(file, load_storage=None):
    return _RestrictedUnpickler(file, load_storage).load()


def _read_zip(archive: zipfile.ZipFile):
    """torch.save's zip format: <prefix>/data.pkl and one raw little-endian record <prefix>/data/<key> per storage.

    The sizes the archive declares are bounded before any record is inflated: a small zip can declare gigabytes
    (zipfile never hands out more than a record's declared size, so the bounds hold)."""
    pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise CheckpointError("not a torch.save archive (no single <prefix>/data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    names = set(archive.namelist())
    declared = {info.filename: info.file_size for info in archive.infolist()}
    if declared[pickles[0]] > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{pickles[0]} declares {declared[pickles[0]]:,} bytes, more than the "
                              f"{MAX_PICKLE_BYTES:,} a dVAE's pickled structure needs")
    records = sum(size for name, size in declared.items() if name.startswith(prefix + "data/"))
    if records > MAX_STORAGE_BYTES:
        raise CheckpointError(f"its tensor records declare {records:,} bytes, more than the {MAX_STORAGE_BYTES:,} "
                              "of the largest dVAE (the full-size encoder in float64)")
    if prefix + "byteorder" in names and archive.read(prefix + "byteorder").strip() != b"little":
        raise CheckpointError("big-endian torch.save archives are not supported")
    storages = {}
    budget = _StorageBudget()

    def load_storage(key, dtype, numel):
        if key not in storages:
            record = f"{prefix}data/{key}"
            if record not in names:
                raise _Refused(f"storage record {record} is missing")
            budget.take(key, numel * dtype.itemsize)
            if declared[record] != numel * dtype.itemsize:
                raise _Refused(f"storage record {record} has the wrong size")
            storages[key] = _Storage(_read_into_tensor(archive.open(record), dtype, numel))
        return storages[key]

    return _unpickle(io.BytesIO(archive.read(pickles[0])), load_storage)


class _StorageBudget:
    """The bytes the storages of one file declare, refused past MAX_STORAGE_BYTES before any is allocated."""

    def __init__(self):
        self.total = 0

    def take(self, key, nbytes: int) -> None:
        self.total += nbytes
        if self.total > MAX_STORAGE_BYTES:
            raise CheckpointError(f"storage {key} declares {nbytes:,} bytes, more than the {MAX_STORAGE_BYTES:,} "
                                  "of the largest dVAE (the full-size encoder in float64) with the storages before it")


def _read_into_tensor(f, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The next numel elements of f as a 1-D tensor (read straight into its buffer, no extra copy)."""
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    raw = torch.empty(numel * dtype.itemsize, dtype=torch.uint8)
    if f.readinto(raw.numpy()) != raw.numel():
        raise CheckpointError("a tensor storage is truncated")
    return raw.view(dtype)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _read_legacy(f):
    """torch.save's legacy format: magic, protocol, sys-info and object pickles, the storage-key list, then each
    storage as an int64 element count followed by its raw little-endian bytes, in the key list's order."""
    if _unpickle(f) != _LEGACY_MAGIC:
        raise CheckpointError("not a torch.save file (neither the zip nor the legacy format)")
    if _unpickle(f) != _LEGACY_PROTOCOL:
        raise CheckpointError("unknown legacy torch.save protocol version")
    sys_info = _unpickle(f)
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise CheckpointError("big-endian torch.save files are not supported")
    storages = {}
    budget = _StorageBudget()

    def load_storage(key, dtype, numel):
        if key not in storages:
            budget.take(key, numel * dtype.itemsize)
            storages[key] = _Storage(torch.empty(numel, dtype=dtype))  # filled below, after the object pickle
        return storages[key]

    result = _unpickle(f, load_storage)
    keys = _unpickle(f)
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
        raise CheckpointError("the storage key list does not match the tensors in the file")
    for key in map(str, keys):
        storage = storages[key].flat
        header = f.read(8)
        if len(header) != 8 or struct.unpack("<q", header)[0] != storage.numel():
            raise CheckpointError(f"storage {key} has a wrong size header")
        storage.copy_(_read_into_tensor(f, storage.dtype, storage.numel()))
    return result


def _read_file(path: Path):
    """Unpickle a torch.save file (zip or legacy) with the restricted unpickler; errors name the file."""
    if not path.is_file():
        raise CheckpointError(f"dVAE weight file not found: {path}")
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's zip format starts with a local file header
            f.seek(0)
            if is_zip:
                with zipfile.ZipFile(f) as archive:
                    return _read_zip(archive)
            return _read_legacy(f)
    except _Refused as e:
        raise CheckpointError(f"refused to load {path}: {e}. Only the DALL-E dVAE classes and tensor data are "
                              "allowed in a dVAE weight file; nothing in it was run.") from None
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # truncated or corrupt data surfaces as many exception types
        raise CheckpointError(f"{path} is corrupt or not a dVAE weight file ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------------------------
# From what was read to fastig's modules
# ----------------------------------------------------------------------------------------------------------------


def _collect_tensors(record: _Record, prefix: str, out: dict) -> None:
    """Walk a record tree like nn.Module.state_dict: parameters, then buffers, then children."""
    state = record.state
    for group in ("_parameters", "_buffers"):
        for name, tensor in state.get(group, {}).items():
            if tensor is not None:
                if not isinstance(tensor, torch.Tensor):
                    raise CheckpointError(f"{prefix}{name} is a {type(tensor).__name__}, not a tensor")
                out[prefix + name] = tensor
    for name, child in state.get("_modules", {}).items():
        if not isinstance(child, _Record):
            raise CheckpointError(f"{prefix}{name} is not a module")
        _collect_tensors(child, f"{prefix}{name}.", out)


def _check_structure(record: _Record, module: nn.Module, path: str) -> None:
    """The record tree must have fastig's classes, children and settings at every place."""
    where = path or "the top-level module"
    expected = _PICKLED_NAME[type(module)]
    if record.pickled_name != expected:
        raise CheckpointError(f"{where} is a {record.pickled_name}, expected {expected}")
    for attr in _SETTINGS.get(type(module), ()):
        if attr not in record.state:
            raise CheckpointError(f"{where} ({expected}) lacks the attribute {attr!r}")
        if record.state[attr] != getattr(module, attr):
            raise CheckpointError(f"{where} ({expected}) has {attr}={record.state[attr]!r}, "
                                  f"expected {getattr(module, attr)!r}")
    children = dict(module.named_children())
    recorded = record.state.get("_modules", {})
    if list(recorded) != list(children):
        raise CheckpointError(f"{where} has the submodules {list(recorded)}, expected {list(children)}")
    for name, child in children.items():
        _check_structure(recorded[name], child, f"{path}.{name}" if path else name)


def _blocks_per_group(state: dict) -> int:
    numbers = {int(m.group(1)) for key in state if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", key))}
    if not numbers:
        raise CheckpointError("no blocks.group_1.block_* weights")
    return max(numbers)


def _shape(state: dict, key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"the weight {key} is missing")
    tensor = state[key]
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
        raise CheckpointError(f"{key} should be a 4-D tensor")
    return tuple(tensor.shape)


def _config_from_state(model_class, state: dict) -> dict:
    """The constructor arguments of fastig's module, read from the weight shapes."""
    n_blk = _blocks_per_group(state)
    first, last = _shape(state, "blocks.input.w"), _shape(state, "blocks.output.conv.w")
    if model_class is Encoder:
        return dict(n_hid=first[0], n_blk_per_group=n_blk, input_channels=first[1], vocab_size=last[0])
    if last[0] % 2:
        raise CheckpointError(f"blocks.output.conv.w has an odd number ({last[0]}) of output channels")
    return dict(n_init=first[0], n_hid=last[1], n_blk_per_group=n_blk, output_channels=last[0] // 2,
                vocab_size=first[1])


def _build(model_class, obj, path: Path):
    """A fresh fastig module holding the weights of ``obj`` (a record tree or a state_dict)."""
    what = model_class.__name__.lower()
    try:
        if isinstance(obj, _Record):
            if obj.pickled_name != _PICKLED_NAME[model_class]:
                raise CheckpointError(f"it holds a {obj.pickled_name}, not a dVAE {what} "
                                      f"({_PICKLED_NAME[model_class]})")
            state: dict = {}
            _collect_tensors(obj, "", state)
        elif isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in obj.items()):
            state = obj
        else:
            raise CheckpointError(f"it holds a {type(obj).__name__}, neither a pickled dVAE {what} nor a state_dict")

        with torch.device("meta"):  # no memory, no random init: only names and shapes
            model = model_class(**_config_from_state(model_class, state))
        if isinstance(obj, _Record):
            _check_structure(obj, model, "")
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            problems = [f"{label} {names[:5]}" for label, names in (("missing", missing), ("unexpected", unexpected))
                        if names]
            raise CheckpointError(f"weights do not match a dVAE {what}: {', '.join(problems)}")
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise CheckpointError(f"{key} has shape {tuple(state[key].shape)}, expected {shape}")
            if not state[key].is_floating_point():
                raise CheckpointError(f"{key} has dtype {state[key].dtype}, expected floating point")
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (AttributeError, TypeError, ValueError, KeyError, RuntimeError) as e:  # malformed records
        raise CheckpointError(f"{path}: unexpected content in a dVAE {what} file ({type(e).__name__}: {e})") from None
    # The tensors read from the file become the parameters (no second copy of ~200 MB), each made float32 and
    # the sole owner of its memory, so no two parameters can alias each other whatever the file says.
    owned: set[int] = set()
    tensors = {key: _sole_owner(state[key].detach().to(torch.float32), owned) for key in expected}
    model.load_state_dict(tensors, assign=True)
    return model.eval().requires_grad_(False)


def _sole_owner(tensor: torch.Tensor, owned: set) -> torch.Tensor:
    storage = tensor.untyped_storage()
    exact = tensor.is_contiguous() and tensor.storage_offset() == 0 and storage.nbytes() == tensor.nbytes
    if not exact or storage.data_ptr() in owned:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    owned.add(tensor.untyped_storage().data_ptr())
    return tensor


def load_encoder(path) -> Encoder:
    """Load the dVAE encoder from OpenAI's ``encoder.pkl`` or fastig's ``dvae_encoder.pt`` (detected).

    Returns a float32 :class:`Encoder` on the CPU in eval mode with ``requires_grad=False`` parameters. Never runs
    code from the file (see the module docstring); a bad file raises :class:`~fastig.errors.CheckpointError`.
    """
    path = Path(path)
    return _build(Encoder, _read_file(path), path)


def load_decoder(path) -> Decoder:
    """Load the dVAE decoder from OpenAI's ``decoder.pkl`` or fastig's ``dvae_decoder.pt``; see :func:`load_encoder`."""
    path = Path(path)
    return _build(Decoder, _read_file(path), path)


def _save_atomically(state: dict, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def convert(encoder_pkl, decoder_pkl, out_dir) -> tuple[Path, Path]:
    """Convert OpenAI's ``encoder.pkl`` and ``decoder.pkl`` once into plain state_dict files in ``out_dir``.

    Writes ``out_dir/dvae_encoder.pt`` and ``out_dir/dvae_decoder.pt`` (each written whole or not at all): dicts
    of float32 tensors that ``torch.load(path, weights_only=True)`` reads and :func:`load_encoder` /
    :func:`load_decoder` accept. Returns the two paths. Inputs may already be converted files.
    """
    encoder, decoder = load_encoder(encoder_pkl), load_decoder(decoder_pkl)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / ENCODER_FILE, out / DECODER_FILE)
    for model, target in zip((encoder, decoder), paths):
        _save_atomically({k: v.detach().clone() for k, v in model.state_dict().items()}, target)
    return paths
