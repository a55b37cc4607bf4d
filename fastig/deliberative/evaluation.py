"""Evaluation of insecurity maps against ground truth: part locations (CUB-200) or object masks (ADE20K), and the
class-pair tables of shared parts / objects (:mod:`fastig.io.cub200`, :mod:`fastig.io.ade20k`).

For each hard image, each ambiguous pair (a, b) and each mask fraction r (0.01, 0.02, ..., 0.99, the released
code's grid), the insecurity map's top-r mask (:func:`~fastig.deliberative.insecurity.top_fraction_mask`) is
compared with the parts (objects) the two classes share, as the released code's ``insecurity_extraction`` does:

- parts (CUB): a part is a pixel (its location, in the model input's geometry); ``shared`` the pixels of the
  visible parts the pair shares, ``all`` those of every visible part. recall = |mask & shared| / |shared|,
  precision = |mask & shared| / |mask & all|. A pair whose classes share no part counts with recall 0 (the
  released code skips it after its count is taken); a pair whose shared parts are all invisible is left out of
  the recall; pairs with an empty ``mask & all`` are left out of the precision.
- objects (ADE): ``shared`` the pixels of the objects the pair shares; IoU = |mask & shared| / |mask | shared|
  (the released code's measure, every pair counted), and, as for parts, recall = |mask & shared| / |shared| and
  precision = |mask & shared| / |mask & labelled pixels| (pairs whose shared objects are not in the image left
  out of both).

An image's value is the mean over its pairs (NaN when no pair counts); the curves are the NaN-ignoring mean over
images. Part locations are mapped into the input with the same resize and center crop as the image
(:class:`InputGeometry`); the released code scales them to 224 x 224 while feeding the network a center crop,
which misplaces them.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

FRACTIONS = np.arange(0.01, 1.0, 0.01)  # the released code's remaining_mask_size_pool


@dataclass(frozen=True)
class InputGeometry:
    """Where the original image's pixels land in the model input: the shorter side resized to ``resize`` (None:
    kept) and a ``crop`` x ``crop`` center crop (None: none), exactly as :class:`fastig.io.images.Preprocess`."""

    resize: int | None
    crop: int | None

    def transform(self, height: int, width: int) -> tuple[float, float, int, int, int, int]:
        """(scale_x, scale_y, left, top, out_height, out_width) for an image of the given size; ``left``/``top``
        are negative where the crop pads."""
        h, w = height, width
        if self.resize is not None:
            h, w = (self.resize, int(self.resize * width / height)) if height <= width else \
                (int(self.resize * height / width), self.resize)
        if self.crop is None:
            return w / width, h / height, 0, 0, h, w
        top, left = int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0))
        return w / width, h / height, left, top, self.crop, self.crop

    def points(self, xy: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates [P, 2] (x, y) of the original image -> (integer coordinates in the input [P, 2],
        whether each lands inside it [P])."""
        sx, sy, left, top, out_h, out_w = self.transform(height, width)
        x = np.round((xy[:, 0] + 0.5) * sx - 0.5 - left).astype(np.int64)
        y = np.round((xy[:, 1] + 0.5) * sy - 0.5 - top).astype(np.int64)
        inside = (x >= 0) & (x < out_w) & (y >= 0) & (y < out_h)
        return np.stack([x, y], 1), inside

    def label_map(self, labels: np.ndarray) -> np.ndarray:
        """An annotation [H, W] in the input's geometry (nearest-neighbour resize, the same crop; padding is 0)."""
        height, width = labels.shape
        _, _, left, top, out_h, out_w = self.transform(height, width)
        if self.resize is not None:
            h, w = (self.resize, int(self.resize * width / height)) if height <= width else \
                (int(self.resize * height / width), self.resize)
            labels = cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)
        out = np.zeros((out_h, out_w), dtype=labels.dtype)
        ys, xs = slice(max(top, 0), min(top + out_h, labels.shape[0])), slice(max(left, 0), min(left + out_w, labels.shape[1]))
        out[ys.start - top:ys.stop - top, xs.start - left:xs.stop - left] = labels[ys, xs]
        return out


def _order(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions sorted by decreasing value, and how many positions lie strictly above each fraction's threshold
    (the m-th largest value, m = int(r * size); none where m = 0) — that many first positions form the mask."""
    order = np.argsort(-values, kind="stable")
    sorted_values = values[order]
    m = (FRACTIONS * values.size).astype(np.int64)
    counts = np.zeros(len(FRACTIONS), dtype=np.int64)
    valid = m >= 1
    thresholds = sorted_values[m[valid] - 1]
    counts[valid] = np.searchsorted(-sorted_values, -thresholds, side="left")
    return order, counts


def _in_mask_counts(member: np.ndarray, order: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """|mask & member| for every fraction (member: bool over the flattened map)."""
    cumulative = np.concatenate([[0], np.cumsum(member[order])])
    return cumulative[counts]


def _curves(maps: np.ndarray, pairs: np.ndarray, shared_of, labelled: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(recall, precision, IoU) over :data:`FRACTIONS`, averaged over the pairs as the module docstring says.

    ``shared_of(a, b)``: the flat bool mask of what classes a and b share in this image, or None when the class-pair
    table gives them nothing (counted with recall and IoU 0); ``labelled``: the flat mask of every part / object."""
    n = len(FRACTIONS)
    iou_sum, recall_sum, recall_count = np.zeros(n), np.zeros(n), 0
    precision_sum, precision_count = np.zeros(n), np.zeros(n)
    for values, (a, b) in zip(maps, pairs):
        shared = shared_of(int(a), int(b))
        if shared is None:
            recall_count += 1
            continue
        order, counts = _order(values.reshape(-1))
        hits = _in_mask_counts(shared, order, counts)
        union = counts + shared.sum() - hits
        iou_sum += np.where(union > 0, hits / np.maximum(union, 1), 0.0)
        if not shared.any():  # what the pair shares is not in the image: left out of recall and precision
            continue
        recall_sum += hits / shared.sum()
        recall_count += 1
        in_labelled = _in_mask_counts(labelled, order, counts)
        has = in_labelled > 0
        precision_sum[has] += hits[has] / in_labelled[has]
        precision_count += has
    nothing = np.full(n, np.nan)
    iou = iou_sum / len(pairs) if len(pairs) else nothing
    recall = recall_sum / recall_count if recall_count else nothing
    precision = np.where(precision_count > 0, precision_sum / np.maximum(precision_count, 1), np.nan)
    return recall, precision, iou


def part_curves(maps: np.ndarray, pairs: np.ndarray, part_xy: np.ndarray, visible: np.ndarray, table
                ) -> tuple[np.ndarray, np.ndarray]:
    """One image's (recall, precision) over :data:`FRACTIONS` from its insecurity maps [P, H, W], their class
    pairs [P, 2], the parts' input coordinates [15, 2] and visibility [15] (see the module docstring)."""
    h, w = maps.shape[1:]
    flat_index = part_xy[:, 1] * w + part_xy[:, 0]

    def pixels(parts):
        mask = np.zeros(h * w, dtype=bool)
        mask[flat_index[parts[visible[parts]]]] = True
        return mask

    def shared_of(a, b):
        parts = table.shared(a, b)
        return pixels(parts) if len(parts) else None

    recall, precision, _ = _curves(maps, pairs, shared_of, pixels(np.arange(len(part_xy))))
    return recall, precision


def object_curves(maps: np.ndarray, pairs: np.ndarray, labels: np.ndarray, table
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's (recall, precision, IoU) over :data:`FRACTIONS` from its insecurity maps [P, H, W], their class
    pairs and the annotation [H, W] in the input's geometry (see the module docstring)."""
    flat_labels = labels.reshape(-1)

    def shared_of(a, b):
        objects = table.shared(a, b)
        return np.isin(flat_labels, objects) if len(objects) else None

    return _curves(maps, pairs, shared_of, flat_labels > 0)


def mean_curve(per_image: np.ndarray) -> np.ndarray:
    """The NaN-ignoring mean over images [N, R] -> [R] (NaN where no image has a value)."""
    per_image = np.asarray(per_image, dtype=np.float64)
    counts = np.isfinite(per_image).sum(0)
    return np.where(counts > 0, np.nansum(per_image, 0) / np.maximum(counts, 1), np.nan)


def area_under(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoidal area under y(x) over the finite points, x sorted ascending (NaN with fewer than two points)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 2:
        return float("nan")
    order = np.argsort(x, kind="stable")
    return float(np.trapezoid(y[order], x[order]))
