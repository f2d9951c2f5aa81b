"""``loraflock export``: a finished run -> ``base/``, ``adapters/<task>/``, ``serve.json``, ``README.md``.

``what`` chooses the adapters: ``flock`` (the flock's, on its plain, quantised or pruned base),
``pick`` (the picked search trial) or ``recycle`` (the recycled coefficient adapters). The run
is checked whole first (:func:`orchestrator.export.run_dir.open_run`); the export is built in a
temporary directory and renamed into place, so ``--out`` holds a whole export or none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from models.files import atomic_dir
from orchestrator.export.bundle import Bundle, save_base
from orchestrator.export.lowrank import served_adapter, write_served
from orchestrator.export.run_dir import ExportError, Run, open_run
from orchestrator.export.serve import FORMAT, SERVE_FILE, vllm_command, vllm_rank, write_serve_files

__all__ = ["export_run", "build_bundle"]

What = Literal["flock", "pick", "recycle"]


def _available(run: Run, what: What) -> list[str]:
    if what == "flock":
        if not run.spec.flock.enabled:
            raise ExportError(f"{run.path}: the job ran no flock (flock.enabled: false); export --what pick or recycle")
        return run.tasks
    if what == "pick":
        from orchestrator.export.picked import picked_record
        from orchestrator.search.pick import task_names

        return task_names(run.spec, picked_record(run))
    from orchestrator.export.recycled import recycled_tasks

    return recycled_tasks(run)


def build_bundle(run: Run, what: What = "flock", tasks: list[str] | None = None) -> Bundle:
    """The base and adapters of one export kind (nothing written)."""
    available = _available(run, what)
    tasks = list(tasks or available)
    unknown = [t for t in tasks if t not in available]
    if unknown:
        raise ExportError(f"--tasks: {unknown} are not among the run's {what} adapters: {available}")
    if what == "pick":
        from orchestrator.export.picked import picked_bundle

        return picked_bundle(run, tasks)
    if what == "recycle":
        from orchestrator.export.recycled import recycled_bundle

        return recycled_bundle(run, tasks)
    if run.spec.gates.enabled:
        from orchestrator.export.pruned import pruned_bundle

        return pruned_bundle(run, tasks)
    if run.spec.base.quantized:
        from orchestrator.export.quantised import quantised_bundle

        return quantised_bundle(run, tasks)
    from orchestrator.export.plain import plain_bundle

    return plain_bundle(run, tasks)


def export_run(run_dir: str | Path, out: str | Path, what: What = "flock", tasks: list[str] | None = None,
               rank: int | None = None, max_lora_rank: int | None = None) -> dict:
    """Export a finished run for a multi-LoRA server; return ``serve.json``'s content.

    Args:
        run_dir: the ``--out`` of a finished ``loraflock run``.
        out: the export directory (replaced whole).
        what: ``flock``, ``pick`` or ``recycle``.
        tasks: only these adapters (default: all of that kind).
        rank: truncate every adapter to this rank by SVD (error reported per adapter).
        max_lora_rank: pad every adapter to this one rank (a server's ``max_lora_rank``).

    Example:
        >>> manifest = export_run("runs/tiny", "exports/tiny")
        >>> print(manifest["vllm"])
    """
    if what not in ("flock", "pick", "recycle"):
        raise ExportError(f"--what {what!r}: choose flock, pick or recycle")
    for flag, v in (("--rank", rank), ("--max-lora-rank", max_lora_rank)):
        if v is not None and v < 1:
            raise ExportError(f"{flag} {v}: give a positive rank")
    run = open_run(run_dir)
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()) and not (out / SERVE_FILE).is_file():
        raise ExportError(f"{out} is not empty and holds no earlier export ({SERVE_FILE}); choose a new --out")
    bundle = build_bundle(run, what, tasks)
    entries = []
    with atomic_dir(out) as tmp:
        notes = bundle.notes + save_base(bundle.model, tmp / "base", run.spec.base.tokenizer or run.spec.base.name)
        for task, pairs in bundle.adapters.items():
            try:
                served, info = served_adapter(pairs, bundle.model, bundle.folded, rank, max_lora_rank)
            except ValueError as e:
                raise ExportError(f"adapter {task!r}: {e}") from None
            write_served(tmp / "adapters" / task, served, bundle.model, bundle.base_name)
            entries.append({"name": task, "path": f"adapters/{task}", **info})
        top = max([e["rank"] for e in entries] or [1])
        manifest = {
            "format": FORMAT, "run": str(run.path.resolve()), "job": run.spec.name, "what": what, "kind": bundle.kind,
            "base": "base", "max_lora_rank": top, "vllm_max_lora_rank": vllm_rank(top),
            "adapters": entries, "notes": notes, "vllm": vllm_command(out, entries, top),
        }
        write_serve_files(tmp, out, manifest)
    return manifest
