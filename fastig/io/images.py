"""Image decoding (OpenCV) and the resize / crop / normalize step that turns an image into a model input.

``read_image`` always returns uint8 RGB of shape [H, W, 3], whatever the file holds:

- grey images are repeated into three channels;
- RGBA (and grey + alpha) images have their alpha channel dropped, keeping the colour values as they are. This is
  what PIL's ``Image.convert("RGB")`` does, and so what torchvision's image loaders feed a model; it is NOT
  compositing over a background (a fully transparent pixel keeps whatever colour it stores);
- 16-bit images are mapped to 8 bits with ``round(v / 257)`` (65535 -> 255), float images are taken as [0, 1].

``read_image`` bounds memory before it decodes: regular files only, at most :data:`MAX_FILE_BYTES` read, and the
header's size (:mod:`fastig.io.imagesize`) within :data:`MAX_PIXELS` pixels and an aspect ratio of
:data:`MAX_ASPECT`:1.

``Preprocess`` resizes bilinearly with OpenCV's ``INTER_LINEAR``; when the resized image would be large (a long
thin image), it computes only the pixels its center crop keeps. torchvision's ``Resize`` on a PIL image uses PIL's
bilinear filter *with antialiasing* when it shrinks, so the tensors of the two pipelines differ: measured against an
antialiased bilinear reference for 500x375 -> 256, about 1 grey level (of 255) on average for smooth photo-like
content, but ~18 on average for pixel-level noise, where antialiasing matters. The resized size, the crop offsets
and the normalization follow torchvision exactly.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np
import torch

from fastig.errors import ImageReadError, check_int, int_problem
from fastig.io.imagesize import image_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Bounds checked from a file's header before it is decoded. 64 megapixels (8192 x 8192; a 48 MP phone photo
# fits) decode to 192 MiB as 8-bit RGB, 1 GiB at most (float RGBA); no classifier input needs more.
MAX_PIXELS = 1 << 26
# The longer side at most this many times the shorter: a center crop of anything longer keeps a sliver of it
# (a 1 x 20000 "image" is a line). Memory does not depend on it: Preprocess resizes only what its crop keeps.
MAX_ASPECT = 256
# Preprocess resizes a whole image up to this size (12 MiB as RGB; ImageNet's 256 x 341 is 87k pixels), and only
# the pixels its crop keeps of a larger one.
RESIZE_WHOLE_PIXELS = 1 << 22
# The largest file read: an uncompressed image of MAX_PIXELS at 8 bytes per pixel (16-bit RGBA), plus metadata.
MAX_FILE_BYTES = 8 * MAX_PIXELS + (64 << 20)

# ITU-R 601-2 luma, the weights of PIL's convert("L") and torchvision's Grayscale.
_LUMA = np.array([0.299, 0.587, 0.114])


def read_image(path, max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> np.ndarray:
    """Decode the image file at ``path`` into a uint8 RGB array [H, W, 3].

    Raises ``ImageReadError`` naming the file when it is missing, a directory, not a regular file (a FIFO or a
    device would block or never end), unreadable, empty, larger than :data:`MAX_FILE_BYTES`, truncated, corrupt,
    not an image OpenCV can decode, or when its header announces more than ``max_pixels`` pixels or a longer
    side more than ``max_aspect`` times the shorter (see :func:`read_raw`).
    """
    path = Path(path)
    try:
        return _to_rgb8(read_raw(path, max_pixels, max_aspect))
    except ValueError as e:
        raise ImageReadError(f"unsupported image {path}: {e}") from None


def read_raw(path, max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> np.ndarray:
    """The image file at ``path`` decoded by OpenCV as stored (BGR / BGRA / grey, any depth), within bounds.

    Memory is bounded before it is spent: only regular files are opened (without blocking), at most
    :data:`MAX_FILE_BYTES` are read, and the width and height in the file's header
    (:func:`fastig.io.imagesize.image_size`) must give at most ``max_pixels`` pixels and an aspect ratio of at
    most ``max_aspect``:1 before OpenCV decodes anything. ``ImageReadError`` names the file and the reason.
    """
    path = Path(path)
    data = _read_file(path)
    size = image_size(data)
    if size is None:
        raise ImageReadError(f"not an image, or a corrupt one (no image header fastig can read): {path}")
    _check_size(path, *size, max_pixels, max_aspect)
    if _is_truncated_jpeg(data):
        raise ImageReadError(f"image file is truncated (JPEG without its end marker): {path}")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        image = None
    if image is None or image.size == 0:
        raise ImageReadError(f"not an image, or a corrupt one (OpenCV cannot decode it): {path}")
    _check_size(path, image.shape[1], image.shape[0], max_pixels, max_aspect)  # in case a header misled us
    return image


def _read_file(path: Path) -> bytes:
    """The bytes of a regular file of at most MAX_FILE_BYTES; anything else is an ImageReadError."""
    try:
        # O_NONBLOCK: opening a FIFO without a writer would otherwise wait forever (no effect on regular files)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ImageReadError(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise ImageReadError(f"expected an image file but got a directory: {path}") from None
    except OSError as e:
        raise ImageReadError(f"cannot read image file {path}: {e.strerror or e}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageReadError(f"expected an image file but got a directory: {path}")
        if not stat.S_ISREG(info.st_mode):
            raise ImageReadError(f"not a regular file (a FIFO, device or socket), so not read as an image: {path}")
        if info.st_size > MAX_FILE_BYTES:
            raise ImageReadError(f"image file {path} is {info.st_size / 2**30:.1f} GiB, larger than the "
                                 f"{MAX_FILE_BYTES / 2**20:.0f} MiB an image of at most {MAX_PIXELS:,} pixels needs")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(info.st_size)
            grew = bool(f.read(1))  # never more than the size checked above
    except OSError as e:
        raise ImageReadError(f"cannot read image file {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if grew:
        raise ImageReadError(f"image file {path} grew while it was read")
    if not data:
        raise ImageReadError(f"image file is empty: {path}")
    return data


def _check_size(path: Path, width: int, height: int, max_pixels: int, max_aspect: float) -> None:
    if width < 1 or height < 1:
        raise ImageReadError(f"image {path} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageReadError(f"image {path} is {width}x{height} ({width * height:,} pixels), more than the "
                             f"{max_pixels:,} pixels fastig decodes; downscale it first")
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect:
        raise ImageReadError(f"image {path} is {width}x{height}: its aspect ratio {ratio:.4g}:1 exceeds "
                             f"{max_aspect:g}:1, which a center crop for a classifier cannot use")


def _is_truncated_jpeg(data: bytes) -> bool:
    """True for a JPEG whose last scan is not followed by an end-of-image marker.

    OpenCV 5 refuses such files, but older OpenCV builds return the decoded part with a grey remainder and only a
    warning on stderr, so the check is done here. Inside compressed data every 0xFF byte is followed by 0x00, so
    the marker bytes below cannot occur by accident; an EXIF thumbnail's own markers come before the main image's.
    """
    if len(data) < 4 or not data.startswith(b"\xff\xd8"):
        return False
    return data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")


def _to_rgb8(image: np.ndarray) -> np.ndarray:
    """OpenCV's decoded array (BGR / BGRA / grey, 8 or 16 bit or float) -> uint8 RGB [H, W, 3].

    Deep and float images are converted a block of rows at a time, so their temporaries stay small."""
    if image.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise ValueError(f"pixel type {image.dtype} is not supported (expected 8-bit, 16-bit or float)")
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels in (1, 2):  # grey, grey + alpha: the grey channel three times
        order = [0, 0, 0]
    elif channels in (3, 4):  # BGR, BGRA: the colour channels reversed, alpha dropped
        order = [2, 1, 0]
    else:
        raise ValueError(f"{channels} channels are not supported (expected 1 to 4)")
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image[:, :, order])
    out = np.empty(image.shape[:2] + (3,), np.uint8)
    rows = max(1, (1 << 20) // max(image.shape[1], 1))
    for top in range(0, image.shape[0], rows):
        block = image[top:top + rows][:, :, order]
        if image.dtype == np.uint16:
            out[top:top + rows] = (block.astype(np.uint32) + 128) // 257  # round(v / 257) exactly (no ties)
        else:
            out[top:top + rows] = np.round(np.clip(np.nan_to_num(block), 0.0, 1.0) * 255.0)
    return out


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
            if len(self.resize) != 2 or any(int_problem(v) for v in self.resize):
                raise ValueError(f"Preprocess.resize as a size must be (height, width) of positive integers, got "
                                 f"{self.resize!r}")
            object.__setattr__(self, "resize", tuple(self.resize))
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if not (name == "resize" and isinstance(value, tuple)):
                check_int(f"Preprocess.{name}", value, none_ok=True)
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
        x = _resize_and_crop(rgb, self.resize, self.crop).astype(np.float32) / 255.0
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


def uint8_to_input(mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   dtype: torch.dtype = torch.float32, device=None) -> Callable[[np.ndarray], torch.Tensor]:
    """A function uint8 images [B, H, W, C] (or grey [B, H, W]) -> model inputs [B, C, H, W]: ``/ 255`` then
    ``(x - mean) / std``, computed in float32 exactly like :class:`Preprocess`."""
    m = None if mean is None else np.asarray(mean, dtype=np.float32)
    s = None if std is None else np.asarray(std, dtype=np.float32)

    def to_input(batch: np.ndarray) -> torch.Tensor:
        x = batch.astype(np.float32) / 255.0
        if x.ndim == 3:
            x = x[..., None]
        if m is not None:
            x = (x - m) / s
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device=device, dtype=dtype)

    return to_input


def swap_rgb_bgr(image: np.ndarray) -> np.ndarray:
    """An RGB image [H, W, 3] in OpenCV's BGR order (or back), contiguous; a grey image [H, W] as it is."""
    return np.ascontiguousarray(image[:, :, ::-1]) if image.ndim == 3 else image


def _resize_and_crop(image: np.ndarray, resize: int | tuple[int, int] | None, crop: int | None) -> np.ndarray:
    """torchvision's ``Resize(resize)`` (``resize`` a short side or an exact ``(height, width)``) then ``CenterCrop(crop)`` (either may be None) of a uint8 image, bilinear
    (half-pixel centres, edges clamped: OpenCV's INTER_LINEAR, torch's bilinear without antialiasing). A crop
    larger than the resized image pads it with zeros, centred, as torchvision's CenterCrop does.

    A resized image of at most :data:`RESIZE_WHOLE_PIXELS` is made whole by OpenCV (fast); a larger one -- a long
    thin image, whose short side is scaled to ``resize`` -- is never made: only the pixels the crop keeps are
    interpolated (:func:`_resize_kept`), so memory stays that of the crop.
    """
    h, w = image.shape[:2]
    if resize is None:
        new_h, new_w = h, w
    elif isinstance(resize, tuple):  # the whole image squashed to exactly (height, width)
        new_h, new_w = resize
    elif h <= w:  # torchvision: the short side becomes `resize`, the long side int(resize * long / short)
        new_h, new_w = resize, int(resize * w / h)
    else:
        new_h, new_w = int(resize * h / w), resize
    if crop is None and new_h * new_w > MAX_PIXELS:
        raise ValueError(f"resize={resize} makes a {new_w}x{new_h} image, more than {MAX_PIXELS:,} pixels; give a crop")
    (top, height, pad_top), (left, width, pad_left) = _kept(new_h, crop), _kept(new_w, crop)
    if (new_h, new_w) == (h, w):
        out = image[top:top + height, left:left + width]
    elif new_h * new_w <= RESIZE_WHOLE_PIXELS:
        out = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)[top:top + height, left:left + width]
    else:
        out = _resize_kept(image, (new_h, new_w), (top, height), (left, width))
    if crop is not None and (height < crop or width < crop):
        out = np.pad(out, ((pad_top, crop - height - pad_top), (pad_left, crop - width - pad_left), (0, 0)))
    return out


def _resize_kept(image: np.ndarray, size: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Pixels rows[0] .. rows[0]+rows[1]-1 x cols[0] .. cols[0]+cols[1]-1 of ``image`` bilinearly resized to
    ``size``, computed alone (in float32, rounded to uint8): what OpenCV's INTER_LINEAR gives there, to within
    its fixed-point rounding (one grey level)."""
    h, w = image.shape[:2]
    y0, y1, wy = _bilinear_taps(h, size[0], *rows)
    x0, x1, wx = _bilinear_taps(w, size[1], *cols)
    first, last = x0[0], x1[-1] + 1  # the source columns the kept pixels read
    upper, lower = image[y0, first:last].astype(np.float32), image[y1, first:last].astype(np.float32)
    blended = upper + (lower - upper) * wy[:, None, None]
    left, right = blended[:, x0 - first], blended[:, x1 - first]
    return np.rint(left + (right - left) * wx[None, :, None]).astype(np.uint8)


def _kept(size: int, crop: int | None) -> tuple[int, int, int]:
    """Along one axis of the resized image: (first kept index, number kept, zeros padded before them)."""
    if crop is None:
        return 0, size, 0
    if size < crop:
        return 0, size, (crop - size) // 2
    return int(round((size - crop) / 2.0)), crop, 0


def _bilinear_taps(n_in: int, n_out: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For output pixels start .. start+count-1 of an axis resized n_in -> n_out: the two source indices each
    interpolates between and the weight of the second."""
    source = np.maximum((np.arange(start, start + count) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(source.astype(np.int64), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), (source - i0).astype(np.float32)


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
