"""Export kind ``plain``: the flock on an unmodified base, whose adapters already fit any server.

The base is the job's own (``base.name`` or the seeded random-init model) saved as a plain
``transformers`` directory; the adapters are the run's ``adapters/<task>/``, re-written at one
rank with the scale in B (:mod:`orchestrator.export.lowrank`), which changes no logit.
"""

from __future__ import annotations

from orchestrator.export.bundle import Bundle
from orchestrator.export.lowrank import pairs_of_peft
from orchestrator.export.run_dir import Run, need

__all__ = ["plain_bundle", "flock_adapters"]


def flock_adapters(run: Run, tasks: list[str]) -> dict:
    """The flock's delivered adapters (``adapters/<task>/``) as pairs."""
    return {t: pairs_of_peft(need(run.path / "adapters" / t, f"the flock's adapter of task {t!r}")) for t in tasks}


def plain_bundle(run: Run, tasks: list[str]) -> Bundle:
    """The job's base and the flock's adapters of ``tasks``."""
    from orchestrator.base.load import base_model_name, load_job_base

    model = load_job_base(run.spec, "cpu", "float32")
    return Bundle("plain", model, flock_adapters(run, tasks), base_name=base_model_name(run.spec))
