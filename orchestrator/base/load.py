"""The job's base model from its spec: the name adapters record, and the loaded model.

Every stage that needs the base (flock workers, search trials, pack hosts, recycling,
``loraflock adapt``) reads these settings from the same ``base:`` section; this module is the
one place that turns them into calls of :func:`models.base.load_base`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.spec import JobSpec

if TYPE_CHECKING:
    from torch import nn

__all__ = ["base_model_name", "load_job_base"]


def base_model_name(spec: JobSpec) -> str | None:
    """What an adapter's ``base_model_name_or_path`` records: the hub id or local path of the base.

    The builtin demo model records its upstream hub id (PEFT users load it from there);
    a random-init base records ``None``.
    """
    from models.base import BUILTIN_MODELS

    if spec.base.name in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec.base.name][2]
    return spec.base.name


def load_job_base(spec: JobSpec, device: str = "cpu", dtype: str | None = None) -> nn.Module:
    """The job's frozen base model, loaded as every stage loads it.

    Random-init bases draw their weights from ``train.seed``, so the driver, the workers and
    the trials all build the same model from one spec.

    Args:
        spec: the job; its ``base:`` section says what to load.
        device: torch device string.
        dtype: ``None`` keeps ``base.dtype`` (flock workers, recycling); the flock driver's
            shared copy, the search trials and the pack hosts pass ``"float32"``.

    Example:
        >>> model = load_job_base(spec, "cuda:0")
    """
    from models.base import load_base

    b = spec.base
    return load_base(b.name, b.gguf_file, b.random_init, b.dtype if dtype is None else dtype, device,
                     seed=spec.train.seed)
