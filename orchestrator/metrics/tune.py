"""The search's live metrics: Ray Tune's own logger callbacks, one run per trial.

Every trial already reports its :class:`orchestrator.contracts.TrialMetrics` to Tune (macro
perplexity, sparsity, bits, deployed bytes) at every rung; Tune's callbacks, running on the
driver, forward them:

* ``tensorboard``: :class:`ray.tune.logger.TBXLoggerCallback`, event files in each trial's
  directory under ``<out>/ray/search/`` (``tensorboard --logdir <out>/ray/search``);
* ``mlflow``: :class:`ray.air.integrations.mlflow.MLflowLoggerCallback`, one run per trial in the
  experiment ``<job>-search`` (same tracking URI as the flock's streams);
* ``wandb``: :class:`ray.air.integrations.wandb.WandbLoggerCallback` in offline mode, group ``search``.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.metrics.sink import mlflow_uri

__all__ = ["tune_callbacks"]


def tune_callbacks(backends: list[str], root: Path, experiment: str) -> list:
    """The Tune callbacks for ``report_to`` (empty when nothing is asked)."""
    out: list = []
    if "tensorboard" in backends:
        from ray.tune.logger import TBXLoggerCallback

        out.append(TBXLoggerCallback())
    if "mlflow" in backends:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        out.append(MLflowLoggerCallback(tracking_uri=mlflow_uri(root), experiment_name=f"{experiment}-search"))
    if "wandb" in backends:
        from ray.air.integrations.wandb import WandbLoggerCallback

        (root / "wandb").mkdir(parents=True, exist_ok=True)
        out.append(WandbLoggerCallback(project=experiment, group="search", mode="offline", dir=str(root / "wandb")))
    return out
