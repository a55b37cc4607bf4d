"""fastig.metrics.baseline_sensitivity (rank correlation, top-k overlap) and the stability table."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from fastig.core.baselines import SegmentBaselines
from fastig.metrics import baseline_sensitivity, rank_correlation, stability_table, top_k_overlap

from _shared import SmallCNN


def test_rank_correlation_is_spearman_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, (3, 6, 7)).astype(float)  # many ties
    b = a + rng.normal(size=a.shape)
    ours = rank_correlation(a, b, absolute=False)
    expected = [spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12)
    line = np.arange(100.0).reshape(1, 10, 10)
    assert rank_correlation(line, line)[0] == pytest.approx(1.0)
    assert rank_correlation(line, -line, absolute=False)[0] == pytest.approx(-1.0)
    assert np.isnan(rank_correlation(np.ones((1, 3, 3)), line[:, :3, :3])[0])


def test_top_k_overlap_known_values():
    line = np.arange(100.0).reshape(1, 10, 10)
    assert top_k_overlap(line, line, 0.1)[0] == 1.0
    assert top_k_overlap(line, 99 - line, 0.1)[0] == 0.0  # top 10 of one are the bottom 10 of the other
    demoted = line.copy()
    demoted.reshape(-1)[95:] = 0.5  # b's top 10 are 85..94: 90..94 are shared with a's 90..99
    assert top_k_overlap(line, demoted, 0.1)[0] == 0.5
    channels = np.stack([line, line], 1)  # [N, C, H, W]: channels are summed
    assert top_k_overlap(channels, line, 0.2)[0] == 1.0
    with pytest.raises(ValueError, match="top_k"):
        top_k_overlap(line, line, 0.0)


def test_baseline_sensitivity_stores_and_plots(tmp_path):
    model = SmallCNN().eval()
    x = torch.randn(3, 3, 8, 8)
    result = baseline_sensitivity(model, x, method="ig", n_steps=4, top_k=0.25,
                                  baselines={"zeros": None, "zero again": 0.0,
                                             "segments": SegmentBaselines(n_segments=4, n_samples=2, fill="mean")})
    same = result.spearman["zeros", "zero again"]
    np.testing.assert_allclose(same, 1.0)  # the same baseline twice: the same map
    np.testing.assert_allclose(result.overlap["zeros", "zero again"], 1.0)
    assert result.spearman["zeros", "segments"].shape == (3,)
    assert len(result.rows()) == 9 and len(result.summary()) == 3
    pictures = [np.zeros((8, 8, 3), np.uint8)] * 3
    written = result.save(tmp_path, images=pictures, class_names=[f"c{i}" for i in range(5)])
    names = {p.name for p in written}
    assert {"baseline_sensitivity.h5", "baseline_sensitivity.png", "baseline_sensitivity_maps.png"} <= names
    assert (tmp_path / "baseline_sensitivity_summary.md").read_text().count("| zeros vs") == 2


def test_stability_table_idgi_closes_the_gap(tmp_path):
    model = SmallCNN().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    table = stability_table(model, x, variants={"IG": ("ig", {"rule": "riemann_left"}),
                                                "IDGI": ("ig", {"rule": "riemann_left", "idgi": True})},
                            steps=(2, 8), metric_options={"step": 16})
    assert [(r["variant"], r["n_steps"]) for r in table.rows] == [("IG", 2), ("IG", 8), ("IDGI", 2), ("IDGI", 8)]
    assert all(r["abs_delta_mean"] < 1e-9 for r in table.rows if r["variant"] == "IDGI")
    assert all(0 <= r["insertion_mean"] <= 1 for r in table.rows)
    written = table.save(tmp_path / "stability")
    assert {p.name for p in written} == {"stability.md", "stability.csv", "stability_delta.png",
                                         "stability_insertion.png", "stability_deletion.png"}
