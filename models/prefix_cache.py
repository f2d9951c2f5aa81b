"""The frozen-prefix cache on demand: a row's lower-block states are computed when a batch first needs them.

Precomputing every row (``models.prefix.compute_prefix`` over the whole data) costs a forward
through the frozen blocks for rows no step will ever draw, and holds (rows, L, H) activations
that at users' scale do not fit anywhere (100k rows x 512 tokens on SmolLM2 ~ 118 GB fp32).
Here a batch's missing rows go through the frozen blocks in one batched forward; the states are
kept in a slab of at most ``budget_bytes`` (pinned host memory when the model is on a GPU, so
each batch's slice moves to the device with ``non_blocking``; plain memory on the CPU).

What stays when the slab is full is decided by each row's *score*, the caller's estimate of
how often the row will be used again (eval rows: once per evaluation pass; training rows:
draws x p_d / N_d). A new row replaces the lowest-scored kept row only if it scores higher;
on ties the kept row stays. For the flock this beats LRU: every method replays the same
batches (same seed), a cyclic pattern on which LRU over a too-small slab hits nothing,
while holding what is there hits ``capacity / working set`` of the time.

Exactness: the lower blocks are a fixed function of the tokens; they run in eval mode (no
dropout), like the precomputed cache, so cached, recomputed and evicted rows all give the
same states (tested against no cache and the precomputed cache).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.prefix import compute_prefix

__all__ = ["PrefixCache", "CachePlan", "plan_prefix_cache"]


@dataclass
class CachePlan:
    """Which rows are worth keeping and how many the budget holds (see :func:`plan_prefix_cache`)."""

    kinds: tuple[str, ...]  # "train" and/or "eval": the kinds of rows kept (empty: no cache)
    capacity: int  # rows the slab holds (0 when off)
    reason: str  # one line for the worker's log

    @property
    def use(self) -> bool:
        return bool(self.kinds)


def plan_prefix_cache(mode: str, budget_bytes: int, row_bytes: int, train_rows: int, eval_rows: int,
                      draws: int, methods: int, eval_passes: int) -> CachePlan:
    """Decide from the job's steps, rows and budget whether caching pays, and for which rows.

    Without a cache every use of a row runs the frozen blocks: ``methods * draws`` training
    uses and ``eval_passes * eval_rows`` eval uses. A kept row runs them once: the methods
    share their draws (same seed), so about ``distinct`` training rows (uniform-draw estimate
    ``N (1 - exp(-draws / N))``) and ``eval_rows`` eval rows; the share the budget cannot hold
    is counted as recomputed at every use. ``auto`` keeps a kind of row only if it is used
    1.25 times or more per row, and caches at all only if that saves at least 20% of the
    frozen-block forwards; ``on`` keeps both kinds, ``off`` neither.

    Args:
        mode: ``auto``, ``on`` or ``off``.
        budget_bytes: the slab's limit; row_bytes: one row's states (L * H * itemsize).
        train_rows / eval_rows: this worker's rows; draws: its training rows drawn per method.
        methods: training runs replaying the same draws; eval_passes: full evaluations.
    """
    distinct = train_rows * -math.expm1(-draws / train_rows) if train_rows else 0.0
    uses = {"train": methods * draws, "eval": eval_passes * eval_rows}
    computed = {"train": distinct, "eval": float(eval_rows)}
    if mode == "on":
        kinds = ("train", "eval")
    elif mode == "auto":
        kinds = tuple(k for k in ("train", "eval") if computed[k] and uses[k] >= 1.25 * computed[k])
    else:
        kinds = ()
    rows = {"train": train_rows, "eval": eval_rows}
    cap_rows = min(budget_bytes // max(row_bytes, 1), sum(rows[k] for k in kinds))
    without = sum(uses.values())
    reused = sum(computed[k] for k in kinds)
    keep = min(1.0, cap_rows / reused) if reused else 0.0  # share of the reused rows the slab holds
    with_ = without - keep * sum(uses[k] - computed[k] for k in kinds)
    figures = (f"{methods} methods x {draws:,} draws + {eval_passes} evals x {eval_rows:,} rows = {without:,.0f} "
               f"frozen-block row forwards without a cache, ~{with_:,.0f} keeping {'+'.join(kinds) or 'no'} rows "
               f"({cap_rows:,} rows, {cap_rows * row_bytes / 2**30:.2f} GiB)")
    if mode != "auto":
        return CachePlan(kinds, cap_rows if kinds else 0, f"prefix cache {mode} (flock.prefix_cache.mode): {figures}")
    if kinds and with_ <= 0.8 * without:
        return CachePlan(kinds, cap_rows, f"prefix cache on (auto, saves {1 - with_ / without:.0%}): {figures}")
    return CachePlan((), 0, f"prefix cache off (auto, each row is used about once or the budget holds too few): "
                            f"{figures}")


class PrefixCache:
    """Hidden states entering block ``split``, computed on demand and kept within a row budget.

    Rows are named by a kind (``"train"`` / ``"eval"``), a slot (the worker's task) and the
    row's index within that task, so the same row drawn by every method, or evaluated after
    every method, is computed once while it is kept.

    Args:
        model: the base (with adapters above ``split``; they never run here).
        split: the first block that runs from the cached states.
        rows: kind -> rows of each slot (e.g. ``{"train": [N_0, N_1], "eval": [M_0, M_1]}``).
        capacity: rows the slab may hold (0: compute every batch, keep nothing).
        scores: kind -> each slot's expected uses of one row (default 1 everywhere).
        keep: the kinds whose rows are kept (default all); others are computed at every use.
        pinned: keep the slab in pinned host memory (default: when the model is on a GPU).
        length: the rows' full length, to size the slab up front (default: the widest batch
            seen so far; the slab widens when a wider one comes).

    Batches may be cut to their scored columns (:mod:`models.train.trim`): a row computed in
    a batch of ``w`` columns is kept with zeros after column ``w``. A wider batch later reads
    those zeros only after that row's own last scored token, where nothing scored looks.

    Example::

        cache = PrefixCache(model, 1, {"train": [100, 80]}, capacity=64)
        hidden = cache.get("train", np.array([0, 1]), np.array([5, 7]), ids)  # (2, L, H)
    """

    def __init__(self, model: nn.Module, split: int, rows: Mapping[str, Sequence[int]], capacity: int,
                 scores: Mapping[str, Sequence[float]] | None = None, pinned: bool | None = None,
                 keep: Sequence[str] | None = None, length: int | None = None) -> None:
        self.model, self.split, self.capacity, self.length = model, split, int(capacity), length
        self.keep = set(rows if keep is None else keep)
        device = next(model.parameters()).device
        self.pinned = device.type == "cuda" if pinned is None else pinned
        self.offsets = {k: np.concatenate([[0], np.cumsum(n, dtype=np.int64)]) for k, n in rows.items()}
        self.where = {k: np.full(int(o[-1]), -1, dtype=np.int64) for k, o in self.offsets.items()}  # row -> slab
        scores = scores or {}
        self.score = {k: np.repeat(np.asarray(scores.get(k, [1.0] * len(n)), dtype=np.float64),
                                   np.asarray(n, dtype=np.int64)) for k, n in rows.items()}
        self.kinds = list(rows)
        self.owner = np.full((self.capacity, 2), -1, dtype=np.int64)  # slab position -> (kind index, global row)
        self.heap: list[tuple[float, int, int]] = []  # (score, admission order, slab position) of kept rows
        self.used, self._seq = 0, 0
        self.slab: torch.Tensor | None = None
        self.stats = {"hits": 0, "computed": 0, "evicted": 0, "seconds": 0.0}

    def get(self, kind: str, slots: np.ndarray, rows: np.ndarray, ids: torch.Tensor) -> torch.Tensor:
        """(B, W, H) states of these rows on the model's device; ``ids`` are the rows' (B, W) tokens (any device)."""
        device = next(self.model.parameters()).device
        width = ids.shape[1]
        g = self.offsets[kind][np.asarray(slots, dtype=np.int64)] + np.asarray(rows, dtype=np.int64)
        pos = self.where[kind][g]
        hit = pos >= 0
        self.stats["hits"] += int(hit.sum())
        if hit.all():
            return self._gather(pos, device, width)
        miss = np.flatnonzero(~hit)
        uniq, first, back = np.unique(g[miss], return_index=True, return_inverse=True)  # a row drawn twice: once
        t0 = time.perf_counter()
        fresh = self._compute(ids[torch.from_numpy(miss[first]).to(ids.device)].to(device))  # (U, L, H)
        self.stats["seconds"] += time.perf_counter() - t0
        self.stats["computed"] += len(uniq)
        out = torch.empty((len(g), *fresh.shape[1:]), dtype=fresh.dtype, device=device)
        if hit.any():  # before admitting: a new row may take the place of one of this batch's hits
            out[torch.from_numpy(np.flatnonzero(hit)).to(device)] = self._gather(pos[hit], device, width)
        out[torch.from_numpy(miss).to(device)] = fresh[torch.from_numpy(back.reshape(-1)).to(device)]
        self._admit(kind, uniq, fresh)
        return out

    def summary(self) -> str:
        """One line for the log: hits, rows computed (and their time), evictions, rows kept."""
        s = self.stats
        return (f"prefix cache: {s['computed']:,} rows computed in {s['seconds']:.1f}s, {s['hits']:,} served from "
                f"the cache, {s['evicted']:,} evicted, {self.used:,}/{self.capacity:,} rows kept")

    @torch.no_grad()
    def _compute(self, ids: torch.Tensor) -> torch.Tensor:
        """The lower blocks on these rows in one forward, in eval mode (the frozen function, no dropout)."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            return compute_prefix(self.model, ids, self.split, batch_size=max(len(ids), 1))
        finally:
            for m, was in modes:
                m.training = was

    def _gather(self, pos: np.ndarray, device: torch.device, width: int) -> torch.Tensor:
        """Kept rows at slab positions ``pos``, first ``width`` columns, on ``device`` (pinned staging on a GPU)."""
        self._widen(width)
        assert self.slab is not None
        idx = torch.from_numpy(pos)
        slab = self.slab[:, :width]
        if device.type == "cpu":
            return slab.index_select(0, idx)
        staging = torch.empty((len(pos), width, self.slab.shape[2]), dtype=self.slab.dtype, pin_memory=self.pinned)
        torch.index_select(slab, 0, idx, out=staging)
        return staging.to(device, non_blocking=True)

    def _admit(self, kind: str, rows: np.ndarray, fresh: torch.Tensor) -> None:
        """Keep new rows: free slab positions first, then in place of lower-scored rows."""
        if self.capacity == 0 or kind not in self.keep:
            return
        if self.slab is None:
            width = max(self.length or 0, fresh.shape[1])
            self.slab = torch.zeros((self.capacity, width, fresh.shape[2]), dtype=fresh.dtype, pin_memory=self.pinned)
        self._widen(fresh.shape[1])
        host = fresh.detach().to("cpu")
        w = host.shape[1]
        k = self.kinds.index(kind)
        scores = self.score[kind][rows]
        free = min(self.capacity - self.used, len(rows))
        if free:  # one copy for the rows that fit
            at = np.arange(self.used, self.used + free)
            self.slab[self.used : self.used + free, :w] = host[:free]
            self.slab[self.used : self.used + free, w:] = 0
            self._own(k, kind, rows[:free], at, scores[:free])
            self.used += free
        for i in range(free, len(rows)):  # the slab is full: at most one batch's rows, each a heap step
            low, _, p = self.heap[0]
            if scores[i] <= low:
                continue
            heapq.heappop(self.heap)
            ok, og = self.owner[p]
            self.where[self.kinds[ok]][og] = -1
            self.stats["evicted"] += 1
            self.slab[p, :w] = host[i]
            self.slab[p, w:] = 0
            self._own(k, kind, rows[i : i + 1], np.array([p]), scores[i : i + 1])

    def _widen(self, width: int) -> None:
        """Make the slab at least ``width`` columns wide (new columns zero; once per wider batch, if ever)."""
        if self.slab is None or self.slab.shape[1] >= width:
            return
        wide = torch.zeros((self.capacity, width, self.slab.shape[2]), dtype=self.slab.dtype, pin_memory=self.pinned)
        wide[:, : self.slab.shape[1]] = self.slab
        self.slab = wide

    def _own(self, k: int, kind: str, rows: np.ndarray, at: np.ndarray, scores: np.ndarray) -> None:
        self.where[kind][rows] = at
        self.owner[at, 0], self.owner[at, 1] = k, rows
        for s, p in zip(scores.tolist(), at.tolist(), strict=True):
            self._seq += 1
            heapq.heappush(self.heap, (s, self._seq, int(p)))
