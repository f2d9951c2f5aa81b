"""The Ray Train worker of the flock stage: loads the base, owns some tasks, trains every method.

Ray is touched only here and only through ``ray.train`` (context, checkpoint, report); the
training itself is :func:`orchestrator.flock_loop.train_method`. After each method the
worker reports a checkpoint (its results + the flock's adapters in PEFT format), so a
restarted worker group (``FailureConfig``) skips the methods already finished.

With ``base.bits``/``base.bit_budget`` the worker's base is the quantised one put in the
object store (packed codes mapped read-only, dequantised per layer in the forward); its LQ
low-rank factors start the shared adapter Theta, so every method, the baselines, PESC and
the frozen-prefix cache all run on that base (:mod:`orchestrator.base_quant`).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import torch

from models.base import adaptable_layers, load_base, resolve_dtype
from models.lora import adapter_params, inject
from models.moe import save_moe
from models.peft_io import save_adapter, theta_state
from models.prefix import compute_prefix
from models.train import evaluate, seed_everything
from orchestrator.base_store import load_base_shared, lq_factors
from orchestrator.base_quant import NOTE_FILE, QUANT_DIR, adapter_note, write_quant_base
from orchestrator.flock_loop import FlockData, MethodConfig, train_method
from orchestrator.spec import JobSpec

__all__ = ["flock_worker", "adapted_layers"]


def adapted_layers(model: torch.nn.Module, top_layers: int | None) -> list[int] | None:
    """Block indices that get adapters (the top ``top_layers``), or ``None`` for all."""
    if top_layers is None:
        return None
    _, blocks = adaptable_layers(model)
    n = len(blocks)
    return list(range(max(0, n - top_layers), n))


def _prior(model, spec: JobSpec, sizes_owned: list[int], total: int, tau):
    from models.prior import HierarchicalPrior

    p = spec.flock.prior
    mode = "infer" if tau == "infer" else "fixed"
    return HierarchicalPrior(
        model,
        task_sizes=sizes_owned,
        total_size=total,
        groups=p.groups,
        tau=None if mode == "infer" else float(tau),
        mode=mode,
        a=p.a,
        b=p.b,
        tau_init=p.tau_init,
        tau_max=p.tau_max,
        update_every=p.update_every,
    )


def methods_of(spec: JobSpec) -> list[tuple[str, str, object]]:
    """(name, kind, tau) of every method the flock trains, the main one first.

    tau-sweep points that another method already trains (the main tau; 0 when the
    independent baseline runs) are not trained twice: the report takes them from there.
    """
    f = spec.flock
    out: list[tuple[str, str, object]] = [("hierarchical", "hierarchical", f.tau)]
    if f.tau == 0:
        out = [("hierarchical", "independent", 0.0)]
    for b in f.baselines:
        out.append((b, b, 0.0 if b == "independent" else float("inf")))
    done = {float(t) for _, k, t in out if k != "unified" and isinstance(t, (int, float))}
    for t in f.tau_sweep or []:
        if float(t) in done:
            continue
        done.add(float(t))
        kind = "independent" if t == 0 else "hierarchical"
        out.append((f"tau={t:g}", kind, float(t)))
    return out


def flock_worker(config: dict) -> None:
    """Ray Train entry point (one call per worker)."""
    spec = JobSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    def say(msg: str) -> None:
        # Not print(): Ray Train V2 patches print into its logger, which doubles console lines.
        sys.stdout.write(f"[flock w{rank}] {msg}\n")
        sys.stdout.flush()

    data_all = ray.get(config["data_ref"])
    owned: list[int] = config["assignment"][rank]
    names: list[str] = data_all["names"]
    sizes: list[int] = data_all["sizes"]
    device = ray.train.torch.get_device() if spec.ray.use_gpu else torch.device("cpu")
    t0 = time.perf_counter()
    seed_everything(spec.train.seed)
    b = spec.base
    factors: dict = {}  # LQ low-rank parts (quantised base): they start the shared adapter Theta
    quant = None
    if config.get("base_ref") is not None:  # one copy per node, mapped read-only by every worker
        state = ray.get(config["base_ref"])  # zero-copy: numpy views of the node's object store
        model = load_base_shared(state, b.name, b.gguf_file, b.random_init)  # quantised layers stay packed
        factors, quant = lq_factors(state), (state.get("quant") or {}).get("summary")
        if device.type != "cpu":
            model = model.to(device=device, dtype=resolve_dtype(b.dtype, str(device)))
    else:
        model = load_base(b.name, b.gguf_file, b.random_init, b.dtype, str(device), seed=spec.train.seed)
        if b.quantized:  # no shared store: this worker quantises its own copy
            from orchestrator.base_quant import build_quant_base

            quant, factors = build_quant_base(model, spec)
    layers = adapted_layers(model, spec.lora.top_layers)
    torch.manual_seed(spec.train.seed)  # same initial adapters on every worker and method
    inject(
        model,
        spec.lora.target_modules,
        num_tasks=len(owned),
        rank=[spec.rank_of(names[g]) for g in owned],
        alpha=spec.lora.alpha,
        dropout=spec.lora.dropout,
        layers=layers,
        max_rank=max(spec.rank_of(n) for n in names),  # same Theta shape on every worker
    )
    if factors:  # LQ-LoRA: Theta starts at L1 L2^T, so the initial model is Q + L1 L2^T ~ W
        from models.lq import apply_lq_init

        apply_lq_init(model, factors)
    gates = spec.gates if spec.gates.enabled else None
    if gates is not None:
        from models.gates import inject_gates

        inject_gates(model, gates.target_modules, layers=layers if gates.layers == "adapted" else None,
                     scope=gates.scope, num_tasks=len(owned), sigma=gates.sigma,
                     gate_rows=gates.sides != "cols", gate_cols=gates.sides != "rows")
    ad = {id(p) for p in adapter_params(model)}
    init_state = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in ad}
    say(f"base loaded and adapters injected in {time.perf_counter() - t0:.1f}s; tasks {[names[g] for g in owned]}"
        + (f"; base quantised to {quant['bits_per_weight']:.2f} bits/weight ({quant['matrices_count']} matrices)" if quant else ""))

    # Object-store arrays are read-only views; token ids are small, so take private copies.
    train = {s: torch.tensor(data_all["train"][g], device=device) for s, g in enumerate(owned)}
    evals = {s: torch.tensor(data_all["eval"][g], device=device) for s, g in enumerate(owned)}
    split = layers[0] if layers and layers[0] > 0 else 0
    if gates is not None and gates.layers == "all":
        split = 0  # gated lower blocks change: nothing below the adapters is frozen
    tp = ep = None
    if split:
        t1 = time.perf_counter()
        n = sum(len(x) for x in train.values()) + sum(len(x) for x in evals.values())
        say(f"running the frozen blocks 0..{split - 1} once for {n} sequences (cached for every method)")
        tp, ep = {}, {}
        for s in train:
            tp[s] = compute_prefix(model, train[s], split)
            ep[s] = compute_prefix(model, evals[s], split)
            say(f"  cached {names[owned[s]]}: {len(train[s])} + {len(evals[s])} sequences, {time.perf_counter() - t1:.0f}s")
        say(f"cached the frozen blocks for {n} sequences in {time.perf_counter() - t1:.1f}s")
    data = FlockData(sizes, owned, train, evals, tp, ep, split)
    if gates is not None:
        t1 = time.perf_counter()
        init_state |= gate_init_state(model, data, spec, ctx.get_world_size())
        say(f"gates on {len(init_state) - len(ad)} gate vectors, initialised ({gates.init}) in {time.perf_counter() - t1:.1f}s")

    results: dict = {}
    kept = Path(tempfile.mkdtemp(prefix="loraflock-adapters-"))  # the flock's adapters, once trained
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            f = Path(d) / "results" / f"rank{rank}.json"
            if f.is_file():
                results = json.loads(f.read_text())
                say(f"resumed from checkpoint: methods done {sorted(results.get('methods', {}))}")
            subs = [Path("adapters") / names[g] for g in owned] + [Path("partial") / f"rank{rank}"]
            for sub in subs + ([Path("prior"), Path("pesc")] if rank == 0 else []):
                if (Path(d) / sub).is_dir():
                    shutil.copytree(Path(d) / sub, kept / sub, dirs_exist_ok=True)
    if "base_eval_nll" not in results:
        t1 = time.perf_counter()
        base = evaluate(model, evals, spec.train.eval_batch_size, ep, split)  # B = 0: the base itself
        results["base_eval_nll"] = {names[owned[s]]: v for s, v in base.items()}
        say(f"base model evaluated in {time.perf_counter() - t1:.1f}s")
    results.setdefault("methods", {})
    results["owned"] = [names[g] for g in owned]
    if quant is not None and rank == 0:
        results["quant"] = quant
        if not (kept / QUANT_DIR).is_dir():
            write_quant_base(model, quant, kept / QUANT_DIR)  # the adapters belong with this base

    tr = spec.train
    for mname, kind, tau in methods_of(spec):
        if mname in results["methods"]:
            continue
        cfg = MethodConfig(
            mname, kind, tr.steps, tr.batch_size, tr.lr, tr.seed, tr.weight_decay, tr.max_grad_norm,
            tr.temperature, tr.eval_batch_size, tr.log_every, spec.flock.sync_every,
        )
        prior = None
        if kind == "hierarchical":
            prior = _prior(model, spec, [sizes[g] for g in owned], sum(sizes), tau)
        partial = kept / "partial" / f"rank{rank}" / mname  # mid-method state (resumable)
        gk = gate_kwargs(model, spec, ctx.get_world_size(), prior) if gates is not None else {}
        out = train_method(model, data, cfg, init_state, prior, say, device, state_dir=partial,
                           checkpoint_every=tr.checkpoint_every,
                           on_checkpoint=lambda step, m=mname: _report(rank, results, kept, f"{m}@{step}"), **gk)
        shutil.rmtree(partial, ignore_errors=True)
        results["methods"][mname] = {
            "kind": kind,
            "tau": tau if tau != float("inf") else "inf",
            "eval_nll": {names[owned[s]]: v for s, v in out["eval_nll"].items()},
            "failed": {names[owned[s]]: why for s, why in out["failed"].items()},
            "curve": out["curve"],
            "seconds": out["seconds"],
            "tokens_per_s": out["tokens_per_s"],
            **({"tau_inferred": out.get("tau"), "tau_history": out.get("tau_history")} if prior is not None else {}),
            **({"gates": gate_results(model, names, owned)} if gates is not None else {}),
        }
        if mname == "hierarchical":  # the flock's adapters: what the job delivers
            for s, g in enumerate(owned):
                save_adapter(model, s, kept / "adapters" / names[g], config["base_model_name"])
                _note_quant(quant, kept / "adapters" / names[g])
            if gates is not None and gates.export:
                t1 = time.perf_counter()
                export_gated(model, kept / "export", names, owned, rank, gates.scope)
                say(f"exported the pruned model and its adapters in {time.perf_counter() - t1:.1f}s")
            if rank == 0:  # Theta is replicated: one copy, with the prior's state
                save_adapter(model, 0, kept / "prior" / "theta", config["base_model_name"], state=theta_state(model))
                _note_quant(quant, kept / "prior" / "theta")
                if prior is not None:
                    (kept / "prior").mkdir(parents=True, exist_ok=True)
                    (kept / "prior" / "prior.json").write_text(json.dumps(prior.state_dict(), indent=2))
        _report(rank, results, kept, mname)

    if spec.pesc.enabled and "pesc" not in results:
        if gates is not None:
            from models.gates import remove_gates

            remove_gates(model)  # PESC is not gated: the plain base (+ LoRA) again
            init_state = {k.replace(".inner.", "."): v for k, v in init_state.items() if ".theta_" not in k}
        results["pesc"] = run_pesc(model, data, spec, init_state, names, owned, say, device)
        if rank == 0:
            save_moe(model, kept / "pesc" / "moe")
            save_adapter(model, 0, kept / "pesc" / "attention_lora", config["base_model_name"], state=theta_state(model))
            _note_quant(quant, kept / "pesc" / "attention_lora")
        _report(rank, results, kept, "pesc")


def _note_quant(quant: dict | None, adapter_dir: Path) -> None:
    """Say beside an adapter that it was trained on the quantised base (it belongs with that base)."""
    if quant is not None:
        (adapter_dir / NOTE_FILE).write_text(json.dumps(adapter_note(quant), indent=2))


def gate_init_state(model, data: FlockData, spec: JobSpec, world: int) -> dict:
    """Initial gate logits (the same for every method): importance init or constant.

    Importance comes from ``gates.calibration_batches`` batches of this worker's training
    rows through the base (adapters at B = 0); shared gates average the workers' scores so
    every worker starts from the same gates.
    """
    import torch.distributed as dist

    from models.gate_schedule import importance_scores, init_from_importance
    from models.gates import gate_params
    from models.train import Batch, row_nll

    g, bs = spec.gates, spec.train.batch_size
    if g.init in ("importance", "taylor"):
        def forward() -> torch.Tensor:
            left, total = g.calibration_batches, torch.zeros(())
            for s, ids in data.train.items():
                for i in range(0, len(ids), bs):
                    if left == 0:
                        return total
                    rows = ids[i : i + bs]
                    pre = data.train_prefix[s][i : i + bs] if data.train_prefix is not None else None
                    tid = torch.full((len(rows),), s, dtype=torch.long, device=rows.device)
                    total = total + row_nll(model, Batch(rows, tid, torch.ones(len(rows), device=rows.device), pre, data.split)).mean()
                    left -= 1
            return total

        scores = importance_scores(model, forward, "taylor" if g.init == "taylor" else "magnitude")
        if world > 1 and dist.is_available() and dist.is_initialized() and g.scope == "shared":
            for sides in scores.values():
                for t in sides.values():
                    dist.all_reduce(t)
                    t /= world
        init_from_importance(model, scores)
    ids = {id(p) for p in gate_params(model)}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in ids}


def gate_kwargs(model, spec: JobSpec, world: int, prior) -> dict:
    """train_method arguments that train the gates with the job's schedule (fresh per method)."""
    from models.gate_schedule import GateController, GateSchedule, clear_hard
    from models.gates import gate_params

    g = spec.gates
    clear_hard(model)
    sched = GateSchedule(spec.train.steps, g.target_sparsity, g.lam, g.warmup, g.sigma, g.sigma_final,
                         g.harden_at, g.allocation, align=g.align)
    shared = g.scope == "shared"
    ctrl = GateController(model, sched, penalty_scale=1.0 / world if shared else 1.0)
    return {"extra_params": gate_params(model), "extra_lr": g.gate_lr or sched.auto_gate_lr(),
            "extra_local": not shared, "on_step": ctrl.on_step, "extra_loss": ctrl.penalty, "before_eval": ctrl.finish}


def gate_results(model, names: list[str], owned: list[int]) -> dict:
    """Sparsity achieved by this worker's gates (overall, per layer, per task)."""
    from models.gates import sparsity_report

    rep = sparsity_report(model)
    rep["tasks"] = {names[g]: sparsity_report(model, task=s)["removed_fraction"] for s, g in enumerate(owned)}
    return rep


def export_gated(model, where: Path, names: list[str], owned: list[int], rank: int, scope: str) -> None:
    """The pruned plain model(s) and PEFT adapters for them (``export/``, see README)."""
    from models.gate_export import export_pruned, save_pruned, strip_adapters

    if scope == "shared":  # one pruned base for every task (written once, by rank 0)
        pruned = export_pruned(model)
        for s, g in enumerate(owned):
            save_adapter(pruned, s, where / "adapters" / names[g], "export/model")
        if rank == 0:
            save_pruned(strip_adapters(pruned), where / "model")
        return
    for s, g in enumerate(owned):  # task scope: every task has its own pruned base
        pruned = export_pruned(model, task=s)
        save_adapter(pruned, s, where / names[g] / "adapter", f"export/{names[g]}/model")
        save_pruned(strip_adapters(pruned), where / names[g] / "model")


def _report(rank: int, results: dict, kept: Path, step: str) -> None:
    """Checkpoint this worker's results so far plus everything it delivers (``kept``).

    Every checkpoint carries all finished outputs, so the latest one is complete on its own.
    """
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "results").mkdir()
        (root / "results" / f"rank{rank}.json").write_text(json.dumps(results))
        shutil.copytree(kept, root, dirs_exist_ok=True)
        ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def run_pesc(model, data: FlockData, spec: JobSpec, init_state: dict, names: list[str], owned: list[int], say, device) -> dict:
    """PESC on the same workers, base and cached prefix as the flock (the top blocks only).

    The FFN of every adapted block becomes ``E`` adapter experts with a top-k router; the
    attention projections keep one shared (unified) LoRA; everything is trained on all tasks
    pooled with the flock's steps and batches. Routing never sees task ids.
    """
    from models.lora import lora_layers
    from models.moe import balance_loss, convert_to_moe, expert_load, moe_params, reset_load, task_expert_load

    p, tr = spec.pesc, spec.train
    layers = adapted_layers(model, spec.lora.top_layers)
    with torch.no_grad():  # start from the common initial adapters (B = 0: the base itself)
        named = dict(model.named_parameters())
        for k, v in init_state.items():
            named[k].copy_(v)
    torch.manual_seed(tr.seed)
    before = {n: id(q) for n, q in model.named_parameters() if n in init_state}
    converted = convert_to_moe(model, p.num_experts, p.top_k, p.bottleneck, p.scale, layers=layers)
    renamed = {id(q): n for n, q in model.named_parameters()}  # the FFNs moved under the MoE
    init_state = {renamed[before[k]]: v for k, v in init_state.items()}
    # LoRA on attention only: FFN projections inside the experts' shared F stay frozen at B = 0.
    attention = [l for n, l in lora_layers(model).items() if not any(n.startswith(c + ".") for c in converted)]
    params = moe_params(model) + [q for l in attention for q in (l.lora_A_shared, l.lora_B_shared)]
    cfg = MethodConfig("pesc", "pesc", tr.steps, tr.batch_size, tr.lr, tr.seed, tr.weight_decay, tr.max_grad_norm,
                       tr.temperature, tr.eval_batch_size, tr.log_every, spec.flock.sync_every)
    coef = p.balance_coef
    say(f"PESC: {len(converted)} FFN blocks -> {p.num_experts} experts (top-{p.top_k}), LoRA on {len(attention)} attention projections")
    t0 = time.perf_counter()
    out = train_method(model, data, cfg, init_state, None, say, device, trainable=params,
                       extra_loss=(lambda: coef * balance_loss(model)) if coef > 0 else None,
                       before_eval=lambda: reset_load(model))  # expert load of the eval pass
    return {
        "eval_nll": {names[owned[s]]: v for s, v in out["eval_nll"].items()},
        "eval_rows": sum(len(x) for x in data.eval.values()),
        "expert_load": expert_load(model),
        "task_expert_load": {names[owned[s]]: v for s, v in task_expert_load(model).items()},
        "trainable_params": sum(q.numel() for q in params),
        "seconds": time.perf_counter() - t0,  # training + evaluation
        "curve": out["curve"],
    }
