"""Task specs -> tokenised fixed-length rows (``datasets`` + ``pyarrow``; never ray).

A task's examples come in one of four formats (``text``, ``prompt_completion``, ``alpaca``,
``messages``; see :mod:`tasks.spec`); task sets expand one table (split by a column) or a
glob of files into many tasks (:mod:`tasks.task_sets`).

Example:
    >>> from tasks import build_task_data, demo_tasks, load_tokenizer
    >>> data = build_task_data(demo_tasks(), load_tokenizer("smollm2-135m"), seq_len=128)
    >>> [(d.name, d.train_examples, len(d.eval_ids)) for d in data][:2]
    [('json', 8, 32), ('concurrent', 16, 32)]

Heavy libraries (``datasets``, ``transformers``) load on first use, so validating a job spec
stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tasks.errors import TaskDataError
from tasks.spec import (
    EXAMPLE_FORMATS,
    STDLIB_PACKAGES,
    BuiltinSource,
    DataSettings,
    DataSource,
    EvalSplit,
    ExampleFields,
    FilesSource,
    HubSource,
    TaskSetSpec,
    TaskSpec,
)
from tasks.builtin.stdlib import DEMO_EVAL_CAP, DEMO_PACKAGES, DEMO_SIZES, demo_tasks

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "STDLIB_PACKAGES",
    "DEMO_PACKAGES",
    "DEMO_SIZES",
    "DEMO_EVAL_CAP",
    "EXAMPLE_FORMATS",
    "BuiltinSource",
    "DataSettings",
    "DataSource",
    "FilesSource",
    "HubSource",
    "TaskSpec",
    "TaskSetSpec",
    "EvalSplit",
    "ExampleFields",
    "TaskData",
    "TaskDataList",
    "TaskDataError",
    "TokenizerError",
    "build_task_data",
    "expand_task_sets",
    "describe_task_sets",
    "demo_tasks",
    "load_tokenizer",
]


_LAZY = {
    "TokenizerError": "tasks.tokenizer",
    "load_tokenizer": "tasks.tokenizer",
    "build_task_data": "tasks.build",
    "expand_task_sets": "tasks.task_sets",
    "describe_task_sets": "tasks.task_sets",
}


def __getattr__(name: str):
    """Names whose modules import datasets / torch / transformers load on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")


@dataclass
class TaskData:
    """One task's rows, ready for training.

    ``text`` tasks: documents joined with EOS and cut into full rows; every token is scored
    (masks are ``None``), except that a side shorter than one row is one right-padded row
    with a mask. Instruction tasks (``prompt_completion``, ``alpaca``, ``messages``): one
    example per row, right-padded with the tokenizer's pad id (EOS when it has none), and a
    mask that scores the completion (every assistant turn) only, unless ``train_on_prompt``.
    No attention mask is needed: a row holds one example, and with right padding in a causal
    LM no real token attends to a pad; pads are never scored.

    Attributes:
        name: the task's name.
        train: ``input_ids`` column, fixed length L (N rows), plus ``scored`` when masked.
        eval: likewise (M rows), from held-out documents / examples.
        train_ids: (N, L) int64 tensor of ``train``.
        eval_ids: (M, L) int64 tensor of ``eval``.
        train_examples: N_d, BoRA's task size: training examples (instruction formats, one
            per row) or packed rows (text).
        train_mask: bool (N, L): True where token t is a target (predicted from t - 1);
            column 0 is never scored whatever it says. ``None``: every token is scored.
        eval_mask: bool (M, L), likewise; eval perplexity is over these tokens only.
        train_tokens: scored training tokens (``(L - 1) * N`` for full text rows).
        stats: ``{"format", "examples", "truncated", "dropped", "empty", "train": {...},
            "eval": {...}}``; the totals add both sides; each side holds ``examples`` (rows
            kept, after caps), ``tokens`` (scored), and ``truncated``/``dropped`` (instruction
            formats: examples cut from the left / left out for being longer than L) or
            ``documents``/``padded`` (text). ``empty``: rows skipped for an empty completion.
            A task from a task set adds ``task_set: {"set", "field", "value"}`` (the original value).
    """

    name: str
    train: "Dataset"
    eval: "Dataset"
    train_ids: "torch.Tensor"
    eval_ids: "torch.Tensor"
    train_examples: int
    train_mask: "torch.Tensor | None" = None
    eval_mask: "torch.Tensor | None" = None
    train_tokens: int = 0
    stats: dict = field(default_factory=dict)

    @property
    def eval_examples(self) -> int:
        return int(self.eval_ids.shape[0])


class TaskDataList(list):
    """A list of :class:`TaskData` that also carries the task sets' expansion.

    Attributes:
        task_sets: ``{set name: {"field": column or "file", "tasks": {original value: task
            name}, "skipped": {original value: reason}, "null_rows": n}}`` for the report.
    """

    def __init__(self, items=()):
        super().__init__(items)
        self.task_sets: dict = {}
