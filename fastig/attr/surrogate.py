"""Surrogate-model attributions: Lime and KernelShap (drop-ins for Captum's classes), their least-squares fits, and
a built-in superpixel segmentation for image feature masks.

Captum's default interpretable models come from scikit-learn (``Lasso(alpha=0.01)`` for Lime, weighted
``LinearRegression`` for KernelShap). fastig does not depend on scikit-learn: :class:`Lasso` and
:class:`LinearRegression` here solve the same objectives with numpy/scipy (the Lasso with scikit-learn's own cyclic
coordinate descent and duality-gap stopping rule). Any Captum-style interpretable model (an object with
``fit(DataLoader of (x, y, weight))`` and ``representation()``) is accepted as well.

Sampling follows Captum draw for draw (the same global-generator calls in the same order), so with the same seed
the same perturbations are drawn; what differs is that the perturbed copies are evaluated in large batches through
:func:`fastig.attr.perturbation.evaluate_copies` and the default similarity kernels are computed batch-wise.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Callable

import numpy as np
import scipy.linalg
import torch
from torch.utils.data import DataLoader, TensorDataset

from fastig.attr._base import Attribution
from fastig.attr._inputs import format_inputs, format_output
from fastig.attr.perturbation import (
    mixed,
    check_n_samples,
    check_perturbations_per_eval,
    evaluate_copies,
    format_feature_mask,
    format_perturbation_baselines,
    model_output,
)
from fastig.core import progress
from fastig.core.targets import Target, format_additional_args
from fastig.errors import InvalidArgumentError, check_int

# -- least-squares surrogates ------------------------------------------------------------------------------------


def _arrays_from(train_data: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(x, y, weights) as float64 arrays from a DataLoader of (x, y[, w]) batches (Captum's convention)."""
    xs, ys, ws = [], [], []
    for batch in train_data:
        if len(batch) not in (2, 3):
            raise ValueError("training batches must be (x, y) or (x, y, weight)")
        xs.append(np.asarray(batch[0].detach().cpu(), dtype=np.float64))
        ys.append(np.asarray(batch[1].detach().cpu(), dtype=np.float64).reshape(len(xs[-1]), -1))
        if len(batch) == 3:
            ws.append(np.asarray(batch[2].detach().cpu(), dtype=np.float64).reshape(-1))
    y = np.concatenate(ys)
    if y.shape[1] != 1:
        raise ValueError(f"the surrogate fits one output per sample, got {y.shape[1]}")
    return np.concatenate(xs), y[:, 0], (np.concatenate(ws) if ws else None)


def _centered(x: np.ndarray, y: np.ndarray, w: np.ndarray | None, fit_intercept: bool):
    """Weighted centering and sqrt(weight) row scaling, as scikit-learn preprocesses a weighted linear fit."""
    n = x.shape[0]
    w = np.ones(n) if w is None else w * (n / w.sum())  # scikit-learn rescales weights to sum to n
    if fit_intercept:
        x_offset, y_offset = np.average(x, axis=0, weights=w), np.average(y, weights=w)
    else:
        x_offset, y_offset = np.zeros(x.shape[1]), 0.0
    root = np.sqrt(w)
    return (x - x_offset) * root[:, None], (y - y_offset) * root, x_offset, y_offset


class _LinearSurrogate:
    """Captum's interpretable-model interface: ``fit(DataLoader)``, ``representation()`` [1, F], ``bias()``."""

    coef_: np.ndarray | None = None
    intercept_: float = 0.0

    def fit(self, train_data: Any, **kwargs: Any) -> dict:
        x, y, w = _arrays_from(train_data)
        self.fit_arrays(x, y, w)
        return {}

    def fit_arrays(self, x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> "_LinearSurrogate":
        raise NotImplementedError

    def representation(self) -> torch.Tensor:
        if self.coef_ is None:
            raise RuntimeError("fit the model first")
        return torch.tensor(self.coef_, dtype=torch.float32).reshape(1, -1)

    def bias(self) -> torch.Tensor:
        return torch.tensor([self.intercept_], dtype=torch.float32)


class LinearRegression(_LinearSurrogate):
    """Weighted least squares with an intercept: minimizes ``sum_i w_i (y_i - x_i . coef - b)^2``.

    The objective of scikit-learn's ``LinearRegression().fit(x, y, sample_weight=w)`` (Captum's KernelShap model),
    solved the same way: weighted centering, then the minimum-norm ``scipy.linalg.lstsq`` solution, in float64.
    """

    def __init__(self, fit_intercept: bool = True) -> None:
        self.fit_intercept = fit_intercept

    def fit_arrays(self, x, y, w=None):
        xc, yc, x_offset, y_offset = _centered(x, y, w, self.fit_intercept)
        self.coef_ = scipy.linalg.lstsq(xc, yc)[0]
        self.intercept_ = float(y_offset - x_offset @ self.coef_)
        return self


class Lasso(_LinearSurrogate):
    """L1-regularized weighted least squares, the objective of scikit-learn's ``Lasso(alpha)`` with sample weights:

        ``1 / (2 * sum(w)) * sum_i w_i (y_i - x_i . coef - b)^2 + alpha * ||coef||_1``

    (Captum's Lime default is ``alpha=0.01``.) Solved like scikit-learn: cyclic coordinate descent from zero on the
    weighted, centered data, stopped when the duality gap falls below ``tol * ||y||^2`` (checked once the largest
    coefficient update is below ``tol`` relative to the largest coefficient), or after ``max_iter`` sweeps.
    """

    def __init__(self, alpha: float = 1.0, fit_intercept: bool = True, max_iter: int = 1000, tol: float = 1e-4) -> None:
        if alpha < 0:
            raise ValueError(f"alpha must be non-negative, got {alpha}")
        self.alpha, self.fit_intercept, self.max_iter, self.tol = alpha, fit_intercept, max_iter, tol
        self.n_iter_ = 0

    def fit_arrays(self, x, y, w=None):
        xc, yc, x_offset, y_offset = _centered(x, y, w, self.fit_intercept)
        self.coef_, self.n_iter_ = lasso_coordinate_descent(xc, yc, self.alpha * xc.shape[0], self.max_iter, self.tol)
        self.intercept_ = float(y_offset - x_offset @ self.coef_)
        return self


def lasso_coordinate_descent(x: np.ndarray, y: np.ndarray, l1: float, max_iter: int, tol: float):
    """Minimize ``0.5 * ||y - x coef||^2 + l1 * ||coef||_1`` by cyclic coordinate descent (scikit-learn's rule).

    Returns (coef, number of sweeps).
    """
    n_features = x.shape[1]
    coef = np.zeros(n_features)
    residual = y.copy()
    col_norms = (x**2).sum(0)
    gap_tol = tol * float(y @ y)
    sweeps = 0
    for sweeps in range(1, max_iter + 1):
        largest, largest_step = 0.0, 0.0
        for j in range(n_features):
            if col_norms[j] == 0.0:
                continue
            old = coef[j]
            column = x[:, j]
            if old != 0.0:
                residual += old * column
            rho = column @ residual
            new = math.copysign(max(abs(rho) - l1, 0.0), rho) / col_norms[j]
            coef[j] = new
            if new != 0.0:
                residual -= new * column
            largest_step = max(largest_step, abs(new - old))
            largest = max(largest, abs(new))
        if largest == 0.0 or largest_step / largest < tol or sweeps == max_iter:
            if _lasso_gap(x, y, coef, residual, l1) < gap_tol:
                break
    return coef, sweeps


def _lasso_gap(x, y, coef, residual, l1) -> float:
    """Duality gap of the Lasso problem at ``coef`` (``residual = y - x coef``)."""
    dual_norm = np.max(np.abs(x.T @ residual)) if x.shape[1] else 0.0
    r2 = float(residual @ residual)
    scale = l1 / dual_norm if dual_norm > l1 else 1.0
    gap = 0.5 * r2 * (1.0 + scale**2) if dual_norm > l1 else r2
    return gap + l1 * float(np.abs(coef).sum()) - scale * float(residual @ y)


# -- similarity kernels and samplers (Captum's defaults) ---------------------------------------------------------


def _flatten(values: Any) -> torch.Tensor:
    values = values if isinstance(values, tuple) else (values,)
    return torch.cat([v.reshape(-1) for v in values])


class ExpKernelSimilarity:
    """``exp(-d^2 / (2 * kernel_width^2))`` of the distance between the original and the perturbed input (Captum's
    ``get_exp_kernel_similarity_function``): cosine distance ``1 - cos`` or euclidean, on float32 values."""

    def __init__(self, distance_mode: str = "cosine", kernel_width: float = 1.0) -> None:
        if distance_mode not in ("cosine", "euclidean"):
            raise ValueError("distance_mode must be either cosine or euclidean.")
        self.distance_mode, self.kernel_width = distance_mode, kernel_width

    def __call__(self, original_inp: Any, perturbed_inp: Any, interpretable_sample: Any = None, **kwargs: Any) -> float:
        return float(self.batched(_flatten(original_inp), _flatten(perturbed_inp).unsqueeze(0))[0])

    def batched(self, original: torch.Tensor, perturbed: torch.Tensor, interpretable: Any = None) -> torch.Tensor:
        """Similarities [k] of ``perturbed`` [k, D] (flattened inputs) to ``original`` [D]."""
        original, perturbed = original.float(), perturbed.float()
        if self.distance_mode == "cosine":
            distance = 1 - torch.nn.functional.cosine_similarity(original.unsqueeze(0), perturbed, dim=1)
        else:
            distance = torch.linalg.vector_norm(perturbed - original, dim=1)
        return torch.exp(-(distance.double() ** 2) / (2 * self.kernel_width**2)).float()


def get_exp_kernel_similarity_function(distance_mode: str = "cosine", kernel_width: float = 1.0) -> ExpKernelSimilarity:
    """Captum's similarity-function factory (same name and arguments)."""
    return ExpKernelSimilarity(distance_mode, kernel_width)


def default_perturb_func(original_inp: Any, **kwargs: Any) -> torch.Tensor:
    """Each interpretable feature kept with probability 0.5 (Captum's draw: ``torch.bernoulli`` of a [1, F] row)."""
    device = (original_inp if isinstance(original_inp, torch.Tensor) else original_inp[0]).device
    probs = torch.ones(1, int(kwargs["num_interp_features"])) * 0.5
    return torch.bernoulli(probs).to(device=device).long()


# -- superpixels -------------------------------------------------------------------------------------------------


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


# -- Lime --------------------------------------------------------------------------------------------------------


def _mask_or_superpixels(feature_mask: Any, n_segments: int | None, xs: tuple[torch.Tensor, ...]) -> Any:
    """``feature_mask``, or the :func:`superpixels` of the image batch when only ``n_segments`` is given."""
    if feature_mask is None and n_segments is not None:
        if len(xs) != 1 or xs[0].dim() != 4:
            raise ValueError("n_segments needs a single image batch [N, C, H, W] as inputs")
        feature_mask = superpixels(xs[0], n_segments)
    return feature_mask


def _lime_feature_mask(feature_mask: Any, xs: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], int]:
    """Captum's Lime masks: per-scalar features by default; user ids shifted to start at 0 (with a warning)."""
    if feature_mask is not None:
        raw = feature_mask if isinstance(feature_mask, tuple) else (feature_mask,)
        if all(isinstance(m, torch.Tensor) and not m.is_floating_point() for m in raw):
            low = min(int(m.min()) for m in raw if m.numel())
            if low != 0:
                warnings.warn("Minimum element in feature mask is not 0, shifting indices to start at 0.", stacklevel=3)
                raw = tuple(m - low for m in raw)
        feature_mask = raw if isinstance(feature_mask, tuple) else raw[0]
    masks = format_feature_mask(feature_mask, xs)
    return masks, int(max(int(m.max()) for m in masks if m.numel())) + 1


def _example(value: Any, i: int, n: int) -> Any:
    """Example ``i`` of a per-example tensor/list (first dim ``n``); anything else is shared by all examples."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value[i : i + 1]
    if isinstance(value, list) and len(value) == n:
        return [value[i]]
    return value


class Lime(Attribution):
    """LIME (Ribeiro et al. 2016): a weighted linear surrogate fitted to the model's outputs on random on/off
    patterns of interpretable features (groups of input scalars given by ``feature_mask``).

    Same constructor, ``attribute()`` signature, defaults and sampling as ``captum.attr.Lime``: a Lasso with
    ``alpha=0.01`` (fastig's numpy :class:`Lasso`, scikit-learn's objective), the exponential cosine kernel of
    width 1, and features kept with probability 0.5. Extra keyword: ``n_segments`` builds the feature mask with
    :func:`superpixels` (SLIC-like) when no ``feature_mask`` is given, for image batches [N, C, H, W].
    ``perturbations_per_eval=None`` (fastig's default) batches as many samples per model call as fit in memory.
    """

    def __init__(
        self,
        forward_func: Callable,
        interpretable_model: Any = None,
        similarity_func: Callable | None = None,
        perturb_func: Callable | None = None,
    ) -> None:
        super().__init__(forward_func)
        self.interpretable_model = Lasso(alpha=0.01) if interpretable_model is None else interpretable_model
        self.similarity_func = get_exp_kernel_similarity_function() if similarity_func is None else similarity_func
        self.perturb_func = default_perturb_func if perturb_func is None else perturb_func
        for name in ("fit", "representation"):
            if not callable(getattr(self.interpretable_model, name, None)):
                raise TypeError(f"interpretable_model needs a {name}() method (Captum's Model interface)")

    multiplies_by_inputs = False

    def attribute(
        self,
        inputs: Any,
        baselines: Any = None,
        target: Any = None,
        additional_forward_args: Any = None,
        feature_mask: Any = None,
        n_samples: int = 25,
        perturbations_per_eval: int | None = None,
        return_input_shape: bool = True,
        show_progress: bool = False,
        *,
        n_segments: int | None = None,
    ) -> Any:
        return self._attribute(
            inputs, baselines, target, additional_forward_args, feature_mask, n_samples, perturbations_per_eval,
            return_input_shape, show_progress, n_segments, {},
        )

    def _attribute(self, inputs, baselines, target, additional_forward_args, feature_mask, n_samples,
                   perturbations_per_eval, return_input_shape, show_progress, n_segments, extra_kwargs):
        check_perturbations_per_eval(perturbations_per_eval)
        check_n_samples(n_samples)
        xs, is_tuple = format_inputs(inputs, same_batch=False)
        bs = format_perturbation_baselines(baselines, xs)
        feature_mask = _mask_or_superpixels(feature_mask, n_segments, xs)
        masks, n_features = _lime_feature_mask(feature_mask, xs)
        if n_features > 10000:
            warnings.warn(f"fitting a surrogate with {n_features} features is slow: group them with a feature_mask "
                          "or n_segments", stacklevel=3)
        args = format_additional_args(additional_forward_args)
        n = xs[0].shape[0]
        name = type(self).__name__
        if n > 1:  # Captum's rule: one output per example (a surrogate each), or one for the batch (one surrogate)
            test = model_output(self.forward_func, xs, Target(target, n), args)
            if test.numel() == 1:
                if perturbations_per_eval not in (None, 1):
                    raise InvalidArgumentError(
                        f"perturbations_per_eval={perturbations_per_eval}: the model returns one value for the whole "
                        "batch, so every model call can hold only one perturbed copy; use 1 (or None)"
                    )
                coef = self._fit_one(xs, is_tuple, bs, masks, n_features, Target(target, n), args, n_samples, 1,
                                     extra_kwargs, test, name, show_progress).reshape(-1)
                if not return_input_shape:
                    return coef.reshape(1, -1)
                return format_output(tuple(coef.to(x.device)[m].expand_as(x)[0:1].float() for m, x in zip(masks, xs)),
                                     is_tuple)
            if test.numel() != n:
                raise InvalidArgumentError(
                    f"the model returned {test.numel()} outputs for a batch of {n}; {name} needs one scalar per "
                    "example or one for the whole batch (give a target to choose an output)"
                )
        coefs, attributions = [], []
        with progress.task(name, n, "examples", show=show_progress) as done:
            for i in range(n):
                ex = tuple(x[i : i + 1] for x in xs)
                ex_b = tuple(_example(b, i, n) for b in bs)
                ex_m = tuple(_example(m, i, n) for m in masks)
                ex_args = tuple(_example(a, i, n) for a in args)
                coef = self._fit_one(ex, is_tuple, ex_b, ex_m, n_features, Target(_example(target, i, n), 1), ex_args,
                                     n_samples, perturbations_per_eval, extra_kwargs, None,
                                     f"example {i + 1}", False).reshape(-1)
                coefs.append(coef.reshape(1, -1))
                attributions.append(tuple(coef.to(x.device)[m].expand_as(x).float() for m, x in zip(ex_m, ex)))
                done.advance()
        if not return_input_shape:
            return coefs[0] if n == 1 else torch.cat(coefs)
        return format_output(tuple(torch.cat(parts) for parts in zip(*attributions)), is_tuple)

    def _fit_one(self, xs, is_tuple, bs, masks, n_features, target, args, n_samples, perturbations_per_eval,
                 extra_kwargs, initial, label, show_progress) -> torch.Tensor:
        """Sample, evaluate, weigh and fit the surrogate for one example (or for the whole batch when the model
        returns one value for it: ``initial``); returns its coefficients."""
        user_inputs = xs if is_tuple else xs[0]
        kwargs = dict(baselines=bs if is_tuple else bs[0], feature_mask=masks if is_tuple else masks[0],
                      num_interp_features=n_features, **extra_kwargs)
        samples = self._draw(user_inputs, kwargs, n_samples)  # [S, F] long
        original = _flatten(xs)
        batched_similarity = getattr(self.similarity_func, "batched", None)

        def build(start: int, stop: int):
            k = stop - start
            bits = samples[start:stop].to(xs[0].device).bool()
            copies = []
            for x, b, m in zip(xs, bs, masks):
                keep = bits[:, m.reshape(-1)].reshape((k,) + tuple(m.shape))
                copies.append(mixed(x, b, ~keep))
            if batched_similarity is not None:
                flat = torch.cat([c.reshape(k, -1) for c in copies], 1)
                similarity = batched_similarity(original, flat, samples[start:stop]).reshape(-1)
            else:
                similarity = []
                for j in range(k):
                    one = tuple(c[j * len(x) : (j + 1) * len(x)] for c, x in zip(copies, xs))
                    sim = self.similarity_func(user_inputs, one if is_tuple else one[0],
                                               samples[start + j : start + j + 1], **kwargs)
                    similarity.append(sim.reshape(-1) if isinstance(sim, torch.Tensor) else torch.tensor([float(sim)]))
                similarity = torch.cat([s.float().cpu() for s in similarity])
            return tuple(copies), similarity

        outputs, similarities = [], []
        for _, out, similarity in evaluate_copies(self.forward_func, build, samples.shape[0], xs, target, args,
                                                  perturbations_per_eval, show_progress, label, unit="samples",
                                                  initial=initial):
            outputs.append(out.reshape(-1))
            similarities.append(similarity.float().cpu())
        data = TensorDataset(samples.float(), torch.cat(outputs).float().cpu(), torch.cat(similarities))
        self.interpretable_model.fit(DataLoader(data, batch_size=samples.shape[0]))
        return self.interpretable_model.representation().detach().float().cpu()

    def _draw(self, user_inputs, kwargs, n_samples) -> torch.Tensor:
        """Interpretable samples [S, F], drawn exactly as Captum draws them (one perturb_func call each)."""
        generator = self.perturb_func(user_inputs, **kwargs) if inspect.isgeneratorfunction(self.perturb_func) else None
        rows = []
        for _ in range(n_samples):
            try:
                sample = next(generator) if generator is not None else self.perturb_func(user_inputs, **kwargs)
            except StopIteration:
                warnings.warn("Generator completed prior to given n_samples iterations!", stacklevel=4)
                break
            rows.append(sample.reshape(1, -1).long().cpu())
        if not rows:
            raise ValueError("perturb_func produced no samples")
        return torch.cat(rows)


# -- KernelShap --------------------------------------------------------------------------------------------------


class KernelShap(Lime):
    """Kernel SHAP (Lundberg & Lee 2017): Lime with the Shapley kernel, as ``captum.attr.KernelShap`` does it.

    Coalition sizes are drawn with probability proportional to ``(F - 1) / (k (F - k))``, the features of a
    coalition by thresholding ``torch.randn`` (Captum's draws, in Captum's order, after the all-on and all-off
    samples), every sample has weight 1 except the all-on/all-off ones (``1e6``), and the surrogate is weighted
    least squares with an intercept (fastig's numpy :class:`LinearRegression`, scikit-learn's objective).
    """

    inf_weight = 1000000.0

    def __init__(self, forward_func: Callable) -> None:
        super().__init__(forward_func, interpretable_model=LinearRegression(),
                         similarity_func=_ShapleyKernel(self.inf_weight), perturb_func=self.kernel_shap_perturb_generator)

    def attribute(
        self,
        inputs: Any,
        baselines: Any = None,
        target: Any = None,
        additional_forward_args: Any = None,
        feature_mask: Any = None,
        n_samples: int = 25,
        perturbations_per_eval: int | None = None,
        return_input_shape: bool = True,
        show_progress: bool = False,
        *,
        n_segments: int | None = None,
    ) -> Any:
        xs, _ = format_inputs(inputs, same_batch=False)
        feature_mask = _mask_or_superpixels(feature_mask, n_segments, xs)
        _, n_features = _lime_feature_mask(feature_mask, xs)
        sizes = torch.arange(n_features, dtype=torch.float)
        probs = torch.tensor(n_features - 1) / (sizes * (n_features - sizes))
        probs[0] = 0.0
        return self._attribute(
            inputs, baselines, target, additional_forward_args, feature_mask, n_samples, perturbations_per_eval,
            return_input_shape, show_progress, None,
            {"num_select_distribution": torch.distributions.Categorical(probs)},
        )

    def kernel_shap_similarity_kernel(self, _: Any, __: Any, interpretable_sample: torch.Tensor, **kwargs: Any):
        return _ShapleyKernel(self.inf_weight)(_, __, interpretable_sample, **kwargs)

    @staticmethod
    def kernel_shap_perturb_generator(original_inp: Any, **kwargs: Any):
        """All features on, all off, then coalitions of a Categorical size with features picked by randn ranks."""
        device = (original_inp if isinstance(original_inp, torch.Tensor) else original_inp[0]).device
        n_features = int(kwargs["num_interp_features"])
        yield torch.ones(1, n_features, device=device, dtype=torch.long)
        yield torch.zeros(1, n_features, device=device, dtype=torch.long)
        while True:
            size = kwargs["num_select_distribution"].sample()
            values = torch.randn(1, n_features)
            threshold = torch.kthvalue(values, n_features - size).values.item()
            yield (values > threshold).to(device=device).long()


class _ShapleyKernel:
    """Weight 1 per coalition, ``inf_weight`` for the empty and the full coalition (Captum's KernelShap kernel)."""

    def __init__(self, inf_weight: float) -> None:
        self.inf_weight = inf_weight

    def __call__(self, _: Any, __: Any, interpretable_sample: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.batched(None, None, interpretable_sample.reshape(1, -1))

    def batched(self, original: Any, perturbed: Any, interpretable: torch.Tensor) -> torch.Tensor:
        selected = interpretable.sum(1)
        edge = (selected == 0) | (selected == interpretable.shape[1])
        return torch.where(edge, self.inf_weight, 1.0).float()
