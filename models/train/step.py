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

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.lora import task_ids
from models.prefix import use_prefix
from models.train.chunked_loss import CE_CHUNK_ELEMENTS, token_nll
from models.train.perplexity import macro_perplexity, perplexity  # of evaluate()'s NLLs; torch-free home
from models.train.trim import scored_positions, trim_columns

__all__ = [
    "Batch",
    "BatchSampler",
    "StepResult",
    "NonFiniteLossError",
    "row_nll",
    "row_nll_sum",
    "token_nll",
    "CE_CHUNK_ELEMENTS",
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
        targets: optional (K,) flat positions (over (N, L)) whose next token is scored, when
            the batch was built where its mask lives (:func:`models.train.trim.scored_positions`):
            the loss runs the head on these positions only, without a device sync to find them.
    """

    input_ids: torch.Tensor
    task_ids: torch.Tensor
    weights: torch.Tensor
    prefix: torch.Tensor | None = None
    split: int = 0
    scored: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(mv(self.input_ids), mv(self.task_ids), mv(self.weights), mv(self.prefix), self.split,
                     mv(self.scored), mv(self.targets))


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


def row_nll_sum(model: nn.Module, batch: Batch, chunk_tokens: int | None = None,
                tasks: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL of each row's scored tokens and their count: two (N,) tensors.

    Unscored targets (prompt tokens, padding) enter the cross-entropy as ``ignore_index``, so
    they add nothing to the sum and their logits get exactly zero gradient. The fp32 logits
    exist one chunk of tokens at a time (:func:`models.train.chunked_loss.token_nll`), never whole.
    ``tasks``: the batch's distinct task slots when the caller knows them (no device check).
    """
    ctx = use_prefix(model, batch.split, batch.prefix) if batch.prefix is not None else nullcontext()
    ids = batch.task_ids
    if tasks is not None:
        route: int | torch.Tensor = tasks[0] if len(tasks) == 1 else ids
    else:
        route = int(ids[0]) if bool((ids == ids[0]).all()) else ids  # one task: no gather (a host sync)
    # Shift by padding the targets (ignored last position) rather than slicing the logits:
    # a (N, L-1, V) slice would copy the largest tensor of the step (V = 49k on SmolLM2).
    nxt = batch.input_ids[:, 1:]
    if batch.scored is not None:
        nxt = nxt.masked_fill(~batch.scored[:, 1:], -100)
    target = F.pad(nxt, (0, 1), value=-100)  # (N, L): the target of position t is token t + 1
    keep = batch.targets  # the head runs only where a target is scored (raw text: everywhere)
    if keep is None and batch.scored is not None:
        keep = scored_positions(batch.scored)
    with ctx, task_ids(model, route):
        nll = token_nll(model, batch.input_ids, target, chunk_tokens, keep)
    count = (target != -100).sum(dim=1)
    return nll.sum(dim=1), count


def row_nll(model: nn.Module, batch: Batch, tasks: Sequence[int] | None = None) -> torch.Tensor:
    """Mean next-token NLL of each row over its scored tokens: (N,) (0 for a row with none)."""
    total, count = row_nll_sum(model, batch, tasks=tasks)
    return total / count.clamp(min=1)


class StepResult:
    """What one step measured. Scalars stay on the device; reading a field copies it to the host.

    Why: every read is a host-device sync that stalls the CPU until the GPU has finished all
    queued work. The flock loop reads these once per ``log_every`` (accumulating on the device
    in between), not once per step.
    """

    def __init__(self, loss: torch.Tensor, nll: torch.Tensor, norm: torch.Tensor, sums: torch.Tensor,
                 counts: torch.Tensor, slots: torch.Tensor | None, nonfinite: list[int] | None = None,
                 bad: torch.Tensor | None = None) -> None:
        self._loss, self._nll, self._norm = loss, nll, norm
        self.sums, self.counts = sums, counts  # per-slot NLL sums and rows: (T,) (or per listed slot)
        self._slots = slots  # slot of each entry of sums/counts; None: entry i is slot i
        self._nonfinite = nonfinite
        self.bad = bad  # (T,) float, 1 where a row of that slot had a non-finite NLL (deferred checks)
        self.skipped: torch.Tensor | None = None  # deferred checks: 1.0 when this step's gradient was zeroed

    @property
    def loss(self) -> float:
        """Total objective (likelihood + extra terms)."""
        return float(self._loss)

    @property
    def nll(self) -> float:
        """Weighted likelihood part (0 when the batch's likelihood was dropped)."""
        return float(self._nll)

    @property
    def grad_norm(self) -> float:
        return float(self._norm)

    @property
    def task_nll(self) -> dict[int, float]:
        """Mean NLL of each task's rows in this batch (one transfer)."""
        slots = self._slots if self._slots is not None else torch.arange(len(self.sums), device=self.sums.device)
        rows = torch.stack([slots.to(self.sums.dtype), self.sums, self.counts]).tolist()
        return {int(t): s / c for t, s, c in zip(*rows, strict=True) if c > 0}

    @property
    def nonfinite(self) -> list[int]:
        """Task slots whose loss was NaN/inf (their batch's likelihood was skipped)."""
        if self._nonfinite is not None:
            return self._nonfinite
        return [] if self.bad is None else torch.nonzero(self.bad).flatten().tolist()


def train_step(
    model: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    params: Sequence[nn.Parameter],
    extra_loss: Callable[[], torch.Tensor] | None = None,
    max_grad_norm: float | None = 1.0,
    reduce_grads: Callable[[Sequence[nn.Parameter]], float | torch.Tensor] | None = None,
    skip_nonfinite: bool = False,
    num_slots: int | None = None,
    tasks: Sequence[int] | None = None,
) -> StepResult:
    """One optimisation step on a mixed-task batch.

    Args:
        model: model with injected adapters.
        batch: the rows (and their weights) this process handles.
        optimizer: optimizer over ``params``.
        params: the trainable parameters (for clipping).
        extra_loss: adds prior / regulariser terms (already normalised like the NLL).
        max_grad_norm: global-norm clipping (on the device); ``None`` disables it.
        reduce_grads: distributed hook; all-reduces what must be shared and returns the
            squared global gradient norm (so clipping is identical on every worker).
        skip_nonfinite: instead of raising, drop this batch's likelihood (NaN would poison
            every gradient it touches) and name the offending tasks in ``nonfinite``; the
            step still runs (prior, collectives), so distributed workers stay in lockstep.
        num_slots: the model's task slots. Given (the flock loop), the step reads nothing back
            from the device: per-slot sums are fixed-size, and with ``skip_nonfinite`` the check is
            deferred: a step with a non-finite row (or extra term) zeroes this worker's whole
            gradient on the device (NaN-safe, prior pull included) and flags the slots in
            ``StepResult.bad`` for the caller to read later. Without it, checks read at once.
        tasks: the batch's distinct slots, when the caller knows them (no device check).

    Raises:
        NonFiniteLossError: naming the tasks whose rows produced NaN/inf (checks read at once).
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    deferred = skip_nonfinite and num_slots is not None
    ids = batch.task_ids
    ok: torch.Tensor | None = None
    bad: torch.Tensor | None = None
    nonfinite: list[int] | None = None
    if len(batch.input_ids):
        nll_rows = row_nll(model, batch, tasks=tasks)  # (N,)
        finite = torch.isfinite(nll_rows)
        if deferred:
            ok = finite.all()
            bad = nll_rows.new_zeros(num_slots).index_add_(0, ids, (~finite).to(nll_rows.dtype))
            nll = (batch.weights * nll_rows.masked_fill(~finite, 0.0)).sum()  # finite value; grads zeroed below
        else:
            nonfinite = []
            if not finite.all():
                nonfinite = sorted({int(t) for t in ids[~finite].tolist()})
                if not skip_nonfinite:
                    raise NonFiniteLossError(nonfinite, float(nll_rows[~finite][0]))
            nll = (batch.weights * nll_rows).sum() if not nonfinite else nll_rows.new_zeros(())
    else:  # a Ray worker may own none of this batch's rows: it still takes the prior step
        nll_rows = torch.zeros(0, device=ids.device)
        nll = nll_rows.new_zeros(())
        nonfinite = [] if not deferred else None
        bad = nll_rows.new_zeros(num_slots) if deferred else None
    extra = extra_loss() if extra_loss is not None else None
    loss = nll + extra if extra is not None else nll
    if deferred:
        ok = torch.isfinite(loss) if ok is None else ok & torch.isfinite(loss)
    elif not torch.isfinite(loss):
        raise NonFiniteLossError(sorted(set(ids.tolist())), float(loss))
    if loss.requires_grad:
        loss.backward()
    for p in params:  # zeros, not None: Adam then moves every parameter as in the joint objective
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if ok is not None:  # masked_fill, not a product: NaN * 0 would stay NaN
        for p in params:
            p.grad.masked_fill_(~ok, 0.0)
    grads = [p.grad for p in params if p.grad is not None]
    if reduce_grads is not None:
        sq = reduce_grads(params)
    else:
        sq = torch.stack([g.pow(2).sum() for g in grads]).sum() if grads else 0.0
    dev = grads[0].device if grads else ids.device
    norm = torch.as_tensor(sq, dtype=torch.float64, device=dev).sqrt()
    if max_grad_norm is not None and grads:  # on the device: no read of the norm
        coef = torch.where(norm > max_grad_norm, max_grad_norm / (norm + 1e-6), 1.0)
        torch._foreach_mul_(grads, coef.float())
    optimizer.step()
    with torch.no_grad():  # each task's NLL sum and rows, reduced on the device
        detached = nll_rows.detach()
        if num_slots is not None:
            slots = None
            sums = detached.new_zeros(num_slots).index_add_(0, ids, detached)
            counts = detached.new_zeros(num_slots).index_add_(0, ids, torch.ones_like(detached))
        else:
            slots, row_task = ids.unique(return_inverse=True)
            sums = detached.new_zeros(len(slots)).index_add_(0, row_task, detached)
            counts = detached.new_zeros(len(slots)).index_add_(0, row_task, torch.ones_like(detached))
        loss_out = loss.detach() if ok is None else torch.where(ok, loss.detach(), 0.0)
        nll_out = nll.detach() if ok is None else torch.where(ok, nll.detach(), 0.0)
    res = StepResult(loss_out, nll_out, norm, sums, counts, slots, nonfinite, bad)
    if ok is not None:
        res.skipped = (~ok).to(torch.float32)
    return res


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
    """One mixed eval batch on ``device`` from its runs of consecutive rows (a slice per task, no per-row loop).

    Cut to the columns its scored tokens need (:mod:`models.train.trim`) before any state is
    computed, so right padding costs neither the frozen prefix nor the blocks nor the head.
    """
    ids = torch.cat([sets[tasks[i]][a:e] for i, a, e in runs])
    src = ids.device  # where the rows are kept; the batch moves to ``device`` whole
    scored = None
    got = [masks.get(tasks[i]) for i, _, _ in runs] if masks is not None else []
    if any(m is not None for m in got):
        full = torch.ones(ids.shape[1], dtype=torch.bool, device=src)
        full[0] = False
        scored = torch.cat([full.expand(e - a, -1) if m is None else m[a:e].to(src)
                            for m, (_, a, e) in zip(got, runs, strict=True)])
    ids, scored = trim_columns(ids, scored)
    width = ids.shape[1]
    targets = None if scored is None else scored_positions(scored)
    tid = torch.cat([torch.full((e - a,), slot_of(tasks[i]) if slot_of else tasks[i], dtype=torch.long, device=src)
                     for i, a, e in runs])
    pre = None
    if prefix_fn is not None:
        keys = np.concatenate([np.full(e - a, tasks[i], dtype=np.int64) for i, a, e in runs])
        rows = np.concatenate([np.arange(a, e, dtype=np.int64) for i, a, e in runs])
        pre = prefix_fn(keys, rows, ids)
    elif prefixes is not None:
        pre = torch.cat([prefixes[tasks[i]][a:e, :width].to(device) for i, a, e in runs])
    return Batch(ids, tid, torch.ones(len(ids), device=src), pre, split, scored, targets).to(device)
