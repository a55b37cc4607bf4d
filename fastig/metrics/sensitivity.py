"""How much an explanation depends on its baseline: the same method with different baselines, compared per image.

``baseline_sensitivity(model, inputs, method="ig", baselines={"zeros": None, "segments": SegmentBaselines()})``
attributes every image once per baseline and compares each pair of maps (channels summed) with

- the **rank correlation**: Spearman's rho over the pixels (average ranks for ties), 1 = the same order;
- the **top-k overlap**: the share of the ``top_k`` most important pixels (a fraction of all pixels) that both
  maps put there, 1 = the same top pixels; a random pair of maps overlaps by about ``top_k``.

Pixels are ranked by ``|attribution|`` (``absolute=True``, what heatmaps show) or by the signed value.
:meth:`SensitivityResult.save` stores the maps and scores (HDF5), the per-image table (CSV) and its summary
(Markdown), a plot of the per-image rank correlations and a grid of the maps.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy.stats import rankdata


def _flat(maps) -> np.ndarray:
    """Maps [N, H, W] or [N, C, H, W] (channels summed) -> [N, pixels] float64."""
    x = maps.detach().double().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, np.float64)
    if x.ndim == 4:
        x = x.sum(1)
    if x.ndim != 3:
        raise ValueError(f"maps must be [N, H, W] or [N, C, H, W], got shape {x.shape}")
    return x.reshape(x.shape[0], -1)


def _pair(a, b, absolute: bool) -> tuple[np.ndarray, np.ndarray]:
    a, b = _flat(a), _flat(b)
    if a.shape != b.shape:
        raise ValueError(f"the two sets of maps differ in shape: {a.shape} and {b.shape}")
    return (np.abs(a), np.abs(b)) if absolute else (a, b)


def rank_correlation(a, b, absolute: bool = True) -> np.ndarray:
    """Spearman's rho between maps ``a`` and ``b`` per image [N] (NaN where a map is constant)."""
    a, b = _pair(a, b, absolute)
    out = np.full(a.shape[0], np.nan)
    for i, (x, y) in enumerate(zip(a, b)):
        rx, ry = rankdata(x) - (x.size + 1) / 2, rankdata(y) - (y.size + 1) / 2
        norm = np.sqrt((rx * rx).sum() * (ry * ry).sum())
        if norm > 0:
            out[i] = float((rx * ry).sum() / norm)
    return out


def top_k_overlap(a, b, top_k: float = 0.1, absolute: bool = True) -> np.ndarray:
    """Per image [N]: the share of the ``top_k`` (fraction of the pixels) highest-ranked pixels of ``a`` that are
    also among those of ``b``. Ties at the cut are broken by pixel index (a stable sort), the same for both."""
    if not 0 < top_k <= 1:
        raise ValueError(f"top_k must be a fraction in (0, 1], got {top_k!r}")
    a, b = _pair(a, b, absolute)
    k = max(1, int(round(top_k * a.shape[1])))
    out = np.empty(a.shape[0])
    for i, (x, y) in enumerate(zip(a, b)):
        top_x = np.argsort(-x, kind="stable")[:k]
        top_y = np.argsort(-y, kind="stable")[:k]
        out[i] = np.intersect1d(top_x, top_y).size / k
    return out


@dataclass
class SensitivityResult:
    """Maps per baseline ([N, H, W] each) and, per pair of baselines, the per-image scores [N]."""

    names: list[str]
    maps: dict[str, np.ndarray]
    spearman: dict[tuple[str, str], np.ndarray]
    overlap: dict[tuple[str, str], np.ndarray]
    top_k: float
    targets: np.ndarray
    settings: dict

    def rows(self, ids: Sequence[str] | None = None) -> list[dict]:
        """One row per image and pair: image, pair, rank correlation, top-k overlap."""
        n = len(self.targets)
        ids = list(ids) if ids is not None else [str(i) for i in range(n)]
        return [{"image": ids[i], "target": int(self.targets[i]), "baselines": f"{a} vs {b}",
                 "rank_correlation": float(self.spearman[a, b][i]), "top_k_overlap": float(self.overlap[a, b][i])}
                for (a, b) in self.spearman for i in range(n)]

    def summary(self) -> list[dict]:
        """One row per pair: mean and median of both scores over the images."""
        return [{"baselines": f"{a} vs {b}", "images": len(self.targets),
                 "rank_correlation_mean": float(np.nanmean(self.spearman[a, b])),
                 "rank_correlation_median": float(np.nanmedian(self.spearman[a, b])),
                 f"top_{self.top_k:g}_overlap_mean": float(np.mean(self.overlap[a, b]))}
                for (a, b) in self.spearman]

    def save(self, folder, images: Sequence[np.ndarray] | None = None, ids: Sequence[str] | None = None,
             class_names: Sequence[str] | None = None, max_pictures: int = 8) -> list[Path]:
        """Write ``baseline_sensitivity.{h5,csv,md,png}`` and, given the images (uint8 RGB), a grid of each
        image and its map per baseline (``baseline_sensitivity_maps.png``). Returns the paths."""
        import h5py

        from fastig.io.heatmap import grid, render_heatmap, save_png
        from fastig.io.tables import write_table
        from fastig.metrics.plots import save_curve_plot

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        with h5py.File(folder / "baseline_sensitivity.h5", "w") as f:
            f.attrs["settings"] = repr(self.settings)
            f.attrs["top_k"] = self.top_k
            f["targets"] = self.targets
            for name in self.names:
                f[f"maps/{name}"] = self.maps[name].astype(np.float32)
            for (a, b) in self.spearman:
                f[f"rank_correlation/{a} vs {b}"] = self.spearman[a, b]
                f[f"top_k_overlap/{a} vs {b}"] = self.overlap[a, b]
        written.append(folder / "baseline_sensitivity.h5")
        write_table(self.rows(ids), folder / "baseline_sensitivity")  # .md and .csv: per image
        write_table(self.summary(), folder / "baseline_sensitivity_summary",
                    title=f"Baseline sensitivity of {self.settings.get('method')}")
        written += [folder / "baseline_sensitivity.csv", folder / "baseline_sensitivity_summary.md"]
        index = np.arange(len(self.targets), dtype=np.float64)
        series = {f"{a} vs {b} (mean {np.nanmean(self.spearman[a, b]):.2f})": (index, self.spearman[a, b])
                  for (a, b) in self.spearman}
        written.append(save_curve_plot(folder / "baseline_sensitivity.png", series, ylim=(-1.0, 1.0),
                                       title=f"{self.settings.get('method')}: rank correlation between baselines",
                                       xlabel="image", ylabel="Spearman rho"))
        if images is not None:
            rows, labels = [], []
            for i, image in enumerate(list(images)[:max_pictures]):
                rows.append([image] + [render_heatmap(self.maps[n][i], image) for n in self.names])
                target = int(self.targets[i])
                labels.append(class_names[target] if class_names is not None else f"class {target}")
            written.append(save_png(folder / "baseline_sensitivity_maps.png",
                                    grid(rows, row_labels=labels, col_labels=["image"] + list(self.names))))
        return written


def _described(baseline) -> Any:
    from fastig.core.baselines import SegmentBaselines

    if isinstance(baseline, SegmentBaselines):
        return baseline.describe()
    if isinstance(baseline, torch.Tensor):
        return f"tensor {tuple(baseline.shape)}"
    return "zeros" if baseline is None else baseline


def baseline_sensitivity(model, inputs: torch.Tensor, target=None, method: str = "ig",
                         baselines: Mapping[str, Any] | None = None, top_k: float = 0.1, absolute: bool = True,
                         **options) -> SensitivityResult:
    """Attribute ``inputs`` with ``method`` once per entry of ``baselines`` ({name: what the method's
    ``baselines=`` takes: None, a tensor, ``"segments"``, a :class:`~fastig.core.baselines.SegmentBaselines`})
    and compare every pair of maps (see the module docstring). ``target`` defaults to the top-1 class."""
    import fastig
    from fastig.core.baselines import SegmentBaselines
    from fastig.metrics.insertion import explained_classes

    baselines = dict(baselines) if baselines is not None else {"zeros": None, "segments": SegmentBaselines()}
    if len(baselines) < 2:
        raise ValueError(f"baseline_sensitivity compares at least two baselines, got {list(baselines)}")
    classes = explained_classes(model, inputs, target).to(inputs.device)
    maps = {}
    for name, baseline in baselines.items():
        result = fastig.attribute(model, inputs, target=classes, method=method, baselines=baseline, **options)
        result = result[0] if isinstance(result, tuple) else result
        maps[name] = result.detach().double().sum(1).cpu().numpy()
    pairs = list(itertools.combinations(baselines, 2))
    settings = {"method": method, "options": options, "absolute": absolute,
                "baselines": {n: _described(b) for n, b in baselines.items()}}
    return SensitivityResult(list(baselines), maps,
                             {(a, b): rank_correlation(maps[a], maps[b], absolute) for a, b in pairs},
                             {(a, b): top_k_overlap(maps[a], maps[b], top_k, absolute) for a, b in pairs},
                             top_k, classes.cpu().numpy(), settings)
