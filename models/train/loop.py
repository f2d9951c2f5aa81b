"""The flock's per-worker training loop: plain PyTorch, optional torch.distributed.

One call trains one *method* of the comparison on the tasks this process owns, all on the
same frozen base, batched:

* ``hierarchical``: theta_d = Theta + delta_d, both train, prior (tau/2)||delta_d||^2;
* ``independent``: deltas only (tau = 0);
* ``unified``: Theta only (tau -> inf, one adapter for all tasks).

Every method starts from the same adapter weights and sees the same batches (the sampler is
seeded by the job), so their perplexities compare like for like. Across Ray workers the
shared Theta's gradient is all-reduced (DDP over Theta only) and the deltas stay local; the
loss of each worker is its share of one global sum, so one worker and many give the same
joint MAP up to float rounding. Ray is touched only by the caller (``report`` hooks).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from models.lora import adapter_params, lora_layers, set_trainable
from models.train.checks import StepChecks
from models.train.data import FlockData, draw_batch, make_batch
from models.train.hooks import Prior, TrainHooks
from models.train.lazy import LazyRowAdamW
from models.train.results import MethodResult
from models.train.state import load_train_state, save_train_state
from models.train.step import BatchSampler, evaluate, train_step

__all__ = ["FlockData", "MethodConfig", "train_method", "make_batch", "grad_reducer", "average_shared",
           "uses_lazy_step", "LAZY_ABOVE"]


@dataclass
class MethodConfig:
    """One method's settings, in plain numbers (the orchestrator builds it from the job's
    ``train:`` section with ``orchestrator.flock.methods.method_config``)."""

    name: str
    kind: str  # hierarchical | independent | unified | pesc | coeff
    steps: int
    batch_size: int
    lr: float
    seed: int
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    temperature: float = 0.5
    eval_batch_size: int = 8
    log_every: int = 10
    sync_every: int = 1
    eval_every: int = 0  # evaluate every N steps during training (0 = only at the end)
    eval_rows: int | None = None  # periodic evaluations use each task's first N eval rows (None = all)
    # How the task offsets step (hierarchical / independent kinds): "dense" = AdamW over every
    # task's rows every step (the literal joint MAP; cost grows with T), "lazy" = only the
    # batch's rows, idle rows caught up in closed form (models/train/lazy.py), "auto" = lazy
    # once this worker owns more than LAZY_ABOVE tasks.
    prior_update: str = "auto"


# "auto" switches to the lazy step above this many owned tasks: below it the dense step's
# idle-row work is small (measured in benchmarks/step_scaling.py) and it stays the exact
# joint MAP; above it the lazy step keeps the step's cost flat.
LAZY_ABOVE = 64


def uses_lazy_step(cfg: MethodConfig, num_tasks: int) -> bool:
    """Whether ``cfg`` trains ``num_tasks`` task offsets with the lazy (row-sparse) step."""
    if cfg.prior_update not in ("dense", "lazy", "auto"):
        raise ValueError(f"prior_update must be dense, lazy or auto, got {cfg.prior_update!r}")
    if cfg.kind not in ("hierarchical", "independent"):
        return False
    return cfg.prior_update == "lazy" or (cfg.prior_update == "auto" and num_tasks > LAZY_ABOVE)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sum_sq(params: Sequence[nn.Parameter], device: torch.device) -> torch.Tensor:
    """sum of ||grad||^2 over ``params`` as a float64 scalar on ``device`` (no host sync)."""
    if not params:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack([p.grad.pow(2).sum() for p in params]).double().sum()


def grad_reducer(shared: Sequence[nn.Parameter], sync: bool) -> Callable[[Sequence[nn.Parameter]], torch.Tensor]:
    """All-reduce Theta's gradient (sum of every worker's share) and the squared grad norm.

    Returns the squared global norm so that gradient clipping is identical on all workers.
    Every tensor it reduces lives on the gradients' device (NCCL reduces only GPU tensors),
    and the norm stays there (a float64 scalar): clipping reads nothing back.
    """
    shared_ids = {id(p) for p in shared}

    def reduce(params: Sequence[nn.Parameter]) -> torch.Tensor | float:
        sh = [p for p in params if id(p) in shared_ids and p.grad is not None]
        local = [p for p in params if id(p) not in shared_ids and p.grad is not None]
        if not sh and not local:
            return 0.0
        device = (sh or local)[0].grad.device
        sq_local = _sum_sq(local, device)
        if _distributed():
            if sync and sh:
                flat = torch.cat([p.grad.reshape(-1) for p in sh])
                dist.all_reduce(flat)
                off = 0
                for p in sh:
                    n = p.grad.numel()
                    p.grad.copy_(flat[off : off + n].view_as(p.grad))
                    off += n
            sq_local = sq_local.reshape(1)  # (1,), not 0-dim: a shape every backend reduces
            dist.all_reduce(sq_local)
        return sq_local.sum() + _sum_sq(sh, device)

    return reduce


@torch.no_grad()
def average_shared(shared: Sequence[nn.Parameter]) -> None:
    """Local-steps mode (``sync_every > 1``): average Theta across workers."""
    if not _distributed():
        return
    flat = torch.cat([p.reshape(-1) for p in shared])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    off = 0
    for p in shared:
        p.copy_(flat[off : off + p.numel()].view_as(p))
        off += p.numel()


def train_method(
    model: nn.Module,
    data: FlockData,
    cfg: MethodConfig,
    init_state: dict[str, torch.Tensor],
    prior: Prior | None = None,
    log: Callable[[str], None] = print,
    device: torch.device | str = "cpu",
    trainable: Sequence[nn.Parameter] | None = None,
    hooks: TrainHooks | None = None,
    state_dir: Path | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[int], None] | None = None,
) -> MethodResult:
    """Train one method from ``init_state`` and evaluate it on the owned tasks.

    Args:
        model: base with injected multi-task LoRA (one slot per owned task).
        data: the worker's tasks.
        cfg: method settings.
        init_state: adapter parameters to start from (``{name: tensor}``), shared by methods.
        prior: a ``models.prior.HierarchicalPrior`` for ``hierarchical`` (its ``penalty`` is
            added to the loss; with ``mode='infer'`` its tau is updated every
            ``prior_update_every`` steps from all-reduced statistics).
        log: progress printer.
        trainable: for other kinds (``pesc``): exactly these parameters train (Theta among
            them is synchronised across workers like the unified adapter's).
        hooks: the caller's extra loss, per-step and evaluation callbacks and parameters
            with their own learning rate (:class:`models.train.hooks.TrainHooks`).
        state_dir: where mid-training state lives; if it holds state, training resumes from
            it (parameters, optimizer moments, sampler RNG, prior, curve).
        checkpoint_every: write that state every N steps (0 = never) and then call
            ``on_checkpoint(step)`` (the Ray worker reports a checkpoint there).

    Returns:
        :class:`models.train.results.MethodResult` (task slots as keys).
    """
    hooks = hooks or TrainHooks()
    device = torch.device(device)
    with torch.no_grad():
        named = dict(model.named_parameters())
        for k, v in init_state.items():
            named[k].copy_(v)
    kind = cfg.kind
    set_trainable(model, shared=kind in ("hierarchical", "unified"), task=kind in ("hierarchical", "independent"))
    if trainable is not None:
        for p in trainable:
            p.requires_grad_(True)
        params = list(trainable)
    else:
        params = [p for p in adapter_params(model) if p.requires_grad]
    ids = {id(p) for p in params}
    # Replicated parameters (Theta, MoE experts): gradients are all-reduced across workers.
    shared = [p for p in adapter_params(model, "shared") if id(p) in ids]
    if trainable is not None:
        task_ids_ = {id(p) for p in adapter_params(model, "task")}
        shared = [p for p in params if id(p) not in task_ids_]
    groups = [{"params": params}]
    more = hooks.extra_params
    extra_params = [p for p in more.params if id(p) not in ids] if more is not None else []
    if extra_params:
        for p in extra_params:
            p.requires_grad_(True)
        groups.append({"params": extra_params, "lr": more.lr or cfg.lr, "weight_decay": 0.0})
        if not more.local:
            shared = shared + extra_params
        params = params + extra_params
        ids |= {id(p) for p in extra_params}
    use_prior = kind == "hierarchical" and prior is not None
    coll_device = params[0].device if params else device  # every collective's tensors live here (NCCL)
    lazy: LazyRowAdamW | None = None
    if trainable is None and uses_lazy_step(cfg, len(data.owned)):
        rows = {id(p) for p in adapter_params(model, "task")}
        dense = [{**g, "params": [p for p in g["params"] if id(p) not in rows]} for g in groups]
        lazy = LazyRowAdamW(dense, lora_layers(model), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            prior=prior if use_prior else None)
        step_params = [p for p in params if id(p) not in rows]  # + the staged rows, each step
    opt = lazy or torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = BatchSampler(data.sizes, cfg.batch_size, cfg.seed, cfg.temperature)
    reducer = grad_reducer(shared, sync=cfg.sync_every == 1)
    terms = [f for f in (prior.penalty if use_prior else None, hooks.extra_loss) if f is not None]
    extra = (lambda: sum(f() for f in terms)) if terms else None
    curve: list[tuple[int, float]] = []
    eval_curve: list[tuple[int, dict[int, float]]] = []
    t0 = time.perf_counter()
    tokens, start = 0, 1
    ids_named = {n: p for n, p in model.named_parameters() if id(p) in ids}
    if state_dir is not None:
        meta = load_train_state(state_dir, ids_named, opt)
        if meta is not None:
            start, curve = meta["step"] + 1, [tuple(c) for c in meta["curve"]]
            eval_curve = [(int(st), {int(k): v for k, v in nll.items()}) for st, nll in meta.get("eval_curve", [])]
            sampler.set_state(meta["sampler"])
            if lazy is not None:  # the loaded moments are those of a flushed state at meta["step"]
                lazy.t = lazy.last[:] = meta["step"]
                lazy.clip = [1.0] * (meta["step"] + 1)
            if use_prior and meta.get("prior"):
                prior.load_state_dict(meta["prior"])
            log(f"[{cfg.name}] resumed at step {start} from {state_dir}")
    failed: dict[int, str] = {}  # global task -> why it was stopped
    # Host syncs: the step reads nothing back (train_step with num_slots). What it measured stays
    # on the device until a read point (log_every, an evaluation, a checkpoint, a tau update,
    # the first and the last step): the non-finite flags, the per-task training NLL and whether
    # a step's gradient was dropped. A task whose loss turns NaN/inf is therefore stopped at the
    # next read point, not at the next step; until then its batches' gradients are zeroed on
    # the device (NaN-safe), so nothing it touched is poisoned. The lazy step still reads the
    # gradient norm every step (its closed-form catch-up needs the clip factors on the host).
    n_slots = max([len(data.owned)] + [layer.lora_A.shape[0] for layer in lora_layers(model).values()])
    checks = StepChecks(n_slots, coll_device, lazy is not None)

    def read_point(step: int) -> None:
        new = _sync_failures({data.owned[s] for s in checks.read(model, step)} - set(failed), len(data.sizes),
                             coll_device)
        if new:
            _stop_tasks(model, opt, data, sampler, new, failed, step, log)

    for step in range(start, cfg.steps + 1):
        if step == start:  # a diverged task in the initial (or resumed) state: stopped before any batch
            read_point(step)
        if hooks.on_step is not None:
            hooks.on_step(step)
        batch, slots = draw_batch(data, sampler, device)
        step_list = params
        if lazy is not None:  # only the batch's rows: see models/train/lazy.py
            checks.touch(slots)
            step_list = step_params + lazy.stage(slots)
        # Dense: parameters absent from this batch still get (zero or prior) gradients, as in
        # the single-process joint objective, so Adam treats them identically on every worker.
        res = train_step(model, batch, opt, step_list, extra_loss=extra, max_grad_norm=cfg.max_grad_norm,
                         reduce_grads=reducer, skip_nonfinite=True, num_slots=n_slots,
                         tasks=slots)
        if lazy is not None:
            norm = res.grad_norm  # the lazy path's one read a step
            clipped = cfg.max_grad_norm is not None and norm > cfg.max_grad_norm
            lazy.note_clip(cfg.max_grad_norm / (norm + 1e-6) if clipped else 1.0)
        checks.add(res)
        if cfg.sync_every > 1 and step % cfg.sync_every == 0:
            average_shared(shared)
        tokens += batch.input_ids.numel()
        logging = step % cfg.log_every == 0 or step == cfg.steps
        evaluating = bool(cfg.eval_every) and step % cfg.eval_every == 0 and step < cfg.steps
        saving = state_dir is not None and bool(checkpoint_every) and step % checkpoint_every == 0 and step < cfg.steps
        if logging or evaluating or saving or (use_prior and prior.due(step)):
            read_point(step)
        if use_prior and prior.due(step):
            if lazy is not None:
                lazy.flush()  # every row current under the old tau before the statistics
            _update_tau(prior, step, coll_device)
        if state_dir is not None and checkpoint_every and step % checkpoint_every == 0 and step < cfg.steps:
            if lazy is not None:
                lazy.flush()
            meta = {"step": step, "curve": curve, "sampler": sampler.state(),
                    "prior": prior.state_dict() if use_prior else None,
                    **({"eval_curve": eval_curve} if cfg.eval_every else {})}
            save_train_state(state_dir, ids_named, opt, meta)
            if on_checkpoint is not None:
                on_checkpoint(step)
        if step % cfg.log_every == 0 or step == cfg.steps:
            el = time.perf_counter() - t0
            eta = el / max(step - start + 1, 1) * (cfg.steps - step)
            curve.append((step, res.nll))
            window = checks.window()  # slot -> mean of its per-step training NLL since the last log
            if hooks.on_log is not None:
                hooks.on_log(step, res.nll, window)
            log(
                f"[{cfg.name}] step {step}/{cfg.steps}  loss {res.nll:.4f}  "
                f"tok/s {tokens / el:,.0f}  elapsed {el:,.0f}s  eta {eta:,.0f}s"
            )
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            if lazy is not None:
                lazy.flush()
            nll = _evaluate_owned(model, data, cfg, failed, cfg.eval_rows)
            eval_curve.append((step, nll))
            if hooks.on_eval is not None:
                hooks.on_eval(step, nll)
    if lazy is not None:
        lazy.flush()  # the adapters as the dense step would leave them (see models/train/lazy.py)
    seconds = time.perf_counter() - t0
    if hooks.before_eval is not None:
        hooks.before_eval()
    slot_of = {g: s for s, g in enumerate(data.owned)}
    nll = _evaluate_owned(model, data, cfg, failed)
    out: MethodResult = {
        "eval_nll": nll,
        "curve": curve,
        "seconds": seconds,
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "failed": {slot_of[g]: why for g, why in failed.items() if g in slot_of},
    }
    if cfg.eval_every:
        out["eval_curve"] = eval_curve
    if use_prior:
        out["tau"] = {g: float(t) for g, t in prior.tau.items()}
        out["tau_history"] = list(prior.history)
    return out


def _evaluate_owned(model: nn.Module, data: FlockData, cfg: MethodConfig, failed: dict[int, str],
                    rows: int | None = None) -> dict[int, float]:
    """Eval NLL of every owned task still training (the first ``rows`` eval rows of each, or all)."""
    keep = {s: x[:rows] if rows else x for s, x in data.eval.items() if data.owned[s] not in failed}
    pre = {s: x[:rows] if rows else x for s, x in data.eval_prefix.items() if s in keep} if data.eval_prefix else None
    masks = None
    if data.eval_mask is not None:
        masks = {s: None if m is None else (m[:rows] if rows else m) for s, m in data.eval_mask.items() if s in keep}
    return evaluate(model, keep, cfg.eval_batch_size, pre, data.split, masks=masks, prefix_fn=data.eval_prefix_fn())


def _sync_failures(local: set[int], n_tasks: int, device: torch.device) -> set[int]:
    """Union of every worker's newly failed tasks (all workers must sample alike).

    ``device``: the gradients' device, where the flags are reduced (NCCL needs GPU tensors).
    """
    if not _distributed():
        return local
    flags = torch.zeros(n_tasks, device=device)
    flags[sorted(local)] = 1.0
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return set(torch.nonzero(flags).flatten().tolist())


@torch.no_grad()
def _stop_tasks(
    model, opt, data: FlockData, sampler: BatchSampler, tasks: set[int], failed: dict, step: int, log
) -> None:
    """Stop training ``tasks`` whose loss diverged; every other task trains on unharmed.

    Their offsets (and Adam moments) are zeroed so the prior and the shared Theta never see
    NaN again, and the sampler stops drawing their rows.
    """
    if any(not torch.isfinite(p).all() for p in adapter_params(model, "shared")):
        raise FloatingPointError(
            f"step {step}: the shared adapter became NaN/inf: training diverged for every task; lower train.lr "
            "or train.max_grad_norm"
        )
    slot_of = {g: s for s, g in enumerate(data.owned)}
    slots = [slot_of[g] for g in tasks if g in slot_of]
    for layer in lora_layers(model).values():
        for p in (layer.lora_A, layer.lora_B):
            p[slots] = 0.0
            for v in opt.state.get(p, {}).values():
                if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == p.shape[0]:
                    v[slots] = 0.0
    for g in tasks:
        failed[g] = f"loss became NaN/inf at step {step}: task stopped (lower train.lr for it, or check its data)"
        log(f"task {g}: {failed[g]}; the other tasks continue")
    if len(failed) == len(data.sizes):
        raise FloatingPointError(f"step {step}: the loss diverged for every task; lower train.lr")
    sampler.exclude(sorted(tasks))


def _update_tau(prior: Prior, step: int, device: torch.device) -> None:
    """Empirical-Bayes tau update from statistics summed over all workers (reduced on ``device``)."""
    packed = prior.stats_tensor().to(device)  # (groups, 2): sum ||delta||^2 and count, this worker's tasks
    if _distributed():
        dist.all_reduce(packed)
    prior.update_tau(packed, step=step)
