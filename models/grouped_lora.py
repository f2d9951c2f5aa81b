"""Slot groups: several independent multi-task flocks (e.g. Tune trials) on one frozen base.

A :class:`~models.lora.MultiTaskLoraLinear` holds one shared adapter Theta for all its slots.
Packing several trials onto one base needs one Theta per trial, so here the slots are
partitioned into groups and each group ``g`` has its own Theta_g:

    A_t = A_shared[group[t]] + dA[t]          # (r, in)
    B_t = B_shared[group[t]] + dB[t]          # (out, r)
    y   = W x + b + s_t * B_t (A_t x)

A trial with T tasks owns one group of T contiguous slots. Its parameters are disjoint rows
of the layer's tensors, so one backward of the sum of every trial's loss gives each trial
exactly the gradient it would get alone; per-trial ranks use the rank mask of the parent
class (slots allocated at the largest rank). Model code only: no Ray here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.lora import MultiTaskLoraLinear, lora_layers

__all__ = ["GroupedLoraLinear", "group_slots", "initial_adapter_state", "slot_index", "PARTS"]


class GroupedLoraLinear(MultiTaskLoraLinear):
    """A :class:`MultiTaskLoraLinear` whose slots fall in ``groups`` groups, one Theta each.

    Built from an injected layer by :func:`group_slots`. ``lora_A_shared`` is (G, r, in) and
    ``lora_B_shared`` (G, out, r); ``slot_group`` (T,) maps a slot to its group.
    """

    def _init_groups(self, groups: int) -> None:
        r, dev = self.lora_A.shape[1], self.lora_A.device
        self.lora_A_shared = nn.Parameter(torch.zeros(groups, r, self.in_features, device=dev))
        self.lora_B_shared = nn.Parameter(torch.zeros(groups, self.out_features, r, device=dev))
        self.register_buffer("slot_group", torch.zeros(self.num_tasks, dtype=torch.long, device=dev), persistent=False)

    def set_slots(self, slots: range, group: int, rank: int) -> None:
        """Give ``slots`` to ``group`` at ``rank`` (a trial's lease)."""
        self.slot_group[slots.start : slots.stop] = group
        self.rank_mask[slots.start : slots.stop] = 0.0
        self.rank_mask[slots.start : slots.stop, :rank] = 1.0
        self.scaling[slots.start : slots.stop] = self.alpha / rank
        for t in slots:
            self.ranks[t] = rank

    def task_A(self, t: int) -> torch.Tensor:
        return (self.lora_A_shared[self.slot_group[t]] + self.lora_A[t])[: self.ranks[t]]

    def task_B(self, t: int) -> torch.Tensor:
        return (self.lora_B_shared[self.slot_group[t]] + self.lora_B[t])[:, : self.ranks[t]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        router = self.router
        h = self.dropout(x).to(self.lora_A.dtype)
        if router.single is not None:  # one slot for every row (evaluation)
            t = router.single
            g = self.slot_group[t : t + 1]  # (1,): an index on the device, no host sync per layer
            a = (self.lora_A_shared[g][0] + self.lora_A[t]) * (self.scaling[t] * self.rank_mask[t])[:, None]
            b = self.lora_B_shared[g][0] + self.lora_B[t]
            return y + F.linear(F.linear(h, a), b).to(y.dtype)
        ids = router.ids
        if ids is None:
            raise RuntimeError("no task ids set: wrap the forward in `with task_ids(model, ids):`")
        grp = self.slot_group[ids]  # (N,)
        slot_scale = self.rank_mask[ids] * self.scaling[ids][:, None]  # (N, r)
        a = (self.lora_A_shared[grp] + self.lora_A[ids]) * slot_scale[:, :, None]  # (N, r, in)
        b = self.lora_B_shared[grp] + self.lora_B[ids]  # (N, out, r)
        shape = h.shape
        h = h.reshape(shape[0], -1, shape[-1])
        z = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))  # (N, L, out)
        return y + z.reshape(*shape[:-1], self.out_features).to(y.dtype)


def group_slots(model: nn.Module, groups: int) -> dict[str, GroupedLoraLinear]:
    """Turn every injected layer of ``model`` into a :class:`GroupedLoraLinear` with ``groups`` Thetas.

    All adapter tensors start at zero; leases write their trial's initial state.

    Example:
        >>> inject(model, ["q_proj"], num_tasks=4 * 6, rank=8, alpha=16)   # 4 trials x 6 tasks
        >>> layers = group_slots(model, groups=4)
    """
    layers = lora_layers(model)
    for layer in layers.values():
        layer.__class__ = GroupedLoraLinear  # same state; the shared Theta gets a group axis
        layer._init_groups(groups)
    return lora_layers(model)  # type: ignore[return-value]


def initial_adapter_state(
    layers: dict[str, MultiTaskLoraLinear], rank: int, num_tasks: int, seed: int
) -> dict[str, torch.Tensor]:
    """The adapters :func:`models.lora.inject` creates after ``torch.manual_seed(seed)``.

    Same RNG draws in the same layer order (``kaiming_uniform_`` of each Theta_A, zeros
    elsewhere), without touching the global RNG: a packed trial starts from exactly the
    weights the unpacked trial would build. Names are the layers' parameter names.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        a = torch.empty(rank, layer.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        out[f"{name}.lora_A_shared"] = a
        out[f"{name}.lora_B_shared"] = torch.zeros(layer.out_features, rank)
        out[f"{name}.lora_A"] = torch.zeros(num_tasks, rank, layer.in_features)
        out[f"{name}.lora_B"] = torch.zeros(num_tasks, layer.out_features, rank)
    return out


def slot_index(part: str, slots: range, group: int, rank: int) -> tuple:
    """Index of one group's ``part`` (``lora_A_shared`` ...) in the layer's tensor, trimmed to ``rank``.

    Applied to a parameter (or its gradient) it gives a view in the unpacked trial's shape.
    """
    s = slice(slots.start, slots.stop)
    return {
        "lora_A_shared": (group, slice(0, rank)),
        "lora_B_shared": (group, slice(None), slice(0, rank)),
        "lora_A": (s, slice(0, rank)),
        "lora_B": (s, slice(None), slice(0, rank)),
    }[part]


PARTS = ("lora_A_shared", "lora_B_shared", "lora_A", "lora_B")
