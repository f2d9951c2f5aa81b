"""The job's base model from its spec: the name adapters record, and the loaded model.

Every stage that needs the base (flock workers, search trials, pack hosts, recycling,
``loraflock adapt``) reads these settings from the same ``base:`` section; this module is the
one place that turns them into calls of :func:`models.base.load_base`.
"""

from __future__ import annotations

from orchestrator.spec import JobSpec

__all__ = ["base_model_name"]


def base_model_name(spec: JobSpec) -> str | None:
    """What an adapter's ``base_model_name_or_path`` records: the hub id or local path of the base.

    The builtin demo model records its upstream hub id (PEFT users load it from there);
    a random-init base records ``None``.
    """
    from models.base import BUILTIN_MODELS

    if spec.base.name in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec.base.name][2]
    return spec.base.name
