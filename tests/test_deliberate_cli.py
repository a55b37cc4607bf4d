"""`fastig deliberate` and `fastig train-hardness` end to end on miniature CUB and ADE trees (resnet18 at layer4, random
weights, 64x64 inputs): the store, curves and pictures; resume after a lost image; other settings refused; bad
inputs rejected in one line with exit code 2."""

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from _trees import make_ade_tree, make_cub_tree
from fastig.cli import cli

COMMON = ["--model", "resnet18", "--weights", "none", "--layer", "layer4", "--input-size", "64",
          "--images-per-batch", "2"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return make_cub_tree(tmp_path_factory.mktemp("cub"), n_classes=6, per_class=2, size=(60, 44))


def test_cub_end_to_end_resume_and_refusal(cub, tmp_path):
    out = tmp_path / "out"
    args = ["deliberate", *COMMON, "--dataset", cub, "--difficulty", "hp", "--attribution", "2ndg", "--hard", "3",
            "--pictures", "1", "--out", out]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "6 test images scored, 3 hard images explained" in result.output
    with h5py.File(out / "deliberative.h5") as f:
        assert f.attrs["format"] == "fastig-deliberative/1"
        assert len(f["scores/difficulty"]) == 6 and len(f["hard/index"]) == 3
        hard = f["hard/index"][:]
        scores = dict(zip(f["scores/index"][:], f["scores/difficulty"][:]))
        assert all(scores[i] >= max(v for j, v in scores.items() if j not in hard) for i in hard)
        assert f["hard/class_maps"].shape == (3, 5, 2, 2) and f["hard/recall"].shape == (3, 99)
        offsets = f["hard/pair_offsets"][:]
        assert offsets[0] == 0 and offsets[-1] == len(f["hard/pairs"]) and (np.diff(offsets) >= 1).all()
        assert np.isfinite(f["curves/recall"][:]).any()
        recall = f["curves/recall"][:]
        assert 0 <= np.nanmin(recall) and np.nanmax(recall) <= 1
        stored = {k: f[f"hard/{k}"][:] for k in ("class_maps", "difficulty_map", "recall", "precision")}
    assert sorted(p.name for p in (out / "pictures").glob("*.png")) == ["hard_0001.png"]
    assert (out / "curves_vs_r.png").stat().st_size > 0 and (out / "precision_recall.png").stat().st_size > 0

    # a run killed after two of its three images: the third part and the store are gone; the rerun redoes only it
    part = out / "deliberative.parts" / "hard-000002.npz"
    kept = (out / "deliberative.parts" / "hard-000000.npz").stat().st_mtime_ns
    part.unlink()
    (out / "deliberative.h5").unlink()
    again = run(*args)
    assert again.exit_code == 0, again.output
    assert (out / "deliberative.parts" / "hard-000000.npz").stat().st_mtime_ns == kept
    with h5py.File(out / "deliberative.h5") as f:
        for k, v in stored.items():
            np.testing.assert_array_equal(f[f"hard/{k}"][:], v)

    other = run(*[a if a != "2ndg" else "gradient" for a in args])
    assert other.exit_code == 2 and "other settings" in other.output and "attribution" in other.output


def test_train_hardness_then_deliberate_with_it(cub, tmp_path):
    checkpoint = tmp_path / "hp.pt"
    result = run("train-hardness", "--model", "resnet18", "--weights", "none", "--dataset", cub, "--epochs", "1",
                 "--batch-size", "3", "--input-size", "64", "--lr", "1e-3", "--out", checkpoint)
    assert result.exit_code == 0, result.output
    assert "epoch 1: loss" in result.output and checkpoint.stat().st_size > 0
    out = tmp_path / "out"
    result = run("deliberate", *COMMON, "--dataset", cub, "--difficulty", "hp", "--hardness", checkpoint,
                 "--attribution", "gradient", "--hard", "2", "--pictures", "0", "--out", out)
    assert result.exit_code == 0, result.output
    with h5py.File(out / "deliberative.h5") as f:
        assert '"hardness": "sha256:' in f.attrs["settings"]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    result = run("deliberate", *COMMON, "--dataset", cub, "--hardness", bad, "--out", tmp_path / "o2")
    assert result.exit_code == 2 and "bad.pt" in result.output and "Traceback" not in result.output


def test_ade_end_to_end(tmp_path):
    ade = make_ade_tree(tmp_path / "data")
    out = tmp_path / "out"
    result = run("deliberate", *COMMON, "--dataset", ade.parent, "--difficulty", "entropy", "--attribution", "ig",
                 "--ig-steps", "3", "--top-k", "3", "--hard", "2", "--pictures", "1", "--out", out)
    assert result.exit_code == 0, result.output
    assert "mean_iou" in result.output
    with h5py.File(out / "deliberative.h5") as f:
        assert f["hard/iou"].shape == (2, 99) and np.isfinite(f["curves/iou"][:]).all()
        assert list(f["classes/names"].asstr()[:]) == ["kitchen", "bathroom", "street"]
    assert (out / "pictures" / "hard_0001.png").exists()


@pytest.mark.parametrize("change,message", [
    (["--model", "resnet99"], "unknown model 'resnet99'"),
    (["--layer", "layer9"], "no submodule 'layer9'"),
    (["--weights", "missing.pt"], "no such file 'missing.pt'"),
    (["--top-k", "7"], "top_k=7 exceeds the dataset's 6 classes"),
    (["--difficulty", "margin"], "'margin' is not one of"),
    (["--hard", "0"], "--hard"),
    (["--device", "cuda"], "CUDA is not available"),
])
def test_bad_inputs_are_one_line(cub, tmp_path, change, message):
    if change[0] == "--device":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    args = dict(zip(COMMON[::2], COMMON[1::2]))
    args.update({"--dataset": cub, "--out": tmp_path / "out", "--difficulty": "cs"})
    args.update(dict(zip(change[::2], change[1::2])))
    result = run("deliberate", *[x for pair in args.items() for x in pair])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastig: error:") and message in lines[0], result.output
    assert not (tmp_path / "out" / "deliberative.h5").exists()


def test_not_a_dataset(tmp_path):
    result = run("deliberate", *COMMON, "--dataset", tmp_path, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "neither a CUB-200-2011 tree" in result.output
