"""scripts/gpu_check.sh and its table writer, checked on the CPU: the shell script parses, the whole script runs
with FASTIG_GPU_CHECK_DEVICE=cpu on a tiny config, and every benchmark check lands in one table."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shell_script_parses_and_is_executable():
    script = ROOT / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert script.stat().st_mode & 0o111


def test_the_whole_script_runs_on_the_cpu_in_the_tiny_config(tmp_path):
    """Every stage of gpu_check.sh with FASTIG_GPU_CHECK_DEVICE=cpu: kernel check, the cuda-marked tests (skipped
    here), then every benchmark check but torch.compile (slow to compile on a CPU) in one table with finite,
    sensible numbers."""
    pytest.importorskip("captum")
    pytest.importorskip("saliency.core")
    env = dict(os.environ, PYTHON=sys.executable, FASTIG_GPU_CHECK_DEVICE="cpu", FASTIG_GPU_CHECK_CONFIG="tiny")
    out = tmp_path / "check"
    only = ["--only", "ig", "--only", "guided_ig", "--only", "insertion", "--only", "ops"]
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), *only], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "== 3/3" in done.stdout and "skipped" in (out / "tests.log").read_text()
    rows = {r["check"]: r for r in json.loads((out / "gpu_check.json").read_text())["rows"]}
    assert {"ig fp32", "ig bf16", "ig fp16", "guided ig", "insertion+deletion", "op path_points", "op accumulate",
            "op accumulate_idgi", "op squared_norms", "op perturb", "op guided_step"} == set(rows)
    for r in rows.values():
        assert math.isfinite(r["reference_s"]) and math.isfinite(r["fastig_s"]) and r["fastig_s"] > 0, r
    assert rows["ig fp32"]["error"] < 1e-5  # Captum's numbers
    assert 0 < rows["ig bf16"]["error"] < 0.2 and 0 < rows["ig fp16"]["error"] < 0.2
    assert rows["guided ig"]["error"] < 1e-4  # PAIR's numbers
    assert rows["insertion+deletion"]["error"] < 1e-6
    assert all(r["error"] < 1e-5 for name, r in rows.items() if name.startswith("op "))
    table = (out / "gpu_check.md").read_text()
    assert table.count("\n| ") == len(rows) + 2 and "config tiny" in table


def test_a_failing_check_becomes_a_row(tmp_path, monkeypatch):
    gpu_check = load_gpu_check()

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setitem(gpu_check.CHECKS, "ops", broken)
    assert gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--config", "tiny", "--only", "ops"]) == 1
    assert "FAILED: RuntimeError: boom" in (tmp_path / "gpu_check.md").read_text()
