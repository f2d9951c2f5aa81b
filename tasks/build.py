"""Task specs (and task sets) -> :class:`tasks.TaskData`: load, split, tokenise, make rows, cap.

``text`` tasks keep the packing of :mod:`tasks.packing` (full rows, no mask; a side shorter
than one row becomes one padded row with a mask). Instruction tasks get one example per
right-padded row with a scored-token mask (:mod:`tasks.examples`, :mod:`tasks.rows`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tasks.errors import TaskDataError
from tasks.spec import BuiltinSource, DataSource, ExampleFields, TaskOptions, TaskSpec

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from tasks.examples import Examples
    from tasks.task_data import TaskData

__all__ = [
    "BuildContext",
    "build_instruct_task",
    "build_text_task",
    "fields_of",
    "instruct_task_data",
    "text_task_data",
]


@dataclass
class BuildContext:
    """What every task of a job is built with."""

    tokenizer: PreTrainedTokenizerBase
    seq_len: int
    seed: int
    chat_template: str | None
    eos: int
    pad: int
    tok_fp: str
    # Where each task goes once built (``tasks.row_store.RowStoreWriter.add``: its rows are
    # written out and dropped); None: tasks keep their rows in memory.
    sink: Callable[[TaskData], TaskData] | None = None

    def keep(self, task: TaskData) -> TaskData:
        """A freshly built task, through the sink if there is one."""
        return task if self.sink is None else self.sink(task)

    @classmethod
    def make(
        cls, tokenizer: PreTrainedTokenizerBase | str, seq_len: int, seed: int, chat_template: str | None
    ) -> BuildContext:
        from tasks.packing import tokenizer_fingerprint
        from tasks.tokenizer import TokenizerError, load_tokenizer

        if seq_len < 2:
            raise TaskDataError(f"seq_len must be >= 2 tokens (got {seq_len})")
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise TokenizerError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to separate documents")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        return cls(tokenizer, seq_len, seed, chat_template, int(eos), int(pad), tokenizer_fingerprint(tokenizer))

    def tokens_of(self, docs: Dataset) -> Dataset:
        """One row of token ids per document (cached by datasets under a content fingerprint)."""
        from tasks.packing import tokenize_documents

        fp = hashlib.sha256(f"{docs._fingerprint}:{self.tok_fp}".encode()).hexdigest()[:32]
        return tokenize_documents(docs, self.tokenizer, fingerprint=fp)


def fields_of(source: DataSource) -> ExampleFields:
    """The example format and column names of a source (a builtin suite's are fixed)."""
    if isinstance(source, BuiltinSource):
        return ExampleFields(example_format=source.format_name)
    return source


def _task_data(name: str, rows, mask, ev_rows, ev_mask, n_train: int, stats: dict, starts=(None, None)) -> TaskData:
    import torch

    from tasks.packing import rows_dataset
    from tasks.task_data import TaskData

    return TaskData(
        name=name,
        train=rows_dataset(rows, mask),
        eval=rows_dataset(ev_rows, ev_mask),
        train_ids=torch.from_numpy(rows.astype(np.int64)),
        eval_ids=torch.from_numpy(ev_rows.astype(np.int64)),
        train_examples=int(n_train),
        train_mask=None if mask is None else torch.from_numpy(mask),
        eval_mask=None if ev_mask is None else torch.from_numpy(ev_mask),
        train_tokens=int(stats["train"]["tokens"]),
        stats=stats,
        train_prompt_lens=None if starts[0] is None else torch.from_numpy(starts[0]),
        eval_prompt_lens=None if starts[1] is None else torch.from_numpy(starts[1]),
    )


def _scored(rows: np.ndarray, mask: np.ndarray | None) -> int:
    return int(mask.sum()) if mask is not None else int(rows.shape[0] * (rows.shape[1] - 1))


def text_task_data(
    name: str, tokens: Dataset, train_idx: np.ndarray, ev_tokens: Dataset, eval_idx: np.ndarray,
    opts: TaskOptions, ctx: BuildContext, extra: dict | None = None,
) -> TaskData:
    """A raw-text task from tokenised documents: packed full rows (a short side: one padded row)."""
    from tasks.packing import cap_indices, pack_or_pad

    sides = {}
    for side, toks, idx, cap in (("train", tokens, train_idx, opts.max_train_sequences),
                                 ("eval", ev_tokens, eval_idx, opts.max_eval_sequences)):
        rows, mask = pack_or_pad(toks, idx, ctx.seq_len, ctx.eos, ctx.pad)
        keep = cap_indices(len(rows), cap, ctx.seed, f"{name}:{side}")
        rows, mask = rows[keep], (None if mask is None else mask[keep])
        sides[side] = (rows, mask, {"documents": int(len(idx)), "examples": int(len(rows)), "padded": mask is not None,
                                    "tokens": _scored(rows, mask)})
    stats = {
        "format": "text",
        "examples": int(len(train_idx) + len(eval_idx)),
        "truncated": 0,
        "dropped": 0,
        "empty": 0,
        "train": sides["train"][2],
        "eval": sides["eval"][2],
        **(extra or {}),
    }
    (rows, mask, _), (ev_rows, ev_mask, _) = sides["train"], sides["eval"]
    return _task_data(name, rows, mask, ev_rows, ev_mask, len(rows), stats)


def instruct_task_data(
    name: str, ex: Examples, train_pos: np.ndarray, ev_ex: Examples, eval_pos: np.ndarray,
    opts: TaskOptions, ctx: BuildContext, where: str, extra: dict | None = None,
) -> TaskData:
    """An instruction task: one example per padded row, truncated or dropped, then capped."""
    from tasks.packing import cap_indices
    from tasks.rows import completion_starts, example_rows

    sides, starts = {}, {}
    for side, e, pos, cap in (
        ("train", ex, train_pos, opts.max_train_sequences),
        ("eval", ev_ex, eval_pos, opts.max_eval_sequences),
    ):
        rows, mask, counts = example_rows(e, pos, ctx.seq_len, ctx.pad, opts.truncation, name, where)
        if counts["examples"] == 0:
            raise TaskDataError(
                f"task {name!r}: none of its {len(pos)} {side} examples in {where!r} "
                f"fits a row of {ctx.seq_len} tokens "
                f"(truncation: {opts.truncation}); raise train.seq_len or set truncation: left"
            )
        keep = cap_indices(len(rows), cap, ctx.seed, f"{name}:{side}")
        rows, mask = rows[keep], mask[keep]
        starts[side] = completion_starts(e, pos, ctx.seq_len, opts.truncation)[keep]
        counts.update(examples=int(len(rows)), tokens=int(mask.sum()))
        sides[side] = (rows, mask, counts)
    tr, ev = sides["train"][2], sides["eval"][2]
    empty = ex.empty + (ev_ex.empty if ev_ex is not ex else 0)
    stats = {
        "format": ex.format,
        "examples": tr["examples"] + ev["examples"],
        "truncated": tr["truncated"] + ev["truncated"],
        "dropped": tr["dropped"] + ev["dropped"],
        "empty": int(empty),
        "train_on_prompt": bool(opts.train_on_prompt),
        "train": tr,
        "eval": ev,
        **(extra or {}),
    }
    (rows, mask, _), (ev_rows, ev_mask, _) = sides["train"], sides["eval"]
    return _task_data(name, rows, mask, ev_rows, ev_mask, len(rows), stats, (starts["train"], starts["eval"]))


def build_text_task(spec: TaskSpec, ctx: BuildContext) -> TaskData:
    from tasks.packing import hold_out
    from tasks.sources import load_documents

    docs = load_documents(spec.source, spec.name)
    if spec.eval_source is not None:
        ev_docs = load_documents(spec.eval_source, spec.name)
        tokens, ev_tokens = ctx.tokens_of(docs), ctx.tokens_of(ev_docs)
        train_idx, eval_idx = np.arange(len(tokens)), np.arange(len(ev_tokens))
    else:
        if len(docs) < 2:
            raise TaskDataError(
                f"task {spec.name!r} has a single document, so none can be held out for evaluation: "
                "give an eval_source or split the text into several documents (rows)"
            )
        train_idx, eval_idx = hold_out(docs, spec.eval_fraction, ctx.seed)
        tokens = ev_tokens = ctx.tokens_of(docs)
    return text_task_data(spec.name, tokens, train_idx, ev_tokens, eval_idx, spec, ctx)


def encode_source(source: DataSource, task: str, opts: TaskOptions, ctx: BuildContext,
                  ds: Dataset | None = None, row_ids: np.ndarray | None = None) -> Examples:
    """Load (unless ``ds`` is given) and tokenise a source's instruction examples."""
    from tasks.examples import encode_examples
    from tasks.sources import load_table, source_where

    if ds is None:
        ds = load_table(source, task)
    ex = encode_examples(ds, fields_of(source), ctx.tokenizer, train_on_prompt=opts.train_on_prompt,
                         chat_template=ctx.chat_template, task=task, where=source_where(source), row_ids=row_ids)
    if len(ex) == 0:
        raise TaskDataError(
            f"task {task!r}: {source_where(source)!r} holds no usable example (all {ex.empty} rows have an empty "
            f"{ex.target_field!r}); give it some completions"
        )
    return ex


def build_instruct_task(spec: TaskSpec, ctx: BuildContext) -> TaskData:
    from tasks.rows import hold_out_examples
    from tasks.sources import source_where

    ex = encode_source(spec.source, spec.name, spec, ctx)
    if spec.eval_source is not None:
        ev = encode_source(spec.eval_source, spec.name, spec, ctx)
        train_pos, eval_pos = np.arange(len(ex)), np.arange(len(ev))
    else:
        if len(ex) < 2:
            raise TaskDataError(
                f"task {spec.name!r} has a single usable example in {source_where(spec.source)!r}, so none can be held "
                "out for evaluation: give an eval_source or more examples"
            )
        ev = ex
        train_pos, eval_pos = hold_out_examples(len(ex), spec.eval_fraction, ctx.seed, spec.name)
    return instruct_task_data(spec.name, ex, train_pos, ev, eval_pos, spec, ctx, source_where(spec.source))
