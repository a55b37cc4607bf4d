"""Robustness to lossy compression (the reproducibility study's stability metric).

The image (uint8, at the model's input size) is re-encoded as JPEG at ``quality`` (default 75) and decoded; both
images are attributed with the same method, options and class; each map (summed over channels) is divided by the
sum of its absolute values (its sum, for the non-negative maps the study used; a signed map's plain sum can be
near zero) and the metric is the mean squared difference of the two normalized maps. 0 = unaffected.
"""

from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from fastig.io.images import swap_rgb_bgr, uint8_to_input

CODECS = ("jpeg", "png", "webp")


def reencode(image: np.ndarray, codec: str = "jpeg", quality: int = 75) -> np.ndarray:
    """Encode and decode a uint8 image [H, W, 3] (RGB) or [H, W] with OpenCV. ``png`` is lossless;
    ``webp`` with quality > 100 is lossless WebP."""
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"image must be uint8 [H, W, 3] or [H, W], got {image.dtype} {image.shape}")
    if not 0 <= quality <= 101 or (codec == "jpeg" and quality > 100):
        raise ValueError(f"quality {quality} is out of range for {codec}")
    params = {"jpeg": [cv2.IMWRITE_JPEG_QUALITY, int(quality)], "webp": [cv2.IMWRITE_WEBP_QUALITY, int(quality)],
              "png": []}[codec]
    ok, data = cv2.imencode("." + codec.replace("jpeg", "jpg"), swap_rgb_bgr(image), params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode the image as {codec}")
    decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    return swap_rgb_bgr(decoded)


def normalized_map_mse(a, b) -> np.ndarray:
    """Per-row MSE of two map batches [N, ...] after dividing each map by the sum of its absolute values.

    A map that is all zero stays zero (nothing to normalize)."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)

    def norm(m):
        total = np.abs(m).sum(1, keepdims=True)
        return m / np.where(total > 0, total, 1.0)

    return ((norm(a) - norm(b)) ** 2).mean(1)


def lossy_mse(model, images: Sequence[np.ndarray], target=None, method: str = "ig", quality: int = 75,
              codec: str = "jpeg", input_fn: Callable | None = None, batch_size: int = 8,
              **options) -> np.ndarray:
    """The lossy-compression MSE of ``method`` for each uint8 image: [N] float64 (see the module docstring).

    ``target``: explained class (int or [N]); default the top-1 class of each original image (the re-encoded
    image is explained for the same class). ``input_fn``: uint8 batch [B, H, W, C] -> model input (default
    ``fastig.io.images.uint8_to_input()``). ``options`` go to ``fastig.attribute`` (e.g. ``n_steps``).
    Originals and re-encoded images are attributed together, ``batch_size`` images (2x as many inputs) at a time.
    """
    import fastig
    from fastig.metrics.insertion import explained_classes

    images = [np.asarray(im) for im in images]
    if not images:
        raise ValueError("lossy_mse needs at least one image")
    input_fn = uint8_to_input() if input_fn is None else input_fn
    originals = input_fn(np.stack(images))
    classes = explained_classes(model, originals, target)
    re = input_fn(np.stack([reencode(im, codec, quality) for im in images]))
    out = []
    for i in range(0, len(images), batch_size):
        j = min(i + batch_size, len(images))
        x = torch.cat([originals[i:j], re[i:j]])
        t = torch.cat([classes[i:j], classes[i:j]]).to(x.device)
        maps = fastig.attribute(model, x, target=t, method=method, **options)
        maps = maps.detach().double().cpu().sum(1).numpy()
        out.append(normalized_map_mse(maps[:j - i], maps[j - i:]))
    return np.concatenate(out)
