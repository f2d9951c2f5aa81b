"""``report_to``: where the job streams its live metrics (TensorBoard, MLflow, W&B offline).

Checked at validation, before anything runs: a backend this project does not know, or one
whose client package is not installed here, is refused with the line that installs it.
"""

from __future__ import annotations

import importlib.util

__all__ = ["BACKENDS", "check_report_to"]

# backend -> (module its client is imported from, pip line that installs it)
BACKENDS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboardX", "pip install 'loraflock[metrics]'  (or: pip install tensorboardX)"),
    "mlflow": ("mlflow", "pip install 'loraflock[metrics]'  (or: pip install mlflow-skinny)"),
    "wandb": ("wandb", "pip install wandb"),
}


def check_report_to(backends: list[str]) -> list[str]:
    """The backends, unique and in order; ``ValueError`` naming an unknown or uninstalled one."""
    out: list[str] = []
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"report_to: {b!r} is not a backend loraflock streams to; choose from {sorted(BACKENDS)}")
        module, pip = BACKENDS[b]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"report_to: {b!r} needs the {module} package, which is not installed: {pip}")
        if b not in out:
            out.append(b)
    return out
