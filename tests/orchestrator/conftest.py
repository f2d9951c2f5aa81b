"""Shared helpers for the orchestrator tests: the tiny three-task job the search and packing tests train."""

from __future__ import annotations

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
