"""Each study script end to end on a miniature input it makes (random weights, tiny sizes): the table's shape and a
value known in advance."""

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import center_pixel  # noqa: E402
import gnl_table  # noqa: E402
import idgi_study  # noqa: E402
import latent_vs_ig  # noqa: E402

import _study  # noqa: E402


def test_idgi_study(tmp_path):
    rows = idgi_study.main(["--out", str(tmp_path), "--size", "1", "--methods", "ig", "--steps", "2,4",
                            "--metrics", "insertion", "--metric-step", "20000"])
    assert len(rows) == 2 * 2 * 2  # IDGI off/on x 2 step counts x 2 filters
    assert [(r["idgi"], r["steps"], r["filter"]) for r in rows[:4]] == [
        ("no", 2, "correct"), ("no", 2, "correct, confidence >= 0.5"), ("no", 4, "correct"),
        ("no", 4, "correct, confidence >= 0.5")]
    assert all(r["images"] == 1 for r in rows)  # the center-pixel model is always right, softmax ~0.53
    # the center-pixel model is linear: IG is exact at any step count, so its map (and score) does not change
    ig = [r["insertion"] for r in rows if r["idgi"] == "no" and r["filter"] == "correct"]
    assert ig[0] == pytest.approx(ig[1], abs=1e-12)
    relative = [r["abs_delta"] / 1e5 for r in rows if r["idgi"] == "yes"]  # logits are ~1e5
    assert max(relative) < 1e-6  # the full path including alpha = 1: IDGI closes the completeness gap
    assert (tmp_path / "idgi_table.md").read_text().count("| centerpixel |") == 8
    assert (tmp_path / "centerpixel_correct_delta.png").is_file()


def test_gnl_table_matches_an_independent_insertion(tmp_path):
    rows = gnl_table.main(["--out", str(tmp_path), "--models", "resnet18", "--size", "1", "--steps", "2",
                           "--metric-step", "12544"])
    assert len(rows) == 1 and set(rows[0]) == {"model", "images", "IG insertion", "IG deletion",
                                               "GNL-IG insertion", "GNL-IG deletion"}
    from fastig import models
    from fastig.io.images import read_image
    from fastig.io.store import Store
    from fastig.metrics import insertion
    from fastig.run import preprocess_for

    with Store.open(tmp_path / "runs" / "resnet18" / "ig" / "attributions.h5") as s:
        saliency, target = torch.from_numpy(s.attributions()[:1].astype(np.float32)), int(s.targets()[0])
    values = _study.read_store(tmp_path / "runs" / "resnet18" / "ig" / "attributions.h5")
    x = preprocess_for("resnet18")(read_image(values["paths"][0]))[None]
    model = models.get("resnet18", weights=str(tmp_path / "miniature" / "weights" / "resnet18.pth"))
    expected = insertion(model, x, saliency, target=target, step=12544).auc[0]
    assert rows[0]["IG insertion"] == pytest.approx(expected, rel=1e-3)


def test_center_pixel_known_ranks_and_resume(tmp_path):
    args = ["--out", str(tmp_path), "--methods", "saliency,input_x_gradient,occlusion", "--patches", "1,3"]
    rows, patch_rows = center_pixel.main(args)
    ranks = {r["method"]: (r["rank flat"], r["rank noisy"], r["rank patch"]) for r in rows}
    assert ranks["saliency"] == ranks["input_x_gradient"] == (1, 1, 1) and ranks["occlusion"] == (256,) * 3
    by_method = {r["method"]: r for r in patch_rows}
    assert abs(by_method["input_x_gradient"]["outside 3x3"]) < 1e-12  # nothing on the zero background
    stamp = (tmp_path / "maps" / "saliency.npz").stat().st_mtime_ns
    again, _ = center_pixel.main(args)
    assert again == rows and (tmp_path / "maps" / "saliency.npz").stat().st_mtime_ns == stamp  # resumed
    assert (tmp_path / "growing_patch.png").is_file() and (tmp_path / "center_pixel_grid.png").is_file()


def test_latent_vs_ig(tmp_path):
    rows = latent_vs_ig.main(["--out", str(tmp_path), "--size", "1", "--steps", "2", "--stability-steps", "2",
                              "--baseline-samples", "1", "--stability-images", "1", "--metric-step", "25088",
                              "--variants", "ig,ig_segments_telea,latent_slerp"])
    assert [r["variant"] for r in rows] == ["IG (zeros)", "IG (segments, Telea)", "latent IG (slerp)"]
    assert all(r["images"] == 1 for r in rows)
    stability = _study_rows(tmp_path / "stability.csv")
    assert [r["variant"] for r in stability] == ["IG (zeros)", "latent IG (slerp)"]
    # the same images, weights, targets and steps: the stability table's IG row is the main table's IG score
    assert float(stability[0]["insertion_mean"]) == pytest.approx(rows[0]["insertion"], rel=1e-3)
    with open(tmp_path / "latent_vs_ig_images.csv") as f:
        image = next(csv.DictReader(f))
    assert image["label"].startswith("miniature_scene_") and image["predicted"].startswith("miniature_scene_")
    assert (tmp_path / "sensitivity" / "baseline_sensitivity_summary.md").is_file()


def _study_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))
