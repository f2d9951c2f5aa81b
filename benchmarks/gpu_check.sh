#!/usr/bin/env bash
# The GPU proof of issue 21: one script, under 8 minutes on one GPU; prints ONE JSON object (stdout).
#
#   here, with a package registry (the project's venv knows loraflock's dependencies):
#     PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --prepare --python-version 3.12 --wheels .whl
#   on the GPU machine (no registry; its own python3 with a CUDA torch):
#     bash benchmarks/gpu_check.sh --wheels .whl --out /tmp/gpu-check
#
# --prepare downloads the wheels the GPU machine lacks for its Python (never torch: its CUDA build is
# gigabytes; the GPU machine's own is used). The run stops at once, exit 3, with a clear message where
# CUDA is unusable; else installs what is missing from the wheel set and runs tests/gpu, a tiny job with
# ray.use_gpu: true and the throughput benchmark (benchmarks/gpu_check.py says what each does).
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--prepare" ]]; then
    shift
    exec "${PYTHON:-python3}" benchmarks/gpu_check.py prepare "$@"
fi
# 440 s of stage budgets inside; the hard stop leaves the JSON line time to be printed.
exec timeout 470 "${PYTHON:-python3}" benchmarks/gpu_check.py run --test-timeout 120 --job-timeout 170 \
    --bench-timeout 150 "$@"
