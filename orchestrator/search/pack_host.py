"""Trial packing (the PLoRA idea): one long-lived host per node trains many Tune trials at once.

Unpacked, every search trial loads the base, injects its adapters and trains alone. Packed,
a :class:`PackHost` holds the base and the frozen-prefix activations ONCE, and every trial
that shares its base setting leases a *slot group* on it: T adapter slots (one per task) and
its own shared Theta (:mod:`models.grouped_lora`). The host fuses the steps of all trials
that are training at that moment into one forward/backward over the concatenated batches:

* the frozen base (top blocks + the 49k-vocabulary head, the bulk of the FLOPs) runs once
  per fused step on bigger matrices instead of once per trial;
* each trial keeps exactly its own objective: its rows and weights, its prior penalty at its
  tau (on its own deltas), its gradient clipping and its own AdamW (learning rate, moments,
  step count) over views of its rows. Trials' parameters are disjoint rows, so the summed
  loss gives every trial the gradient it would get alone; packed and unpacked trials with
  the same seed agree to float rounding (tested).

What packs: every ungated trial (``target_sparsity == 0``), any ``tau`` (fixed) and ``lr``.
A host serves one *base setting*: the unquantised base (``bits: 16``; any ``rank`` up to its
``max_rank``, masked per slot), or one quantised base (``bits``, ``quantizer``, LQ iterations
and ``rank``: LQ-LoRA's ``Q = quant(W - L1 L2^T)`` depends on the rank, so the quantisation is
run once per host, exactly as the unpacked trial runs it, instead of once per trial). Gated
trials (FineGates: trainable per-trial gates on the base weights) run unpacked, as before.

With a task ``search.metric`` the host judges a lease at each of its reports
(:meth:`PackHost.judge`): the driver's judge plan (seeded rows, prompts, references) comes once
with the payload and the host loads the job's tokenizer once, so trials copy no rows.

:class:`PackHost` is plain PyTorch; :class:`orchestrator.search.pack_actor.PackHostActor` wraps
it for Ray (a threaded actor: each trial's blocking call joins the next fused step or judging
pass). The host sits here rather than
in ``models/`` because it is built from the search's payload and the job spec (orchestrator
types) and serves only this stage; its pieces that are model code (slot groups, the batch,
the step's loss) come from :mod:`models.grouped_lora` and :mod:`models.train`.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.base import top_block_indices
from models.grouped_lora import PARTS, GroupedLoraLinear, group_slots, initial_adapter_state, slot_index
from models.lora import inject
from models.precision import cast_frozen
from models.train.data import FlockData, make_batch
from models.train.step import Batch, BatchSampler, NonFiniteLossError, evaluate, row_nll
from orchestrator.base.load import load_job_base, run_dtype
from orchestrator.search.pack_settings import base_setting
from orchestrator.spec import JobSpec

__all__ = ["PackHost"]

@dataclass
class _Lease:
    """One trial's slot group and its private optimiser state."""

    group: int
    slots: range
    rank: int
    tau: float
    lr: float
    kind: str  # hierarchical | independent
    sampler: BatchSampler
    views: dict[str, torch.Tensor]  # unpacked parameter name -> view into the host's tensors
    index: dict[str, tuple]  # unpacked parameter name -> its index in the host's tensor
    trained: list[str]  # names that train (independent: deltas only)
    opt: torch.optim.Optimizer
    steps: int = 0
    last_nll: float = float("nan")
    error: str | None = None


def _fused_scored(batches: list[Batch]) -> torch.Tensor | None:
    """The trials' scored-token masks side by side (a full-row mask where a batch has none)."""
    if all(b.scored is None for b in batches):
        return None
    parts = []
    for b in batches:
        if b.scored is None:
            full = torch.ones_like(b.input_ids, dtype=torch.bool)
            full[:, 0] = False
            parts.append(full)
        else:
            parts.append(b.scored)
    return torch.cat(parts)


class PackHost:
    """A base, its prefix cache and ``capacity`` slot groups of ``num_tasks`` slots each.

    Args:
        payload: the search payload (``orchestrator.search.trial.build_payload``): job spec,
            task sizes, token ids and the prefix activations.
        capacity: slot groups (trials at once).
        max_rank: slots are allocated at this rank; a trial of lower rank is masked.
        device: torch device.
    """

    def __init__(
        self, payload: dict, capacity: int, max_rank: int, device: str = "cpu", setting: dict | None = None
    ) -> None:
        self.spec = JobSpec.model_validate(payload["spec"])
        spec = self.spec
        self.setting = dict(setting or {"bits": 16})
        quantised = int(self.setting["bits"]) < 16
        if quantised:  # LQ-LoRA's Q depends on the rank: one rank per quantised host
            max_rank = int(self.setting["rank"])
        self.device, self.capacity, self.max_rank = device, int(capacity), int(max_rank)
        self.num_tasks = len(payload["names"])
        run = run_dtype(spec, device)  # bf16 on a GPU (auto); a quantised host quantises fp32 weights first
        self.model = load_job_base(spec, device, "float32" if quantised else run)
        from orchestrator.search.sizes import deployed_bytes  # the trial's own sizes
        from orchestrator.search.trial import mask_tensors  # and masks

        layers = top_block_indices(self.model, spec.lora.top_layers)
        torch.manual_seed(spec.train.seed)  # the trial's Theta_A draws (LQ keeps them where L = 0)
        inject(self.model, spec.lora.target_modules, num_tasks=self.capacity * self.num_tasks, rank=self.max_rank,
               alpha=spec.lora.alpha, dropout=spec.lora.dropout, layers=layers)
        self.theta_init: dict[str, torch.Tensor] = {}  # LQ-initialised Theta (quantised hosts)
        self.quant: dict | None = None
        if quantised:  # exactly build_trial_model's quantisation, once for every trial of this setting
            from models.quant.model import quantize_model

            q = quantize_model(
                self.model,
                "all-linear",
                bits=int(self.setting["bits"]),
                layers=layers,
                quantizer=str(self.setting["quantizer"]),
                iters=int(self.setting["lq_iters"]),
                cache_weight=True,
            )
            self.quant = {k: v for k, v in q.as_dict().items() if k != "matrices"}
            if run != "float32":
                cast_frozen(self.model, getattr(torch, run))
            from models.lora import lora_layers

            for name, layer in lora_layers(self.model).items():
                self.theta_init[f"{name}.lora_A_shared"] = layer.lora_A_shared.detach().clone()
                self.theta_init[f"{name}.lora_B_shared"] = layer.lora_B_shared.detach().clone()
        # deployed_bytes of a trial: the base part is the host's (ungated: shapes and packed
        # bytes only); the adapter part is the trial's own rank (see deployed_bytes below).
        size = deployed_bytes(self.model)
        self.base_bytes, self.compressed_bytes = size["base_bytes"], size["compressed_bytes"]
        self.layers: dict[str, GroupedLoraLinear] = group_slots(self.model, self.capacity)
        for layer in self.layers.values():
            for p in (layer.lora_A_shared, layer.lora_B_shared, layer.lora_A, layer.lora_B):
                p.requires_grad_(True)
        self.params = [p for layer in self.layers.values()
                       for p in (layer.lora_A_shared, layer.lora_B_shared, layer.lora_A, layer.lora_B)]
        split = int(payload["split"])
        pre = "train_prefix" in payload
        t = lambda arrays: {s: torch.from_numpy(np.array(a)).to(device) for s, a in enumerate(arrays)}  # noqa: E731
        self.data = FlockData(
            list(payload["sizes"]),
            list(range(self.num_tasks)),
            t(payload["train"]),
            t(payload["eval"]),
            t(payload["train_prefix"]) if pre else None,
            t(payload["eval_prefix"]) if pre else None,
            split,
            mask_tensors(payload.get("train_mask"), device),
            mask_tensors(payload.get("eval_mask"), device),
        )
        self.total_size = float(sum(self.data.sizes))
        # search.metric beyond ppl: the driver's plan (orchestrator/search/judge.py), once per host, not per trial
        self.judged: dict | None = payload.get("judge")
        self.tokenizer = None
        if self.judged is not None:
            from orchestrator.task_metrics import job_tokenizer

            self.tokenizer = job_tokenizer(spec)
        self.leases: dict[str, _Lease] = {}
        self.free = list(range(self.capacity))

    def accepts(self, config: dict) -> bool:
        """Whether a trial's config needs exactly this host's base (bits, quantizer, LQ rank)."""
        fixed = config.get("_search", {})
        need = base_setting(config, fixed.get("quantizer", "nf"), int(fixed.get("lq_iters", 2)), self.max_rank)
        return need == self.setting

    # ------------------------------------------------------------------ leases
    def lease(self, config: dict, seed: int, state: dict[str, torch.Tensor] | None = None) -> str:
        """Give a trial a slot group, initialised like the unpacked trial (then ``state``).

        Args:
            config: the trial's sampled config (rank, tau, lr).
            seed: the sampler seed (``train.seed + steps already done``, as unpacked).
            state: trained parameters from the trial's checkpoint (unpacked names).

        Returns:
            The lease id.
        """
        if not self.accepts(config):
            raise ValueError(
                f"trial config {config} does not fit this host's base {self.setting} (max rank {self.max_rank})"
            )
        if not self.free:
            raise RuntimeError(f"all {self.capacity} slot groups are leased: raise the host capacity")
        spec, tr = self.spec, self.spec.train
        rank = int(config.get("rank", spec.lora.rank))
        tau = float(config.get("tau", spec.flock.tau if spec.flock.tau != "infer" else 100.0))
        kind = "independent" if tau == 0 else "hierarchical"
        g = self.free.pop(0)
        slots = range(g * self.num_tasks, (g + 1) * self.num_tasks)
        init = initial_adapter_state(self.layers, rank, self.num_tasks, spec.train.seed)
        init.update(self.theta_init)
        if state:
            init.update({k: torch.as_tensor(v) for k, v in state.items()})
        views: dict[str, torch.Tensor] = {}
        index: dict[str, tuple] = {}
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.set_slots(slots, g, rank)
                layer.lora_A_shared[g].zero_()
                layer.lora_B_shared[g].zero_()
                layer.lora_A[slots.start : slots.stop].zero_()
                layer.lora_B[slots.start : slots.stop].zero_()
                for part in PARTS:
                    key = f"{name}.{part}"
                    index[key] = slot_index(part, slots, g, rank)
                    view = getattr(layer, part).detach()[index[key]]  # a leaf view: AdamW updates it in place
                    view.copy_(init[key])
                    views[key] = view
        trained = [n for n in views if kind == "hierarchical" or not n.endswith("_shared")]
        opt = torch.optim.AdamW(
            [views[n] for n in trained], lr=float(config.get("lr", tr.lr)), weight_decay=tr.weight_decay
        )
        lid = uuid.uuid4().hex[:12]
        self.leases[lid] = _Lease(
            g,
            slots,
            rank,
            tau,
            float(config.get("lr", tr.lr)),
            kind,
            BatchSampler(self.data.sizes, tr.batch_size, seed, tr.temperature),
            views,
            index,
            trained,
            opt,
        )
        return lid

    def release(self, lid: str) -> None:
        """Free a trial's slot group (ASHA stopped it, it finished, or it failed)."""
        lease = self.leases.pop(lid, None)
        if lease is not None:
            self.free.append(lease.group)
            self.free.sort()

    # ------------------------------------------------------------------ the fused step
    def step(self, lids: list[str]) -> None:
        """One training step of every listed trial, fused into one forward/backward.

        A trial whose loss is not finite gets ``error`` set and no update; the others step.
        """
        leases = [self.leases[lid] for lid in lids]
        batches = [make_batch(self.data, lease.sampler, torch.device(self.device)) for lease in leases]
        ids = torch.cat([b.task_ids + lease.slots.start for b, lease in zip(batches, leases)])
        pre = torch.cat([b.prefix for b in batches]) if batches[0].prefix is not None else None
        fused = Batch(torch.cat([b.input_ids for b in batches]), ids, torch.cat([b.weights for b in batches]),
                      pre, self.data.split, _fused_scored(batches))
        self.model.train()
        for p in self.params:
            p.grad = None
        nll_rows = row_nll(self.model, fused)  # (sum of the trials' rows,)
        coef = torch.zeros(len(next(iter(self.layers.values())).lora_A), device=nll_rows.device)  # prior per slot
        loss = torch.zeros((), device=nll_rows.device)
        live = []
        off = 0
        for b, lease in zip(batches, leases):
            n = len(b.input_ids)
            nll = (b.weights * nll_rows[off : off + n]).sum()
            off += n
            if not torch.isfinite(nll):
                lease.error = str(NonFiniteLossError(sorted(set(b.task_ids.tolist())), float(nll)))
                continue
            lease.last_nll = float(nll.detach())
            loss = loss + nll
            if lease.kind == "hierarchical":
                coef[lease.slots.start : lease.slots.stop] = lease.tau / (2.0 * self.total_size)
            live.append(lease)
        if coef.any():  # sum_layers sum_slots c_t ||delta_t||^2 (active components): each trial's prior
            for layer in self.layers.values():
                per_rank = layer.lora_A.float().square().sum(-1) + layer.lora_B.float().square().sum(-2)  # (S, r)
                loss = loss + (per_rank * layer.rank_mask * coef[:, None]).sum()
        if loss.requires_grad:
            loss.backward()
        max_norm = self.spec.train.max_grad_norm
        for lease in live:
            grads = []
            for name in lease.trained:
                p, view = self._parent(name), lease.views[name]
                view.grad = p.grad[lease.index[name]] if p.grad is not None else torch.zeros_like(view)
                grads.append(view.grad)
            sq = float(torch.stack([g.pow(2).sum() for g in grads]).sum())
            norm = math.sqrt(sq)
            if max_norm is not None and norm > max_norm:
                for g in grads:
                    g.mul_(max_norm / (norm + 1e-6))
            lease.opt.step()
            lease.steps += 1

    def _parent(self, name: str) -> nn.Parameter:
        layer, _, part = name.rpartition(".")
        return getattr(self.layers[layer], part)

    # ------------------------------------------------------------------ measurements
    @torch.no_grad()
    def evaluate(self, lid: str, subset: int | None = None) -> dict[int, float]:
        """Mean eval NLL of each task of a trial (the first ``subset`` sequences, or all)."""
        lease = self.leases[lid]
        cut = lambda d: None if d is None else {s: x[:subset] if subset else x for s, x in d.items()}  # noqa: E731
        return evaluate(self.model, cut(self.data.eval), self.spec.train.eval_batch_size, cut(self.data.eval_prefix),
                        self.data.split, slot_of=lambda t: lease.slots.start + t, masks=cut(self.data.eval_mask))

    def judge(self, lids: list[str]) -> dict[str, dict[str, float]]:
        """Each listed trial's ``macro_<metric>`` and ``judge_s``, judged through its slot group, in one pass.

        The unpacked trial's :func:`~orchestrator.search.judge.judge_trial` on the same plan (the
        same seeded rows, all of a trial's tasks mixed), with each lease's slots in place of
        slots ``0 .. T-1``; the trials' rows share the generation batches
        (:func:`~orchestrator.search.judge.judge_trials`). ``{}`` per trial for ``search.metric: ppl``.
        """
        if self.judged is None:
            return {lid: {} for lid in lids}
        from orchestrator.search.judge import judge_trials

        starts = [self.leases[lid].slots.start for lid in lids]
        return dict(zip(lids, judge_trials(self.model, self.judged, self.tokenizer, starts)))

    @torch.no_grad()
    def state(self, lid: str) -> dict[str, torch.Tensor]:
        """The trial's trained parameters under the unpacked trial's names and shapes (checkpoints)."""
        lease = self.leases[lid]
        return {n: lease.views[n].contiguous().clone() for n in lease.trained}

    def deployed_bytes(self, lid: str) -> dict:
        """``search_trial.deployed_bytes`` of the unpacked trial (unquantised, ungated: shapes only)."""
        lease = self.leases[lid]
        adapters = sum(2 * lease.rank * (l.in_features + l.out_features) * self.num_tasks for l in self.layers.values())
        return {
            "model_bytes": int(self.base_bytes + self.compressed_bytes + adapters),
            "base_bytes": int(self.base_bytes),
            "compressed_bytes": int(self.compressed_bytes),
            "adapter_bytes": int(adapters),
            "mask_bytes": 0,
        }
