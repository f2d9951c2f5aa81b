"""How FineGates are trained: importance init, penalty warm-up, noise annealing, hardening.

The maths of a gate stays DESIGN.md's (``models.gates.layer``): ``z = clamp(tanh(theta) + eps +
0.5, 0, 1)``, ``P = Phi((tanh(theta) + 0.5) / sigma_reg)``, penalty ``lam * (mean P - (1 -
target))^2``. What this file adds is *when* and *from where*, because the plain recipe (all
theta at 1, full penalty from step 0) fails on a deep stack: Adam moves every gate by about
its step size whatever the gradient's scale, and the penalty's gradient has the same sign
on every gate, so all gates slide into the partial zone together (every channel scaled by
~0.5, quality lost) long before any gate reaches 0 (measured: ppl 23-32 vs 13 at step 10
of the demo search, sparsity 0). The levers, each a field of :class:`GateSchedule`:

1. **importance init** (:func:`init_from_importance`): theta of each gate from the rank of
   its importance within its layer, ``theta = init_low + (init_high - init_low) * q``
   (``q`` = quantile, 0 = least important). Importance of an input column ``j`` is
   ``rms(x_j) * ||W[:, j]||`` (activation-weighted weight norm, from a few calibration
   batches); of an output row ``i``, ``rms(y_i)``. With ``init_low >= 0.55`` every gate
   starts exactly open (``z = 1``): the model starts as the base; the uniform slide then
   reaches the least useful gates first, and only they pass through the partial zone.
2. **penalty warm-up**: ``lam`` ramps linearly from 0 to its value over the first
   ``warmup`` fraction of the steps (the adapters settle before gates move).
3. **noise annealing**: the training noise ``sigma`` goes linearly from ``sigma`` to
   ``sigma_final`` by the hardening step.
4. **hardening** at ``harden_at`` (fraction of steps): the gates become a binary mask, the
   ``target`` fraction with the lowest theta of every layer (``allocation="layer"``: the
   same count in every layer, so the exported blocks share one width) or of all gates
   (``"global"``) closed (``z = 0``, removed at export), every other gate fully open. The
   remaining steps train the adapters on exactly the model that is exported, and the
   penalty is off (it has nothing left to move). Removal then equals the target, which
   the penalty alone does not guarantee (a closed gate still has ``P >= Phi(-0.52 /
   sigma_reg) > 0``, so ``mean P = 1 - target`` is reached only past the target).

Model code only: no Ray here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from models.gates.heads import harden_grouped
from models.gates.layer import GateConfigError, GatedLinear, gate_layers, sparsity_penalty
from models.lora import MultiTaskLoraLinear, linear_weight

__all__ = [
    "GateSchedule",
    "GateController",
    "importance_scores",
    "init_from_importance",
    "harden",
    "closed_count",
    "pin_theta",
    "clear_hard",
    "open_all",
]

_THETA_CLOSED = -3.0  # tanh(-3) + 0.5 < 0: closed with a wide margin


@dataclass
class GateSchedule:
    """Step-dependent gate settings (plain numbers; the job's ``gates:`` section fills them).

    Args:
        steps: training steps of the run.
        target: fraction of gates closed at the end (``target_sparsity``).
        lam: penalty weight after warm-up (FineGates: ~50).
        warmup: fraction of ``steps`` over which the penalty ramps from 0 to ``lam``.
        sigma: training noise at step 1.
        sigma_final: training noise at the hardening step (linear in between).
        harden_at: fraction of ``steps`` after which the gates are a binary mask (1.0 = never:
            the gates stay stochastic and only ``z == 0`` counts as removed).
        allocation: ``layer`` (same closed fraction in every gated layer) or ``global``.
        init_low, init_high: theta range of the importance init (least to most important).
        align: with ``layer`` allocation, round every layer's kept width down to a multiple
            of this (1 = exact target). Matmul kernels run unaligned widths slowly: SmolLM2's
            MLP at width 1,075 (30% removed) runs 1.10x faster than 1,536, at 1,024 1.24x.
    """

    steps: int
    target: float
    lam: float = 50.0
    warmup: float = 0.2
    sigma: float = 0.1
    sigma_final: float = 0.0
    harden_at: float = 0.75
    allocation: str = "layer"
    init_low: float = 0.6
    init_high: float = 8.0
    align: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.target < 1.0:
            raise GateConfigError(f"target_sparsity {self.target} must be in [0, 1): e.g. 0.3")
        if not 0.0 <= self.warmup <= 1.0 or not 0.0 < self.harden_at <= 1.0:
            raise GateConfigError("warmup must be in [0, 1] and harden_at in (0, 1] (fractions of the steps)")
        if self.allocation not in ("layer", "global"):
            raise GateConfigError(f"allocation {self.allocation!r} is unknown: use layer or global")
        if int(self.align) < 1:
            raise GateConfigError(f"align {self.align} must be >= 1 (e.g. 64, or 1 for the exact target)")

    @property
    def harden_step(self) -> int | None:
        """The step after which the gates are hard (``None``: never)."""
        return None if self.harden_at >= 1.0 else max(1, int(round(self.harden_at * self.steps)))

    def auto_gate_lr(self) -> float:
        """A gate step size that closes the ``target`` quantile by the hardening step.

        Under Adam every gate moves by about its step size per step while the penalty pushes
        (its gradient has one sign), so the gate at importance quantile ``target`` needs
        ``(init_low + (init_high - init_low) * target + 0.55) / lr`` steps to reach
        ``theta = -0.55`` (``z = 0``); doubled because the loss gradient resists (on
        SmolLM2 with a 25% margin, only 14% of a 30% target had closed by the hardening step).
        """
        shift = self.init_low + (self.init_high - self.init_low) * self.target + 0.55
        return 2.0 * shift / (self.harden_step or self.steps)

    def lam_at(self, step: int) -> float:
        """Penalty weight at ``step`` (1-based): linear warm-up, 0 once hard."""
        hs = self.harden_step
        if hs is not None and step > hs:
            return 0.0
        ramp = self.warmup * self.steps
        return self.lam if ramp <= 0 else self.lam * min(1.0, step / ramp)

    def sigma_at(self, step: int) -> float:
        """Training noise at ``step``: linear from ``sigma`` to ``sigma_final`` by the hardening step."""
        end = self.harden_step or self.steps
        frac = min(1.0, max(0.0, (step - 1) / max(end - 1, 1)))
        return self.sigma + (self.sigma_final - self.sigma) * frac


class GateController:
    """Applies a :class:`GateSchedule` to a model during one training run.

    Use ``penalty`` as (part of) the step's extra loss and call ``on_step(step)`` before
    every step (``train_method(..., hooks=TrainHooks(on_step=ctrl.on_step, extra_loss=ctrl.penalty))``).

    Args:
        model: a model with gates.
        schedule: the schedule.
        penalty_scale: multiplies the penalty (``1 / world_size`` when shared gates'
            gradients are summed over data-parallel workers, so the sum counts it once).
    """

    def __init__(self, model: nn.Module, schedule: GateSchedule, penalty_scale: float = 1.0) -> None:
        if not gate_layers(model):
            raise GateConfigError("model has no gates: call inject_gates() first")
        self.model, self.schedule, self.scale = model, schedule, float(penalty_scale)
        self.lam = 0.0
        self.hardened_at: int | None = None

    def on_step(self, step: int) -> None:
        """Set this step's penalty weight and noise; harden once the hardening step is passed."""
        s = self.schedule
        self.lam = s.lam_at(step) * self.scale
        for layer in gate_layers(self.model).values():
            layer.sigma = s.sigma_at(step)
        hs = s.harden_step
        if hs is not None and step > hs and self.hardened_at is None:
            harden(self.model, s.target, s.allocation, s.align)
            self.hardened_at = step
        elif self.hardened_at is not None:
            pin_theta(self.model)  # undo the last step's momentum drift of theta

    def penalty(self) -> torch.Tensor:
        """``lam_now * (mean P - (1 - target))^2`` (a zero tensor when off)."""
        if self.lam <= 0 or self.schedule.target <= 0:
            return torch.zeros(())
        return sparsity_penalty(self.model, self.schedule.target, self.lam)

    def finish(self) -> None:
        """Harden at the end if the schedule said so but the run was too short to reach it."""
        if self.schedule.harden_step is not None and self.hardened_at is None:
            harden(self.model, self.schedule.target, self.schedule.allocation, self.schedule.align)
            self.hardened_at = self.schedule.steps
        elif self.hardened_at is not None:
            pin_theta(self.model)


def _set_theta(layer: GatedLinear, side: str, value: torch.Tensor) -> None:
    """Write theta (through a step-size parametrisation if the layer has one)."""
    name = f"theta_{side}"
    if parametrize.is_parametrized(layer, name):
        setattr(layer, name, value)
    else:
        getattr(layer, name).copy_(value)


def importance_scores(
    model: nn.Module, forward: Callable[[], torch.Tensor | None], kind: str = "magnitude"
) -> dict[str, dict[str, torch.Tensor]]:
    """Importance of every gate entry from the activations of ``forward()``.

    Args:
        model: a model with gates (open gates are best: inputs are read before the column
            gates, outputs after the row gates).
        forward: runs the model on a few calibration batches; for ``kind="taylor"`` it
            returns their (scalar) loss, which is back-propagated.
        kind: ``magnitude``: columns ``rms(x_j) * ||W[:, j]||`` (activation-weighted weight
            norm), rows ``rms(y_i)``; ``taylor``: the first-order loss change of closing the
            gate, ``mean over sequences of |sum_t x_tj dL/dx_tj|`` (rows: the same on y).

    Returns:
        ``{layer name: {"rows": (out,), "cols": (in,)}}`` for the sides that are gated.
    """
    if kind not in ("magnitude", "taylor"):
        raise GateConfigError(f"importance kind {kind!r} is unknown: use magnitude or taylor")
    layers = gate_layers(model)
    acc: dict[tuple[str, str], torch.Tensor] = {}
    count: dict[str, int] = {}
    leaves: list[tuple[str, str, torch.Tensor]] = []
    taylor = kind == "taylor"

    def add(key: tuple[str, str], v: torch.Tensor) -> None:
        acc[key] = acc[key] + v if key in acc else v

    hooks = []
    for name, layer in layers.items():
        def pre(mod, args, name=name):
            x = args[0]
            count[name] = count.get(name, 0) + (x.shape[0] if taylor else x.numel() // x.shape[-1])
            if taylor:  # a leaf per layer: its .grad is dL/dx (the graph upstream is not needed)
                x = x.detach().requires_grad_(True)
                leaves.append((name, "cols", x))
                return (x, *args[1:])
            add((name, "cols"), x.detach().float().pow(2).reshape(-1, x.shape[-1]).sum(0))
            return None

        def post(mod, args, y, name=name):
            if taylor:
                if y.requires_grad:  # keep the graph to this layer's input leaf
                    y.retain_grad()
                    leaves.append((name, "rows", y))
                    return None
                y = y.detach().requires_grad_(True)
                leaves.append((name, "rows", y))
                return y
            add((name, "rows"), y.detach().float().pow(2).reshape(-1, y.shape[-1]).sum(0))
            return None

        hooks += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    was = model.training
    try:
        model.eval()
        with torch.enable_grad() if taylor else torch.no_grad():
            loss = forward()
            if not count:
                raise GateConfigError("the calibration forward never reached a gated layer: check the calibration data")
            if taylor:
                if loss is None or not torch.is_tensor(loss):
                    raise GateConfigError("taylor importance needs forward() to return the calibration loss")
                loss.backward()
                for name, side, v in leaves:
                    g = v.grad if v.grad is not None else torch.zeros_like(v)
                    prod = (v.detach().float() * g.float()).reshape(v.shape[0], -1, v.shape[-1])  # (N, T, dim)
                    add((name, side), prod.sum(1).abs().sum(0))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    if not count:
        raise GateConfigError("the calibration forward never reached a gated layer: check the calibration data")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, layer in layers.items():
        n = max(count.get(name, 0), 1)
        sides = {}
        if layer.theta_cols is not None:
            v = acc[(name, "cols")] / n
            base = layer.inner.base_layer if isinstance(layer.inner, MultiTaskLoraLinear) else layer.inner
            v = v if taylor else v.sqrt() * linear_weight(base).float().norm(dim=0)
            if layer.col_group > 1:  # one gate per group (a head): the group's columns together
                v = v.view(-1, layer.col_group)
                v = v.sum(1) if taylor else v.pow(2).sum(1).sqrt()
            sides["cols"] = v
        if layer.theta_rows is not None:
            v = acc[(name, "rows")] / n
            sides["rows"] = v if taylor else v.sqrt()
        out[name] = sides
    return out


@torch.no_grad()
def init_from_importance(
    model: nn.Module, scores: dict[str, dict[str, torch.Tensor]], init_low: float = 0.6, init_high: float = 2.0
) -> None:
    """Set theta from the within-layer rank of each gate's importance (all task slots alike).

    ``theta = init_low + (init_high - init_low) * q`` with ``q`` the importance quantile in
    [0, 1] (ties broken by position). ``init_low >= 0.55`` keeps every gate exactly open.
    """
    for name, layer in gate_layers(model).items():
        for side, s in scores[name].items():
            theta = getattr(layer, f"theta_{side}")
            order = torch.argsort(s.to(theta.device), stable=True)
            q = torch.empty_like(s, device=theta.device)
            q[order] = torch.linspace(0.0, 1.0, len(s), device=theta.device)
            _set_theta(layer, side, (init_low + (init_high - init_low) * q).expand_as(theta).clone())


def closed_count(dim: int, target: float, align: int = 1) -> int:
    """Gates to close in a layer of ``dim``: ``round(target * dim)``, then more until the kept
    width is a multiple of ``align`` (never all of them: if no aligned width is left, the
    exact count)."""
    k = int(round(target * dim))
    if align <= 1 or k == 0:
        return k
    kept = ((dim - k) // align) * align
    return dim - kept if kept > 0 else k


@torch.no_grad()
def harden(model: nn.Module, target: float, allocation: str = "layer", align: int = 1) -> dict:
    """Fix every gate to a binary mask: the ``target`` fraction with the lowest theta closed.

    Per task slot, per side (rows / cols). Grouped column gates (attention heads) are always
    per layer, the same count in every KV head's bundle (``models.gates.heads.harden_grouped``,
    whatever ``allocation`` and ``align`` say). ``allocation="layer"``: ``round(target * dim)``
    closed in every gated layer (with ``align`` > 1, more, down to a kept width that is a
    multiple of ``align``: :func:`closed_count`); ``"global"``: the lowest thetas over all
    layers' entries of that side (``align`` does not apply). Afterwards the gates ignore
    theta and noise (see ``GatedLinear.is_hard``).

    Returns:
        ``{"closed": number of closed gate entries, "total": number of entries}``.
    """
    layers = gate_layers(model)
    closed = total = 0
    for l in layers.values():  # grouped gates (heads): per layer, the same count in every KV bundle
        if l.col_group > 1:
            mask = harden_grouped(l.theta_cols.detach(), target, l.col_bundles)
            l.hard_cols = mask
            closed += int((mask == 0).sum())
            total += mask.numel()
    for side in ("rows", "cols"):
        group = {
            n: l for n, l in layers.items()
            if getattr(l, f"theta_{side}") is not None and not (side == "cols" and l.col_group > 1)
        }
        if not group:
            continue
        thetas = {n: getattr(l, f"theta_{side}").detach() for n, l in group.items()}  # (T, dim)
        masks = {n: torch.ones_like(t) for n, t in thetas.items()}
        if allocation == "layer":
            for n, t in thetas.items():
                k = closed_count(t.shape[1], target, align)
                if k:
                    idx = torch.topk(t, k, dim=1, largest=False).indices
                    masks[n].scatter_(1, idx, 0.0)
        else:
            names = list(thetas)
            flat = torch.cat([thetas[n].to("cpu") for n in names], dim=1)  # (T, total)
            k = int(round(target * flat.shape[1]))
            m = torch.ones_like(flat)
            if k:
                m.scatter_(1, torch.topk(flat, k, dim=1, largest=False).indices, 0.0)
            off = 0
            for n in names:
                d = thetas[n].shape[1]
                masks[n] = m[:, off : off + d].to(thetas[n].device)
                off += d
        for n, l in group.items():
            setattr(l, f"hard_{side}", masks[n])
            closed += int((masks[n] == 0).sum())
            total += masks[n].numel()
    pin_theta(model)
    return {"closed": closed, "total": total}


@torch.no_grad()
def pin_theta(model: nn.Module) -> None:
    """Make theta of hard gates say the same as the mask (closed -3, open >= 0.6: ``z = 1``).

    After hardening the optimizer's momentum still moves theta a little; pinning it every
    step keeps saved states (which hold theta, not the mask) rebuilding the exact mask.
    """
    for l in gate_layers(model).values():
        for side in ("rows", "cols"):
            mask = getattr(l, f"hard_{side}")
            if mask is None or getattr(l, f"theta_{side}") is None:
                continue
            th = getattr(l, f"theta_{side}").detach()
            _set_theta(l, side, torch.where(mask > 0, th.clamp(min=0.6), torch.full_like(th, _THETA_CLOSED)))


def clear_hard(model: nn.Module) -> None:
    """Make every gate stochastic again (before another method trains from the same init)."""
    for layer in gate_layers(model).values():
        layer.hard_rows = None
        layer.hard_cols = None


@torch.no_grad()
def open_all(model: nn.Module) -> None:
    """Fix every gate to 1 (the ungated model), e.g. for a stage that does not train gates."""
    for layer in gate_layers(model).values():
        for side in ("rows", "cols"):
            th = getattr(layer, f"theta_{side}")
            if th is not None:
                setattr(layer, f"hard_{side}", torch.ones_like(th.detach()))
