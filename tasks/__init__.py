"""Task specs -> tokenised, packed, fixed-length datasets (``datasets`` + ``pyarrow``; never ray).

Example:
    >>> from tasks import build_task_data, demo_tasks, load_tokenizer
    >>> data = build_task_data(demo_tasks(), load_tokenizer("smollm2-135m"), seq_len=128)
    >>> [(d.name, d.train_examples, len(d.eval_ids)) for d in data][:2]
    [('json', 8, 32), ('concurrent', 16, 32)]

Heavy libraries (``datasets``, ``transformers``) load on first use, so validating a job spec
stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tasks.errors import TaskDataError
from tasks.spec import STDLIB_PACKAGES, BuiltinSource, DataSettings, DataSource, FilesSource, HubSource, TaskSpec
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
    "BuiltinSource",
    "DataSettings",
    "DataSource",
    "FilesSource",
    "HubSource",
    "TaskSpec",
    "TaskData",
    "TaskDataError",
    "TokenizerError",
    "build_task_data",
    "demo_tasks",
    "load_tokenizer",
]


_LAZY = {"TokenizerError": "tasks.tokenizer", "load_tokenizer": "tasks.tokenizer"}


def __getattr__(name: str):
    """Names whose modules import datasets / torch / transformers load on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")


@dataclass
class TaskData:
    """One task's packed rows.

    Attributes:
        name: the task's name.
        train: ``input_ids`` column, fixed length L (N rows).
        eval: ``input_ids`` column, fixed length L (M rows), from held-out documents.
        train_ids: (N, L) int64 tensor of ``train``.
        eval_ids: (M, L) int64 tensor of ``eval``.
        train_examples: N (BoRA's N_d).
    """

    name: str
    train: "Dataset"
    eval: "Dataset"
    train_ids: "torch.Tensor"
    eval_ids: "torch.Tensor"
    train_examples: int

    @property
    def eval_examples(self) -> int:
        return int(self.eval_ids.shape[0])


def build_task_data(
    tasks: list[TaskSpec],
    tokenizer: "PreTrainedTokenizerBase | str",
    seq_len: int,
    seed: int = 0,
) -> list[TaskData]:
    """Load, split, tokenise, pack and cap every task's text.

    Args:
        tasks: the task specs (unique names).
        tokenizer: a loaded tokenizer, or a name for :func:`load_tokenizer`.
        seq_len: tokens per row (L).
        seed: seeds the document hold-out and the row caps.

    Raises:
        TaskDataError: a task's data is unusable, or packs into 0 train / 0 eval rows.

    Example:
        >>> data = build_task_data([TaskSpec(name="notes", source={"kind": "files", "path": "n.jsonl"})], "bytes", 64)
    """
    import numpy as np
    import torch

    from tasks.packing import cap_rows, hold_out, pack_rows, rows_dataset, tokenize_documents, tokenizer_fingerprint
    from tasks.sources import load_documents
    from tasks.tokenizer import TokenizerError, load_tokenizer

    if seq_len < 2:
        raise TaskDataError(f"seq_len must be >= 2 tokens (got {seq_len})")
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TaskDataError(f"task names must be unique; repeated: {dup}")
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TokenizerError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to separate documents")
    tok_fp = tokenizer_fingerprint(tokenizer)

    def tokens_of(docs: "Dataset") -> "Dataset":
        import hashlib

        fp = hashlib.sha256(f"{docs._fingerprint}:{tok_fp}".encode()).hexdigest()[:32]
        return tokenize_documents(docs, tokenizer, fingerprint=fp)

    out = []
    for spec in tasks:
        docs = load_documents(spec.source, spec.name)
        if spec.eval_source is not None:
            train_tok, eval_tok = tokens_of(docs), tokens_of(load_documents(spec.eval_source, spec.name))
            train_idx, eval_idx = np.arange(len(train_tok)), np.arange(len(eval_tok))
        else:
            if len(docs) < 2:
                raise TaskDataError(
                    f"task {spec.name!r} has a single document, so none can be held out for evaluation: "
                    "give an eval_source or split the text into several documents (rows)"
                )
            train_idx, eval_idx = hold_out(docs, spec.eval_fraction, seed)
            train_tok = eval_tok = tokens_of(docs)
        train_rows = pack_rows(train_tok, train_idx, seq_len, eos)
        eval_rows = pack_rows(eval_tok, eval_idx, seq_len, eos)
        for side, rows, fix in (
            ("training", train_rows, "give it more text"),
            ("eval", eval_rows, "raise eval_fraction or give an eval_source"),
        ):
            if len(rows) == 0:
                raise TaskDataError(
                    f"task {spec.name!r}: its {side} text is shorter than one row of {seq_len} tokens; "
                    f"{fix}, or lower seq_len"
                )
        train_rows = cap_rows(train_rows, spec.max_train_sequences, seed, f"{spec.name}:train")
        eval_rows = cap_rows(eval_rows, spec.max_eval_sequences, seed, f"{spec.name}:eval")
        out.append(
            TaskData(
                name=spec.name,
                train=rows_dataset(train_rows),
                eval=rows_dataset(eval_rows),
                train_ids=torch.from_numpy(train_rows.astype(np.int64)),
                eval_ids=torch.from_numpy(eval_rows.astype(np.int64)),
                train_examples=int(len(train_rows)),
            )
        )
    return out
