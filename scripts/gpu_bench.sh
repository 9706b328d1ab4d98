#!/usr/bin/env bash
# Run a GPU benchmark suite on a machine with no network access, in two halves.
#
#   scripts/gpu_bench.sh prepare            # here (with network): wheels the GPU machine lacks -> .whl/
#   scripts/gpu_bench.sh run [SUITE]        # there (repo root, .whl/ copied along): install, bench, copy results
#
# The GPU machines this project measures on have torch (CUDA), triton, onnx, onnxruntime (CPU),
# transformers, safetensors, numpy, pytest, Python 3.12 (see shared/FINDINGS.md); they lack diffusers,
# tensorrt-rtx, onnxruntime-gpu, matplotlib and diffkiln itself, which travel as wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_TAGS=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
         --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# name==version of each wheel the GPU machine lacks (no dependency resolution there: --no-deps)
WHEELS=(diffusers==0.42.1 tensorrt_rtx_cu13_bindings==1.7.1.116 tensorrt_rtx_cu13_libs==1.7.1.116
        matplotlib==3.11.2 contourpy kiwisolver cycler fonttools pyparsing tqdm tokenizers huggingface-hub)
# tensorrt-rtx and tensorrt_rtx_cu13 are source-only metapackages (the `tensorrt_rtx` module): built into wheels here
SDISTS=(tensorrt-rtx==1.7.1.116 tensorrt_rtx_cu13==1.7.1.116)

case "${1:-}" in
  prepare)
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps "${PY_TAGS[@]}" -d .whl "${WHEELS[@]}"
    python3 -m pip wheel --no-deps -w .whl . "${SDISTS[@]}"
    du -sh .whl
    echo "now copy the repository with .whl/ to the GPU machine and run: scripts/gpu_bench.sh run gpu-sana"
    ;;
  run)
    suite="${2:-gpu-sana}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
    device=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace('NVIDIA ', '').split()[0].lower())")
    out="benchmarks/results/$(date +%F)-${device}/${suite}"
    python3 -m diffkiln bench --suite "$suite" -o "/tmp/bench-$suite"
    mkdir -p "$out" && cp "/tmp/bench-$suite"/results.{json,md} "/tmp/bench-$suite"/*.png "$out"/
    echo "results in $out"
    ;;
  *) echo "usage: $0 prepare | run [SUITE]" >&2; exit 2 ;;
esac
