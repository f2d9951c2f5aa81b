"""Export kind ``recycled``: the EigenLoRAx coefficient adapters, expanded to plain LoRA factors.

A stored task is ``s B ~ mu_B 1^T + V_B alpha_B`` and ``A^T ~ mu_A 1^T + V_A alpha_A``
(:meth:`models.eigen.subspace.Subspace.reconstruct`): LoRA factors of the task's rank r, exactly
what the subspace serves (``--rank k`` truncates by SVD with the error reported). The held-out
task adapted on coefficients only (``recycle/new_task/coeff``) is already such a PEFT adapter.
The base is the one the recycled adapters belong to: the flock's (plain or quantised) or, with
``search.pick``, the picked trial's, and whatever that base folded in is subtracted alike.
"""

from __future__ import annotations

from models.eigen.subspace import Subspace
from orchestrator.export.bundle import Bundle
from orchestrator.export.lowrank import pairs_of_peft
from orchestrator.export.run_dir import ExportError, Run, need

__all__ = ["recycled_bundle", "recycled_tasks"]


def recycled_tasks(run: Run) -> list[str]:
    """Every adapter the recycle stage stored, plus its new task (when one was adapted)."""
    sub = _section(run)
    new = (sub.get("new_task") or {}).get("task")
    return list(sub.get("adapters") or []) + ([new] if new else [])


def _section(run: Run) -> dict:
    rc = run.results.get("recycle")
    if not rc:
        raise ExportError(f"{run.path}: the run has no recycle stage results; enable recycle and run it, or export "
                          "--what flock")
    return rc


def recycled_bundle(run: Run, tasks: list[str]) -> Bundle:
    """The recycled adapters of ``tasks`` on the base they were recycled from."""
    rc = _section(run)
    if rc.get("source") == "search.picked":
        from orchestrator.export.picked import picked_bundle

        bundle = picked_bundle(run, [])
    elif run.spec.gates.enabled:
        raise ExportError(f"{run.path}: the recycled adapters of a gated flock were trained with gates on the unpruned "
                          "base, which no plain base reproduces; export --what flock (the pruned model) instead")
    elif run.spec.base.quantized:
        from orchestrator.export.quantised import quantised_bundle

        bundle = quantised_bundle(run, [])
    else:
        from orchestrator.export.plain import plain_bundle

        bundle = plain_bundle(run, [])
    sub = Subspace.load(need(run.path / "recycle" / "subspace", "the recycled subspace"))
    new = (rc.get("new_task") or {}).get("task")
    for t in tasks:
        if t == new:
            coeff = need(run.path / "recycle" / "new_task" / "coeff", "the new task's adapter")
            bundle.adapters[t] = pairs_of_peft(coeff)
        else:
            rec = sub.reconstruct(t)
            bundle.adapters[t] = {n: (a, b * sub.scales[t][n]) for n, (a, b) in rec.items()}
    bundle.kind = "recycled"
    bundle.notes.append(f"adapters: expanded from the subspace's coefficients (K = {rc.get('k')}; reconstruction "
                        f"error vs the original adapters {rc.get('reconstruction_rel_error', float('nan')):.3g})")
    return bundle
