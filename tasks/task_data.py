"""What building a task yields: its rows, scored-token masks and counts (:class:`TaskData`).

Its own module, imported by every builder and by ``tasks`` itself, so that no builder has to
import the package (or another builder) to name its result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

__all__ = ["TaskData", "TaskDataList"]


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
        train: ``input_ids`` column, fixed length L (N rows), plus ``scored`` when masked;
            ``None`` once the rows live in a row store (:mod:`tasks.row_store`).
        eval: likewise (M rows), from held-out documents / examples.
        train_ids: (N, L) int64 tensor of ``train`` (with a row store: a view of its file).
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
        train_prompt_lens: instruction formats: int64 (N,), where each training row's final
            completion starts (its prompt, earlier turns included, is ``train_ids[i, :n]``);
            the completion runs to the row's last scored token. ``None`` for ``text``.
        eval_prompt_lens: likewise for the eval rows (M,): what generation metrics prompt with.
    """

    name: str
    train: Dataset | None
    eval: Dataset | None
    train_ids: torch.Tensor
    eval_ids: torch.Tensor
    train_examples: int
    train_mask: torch.Tensor | None = None
    eval_mask: torch.Tensor | None = None
    train_tokens: int = 0
    stats: dict = field(default_factory=dict)
    train_prompt_lens: torch.Tensor | None = None
    eval_prompt_lens: torch.Tensor | None = None

    @property
    def eval_examples(self) -> int:
        return int(self.eval_ids.shape[0])


class TaskDataList(list):
    """A list of :class:`TaskData` that also carries the task sets' expansion.

    Attributes:
        task_sets: ``{set name: {"field": column or "file", "tasks": {original value: task
            name}, "skipped": {original value: reason}, "null_rows": n}}`` for the report.
        rows_dir: the row store (:mod:`tasks.row_store`) the tasks' rows were written to, or
            ``None`` when they are held in memory.
    """

    def __init__(self, items=()):
        super().__init__(items)
        self.task_sets: dict = {}
        self.rows_dir: Path | None = None
