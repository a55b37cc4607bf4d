"""Superpixels: integer label maps that group the pixels of image batches [N, C, H, W] into segments.

:func:`superpixels` is fastig's own SLIC-like segmentation (or a grid); :func:`opencv_slic` is OpenCV's SLICO
(needs ``cv2.ximgproc``). Lime and KernelShap (``n_segments=``), the CLI's perturbation methods (``--segments``) and
segment baselines (:mod:`fastig.core.baselines`) take their feature masks and segments from here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fastig.errors import check_int


def superpixels(
    images: torch.Tensor, n_segments: int = 64, method: str = "slic", compactness: float = 1.0, n_iter: int = 10
) -> torch.Tensor:
    """Feature masks [N, 1, H, W] (ids 0..K-1 per image) that group the pixels of image batches [N, C, H, W].

    ``method="grid"``: a regular grid of about ``n_segments`` cells. ``method="slic"``: SLIC-like k-means on color
    and position, started from the grid's cell centers; colors are standardized per image, positions are divided
    by the grid spacing and weighted by ``compactness`` (larger: more regular, grid-like segments). Unlike SLIC
    proper, segments are not forced to be connected. Ids are renumbered to be consecutive per image.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"superpixels need an image batch [N, C, H, W], got {getattr(images, 'shape', images)!r}")
    if method not in ("grid", "slic"):
        raise ValueError(f"method must be 'grid' or 'slic', got {method!r}")
    check_int("n_segments", n_segments)
    n, _, h, w = images.shape
    rows = max(1, min(h, round(math.sqrt(n_segments * h / w))))
    cols = max(1, min(w, math.ceil(n_segments / rows)))
    row_of = torch.div(torch.arange(h, device=images.device) * rows, h, rounding_mode="floor")
    col_of = torch.div(torch.arange(w, device=images.device) * cols, w, rounding_mode="floor")
    grid = (row_of[:, None] * cols + col_of[None, :]).expand(n, h, w)
    if method == "grid":
        return _consecutive(grid).unsqueeze(1)
    spacing = math.sqrt(h * w / (rows * cols))
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    position = torch.stack([yy, xx]).to(images.device) * (compactness / spacing)  # [2, H, W]
    out = []
    for image, labels in zip(images.float(), grid):
        color = (image - image.mean((1, 2), keepdim=True)) / image.std().clamp_min(1e-12)
        points = torch.cat([color, position]).reshape(color.shape[0] + 2, -1).T  # [HW, C + 2]
        labels = labels.reshape(-1)
        k = rows * cols
        for _ in range(n_iter):
            sums = torch.zeros(k, points.shape[1], device=points.device).index_add_(0, labels, points)
            counts = torch.bincount(labels, minlength=k).clamp_min(1).unsqueeze(1)
            centers = sums / counts
            new = torch.cdist(points, centers).argmin(1)
            if torch.equal(new, labels):
                break
            labels = new
        out.append(_consecutive(labels.reshape(h, w)))
    return torch.stack(out).unsqueeze(1)


def _consecutive(labels: torch.Tensor) -> torch.Tensor:
    """Renumber each image's labels to 0..K-1 in order of the old ids."""
    return torch.stack([torch.unique(one, return_inverse=True)[1] for one in labels])


def superpixel_mask(feature_mask: Any, n_segments: int | None, inputs: Any) -> Any:
    """``feature_mask``, or the :func:`superpixels` of the image batch ``inputs`` (a tensor [N, C, H, W], or a
    tuple holding only that) when no mask but ``n_segments`` is given."""
    if feature_mask is None and n_segments is not None:
        xs = inputs if isinstance(inputs, tuple) else (inputs,)
        if len(xs) != 1 or not isinstance(xs[0], torch.Tensor) or xs[0].dim() != 4:
            raise ValueError("n_segments needs a single image batch [N, C, H, W] as inputs")
        feature_mask = superpixels(xs[0], n_segments)
    return feature_mask


def opencv_slic(images: torch.Tensor, n_segments: int, ruler: float = 10.0, iterations: int = 10) -> torch.Tensor:
    """OpenCV's SLICO superpixels (``cv2.ximgproc.createSuperpixelSLIC``) of each image, region size
    ``sqrt(H * W / n_segments)``; images are min-max scaled to 8 bits per image for the segmentation only."""
    import cv2

    ximgproc = getattr(cv2, "ximgproc", None)
    if ximgproc is None:
        raise ValueError("segments='cv2' needs OpenCV's contrib modules (cv2.ximgproc): pip install "
                         "opencv-contrib-python-headless (in place of opencv-python-headless), or use 'slic'")
    n, _, h, w = images.shape
    region = max(2, round(math.sqrt(h * w / n_segments)))
    out = []
    for x in images.detach().to("cpu", torch.float32):
        low, high = x.min(), x.max()
        u8 = ((x - low) / (high - low).clamp_min(1e-12) * 255).round().to(torch.uint8)
        u8 = u8.permute(1, 2, 0).contiguous().numpy()
        slic = ximgproc.createSuperpixelSLIC(u8, algorithm=ximgproc.SLICO, region_size=region, ruler=ruler)
        slic.iterate(iterations)
        out.append(torch.from_numpy(np.asarray(slic.getLabels(), dtype=np.int64)))
    return torch.stack(out).unsqueeze(1).to(images.device)
