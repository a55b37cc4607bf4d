"""Line plots of metric curves, drawn with OpenCV (no matplotlib): uint8 RGB images, saved with ``save_png``."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np

from fastig.io.heatmap import save_png

# Distinct colours (RGB) for up to 8 series; they repeat after that.
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (23, 190, 207)]
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_MARGIN = {"left": 56, "right": 16, "top": 34, "bottom": 46}


def _text(canvas, text, origin, scale=0.4, color=(0, 0, 0)):
    cv2.putText(canvas, text, (int(origin[0]), int(origin[1])), _FONT, scale, color, 1, cv2.LINE_AA)


def _width(text, scale=0.4) -> int:
    return cv2.getTextSize(text, _FONT, scale, 1)[0][0]


def curve_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str = "",
               xlabel: str = "", ylabel: str = "", size: tuple[int, int] = (480, 360),
               ylim: tuple[float, float] | None = None) -> np.ndarray:
    """Plot named curves ``{label: (x, y)}`` on shared axes; returns a uint8 RGB image [height, width, 3].

    The y range is ``ylim`` or [0, max(1, largest y)]; the x range spans the data. Non-finite points are dropped.
    A legend lists the labels (with the AUC in the label if the caller puts it there).
    """
    width, height = size
    if width < 160 or height < 120:
        raise ValueError(f"plot size must be at least 160x120, got {size}")
    if not series:
        raise ValueError("curve_plot needs at least one curve")
    clean = {}
    for label, (x, y) in series.items():
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if x.shape != y.shape or x.ndim != 1:
            raise ValueError(f"curve {label!r}: x and y must be 1-D of one length, got {x.shape} and {y.shape}")
        keep = np.isfinite(x) & np.isfinite(y)
        clean[label] = (x[keep], y[keep])
    xs = np.concatenate([x for x, _ in clean.values()])
    ys = np.concatenate([y for _, y in clean.values()])
    x0, x1 = (float(xs.min()), float(xs.max())) if xs.size else (0.0, 1.0)
    if x1 <= x0:
        x1 = x0 + 1.0
    y0, y1 = ylim if ylim is not None else (0.0, max(1.0, float(ys.max()) if ys.size else 1.0))

    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    left, top = _MARGIN["left"], _MARGIN["top"]
    right, bottom = width - _MARGIN["right"], height - _MARGIN["bottom"]

    def px(x, y):
        u = left + (np.asarray(x) - x0) / (x1 - x0) * (right - left)
        v = bottom - (np.asarray(y) - y0) / (y1 - y0) * (bottom - top)
        return np.stack([u, v], -1)

    for i in range(5):  # grid lines and tick labels at 0, 1/4, ..., 1 of each range
        fx, fy = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        u, v = px(fx, fy)
        cv2.line(canvas, (int(u), top), (int(u), bottom), (225, 225, 225), 1)
        cv2.line(canvas, (left, int(v)), (right, int(v)), (225, 225, 225), 1)
        label = f"{fx:.3g}"  # 3 digits: step counts such as 128 stay integers
        _text(canvas, label, (u - _width(label) / 2, bottom + 14))
        label = f"{fy:.2g}"
        _text(canvas, label, (left - 6 - _width(label), v + 4))
    cv2.rectangle(canvas, (left, top), (right, bottom), (0, 0, 0), 1)

    for i, (label, (x, y)) in enumerate(clean.items()):
        color = PALETTE[i % len(PALETTE)]
        if x.size:
            points = np.round(px(x, np.clip(y, y0, y1))).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(canvas, [points], False, color, 2, cv2.LINE_AA)
            if x.size == 1:  # a lone point draws no line: mark it
                cv2.circle(canvas, tuple(int(v) for v in points[0, 0]), 4, color, -1, cv2.LINE_AA)
        ly = top + 16 + 16 * i  # legend, top-left inside the axes
        cv2.line(canvas, (left + 8, ly - 4), (left + 28, ly - 4), color, 2, cv2.LINE_AA)
        _text(canvas, str(label), (left + 34, ly))

    if title:
        _text(canvas, title, ((width - _width(title, 0.5)) / 2, 22), 0.5)
    if xlabel:
        _text(canvas, xlabel, ((left + right - _width(xlabel, 0.45)) / 2, height - 10), 0.45)
    if ylabel:  # drawn horizontally, then rotated to run up the left side
        w = _width(ylabel, 0.45) + 4
        strip = np.full((16, w, 3), 255, dtype=np.uint8)
        _text(strip, ylabel, (2, 12), 0.45)
        strip = np.ascontiguousarray(np.rot90(strip))
        h = min(strip.shape[0], height)
        y_start = max(0, (top + bottom - h) // 2)
        canvas[y_start:y_start + h, 2:2 + strip.shape[1]] = strip[:h]
    return canvas


def save_curve_plot(path, series, **kwargs) -> Path:
    """:func:`curve_plot` written as a PNG at ``path`` (parent folders created); returns the path."""
    return save_png(path, curve_plot(series, **kwargs))
