"""The job's task data, tokenised and packed once on the driver before any Ray work starts.

Bad data files therefore fail in seconds with an error that names the task and the file,
and every stage (flock, search, recycle, ``loraflock adapt``) trains on the same rows.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from orchestrator.console import say
from orchestrator.spec import JobSpec

__all__ = ["build_job_data"]


def build_job_data(spec: JobSpec, tasks: list | None = None, rows_dir: Path | None = None) -> list:
    """Tokenise every task of ``spec`` (explicit tasks, then each task set's), once, on the driver.

    Args:
        spec: the job; its base names the tokenizer, its ``train`` section the row length and
            seed, ``chat_template`` overrides the tokenizer's for ``messages`` sources.
        tasks: task specs to build instead of ``spec.tasks`` and ``spec.task_sets`` (the
            recycle stage's new task).
        rows_dir: write the rows to a row store there (:mod:`tasks.row_store`), task by task
            as they are built, and keep only views of it: the driver never holds every task's
            rows, and the flock's workers map the same files. ``None``: rows stay in memory.

    Returns:
        A :class:`tasks.TaskDataList`: one :class:`tasks.TaskData` per task, in order; its
        ``task_sets`` attribute maps each set to ``{"field", "tasks": {original value: task
        name}, "skipped": {value: reason}, "null_rows"}`` for the report.
    """
    import datasets

    from orchestrator.task_metrics import job_tokenizer
    from tasks import build_task_data

    datasets.disable_progress_bars()  # our own progress lines say what happens

    t = time.perf_counter()
    tokenizer = job_tokenizer(spec)

    def build(sink=None):
        return build_task_data(
            tasks or spec.tasks, tokenizer, spec.train.seq_len, spec.train.seed,
            task_sets=() if tasks else spec.task_sets, chat_template=spec.chat_template, sink=sink,
        )

    data = build() if rows_dir is None else _build_stored(build, Path(rows_dir), spec.train.seq_len)
    shown = data if len(data) <= 20 else data[:20]
    sizes = ", ".join(f"{d.name} {d.train_examples}/{len(d.eval_ids)}" for d in shown) + (
        f", ... ({len(data)} tasks)" if len(data) > 20 else ""
    )
    say(f"data ready in {time.perf_counter() - t:.1f}s (train/eval rows of {spec.train.seq_len} tokens: {sizes})")
    cut = [d for d in data if d.stats.get("truncated") or d.stats.get("dropped") or d.stats.get("empty")]
    if cut:
        total = {k: sum(d.stats[k] for d in cut) for k in ("truncated", "dropped", "empty")}
        worst = ", ".join(f"{d.name} {d.stats['truncated']}/{d.stats['dropped']}/{d.stats['empty']}"
                          for d in sorted(cut, key=lambda d: -(d.stats["truncated"] + d.stats["dropped"]))[:5])
        say(
            f"  examples longer than {spec.train.seq_len} tokens: {total['truncated']} truncated, "
            f"{total['dropped']} dropped; "
            f"{total['empty']} rows with an empty completion skipped ({len(cut)} tasks; most: {worst})"
        )
    skipped = {f"{s}:{v}": why for s, m in getattr(data, "task_sets", {}).items() for v, why in m["skipped"].items()}
    if skipped:
        shown = "; ".join(f"{k} ({why})" for k, why in list(skipped.items())[:5])
        say(f"warning: {len(skipped)} tasks of task sets skipped (listed in report.json skipped_tasks): {shown}"
            + (", ..." if len(skipped) > 5 else ""))
    return data


def _build_stored(build, rows_dir: Path, seq_len: int) -> list:
    """Build through a :class:`tasks.row_store.RowStoreWriter` into ``rows_dir`` (written whole or not at all)."""
    from models.files import atomic_dir
    from tasks.row_store import RowStore, RowStoreWriter, attach_rows

    made = [p for p in (rows_dir.parent, *rows_dir.parent.parents) if not p.exists()]
    try:
        with atomic_dir(rows_dir) as tmp:
            writer = RowStoreWriter(tmp, seq_len)
            try:
                data = build(writer.add)
            finally:
                writer.finish()
    except BaseException:
        for p in made:  # a failed data check leaves no folder behind
            shutil.rmtree(p, ignore_errors=True)
        raise
    store = RowStore(rows_dir)
    attach_rows(data, store)
    data.rows_dir = rows_dir
    say(f"rows written to {rows_dir} ({store.nbytes() / 2**20:,.1f} MiB, memory-mapped by the flock's workers)")
    return data
