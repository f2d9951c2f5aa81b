"""Live metrics (``report_to``): TensorBoard, MLflow and W&B (offline), from the driver or rank 0 only.

* :mod:`.sink`: one stream of scalars to every configured backend, through each library's own
  client (tensorboardX's ``SummaryWriter``, ``mlflow.MlflowClient``, ``wandb.init``);
* :mod:`.flock`: the flock worker's hooks (rank 0) and the driver's per-task summary;
* :mod:`.tune`: the search's Ray Tune logger callbacks (``TBXLoggerCallback``,
  ``MLflowLoggerCallback``, ``WandbLoggerCallback``), one run per trial.
"""

from orchestrator.metrics.sink import MetricSink, metrics_dir

__all__ = ["MetricSink", "metrics_dir"]
