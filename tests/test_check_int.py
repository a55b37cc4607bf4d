"""The one check of integer arguments (fastig.errors.check_int): its rule, its one-line messages naming the
argument, and that the methods, metrics, runs and the CLI all answer with it."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fastig
from _shared import SmallCNN
from fastig.attr import IntegratedGradients, NoiseTunnel, Occlusion, Saliency
from fastig.cli import cli
from fastig.errors import FastigError, InvalidArgumentError, check_int
from fastig.metrics.insertion import insertion
from fastig.run import RunError, RunSpec, run


@pytest.mark.parametrize("value", [1, 7, np.int64(3), 2**40])
def test_integers_at_the_bound_or_above_pass_as_ints(value):
    assert check_int("n", value) == int(value) and type(check_int("n", value)) is int
    assert check_int("n", None, none_ok=True) is None
    assert check_int("seed", 0, 0) == 0


@pytest.mark.parametrize("value, minimum, options, message", [
    (0, 1, {}, "n_samples must be a positive integer, got 0"),
    (-2, 1, {}, "n_samples must be a positive integer, got -2"),
    (True, 1, {}, "n_samples must be a positive integer, got True"),  # a bool is not a count
    (2.0, 1, {}, "n_samples must be a positive integer, got 2.0"),
    ("4", 1, {}, "n_samples must be a positive integer, got '4'"),
    (None, 1, {}, "n_samples must be a positive integer, got None"),
    (0, 1, {"none_ok": True}, "n_samples must be a positive integer or None, got 0"),
    (-1, 0, {}, "n_samples must be a non-negative integer, got -1"),
    (1, 2, {"why": "two gradients"}, "n_samples must be an integer >= 2 (two gradients), got 1"),
    (0, 1, {"why": "for gausslegendre"}, "n_samples must be an integer >= 1 (for gausslegendre), got 0"),
])
def test_bad_values_give_one_line_naming_the_argument(value, minimum, options, message):
    with pytest.raises(InvalidArgumentError) as raised:
        check_int("n_samples", value, minimum, **options)
    assert str(raised.value) == message
    assert isinstance(raised.value, (ValueError, AssertionError, FastigError))  # Python's, Captum's and fastig's


def test_the_error_class_is_the_callers():
    with pytest.raises(RunError, match="^workers must be a non-negative integer, got -1$"):
        check_int("workers", -1, 0, error=RunError)


model = SmallCNN().eval()
x = torch.rand(2, 3, 8, 8)


@pytest.mark.parametrize("call, name", [
    (lambda: IntegratedGradients(model).attribute(x, target=0, n_steps=0), "n_steps"),
    (lambda: IntegratedGradients(model).attribute(x, target=0, internal_batch_size=0), "internal_batch_size"),
    (lambda: NoiseTunnel(Saliency(model)).attribute(x, target=0, nt_samples=True), "nt_samples"),
    (lambda: Occlusion(model).attribute(x, target=0, sliding_window_shapes=(3, 2, 2), perturbations_per_eval=0),
     "perturbations_per_eval"),
    (lambda: fastig.attribute(model, x, target=0, method="gradient_shap", n_samples=0), "n_samples"),
    (lambda: fastig.attribute(model, x, target=0, method="ig", n_steps="auto", max_steps=1), "max_steps"),
    (lambda: fastig.attribute(model, x, method="ig", top_k=1.5), "top_k"),
    (lambda: insertion(model, x, torch.rand(2, 8, 8), step=0), "step"),
])
def test_the_api_answers_with_the_one_check(call, name):
    with pytest.raises(InvalidArgumentError, match=rf"^{name} must be (a positive integer|an integer >= \d)"):
        call()


def test_a_run_answers_with_the_one_check(tmp_path):
    spec = RunSpec(model="centerpixel", method="saliency", out_dir=tmp_path / "o", weights="none", images=["x.png"],
                   images_per_batch=0)
    with pytest.raises(RunError, match="^images_per_batch must be a positive integer, got 0$"):
        run(spec, echo=lambda line: None)


@pytest.mark.parametrize("args, flag", [
    (["attribute", "--images-per-batch", "0"], "--images-per-batch"),
    (["attribute", "--workers", "-1"], "--workers"),
    (["attribute", "--stride", "0"], "--stride"),
    (["bench", "--images", "0"], "--images"),
    (["bench", "--repeats", "x"], "--repeats"),
    (["evaluate", "store.h5", "--metric", "insertion", "--inputs-per-pass", "0"], "--inputs-per-pass"),
])
def test_the_cli_answers_with_the_one_check_and_exit_2(tmp_path, args, flag):
    (tmp_path / "store.h5").write_bytes(b"")
    common = {"attribute": ["--model", "centerpixel", "--image", "x.png", "--out", str(tmp_path / "o")],
              "bench": ["--model", "centerpixel"], "evaluate": []}[args[0]]
    args = [str(tmp_path / a) if a == "store.h5" else a for a in args]
    result = CliRunner().invoke(cli, args + common)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"fastig: error: Invalid value for '{flag}': must be a") and "integer" in line, line
    assert "Traceback" not in result.output
