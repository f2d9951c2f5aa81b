"""Multi-task LoRA: one frozen linear layer, many task adapter slots, one mixed batch.

Every row of a batch carries a task id. The frozen base matmul runs once for the whole
batch; each row then goes through its own adapter slot (gather + batched matmul), like
mLoRA's BatchLoRA. The adapter of task ``t`` is parametrised as

    A_t = A_shared + dA[t]          # (r, in)
    B_t = B_shared + dB[t]          # (out, r)
    y   = W x + b + s_t * B_t (A_t dropout(x))      with s_t = alpha / r_t

``A_shared/B_shared`` is BoRA's global adapter Theta and ``dA/dB`` the per-task offsets
delta_t. Which of them train decides the method, with one layer for all of them:

* independent adapters (tau = 0): shared frozen at its init, deltas train;
* unified adapter (tau -> inf): shared trains, deltas frozen at zero;
* hierarchical (BoRA): both train, the prior penalises ``||delta_t||^2``.

Per-task ranks may differ: slots are allocated at the largest rank and a rank mask zeroes
the unused components. Model code only: no Ray here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TaskRouter",
    "MultiTaskLoraLinear",
    "inject",
    "lora_layers",
    "task_ids",
    "set_trainable",
    "adapter_params",
    "LoraTargetError",
    "linear_dims",
    "linear_weight",
    "matches_target",
    "block_index",
]


class LoraTargetError(ValueError):
    """Raised when target modules cannot be adapted (no match, rank too large ...)."""


@dataclass
class TaskRouter:
    """Holds the per-row task ids of the batch being processed; shared by all layers."""

    ids: torch.Tensor | None = None
    # When every row belongs to one task the layers skip the gather (eval, unified).
    single: int | None = None
    # Lazy (row-sparse) training: the sorted slots whose offsets are staged on every layer
    # (``MultiTaskLoraLinear.stage``); the forward then reads those rows, never the (T, ...)
    # tensors, so its backward touches only the batch's tasks.
    staged: torch.Tensor | None = None


def linear_dims(base: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of nn.Linear or HF's GPT-2 Conv1D."""
    # is_quantized_linear: models.quant.linear.QuantizedLinear
    if isinstance(base, nn.Linear) or getattr(base, "is_quantized_linear", False):
        return base.in_features, base.out_features, False
    if type(base).__name__ == "Conv1D" and hasattr(base, "nf"):  # transformers.pytorch_utils
        w = base.weight  # (in, out)
        return w.shape[0], w.shape[1], True
    raise LoraTargetError(
        f"cannot put LoRA on a {type(base).__name__}: only nn.Linear and GPT-2 Conv1D layers"
    )


def linear_weight(base: nn.Module) -> torch.Tensor:
    """The weight of nn.Linear / GPT-2 Conv1D in nn.Linear layout (out, in), not a copy.

    Conv1D stores (in, out), so it comes back transposed (a view); a quantised base
    (``models.quant.linear.QuantizedLinear``, which holds no weight) gives its dequantised
    fp32 matrix. Anything else raises :class:`LoraTargetError`, as :func:`linear_dims` does.
    """
    if getattr(base, "is_quantized_linear", False):
        return base.dequantized_weight()
    _, _, fan_in_fan_out = linear_dims(base)
    return base.weight.T if fan_in_fan_out else base.weight


class MultiTaskLoraLinear(nn.Module):
    """A frozen linear layer plus ``num_tasks`` LoRA slots routed per row.

    Args:
        base: the frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) it wraps.
        num_tasks: number of adapter slots.
        rank: rank of every slot, or a list with one rank per task (masked to the max).
        alpha: LoRA alpha; slot ``t`` is scaled by ``alpha / rank_t``.
        dropout: dropout on the adapter input; one mask per row shared by all slots.
        router: the shared :class:`TaskRouter` that carries the batch's task ids.
        max_rank: allocate slots (and the shared Theta) at this rank even if these tasks'
            ranks are smaller: Ray workers owning different tasks then hold the same Theta.

    Example:
        >>> layer = MultiTaskLoraLinear(nn.Linear(16, 8), 3, 4, 8.0, 0.0, TaskRouter())
        >>> with task_ids(layer, torch.tensor([0, 2])):
        ...     y = layer(torch.randn(2, 5, 16))
    """

    def __init__(
        self,
        base: nn.Module,
        num_tasks: int,
        rank: int | Sequence[int],
        alpha: float,
        dropout: float,
        router: TaskRouter,
        max_rank: int | None = None,
    ) -> None:
        super().__init__()
        in_f, out_f, fan_in_fan_out = linear_dims(base)
        ranks = [int(rank)] * num_tasks if isinstance(rank, int) else [int(r) for r in rank]
        if len(ranks) != num_tasks:
            raise LoraTargetError(f"got {len(ranks)} ranks for {num_tasks} tasks")
        r_max = max(max(ranks), max_rank or 0)
        if min(ranks) < 1 or r_max > min(in_f, out_f):
            raise LoraTargetError(
                f"lora rank {r_max} does not fit a {in_f}->{out_f} layer: "
                f"use a rank between 1 and {min(in_f, out_f)}"
            )
        self.base_layer = base
        self.in_features, self.out_features = in_f, out_f
        self.fan_in_fan_out = fan_in_fan_out
        self.num_tasks, self.alpha = num_tasks, float(alpha)
        self.ranks = ranks
        self.router = router
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev = next(iter([*base.parameters(), *base.buffers()])).device  # a QuantizedLinear may hold buffers only
        # Theta (shared) and delta_t (per task); effective slot = shared + delta.
        self.lora_A_shared = nn.Parameter(torch.empty(r_max, in_f, device=dev))
        self.lora_B_shared = nn.Parameter(torch.zeros(out_f, r_max, device=dev))
        self.lora_A = nn.Parameter(torch.zeros(num_tasks, r_max, in_f, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(num_tasks, out_f, r_max, device=dev))
        nn.init.kaiming_uniform_(self.lora_A_shared, a=math.sqrt(5))  # PEFT's LoRA init
        mask = torch.zeros(num_tasks, r_max, device=dev)
        for t, r in enumerate(ranks):
            mask[t, :r] = 1.0
        self.register_buffer("rank_mask", mask, persistent=False)  # (T, r)
        scale = torch.tensor([self.alpha / r for r in ranks], device=dev)
        self.register_buffer("scaling", scale, persistent=False)  # (T,)
        self.merged_task: int | None = None
        # Staged rows (U, r, in) / (U, out, r) of the slots ``router.staged``: see :meth:`stage`.
        self.staged_A: torch.Tensor | None = None
        self.staged_B: torch.Tensor | None = None
        for p in base.parameters():
            p.requires_grad_(False)

    # ----------------------------------------------------------------- weights of one task
    def task_A(self, t: int) -> torch.Tensor:
        """Effective A of task t, trimmed to its rank: (r_t, in)."""
        return (self.lora_A_shared + self.lora_A[t])[: self.ranks[t]]

    def task_B(self, t: int) -> torch.Tensor:
        """Effective B of task t, trimmed to its rank: (out, r_t)."""
        return (self.lora_B_shared + self.lora_B[t])[:, : self.ranks[t]]

    def delta_weight(self, t: int) -> torch.Tensor:
        """s_t * B_t A_t in nn.Linear layout (out, in)."""
        return self.scaling[t] * (self.task_B(t) @ self.task_A(t))

    @torch.no_grad()
    def merge(self, t: int) -> None:
        """Fold task t's delta into the base weight (serving a single task)."""
        if self.merged_task is not None:
            raise RuntimeError(f"task {self.merged_task} is already merged: unmerge first")
        dw = self.delta_weight(t)
        self.base_layer.weight.add_(dw.T if self.fan_in_fan_out else dw)
        self.merged_task = t

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        if self.merged_task is None:
            return
        dw = self.delta_weight(self.merged_task)
        self.base_layer.weight.sub_(dw.T if self.fan_in_fan_out else dw)
        self.merged_task = None

    # ----------------------------------------------------------------- row-sparse training
    def stage(self, rows_A: torch.Tensor, rows_B: torch.Tensor) -> None:
        """Route the forward through these offset rows of the slots ``router.staged``.

        ``rows_A`` (U, r, in) and ``rows_B`` (U, out, r) are leaves holding the offsets of
        the U staged slots (a copy of their rows of ``lora_A``/``lora_B``): the backward
        then fills U rows of gradient, not T (``models.train.lazy``). ``unstage`` ends it.
        """
        self.staged_A, self.staged_B = rows_A, rows_B

    def unstage(self) -> None:
        self.staged_A = self.staged_B = None

    def _offsets(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Offset rows of ``ids`` (N,): (N, r, in), (N, out, r); staged rows when staged."""
        if self.staged_A is None:
            return self.lora_A[ids], self.lora_B[ids]
        local = torch.searchsorted(self.router.staged, ids)  # position among the staged slots
        return self.staged_A[local], self.staged_B[local]

    # ----------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # frozen base: once for the whole batch
        if self.merged_task is not None:
            return y
        router = self.router
        h = self.dropout(x).to(self.lora_A.dtype)  # adapters stay fp32 on a bf16/fp16 base
        # s_t and the rank mask are folded into A (r x in numbers) rather than applied to the
        # (..., out) result: that saves a full pass over the output in forward and backward.
        if router.single is not None:  # one task for every row: plain matmuls, no gather
            t = router.single
            if self.staged_A is None:
                dA, dB = self.lora_A[t], self.lora_B[t]
            else:
                dA, dB = (x[0] for x in self._offsets(torch.tensor([t], device=self.rank_mask.device)))
            a = (self.lora_A_shared + dA) * (self.scaling[t] * self.rank_mask[t])[:, None]
            b = self.lora_B_shared + dB
            return y + F.linear(F.linear(h, a), b).to(y.dtype)
        ids = router.ids
        if ids is None:
            raise RuntimeError("no task ids set: wrap the forward in `with task_ids(model, ids):`")
        # Gather each row's slot: (N, r, in) and (N, out, r); N = rows of the batch.
        slot_scale = self.rank_mask[ids] * self.scaling[ids][:, None]  # (N, r)
        dA, dB = self._offsets(ids)
        a = (self.lora_A_shared + dA) * slot_scale[:, :, None]
        b = self.lora_B_shared + dB
        shape = h.shape  # (N, ..., in)
        h = h.reshape(shape[0], -1, shape[-1])  # (N, L, in)
        z = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))  # (N, L, out)
        return y + z.reshape(*shape[:-1], self.out_features).to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, tasks={self.num_tasks}, ranks={sorted(set(self.ranks))}"
        )


# --------------------------------------------------------------------------- free functions
def matches_target(name: str, targets: Sequence[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(name == t or leaf == t or name.endswith("." + t) for t in targets)


def block_index(name: str) -> int | None:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def inject(
    model: nn.Module,
    target_modules: Sequence[str],
    num_tasks: int,
    rank: int | Sequence[int],
    alpha: float,
    dropout: float = 0.0,
    layers: Sequence[int] | None = None,
    max_rank: int | None = None,
) -> list[str]:
    """Replace every matching linear layer of ``model`` with a :class:`MultiTaskLoraLinear`.

    Args:
        model: any ``transformers`` model (or plain ``nn.Module``); modified in place.
        target_modules: leaf names (``q_proj``) or dotted suffixes (``self_attn.q_proj``).
        num_tasks: adapter slots per layer.
        rank: one rank, or one rank per task.
        alpha: LoRA alpha.
        dropout: adapter-input dropout.
        layers: only adapt modules whose path holds one of these block indices (e.g. the
            top layers: the backward pass then stops early).
        max_rank: slot allocation rank (see :class:`MultiTaskLoraLinear`).

    Returns:
        The names of the replaced modules, in model order.

    Example:
        >>> names = inject(model, ["q_proj", "v_proj"], num_tasks=6, rank=8, alpha=16)
    """
    router = getattr(model, "_loraflock_router", None) or TaskRouter()
    chosen = []
    for name, module in model.named_modules():
        if isinstance(module, MultiTaskLoraLinear) or ".base_layer" in name:
            continue
        if not matches_target(name, target_modules):
            continue
        if layers is not None and block_index(name) not in set(layers):
            continue
        chosen.append(name)
    if not chosen:
        leaves = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
            }
        )
        raise LoraTargetError(
            f"target_modules {list(target_modules)} match no layer"
            + (f" in layers {list(layers)}" if layers is not None else "")
            + f"; linear layers of this model: {leaves}"
        )
    for name in chosen:
        base = model.get_submodule(name)
        model.set_submodule(name, MultiTaskLoraLinear(base, num_tasks, rank, alpha, dropout, router, max_rank))
    model._loraflock_router = router  # type: ignore[attr-defined]
    keep = {id(p) for p in adapter_params(model)}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    return chosen


def lora_layers(model: nn.Module) -> dict[str, MultiTaskLoraLinear]:
    """Name -> layer for every injected layer, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiTaskLoraLinear)}


def adapter_params(model: nn.Module, part: str = "all") -> list[nn.Parameter]:
    """Adapter parameters: ``part`` is ``shared`` (Theta), ``task`` (deltas) or ``all``."""
    out: list[nn.Parameter] = []
    for layer in lora_layers(model).values():
        if part in ("shared", "all"):
            out += [layer.lora_A_shared, layer.lora_B_shared]
        if part in ("task", "all"):
            out += [layer.lora_A, layer.lora_B]
    return out


def set_trainable(model: nn.Module, shared: bool, task: bool) -> None:
    """Choose the method: independent (task only), unified (shared only), hierarchical (both)."""
    for p in adapter_params(model, "shared"):
        p.requires_grad_(shared)
    for p in adapter_params(model, "task"):
        p.requires_grad_(task)


@contextmanager
def task_ids(model: nn.Module, ids: torch.Tensor | int) -> Iterator[None]:
    """Route the next forward passes: one task id per row, or one int for all rows."""
    router: TaskRouter | None = getattr(model, "_loraflock_router", None) or getattr(model, "router", None)
    if router is None:  # a plain base model: nothing to route
        yield
        return
    old = (router.ids, router.single)
    if isinstance(ids, int):
        router.ids, router.single = None, ids
    else:
        router.ids, router.single = ids, None
    try:
        yield
    finally:
        router.ids, router.single = old
