"""Performance Information Curves (Kapishnikov et al. 2019, XRAI): SIC and AIC, as PAIR saliency's
``compute_pic_metric`` computes them, with the model passes batched and the CPU work parallel over images.

Per image (uint8 RGB [H, W, 3] or grey [H, W]) and saliency map [H, W]:

1. a *fully blurred* image is interpolated (``scipy`` linear griddata, PAIR's ``create_blurred_image``) from a
   random mask of 1% of the pixels (plus the four corners); for each saliency threshold ``t`` (PAIR's default
   list), the pixels with ``saliency >= np.quantile(saliency, 1 - t)`` are added to the mask and the image is
   interpolated again;
2. the information of every image is estimated by its compressed size (:data:`INFORMATION`: lossless WebP by
   default; PNG as the reproducibility study; PAIR's own PIL WebP estimator);
3. the model scores every image: SIC uses the softmax probability of the explained class, AIC 1.0 when the top-1
   class is the explained class and 0.0 otherwise (explained class: the target, else the top-1 class of the
   original image);
4. PAIR's skip rules, checked in PAIR's order and reported per image (:data:`SKIP_REASONS`), never silently: the
   original image's score is below ``min_pred_value`` (0.8); the fully blurred image is not less informative than
   the original; the fully blurred image's score is not lower than the original's;
5. information and score are normalized between the fully blurred and the original image and clipped to [0, 1];
   the score is made monotone by a running maximum (``keep_monotonous``); the points, plus (0, 0) and (1, 1), are
   linearly interpolated (``scipy.interpolate.interp1d``) at ``num_data_points`` evenly spaced x in [0, 1), 1.0 is
   appended at x = 1, and the AUC is the trapezoid rule over these points.

How fastig differs from PAIR's per-image loop, without changing a number: the interpolation of all channels of a
blurred image shares one Delaunay triangulation (PAIR triangulates once per channel; the interpolation arithmetic
is the same), SIC and AIC share their images and model passes, the images of many thresholds and images go through
the model in batches, and interpolation and encoding run in a thread pool over images (OpenCV, qhull and the
interpolation release the GIL). Skipped images are not interpolated beyond the fully blurred image.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from fastig.core.engine import Engine
from fastig.io.images import swap_rgb_bgr, uint8_to_input
from fastig.metrics.insertion import DEFAULT_BATCH_SIZE

PAIR_THRESHOLDS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.13, 0.21, 0.34, 0.5, 0.75)
METRICS = ("sic", "aic")
SKIP_REASONS = {
    0: "",
    1: "low_prediction",  # the original image's score is below min_pred_value
    2: "blurred_not_less_informative",  # the fully blurred image's information >= the original's
    3: "blurred_prediction_not_lower",  # the fully blurred image's score >= the original's
}


# --- information estimators ----------------------------------------------------------------------------------


def webp_size(image: np.ndarray) -> int:
    """Bytes of the image as lossless WebP, encoded by OpenCV (``IMWRITE_WEBP_QUALITY`` > 100 means lossless).

    OpenCV's libwebp build and settings are not PIL's: byte counts differ from PAIR's estimator by about 0.05%
    (79942 vs 79978 bytes on a 224x224 test image) and PIC AUCs by up to ~1.5e-3 (measured in
    benchmarks/test_bench_metrics.py); it is ~2.5x faster than PIL's encoder. Use ``"webp_pil"`` for PAIR's
    exact numbers.
    """
    ok, data = cv2.imencode(".webp", swap_rgb_bgr(image), [cv2.IMWRITE_WEBP_QUALITY, 101])
    if not ok:
        raise RuntimeError("OpenCV could not encode the image as WebP")
    return int(data.size)


def png_size(image: np.ndarray) -> int:
    """Bytes of the image as PNG (OpenCV, compression level 3): the reproducibility study's estimator and the
    fastest (~8x faster to encode than OpenCV's lossless WebP). PNG sizes respond differently to blur, so AUCs are
    on another scale (about 0.09 lower than WebP's in benchmarks/test_bench_metrics.py): compare methods under
    one estimator only."""
    ok, data = cv2.imencode(".png", swap_rgb_bgr(image), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise RuntimeError("OpenCV could not encode the image as PNG")
    return int(data.size)


def pil_webp_size(image: np.ndarray) -> int:
    """PAIR's ``estimate_image_entropy``: bytes of PIL's lossless WebP at quality 100 (needs Pillow)."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("information='webp_pil' needs Pillow (pip install pillow)") from None
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="webp", lossless=True, quality=100)
    return buffer.tell()


INFORMATION: dict[str, Callable[[np.ndarray], int]] = {"webp": webp_size, "png": png_size, "webp_pil": pil_webp_size}


def _estimator(information) -> Callable[[np.ndarray], float]:
    if callable(information):
        return information
    if information not in INFORMATION:
        raise ValueError(f"information must be one of {', '.join(INFORMATION)} or a function image -> size; "
                         f"got {information!r}")
    return INFORMATION[information]


# --- masks and blurred images ----------------------------------------------------------------------------------


def random_mask(height: int, width: int, fraction: float = 0.01, seed=None) -> np.ndarray:
    """PAIR's ``generate_random_mask``: ``int(H * W * fraction)`` distinct pixels set, drawn with a numpy
    ``Generator`` seeded by ``seed`` (an int, a Generator, or None for fresh entropy)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    mask = np.zeros((height, width), dtype=bool)
    mask.flat[rng.choice(mask.size, size=int(mask.size * fraction), replace=False)] = True
    return mask


def blurred_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """PAIR's ``create_blurred_image`` (linear): pixels in ``mask`` (plus the 4 corners) kept, the others linearly
    interpolated from them over a Delaunay triangulation; uint8 in, uint8 out (rounded via float32 as PAIR does).

    All channels share one triangulation; points outside its hull (none, since the corners are in the mask) would
    get the image's mean colour, PAIR's fill value.
    """
    from scipy.interpolate import LinearNDInterpolator

    grey = image.ndim == 2
    img = image[:, :, None] if grey else image
    h, w = mask.shape
    mask = mask.copy()
    mask[[0, 0, h - 1, h - 1], [0, w - 1, 0, w - 1]] = True
    if mask.all():
        return image.copy()
    known = np.argwhere(mask)
    unknown = np.argwhere(~mask)
    out = img * mask[:, :, None].astype(np.float32)  # float32, like PAIR's
    values = LinearNDInterpolator(known, img[mask].astype(np.float64), fill_value=np.nan)(unknown)
    mean = img.mean(axis=(0, 1))
    values = np.where(np.isnan(values), mean[None, :], values)
    out[~mask] = values  # float64 -> float32, as PAIR's assignment
    out = np.round(out).astype(np.uint8)
    return out[:, :, 0] if grey else out


# --- the metric ------------------------------------------------------------------------------------------------


@dataclass
class PicScores:
    """One PIC metric over N images.

    ``auc`` [N] and ``curves`` [N, num_data_points + 1] are NaN for skipped images; ``skipped`` [N] holds the
    codes of :data:`SKIP_REASONS` (0 = scored); ``curve_x`` is the common x axis; ``predictions`` and
    ``information`` [N, T + 2] hold the raw scores and estimated information of the fully blurred image, each
    threshold's image and the original (NaN where not computed).
    """

    metric: str
    auc: np.ndarray
    curves: np.ndarray
    curve_x: np.ndarray
    skipped: np.ndarray
    predictions: np.ndarray
    information: np.ndarray
    target: np.ndarray
    thresholds: tuple = field(default=PAIR_THRESHOLDS)

    def reasons(self) -> list[str]:
        """The skip reason of every image ("" for a scored one)."""
        return [SKIP_REASONS[int(c)] for c in self.skipped]

    def aggregate(self, method: str = "median") -> tuple[np.ndarray, float]:
        """PAIR's ``aggregate_individual_pic_results`` over the scored images: (curve [K], trapezoid AUC)."""
        if method not in ("median", "mean"):
            raise ValueError(f"aggregation must be 'median' or 'mean', got {method!r}")
        scored = self.curves[self.skipped == 0]
        if len(scored) == 0:
            raise ValueError(f"no image was scored for {self.metric} (all skipped), nothing to aggregate")
        curve = np.median(scored, axis=0) if method == "median" else np.mean(scored, axis=0)
        return curve, float(np.trapezoid(curve, self.curve_x))


def _scores(engine: Engine, input_fn, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities [B, classes] (float64) and top-1 classes [B] of uint8 images, in engine batches."""
    probs, top = [], []
    sample = input_fn(np.stack(images[:1]))
    rows = engine.predict(len(images), lambda part: (input_fn(np.stack(images[part])),),
                          sample[0].numel() * sample.element_size())
    for _, logits in rows:
        p = torch.softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=1)
        probs.append(p.double().cpu().numpy())
        top.append(logits.argmax(1).cpu().numpy())
    return np.concatenate(probs), np.concatenate(top)


def _threshold_masks(saliency: np.ndarray, mask: np.ndarray, thresholds) -> list[np.ndarray]:
    # exactly PAIR's expressions (np.quantile's default linear rule; ties at the quantile all included)
    return [np.logical_or(saliency >= np.quantile(saliency, 1 - t), mask) for t in thresholds]


def _curve(info: np.ndarray, pred: np.ndarray, keep_monotonous: bool, num_data_points: int):
    """PAIR's normalization, clipping, running maximum, interpolation and AUC; info/pred: [blurred, T..., orig]."""
    from scipy.interpolate import interp1d

    info_fb, info_o = info[0], info[-1]
    pred_fb, pred_o = pred[0], pred[-1]
    points = []
    best = 0.0
    for e, p in zip(info[1:-1], pred[1:-1]):
        ne = np.clip((e - info_fb) / (info_o - info_fb), 0.0, 1.0)
        npred = np.clip((p - pred_fb) / (pred_o - pred_fb), 0.0, 1.0)
        best = max(best, npred)
        points.append((ne, best if keep_monotonous else npred))
    points += [(0.0, 0.0), (1.0, 1.0)]
    x, y = zip(*points)
    curve_x = np.linspace(0.0, 1.0, num=num_data_points, endpoint=False)
    curve_y = np.append(interp1d(x=x, y=y)(curve_x), 1.0)
    curve_x = np.append(curve_x, 1.0)
    return curve_x, curve_y, float(np.trapezoid(curve_y, curve_x))


def pic(model: Callable, images, saliency, target=None, masks=None, seed=0,
        thresholds: Sequence[float] = PAIR_THRESHOLDS, information="webp", min_pred_value: float = 0.8,
        keep_monotonous: bool = True, num_data_points: int = 1000, input_fn=None,
        batch_size: int | None = DEFAULT_BATCH_SIZE, workers: int | None = None,
        metrics: Sequence[str] = METRICS, precision: str = "fp32") -> dict[str, PicScores]:
    """SIC and AIC of ``saliency`` for ``model`` on ``images`` (see the module docstring).

    Args:
        model: returns logits [B, classes] for ``input_fn(uint8 batch)``.
        images: uint8 [N, H, W, 3] or [N, H, W] (a list of such arrays works too).
        saliency: [N, H, W]; higher = more important (apply ``abs`` first if that is the intent, as PAIR says).
        target: explained class (int or [N]); default the top-1 class of each original image.
        masks: [N, H, W] bool random masks (PAIR's ``random_mask``); default one per image from :func:`random_mask`
            with a Generator seeded by ``seed``. Use the same masks to compare methods.
        thresholds: ascending fractions of the most salient pixels (PAIR's list by default).
        information: ``"webp"`` (OpenCV lossless WebP), ``"png"``, ``"webp_pil"`` (PAIR's exact estimator), or a
            function uint8 image -> number.
        input_fn: uint8 batch -> model input; default :func:`fastig.io.images.uint8_to_input` without normalization.
        workers: threads for interpolation and encoding (default: the CPU count).
        metrics: which of ``"sic"``, ``"aic"`` to return.
        batch_size: most model inputs per pass; None lets the engine choose (:mod:`fastig.core.engine`).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast of the model's passes.

    Returns:
        ``{"sic": PicScores, "aic": PicScores}`` (those asked for).
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {METRICS}, got {list(metrics)}")
    images = [np.asarray(im) for im in images]
    n = len(images)
    if n == 0:
        raise ValueError("pic needs at least one image")
    for i, im in enumerate(images):
        if im.dtype != np.uint8 or im.ndim not in (2, 3) or im.shape[:2] != images[0].shape[:2]:
            raise ValueError(f"images must be uint8 [H, W, C] or [H, W] of one size; image {i} is "
                             f"{im.dtype} {im.shape}")
    h, w = images[0].shape[:2]
    sal = [np.asarray(s) for s in (saliency.detach().cpu().numpy() if isinstance(saliency, torch.Tensor)
                                   else saliency)]
    if len(sal) != n or any(s.shape != (h, w) for s in sal):
        raise ValueError(f"saliency must be [N, H, W] = [{n}, {h}, {w}], got {[s.shape for s in sal][:3]}...")
    if any(np.isnan(s).any() for s in sal):
        raise ValueError("saliency has NaN values; pixels cannot be ordered")
    if list(thresholds) != sorted(thresholds) or not all(0.0 < t <= 1.0 for t in thresholds):
        raise ValueError(f"thresholds must be ascending fractions in (0, 1], got {list(thresholds)}")
    if masks is None:
        rng = np.random.default_rng(seed)
        masks = [random_mask(h, w, 0.01, rng) for _ in range(n)]
    masks = [np.asarray(m, dtype=bool) for m in masks]
    if len(masks) != n or any(m.shape != (h, w) for m in masks):
        raise ValueError(f"masks must be [N, H, W] = [{n}, {h}, {w}] booleans")
    estimate = _estimator(information)
    input_fn = uint8_to_input() if input_fn is None else input_fn
    t_count = len(thresholds)
    engine = Engine(model, batch_size, precision)

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        # Phase 1: the original and fully blurred image of every image, which decide the skip rules.
        def start(i):
            fb = blurred_image(images[i], masks[i])
            return fb, estimate(images[i]), estimate(fb)

        first = list(pool.map(start, range(n)))
        blurred = [f[0] for f in first]
        probs, top = _scores(engine, input_fn, images + blurred)
        if target is None:
            classes = top[:n].astype(np.int64)
        else:
            classes = np.broadcast_to(np.asarray(target, dtype=np.int64).reshape(-1), (n,)).copy()
        cls2 = np.concatenate([classes, classes])  # the originals, then the fully blurred images
        pred = {"sic": probs[np.arange(2 * n), cls2], "aic": (top == cls2).astype(np.float64)}

        info = np.full((n, t_count + 2), np.nan)
        info[:, 0] = [f[2] for f in first]
        info[:, -1] = [f[1] for f in first]
        preds = {m: np.full((n, t_count + 2), np.nan) for m in metrics}
        skipped = {}
        for m in metrics:
            preds[m][:, 0], preds[m][:, -1] = pred[m][n:], pred[m][:n]
            p_o, p_fb = preds[m][:, -1], preds[m][:, 0]
            skipped[m] = np.select([p_o < min_pred_value, info[:, 0] >= info[:, -1], p_fb >= p_o], [1, 2, 3], 0)

        # Phase 2: the threshold images of every image that some metric scores.
        todo = [i for i in range(n) if any(skipped[m][i] == 0 for m in metrics)]

        def middle(i):
            ims = [blurred_image(images[i], mk) for mk in _threshold_masks(sal[i], masks[i], thresholds)]
            return ims, [estimate(im) for im in ims]

        second = list(pool.map(middle, todo))
    if todo:
        probs2, top2 = _scores(engine, input_fn, [im for ims, _ in second for im in ims])
        probs2 = probs2.reshape(len(todo), t_count, -1)
        top2 = top2.reshape(len(todo), t_count)
        for row, i in enumerate(todo):
            info[i, 1:-1] = second[row][1]
            if "sic" in metrics:
                preds["sic"][i, 1:-1] = probs2[row, :, classes[i]]
            if "aic" in metrics:
                preds["aic"][i, 1:-1] = (top2[row] == classes[i]).astype(np.float64)

    curve_x = np.append(np.linspace(0.0, 1.0, num=num_data_points, endpoint=False), 1.0)
    results = {}
    for m in metrics:
        auc = np.full(n, np.nan)
        curves = np.full((n, num_data_points + 1), np.nan)
        for i in np.flatnonzero(skipped[m] == 0):
            _, curves[i], auc[i] = _curve(info[i], preds[m][i], keep_monotonous, num_data_points)
        results[m] = PicScores(m, auc, curves, curve_x, skipped[m].astype(np.int64), preds[m], info.copy(),
                               classes, tuple(thresholds))
    return results
