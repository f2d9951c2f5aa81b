"""Shared helpers for the orchestrator tests: the tiny three-task job the search and packing tests train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from orchestrator.spec import JobSpec
from tests.conftest import TINY_LLAMA

TINY_JOB_TASKS = ("json", "http", "email")
TINY_JOB_TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_job_spec(num_layers: int = 2, top_layers: int = 1, steps: int = 4) -> JobSpec:
    """A random-init tiny Llama (byte tokenizer) with rank-4 LoRA on three builtin tasks.

    Args:
        num_layers: blocks of the random base (``TINY_LLAMA`` has 2).
        top_layers: adapted top blocks (``lora.top_layers``).
        steps: ``train.steps``.
    """
    return JobSpec.model_validate({
        "base": {"random_init": {**TINY_LLAMA, "num_hidden_layers": num_layers}, "tokenizer": "bytes"},
        "tasks": [{"name": n, "source": {"kind": "builtin", "package": n}} for n in TINY_JOB_TASKS],
        "lora": {"rank": 4, "alpha": 8, "target_modules": TINY_JOB_TARGETS, "top_layers": top_layers},
        "train": {"steps": steps, "batch_size": 4, "seq_len": 16, "lr": 1e-3, "log_every": 100},
    })


def run_job_cli(job: Path, out: Path, timeout: int = 400, **env: str) -> dict:
    """``loraflock run JOB --out OUT`` in a subprocess (one thread, ``env`` added); asserts it
    succeeded, showing the end of its output if not, and returns ``report.json``."""
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(job), "--out", str(out)],
                       capture_output=True, text=True, cwd=root, timeout=timeout,
                       env=dict(os.environ, OMP_NUM_THREADS="1", **env))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "report.json").read_text())
