"""Live metrics (``report_to``): refused at validation when unknown or not installed; the tiny job's
flock and search streams read back from TensorBoard event files and an MLflow file store."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from orchestrator.errors import SpecError
from orchestrator.spec import parse_job
from tests.orchestrator.conftest import run_job_cli

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "examples" / "tiny.yaml"


def _job(**changes) -> dict:
    job = yaml.safe_load(TINY.read_text())
    job.update(changes)
    return job


def test_unknown_or_uninstalled_backends_are_refused_with_the_pip_line(monkeypatch):
    with pytest.raises(SpecError, match=r"report_to.*'comet' is not a backend.*\['mlflow', 'tensorboard', 'wandb'\]"):
        parse_job(_job(report_to=["comet"]))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(SpecError, match=r"'mlflow' needs the mlflow package.*pip install 'loraflock\[metrics\]'"):
        parse_job(_job(report_to=["tensorboard", "mlflow"]))


def test_report_to_does_not_change_the_jobs_fingerprint():
    from orchestrator.pipeline import spec_fingerprint

    assert spec_fingerprint(parse_job(_job())) == spec_fingerprint(parse_job(_job(report_to=["tensorboard"])))


def _tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted({p.parent for p in logdir.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def _mlflow_metrics(uri: str, experiment: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    out = {}
    for run in client.search_runs([exp.experiment_id]):
        name = run.info.run_name
        history = {k: client.get_metric_history(run.info.run_id, k) for k in run.data.metrics}
        out[name] = {k: [(m.step, m.value) for m in ms] for k, ms in history.items()}
    return out


def test_sink_writes_what_tensorboard_and_mlflow_read_back(tmp_path):
    from orchestrator.metrics.sink import MetricSink, mlflow_uri

    sink = MetricSink(["tensorboard", "mlflow"], tmp_path, "job", "flock/hierarchical", {"rank": 4})
    sink.log({"hierarchical/train_loss": 3.5, "skip": float("nan")}, 4)
    sink.log({"hierarchical/train_loss": 3.0}, 8)
    sink.close()
    assert _tb_scalars(tmp_path / "tensorboard")["hierarchical/train_loss"] == [(4, 3.5), (8, 3.0)]
    runs = _mlflow_metrics(mlflow_uri(tmp_path), "job")
    assert runs["flock/hierarchical"] == {"hierarchical/train_loss": [(4, 3.5), (8, 3.0)]}


@pytest.mark.integration
def test_tiny_job_streams_flock_and_search_metrics(tmp_path):
    """The tiny job (flock + 1-trial search) with TensorBoard and MLflow: every stream reads back."""
    from orchestrator.metrics.sink import mlflow_uri

    job = _job(report_to=["tensorboard", "mlflow"])
    job["train"].update(steps=8, eval_every=4, log_every=4)
    job["flock"]["baselines"] = ["independent"]
    job["pesc"]["enabled"] = False
    job["recycle"] = {"enabled": False}
    job["search"].update(space="default", num_samples=1, steps=2, eval_every=1, grace_period=1)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(job))
    out = tmp_path / "out"
    run_job_cli(spec, out, timeout=500, MLFLOW_TRACKING_URI="")
    tb = _tb_scalars(out / "metrics" / "tensorboard")
    # rank 0, live: the loss at every log_every step, its tasks' eval losses and tau at eval_every
    assert [s for s, _ in tb["hierarchical/train_loss"]] == [4, 8]
    assert [s for s, _ in tb["independent/train_loss"]] == [4, 8]
    assert any(k.startswith("hierarchical/tau/") for k in tb)
    # per-task training loss at every log_every step (the tasks that had rows in that window)
    per_task = [k for k in tb if k.startswith("hierarchical/task_train_loss/")]
    assert per_task and all(s in (4, 8) for k in per_task for s, _ in tb[k])
    # the driver, after the stage: every task's eval curve (one per dataset) and final loss
    for task in ("json", "http", "email"):
        assert [s for s, _ in tb[f"hierarchical/eval_loss/{task}"]][-1:] == [4]
        assert f"hierarchical/final_eval_loss/{task}" in tb
    runs = _mlflow_metrics(mlflow_uri(out / "metrics"), "tiny")
    assert {"flock/hierarchical", "flock/independent", "flock/hierarchical/tasks"} <= set(runs)
    assert [s for s, _ in runs["flock/hierarchical"]["hierarchical/train_loss"]] == [4, 8]
    # the search: Ray Tune's own callbacks, one MLflow run per trial, TensorBoard files in the trial dir
    search = _mlflow_metrics(mlflow_uri(out / "metrics"), "tiny-search")
    trials = json.loads((out / "report.json").read_text())["search"]["trials"]
    assert len(search) == len(trials) and all("macro_ppl" in m for m in search.values())
    assert any("macro_ppl" in k for k in _tb_scalars(out / "ray" / "search"))


def test_wandb_offline_run_holds_the_scalars(tmp_path):
    """W&B in offline mode: a local run folder that ``wandb sync`` uploads later (skipped without wandb)."""
    pytest.importorskip("wandb")
    from orchestrator.metrics.sink import MetricSink

    sink = MetricSink(["wandb"], tmp_path, "tiny", "flock/hierarchical")
    sink.log({"hierarchical/train_loss": 3.5}, 4)
    sink.close()
    runs = list((tmp_path / "wandb").rglob("run-*.wandb"))
    assert runs and any(b"hierarchical/train_loss" in r.read_bytes() for r in runs)


def test_a_failing_backend_is_switched_off_and_the_job_goes_on(tmp_path, capsys):
    from orchestrator.metrics.sink import MetricSink

    class Broken:
        def add_scalar(self, *a):
            raise OSError("disk full")

        def close(self):
            pass

    sink = MetricSink(["tensorboard"], tmp_path, "tiny", "flock/hierarchical")
    sink._tb = Broken()
    sink.log({"hierarchical/train_loss": 3.5}, 4)  # no exception reaches the training loop
    sink.log({"hierarchical/train_loss": 3.0}, 8)
    sink.close()
    err = capsys.readouterr().err
    assert err.count("report_to tensorboard: writing failed (OSError: disk full)") == 1
