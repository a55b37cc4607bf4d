"""evaluate_store end to end on the center-pixel model: scores and curves written into the store equal the direct
metric calls, skips are reported with reasons, the summary and the plots are produced."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import fastig
from fastig import models
from fastig.io.store import Store
from fastig.metrics import evaluate_store, format_table
from fastig.metrics.evaluate import resolve_metrics
from fastig.metrics.insertion import causal_metric

STEP = 227 * 32  # 8 points per curve keeps the test fast


@pytest.fixture
def store_path(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, center in enumerate((40, 220)):
        image = cv2.GaussianBlur(rng.integers(0, 256, (227, 227), dtype=np.uint8), (3, 3), 0)
        image[113, 113] = center
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(str(path), image)
        paths.append(path)
    model = models.get("centerpixel")
    x = torch.stack([torch.from_numpy(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)).float()[None] / 255.0
                     for p in paths])
    target = model(x).argmax(1)
    attributions = fastig.attribute(model, x, target=target, method="ig", n_steps=8).sum(1)
    store = Store.create(tmp_path / "run" / "attributions.h5", model="centerpixel", method="ig",
                         options={"n_steps": 8}, shape=(227, 227))
    with store:
        store.write_rows(0, [str(p) for p in paths], target.tolist(), attributions)
    return store.path


def test_evaluate_store_writes_scores_curves_and_plots(store_path, tmp_path):
    rows = evaluate_store(store_path, ["insertion,deletion", "pic", "lossy_mse", "completeness"], step=STEP,
                          thresholds=(0.02, 0.3), information="png", image_plots=1, out_dir=tmp_path / "plots")
    names = [r.metric for r in rows]
    assert names == ["insertion", "deletion", "sic", "aic", "lossy_mse", "completeness", "completeness_relative"]
    with Store.open(store_path) as store:
        for name in ("insertion", "deletion"):
            values = store.metric(name)
            assert store.curve(name).shape == (2, 227 * 227 // STEP + 2)
            # equal to a direct call on the same inputs
            x = torch.stack([torch.from_numpy(cv2.imread(p, cv2.IMREAD_GRAYSCALE)).float()[None] / 255.0
                             for p in store.ids()])
            direct = causal_metric(models.get("centerpixel"), x, torch.from_numpy(store.attributions()), name,
                                   store.targets(), STEP)
            np.testing.assert_allclose(values, direct.auc, atol=1e-6)
        # SIC: the center-pixel model's softmax is ~0.56 < 0.8 -> skipped, with the reason; AIC is scored
        assert np.isnan(store.metric("sic")).all()
        assert (store.metric("sic_skipped") == 1).all()
        assert np.isfinite(store.metric("aic")).all() and (store.metric("aic_skipped") == 0).all()
        assert store.curve("aic").shape == (2, 1001)
        assert np.isfinite(store.metric("lossy_mse")).all()
        assert np.isfinite(store.metric("completeness")).all()
    sic = rows[2]
    assert sic.count == 0 and sic.skipped == {"low_prediction": 2}
    table = format_table(rows)
    assert "low_prediction: 2" in table and "insertion" in table
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert "insertion_deletion.png" in plots and "pic.png" in plots and "heatmaps_ig.png" in plots
    assert any(p.endswith("_insertion_deletion.png") for p in plots)
    assert cv2.imread(str(tmp_path / "plots" / "pic.png")) is not None


def test_resolve_metrics_and_errors(store_path):
    assert resolve_metrics("pic,insertion") == ["sic", "aic", "insertion"]
    with pytest.raises(ValueError, match="unknown metric"):
        resolve_metrics(["auc"])
    with pytest.raises(Exception, match="not found"):
        evaluate_store(store_path.parent / "missing.h5", ["insertion"])
