"""The run directory an export reads: checked whole before anything is written.

An export is only as good as the run behind it, so a run that has not finished, or was
written by another version of the job schema, is refused with what is missing and the fix,
instead of exporting half a flock or misreading old files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orchestrator.errors import LoraflockError
from orchestrator.spec import JobSpec, format_validation_error

__all__ = ["ExportError", "Run", "open_run", "need"]


class ExportError(LoraflockError):
    """A run that cannot be exported as asked; the message names the missing piece and the fix."""


@dataclass
class Run:
    """A finished run: its directory, job, stage results and report.

    Attributes:
        path: the run directory (``loraflock run ... --out PATH``).
        spec: the job, re-validated with this version's schema.
        results: ``state.json`` ``results`` (each stage's section).
        report: ``report.json``.
        tasks: the flock's task names in slot order (explicit tasks and expanded task sets).
    """

    path: Path
    spec: JobSpec
    results: dict[str, Any]
    report: dict[str, Any]
    tasks: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: not readable JSON ({e}); the run directory is damaged, re-run the job") from None


def need(path: Path, what: str) -> Path:
    """``path`` if it exists, else an :class:`ExportError` naming it and what wrote it."""
    if not path.exists():
        raise ExportError(f"{path} is missing ({what}); the run is incomplete: re-run the job on the same --out")
    return path


def open_run(path: str | Path) -> Run:
    """Check that ``path`` holds a finished run of this schema version; read it.

    Raises:
        ExportError: not a run directory, another schema version, or a stage not finished.
    """
    from orchestrator.pipeline import StageState, spec_fingerprint

    run = Path(path)
    if not run.is_dir():
        raise ExportError(f"{run}: no such run directory; give the --out of a finished `loraflock run`")
    marker = need(run / "job.json", "job.json, written when the job starts")
    job = _read_json(marker)
    try:
        spec = JobSpec.model_validate(job.get("spec"))
    except ValidationError as e:
        raise ExportError(
            f"{marker}: the run was written by another version of the job schema and does not validate now "
            f"({format_validation_error(e, 'its spec')}); export it with the loraflock version that ran it, or re-run "
            "the job with this one"
        ) from None
    if job.get("fingerprint") != spec_fingerprint(spec):
        raise ExportError(
            f"{marker}: the job's fingerprint {job.get('fingerprint')!r} does not match this version's "
            f"{spec_fingerprint(spec)!r}: the run was written by another version of the job schema; export it with "
            "the loraflock version that ran it, or re-run the job with this one"
        )
    state = _read_json(need(run / "state.json", "state.json, the stages' progress"))
    stages = state.get("stages", {})
    enabled = {"flock": spec.flock.enabled, "search": spec.search.enabled, "recycle": spec.recycle.enabled}
    unfinished = [f"{n} ({stages.get(n, 'not started')})" for n, on in enabled.items()
                  if on and stages.get(n) != StageState.FINISHED]
    if unfinished:
        raise ExportError(f"{run}: the run is unfinished: stage {', '.join(unfinished)}; re-run "
                          f"`loraflock run JOB.yaml --out {run}` to finish it, then export")
    report = _read_json(need(run / "report.json", "report.json, written when the job ends"))
    tasks = list(report.get("job", {}).get("tasks") or [t.name for t in spec.tasks])
    return Run(run, spec, state.get("results", {}), report, tasks)
