"""`fastig bench` end to end on a small CNN, with Captum and with Captum's import blocked; the pass timer."""

import re
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from fastig.bench import PassTimer, bench
from fastig.cli import cli

from _shared import SmallCNN

ARGS = ["bench", "--model", "_shared:SmallCNN", "--input-shape", "3,8,8", "--images", "4", "--repeats", "2",
        "--method", "ig", "--steps", "8"]


def test_bench_against_captum():
    result = CliRunner().invoke(cli, ARGS)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("fastig ", "captum "))}
    assert set(rows) == {"fastig", "captum"} and rows["fastig"][3] == "1.00x"
    assert float(rows["captum"][1]) > 0 and rows["captum"][3].endswith("x")
    difference = float(lines[-1].rsplit("attributions: ", 1)[1].split()[0])
    assert difference < 1e-5  # same numbers as Captum


def test_bench_without_captum_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "captum", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    result = CliRunner().invoke(cli, ARGS)
    assert result.exit_code == 0, result.output
    assert "captum is not installed" in result.output and "pip install captum" in result.output
    assert any(re.match(r"fastig\s+\d", line) for line in result.output.splitlines())
    assert not any(re.match(r"captum\s+\d", line) for line in result.output.splitlines())


def test_bench_errors_are_one_line():
    bad = CliRunner().invoke(cli, ["bench", "--model", "_shared:SmallCNN"])
    assert bad.exit_code == 2 and "--input-shape" in bad.output
    bad = CliRunner().invoke(cli, ["bench", "--model", "_shared:Nope", "--input-shape", "3,8,8"])
    assert bad.exit_code == 2 and "cannot import" in bad.output
    bad = CliRunner().invoke(cli, ARGS + ["--fraction", "0.5"])
    assert bad.exit_code == 2 and "does not apply" in bad.output


class Slow(torch.nn.Module):
    """A model whose forward takes 20 ms more than its work."""

    def __init__(self):
        super().__init__()
        self.net = SmallCNN()

    def forward(self, x):
        time.sleep(0.02)
        return self.net(x)


def test_pass_timer_counts_forward_and_backward():
    model = Slow()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    started = time.perf_counter()
    with PassTimer(model, torch.device("cpu")) as timer:
        for _ in range(3):
            torch.autograd.grad(model(x)[:, 0].sum(), x)
        with torch.no_grad():
            model(x)
    assert timer.passes == 4 and 0.08 <= timer.seconds <= time.perf_counter() - started
    report = bench(model, torch.randn(2, 3, 8, 8), 1, "saliency", repeats=1, reference=False)
    (fastig,) = report.results
    assert fastig.passes == 1 and fastig.outside < 0.9 and "not run" in report.note
