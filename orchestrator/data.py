"""The job's task data, tokenised and packed once on the driver before any Ray work starts.

Bad data files therefore fail in seconds with an error that names the task and the file,
and every stage (flock, search, recycle, ``loraflock adapt``) trains on the same rows.
"""

from __future__ import annotations

import time

from orchestrator.console import say
from orchestrator.spec import JobSpec

__all__ = ["build_job_data"]


def build_job_data(spec: JobSpec, tasks: list | None = None) -> list:
    """Tokenise and pack every task of ``spec`` (or only ``tasks``), once, on the driver.

    Args:
        spec: the job; its base names the tokenizer, its ``train`` section the row length and seed.
        tasks: task specs to build instead of ``spec.tasks`` (the recycle stage's new task).

    Returns:
        One :class:`tasks.TaskData` per task, in order.
    """
    import datasets

    from tasks import build_task_data
    from tasks.tokenizer import load_tokenizer

    datasets.disable_progress_bars()  # our own progress lines say what happens

    t = time.perf_counter()
    tok_name = spec.base.tokenizer or spec.base.name
    tokenizer = load_tokenizer(tok_name, spec.base.gguf_file if spec.base.tokenizer is None else None)
    data = build_task_data(tasks or spec.tasks, tokenizer, spec.train.seq_len, spec.train.seed)
    sizes = ", ".join(f"{d.name} {d.train_examples}/{len(d.eval_ids)}" for d in data)
    say(f"data ready in {time.perf_counter() - t:.1f}s (train/eval sequences of {spec.train.seq_len} tokens: {sizes})")
    return data
