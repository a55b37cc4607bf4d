import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # no test may reach the internet: weights="auto" would otherwise try to download a missing file
    monkeypatch.setenv("FASTIG_OFFLINE", "1")
