#!/usr/bin/env bash
# sdsctl's GPU checks in one go (docs/performance.md), a few minutes on an H100/H200.
#   here, once (PyPI):  bash benchmarks/fetch_wheels.sh        -> .whl/
#   on the GPU machine: bash benchmarks/gpu.sh                 (device tool: carry [".whl"], timeout_s 600)
# Results: $OUT/gpu.json (or gpu-results/), the log beside it; $OUT/fullsize-cuda.json (benchmarks/fullsize.py).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/sdsctl:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
# sdsctl itself, installed so that its plugins' entry points are found
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/sdsctl . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia-smi.txt"
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu.log"
# Full-size architectures on the GPU (issue 42; docs/performance.md): written with random weights on
# this machine's CPUs, then loaded, benched and run in their files' dtype at their native resolution,
# in the time the checks above left.
timeout "${FULLSIZE_TIMEOUT:-240}" python3 benchmarks/fullsize.py --device cuda \
  --families "${FULLSIZE_FAMILIES:-sd21base,sdxl,sd3_medium}" --steps 5 --work /tmp/fullsize \
  --out "$out/fullsize-cuda.json" 2>&1 | tee "$out/fullsize.log"
