"""The flock worker's frozen-prefix cache, sized from the job: budget check, the pays-or-not decision, row scores.

Reads ``flock.prefix_cache`` and ``train:``; the cache itself is :mod:`models.prefix_cache`.
Every method of the comparison, the base evaluation, the gates' calibration and PESC share
one cache: they see the same rows (the sampler is seeded by the job).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from models.prefix_cache import PrefixCache, plan_prefix_cache
from orchestrator.errors import SpecError
from orchestrator.flock.methods import methods_of
from orchestrator.spec import JobSpec

__all__ = ["check_prefix_budget", "worker_prefix_cache"]


def check_prefix_budget(spec: JobSpec, hidden: int, itemsize: int, seq_len: int | None = None) -> None:
    """Refuse a ``flock.prefix_cache.budget_gb`` smaller than one batch's states (when the cache can be on).

    One batch is ``max(train.batch_size, train.eval_batch_size)`` rows of ``seq_len`` (default
    ``train.seq_len``) tokens x ``hidden`` values of ``itemsize`` bytes.
    """
    pc, tr = spec.flock.prefix_cache, spec.train
    if pc.mode == "off":
        return
    need = max(tr.batch_size, tr.eval_batch_size) * (seq_len or tr.seq_len) * hidden * itemsize
    if pc.budget_gb * 2**30 < need:
        raise SpecError(
            f"flock.prefix_cache.budget_gb: {pc.budget_gb:g} GiB cannot hold one batch's frozen-prefix states "
            f"({max(tr.batch_size, tr.eval_batch_size)} rows x {seq_len or tr.seq_len} tokens x {hidden} x "
            f"{itemsize} bytes = {need / 2**30:.3g} GiB); set budget_gb to at least {need / 2**30:.3g}, "
            "or prefix_cache.mode: off"
        )


def worker_prefix_cache(model: nn.Module, spec: JobSpec, split: int, sizes: list[int], owned: list[int],
                        train: dict[int, torch.Tensor], evals: dict[int, torch.Tensor],
                        say: Callable[[str], None]) -> PrefixCache | None:
    """This worker's cache, or ``None`` when it does not pay (``auto``) or is ``off``; logs why in one line.

    Row scores (expected uses, which decide what stays when the budget is full): a training
    row of task d is drawn ``steps * batch_size * p_d / N_d`` times per method (``p_d`` the
    sampler's task probability); an eval row is read once per full evaluation (the base, each
    method, PESC).
    """
    if not split or not train:
        return None
    tr, pc = spec.train, spec.flock.prefix_cache
    emb = model.get_input_embeddings().weight
    length = next(iter(train.values())).shape[1]
    hidden = int(getattr(model.config, "hidden_size", emb.shape[1]))
    check_prefix_budget(spec, hidden, emb.element_size(), length)
    n = np.asarray(sizes, dtype=np.float64)
    p = n**tr.temperature
    p /= p.sum()
    methods = len(methods_of(spec)) + int(spec.pesc.enabled)
    draws = tr.steps * tr.batch_size * float(p[owned].sum())  # this worker's rows of every batch, per method
    eval_passes = 1 + methods
    row_bytes = length * hidden * emb.element_size()
    train_rows, eval_rows = [len(train[s]) for s in train], [len(evals[s]) for s in evals]
    plan = plan_prefix_cache(pc.mode, int(pc.budget_gb * 2**30), row_bytes, sum(train_rows), sum(eval_rows),
                             round(draws), methods, eval_passes)
    say(plan.reason)
    if not plan.use:
        return None
    per_row = tr.steps * tr.batch_size * methods * p[owned] / n[owned]
    return PrefixCache(model, split, {"train": train_rows, "eval": eval_rows}, plan.capacity,
                       scores={"train": per_row.tolist(), "eval": [float(eval_passes)] * len(eval_rows)},
                       keep=plan.kinds, length=length)
