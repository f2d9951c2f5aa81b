"""The throughput benchmark's MFU (issue 21, item 9): exact GPU names, the FLOPs model, warm-up left out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.mfu import flops_model, linear_params, match_peak
from models.base import load_base
from models.lora import inject
from tests.conftest import TINY_LLAMA

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("name", "label", "tflops"), [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", "H100 NVL", 835.0),
    ("NVIDIA H200", "H200 SXM", 989.4),
    ("NVIDIA H200 NVL", "H200 NVL", 835.0),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB SXM", 312.0),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM", 312.0),
    ("NVIDIA A100-PCIE-40GB", "A100 40GB PCIe", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe", 312.0),
    ("NVIDIA L4", "L4", 121.0),
    ("NVIDIA L40S", "L40S", 362.0),
    ("NVIDIA L40", "L40", 181.0),
    ("NVIDIA A10G", "A10G", 70.0),
    ("NVIDIA A10", "A10", 125.0),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2),
])
def test_peak_by_exact_gpu_name(name, label, tflops):
    assert match_peak(name) == (label, tflops * 1e12)


@pytest.mark.parametrize("name", ["NVIDIA H100", "NVIDIA B200", "Tesla V100-SXM2-16GB", "NVIDIA GeForce RTX 4090 D",
                                  "NVIDIA L4X"])
def test_unknown_or_ambiguous_gpu_gets_no_peak(name):
    assert match_peak(name) is None


def _tiny(targets, layers):
    model = load_base(random_init=TINY_LLAMA, seed=0)
    inject(model, targets, num_tasks=2, rank=4, alpha=8.0, layers=layers)
    return model


def test_flops_model_against_a_hand_count():
    # TINY_LLAMA: d 64, 4 heads of 16, 2 kv heads, FFN 96, 2 blocks, vocab 300.
    blocks, head = linear_params(_tiny(["q_proj", "v_proj"], [1]))
    per_block = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 96
    assert blocks == {0: per_block, 1: per_block} and head == 300 * 64
    adapters = [(64, 64, 4), (64, 32, 4)]
    attn = 4 * 16 * 64  # seq 16, query width 64
    fm = flops_model(blocks, head, 16, 64, adapters, lowest_adapted=1, split=1)
    n = 2 * per_block + head
    lora = 6 * 4 * (64 + 64) + 6 * 4 * (64 + 32)
    assert fm.n_linear == n
    assert fm.model_per_token == 4 * n + 3 * attn * 2 + lora  # the 4N convention, whatever runs
    top = per_block + head
    assert fm.hardware_per_token == 2 * top + attn + 2 * top + 2 * attn + lora  # only block 1 and the head run
    assert fm.prefix_per_token == 2 * per_block + attn  # block 0, once per cached token
    nocache = flops_model(blocks, head, 16, 64, adapters, lowest_adapted=1, split=0)
    assert nocache.hardware_per_token == 2 * n + 2 * attn + 2 * top + 2 * attn + lora
    assert nocache.prefix_per_token == 0


def test_adapters_everywhere_without_cache_run_exactly_the_model_flops():
    blocks, head = linear_params(_tiny(["q_proj"], None))
    fm = flops_model(blocks, head, 32, 64, [(64, 64, 4)] * 2, lowest_adapted=0, split=0)
    assert fm.hardware_per_token == fm.model_per_token


def test_benchmark_times_warmup_apart_and_reports_mfu_or_says_why_not():
    cmd = [sys.executable, "benchmarks/multitask_throughput.py", "--model", "tiny", "--tasks", "2",
           "--seqs-per-task", "2", "--epochs", "2", "--seq", "16", "--top-layers", "2",
           "--arms", "flock", "--warmup", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    plain = json.loads(subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout)
    row = plain["arms"]["flock"]
    assert "mfu_model" not in row and "no MFU" in plain["mfu_note"]  # CPU, no peak: said, not dropped silently
    assert row["warmup_s"] > 0 and row["train_tokens_per_s"] > 0
    assert plain["flops_model"]["model_per_token"] == row["model_flops_per_token"]
    assert row["hardware_flops_per_token"] < row["model_flops_per_token"]  # the prefix cache skips block 0-1
    peak = json.loads(subprocess.run(cmd + ["--peak-tflops", "0.001"], cwd=ROOT, env=env, capture_output=True,
                                     text=True, check=True).stdout)
    row = peak["arms"]["flock"]
    assert peak["peak"] == {"label": "--peak-tflops", "tflops": 0.001} and "mfu_note" not in peak
    # tokens of the timed steps only: 2 tasks x (4 - 1) steps x 1 row x 16 tokens
    timed = 2 * 3 * 16
    work = row["prefix_s"] + row["train_s"]
    assert row["mfu_model"] == pytest.approx(row["model_flops_per_token"] * timed / work / 1e9, rel=0.02, abs=1e-4)


def test_a_recomputed_head_counts_as_hardware_work_only():
    blocks, head = linear_params(_tiny(["q_proj"], None))
    plain = flops_model(blocks, head, 32, 64, [(64, 64, 4)] * 2, lowest_adapted=0)
    chunked = flops_model(blocks, head, 32, 64, [(64, 64, 4)] * 2, lowest_adapted=0, head_recompute=True)
    assert chunked.model_per_token == plain.model_per_token
    assert chunked.hardware_per_token == plain.hardware_per_token + 2 * head
