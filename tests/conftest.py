import cv2
import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # no test may reach the internet: weights="auto" would otherwise try to download a missing file
    monkeypatch.setenv("FASTIG_OFFLINE", "1")


@pytest.fixture
def image(tmp_path):
    """A small random RGB PNG (40x50)."""
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8))
    return path
