"""Heatmap rendering of attributions, PNG writing, and labelled image grids.

``render_heatmap`` maps an attribution to colours:

- ``sign="absolute"`` colours |a|, ``"positive"`` only a > 0, ``"negative"`` only a < 0 (as its magnitude), each with
  the sequential colormap *inferno* (black -> purple -> orange -> light yellow; brightness rises with the value);
- ``sign="all"`` colours the signed value with a diverging blue - white - red map (ColorBrewer RdBu), zero white.

Values are divided by the ``clip_percentile``-th percentile of the shown magnitude and clipped to 1, so a few
extreme pixels do not wash out the rest. When that percentile is zero (a sparse map), the maximum is used instead;
an all-zero map renders as the colour of zero, never NaN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from fastig.errors import FastigError, check_int
from fastig.io.images import swap_rgb_bgr

SIGNS = ("absolute", "positive", "negative", "all")

# ColorBrewer RdBu (11 classes), ordered from most negative (dark blue) through white to most positive (dark red).
_RDBU = ["#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7",
         "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f"]

GAP = 4  # pixels between grid cells and around the grid
_BACKGROUND = 255
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _sequential_lut() -> np.ndarray:
    """OpenCV's inferno colormap as a [256, 3] uint8 RGB table."""
    ramp = np.arange(256, dtype=np.uint8).reshape(256, 1)
    return cv2.applyColorMap(ramp, cv2.COLORMAP_INFERNO)[:, 0, ::-1].copy()


def _diverging_lut() -> np.ndarray:
    """RdBu interpolated to a [256, 3] uint8 RGB table; zero lands on entry 128, next to the white middle."""
    anchors = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in _RDBU], dtype=np.float64)
    positions = np.linspace(0.0, 1.0, len(anchors))
    t = np.linspace(0.0, 1.0, 256)
    return np.round(np.stack([np.interp(t, positions, anchors[:, c]) for c in range(3)], axis=1)).astype(np.uint8)


_LUTS = {"sequential": _sequential_lut(), "diverging": _diverging_lut()}


def render_heatmap(attribution, image=None, sign: str = "absolute", clip_percentile: float = 99.5,
                   alpha: float = 0.5) -> np.ndarray:
    """Colour an attribution [C, H, W] (channels summed) or [H, W] into a uint8 RGB image [H, W, 3].

    ``image`` (uint8 [H, W, 3] or [H, W], same H and W) is shown under the heatmap, blended as
    ``(1 - alpha) * image + alpha * heatmap``; without it the heatmap is returned as is.
    """
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {', '.join(SIGNS)}; got {sign!r}")
    if not 0.0 < clip_percentile <= 100.0:
        raise ValueError(f"clip_percentile must be in (0, 100], got {clip_percentile}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")

    a = _as_map(attribution)
    if sign == "all":
        scale = _scale(np.abs(a), clip_percentile)
        t = (np.clip(a / scale, -1.0, 1.0) + 1.0) / 2.0  # zero -> the middle of the diverging map
        lut = _LUTS["diverging"]
    else:
        shown = {"absolute": np.abs(a), "positive": np.maximum(a, 0.0), "negative": np.maximum(-a, 0.0)}[sign]
        t = np.clip(shown / _scale(shown, clip_percentile), 0.0, 1.0)
        lut = _LUTS["sequential"]
    heat = lut[np.round(t * 255.0).astype(np.intp)]

    if image is None:
        return heat
    base = _as_rgb8(image, "image")
    if base.shape[:2] != heat.shape[:2]:
        raise ValueError(f"image is {base.shape[1]}x{base.shape[0]} but the attribution is "
                         f"{heat.shape[1]}x{heat.shape[0]} (width x height); they must match")
    blended = (1.0 - alpha) * base.astype(np.float64) + alpha * heat.astype(np.float64)
    return np.round(blended).astype(np.uint8)


def _as_map(attribution) -> np.ndarray:
    """Attribution tensor/array [C, H, W] or [H, W] -> float64 [H, W] (channels summed), all finite."""
    if isinstance(attribution, torch.Tensor):
        attribution = attribution.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(attribution, dtype=np.float64)
    if a.ndim == 3:
        a = a.sum(axis=0)
    elif a.ndim != 2:
        raise ValueError(f"attribution must be [C, H, W] or [H, W], got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"attribution is empty (shape {a.shape})")
    if not np.isfinite(a).all():
        raise ValueError(f"attribution has {int((~np.isfinite(a)).sum())} NaN or infinite values")
    return a


def _scale(magnitude: np.ndarray, percentile: float) -> float:
    """The value that maps to the top of the colormap: the percentile, else the max, else 1 (all zero)."""
    scale = float(np.percentile(magnitude, percentile))
    if scale <= 0.0:
        scale = float(magnitude.max())
    return scale if scale > 0.0 else 1.0


def _as_rgb8(image, what: str) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))):
        raise ValueError(f"{what} must be a uint8 array [H, W, 3] or [H, W], got {image.dtype} {image.shape}")
    if image.ndim == 2:
        image = image[:, :, None]
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def save_png(path, rgb) -> Path:
    """Write a uint8 RGB [H, W, 3] (or grey [H, W]) image as PNG, creating parent directories; returns the path."""
    path = Path(path)
    rgb = _as_rgb8(rgb, "the image to save")
    ok, data = cv2.imencode(".png", swap_rgb_bgr(rgb))
    if not ok:
        raise FastigError(f"cannot encode a {rgb.shape} image as PNG for {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.tobytes())
    except OSError as e:
        raise FastigError(f"cannot write PNG {path}: {e.strerror or e}") from None
    return path


def grid(rows: Sequence[Sequence], row_labels: Sequence[str] | None = None,
         col_labels: Sequence[str] | None = None, cell: int = 160) -> np.ndarray:
    """Tile rows of images into one uint8 RGB image on a white background, with optional text labels.

    Each image is scaled with nearest-neighbour (so a 5x5 crop stays crisp) until its longer side is ``cell``,
    and centered in its ``cell`` x ``cell`` square. Rows may have different lengths. Layout: a ``GAP`` pixel
    margin around and between cells, a label column on the left when ``row_labels`` are given and a header row
    on top when ``col_labels`` are given, so the size is
    ``(top + rows * (cell + GAP) + GAP, left + cols * (cell + GAP) + GAP, 3)``. Cell (r, c) starts at
    ``(top + GAP + r * (cell + GAP), left + GAP + c * (cell + GAP))``. Labels are ASCII (OpenCV's Hershey font).
    """
    check_int("cell", cell, 8, why="pixels")
    rows = [list(r) for r in rows]
    if not rows or not any(rows):
        raise ValueError("grid needs at least one image")
    n_cols = max(len(r) for r in rows)
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"{len(col_labels)} column labels for {n_cols} columns")

    # Label sizes: a column label is shrunk to fit its cell; a row label column is as wide as the widest label.
    col_scales = [_fit_scale(str(t), cell - 2) for t in col_labels] if col_labels is not None else []
    top = (max(_text_size(str(t), s)[1] for t, s in zip(col_labels, col_scales)) + 2 * GAP) if col_labels else 0
    left = (max(_text_size(str(t), 0.5)[0] for t in row_labels) + 2 * GAP) if row_labels is not None else 0

    height = top + len(rows) * (cell + GAP) + GAP
    width = left + n_cols * (cell + GAP) + GAP
    canvas = np.full((height, width, 3), _BACKGROUND, dtype=np.uint8)

    for r, row in enumerate(rows):
        y0 = top + GAP + r * (cell + GAP)
        for c, image in enumerate(row):
            x0 = left + GAP + c * (cell + GAP)
            tile = _fit_nearest(_as_rgb8(image, f"grid image at row {r}, column {c}"), cell)
            dy, dx = (cell - tile.shape[0]) // 2, (cell - tile.shape[1]) // 2
            canvas[y0 + dy:y0 + dy + tile.shape[0], x0 + dx:x0 + dx + tile.shape[1]] = tile
        if row_labels is not None:
            w, h = _text_size(str(row_labels[r]), 0.5)
            _put_text(canvas, str(row_labels[r]), (GAP, y0 + (cell + h) // 2), 0.5)
    for c, (text, scale) in enumerate(zip(col_labels or [], col_scales)):
        w, h = _text_size(str(text), scale)
        x0 = left + GAP + c * (cell + GAP)
        _put_text(canvas, str(text), (x0 + max((cell - w) // 2, 0), GAP + h), scale)
    return canvas


def _fit_nearest(image: np.ndarray, cell: int) -> np.ndarray:
    h, w = image.shape[:2]
    factor = cell / max(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))  # cv2 wants (width, height)
    return cv2.resize(image, size, interpolation=cv2.INTER_NEAREST)


def _text_size(text: str, scale: float) -> tuple[int, int]:
    (w, h), baseline = cv2.getTextSize(text, _FONT, scale, 1)
    return w, h + baseline


def _fit_scale(text: str, width: int) -> float:
    """The largest font scale up to 0.5 whose text fits ``width`` (no smaller than 0.3; longer text is clipped)."""
    w = _text_size(text, 0.5)[0]
    return 0.5 if w <= width else max(0.3, 0.5 * width / w)


def _put_text(canvas: np.ndarray, text: str, origin: tuple[int, int], scale: float) -> None:
    cv2.putText(canvas, text, origin, _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
