#!/usr/bin/env bash
# GPU readiness in one command (issue 11): build the CUDA extension, run the CUDA tests, run the GPU benchmarks
# and write one table. Run from anywhere, on a machine with a CUDA GPU, nvcc and a CUDA build of torch installed
# (see the README, "Other machines / CUDA"):
#
#     scripts/gpu_check.sh [OUT [ARGS...]]    # OUT defaults to gpu-check/; ARGS go to scripts/gpu_check.py
#
# Writes OUT/gpu_check.md (the table; commit it with the device it names), OUT/gpu_check.json, and the logs of each
# stage (build.log, tests.log). Stages and budgets (about 10 minutes in all on an H200; each stage is capped):
#   1. build fastig._C with the CUDA kernels (in place) and check that every op has a CUDA kernel;
#   2. the CUDA tests (op kernels vs references, nvcc builds for sm_80/sm_90, engine placement and precision on
#      CUDA, dVAE on CUDA) with the engine and multi-target tests;
#   3. scripts/gpu_check.py: IG resnet50 fp32/bf16/fp16 vs Captum, Guided IG vs PAIR, insertion/deletion vs a
#      RISE loop, ops vs references, torch.compile break-even.
# fastig need not be installed: the script puts this checkout on PYTHONPATH. Captum and PAIR's saliency (the
# references) must be importable; both are pure Python, so on a machine without a package index their wheels can
# be installed with `pip install --no-index --no-deps --target DIR WHEELS` and DIR added to PYTHONPATH.
# Environment: PYTHON (default python3); FASTIG_GPU_CHECK_CONFIG=full|tiny (default full);
# FASTIG_GPU_CHECK_DEVICE=cuda|cpu (default cuda). With cpu (a dry run of the whole script on a machine without a
# GPU, tested by tests/test_gpu_check.py) stage 1 only checks that the built CPU kernels are loaded, stage 2 runs
# only the tests marked cuda (which skip without a GPU) and stage 3 runs on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
# this checkout's fastig, installed or not (a GPU machine may only have a copy of the tree)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${1:-gpu-check}"
shift $(( $# > 0 ? 1 : 0 ))
PYTHON="${PYTHON:-python3}"
CONFIG="${FASTIG_GPU_CHECK_CONFIG:-full}"
DEVICE="${FASTIG_GPU_CHECK_DEVICE:-cuda}"
mkdir -p "$OUT"

if [ "$DEVICE" = cuda ]; then
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
    echo "== 1/3 build the CUDA extension (log: $OUT/build.log)"
    FASTIG_CUDA=1 timeout 300 "$PYTHON" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
        || { tail -20 "$OUT/build.log"; exit 1; }
    WANTED=cuda-kernel
    MARK=()
else
    echo "== 1/3 (device $DEVICE: no CUDA build) check the built CPU kernels"
    WANTED=cpu-kernel
    MARK=(-m cuda)
fi
WANTED="$WANTED" "$PYTHON" - <<'PY'
import os, sys
from fastig import ops
backends = ops.backends()
print("op backends:", backends)
missing = [name for name, backend in backends.items() if backend != os.environ["WANTED"]]
sys.exit(f"ops without a {os.environ['WANTED']}: {missing}" if missing else 0)
PY

echo "== 2/3 CUDA tests (log: $OUT/tests.log)"
timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider "${MARK[@]}" tests/test_ops.py tests/test_cuda_sources.py \
    tests/test_engine.py tests/test_targets.py "tests/test_dvae.py::test_cuda_matches_cpu" > "$OUT/tests.log" 2>&1 \
    || { tail -30 "$OUT/tests.log"; exit 1; }
tail -1 "$OUT/tests.log"

echo "== 3/3 GPU benchmarks (table: $OUT/gpu_check.md)"
timeout 420 "$PYTHON" scripts/gpu_check.py --out "$OUT" --device "$DEVICE" --config "$CONFIG" "$@"
