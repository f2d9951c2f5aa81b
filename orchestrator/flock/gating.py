"""FineGates inside the flock: the gates' initial state, their schedule, results and export.

The worker (:mod:`orchestrator.flock.worker`) calls these when the job has a ``gates:``
section; the gate maths and schedule themselves are in :mod:`models.gates`. Plain PyTorch
(plus ``torch.distributed`` to average shared gates' importance scores over workers); it sits
in ``orchestrator/`` because it reads the job's ``gates:`` and ``train:`` sections.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.peft_io import save_adapter
from models.train.data import FlockData
from models.train.hooks import ExtraParams, TrainHooks
from orchestrator.contracts import GateResults
from orchestrator.spec import JobSpec
from orchestrator.specs.gates import GatesSpec

__all__ = ["export_gated", "gate_hooks", "gate_init_state", "gate_results", "inject_spec_gates"]


def inject_spec_gates(model, g: GatesSpec, layers: list[int] | None, scope: str, num_tasks: int) -> list[str]:
    """The job's gates on ``model``: ``gates.target_modules`` (by ``gates.sides``) and, with
    ``gates.heads``, one gate per query head; ``layers`` = the blocks to gate (``None``: all).

    The one place the worker, the search trials and preflight build gates from a
    ``gates:`` section, so the three cannot disagree.
    """
    from models.gates.heads import inject_head_gates
    from models.gates.layer import inject_gates

    names = inject_gates(model, g.target_modules, layers=layers, scope=scope, num_tasks=num_tasks, sigma=g.sigma,
                         gate_rows=g.sides != "cols", gate_cols=g.sides != "rows")
    if g.heads:
        names += inject_head_gates(model, layers=layers, scope=scope, num_tasks=num_tasks, sigma=g.sigma)
    return names


def gate_init_state(model, data: FlockData, spec: JobSpec, world: int) -> dict:
    """Initial gate logits (the same for every method): importance init or constant.

    Importance comes from ``gates.calibration_batches`` batches of this worker's training
    rows through the base (adapters at B = 0); shared gates average the workers' scores so
    every worker starts from the same gates.
    """
    import torch.distributed as dist

    from models.gates.layer import gate_params
    from models.gates.schedule import importance_scores, init_from_importance
    from models.train.step import Batch, row_nll
    from models.train.trim import trim_columns

    g, bs = spec.gates, spec.train.batch_size
    device = next(model.parameters()).device
    if g.init in ("importance", "taylor"):
        def forward() -> torch.Tensor:
            left, total = g.calibration_batches, torch.zeros(())
            for s in data.train:
                for i in range(0, data.train_count(s), bs):
                    if left == 0:
                        return total
                    rows = data.train_rows(s, slice(i, i + bs), device)  # only these rows, from the store
                    at = np.arange(i, i + len(rows))
                    scored = data.train_mask_rows(s, slice(i, i + bs), device)
                    rows, scored = trim_columns(rows, scored)  # as training batches are
                    pre = data.train_prefix_rows([s] * len(rows), at, rows)
                    tid = torch.full((len(rows),), s, dtype=torch.long, device=device)
                    batch = Batch(rows, tid, torch.ones(len(rows), device=device), pre, data.split, scored)
                    total = total + row_nll(model, batch).mean()
                    left -= 1
            return total

        scores = importance_scores(model, forward, "taylor" if g.init == "taylor" else "magnitude")
        if world > 1 and dist.is_available() and dist.is_initialized() and g.scope == "shared":
            for sides in scores.values():
                for t in sides.values():
                    dist.all_reduce(t)
                    t /= world
        init_from_importance(model, scores)
    ids = {id(p) for p in gate_params(model)}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in ids}


def gate_hooks(model, spec: JobSpec, world: int) -> TrainHooks:
    """train_method hooks that train the gates with the job's schedule (fresh per method)."""
    from models.gates.layer import gate_params
    from models.gates.schedule import GateController, GateSchedule, clear_hard

    g = spec.gates
    clear_hard(model)
    sched = GateSchedule(spec.train.steps, g.target_sparsity, g.lam, g.warmup, g.sigma, g.sigma_final,
                         g.harden_at, g.allocation, align=g.align)
    shared = g.scope == "shared"
    ctrl = GateController(model, sched, penalty_scale=1.0 / world if shared else 1.0)
    return TrainHooks(
        extra_loss=ctrl.penalty,
        on_step=ctrl.on_step,
        before_eval=ctrl.finish,
        extra_params=ExtraParams(gate_params(model), lr=g.gate_lr or sched.auto_gate_lr(), local=not shared),
    )


def gate_results(model, names: list[str], owned: list[int]) -> GateResults:
    """Sparsity achieved by this worker's gates (overall, per layer, per task)."""
    from models.gates.layer import sparsity_report

    rep = sparsity_report(model)
    rep["tasks"] = {names[g]: sparsity_report(model, task=s)["removed_fraction"] for s, g in enumerate(owned)}
    return GateResults(**rep)


def export_gated(model, where: Path, names: list[str], owned: list[int], rank: int, scope: str) -> None:
    """The pruned plain model(s) and PEFT adapters for them (``export/``, see README)."""
    from models.gates.export import export_pruned, save_pruned, strip_adapters

    if scope == "shared":  # one pruned base for every task (written once, by rank 0)
        pruned = export_pruned(model)
        for s, g in enumerate(owned):
            save_adapter(pruned, s, where / "adapters" / names[g], "export/model")
        if rank == 0:
            save_pruned(strip_adapters(pruned), where / "model")
        return
    for s, g in enumerate(owned):  # task scope: every task has its own pruned base
        pruned = export_pruned(model, task=s)
        save_adapter(pruned, s, where / names[g] / "adapter", f"export/{names[g]}/model")
        save_pruned(strip_adapters(pruned), where / names[g] / "model")
