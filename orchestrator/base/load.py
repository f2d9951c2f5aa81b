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

__all__ = ["base_model_name", "load_job_base", "run_dtype", "store_dtype"]


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
        dtype: ``None`` keeps ``base.dtype`` (flock workers, recycling); the search trials and
            the pack hosts pass :func:`run_dtype`, the flock driver's shared copy :func:`store_dtype`.
            On a CUDA device TF32 is turned on for the process (:func:`models.precision.fast_matmul`).

    Example:
        >>> model = load_job_base(spec, "cuda:0")
    """
    from models.base import load_base
    from models.precision import fast_matmul

    fast_matmul(device)
    b = spec.base
    return load_base(b.name, b.gguf_file, b.random_init, b.dtype if dtype is None else dtype, device,
                     seed=spec.train.seed)


def run_dtype(spec: JobSpec, device: str) -> str:
    """The base's dtype for a search trial or pack host on ``device``.

    On the CPU fp32 whatever ``base.dtype`` says (trials compare their losses with each other
    and with the flock's fp32 CPU run; bf16 CPU matmuls are slow); on a GPU ``base.dtype``
    (``auto``: bf16), as the flock workers run, so a trial's figures are the flock's.
    """
    return "float32" if str(device).startswith("cpu") else spec.base.dtype


def store_dtype(spec: JobSpec) -> str:
    """The dtype the flock driver puts the shared base into the object store with.

    The dtype the workers compute in: with ``ray.use_gpu`` that is ``base.dtype`` on a GPU
    (``auto``: bf16), so each GPU worker copies the shared bf16 pages straight to its device,
    one host-to-device transfer of half the bytes, and the node's store holds half the
    memory; an fp32 store would make every worker convert on the host first. CPU workers
    read fp32 (``auto`` on the CPU) in place.
    """
    from models.base import resolve_dtype

    dev = "cuda" if spec.ray.use_gpu else "cpu"
    return str(resolve_dtype(spec.base.dtype, dev)).removeprefix("torch.")
