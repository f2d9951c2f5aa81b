"""The builtin demo job: SmolLM2-135M (offline GGUF) on the ``stdlib-code`` task suite.

Sized for 2 CPU cores: adapters on the top blocks only (the frozen blocks below are run
once per sequence and cached), 128-token rows, a few dozen steps per method. Stages: the
hierarchical flock with both baselines, PESC on the same workers, and recycling with a new
task (``xml``) held out of the flock. The same job is ``examples/demo.yaml`` (a test keeps
the two equal); the tasks' training caps are the suite's own :data:`tasks.DEMO_SIZES`.
"""

from __future__ import annotations

from orchestrator.spec import JobSpec
from tasks import DEMO_SIZES

__all__ = ["DEMO_JOB", "demo_job"]

DEMO_JOB: dict = {
    "name": "demo",
    "base": {"name": "smollm2-135m"},
    "tasks": [
        {
            "name": pkg,
            "source": {"kind": "builtin", "suite": "stdlib-code", "package": pkg},
            "max_train_sequences": n,
            "max_eval_sequences": 24,
        }
        # train-sequence caps: >= 10x between the smallest and the largest task, like BoRA's speakers
        for pkg, n in DEMO_SIZES.items()
    ],
    "lora": {
        "rank": 8,
        "alpha": 16,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "top_layers": 4,
    },
    "train": {"steps": 60, "batch_size": 8, "seq_len": 128, "lr": 1e-3, "seed": 0, "log_every": 10},
    "flock": {"tau": 100.0, "baselines": ["independent", "unified"]},
    "search": {
        "enabled": True,
        "space": "demo",
        "num_samples": 1,  # x the space's 2 x 2 grid (whole-base bit budget x sparsity) = 4 trials
        "steps": 30,
        "eval_every": 10,
        "grace_period": 10,
        "reduction_factor": 2.0,
        "max_concurrent_trials": 2,
        "quantize_layers": "all",  # quantised trials quantise every block (each setting once, its own prefix)
    },
    "pesc": {"enabled": True, "num_experts": 8, "top_k": 2, "bottleneck": 64, "balance_coef": 0.05},
    "recycle": {
        "enabled": True,
        "explained_variance": 0.9,
        # held out of the flock: a new task that trains only coefficients on the subspace
        "new_task": {
            "name": "xml",
            "source": {"kind": "builtin", "suite": "stdlib-code", "package": "xml"},
            "max_train_sequences": 128,
            "max_eval_sequences": 24,
        },
    },
    "ray": {"num_workers": 1},
}


def demo_job() -> JobSpec:
    """The validated demo job."""
    return JobSpec.model_validate(DEMO_JOB)
