"""Pictures of deliberative explanations: one per hard image (the image with its ground truth, then each top
ambiguity's insecurity map over the image, named by its two classes), and the precision/recall curves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from fastig.io.heatmap import render_heatmap, save_png
from fastig.metrics.plots import save_curve_plot

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_GAP = 6
_SHARED = (40, 220, 40)  # parts / objects the pair shares
_OTHER = (255, 255, 255)
_MASK = (255, 140, 0)  # the mask's outline (orange)


def _caption(tile: np.ndarray, lines: Sequence[str], width: int) -> np.ndarray:
    """``tile`` on a white card of ``width`` pixels with ``lines`` of text above it (shrunk to fit)."""
    heights, scales = [], []
    for line in lines:
        scale = 0.45
        while scale > 0.3 and cv2.getTextSize(line, _FONT, scale, 1)[0][0] > width - 4:
            scale -= 0.025
        scales.append(scale)
        heights.append(cv2.getTextSize(line, _FONT, scale, 1)[0][1] + 7)
    card = np.full((sum(heights) + 4 + tile.shape[0], width, 3), 255, dtype=np.uint8)
    y = 0
    for line, scale, h in zip(lines, scales, heights):
        y += h
        cv2.putText(card, line, (2, y - 4), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
    card[sum(heights) + 4:, (width - tile.shape[1]) // 2:(width - tile.shape[1]) // 2 + tile.shape[1]] = tile
    return card


def _mark_parts(image: np.ndarray, xy: np.ndarray, visible: np.ndarray, shared: set[int]) -> np.ndarray:
    image = image.copy()
    radius = max(2, image.shape[0] // 64)
    for part, ((x, y), seen) in enumerate(zip(xy, visible)):
        if seen:
            color = _SHARED if part in shared else _OTHER
            cv2.circle(image, (int(x), int(y)), radius + 1, (0, 0, 0), -1, cv2.LINE_AA)
            cv2.circle(image, (int(x), int(y)), radius, color, -1 if part in shared else 1, cv2.LINE_AA)
    return image


def _outline(image: np.ndarray, mask: np.ndarray, color) -> np.ndarray:
    image = image.copy()
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(image, contours, -1, color, 1, cv2.LINE_AA)
    return image


def hard_image_picture(image: np.ndarray, title: str, ambiguities: list[dict], fraction: float = 0.1,
                       parts: tuple[np.ndarray, np.ndarray] | None = None, labels: np.ndarray | None = None,
                       scale: int = 1) -> np.ndarray:
    """One hard image: the image with its ground truth, then one panel per ambiguity.

    ``image`` uint8 RGB [H, W, 3] (the model input, for display); ``ambiguities``: dicts with ``names`` (the two
    classes' names), ``probabilities``, ``map`` [H, W] (the insecurity map), ``mask`` [H, W] (its top ``fraction``)
    and ``shared`` (the part indices, or object labels, the pair shares). Ground truth: ``parts`` = (input
    coordinates [P, 2], visible [P]) drawn as dots (filled green: shared by the pair), or ``labels`` [H, W] whose
    shared objects are outlined in green. The mask's outline is drawn in orange. ``scale`` enlarges small inputs.
    """
    if scale > 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    width = max(image.shape[1], 200)
    up = (lambda a: cv2.resize(a.astype(np.float32), (image.shape[1], image.shape[0]),
                               interpolation=cv2.INTER_NEAREST)) if scale > 1 else (lambda a: a)
    scaled_parts = None if parts is None else (parts[0] * scale + scale // 2, parts[1])
    if scaled_parts is not None:
        first, note = _mark_parts(image, *scaled_parts, shared=set()), "dots: visible parts"
    elif labels is not None:
        first, note = image, "outlines: annotated objects"
        for label in np.unique(labels[labels > 0]):
            first = _outline(first, up(labels) == label, _OTHER)
    else:
        first, note = image, ""
    cards = [_caption(first, ["input, ground truth", note, ""], width)]
    for amb in ambiguities:
        heat = render_heatmap(up(amb["map"]), image, sign="positive", alpha=0.6)
        heat = _outline(heat, up(amb["mask"]) > 0.5, _MASK)
        shared = set(int(s) for s in amb["shared"])
        if scaled_parts is not None:
            heat = _mark_parts(heat, *scaled_parts, shared=shared)
        elif labels is not None and shared:
            heat = _outline(heat, np.isin(up(labels), list(shared)), _SHARED)
        pa, pb = amb["probabilities"]
        cards.append(_caption(heat, [f"{amb['names'][0]} ({pa:.2f})", f"vs {amb['names'][1]} ({pb:.2f})",
                                     f"shared: {len(shared)}, mask r={fraction:g}"], width))
    height = max(c.shape[0] for c in cards)
    row = np.full((height, sum(c.shape[1] for c in cards) + _GAP * (len(cards) + 1), 3), 255, dtype=np.uint8)
    x = _GAP
    for card in cards:
        row[:card.shape[0], x:x + card.shape[1]] = card
        x += card.shape[1] + _GAP
    head = np.full((26, row.shape[1], 3), 255, dtype=np.uint8)
    scale_text = 0.5
    while scale_text > 0.3 and cv2.getTextSize(title, _FONT, scale_text, 1)[0][0] > row.shape[1] - 2 * _GAP:
        scale_text -= 0.025
    cv2.putText(head, title, (_GAP, 18), _FONT, scale_text, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([head, row, np.full((_GAP, row.shape[1], 3), 255, dtype=np.uint8)])


def save_curves(out: Path, fractions: np.ndarray, curves: dict[str, np.ndarray], title: str) -> list[Path]:
    """PNG plots of the mean curves: each measure over the mask fraction r, and precision over recall."""
    paths = [save_curve_plot(out / "curves_vs_r.png", {name: (fractions, values) for name, values in curves.items()},
                             title=title, xlabel="mask fraction r", ylabel="mean over hard images", ylim=(0.0, 1.0))]
    if "recall" in curves and "precision" in curves:
        paths.append(save_curve_plot(out / "precision_recall.png", {"precision": (curves["recall"], curves["precision"])},
                                     title=title, xlabel="recall", ylabel="precision", ylim=(0.0, 1.0)))
    return paths


__all__ = ["hard_image_picture", "save_curves", "save_png"]
