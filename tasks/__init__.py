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

from tasks.builtin.stdlib import DEMO_EVAL_CAP, DEMO_PACKAGES, DEMO_SIZES, demo_tasks
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
from tasks.task_data import TaskData, TaskDataList

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
    "build_task_data": "tasks.load",
    "expand_task_sets": "tasks.task_sets",
    "describe_task_sets": "tasks.task_sets",
}


def __getattr__(name: str):
    """Names whose modules import datasets / torch / transformers load on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
