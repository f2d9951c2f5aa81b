"""CUDA-only tests (``benchmarks/gpu_check.sh`` runs them on a GPU machine); skipped without CUDA.

Each compares the CUDA path with a CPU reference: the product's bf16 base and fp32 adapters on
the GPU against fp32 on the CPU (tolerances of bf16), or exact equality where no dtype changes.
"""

from __future__ import annotations

import os

import pytest
import torch

# LORAFLOCK_GPU_TESTS_DEVICE=cpu runs these tests' logic on the CPU (bf16 there too, gloo for NCCL):
# a dry run of the test code itself where no GPU is at hand; the CUDA-only assertions are skipped.
DEVICE = os.environ.get("LORAFLOCK_GPU_TESTS_DEVICE", "cuda")
CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if CUDA or DEVICE != "cuda":
        return
    skip = pytest.mark.skip(reason="needs CUDA (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
