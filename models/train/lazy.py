"""Lazy prior pull: a training step whose cost does not grow with the number of tasks.

The dense step (``flock.prior_update: dense``) is BoRA's joint MAP done literally: every
step, AdamW moves every task's offset delta_d, because the prior's gradient
``c * delta_d`` (``c = tau_g / sum N``, :meth:`models.prior.HierarchicalPrior.pull_rate`)
reaches all of them and Adam's momentum keeps moving rows whose likelihood gradient is 0.
With T tasks and B rows a batch, T - B of the rows do that "idle" work every step.

:class:`LazyRowAdamW` (``prior_update: lazy``) steps only what the batch touches:

* Theta (and any other dense parameter): plain AdamW, the same arithmetic as
  ``torch.optim.AdamW``; its gradient (likelihood only: the prior acts on the deltas) is
  all-reduced across workers exactly as in the dense step.
* The rows of the U tasks in the batch: staged as small leaves (``MultiTaskLoraLinear.
  stage``), so the forward, the backward, the prior's penalty, the gradient norm and the
  AdamW update all see U rows, never T. Rows of other tasks stay bit-identical.
* An idle row is caught up when its task is next staged (or at :meth:`flush`: before
  evaluation, a tau update and a checkpoint) for the k steps it sat out, in closed form:

  1. Adam's momentum carry-over, as dense AdamW would move it with a zero gradient:
     ``delta -= lr * m / (sqrt(v) + eps) * sum_j w_j alpha_j / beta_j`` with
     ``alpha_j = b1^j / (1 - b1^(s+j))``, ``beta_j = sqrt(b2^j / (1 - b2^(s+j)))``,
     ``w_j = (1 - lr wd)^(k-j)`` (s = the row's last step); then ``m *= b1^k``, ``v *= b2^k``,
     ``delta *= (1 - lr wd)^k`` (decoupled weight decay). Exact with a zero gradient but
     for eps: it is added to ``sqrt(v_s)`` instead of ``sqrt(v_s) beta_j`` (relative effect
     ~ eps / sqrt(v), below 1e-4 for every row that has moved).
  2. The prior's pull, as preconditioned gradient flow with Adam's second moment frozen at
     its decaying value: ``|delta| -= min(|delta| (1 - exp(-E)), lr sum_j g_j)`` with
     ``E = lr c sum_j g_j / beta_j / (sqrt(v_s) + eps)``, g_j the global clipping factor of
     step s+j (1 without clipping), on the active rank components only. The cap says what
     Adam does when the prior's own gradient dominates v: move a coordinate by at most
     about lr per step.

What it is relative to the dense joint-MAP step (the approximation, measured in
``tests/models/train/test_lazy.py``): identical while every task is in every batch; for
idle stretches it drops (a) the prior's gradient from the idle rows' m and v (in the dense
step it enters v too and keeps acting through m after the task returns), (b) the idle rows'
prior gradient from the global gradient norm used for clipping, and (c) the product
``prod (1 - x_j)`` for ``exp(-sum x_j)``. The stationary point is unchanged: a task's
offset still settles where its likelihood gradient balances ``c * delta_d``. Catch-ups are
not split-invariant (two stretches caught up at a flush differ from one long stretch by the
same order as (a)), so evaluations and checkpoints during training move a lazy run slightly;
``StepResult.loss`` carries the prior's term of the batch's tasks only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import nn

from models.lora import MultiTaskLoraLinear

__all__ = ["LazyRowAdamW", "PullSource"]


class PullSource(Protocol):
    """What the lazy step needs of the prior (:class:`models.prior.HierarchicalPrior` is one)."""

    def pull_rate(self, name: str) -> float: ...

    def owned_weight(self, device: torch.device) -> torch.Tensor: ...


class LazyRowAdamW(torch.optim.Optimizer):
    """AdamW over dense parameters plus the per-task offsets of ``layers``, row-sparse.

    Call :meth:`stage` with the batch's task slots before the forward and put the returned
    leaves into the step's parameter list (``train_step(..., params=dense + leaves)``);
    ``step()`` then updates the dense parameters and those rows and unstages the layers.

    Args:
        dense_groups: parameter groups (as for ``torch.optim.AdamW``) of Theta and any other
            replicated or extra parameter; may be empty.
        layers: name -> :class:`MultiTaskLoraLinear` whose ``lora_A``/``lora_B`` rows train.
        lr, betas, eps, weight_decay: AdamW's settings (the rows use these).
        prior: the source of the prior's pull (``None``: no prior, e.g. tau = 0).

    Example:
        >>> opt = LazyRowAdamW([{"params": theta}], lora_layers(model), lr=1e-3, prior=prior)
        >>> leaves = opt.stage([0, 5])
        >>> train_step(model, batch, opt, theta + leaves, extra_loss=prior.penalty)
    """

    def __init__(
        self,
        dense_groups: Sequence[dict],
        layers: Mapping[str, MultiTaskLoraLinear],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        prior: PullSource | None = None,
    ) -> None:
        self.layers = dict(layers)
        rows = [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]
        groups = [dict(g) for g in dense_groups if len(list(g["params"]))]
        groups.append({"params": rows, "rows": True})
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "rows": False})
        self.prior = prior
        first = next(iter(self.layers.values()))
        self.router = first.router
        self.num_tasks = first.num_tasks
        for p in rows:  # full-size moments up front: checkpoints and _stop_tasks see them
            self.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                             "exp_avg_sq": torch.zeros_like(p)}
        self.t = 0  # optimizer steps taken
        self.last = np.zeros(self.num_tasks, dtype=np.int64)  # step through which each row is current
        self.clip = [1.0]  # clip[s]: global clipping factor of step s (host floats)
        self._slots: list[int] | None = None
        self._leaves: list[tuple[nn.Parameter, torch.Tensor]] = []

    # ------------------------------------------------------------------ staging
    @property
    def _row_group(self) -> dict:
        return self.param_groups[-1]

    def stage(self, slots: Sequence[int]) -> list[torch.Tensor]:
        """Catch up and stage the rows of ``slots`` (the batch's tasks); return their leaves."""
        slots = sorted({int(s) for s in slots})
        dev = self._row_group["params"][0].device
        idx = torch.tensor(slots, dtype=torch.long, device=dev)
        self._catch_up(slots, idx)
        self._leaves = []
        for layer in self.layers.values():
            a = layer.lora_A.detach()[idx].requires_grad_(layer.lora_A.requires_grad)
            b = layer.lora_B.detach()[idx].requires_grad_(layer.lora_B.requires_grad)
            layer.stage(a, b)
            self._leaves += [(layer.lora_A, a), (layer.lora_B, b)]
        self.router.staged = idx
        self._slots = slots
        return [x for _, x in self._leaves if x.requires_grad]

    def unstage(self) -> None:
        for layer in self.layers.values():
            layer.unstage()
        self.router.staged = None
        self._slots, self._leaves = None, []

    def note_clip(self, factor: float) -> None:
        """Record the global clipping factor of the step just taken (1.0 = not clipped)."""
        while len(self.clip) <= self.t:
            self.clip.append(1.0)
        self.clip[self.t] = float(factor)

    @torch.no_grad()
    def flush(self) -> None:
        """Catch every row up to the last step (before evaluation, a tau update, a checkpoint)."""
        if self._slots is not None:
            raise RuntimeError("flush() while rows are staged: call it between steps")
        dev = self._row_group["params"][0].device
        self._catch_up(list(range(self.num_tasks)), torch.arange(self.num_tasks, device=dev))

    # ------------------------------------------------------------------ the catch-up
    def _stretch(self, last: int, k: int, lr: float, wd: float) -> list[float]:
        """Host scalars of k idle steps after step ``last`` (see the module docstring).

        [momentum carry-over, pull exponent sum_j g_j u_j / beta_j, pull cap sum_j g_j u_j,
        prior gradient left in m, prior gradient squared left in v], where
        ``u_j = 1 - b1^(k-j+1)`` is the part of step j's prior gradient that momentum has
        applied by the end of the stretch (the rest is left in m, as in the dense step).
        """
        b1, b2 = self._row_group["betas"]
        j = np.arange(1, k + 1, dtype=np.float64)
        s = last + j
        with np.errstate(over="ignore", under="ignore"):
            inv_beta = np.minimum(np.sqrt((1.0 - b2**s) / b2**j), 1e30)  # finite for any k
            alpha = b1**j / (1.0 - b1**s)
            u = 1.0 - b1 ** (k - j + 1)
        w = (1.0 - lr * wd) ** (k - j)
        g = np.asarray(self.clip[last + 1 : last + k + 1] + [1.0] * max(0, last + k + 1 - len(self.clip)))
        return [float((w * alpha * inv_beta).sum()), float((g * u * inv_beta).sum()), float((g * u).sum()),
                float(((1 - b1) * b1 ** (k - j) * g).sum()), float(((1 - b2) * b2 ** (k - j) * g * g).sum())]

    @torch.no_grad()
    def _catch_up(self, slots: list[int], idx: torch.Tensor) -> None:
        k = self.t - self.last[slots]
        todo = np.nonzero(k > 0)[0]
        if not len(todo):
            return
        g = self._row_group
        lr, eps, wd = g["lr"], g["eps"], g["weight_decay"]
        b1, b2 = g["betas"]
        coef = np.array([self._stretch(int(self.last[slots[i]]), int(k[i]), lr, wd) for i in todo])  # (U', 3)
        kk = k[todo].astype(np.float64)
        dev = idx.device
        col = lambda x: torch.tensor(x, dtype=torch.float32, device=dev)  # noqa: E731
        momentum, pull_sum, clip_sum, m_in, v_in = (col(coef[:, i]) for i in range(5))
        decay, m_fac, v_fac = col((1.0 - lr * wd) ** kk), col(b1**kk), col(b2**kk)
        rows = idx[torch.as_tensor(todo, device=dev)]
        for name, layer in self.layers.items():
            rate = self.prior.pull_rate(name) if self.prior is not None else 0.0
            c = rate * self.prior.owned_weight(dev)[rows] if rate > 0 else None  # (U',)
            for p, active in ((layer.lora_A, layer.rank_mask[rows][:, :, None]),   # rows of A
                              (layer.lora_B, layer.rank_mask[rows][:, None, :])):  # columns of B
                st = self.state[p]
                x, m, v = p[rows], st["exp_avg"][rows], st["exp_avg_sq"][rows]
                shape = (-1,) + (1,) * (x.dim() - 1)
                den = v.sqrt().add_(eps)
                x = x * decay.view(shape) - lr * momentum.view(shape) * m / den
                m, v = m * m_fac.view(shape), v * v_fac.view(shape)
                if c is not None:
                    e = torch.where(active > 0, (lr * (c * pull_sum).view(shape)) / den, 0.0)
                    cap = lr * (c > 0).float().mul(clip_sum).view(shape) * active
                    shrink = torch.minimum(x.abs() * -torch.expm1(-e), cap)
                    x = x - x.sign() * shrink
                    grad = c.view(shape) * x * active  # the prior's gradient at the stretch's end
                    m = m + m_in.view(shape) * grad
                    v = v + v_in.view(shape) * grad * grad
                p[rows] = x
                st["exp_avg"][rows] = m
                st["exp_avg_sq"][rows] = v
        self.last[np.asarray(slots)[todo]] = self.t

    # ------------------------------------------------------------------ the step
    @staticmethod
    def _adamw(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, group: dict) -> None:
        """torch.optim.AdamW's single-tensor update, in place on p, m, v."""
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        b1, b2 = group["betas"]
        p.mul_(1 - lr * wd)
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2**step)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - b1**step))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if self._slots is None:
            raise RuntimeError("LazyRowAdamW.step() without stage(): stage the batch's task slots first")
        self.t += 1
        for group in self.param_groups[:-1]:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                st["step"] += 1
                self._adamw(p, p.grad, st["exp_avg"], st["exp_avg_sq"], int(st["step"]), group)
        group = self._row_group
        idx = self.router.staged
        for p, leaf in self._leaves:
            st = self.state[p]
            st["step"].fill_(self.t)
            if leaf.grad is None:  # frozen part (e.g. task offsets of a unified run): nothing moves
                continue
            x, m, v = leaf.detach().clone(), st["exp_avg"][idx], st["exp_avg_sq"][idx]
            self._adamw(x, leaf.grad, m, v, self.t, group)
            p[idx], st["exp_avg"][idx], st["exp_avg_sq"][idx] = x, m, v
        self.last[self._slots] = self.t
        self.unstage()

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore as ``torch.optim.Optimizer`` does; rows are current (saved after a flush)."""
        super().load_state_dict(state_dict)
        first = self._row_group["params"][0]
        self.t = int(self.state[first]["step"])
        self.last[:] = self.t
        self.clip = [1.0] * (self.t + 1)
