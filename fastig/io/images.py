"""Image decoding (OpenCV) and the resize / crop / normalize step that turns an image into a model input.

``read_image`` always returns uint8 RGB of shape [H, W, 3], whatever the file holds:

- grey images are repeated into three channels;
- RGBA (and grey + alpha) images have their alpha channel dropped, keeping the colour values as they are. This is
  what PIL's ``Image.convert("RGB")`` does, and so what torchvision's image loaders feed a model; it is NOT
  compositing over a background (a fully transparent pixel keeps whatever colour it stores);
- 16-bit images are mapped to 8 bits with ``round(v / 257)`` (65535 -> 255), float images are taken as [0, 1].

``Preprocess`` resizes with ``cv2.INTER_LINEAR``. torchvision's ``Resize`` on a PIL image uses PIL's bilinear
filter *with antialiasing* when it shrinks, so the tensors of the two pipelines differ: measured against an
antialiased bilinear reference for 500x375 -> 256, about 1 grey level (of 255) on average for smooth photo-like
content, but ~18 on average for pixel-level noise, where antialiasing matters. The resized size, the crop offsets
and the normalization follow torchvision exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch

from fastig.errors import ImageReadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ITU-R 601-2 luma, the weights of PIL's convert("L") and torchvision's Grayscale.
_LUMA = np.array([0.299, 0.587, 0.114])


def read_image(path) -> np.ndarray:
    """Decode the image file at ``path`` into a uint8 RGB array [H, W, 3].

    Raises ``ImageReadError`` naming the file when it is missing, a directory, unreadable, empty, truncated,
    corrupt or not an image OpenCV can decode.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"image file not found: {path}")
    if path.is_dir():
        raise ImageReadError(f"expected an image file but got a directory: {path}")
    try:
        # np.fromfile + imdecode (rather than cv2.imread) reads non-ASCII paths on every platform and lets us tell
        # "cannot read the file" apart from "cannot decode it".
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise ImageReadError(f"cannot read image file {path}: {e.strerror or e}") from None
    if data.size == 0:
        raise ImageReadError(f"image file is empty: {path}")
    if _is_truncated_jpeg(data):
        raise ImageReadError(f"image file is truncated (JPEG without its end marker): {path}")
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error:
        image = None
    if image is None:
        raise ImageReadError(f"not an image, or a corrupt one (OpenCV cannot decode it): {path}")
    try:
        return _to_rgb8(image)
    except ValueError as e:
        raise ImageReadError(f"unsupported image {path}: {e}") from None


def _is_truncated_jpeg(data: np.ndarray) -> bool:
    """True for a JPEG whose last scan is not followed by an end-of-image marker.

    OpenCV 5 refuses such files, but older OpenCV builds return the decoded part with a grey remainder and only a
    warning on stderr, so the check is done here. Inside compressed data every 0xFF byte is followed by 0x00, so
    the marker bytes below cannot occur by accident; an EXIF thumbnail's own markers come before the main image's.
    """
    if data.size < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return False
    raw = data.tobytes()
    return raw.rfind(b"\xff\xd9") < raw.rfind(b"\xff\xda")


def _to_rgb8(image: np.ndarray) -> np.ndarray:
    """OpenCV's decoded array (BGR / BGRA / grey, 8 or 16 bit or float) -> uint8 RGB [H, W, 3]."""
    if image.dtype == np.uint8:
        pass
    elif image.dtype == np.uint16:
        image = np.round(image.astype(np.float32) / 257.0).astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        image = np.round(np.clip(np.nan_to_num(image), 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"pixel type {image.dtype} is not supported (expected 8-bit, 16-bit or float)")

    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels in (1, 2):  # grey, grey + alpha
        return np.ascontiguousarray(np.repeat(image[:, :, :1], 3, axis=2))
    if channels in (3, 4):  # BGR, BGRA: reverse the colour channels, drop alpha
        return np.ascontiguousarray(image[:, :, 2::-1])
    raise ValueError(f"{channels} channels are not supported (expected 1 to 4)")


@dataclass(frozen=True)
class Preprocess:
    """Image -> model input: resize the shorter side, center-crop, scale to [0, 1], optional grey, normalize.

    ``resize``: the length of the shorter side after resizing (the longer side keeps the aspect ratio, truncated
    to an integer as torchvision does), an exact ``(height, width)`` (the whole image squashed to it, as
    torchvision's ``Resize((h, w))``; the Places365 scene classifier's choice, see :mod:`fastig.io.places365`), or
    None to keep the size. ``crop``: the side of the square center crop, or
    None for no crop; an image smaller than the crop is padded with zeros (as torchvision's CenterCrop does).
    ``mean``/``std``: per-channel normalization, both given or both None. ``grayscale``: one luma channel instead
    of RGB (then mean/std have one value each).

    Calling it on a uint8 RGB array [H, W, 3] returns a float32 tensor [C, crop, crop] (C = 3, or 1 when grey).
    """

    resize: int | tuple[int, int] | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    grayscale: bool = False

    def __post_init__(self):
        if isinstance(self.resize, (tuple, list)):
            if len(self.resize) != 2 or not all(_positive_int(v) for v in self.resize):
                raise ValueError(f"Preprocess.resize as a size must be (height, width) of positive integers, got "
                                 f"{self.resize!r}")
            object.__setattr__(self, "resize", tuple(self.resize))
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and not (name == "resize" and isinstance(value, tuple)) and not _positive_int(value):
                raise ValueError(f"Preprocess.{name} must be a positive integer or None, got {value!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("Preprocess.mean and Preprocess.std must both be given or both be None")
        if self.mean is not None:
            channels = 1 if self.grayscale else 3
            object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
            object.__setattr__(self, "std", tuple(float(s) for s in self.std))
            for name in ("mean", "std"):
                if len(getattr(self, name)) != channels:
                    raise ValueError(f"Preprocess.{name} needs {channels} value(s) for "
                                     f"{'grey' if self.grayscale else 'RGB'} images, got {getattr(self, name)}")
            if any(not s > 0 for s in self.std):
                raise ValueError(f"Preprocess.std values must be positive, got {self.std}")

    @classmethod
    def imagenet(cls) -> "Preprocess":
        """The standard ImageNet evaluation transform: resize 256, center crop 224, ImageNet mean/std."""
        return cls(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            desc = f"{rgb.dtype} array of shape {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
            raise TypeError(f"Preprocess expects a uint8 RGB array [H, W, 3] (see read_image), got {desc}")
        image = rgb
        if isinstance(self.resize, tuple):
            if image.shape[:2] != self.resize:
                image = cv2.resize(image, self.resize[::-1], interpolation=cv2.INTER_LINEAR)
        elif self.resize is not None:
            image = _resize_shorter_side(image, self.resize)
        if self.crop is not None:
            image = _center_crop(image, self.crop)
        x = image.astype(np.float32) / 255.0
        if self.grayscale:
            x = (x @ _LUMA.astype(np.float32))[:, :, None]
        if self.mean is not None:
            x = (x - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    def to_display(self, tensor: torch.Tensor) -> np.ndarray:
        """The inverse for display: a model input [C, H, W] (or [1, C, H, W]) -> uint8 RGB [H, W, 3].

        Un-normalizes with this transform's mean/std and clips to [0, 1]; a grey input is repeated into RGB.
        """
        x = torch.as_tensor(tensor).detach().to("cpu", torch.float64)
        if x.ndim == 4 and x.shape[0] == 1:
            x = x[0]
        channels = 1 if self.grayscale else 3
        if x.ndim != 3 or x.shape[0] != channels:
            raise ValueError(f"to_display expects a tensor [{channels}, H, W], got shape {tuple(x.shape)}")
        x = x.numpy().transpose(1, 2, 0)
        if self.mean is not None:
            x = x * np.array(self.std) + np.array(self.mean)
        rgb = np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(rgb, 3, axis=2) if channels == 1 else rgb)


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def _resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    # torchvision: the short side becomes `size`, the long side int(size * long / short) (truncated).
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    if (new_h, new_w) == (h, w):
        return image
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    if h < size or w < size:  # pad with zeros like torchvision's CenterCrop, then crop
        pad_h, pad_w = max(size - h, 0), max(size - w, 0)
        image = np.pad(image, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
        h, w = image.shape[:2]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return image[top:top + size, left:left + size]


def load_image(path, preprocess: Preprocess | None = None) -> torch.Tensor:
    """Read the image at ``path`` and preprocess it (default ``Preprocess.imagenet()``): a tensor [C, H, W]."""
    preprocess = Preprocess.imagenet() if preprocess is None else preprocess
    return preprocess(read_image(path))


def load_images(paths: Iterable, preprocess: Preprocess | None = None) -> torch.Tensor:
    """Read and preprocess several images into one batch [N, C, H, W].

    Without a crop the images must come out the same size; otherwise a ValueError names the first that does not.
    """
    paths: Sequence = list(paths)
    if not paths:
        raise ValueError("load_images needs at least one image path")
    tensors = [load_image(p, preprocess) for p in paths]
    for path, t in zip(paths, tensors):
        if t.shape != tensors[0].shape:
            raise ValueError(f"images differ in size after preprocessing: {paths[0]} gives {tuple(tensors[0].shape)}"
                             f" but {path} gives {tuple(t.shape)}; set Preprocess.crop to batch them")
    return torch.stack(tensors)
