"""The CUDA sources compile on a machine without a GPU: every csrc/cuda/*.cu with ``nvcc -c`` for sm_80 and sm_90,
and the torch glue csrc/cuda_bindings.cpp (which includes no CUDA headers) with the host compiler in syntax-only
mode against the installed torch. Skips when nvcc (or a host C++ compiler) is not on PATH."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
ARCHS = ("80", "90")


def run_all(commands: dict[str, list[str]], timeout: float = 110.0) -> dict[str, subprocess.CompletedProcess]:
    """Run the commands concurrently (the machine has few cores; nvcc is mostly single-threaded)."""
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in commands.items()}
    results = {}
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out += "\n(timed out)"
        results[name] = subprocess.CompletedProcess(commands[name], proc.returncode, out)
    return results


def test_there_are_cuda_sources():
    names = {os.path.basename(f) for f in CU_FILES}
    assert {"path_points.cu", "accumulate.cu", "perturb.cu", "guided_step.cu"} <= names


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_every_cu_file_compiles_for_sm80_and_sm90(tmp_path):
    gencode = [flag for arch in ARCHS for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    commands = {
        os.path.basename(f): ["nvcc", "-c", "-std=c++17", *gencode, f, "-o", str(tmp_path / (os.path.basename(f) + ".o"))]
        for f in CU_FILES
    }
    failures = {name: r.stdout for name, r in run_all(commands).items() if r.returncode != 0}
    assert not failures, "\n\n".join(f"{name}:\n{out}" for name, out in failures.items())
    if shutil.which("cuobjdump") is None:
        return
    for name in commands:  # both architectures are in every object
        listing = subprocess.run(["cuobjdump", "--list-elf", str(tmp_path / (name + ".o"))], capture_output=True,
                                 text=True)
        if listing.returncode == 0:
            for arch in ARCHS:
                assert f"sm_{arch}" in listing.stdout, (name, listing.stdout)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no host C++ compiler")
def test_cuda_bindings_compile_without_cuda_headers():
    torch_include = os.path.join(os.path.dirname(__import__("torch").__file__), "include")
    compiler = shutil.which("c++") or shutil.which("g++")
    cmd = [compiler, "-std=c++17", "-w", "-fsyntax-only", "-DFASTIG_WITH_CUDA", f"-I{ROOT}/csrc",
           f"-I{torch_include}", f"-I{torch_include}/torch/csrc/api/include", f"-I{sysconfig.get_paths()['include']}",
           os.path.join(ROOT, "csrc", "cuda_bindings.cpp")]
    result = run_all({"cuda_bindings.cpp": cmd})["cuda_bindings.cpp"]
    assert result.returncode == 0, result.stdout


def test_cuda_sources_include_no_torch_headers():
    for f in CU_FILES + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.h")) + glob.glob(
            os.path.join(ROOT, "csrc", "cuda", "*.cuh")):
        text = open(f).read()
        for forbidden in ("<torch/", "<ATen/", "<c10/"):
            assert forbidden not in text, f"{f} includes {forbidden}"
