"""``loraflock adapt``: a new task on a recycled subspace, in process (no cluster needed)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import ValidationError

from orchestrator.errors import SpecError
from orchestrator.spec import JobSpec, format_validation_error, load_job, parse_job
from tasks.spec import TaskSpec

__all__ = ["adapt_from_cli"]


def _job_for(subspace: Path, job: str | None) -> tuple[JobSpec, Path]:
    run = subspace.resolve().parent.parent  # <run>/recycle/subspace
    if job:
        return load_job(job), run
    marker = run / "job.json"
    if not marker.is_file():
        raise SpecError(f"{subspace}: no job.json in {run}; pass --job JOB.yaml (the job that built the subspace)")
    return parse_job(json.loads(marker.read_text())["spec"], str(marker)), run


def _task(path: str) -> TaskSpec:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: no such task file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SpecError(f"{p}: not a readable YAML task spec ({str(e).splitlines()[0]})") from None
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, str(p)).replace("job spec", "task spec")) from None


def adapt_from_cli(subspace: str, task_file: str, out: str | None, job: str | None, steps: int | None,
                   lr: float | None, k_extra: int, compare_lora: bool) -> dict:
    """Validate everything, build the task's data, train its coefficients, export PEFT adapters."""
    from orchestrator.base.load import base_model_name
    from orchestrator.data import build_job_data
    from orchestrator.recycle.adapt import adapt_new_task

    sub = Path(subspace)
    if not (sub / "subspace.json").is_file():
        raise SpecError(
            f"{sub}: not a subspace directory (no subspace.json); point --subspace at <run>/recycle/subspace"
        )
    spec, run = _job_for(sub, job)
    if spec.base.quantized:  # the run's adapters hold the LQ part of a quantised base; adapt loads the plain base
        raise SpecError(f"{run}: this run trained on a quantised base (base.bits/base.bit_budget); adapting a new "
                        "task on its subspace is not supported for quantised bases yet")
    task = _task(task_file)
    (data,) = build_job_data(spec, [task])
    target = Path(out) if out else run / "adapt" / task.name
    result = adapt_new_task(spec, sub, task.name, data.train_ids, data.eval_ids, target, base_model_name(spec),
                            steps, lr, k_extra, compare_lora, train_mask=data.train_mask, eval_mask=data.eval_mask)
    result["adapters"] = {k: str(target / k) for k in (["coeff", "lora"] if compare_lora else ["coeff"])}
    return result
