"""`fastig attribute --evaluate` and `fastig evaluate` say in one line when the model's predictions are near uniform
(random weights), and stay quiet for a model that predicts with confidence."""

import dataclasses

import pytest
import torch
from click.testing import CliRunner

from fastig import models
from fastig.cli import cli
from fastig.metrics import evaluate_store

from _shared import SmallCNN


def untrained():
    """What random weights do to a classifier: logits near zero, whatever the image."""
    net = SmallCNN()
    with torch.no_grad():
        net.fc.weight.mul_(1e-3)
        net.fc.bias.zero_()
    return net


@pytest.fixture
def untrained_model(monkeypatch):
    info = dataclasses.replace(models.info("resnet18"), name="untrained", filename="untrained.pth", input_size=8,
                               resize_size=8, num_classes=5, builder=untrained)
    monkeypatch.setitem(models._REGISTRY, "untrained", info)


def test_random_weights_are_flagged_in_one_line(tmp_path, image, untrained_model):
    out = tmp_path / "random"
    result = CliRunner().invoke(cli, ["attribute", "--model", "untrained", "--weights", "none", "--method",
                                      "saliency", "--image", str(image), "--out", str(out), "--no-heatmaps",
                                      "--evaluate", "lossy_mse"])
    assert result.exit_code == 0, result.output
    flagged = [line for line in result.output.splitlines() if "near uniform" in line]
    assert len(flagged) == 1 and "not meaningful" in flagged[0]
    with pytest.warns(UserWarning, match="near uniform"):  # the Python API warns when there is no progress line
        evaluate_store(out / "attributions.h5", "lossy_mse", weights="none", plots=False)


def test_confident_model_is_not_flagged(tmp_path, image):
    out = tmp_path / "confident"
    assert CliRunner().invoke(cli, ["attribute", "--model", "centerpixel", "--method", "saliency", "--image",
                                    str(image), "--out", str(out), "--no-heatmaps"]).exit_code == 0
    result = CliRunner().invoke(cli, ["evaluate", str(out / "attributions.h5"), "--metric", "lossy_mse",
                                      "--no-plots"])
    assert result.exit_code == 0, result.output
    assert "near uniform" not in result.output and "lossy_mse" in result.output
