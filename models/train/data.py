"""What a worker trains on, and how a mixed batch is read from it.

:class:`FlockData` is one worker's view of the tasks: every task's size (the prior and the
sampler need all of them), its own tasks' rows (memory-mapped from the job's row store, so
nothing is read until a batch asks) and, optionally, their frozen-prefix states.
:func:`draw_batch` turns the sampler's next draw into a batch of this worker's rows, cut to
the columns the loss needs (:mod:`models.train.trim`), with the head's scored positions found
on the host. Kept apart from :mod:`models.train.loop` (the loop body) so the search's pack
host, PESC and recycling read batches the same way without the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.prefix_cache import PrefixCache
from models.train.step import Batch, BatchSampler, PrefixFn
from models.train.trim import scored_positions, trim_columns

__all__ = ["FlockData", "make_batch", "draw_batch"]


@dataclass
class FlockData:
    """What one worker needs about the tasks (global view + its own rows).

    Attributes:
        sizes: N_d of every task (global task index).
        owned: global indices of the tasks this worker trains; slot = position in ``owned``.
        train: slot -> (N_d, L) token ids.
        eval: slot -> (M_d, L) token ids.
        train_prefix / eval_prefix: slot -> precomputed hidden states entering block ``split``.
        prefix_cache: instead, those states computed on demand (``"train"`` / ``"eval"`` rows),
            kept within a memory budget (:class:`models.prefix_cache.PrefixCache`).
        train_mask / eval_mask: slot -> (N_d, L) bool scored-token masks (instruction rows score
            their completions, padding is never scored; see ``models.train.step.Batch``);
            ``None`` for the whole dict or one slot: every token after the first is scored.

    The row tensors may live anywhere: the flock's workers give CPU views of the job's
    memory-mapped row store (``tasks.row_store``), so nothing is read until a batch asks.
    Read rows through :meth:`train_rows` / :meth:`eval_rows` / :meth:`batch_rows`, which copy
    only the rows asked for to the device asked for.
    """

    sizes: list[int]
    owned: list[int]
    train: dict[int, torch.Tensor]
    eval: dict[int, torch.Tensor]
    train_prefix: dict[int, torch.Tensor] | None = None
    eval_prefix: dict[int, torch.Tensor] | None = None
    split: int = 0
    train_mask: dict[int, torch.Tensor | None] | None = None
    eval_mask: dict[int, torch.Tensor | None] | None = None
    prefix_cache: PrefixCache | None = None

    def train_prefix_rows(self, slots: Sequence[int], rows: np.ndarray, ids: torch.Tensor) -> torch.Tensor | None:
        """The (B, W, H) frozen-prefix states of these training rows (``ids``: their (B, W) tokens), or ``None``."""
        if self.prefix_cache is not None:
            return self.prefix_cache.get("train", np.asarray(slots), np.asarray(rows), ids)
        if self.train_prefix is None:
            return None
        w = ids.shape[1]  # the batch may be cut to its scored columns (models.train.trim)
        return torch.stack([self.train_prefix[s][r, :w] for s, r in zip(slots, rows)]).to(ids.device)

    def eval_prefix_fn(self) -> PrefixFn | None:
        """:func:`models.train.step.evaluate`'s on-demand states of eval rows (``None``: precomputed or none)."""
        cache = self.prefix_cache
        if cache is None:
            return None
        return lambda slots, rows, ids: cache.get("eval", slots, rows, ids)

    def train_count(self, slot: int) -> int:
        """N rows of a slot's training side (its row count, not its N_d for text rows with a cap)."""
        return int(self.train[slot].shape[0])

    def eval_count(self, slot: int) -> int:
        return int(self.eval[slot].shape[0])

    def train_rows(self, slot: int, rows: np.ndarray | slice, device: torch.device | str | None = None) -> torch.Tensor:
        """(n, L) int64 token ids of these training rows of ``slot``, on ``device`` (None: where they live)."""
        return _moved(self.train[slot][rows], device)

    def train_mask_rows(self, slot: int, rows: np.ndarray | slice,
                        device: torch.device | str | None = None) -> torch.Tensor | None:
        """(n, L) bool scored-token mask of these training rows, or ``None`` (every token after the first)."""
        m = self.train_mask.get(slot) if self.train_mask is not None else None
        return None if m is None else _moved(m[rows], device)

    def eval_rows(self, slot: int, start: int = 0, stop: int | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
        """(stop - start, L) token ids of eval rows ``start:stop`` of ``slot``."""
        return _moved(self.eval[slot][start:stop], device)

    def eval_mask_rows(self, slot: int, start: int = 0, stop: int | None = None,
                       device: torch.device | str | None = None) -> torch.Tensor | None:
        m = self.eval_mask.get(slot) if self.eval_mask is not None else None
        return None if m is None else _moved(m[start:stop], device)

    def batch_rows(self, slots: Sequence[int], rows: np.ndarray,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A mixed batch's token ids (B, L) and scored mask (B, L) or ``None``: row ``rows[i]`` of ``slots[i]``.

        One copy of B rows (from the store's pages when the rows are a memory-mapped view).
        """
        ids = torch.stack([self.train[s][int(r)] for s, r in zip(slots, rows)])
        return _moved(ids, device), _moved(self.train_scored(slots, rows), device)

    def train_scored(self, slots: Sequence[int], rows: np.ndarray) -> torch.Tensor | None:
        """The (B, L) scored-token mask of these training rows, or ``None`` if all are full rows."""
        masks = self.train_mask
        if masks is None or all(masks.get(s) is None for s in set(slots)):
            return None
        length = self.train[slots[0]].shape[1]
        full = torch.ones(length, dtype=torch.bool, device=self.train[slots[0]].device)
        full[0] = False
        got = [masks.get(s) for s in slots]
        return torch.stack([full if m is None else m[r] for m, r in zip(got, rows)])


def _moved(t: torch.Tensor | None, device: torch.device | str | None) -> torch.Tensor | None:
    return t if t is None or device is None else t.to(device)


def make_batch(data: FlockData, sampler: BatchSampler, device: torch.device) -> Batch:
    """The sampler's next batch restricted to the tasks this process owns, as tensors on ``device``."""
    return draw_batch(data, sampler, device)[0]


def draw_batch(data: FlockData, sampler: BatchSampler, device: torch.device) -> tuple[Batch, list[int]]:
    """:func:`make_batch` and the batch's distinct slots, sorted, known on the host (no read-back)."""
    tasks, idx, w = sampler.sample()
    slot_of = {g: s for s, g in enumerate(data.owned)}
    keep = np.array([t in slot_of for t in tasks], dtype=bool)
    slots = [slot_of[t] for t in tasks[keep]]
    rows = idx[keep]
    if not slots:
        some = data.train[0]
        empty = some[:0]
        pre = data.train_prefix[0][:0] if data.train_prefix else None  # (0, L, H): callers may concatenate it
        return Batch(empty.to(device), torch.zeros(0, dtype=torch.long, device=device),
                     torch.zeros(0, device=device), None if pre is None else pre.to(device), data.split), []
    ids, scored = data.batch_rows(slots, rows)  # B rows read (from the row store's pages), nothing more
    ids, scored = trim_columns(ids, scored)  # padding after the last scored token never runs (exact)
    pre = data.train_prefix_rows(slots, rows, ids)
    targets = None if scored is None else scored_positions(scored)  # on the host: no device sync
    batch = Batch(ids, torch.tensor(slots), torch.tensor(w[keep], dtype=torch.float32), pre, data.split, scored,
                  targets)
    return batch.to(device), sorted(set(slots))
