"""loraflock's Ray side: the job spec, the pipeline and the SDK.

Example:
    >>> from orchestrator import load_job, run_job
    >>> report = run_job(load_job("examples/tiny.yaml"), "runs/tiny")
"""

from __future__ import annotations

from orchestrator.errors import LoraflockError, OutputDirError, SpecError, StageError
from orchestrator.spec import JobSpec, load_job, parse_job

__all__ = [
    "JobSpec",
    "load_job",
    "parse_job",
    "run_job",
    "LoraflockClient",
    "ClusterError",
    "read_report",
    "LoraflockError",
    "SpecError",
    "OutputDirError",
    "StageError",
]


def __getattr__(name: str):
    """The SDK client is imported lazily (it pulls in Ray's job-submission client)."""
    if name in ("LoraflockClient", "ClusterError", "read_report"):
        from orchestrator.cluster import client

        return getattr(client, name)
    raise AttributeError(name)


def run_job(*args, **kwargs):
    """Run a job; see :func:`orchestrator.pipeline.run_job` (imported lazily: it pulls in Ray)."""
    from orchestrator.pipeline import run_job as _run

    return _run(*args, **kwargs)
