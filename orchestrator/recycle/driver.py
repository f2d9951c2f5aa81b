"""The recycle stage (EigenLoRAx): the flock's adapters become a shared principal subspace.

With ``search.pick`` the stage recycles the picked search trial instead: its task adapters
(gates folded in, :mod:`orchestrator.search.pick`, written to ``search/pick/adapters/``)
make the subspace, and the new task trains on that trial's compressed base, so the
recycled deployment is the picked compressed model. Without a pick it reads the flock's
``adapters/`` as before.

Every adapter is stored as its coefficients on the subspace (``recycle/subspace``), the
report gets the explained variance, the storage ratio and each adapter's reconstruction
error, and a task held out of the flock is trained twice on Ray, with coefficients only and
with a full LoRA of the flock's rank, to measure what the subspace buys.
"""

from __future__ import annotations

from pathlib import Path

import ray

from models.eigen.subspace import build_subspace, load_peft_adapters
from models.files import atomic_write_json
from orchestrator.console import say
from orchestrator.errors import StageError
from orchestrator.spec import JobSpec

__all__ = ["run_recycle"]


def run_recycle(
    spec: JobSpec, out: Path, new_task_data, base_model_name: str | None, picked: dict | None = None,
    task_names: list[str] | None = None,
) -> dict:
    """Build and save the subspace; adapt the held-out task (if any) as a Ray task.

    Args:
        spec: the job.
        out: output directory holding ``adapters/`` from the flock (or ``search/pick/``).
        new_task_data: ``tasks.TaskData`` of ``recycle.new_task`` or ``None``.
        base_model_name: recorded in exported adapters.
        picked: the search's ``search.picked`` record: recycle that trial's compressed model.
        task_names: the job's tasks (explicit and expanded from task sets) whose flock adapters
            are recycled; ``None``: ``spec.tasks``.
    """
    rc = spec.recycle
    if picked is not None:
        from orchestrator.search.pick import export_picked_adapters

        picked = {**picked, "checkpoint": str(out / picked["checkpoint"])}
        whole = f", whole base quantised: {picked['quant_base']}/" if picked.get("quant_base") else ""
        say(f"recycle: the picked search trial {picked['trial_id']} ({picked.get('bits', 16)}-bit base{whole}, "
             f"sparsity {picked.get('sparsity', 0.0):.2f}, rank {picked.get('rank')})")
        dirs: dict[str, Path] = export_picked_adapters(
            spec, picked, picked["checkpoint"], out / "search" / "pick" / "adapters", base_model_name
        )
    else:
        dirs = {
            t: out / "adapters" / t for t in (task_names if task_names is not None else [t.name for t in spec.tasks])
        }
    for src in rc.sources:
        p = Path(src)
        dirs[p.name if p.name not in dirs else f"{p.parent.name}-{p.name}"] = p
    missing = [str(d) for d in dirs.values() if not d.is_dir()]
    if missing:
        raise StageError(
            f"recycle: adapter directories not found: {missing[:3]}; run the flock first or fix recycle.sources"
        )
    adapters, scales = load_peft_adapters(dirs)
    sub = build_subspace(adapters, k=rc.k, explained_variance=None if rc.k else rc.explained_variance, scales=scales)
    sub.save(out / "recycle" / "subspace")
    summary = sub.summary()
    full, compact = summary["full_adapter_bytes"], summary["storage_bytes"]
    section = {
        "k": summary["k"],
        "k_per_module": summary["k_per_module"],
        "explained_variance": summary["explained_variance"],
        "storage_ratio": full / compact,  # bytes of N full adapters / bytes of subspace + coefficients
        "full_adapter_bytes": full,
        "subspace_bytes": compact,
        "reconstruction_rel_error": summary["reconstruction_rel_error"],
        "reconstruction_rel_error_per_task": summary["reconstruction_rel_error_per_task"],
        "adapters": sorted(dirs),
        "source": "flock" if picked is None else "search.picked",
    }
    if picked is not None:
        section["picked"] = {k: picked.get(k) for k in ("trial_id", "bits", "rank", "target_sparsity", "sparsity",
                                                        "tau", "macro_ppl", "model_bytes")}
        if picked.get("quant_base"):  # the adapters belong with the whole quantised base the search wrote
            section["picked"] |= {k: picked.get(k) for k in ("bit_budget", "quantize_layers", "base_setting",
                                                             "quant_base")}
    say(f"recycle: {len(dirs)} adapters -> K = {section['k']} principal directions per module, "
         f"explained variance {section['explained_variance']:.3f}, storage {section['storage_ratio']:.1f}x smaller")
    if new_task_data is not None:
        from orchestrator.cluster.nodes import alive_nodes, check_fits, largest_node
        from orchestrator.recycle.adapt import adapt_new_task

        nodes = alive_nodes()  # the whole of one node (one with a GPU if asked), never the cluster's sum
        cpus = max(1.0, float(int(largest_node(nodes, gpu=spec.ray.use_gpu)["CPU"])))
        gpus = 1 if spec.ray.use_gpu else 0
        check_fits({"CPU": cpus, "GPU": gpus}, nodes, "recycle's new-task adaptation",
                   "set ray.use_gpu: false or add a node with a GPU")
        task = ray.remote(adapt_new_task).options(num_cpus=cpus, num_gpus=gpus)
        ref = task.remote(
            spec,
            str(out / "recycle" / "subspace"),
            new_task_data.name,
            new_task_data.train_ids,
            new_task_data.eval_ids,
            str(out / "recycle" / "new_task"),
            base_model_name,
            rc.steps,
            rc.lr,
            rc.k_extra,
            True,
            print,
            "cuda" if spec.ray.use_gpu else "cpu",
            picked,
            new_task_data.train_mask,
            new_task_data.eval_mask,
        )
        section["new_task"] = ray.get(ref)
        nt = section["new_task"]
        say(f"recycle: new task {nt['task']}: base {nt['base_ppl']:.2f}, coefficients {nt['coeff_ppl']:.2f} "
             f"({nt['coeff_params']:,} params), full LoRA {nt['lora_ppl']:.2f} ({nt['lora_params']:,} params)")
    atomic_write_json(out / "recycle" / "summary.json", section)
    return section
