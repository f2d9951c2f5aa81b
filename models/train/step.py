"""The one training step (and evaluation) shared by every trainer in loraflock.

The local run, the Ray Train flock workers, the Tune trials, the recycling and PESC stages
all call :func:`train_step`; nothing else owns a training loop body.

Objective. Task ``d`` has ``N_d`` training sequences. A batch is drawn with rows of task d
in proportion to ``N_d ** temperature`` (0.5: small tasks are seen more often than their
share) and each row is weighted so that the weighted sum is an unbiased estimate of

    sum_d N_d * meanNLL_d / sum_d N_d

i.e. the whole-data log-likelihood normalised by the data size (BoRA's likelihood term).
Extra terms (the hierarchical prior, gate sparsity, MoE balance) come in as a callable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.lora import task_ids
from models.prefix import use_prefix
from models.train.perplexity import macro_perplexity, perplexity  # of evaluate()'s NLLs; torch-free home

__all__ = [
    "Batch",
    "BatchSampler",
    "StepResult",
    "NonFiniteLossError",
    "row_nll",
    "row_nll_sum",
    "train_step",
    "evaluate",
    "PrefixFn",
    "seed_everything",
    "perplexity",
    "macro_perplexity",
]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf: training of these tasks must stop."""

    def __init__(self, tasks: list[int], value: float) -> None:
        super().__init__(f"loss is {value} for task ids {tasks}")
        self.tasks = tasks


def seed_everything(seed: int) -> None:
    """Seed torch and numpy (deterministic batches and initial weights)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


@dataclass
class Batch:
    """One mixed-task batch.

    Attributes:
        input_ids: (N, L) token ids.
        task_ids: (N,) task slot of each row.
        weights: (N,) row weights; ``sum(weights * row_nll)`` is the objective estimate.
        prefix: optional (N, L, H) cached hidden states entering block ``split``.
        split: index of the first block that runs (with ``prefix``).
        scored: optional (N, L) bool: True where token t is a target (predicted from t - 1;
            column 0 is never one). ``None``: every token after the first is scored (raw text
            in full rows). Instruction rows score their completion only; padding never.
    """

    input_ids: torch.Tensor
    task_ids: torch.Tensor
    weights: torch.Tensor
    prefix: torch.Tensor | None = None
    split: int = 0
    scored: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(mv(self.input_ids), mv(self.task_ids), mv(self.weights), mv(self.prefix), self.split,
                     mv(self.scored))


class BatchSampler:
    """Deterministic mixed-task batches: task of each row ~ N_d^temperature, example uniform.

    The same seed gives the same batches to every method of a comparison. Rows of one task
    carry weight ``(N_d / sum N) / (B * p_d)``, making the weighted NLL an unbiased estimate of
    the size-weighted mean NLL.

    Args:
        sizes: training sequences per task (N_d), indexed by task slot.
        batch_size: rows per batch (B).
        seed: sampler seed.
        temperature: 1 = proportional to size, 0 = uniform over tasks, 0.5 = sqrt.
        tasks: restrict to these slots (a Ray worker's share); weights stay global.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, seed: int, temperature: float = 0.5) -> None:
        n = np.asarray(sizes, dtype=np.float64)
        if (n <= 0).any():
            raise ValueError("every task needs at least one training sequence")
        p = n**temperature
        self.p = p / p.sum()
        self.sizes = n.astype(np.int64)
        self.batch_size = batch_size
        self.row_weight = (n / n.sum()) / (batch_size * self.p)  # per task
        self.rng = np.random.default_rng(seed)

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def exclude(self, tasks: Sequence[int]) -> None:
        """Stop sampling ``tasks`` (e.g. after their loss diverged); the rest keep their weights."""
        p = self.p.copy()
        p[list(tasks)] = 0.0
        if p.sum() <= 0:
            raise ValueError("every task has been excluded")
        self.p = p / p.sum()
        with np.errstate(divide="ignore"):
            self.row_weight = np.where(self.p > 0, (self.sizes / self.sizes.sum()) / (self.batch_size * self.p), 0.0)

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(task slots, example indices within their task, row weights), each (B,)."""
        tasks = self.rng.choice(len(self.p), size=self.batch_size, p=self.p)
        idx = (self.rng.random(self.batch_size) * self.sizes[tasks]).astype(np.int64)
        return tasks, idx, self.row_weight[tasks]


def row_nll_sum(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL of each row's scored tokens and their count: two (N,) tensors.

    Unscored targets (prompt tokens, padding) enter the cross-entropy as ``ignore_index``, so
    they add nothing to the sum and their logits get exactly zero gradient.
    """
    ctx = use_prefix(model, batch.split, batch.prefix) if batch.prefix is not None else nullcontext()
    ids = batch.task_ids
    route = int(ids[0]) if bool((ids == ids[0]).all()) else ids  # one task: no gather
    with ctx, task_ids(model, route):
        logits = model(input_ids=batch.input_ids).logits  # (N, L, V)
    # Shift by padding the targets (ignored last position) rather than slicing the logits:
    # a (N, L-1, V) slice would copy the largest tensor of the step (V = 49k on SmolLM2).
    n, length = batch.input_ids.shape
    nxt = batch.input_ids[:, 1:]
    if batch.scored is not None:
        nxt = nxt.masked_fill(~batch.scored[:, 1:], -100)
    target = F.pad(nxt, (0, 1), value=-100)  # (N, L): the target of position t is token t + 1
    nll = F.cross_entropy(
        logits.reshape(n * length, -1).float(), target.reshape(-1), reduction="none", ignore_index=-100
    )
    count = (target != -100).sum(dim=1)
    return nll.view(n, length).sum(dim=1), count


def row_nll(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token NLL of each row over its scored tokens: (N,) (0 for a row with none)."""
    total, count = row_nll_sum(model, batch)
    return total / count.clamp(min=1)


@dataclass
class StepResult:
    loss: float  # total objective (likelihood + extra terms)
    nll: float  # weighted likelihood part
    grad_norm: float
    task_nll: dict[int, float]  # mean NLL of each task's rows in this batch
    nonfinite: list[int] = field(default_factory=list)  # task slots whose loss was NaN/inf (skipped)


def train_step(
    model: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    params: Sequence[nn.Parameter],
    extra_loss: Callable[[], torch.Tensor] | None = None,
    max_grad_norm: float | None = 1.0,
    reduce_grads: Callable[[Sequence[nn.Parameter]], float] | None = None,
    skip_nonfinite: bool = False,
) -> StepResult:
    """One optimisation step on a mixed-task batch.

    Args:
        model: model with injected adapters.
        batch: the rows (and their weights) this process handles.
        optimizer: optimizer over ``params``.
        params: the trainable parameters (for clipping).
        extra_loss: adds prior / regulariser terms (already normalised like the NLL).
        max_grad_norm: global-norm clipping; ``None`` disables it.
        reduce_grads: distributed hook; all-reduces what must be shared and returns the
            squared global gradient norm (so clipping is identical on every worker).
        skip_nonfinite: instead of raising, drop this batch's likelihood (NaN would poison
            every gradient it touches) and name the offending tasks in ``nonfinite``; the
            step still runs (prior, collectives), so distributed workers stay in lockstep.

    Raises:
        NonFiniteLossError: naming the tasks whose rows produced NaN/inf.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    if len(batch.input_ids):
        nll_rows = row_nll(model, batch)  # (N,)
        nonfinite: list[int] = []
        if not torch.isfinite(nll_rows).all():
            bad = sorted({int(t) for t in batch.task_ids[~torch.isfinite(nll_rows)].tolist()})
            if not skip_nonfinite:
                raise NonFiniteLossError(bad, float(nll_rows[~torch.isfinite(nll_rows)][0]))
            nonfinite = bad
        nll = (batch.weights * nll_rows).sum() if not nonfinite else nll_rows.new_zeros(())
    else:  # a Ray worker may own none of this batch's rows: it still takes the prior step
        nll_rows = torch.zeros(0, device=batch.input_ids.device)
        nll = nll_rows.new_zeros(())
        nonfinite = []
    loss = nll + extra_loss() if extra_loss is not None else nll
    if not torch.isfinite(loss):
        raise NonFiniteLossError(sorted(set(batch.task_ids.tolist())), float(loss))
    if loss.requires_grad:
        loss.backward()
    for p in params:  # zeros, not None: Adam then moves every parameter as in the joint objective
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if reduce_grads is not None:
        sq = reduce_grads(params)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        sq = float(torch.stack([g.pow(2).sum() for g in grads]).sum()) if grads else 0.0  # one sync
    norm = math.sqrt(sq)
    if max_grad_norm is not None and norm > max_grad_norm:
        coef = max_grad_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    optimizer.step()
    with torch.no_grad():  # each task's mean row NLL, reduced on the device: one transfer, not one per task
        tasks, row_task = batch.task_ids.unique(return_inverse=True)
        sums = nll_rows.new_zeros(len(tasks)).index_add_(0, row_task, nll_rows.detach())
        means = sums / torch.bincount(row_task, minlength=len(tasks)).to(sums.dtype)
        per = {int(t): float(m) for t, m in zip(tasks.tolist(), means.tolist(), strict=True)}
    return StepResult(float(loss.detach()), float(nll.detach()), norm, per, nonfinite)


# A function giving the (B, L, H) frozen-prefix states of eval rows: (task keys, row indices, (B, L) ids).
PrefixFn = Callable[[np.ndarray, np.ndarray, torch.Tensor], torch.Tensor]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    sets: dict[int, torch.Tensor],
    batch_size: int = 8,
    prefixes: dict[int, torch.Tensor] | None = None,
    split: int = 0,
    slot_of: Callable[[int], int] | None = None,
    masks: dict[int, torch.Tensor | None] | None = None,
    prefix_fn: PrefixFn | None = None,
) -> dict[int, float]:
    """Mean NLL per scored token of each task's held-out sequences, all tasks in mixed batches.

    The tasks' rows are laid end to end and cut into batches of ``batch_size`` rows, each row
    through its own adapter slot (as training batches are), so thousands of tasks with a few
    eval rows each cost ``rows / batch_size`` forwards, not one short batch per task. Each
    task's NLL is its scored tokens' summed NLL over their count (token-weighted, as a loop
    over each task's own batches gives), accumulated in float64 on the device, read once.

    Args:
        sets: task -> (M, L) eval token ids.
        prefixes: task -> (M, L, H) cached hidden states (with ``split``).
        slot_of: adapter slot used for a task (default: the task's own; unified = 0).
        masks: task -> (M, L) bool scored-token mask (see :class:`Batch`); missing or
            ``None``: every token after the first (full raw-text rows).
        prefix_fn: instead of ``prefixes``, the states of a batch's rows on demand
            (``models.prefix_cache.PrefixCache.get`` bound to the eval rows).

    Returns:
        task -> mean NLL (perplexity is ``exp`` of it; 0 for a task with no scored token).
    """
    model.eval()
    tasks = list(sets)
    out = {t: 0.0 for t in tasks}
    by_len: dict[int, list[int]] = {}  # rows of different lengths cannot share a batch
    for i, t in enumerate(tasks):
        if len(sets[t]):
            by_len.setdefault(sets[t].shape[1], []).append(i)
    device = next(model.parameters()).device  # rows may arrive on the CPU (a memory-mapped store): moved per batch
    for members in by_len.values():
        total = torch.zeros(len(tasks), dtype=torch.float64, device=device)
        count = torch.zeros(len(tasks), dtype=torch.float64, device=device)
        for runs in _mixed_batches([(i, len(sets[tasks[i]])) for i in members], batch_size):
            b = _eval_batch(sets, tasks, runs, prefixes, split, slot_of, masks, prefix_fn, device)
            nll, n = row_nll_sum(model, b)
            pos = torch.cat([torch.full((e - a,), i, dtype=torch.long, device=device) for i, a, e in runs])
            total.index_add_(0, pos, nll.double())
            count.index_add_(0, pos, n.double())
        sums, counts = total.tolist(), count.tolist()  # one transfer
        for i in members:
            out[tasks[i]] = sums[i] / max(counts[i], 1.0)
    return out


def _mixed_batches(sizes: list[tuple[int, int]], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Cut tasks' rows laid end to end into batches: each a list of (task index, first row, end row)."""
    batches: list[list[tuple[int, int, int]]] = [[]]
    room = batch_size
    for i, n in sizes:
        a = 0
        while a < n:
            if room == 0:
                batches.append([])
                room = batch_size
            e = min(n, a + room)
            batches[-1].append((i, a, e))
            room -= e - a
            a = e
    return batches if batches[0] else []


def _eval_batch(sets, tasks, runs, prefixes, split, slot_of, masks, prefix_fn, device: torch.device) -> Batch:
    """One mixed eval batch on ``device`` from its runs of consecutive rows (a slice per task, no per-row loop)."""
    ids = torch.cat([sets[tasks[i]][a:e] for i, a, e in runs])
    src = ids.device  # where the rows are kept; the batch moves to ``device`` whole
    tid = torch.cat([torch.full((e - a,), slot_of(tasks[i]) if slot_of else tasks[i], dtype=torch.long, device=src)
                     for i, a, e in runs])
    pre = None
    if prefix_fn is not None:
        keys = np.concatenate([np.full(e - a, tasks[i], dtype=np.int64) for i, a, e in runs])
        rows = np.concatenate([np.arange(a, e, dtype=np.int64) for i, a, e in runs])
        pre = prefix_fn(keys, rows, ids)
    elif prefixes is not None:
        pre = torch.cat([prefixes[tasks[i]][a:e].to(device) for i, a, e in runs])
    scored = None
    got = [masks.get(tasks[i]) for i, _, _ in runs] if masks is not None else []
    if any(m is not None for m in got):
        full = torch.ones(ids.shape[1], dtype=torch.bool, device=src)
        full[0] = False
        scored = torch.cat([full.expand(e - a, -1) if m is None else m[a:e].to(src)
                            for m, (_, a, e) in zip(got, runs, strict=True)])
    return Batch(ids, tid, torch.ones(len(ids), device=src), pre, split, scored).to(device)
