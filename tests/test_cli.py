"""The CLI end to end on tiny inputs, and its one-line errors (exit code 2, no traceback)."""

import json

import cv2
import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from fastig.cli import cli


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8))
    return path


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_attribute_writes_store_and_heatmaps(tmp_path, image):
    out = tmp_path / "out"
    result = run("attribute", "--model", "centerpixel", "--method", "ig", "--steps", "4", "--rule", "riemann_left",
                 "--image", image, "--image", image, "--out", out)
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["0000_img_ig.png", "0001_img_ig.png"]
    with h5py.File(out / "attributions.h5") as f:
        maps = f["attributions/ig"][:]
        assert maps.shape == (2, 227, 227) and np.isfinite(maps).all() and np.abs(maps).sum() > 0
        assert list(f["inputs/targets"][:]) == [f["inputs/targets"][0]] * 2


def test_attribute_resumes_and_refuses_to_mix(tmp_path, image):
    out = tmp_path / "out"
    assert run("attribute", "--model", "centerpixel", "--method", "saliency", "--image", image, "--out", out).exit_code == 0
    again = run("attribute", "--model", "centerpixel", "--method", "saliency", "--image", image, "--out", out)
    assert again.exit_code == 0 and "already done" in again.output
    other = run("attribute", "--model", "centerpixel", "--method", "ig", "--image", image, "--out", out)
    assert other.exit_code == 2 and "other settings" in other.output
    assert run("attribute", "--model", "centerpixel", "--method", "ig", "--image", image, "--out", out,
               "--overwrite").exit_code == 0


def test_attribute_on_resnet18_random_weights(tmp_path, image):
    result = run("attribute", "--model", "resnet18", "--weights", "none", "--method", "ig", "--steps", "2",
                 "--target", "3", "--image", image, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "r" / "attributions.h5") as f:
        assert f["attributions/ig"].shape == (1, 224, 224) and f["inputs/targets"][0] == 3


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "resnet99"], "unknown model"),
        (["--method", "nope"], "unknown method"),
        (["--model", "resnet18"], "resnet18-f37072fd.pth"),  # weights=auto and no checkpoint file
        (["--image", "missing.png"], "not found"),
        (["--steps", "x"], "--steps"),
        (["--max-sigma", "3"], "does not apply"),
        (["--target", "999"], "out of range"),
        (["--target", "-1"], "a class index is >= 0"),  # issue 16.12: attributed class 999 and stored -1
        (["--target", "label"], "--target label needs labelled images"),  # issue 16.12: was a skipped image
        (["--out", ""], "--out: an empty path"),  # issue 16.12: wrote into the current folder
        (["--seed", "-3"], "--seed"),
        (["--steps", "0"], "Invalid value for --steps: n_steps"),  # the method's message, under its flag
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_arguments_give_one_line_errors(tmp_path, image, monkeypatch, args, message):
    monkeypatch.setenv("FASTIG_CHECKPOINTS", str(tmp_path / "empty"))
    base = {"--model": "centerpixel", "--method": "ig", "--image": str(image), "--out": str(tmp_path / "o")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    result = run("attribute", *[x for pair in base.items() for x in pair])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("fastig: error:") and message in lines[-1], result.output
    assert "Traceback" not in result.output


def test_a_folder_that_cannot_hold_the_run_is_refused_before_the_model_loads(tmp_path, image, monkeypatch):
    """Issue 16.9: `attributions.parts` as a file (or an unwritable --out) raised OSError with a traceback, after
    the model was loaded and the images decoded."""
    from fastig import models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(models, "get", no_model)
    out = tmp_path / "out"
    out.mkdir()
    (out / "attributions.parts").write_text("in the way")
    result = run("attribute", "--model", "centerpixel", "--image", image, "--out", out)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (f"fastig: error: {out / 'attributions.parts'} is a file, where "
                                                      "the run keeps its journal folder: move it away or choose "
                                                      "another --out")
    (tmp_path / "file").write_text("")
    result = run("attribute", "--model", "centerpixel", "--image", image, "--out", tmp_path / "file" / "sub")
    assert result.exit_code == 2 and "is a file" in result.output


def test_a_run_where_every_image_fails_exits_1_and_says_why(tmp_path, image, monkeypatch):
    """Issue 16.11: "0 attributed, 1 failed" exited 0."""
    import torch

    import fastig

    monkeypatch.setattr(fastig, "attribute", lambda model, x, target=None, **kw: torch.full_like(x, float("nan")))
    result = run("attribute", "--model", "centerpixel", "--image", image, "--out", tmp_path / "o")
    assert result.exit_code == 1, result.output
    assert "0 attributed, 0 skipped, 1 failed (1 non-finite attribution)" in result.output
    assert not (tmp_path / "o" / "attributions.h5").exists()


def test_method_defaults_are_shown_by_help_and_methods(tmp_path, image):
    """Issue 16.19: each method's defaults appear in --help, `fastig methods` and the store."""
    text = " ".join(run("attribute", "--help").output.split())
    assert "[defaults: 100 (blur_ig), 50 (gnl_ig, ig, latent_ig), 200 (guided_ig)]" in text
    assert "[default: 0.25 (guided_ig)]" in text and "--seed" in text
    listing = run("methods").output
    ig = next(line for line in listing.splitlines() if line.startswith("ig "))
    assert ("[--steps 50 --rule gausslegendre --inputs-per-pass auto --idgi off --output logit --rules off "
            "--precision fp32 "
            "--tolerance 0.01 --max-steps 256 --baselines zeros --baseline-segmentation slic") in ig
    assert "--nt-samples 5" in listing and "--window 16" in listing
    assert run("attribute", "--model", "centerpixel", "--steps", "2", "--image", image, "--out", tmp_path / "o",
               "--no-heatmaps").exit_code == 0
    with h5py.File(tmp_path / "o" / "attributions.h5") as f:
        hooks = dict.fromkeys(["rules", "baselines", "baseline_segmentation", "baseline_segments", "baseline_fraction",
                               "baseline_fill", "baseline_samples", "baseline_seed"])  # None: off / zeros
        assert json.loads(f.attrs["options"]) == {"n_steps": 2, "rule": "gausslegendre", "internal_batch_size": None,
                                                  "idgi": False, "output": "logit", "precision": "fp32",
                                                  "tolerance": 0.01, "max_steps": 256, **hooks}


def test_unreadable_image_is_refused_before_any_work(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    result = run("attribute", "--model", "centerpixel", "--image", bad, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "bad.png" in result.output
    assert not (tmp_path / "o" / "attributions.h5").exists()


def test_listings_and_version():
    models = run("models")
    assert models.exit_code == 0 and "resnet50-0676ba61.pth" in models.output and "centerpixel" in models.output
    methods = run("methods")
    assert methods.exit_code == 0 and "ig " in methods.output and "--steps" in methods.output
    version = run("--version")
    assert version.exit_code == 0 and "path_points=" in version.output
    assert run("info").output == version.output
    assert run("--help").exit_code == 0


def test_demo_ranks_the_center_pixel_first(tmp_path):
    result = run("demo", "--out", tmp_path, "--method", "ig", "--method", "saliency")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:4] for line in result.output.splitlines() if line.startswith(("ig ", "saliency "))}
    assert rows == {"ig": ["1", "1", "1"], "saliency": ["1", "1", "1"]}
    picture = cv2.imread(str(tmp_path / "centerpixel_grid.png"))
    assert picture is not None and picture.shape[0] > 300


def test_convert_dvae_refuses_non_pickles_cleanly(tmp_path):
    bogus = tmp_path / "encoder.pkl"
    bogus.write_bytes(b"\x80\x04not really a pickle")
    result = run("convert-dvae", bogus, bogus, "--out", tmp_path / "out")
    assert result.exit_code == 2 and result.output.startswith("fastig: error:") and "encoder.pkl" in result.output
    assert not (tmp_path / "out" / "dvae_encoder.pt").exists()


def test_attribute_then_evaluate_writes_scores_and_plots(tmp_path, image):
    out = tmp_path / "out"
    result = run("attribute", "--model", "centerpixel", "--method", "ig", "--steps", "4", "--image", image,
                 "--image", image, "--out", out, "--evaluate", "insertion,deletion")
    assert result.exit_code == 0, result.output
    assert "insertion" in result.output and "deletion" in result.output
    again = run("evaluate", out / "attributions.h5", "--metric", "aic", "--metric", "completeness", "--no-plots")
    assert again.exit_code == 0, again.output
    with h5py.File(out / "attributions.h5") as f:
        for metric in ("insertion", "deletion", "aic", "completeness"):
            values = f[f"metrics/{metric}"][:]
            assert values.shape == (2,) and np.isfinite(values).all()
        assert 0 <= f["metrics/insertion"][0] <= 1
    assert (out / "metrics" / "insertion_deletion.png").exists()


def test_evaluate_rejects_unknown_metrics_before_any_work(tmp_path, image):
    result = run("attribute", "--model", "centerpixel", "--image", image, "--out", tmp_path / "o",
                 "--evaluate", "insertion,bogus")
    assert result.exit_code == 2 and "bogus" in result.output
    assert not (tmp_path / "o" / "attributions.h5").exists()


def test_evaluate_finds_a_class_folder_dataset_from_anywhere_and_after_a_move(tmp_path, monkeypatch):
    """Issue 16.16: evaluating a class-folder --dataset store failed ("image file not found: n01443537/...")
    unless run from inside the dataset folder."""
    data = tmp_path / "data"
    for k, wnid in enumerate(("n01443537", "n02123045")):
        (data / wnid).mkdir(parents=True)
        cv2.imwrite(str(data / wnid / "camera.png"), np.full((30, 30), 60 * (k + 1), np.uint8))
    monkeypatch.chdir(tmp_path)
    result = run("attribute", "--model", "centerpixel", "--steps", "2", "--dataset", "data", "--workers", "0",
                 "--out", "out")  # a relative --dataset
    assert result.exit_code == 0, result.output
    assert "class folders are ImageNet wnids" in result.output
    with h5py.File(tmp_path / "out" / "attributions.h5") as f:
        assert list(f["inputs/labels"][:]) == [1, 281]  # their ImageNet indices
        assert list(f["inputs/paths"].asstr()[:]) == ["n01443537/camera.png", "n02123045/camera.png"]
        recorded = json.loads(f.attrs["run"])["inputs"]
        assert recorded["image_root"] == str(data) and recorded["classes"] == "imagenet"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    store = tmp_path / "out" / "attributions.h5"
    metric = ["--metric", "insertion", "--step", "30000", "--no-plots"]
    result = run("evaluate", store, *metric)
    assert result.exit_code == 0, result.output
    data.rename(tmp_path / "moved")
    result = run("evaluate", store, *metric)
    assert result.exit_code == 2
    assert (f"image n01443537/camera.png of row 0 not found under the dataset folder the store records, {data} (if "
            "the dataset was moved, pass --dataset-root NEW_FOLDER)") in result.output
    result = run("evaluate", store, *metric, "--dataset-root", tmp_path / "moved")
    assert result.exit_code == 0, result.output


def _recorded_options(out):
    with h5py.File(out / "attributions.h5") as f:
        return json.loads(f.attrs["options"])


def test_the_three_batch_sizes_have_three_flags(tmp_path, image):
    """--images-per-batch (images a run attributes together), --inputs-per-pass (rows of one model pass, Captum's
    internal_batch_size) and --perturbations-per-pass (copies of each image in one pass, Captum's
    perturbations_per_eval): each sets its own setting, and the help says which is which."""
    result = run("attribute", "--model", "centerpixel", "--method", "ig", "--steps", "3", "--images-per-batch", "1",
                 "--inputs-per-pass", "2", "--image", image, "--image", image, "--out", tmp_path / "ig",
                 "--no-heatmaps")
    assert result.exit_code == 0 and "deprecated" not in result.output, result.output
    assert _recorded_options(tmp_path / "ig")["internal_batch_size"] == 2
    result = run("attribute", "--model", "centerpixel", "--method", "occlusion", "--window", "113",
                 "--window-stride", "113", "--perturbations-per-pass", "3", "--image", image, "--out",
                 tmp_path / "occlusion", "--no-heatmaps")
    assert result.exit_code == 0, result.output
    assert _recorded_options(tmp_path / "occlusion")["perturbations_per_eval"] == 3
    text = " ".join(run("attribute", "--help").output.split())
    assert "Captum's internal_batch_size" in text and "Captum's perturbations_per_eval" in text
    assert "--images-per-batch INTEGER images decoded, filtered and attributed together" in text
    assert "--batch-size" not in text and "--per-eval" not in text  # the old names are hidden
    assert "--images-per-batch INTEGER" in " ".join(run("deliberate", "--help").output.split())
    assert "--inputs-per-pass INTEGER" in " ".join(run("evaluate", "--help").output.split())
    bad = run("attribute", "--model", "centerpixel", "--method", "saliency", "--perturbations-per-pass", "2",
              "--image", image, "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and "--perturbations-per-pass does not apply to --method saliency" in bad.output


@pytest.mark.parametrize("old, new, kwarg, method", [
    ("--batch-size", "--inputs-per-pass", "internal_batch_size", "ig"),
    ("--per-eval", "--perturbations-per-pass", "perturbations_per_eval", "occlusion"),
])
def test_old_batch_flags_still_work_with_a_warning(tmp_path, image, old, new, kwarg, method):
    common = ["attribute", "--model", "centerpixel", "--method", method, "--image", image, "--no-heatmaps"]
    common += ["--steps", "3"] if method == "ig" else ["--window", "113", "--window-stride", "113"]
    result = run(*common, old, "2", "--out", tmp_path / "old")
    assert result.exit_code == 0, result.output
    assert f"fastig: warning: {old} is deprecated: use {new}" in result.output
    assert _recorded_options(tmp_path / "old")[kwarg] == 2
    assert "(1 already done)" in run(*common, new, "2", "--out", tmp_path / "old").output  # the same run
    both = run(*common, old, "2", new, "2", "--out", tmp_path / "both")
    assert both.exit_code == 2, both.output
    assert both.output.strip().splitlines()[-1] == f"fastig: error: {old} is the old name of {new}: give {new} only"


@pytest.mark.parametrize("command, old, new", [("evaluate", "--batch-size", "--inputs-per-pass"),
                                               ("deliberate", "--batch-size", "--images-per-batch")])
def test_old_flags_of_evaluate_and_deliberate_are_the_new_ones(tmp_path, command, old, new):
    store = tmp_path / "store.h5"
    store.write_bytes(b"")
    args = [store, "--metric", "insertion"] if command == "evaluate" else [
        "--model", "resnet18", "--weights", "none", "--layer", "layer4", "--dataset", tmp_path, "--out", tmp_path]
    both = run(command, *args, old, "2", new, "2")
    assert both.exit_code == 2 and f"{old} is the old name of {new}" in both.output, both.output
    bad = run(command, *args, old, "0")
    assert bad.exit_code == 2 and f"Invalid value for '{old}': must be a positive integer, got 0" in bad.output
