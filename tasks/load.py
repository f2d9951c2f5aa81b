"""The entry point of ``tasks``: explicit task specs plus task sets -> one list of built tasks.

Per-task building is :mod:`tasks.build`; expanding a set into many tasks is
:mod:`tasks.task_sets` (which builds each with :mod:`tasks.build`). This module only
combines them, so neither has to import the other's caller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from tasks.build import BuildContext, build_instruct_task, build_text_task
from tasks.errors import TaskDataError
from tasks.spec import TaskSetSpec, TaskSpec, example_format_of
from tasks.task_data import TaskData, TaskDataList
from tasks.task_sets import expand_with

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["build_task_data"]


def build_task_data(
    tasks: Sequence[TaskSpec],
    tokenizer: PreTrainedTokenizerBase | str,
    seq_len: int,
    seed: int = 0,
    *,
    task_sets: Sequence[TaskSetSpec] = (),
    chat_template: str | None = None,
    sink: Callable[[TaskData], TaskData] | None = None,
) -> TaskDataList:
    """Load, split, tokenise, make rows and cap every task's data; task sets expand into tasks.

    Args:
        tasks: the explicit task specs.
        tokenizer: a loaded tokenizer, or a name for :func:`tasks.load_tokenizer`.
        seq_len: tokens per row (L).
        seed: seeds the hold-outs, the row caps and ``pick: sample``.
        task_sets: sets that expand into many tasks each (one pass over each table).
        chat_template: the job's override for ``messages`` sources (``chatml`` or jinja).
        sink: each task passes through it as soon as it is built (``tasks.row_store.RowStoreWriter.add``
            writes its rows out and drops them, so the rows of thousands of tasks are never all resident).

    Returns:
        The explicit tasks in order, then each set's tasks, as a :class:`tasks.TaskDataList`
        whose ``task_sets`` maps each set to ``{value: task name}`` and its skipped values.

    Raises:
        TaskDataError: unusable data (the message names the task, the file, the field and the fix),
            or task names that repeat across explicit tasks and sets.

    Example:
        >>> data = build_task_data([TaskSpec(name="notes", source={"kind": "files", "path": "n.jsonl"})], "bytes", 64)
    """

    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TaskDataError(f"task names must be unique; repeated: {dup}")
    ctx = BuildContext.make(tokenizer, seq_len, seed, chat_template)
    ctx.sink = sink
    out = TaskDataList(
        ctx.keep(build_text_task(s, ctx) if example_format_of(s.source) == "text" else build_instruct_task(s, ctx))
        for s in tasks
    )
    if task_sets:
        expanded, report = expand_with(ctx, task_sets, taken=set(names))
        out.extend(expanded)
        out.task_sets = report
    return out
