"""One stream of scalars to every ``report_to`` backend, through the libraries' own clients.

A stream is one stage of one job (``flock``): a TensorBoard run directory
``<out>/metrics/tensorboard/<stream>``, an MLflow run named ``<stream>`` in the experiment named
after the job (tracking URI ``$MLFLOW_TRACKING_URI``, else the file store
``<out>/metrics/mlruns``), and a W&B run in offline mode under ``<out>/metrics/wandb``
(``wandb sync`` uploads it later). Only the driver or rank 0 opens one, so every scalar is
written once.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["MetricSink", "metrics_dir", "mlflow_uri"]


def metrics_dir(out: str | Path) -> Path:
    """Where a job's metric files go: ``<out>/metrics``."""
    return Path(out) / "metrics"


def mlflow_uri(root: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` (a server or database), else a file store inside the run.

    MLflow 3 keeps the file store in maintenance mode and refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE`` is set; a run's own metrics need no server or database, so the
    default store sets it (a user's tracking URI is left alone).
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (root / "mlruns").resolve().as_uri()


class MetricSink:
    """Scalars to TensorBoard / MLflow / W&B at once.

    Args:
        backends: the job's ``report_to`` (validated: known and installed).
        root: ``<out>/metrics``.
        experiment: the job's name (MLflow experiment, W&B project).
        stream: this stream's name (TensorBoard run, MLflow/W&B run name).
        params: recorded once (MLflow params, W&B config).

    Example:
        >>> sink = MetricSink(["tensorboard", "mlflow"], Path("runs/tiny/metrics"), "tiny", "flock")
        >>> sink.log({"hierarchical/train_loss": 3.2}, step=4); sink.close()
    """

    def __init__(self, backends: list[str], root: Path, experiment: str, stream: str,
                 params: Mapping[str, object] | None = None) -> None:
        self.backends = list(backends)
        self._tb = self._mlflow = self._run_id = self._wandb = None
        if "tensorboard" in backends:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(root / "tensorboard" / stream))
        if "mlflow" in backends:
            from mlflow import MlflowClient

            self._mlflow = MlflowClient(tracking_uri=mlflow_uri(root))
            exp = self._mlflow.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self._mlflow.create_experiment(experiment)
            self._run_id = self._mlflow.create_run(exp_id, run_name=stream).info.run_id
            for k, v in (params or {}).items():
                self._mlflow.log_param(self._run_id, k, v)
        if "wandb" in backends:
            import wandb

            (root / "wandb").mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(project=experiment, name=stream, mode="offline", dir=str(root / "wandb"),
                                     config=dict(params or {}), reinit="create_new")

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        """Write finite scalars at ``step`` (NaN/inf are skipped: they break MLflow's store)."""
        clean = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(float(v))}
        if not clean:
            return
        if self._tb is not None:
            self._guard("tensorboard", lambda: [self._tb.add_scalar(k, v, step) for k, v in clean.items()])
        if self._mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, step) for k, v in clean.items()]
            self._guard("mlflow", lambda: self._mlflow.log_batch(self._run_id, metrics=metrics))
        if self._wandb is not None:
            self._guard("wandb", lambda: self._wandb.log(clean, step=step))

    def _guard(self, backend: str, write) -> None:
        """Write to one backend; a failing backend is switched off with one warning, never the job.

        Live metrics are a view of the run: a full disk or an unreachable tracking server must not
        stop hours of training (the report at the end holds every figure anyway).
        """
        try:
            write()
        except Exception as e:  # noqa: BLE001 (any backend error: the job goes on)
            print(f"[loraflock] report_to {backend}: writing failed ({type(e).__name__}: {e}); "
                  f"{backend} is off for this stream, training goes on", file=sys.stderr, flush=True)
            if backend == "tensorboard":
                self._tb = None
            elif backend == "mlflow":
                self._mlflow = None
            else:
                self._wandb = None

    def close(self) -> None:
        """Flush and finish every backend's run."""
        if self._tb is not None:
            self._tb.close()
        if self._mlflow is not None:
            self._mlflow.set_terminated(self._run_id)
        if self._wandb is not None:
            self._wandb.finish()
