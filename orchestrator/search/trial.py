"""One Tune trial of the compression search: a compressed single-process flock, measured.

The trial is plain PyTorch; Ray is touched only through ``ray.tune.report`` and
``ray.tune.get_checkpoint``. With the trial's ``config`` (rank, target_sparsity, bits,
quantizer, tau, lr) it

1. loads the base and injects multi-task LoRA (one slot per task) on the top
   ``lora.top_layers`` blocks, exactly like a flock worker;
2. ``bits < 16``: quantises every linear layer of those blocks with LQ-LoRA
   (``models.quant.model.quantize_model``: W ~ Q + L1 L2^T, the low-rank part starting the shared
   adapter Theta); ``target_sparsity > 0``: wraps the LoRA layers in FineGates
   (``models.gates.layer``, shared scope: one pruned base serves every task) trained with
   ``gate_lambda * (mean P_open - (1 - target))^2`` on the schedule of
   ``models.gates.schedule`` (importance init from a few training batches, penalty warm-up,
   noise annealing, binary gates with exactly ``target`` closed after 3/4 of the steps; the
   gate step size is at least ``GateSchedule.auto_gate_lr()``);
3. trains with :func:`models.train.loop.train_method` (the one training loop; the
   hierarchical prior at the trial's tau, or independent adapters at tau = 0).

Only the top blocks are touched, so the activations entering them, computed once from the
unquantised lower blocks (the payload's ``train_prefix``/``eval_prefix``), stay exact for
every trial. Every ``eval_every`` steps the trial reports ``macro_ppl`` on the first
``eval_subset`` eval sequences of each task (the scheduler's signal) with a checkpoint; the final
report (``final: True``) is on the whole eval set. With a task ``search.metric`` every report
also holds ``macro_<metric>``, judged on the same seeded ``search.metric_rows`` rows of each
task every time (:mod:`orchestrator.search.judge`).

Deployed size (:func:`orchestrator.search.sizes.deployed_bytes`): the model one would ship, in bytes.

Every report also carries ``target_bytes`` (the same count with ``1 - target_sparsity`` of
each gated matrix's rows and columns kept: where the gates are headed) and ``rung_bytes =
min(model_bytes, target_bytes)``, the size the scheduler compares at its rungs.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.base import top_block_indices
from models.gates.layer import gate_params, sparsity_report
from models.lora import adapter_params, inject, set_trainable
from models.precision import cast_frozen
from models.prefix import compute_prefix
from models.quant.model import quantize_model
from models.train.hooks import ExtraParams, TrainHooks
from models.train.loop import FlockData, train_method
from models.train.perplexity import macro_perplexity
from models.train.step import evaluate, seed_everything
from orchestrator.base.load import load_job_base, run_dtype
from orchestrator.console import say
from orchestrator.contracts import TrialMetrics
from orchestrator.errors import StageError
from orchestrator.flock.gating import inject_spec_gates
from orchestrator.flock.methods import method_config
from orchestrator.search.frozen_base import frozen_bytes, frozen_key, load_embedding, top_allocation
from orchestrator.search.sizes import deployed_bytes
from orchestrator.spec import JobSpec

__all__ = [
    "build_payload", "build_trial_model", "deployed_bytes", "run_trial", "search_trial", "trial_state",
    "upgrade_trial_state", "mask_tensors", "trial_device", "trial_bits", "STATE_FILE", "META_FILE",
]

def trial_device(use_gpu: bool) -> str:
    """``"cuda"`` for a trial that holds a GPU, ``"cpu"`` otherwise; never a silent CPU fallback.

    Raises:
        StageError: ``use_gpu`` while CUDA is unusable here (a CPU build of torch, or a driver
            older than its CUDA): training on the CPU would hold the GPU idle and run for hours.
    """
    if not use_gpu:
        return "cpu"
    if not torch.cuda.is_available():
        raise StageError(
            f"ray.use_gpu is true and this trial holds a GPU, but torch {torch.__version__} cannot use CUDA "
            f"here (torch.cuda.is_available() is False; torch's CUDA build: {torch.version.cuda}): install the "
            "CUDA build of torch that deploy/Dockerfile pins (see deploy/README.md for the driver it needs), "
            "or set ray.use_gpu: false"
        )
    return "cuda"


STATE_FILE = "trial_state.safetensors"  # trained adapter + gate parameters, by name
META_FILE = "trial.json"  # steps done and the last metrics


@torch.no_grad()
def build_payload(
    spec_dict: dict,
    names: list[str],
    sizes: list[int],
    train: list[np.ndarray],
    evals: list[np.ndarray],
    threads: int = 1,
    train_mask: list[np.ndarray | None] | None = None,
    eval_mask: list[np.ndarray | None] | None = None,
    frozen_settings: list[dict] | None = None,
    quantizer: str = "nf",
) -> dict:
    """Everything every trial shares, computed once: token ids, scored-token masks and the frozen-prefix cache.

    The lower blocks ``0 .. split-1`` (below ``lora.top_layers``) are run once for every
    sequence of the unmodified base; trials start at block ``split``. ``train_mask`` /
    ``eval_mask`` hold each task's (N, L) bool mask of scored tokens (``None``: all scored).
    ``frozen_settings`` (``search.quantize_layers: all``): each base setting's quantised lower
    blocks and their own prefix cache, built once here (``payload["frozen"][key]``, see
    :mod:`orchestrator.search.frozen_base`).
    """
    torch.set_num_threads(threads)
    spec = JobSpec.model_validate(spec_dict)
    model = load_job_base(spec, "cpu", "float32")
    layers = top_block_indices(model, spec.lora.top_layers)
    split = layers[0] if layers else 0
    payload = {"spec": spec_dict, "names": names, "sizes": sizes, "train": train, "eval": evals, "split": split,
               "train_mask": train_mask or [None] * len(train), "eval_mask": eval_mask or [None] * len(evals)}
    if split:
        def host(x):  # the prefix cache travels through Ray as numpy; x is read-only there (a copy of ids)
            return compute_prefix(model, torch.tensor(x), split).detach().cpu().numpy()

        t0 = time.perf_counter()
        payload["train_prefix"] = [host(x) for x in train]
        payload["eval_prefix"] = [host(x) for x in evals]
        rows = sum(len(x) for x in train) + sum(len(x) for x in evals)
        say(f"search: frozen-prefix cache of the base, {rows:,} rows through {split} blocks in "
            f"{time.perf_counter() - t0:.0f}s")
    if frozen_settings:
        if not split:
            raise StageError("search.quantize_layers: all needs frozen blocks below the adapted ones: set "
                             "lora.top_layers (with adapters on every block, `adapted` already quantises all of them)")
        from orchestrator.search.frozen_base import build_frozen

        payload["frozen"] = build_frozen(
            model, split, frozen_settings, quantizer,
            lambda m, x: compute_prefix(m, torch.tensor(x), split).detach().cpu().numpy(), train, evals, say,
        )
    return payload


def upgrade_trial_state(state: dict[str, torch.Tensor], gate_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A trial checkpoint's trained parameters (adapters and gate logits) by today's parameter names.

    Checkpoints written before the gates got their step size from their own optimizer group
    (``models.train.hooks.ExtraParams``) hold ``phi = theta / gate_scale`` under
    ``<layer>.parametrizations.<side>.original``; they come back as ``theta`` under
    ``<layer>.<side>``, so a search started before that change resumes and picks as before.
    """
    out = {}
    for k, v in state.items():
        head, sep, tail = k.rpartition(".parametrizations.")
        if sep and tail.endswith(".original"):
            out[f"{head}.{tail.removesuffix('.original')}"] = v * gate_scale
        else:
            out[k] = v
    return out


def trial_state(path: str | Path, gate_scale: float = 1.0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """:func:`upgrade_trial_state` of the trial checkpoint file ``path`` (safetensors)."""
    return upgrade_trial_state(load_file(str(path), device=device), gate_scale)


def build_trial_model(
    spec: JobSpec, config: dict, num_tasks: int, quantizer: str = "nf", lq_iters: int = 2, device: str = "cpu",
    top_bits: dict[str, tuple[str, int]] | None = None,
) -> tuple[nn.Module, dict]:
    """The trial's model: base + LoRA (+ LQ quantisation) (+ gates) on the top blocks.

    Gates sit where the job's ``gates:`` section puts them (``target_modules``, ``sides``;
    default: one gate per MLP channel, the input columns of ``down_proj``), whether or not the
    flock itself is gated: gating every projection's rows and columns removed 1 - (1 - s)^2 of
    each attention matrix at sparsity s, and the demo's gated trials collapsed (ppl 39-79).
    ``top_bits``: per-matrix (quantizer, bits) of the top blocks (a ``bit_budget`` setting's
    allocation, :func:`orchestrator.search.frozen_base.top_allocation`) instead of ``bits``.

    Returns:
        (model, info) with ``info = {"layers", "quant": QuantReport dict or None, "gated": names}``.
    """
    seed_everything(spec.train.seed)
    bits = int(config.get("bits", 16))
    quantised = bits < 16 or bool(top_bits)
    run = run_dtype(spec, device)
    # A quantised trial quantises the fp32 weights (LQ reads them), then runs its base in ``run``.
    model = load_job_base(spec, device, "float32" if quantised else run)
    layers = top_block_indices(model, spec.lora.top_layers)
    torch.manual_seed(spec.train.seed)  # the same initial adapters as the flock at the same rank
    rank = int(config.get("rank", spec.lora.rank))
    inject(model, spec.lora.target_modules, num_tasks=num_tasks, rank=rank, alpha=spec.lora.alpha,
           dropout=spec.lora.dropout, layers=layers)
    info: dict = {"layers": layers, "quant": None, "gated": []}
    if quantised:
        q = quantize_model(
            model,
            "all-linear",
            bits=top_bits or bits,
            layers=layers,
            quantizer=str(config.get("quantizer", quantizer)),
            iters=lq_iters,
            cache_weight=True,  # frozen weights: the cache is exact
        )
        info["quant"] = {k: v for k, v in q.as_dict().items() if k != "matrices"}
        if run != "float32":  # the rest of the base (embeddings, norms, unquantised layers) in bf16
            cast_frozen(model, getattr(torch, run))
    if float(config.get("target_sparsity", 0.0)) > 0:
        g = spec.gates
        info["gated"] = inject_spec_gates(model, g, layers, "shared", 1)
    return model, info


def _tensors(arrays: list[np.ndarray], rows: int | None = None, device: str = "cpu") -> dict[int, torch.Tensor]:
    """Zero-copy views of the object store's read-only arrays (never written), on ``device``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return {s: torch.from_numpy(a[:rows] if rows else a).to(device) for s, a in enumerate(arrays)}


def mask_tensors(arrays: list[np.ndarray | None] | None, device: str = "cpu") -> dict[int, torch.Tensor | None] | None:
    """A payload's scored-token masks as tensors by task slot; ``None`` when every task scores all tokens."""
    if arrays is None or all(a is None for a in arrays):
        return None
    return {s: None if a is None else torch.from_numpy(np.array(a)).to(device) for s, a in enumerate(arrays)}


def _trained_state(model: nn.Module, params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    ids = {id(p) for p in params}
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if id(p) in ids}


def trial_bits(config: dict) -> int:
    """The ``bits`` a trial reports: its ``bits``, or a ``bit_budget`` below 16 rounded up (mixed widths)."""
    budget = config.get("bit_budget")
    if budget is not None and float(budget) < 16:
        return int(math.ceil(float(budget)))
    return int(config.get("bits", 16))


def _frozen_record(config: dict, fixed: dict, payload: dict) -> dict | None:
    """The trial's whole-base setting from the payload (``search.quantize_layers: all``), else ``None``."""
    key = frozen_key(config) if fixed.get("quantize_layers") == "all" else None
    if key is None:
        return None
    record = payload.get("frozen", {}).get(key)
    if record is None:
        built = sorted(payload.get("frozen", {}))
        raise StageError(f"search trial {config}: no quantised base for setting {key!r} in the search payload "
                         f"(built: {built}): the driver builds one per setting of the space")
    return record


def search_trial(config: dict, payload: dict) -> None:
    """Ray Tune function trainable (wrap with ``tune.with_parameters(search_trial, payload=...)``).

    ``config`` holds the sampled dimensions plus the fixed settings under ``"_search"``
    (steps, eval_every, eval_subset, quantizer, lq_iters, gate_lambda, threads). The trial is
    :func:`run_trial`; this wrapper adds Tune's checkpoints: each report saves the trained
    state (:data:`STATE_FILE`) and the metrics (:data:`META_FILE`), a resumed trial continues
    from the last one.
    """
    from ray import tune

    resume = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:  # resumed: continue from the last reported state (Adam restarts)
        with ckpt.as_directory() as d:
            resume = load_file(str(Path(d) / STATE_FILE)), int(json.loads((Path(d) / META_FILE).read_text())["step"])

    def report(metrics: dict, state: dict[str, torch.Tensor]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            save_file(state, str(Path(tmp) / STATE_FILE))
            (Path(tmp) / META_FILE).write_text(json.dumps(metrics))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    run_trial(config, payload, report, resume)


def run_trial(
    config: dict, payload: dict, on_report: Callable[[dict, dict[str, torch.Tensor]], None],
    resume: tuple[dict[str, torch.Tensor], int] | None = None,
) -> dict[int, float]:
    """The search trial without Ray: build, train, measure; ``on_report`` gets what Tune would.

    Args:
        config: as for :func:`search_trial` (sampled dimensions + ``"_search"``).
        payload: :func:`build_payload`'s output.
        on_report: called with ``(metrics, trained_state)`` every ``eval_every`` steps and once
            at the end (``metrics["final"]``); ``trained_state`` maps parameter names to tensors.
        resume: ``(trained_state, steps_done)`` of an earlier report to continue from.

    Returns:
        The final eval NLL per task index (the final report's ``macro_ppl`` is their mean exp).

    Example:
        >>> reports = []
        >>> nll = run_trial({**config, "_search": fixed}, payload, lambda m, s: reports.append(m))
    """
    fixed = config["_search"]
    torch.set_num_threads(int(fixed.get("threads", 1)))
    spec = JobSpec.model_validate(payload["spec"])
    tr = spec.train
    t0 = time.perf_counter()
    names, sizes = payload["names"], payload["sizes"]
    device = trial_device(spec.ray.use_gpu)
    steps, target = int(fixed["steps"]), float(config.get("target_sparsity", 0.0))
    gate_lr = fixed.get("gate_lr")
    if target > 0:  # at least fast enough to close the target by the hardening step
        from models.gates.schedule import GateSchedule

        gate_lr = max(float(gate_lr or 0.0), GateSchedule(steps, target).auto_gate_lr())
    record = _frozen_record(config, fixed, payload)
    model, info = build_trial_model(spec, config, len(names), fixed["quantizer"], fixed["lq_iters"], device,
                                    top_allocation(record))
    load_embedding(model, record)
    frozen = frozen_bytes(record)
    lr = float(config.get("lr", tr.lr))
    tau = float(config.get("tau", spec.flock.tau if spec.flock.tau != "infer" else 100.0))
    kind = "independent" if tau == 0 else "hierarchical"
    set_trainable(model, shared=kind == "hierarchical", task=True)
    params = [p for p in adapter_params(model) if p.requires_grad]
    gates = gate_params(model)  # their own step size gate_lr: an ExtraParams group of the loop's AdamW
    init_state = _trained_state(model, params + gates)

    steps, every, done = int(fixed["steps"]), int(fixed["eval_every"]), 0
    if resume is not None:
        init_state.update(upgrade_trial_state(resume[0], gate_lr / lr if gate_lr else 1.0))
        done = int(resume[1])
    split = int(payload["split"])
    prefixes = record or payload  # a whole-base setting's blocks below split are quantised: its own prefix cache
    pre = "train_prefix" in prefixes
    data = FlockData(
        list(sizes), list(range(len(names))),
        _tensors(payload["train"], None, device), _tensors(payload["eval"], None, device),
        _tensors(prefixes["train_prefix"], None, device) if pre else None,
        _tensors(prefixes["eval_prefix"], None, device) if pre else None, split,
        mask_tensors(payload.get("train_mask"), device), mask_tensors(payload.get("eval_mask"), device),
    )
    prior = None
    if kind == "hierarchical":
        from models.prior import HierarchicalPrior

        prior = HierarchicalPrior(model, task_sizes=sizes, groups=spec.flock.prior.groups, tau=tau, mode="fixed")
    lam, target = float(fixed["gate_lambda"]), float(config.get("target_sparsity", 0.0))
    hooks = TrainHooks()
    if info["gated"]:
        from models.gates.schedule import GateController, GateSchedule, importance_scores, init_from_importance

        if done == 0:  # a resumed trial has its trained gates in init_state already
            calib = {s: x[: tr.batch_size] for s, x in data.train.items()}
            calib_pre = {s: x[: tr.batch_size] for s, x in data.train_prefix.items()} if pre else None
            init_from_importance(
                model, importance_scores(model, lambda: evaluate(model, calib, tr.batch_size, calib_pre, split))
            )
            init_state.update(_trained_state(model, gates))
        g = spec.gates  # its schedule fields (trials always harden: `align` gives kernel-friendly widths)
        ctrl = GateController(model, GateSchedule(steps, target, lam, g.warmup, g.sigma, g.sigma_final, g.harden_at,
                                                  g.allocation, align=g.align))
        hooks = TrainHooks(on_step=lambda s: ctrl.on_step(s + done), before_eval=ctrl.finish,
                           extra_loss=ctrl.penalty if lam > 0 else None, extra_params=ExtraParams(gates, lr=gate_lr))

    judged = payload.get("judge")  # search.metric beyond ppl: orchestrator/search/judge.py
    tokenizer = None
    if judged is not None:
        from orchestrator.task_metrics import job_tokenizer

        tokenizer = job_tokenizer(spec)

    def measure(step: int, nll: dict[int, float], final: bool) -> TrialMetrics:
        if judged is not None:
            from orchestrator.search.judge import judge_trial

            metric = judge_trial(model, judged, tokenizer)
        else:
            metric = {}
        size = deployed_bytes(model, frozen=frozen)
        # the size once the gates reach their target: the scheduler's size at early rungs
        goal = (deployed_bytes(model, keep=1.0 - target, frozen=frozen)["model_bytes"] if info["gated"]
                else size["model_bytes"])
        return TrialMetrics(
            **{
                "step": step,
                "macro_ppl": macro_perplexity(nll),
                "final": final,
                "eval": "full" if final else "subset",
                "sparsity": sparsity_report(model)["removed_fraction"] if info["gated"] else 0.0,
                "bits": trial_bits(config),
                **size,
                "target_bytes": goal,
                "rung_bytes": min(size["model_bytes"], goal),
                "quant_rel_error": (info["quant"] or {}).get("recon_rel_error"),
                "seconds": time.perf_counter() - t0,
                **metric,
            }
        )

    def report(metrics: TrialMetrics) -> None:
        on_report(metrics, _trained_state(model, params + gates))

    left = steps - done
    # Every ``every`` steps the loop evaluates the first ``eval_subset`` eval rows of each task
    # and tells us its step: the scheduler's signal, with a checkpoint.
    hooks.on_eval = lambda step, nll: report(measure(done + step, nll, final=False))

    def log(msg: str) -> None:
        sys.stdout.write(msg + "\n")

    if left > 0:
        cfg = method_config(tr, "trial", kind, steps=left, lr=lr, seed=tr.seed + done,
                            log_every=every, eval_every=every, eval_rows=int(fixed["eval_subset"]))
        out = train_method(model, data, cfg, init_state, prior, log, device, trainable=params, hooks=hooks)
        nll = out["eval_nll"]
    else:
        if hooks.before_eval is not None:
            hooks.before_eval()
        nll = evaluate(model, data.eval, tr.eval_batch_size, data.eval_prefix, split, masks=data.eval_mask)
    report(measure(steps, nll, final=True))
    return nll
