"""FineGates: stochastic row/column gates on frozen linear layers (with or without LoRA).

A gated layer wraps any linear-like module ``inner`` (``nn.Linear``, GPT-2 ``Conv1D`` or a
:class:`~models.lora.MultiTaskLoraLinear`, which already adds ``s_t B_t A_t``) and computes

    y = g_r * inner(g_c * x) = g_r * ((W + s_t B_t A_t)(g_c * x) + b)

with column gates ``g_c`` (``in`` entries, one per input feature) and row gates ``g_r``
(``out`` entries, one per output feature), so it is right for ``in != out`` (the official
LoRA variant multiplies the LoRA term by ``g_c`` on the wrong axis when ``in != out``).

Gates follow the stochastic gates of Yamada et al. (STG), as FineGates uses them::

    mu  = tanh(theta),          theta ~ N(init_mean, init_std) at init (1, 0.1: all open)
    z   = clamp(mu + eps + 0.5, 0, 1),   eps ~ N(0, sigma^2)      (training, sigma = 0.1)
    z   = clamp(mu + 0.5, 0, 1)                                    (eval: deterministic)
    P   = Phi((mu + 0.5) / sigma_reg)   probability that the gate is open (z > 0)

``sigma_reg`` defaults to 0.5 as in the official code (``jsvir/FineGates``): with 0.1 the
penalty's gradient at init is ``phi(12.6) ~ 1e-35`` and the gates would never move.
The noise is drawn once per forward for every gate (shared by the rows of the batch).

Grouped column gates (``col_group > 1``): one gate for every ``col_group`` contiguous inputs,
e.g. one per attention head on ``o_proj``'s input (``models.gates.heads``), expanded to the
input width in the forward; ``col_bundles`` tells the hardening to close the same number in
each bundle of groups (the query heads that share one KV head). Everything that reads the
gates from outside (:meth:`GatedLinear.eval_gates`, the export, the sparsity report) sees
the expanded, per-input-column values.

Scope ``shared``: one gate vector per layer. Scope ``task``: one per task, ``[T, dim]``,
gathered per row with the task ids of the shared :class:`~models.lora.TaskRouter` (the
same ids that route the LoRA slots), without a Python loop over rows.

Sparsity objective (:func:`sparsity_penalty`): ``lam * (mean(P) - (1 - target))^2`` where the
mean runs over every gate entry of every gated layer (rows and columns, all tasks, each
entry counted once). FineGates uses ``|mean - keep|`` per layer and side; the squared
global form is smooth at the target and lets layers differ in sparsity.

How the gates are trained (importance init, penalty warm-up, noise annealing, hardening
to a binary mask) is ``models.gates.schedule``; once hardened (``hard_rows``/``hard_cols``
set) a layer uses that fixed 0/1 mask in training and eval alike.

Inject LoRA first (``models.lora.inject``), then gates: gates wrap the LoRA layers.
Model code only: no Ray here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from models.lora import MultiTaskLoraLinear, TaskRouter, block_index, linear_dims, matches_target

__all__ = [
    "GateConfigError",
    "GatedLinear",
    "inject_gates",
    "wrap_gated",
    "gate_layers",
    "gate_params",
    "remove_gates",
    "open_probabilities",
    "sparsity_penalty",
    "sparsity_report",
]

_SCOPES = ("shared", "task")


class GateConfigError(ValueError):
    """Bad gate settings or targets; the message names the setting and the fix."""


def _hard_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(v + 0.5, 0.0, 1.0)


class GatedLinear(nn.Module):
    """Row and column stochastic gates around a linear-like module.

    Args:
        inner: the wrapped module (``nn.Linear``, ``Conv1D`` or ``MultiTaskLoraLinear``).
        in_features: its input width (number of column gates).
        out_features: its output width (number of row gates).
        num_tasks: gate vectors per side when ``scope="task"``.
        scope: ``"shared"`` (one gate vector) or ``"task"`` (one per task, routed per row).
        sigma: std of the training noise ``eps``.
        init_mean: mean of theta at init (1.0: gates open, ``z = 1``).
        init_std: std of theta at init.
        gate_rows: gate the outputs.
        gate_cols: gate the inputs.
        sigma_reg: scale of the open probability ``Phi((mu + 0.5) / sigma_reg)``.
        router: the shared task router (needed for ``scope="task"``; taken from a LoRA
            ``inner`` when not given).
        col_group: inputs per column gate (``head_dim`` for head gates; 1 = one per input).
        col_bundles: bundles of column-gate groups that hardening keeps equally wide (the
            KV heads, for head gates: every KV head must keep as many query heads).

    Example:
        >>> layer = GatedLinear(nn.Linear(16, 8), 16, 8)
        >>> y = layer.eval()(torch.randn(2, 5, 16))  # (2, 5, 8)
    """

    def __init__(
        self,
        inner: nn.Module,
        in_features: int,
        out_features: int,
        num_tasks: int = 1,
        scope: str = "shared",
        sigma: float = 0.1,
        init_mean: float = 1.0,
        init_std: float = 0.1,
        gate_rows: bool = True,
        gate_cols: bool = True,
        sigma_reg: float = 0.5,
        router: TaskRouter | None = None,
        col_group: int = 1,
        col_bundles: int = 1,
    ) -> None:
        super().__init__()
        if scope not in _SCOPES:
            raise GateConfigError(f"gate scope {scope!r} is unknown: use one of {_SCOPES}")
        if num_tasks < 1:
            raise GateConfigError(f"gate num_tasks is {num_tasks}: use at least 1")
        if sigma < 0 or sigma_reg <= 0 or init_std < 0:
            raise GateConfigError("gate sigma and init_std must be >= 0 and sigma_reg > 0")
        if not (gate_rows or gate_cols):
            raise GateConfigError("gate_rows and gate_cols are both False: enable at least one")
        if col_group < 1 or in_features % col_group or (in_features // col_group) % max(col_bundles, 1):
            raise GateConfigError(
                f"col_group {col_group} x col_bundles {col_bundles} does not divide the {in_features} inputs: "
                "use the head size and the KV head count of the attention layer"
            )
        if col_group > 1 and not gate_cols:
            raise GateConfigError("col_group > 1 groups the column gates: it needs gate_cols=True")
        self.inner = inner
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.col_group, self.col_bundles = int(col_group), int(col_bundles)
        self.scope = scope
        self.num_tasks = num_tasks if scope == "task" else 1
        self.sigma, self.sigma_reg = float(sigma), float(sigma_reg)
        self.router = router if router is not None else getattr(inner, "router", None)
        dev = next(inner.parameters()).device
        t = self.num_tasks

        def theta(dim: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(t, dim, device=dev) * init_std + init_mean)  # (T, dim)

        self.theta_rows = theta(self.out_features) if gate_rows else None
        self.theta_cols = theta(self.in_features // self.col_group) if gate_cols else None
        # Hard (binary) gates set by ``models.gates.schedule.harden``: once set they replace
        # the stochastic gates in training and eval alike (no noise, no gradient to theta).
        self.register_buffer("hard_rows", None)
        self.register_buffer("hard_cols", None)

    # ------------------------------------------------------------------ gate values
    def _expand(self, side: str, z: torch.Tensor) -> torch.Tensor:
        """Grouped column gates (T, groups) -> one value per input column (T, in)."""
        return z.repeat_interleave(self.col_group, dim=-1) if side == "cols" and self.col_group > 1 else z

    def _gate(self, side: str) -> torch.Tensor:
        """z for every task: (T, dim); noisy in training, deterministic in eval, fixed once hard."""
        hard = getattr(self, f"hard_{side}")
        if hard is not None:
            return self._expand(side, hard)
        mu = torch.tanh(getattr(self, f"theta_{side}"))
        if self.training and self.sigma > 0:
            return self._expand(side, _hard_sigmoid(mu + torch.randn_like(mu) * self.sigma))
        return self._expand(side, _hard_sigmoid(mu))

    @property
    def is_hard(self) -> bool:
        """True once :func:`models.gates.schedule.harden` fixed the gates to a binary mask."""
        return self.hard_rows is not None or self.hard_cols is not None

    @torch.no_grad()
    def eval_gates(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Deterministic gates ``clamp(tanh(theta) + 0.5, 0, 1)`` (or the hard mask): rows (T, out), cols (T, in).

        Grouped column gates come expanded: one value per input column.
        """
        out = []
        for side in ("rows", "cols"):
            theta = getattr(self, f"theta_{side}")
            hard = getattr(self, f"hard_{side}")
            z = None if theta is None else hard.clone() if hard is not None else _hard_sigmoid(torch.tanh(theta))
            out.append(None if z is None else self._expand(side, z))
        return out[0], out[1]

    def open_probability(self) -> torch.Tensor:
        """``Phi((tanh(theta) + 0.5) / sigma_reg)`` of every gate entry, flattened (differentiable)."""
        thetas = [p for p in (self.theta_rows, self.theta_cols) if p is not None]
        mu = torch.cat([p.reshape(-1) for p in thetas]).tanh()
        return 0.5 * (1.0 + torch.erf((mu + 0.5) / (self.sigma_reg * math.sqrt(2.0))))

    def _route(self, z: torch.Tensor, ndim: int) -> torch.Tensor:
        """Pick each row's gate vector: (dim,) or (N, 1, ..., 1, dim) to broadcast on x."""
        if self.num_tasks == 1:
            return z[0]
        router = self.router
        if router is None:
            raise RuntimeError("task-scope gates have no router: create them with inject_gates()")
        if router.single is not None:
            return z[router.single]
        if router.ids is None:
            raise RuntimeError("no task ids set: wrap the forward in `with task_ids(model, ids):`")
        g = z[router.ids]  # (N, dim): one gather for the whole batch
        return g.view(g.shape[0], *([1] * (ndim - 2)), g.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Gates are fp32 parameters; cast to the activations' dtype so a bf16 base keeps bf16
        # activations (fp32 x would then meet a bf16 weight in the inner matmul and fail).
        if self.theta_cols is not None:
            x = x * self._route(self._gate("cols"), x.dim()).to(x.dtype)
        y = self.inner(x)
        if self.theta_rows is not None:
            y = y * self._route(self._gate("rows"), y.dim()).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        sides = "+".join(s for s, p in (("rows", self.theta_rows), ("cols", self.theta_cols)) if p is not None)
        group = f", col_group={self.col_group}, col_bundles={self.col_bundles}" if self.col_group > 1 else ""
        return (
            f"in={self.in_features}, out={self.out_features}, scope={self.scope}, tasks={self.num_tasks}, gates={sides}"
            + group
        )


# --------------------------------------------------------------------------- free functions
def _widths(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, MultiTaskLoraLinear):
        return module.in_features, module.out_features
    try:
        in_f, out_f, _ = linear_dims(module)
    except ValueError:
        raise GateConfigError(
            f"cannot gate a {type(module).__name__}: only nn.Linear, GPT-2 Conv1D and LoRA layers"
        ) from None
    return in_f, out_f


def inject_gates(
    model: nn.Module,
    target_modules: Sequence[str],
    layers: Sequence[int] | None = None,
    scope: str = "shared",
    num_tasks: int = 1,
    sigma: float = 0.1,
    init_mean: float = 1.0,
    init_std: float = 0.1,
    gate_rows: bool = True,
    gate_cols: bool = True,
    sigma_reg: float = 0.5,
) -> list[str]:
    """Wrap every matching linear (or LoRA) layer of ``model`` in a :class:`GatedLinear`.

    Works on plain models and after ``models.lora.inject`` (the gates then wrap the LoRA
    layers). The wrapped base weights are frozen; the gates are trainable. The model's
    :class:`TaskRouter` is created if missing, so ``task_ids(model, ...)`` routes gates too.

    Args:
        model: any ``transformers`` model (or ``nn.Module``); modified in place.
        target_modules: leaf names (``up_proj``) or dotted suffixes (``mlp.c_fc``).
        layers: only gate modules whose path holds one of these block indices.
        scope: ``"shared"`` or ``"task"``.
        num_tasks: task slots for ``scope="task"`` (at least the LoRA layers' slot count).
        sigma, init_mean, init_std, gate_rows, gate_cols, sigma_reg: see :class:`GatedLinear`.

    Returns:
        Names of the gated modules, in model order.

    Example:
        >>> names = inject_gates(model, ["gate_proj", "up_proj"], gate_cols=False)
    """
    router = getattr(model, "_loraflock_router", None) or TaskRouter()
    wanted = None if layers is None else set(layers)
    chosen = []
    for name, module in model.named_modules():
        if isinstance(module, GatedLinear) or ".inner" in name or ".base_layer" in name:
            continue
        if not matches_target(name, target_modules) or (wanted is not None and block_index(name) not in wanted):
            continue
        chosen.append(name)
    if not chosen:
        raise GateConfigError(
            f"gate target_modules {list(target_modules)} match no layer"
            + (f" in layers {sorted(wanted)}" if wanted is not None else "")
            + " (already gated layers are skipped): use names of linear layers, e.g. up_proj or c_fc"
        )
    for name in chosen:
        model.set_submodule(name, wrap_gated(model.get_submodule(name), name, scope, num_tasks, router, sigma=sigma,
                                             init_mean=init_mean, init_std=init_std, gate_rows=gate_rows,
                                             gate_cols=gate_cols, sigma_reg=sigma_reg))
    model._loraflock_router = router  # type: ignore[attr-defined]
    return chosen


def wrap_gated(inner: nn.Module, name: str, scope: str, num_tasks: int, router: TaskRouter, **kw) -> GatedLinear:
    """``inner`` (frozen) in a :class:`GatedLinear`; ``kw`` = its gate settings. Refuses task-scope
    gates with fewer slots than a LoRA ``inner`` has tasks."""
    in_f, out_f = _widths(inner)
    if isinstance(inner, MultiTaskLoraLinear):
        if scope == "task" and num_tasks < inner.num_tasks:
            raise GateConfigError(
                f"{name} has {inner.num_tasks} LoRA slots but gate num_tasks is {num_tasks}: "
                f"use num_tasks={inner.num_tasks}"
            )
        frozen = inner.base_layer.parameters()
    else:
        frozen = inner.parameters()
    for p in frozen:
        p.requires_grad_(False)
    return GatedLinear(inner, in_f, out_f, num_tasks, scope, router=router, **kw)


def gate_layers(model: nn.Module) -> dict[str, GatedLinear]:
    """Name -> gated layer for every :class:`GatedLinear`, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, GatedLinear)}


def remove_gates(model: nn.Module) -> list[str]:
    """Replace every :class:`GatedLinear` by the module it wraps (the ungated model), in place.

    For a stage that must not be gated (e.g. PESC after a gated flock). Returns the names.
    """
    names = list(gate_layers(model))
    for name in names:
        model.set_submodule(name, model.get_submodule(name).inner)
    return names


def gate_params(model: nn.Module) -> list[nn.Parameter]:
    """The trainable gate logits (theta) of every gated layer."""
    out: list[nn.Parameter] = []
    for layer in gate_layers(model).values():
        out += [p for p in (layer.theta_rows, layer.theta_cols) if p is not None]
    return out


def open_probabilities(model: nn.Module) -> torch.Tensor:
    """Open probability of every gate entry of the model, concatenated (differentiable)."""
    layers = gate_layers(model)
    if not layers:
        raise GateConfigError("model has no gates: call inject_gates() first")
    return torch.cat([layer.open_probability() for layer in layers.values()])


def sparsity_penalty(model: nn.Module, target_sparsity: float, lam: float = 50.0) -> torch.Tensor:
    """``lam * (mean open probability - (1 - target_sparsity))^2`` over all gate entries.

    Args:
        model: a model with gates.
        target_sparsity: wanted fraction of closed gates, in [0, 1).
        lam: penalty weight (FineGates uses ~50).

    Example:
        >>> extra = lambda: sparsity_penalty(model, 0.4)   # train_step(..., extra_loss=extra)
    """
    if not 0.0 <= target_sparsity < 1.0:
        raise GateConfigError(f"target_sparsity {target_sparsity} must be in [0, 1): e.g. 0.3")
    keep = 1.0 - target_sparsity
    return lam * (open_probabilities(model).mean() - keep) ** 2


@torch.no_grad()
def sparsity_report(model: nn.Module, task: int | None = None) -> dict:
    """What the eval gates remove from the gated base weights.

    A weight ``W[i, j]`` is removed when row ``i`` or column ``j`` has eval gate 0; with task
    scope a row/column is kept when any task keeps it (one exported base serves all tasks),
    or, with ``task`` given, when that task's slot keeps it (its own exported base).

    Returns:
        ``{"layers": {name: {"rows_kept", "cols_kept", "removed_fraction"}},
        "removed_fraction": removed / total over all gated base weights}``.
    """
    out: dict = {"layers": {}}
    removed = total = 0
    for name, layer in gate_layers(model).items():
        rows, cols = layer.eval_gates()
        if task is not None and layer.num_tasks > 1:
            rows = rows[task : task + 1] if rows is not None else None
            cols = cols[task : task + 1] if cols is not None else None
        n_out, n_in = layer.out_features, layer.in_features
        rows_kept = int((rows > 0).any(dim=0).sum()) if rows is not None else n_out
        cols_kept = int((cols > 0).any(dim=0).sum()) if cols is not None else n_in
        gone = n_out * n_in - rows_kept * cols_kept
        out["layers"][name] = {
            "rows_kept": rows_kept,
            "cols_kept": cols_kept,
            "removed_fraction": gone / (n_out * n_in),
        }
        removed += gone
        total += n_out * n_in
    out["removed_fraction"] = removed / total if total else 0.0
    return out
