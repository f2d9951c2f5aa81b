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
from torch.utils.checkpoint import checkpoint

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
    "token_nll",
    "CE_CHUNK_ELEMENTS",
    "train_step",
    "evaluate",
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


def row_nll_sum(model: nn.Module, batch: Batch, chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL of each row's scored tokens and their count: two (N,) tensors.

    Unscored targets (prompt tokens, padding) enter the cross-entropy as ``ignore_index``, so
    they add nothing to the sum and their logits get exactly zero gradient. The fp32 logits
    exist one chunk of tokens at a time (:func:`token_nll`), never whole.
    """
    ctx = use_prefix(model, batch.split, batch.prefix) if batch.prefix is not None else nullcontext()
    ids = batch.task_ids
    route = int(ids[0]) if bool((ids == ids[0]).all()) else ids  # one task: no gather
    # Shift by padding the targets (ignored last position) rather than slicing the logits:
    # a (N, L-1, V) slice would copy the largest tensor of the step (V = 49k on SmolLM2).
    nxt = batch.input_ids[:, 1:]
    if batch.scored is not None:
        nxt = nxt.masked_fill(~batch.scored[:, 1:], -100)
    target = F.pad(nxt, (0, 1), value=-100)  # (N, L): the target of position t is token t + 1
    with ctx, task_ids(model, route):
        nll = token_nll(model, batch.input_ids, target, chunk_tokens)
    count = (target != -100).sum(dim=1)
    return nll.sum(dim=1), count


# Model types whose causal-LM head is exactly ``lm_head(last hidden state)`` (no soft-capping,
# logit scale or multiplier): their loss can run the head chunk by chunk from the hidden states.
_PLAIN_HEAD_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gpt2", "gpt_neox", "phi3", "smollm3",
    "olmo", "olmo2", "starcoder2",
})
CE_CHUNK_ELEMENTS = 2**26  # fp32 logits alive at once in the loss: 256 MB (~1.4k tokens at SmolLM2's 49k vocab)


def _chunk_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target, reduction="none", ignore_index=-100)


def _head_chunk_nll(head: nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _chunk_nll(head(hidden), target)


def token_nll(model: nn.Module, input_ids: torch.Tensor, target: torch.Tensor,
              chunk_tokens: int | None = None) -> torch.Tensor:
    """Next-token NLL of every position, fp32 (N, L); 0 where ``target`` is -100.

    Why chunks: the fp32 upcast of whole (N, L, V) logits is the largest tensor of a step
    (16 GB at 32k tokens x 128k vocab), and ``log_softmax`` saves another for backward. Here
    the tokens go through the loss ``chunk_tokens`` at a time (default: ``CE_CHUNK_ELEMENTS``
    logits), each chunk under activation checkpointing, so backward recomputes its logits
    instead of keeping them: only one chunk's fp32 logits ever exist. For a plain head
    (``_PLAIN_HEAD_TYPES``, head an unadapted linear layer) even the model-dtype logits are
    never whole: the backbone's hidden states go through ``lm_head`` chunk by chunk. Per
    token the arithmetic is the unchunked loss's (same head matmul row, same fp32 softmax).
    """
    n, length = input_ids.shape
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, "base_model", None)
    plain = (
        head is not None and backbone is not None and backbone is not model
        and getattr(getattr(model, "config", None), "model_type", None) in _PLAIN_HEAD_TYPES
        and (type(head) is nn.Linear or getattr(head, "is_quantized_linear", False))  # no adapter: no router
    )
    if plain:
        source = backbone(input_ids=input_ids).last_hidden_state.reshape(n * length, -1)
        vocab = head.out_features
    else:
        source = model(input_ids=input_ids).logits.reshape(n * length, -1)
        vocab = source.shape[-1]
    flat_target = target.reshape(-1)
    step = chunk_tokens or max(1, CE_CHUNK_ELEMENTS // vocab)
    recompute = torch.is_grad_enabled() and source.requires_grad
    parts = []
    for i in range(0, n * length, step):
        args = (source[i : i + step], flat_target[i : i + step])
        fn = (lambda h, t: _head_chunk_nll(head, h, t)) if plain else _chunk_nll
        parts.append(checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args))
    return torch.cat(parts).view(n, length)


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


@torch.no_grad()
def evaluate(
    model: nn.Module,
    sets: dict[int, torch.Tensor],
    batch_size: int = 8,
    prefixes: dict[int, torch.Tensor] | None = None,
    split: int = 0,
    slot_of: Callable[[int], int] | None = None,
    masks: dict[int, torch.Tensor | None] | None = None,
) -> dict[int, float]:
    """Mean NLL per scored token of each task's held-out sequences.

    Args:
        sets: task -> (M, L) eval token ids.
        prefixes: task -> (M, L, H) cached hidden states (with ``split``).
        slot_of: adapter slot used for a task (default: the task's own; unified = 0).
        masks: task -> (M, L) bool scored-token mask (see :class:`Batch`); missing or
            ``None``: every token after the first (full raw-text rows).

    Returns:
        task -> mean NLL (perplexity is ``exp`` of it).
    """
    model.eval()
    out = {}
    for t, ids in sets.items():
        slot = slot_of(t) if slot_of else t
        total, count = 0.0, 0
        for i in range(0, len(ids), batch_size):
            rows = ids[i : i + batch_size]
            pre = prefixes[t][i : i + batch_size] if prefixes is not None else None
            mask = masks.get(t) if masks is not None else None
            tid = torch.full((len(rows),), slot, dtype=torch.long, device=rows.device)
            b = Batch(rows, tid, torch.ones(len(rows), device=rows.device), pre, split,
                      None if mask is None else mask[i : i + batch_size])
            nll, n = row_nll_sum(model, b)
            total += float(nll.sum())
            count += int(n.sum())
        out[t] = total / max(count, 1)
    return out
