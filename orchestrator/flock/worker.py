"""The Ray Train worker of the flock stage: loads the base, owns some tasks, trains every method.

Ray is touched only here and only through ``ray.train`` (context, checkpoint, report); the
training itself is :func:`models.train.loop.train_method`. After each method the
worker reports a checkpoint (its results + the flock's adapters in PEFT format), so a
restarted worker group (``FailureConfig``) skips the methods already finished.

With ``base.bits``/``base.bit_budget`` the worker's base is the quantised one put in the
object store (packed codes mapped read-only, dequantised per layer in the forward); its LQ
low-rank factors start the shared adapter Theta, so every method, the baselines, PESC and
the frozen-prefix cache all run on that base (:mod:`orchestrator.base.quant`).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import ray
import ray.train
import torch

from models.base import resolve_dtype, top_block_indices
from models.lora import adapter_params, inject
from models.moe import save_moe
from models.peft_io import save_adapter, theta_state
from models.precision import fast_matmul
from models.train.loop import FlockData, train_method
from models.train.results import MethodResult
from models.train.step import evaluate, seed_everything
from orchestrator.base.load import load_job_base
from orchestrator.base.quant import NOTE_FILE, QUANT_DIR, adapter_note, write_quant_base
from orchestrator.base.store import load_base_shared, lq_factors
from orchestrator.contracts import GateResults, MethodRecord, WorkerResults
from orchestrator.flock.gating import export_gated, gate_hooks, gate_init_state, gate_results, inject_spec_gates
from orchestrator.flock.methods import method_config, methods_of
from orchestrator.flock.prefix import worker_prefix_cache
from orchestrator.metrics.flock import with_metrics
from orchestrator.metrics.sink import MetricSink
from orchestrator.pesc.stage import run_pesc
from orchestrator.spec import JobSpec
from orchestrator.task_metrics import job_tokenizer, judge
from tasks.row_store import RowStore, owned_rows

__all__ = ["flock_worker"]


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


def flock_worker(config: dict) -> None:
    """Ray Train entry point (one call per worker)."""
    spec = JobSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    def say(msg: str) -> None:
        # Not print(): Ray Train V2 patches print into its logger, which doubles console lines.
        sys.stdout.write(f"[flock w{rank}] {msg}\n")
        sys.stdout.flush()

    clock = {"started_at": time.time()}  # this worker's phase seconds (results["timing"], the benchmark's)
    payload = ray.get(config["payloads"][rank])  # names, sizes, the row store's path: no rows
    owned: list[int] = config["assignment"][rank]
    names: list[str] = payload["names"]
    sizes: list[int] = payload["sizes"]
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
            # The store holds the workers' dtype (flock driver: store_dtype), so this is one
            # host-to-device copy per tensor, straight from the shared pages: no dtype change,
            # no intermediate host copy. A GPU per worker needs its own device copy regardless.
            fast_matmul(device)
            model = model.to(device=device, dtype=resolve_dtype(b.dtype, str(device)))
    else:
        model = load_job_base(spec, str(device))
        if b.quantized:  # no shared store: this worker quantises its own copy
            from orchestrator.base.quant import build_quant_base

            quant, factors = build_quant_base(model, spec)
    layers = top_block_indices(model, spec.lora.top_layers)
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
        from models.quant.model import apply_lq_init

        apply_lq_init(model, factors)
    gates = spec.gates if spec.gates.enabled else None
    if gates is not None:
        inject_spec_gates(model, gates, layers if gates.layers == "adapted" else None, gates.scope, len(owned))
    ad = {id(p) for p in adapter_params(model)}
    init_state = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in ad}
    say(
        f"base loaded and adapters injected in {time.perf_counter() - t0:.1f}s; {len(owned)} tasks "
        + (f"{[names[g] for g in owned]}" if len(owned) <= 20 else f"({names[owned[0]]} ... {names[owned[-1]]})")
        + (
            f"; base quantised to {quant['bits_per_weight']:.2f} bits/weight ({quant['matrices_count']} matrices)"
            if quant
            else ""
        )
    )

    # This worker's tasks only, as views of the job's memory-mapped row store: training rows are
    # read batch by batch (FlockData.batch_rows); eval rows, few per task, go to the device.
    store = RowStore(payload["rows_dir"])
    train, evals, train_mask, eval_mask = owned_rows(store, owned)
    if device.type != "cpu":
        evals = {s: x.to(device) for s, x in evals.items()}
        eval_mask = {s: None if m is None else m.to(device) for s, m in eval_mask.items()}
    clock["startup_s"] = time.perf_counter() - t0
    split = layers[0] if layers and layers[0] > 0 else 0
    if gates is not None and gates.layers == "all":
        split = 0  # gated lower blocks change: nothing below the adapters is frozen
    # The frozen blocks' states are computed when a batch first needs them and kept within
    # flock.prefix_cache.budget_gb, shared by every method, evaluation, the gates and PESC.
    cache = worker_prefix_cache(model, spec, split, sizes, owned, train, evals, say)
    data = FlockData(sizes, owned, train, evals, None, None, split if cache else 0, train_mask, eval_mask,
                     prefix_cache=cache)
    if gates is not None:
        t1 = time.perf_counter()
        init_state |= gate_init_state(model, data, spec, ctx.get_world_size())
        say(
            f"gates on {len(init_state) - len(ad)} gate vectors, initialised ({gates.init}) "
            f"in {time.perf_counter() - t1:.1f}s"
        )

    plan = payload.get("metric_plan") or {}  # this worker's tasks judged beyond ppl (orchestrator.task_metrics)
    tokenizer = job_tokenizer(spec) if any(names[g] in plan for g in owned) else None

    def judge_owned() -> dict:
        """This worker's tasks on their own metrics, for the model as it stands (one mixed pass)."""
        if tokenizer is None:
            return {}
        t1 = time.perf_counter()
        out = judge(model, plan, {names[g]: s for s, g in enumerate(owned)}, tokenizer, spec.eval.batch_size)
        clock["eval_s"] = clock.get("eval_s", 0.0) + time.perf_counter() - t1
        say(f"judged {len(out)} tasks on their metrics in {time.perf_counter() - t1:.1f}s")
        return out

    results = cast(WorkerResults, {})  # filled below (or resumed from the checkpoint)
    # What the flock delivers (adapters, prior, PESC, exports) is written once, straight into the
    # run's outputs folder beside the Ray checkpoints (storage_path: shared by every node, as Ray
    # Train requires for multi-node runs); checkpoints carry only the results JSON. A resumed
    # worker finds its finished files there, so nothing is copied per checkpoint.
    kept = Path(config["outputs_dir"])
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            f = Path(d) / "results" / f"rank{rank}.json"
            if f.is_file():
                results = cast(WorkerResults, json.loads(f.read_text()))
                say(f"resumed from checkpoint: methods done {sorted(results.get('methods', {}))}")
    if "base_eval_nll" not in results:
        t1 = time.perf_counter()
        base = evaluate(model, evals, spec.train.eval_batch_size, None, data.split, masks=eval_mask,
                        prefix_fn=data.eval_prefix_fn())  # B = 0: the base itself
        results["base_eval_nll"] = {names[owned[s]]: v for s, v in base.items()}
        base_metrics = judge_owned()  # the untuned base: every slot's adapter is still B = 0
        if base_metrics:
            results["base_metrics"] = base_metrics
        clock["base_eval_s"] = time.perf_counter() - t1
        say(f"base model evaluated in {time.perf_counter() - t1:.1f}s" + (f"; {cache.summary()}" if cache else ""))
    results.setdefault("methods", {})
    results["timing"] = clock  # this invocation's phases (a resumed worker reports only its own)
    results["owned"] = [names[g] for g in owned]
    if quant is not None and rank == 0:
        results["quant"] = quant
        if not (kept / QUANT_DIR).is_dir():
            write_quant_base(model, quant, kept / QUANT_DIR, factors)  # the adapters belong with this base

    tr = spec.train
    for mname, kind, tau in methods_of(spec):
        if mname in results["methods"]:
            continue
        cfg = method_config(tr, mname, kind, sync_every=spec.flock.sync_every, eval_every=tr.eval_every,
                            prior_update=spec.flock.prior_update)
        prior = None
        if kind == "hierarchical":
            prior = _prior(model, spec, [sizes[g] for g in owned], sum(sizes), tau)
        partial = kept / "partial" / f"rank{rank}" / mname  # mid-method state (resumable)
        hooks = gate_hooks(model, spec, ctx.get_world_size()) if gates is not None else None
        sink, log = _metric_sink(spec, config, rank, f"flock/{mname}"), say
        if sink is not None:  # report_to: rank 0 streams the loss, its tasks' eval losses, tau, gate sparsity
            hooks, log = with_metrics(hooks, say, sink, mname, [names[g] for g in owned], model, prior)
        t1 = time.perf_counter()
        try:
            out = train_method(model, data, cfg, init_state, prior, log, device, hooks=hooks, state_dir=partial,
                               checkpoint_every=tr.checkpoint_every,
                               on_checkpoint=lambda step, m=mname: _report(rank, results, kept, f"{m}@{step}"))
        finally:
            if sink is not None:
                sink.close()
        shutil.rmtree(partial, ignore_errors=True)
        clock["steps_s"] = clock.get("steps_s", 0.0) + out["seconds"]  # the step loop alone
        clock["eval_s"] = clock.get("eval_s", 0.0) + time.perf_counter() - t1 - out["seconds"]  # + final eval
        if cache is not None:
            say(f"[{mname}] {cache.summary()}")
            clock["prefix_s"] = cache.stats["seconds"]  # rows computed on demand so far (every method)
        gate_res = gate_results(model, names, owned) if gates is not None else None
        results["methods"][mname] = _method_record(
            kind, tau, out, [names[g] for g in owned], prior is not None, gate_res
        )
        judged = judge_owned()
        if judged:
            results["methods"][mname]["metrics"] = judged
        t1 = time.perf_counter()
        if mname == "hierarchical":  # the flock's adapters: what the job delivers
            _save_adapters(model, owned, names, kept / "adapters", config["base_model_name"], quant)
            say(f"saved {len(owned)} adapters in {time.perf_counter() - t1:.1f}s")
            if gates is not None and gates.export:
                t2 = time.perf_counter()
                export_gated(model, kept / "export", names, owned, rank, gates.scope)
                say(f"exported the pruned model and its adapters in {time.perf_counter() - t2:.1f}s")
            if rank == 0:  # Theta is replicated: one copy, with the prior's state
                save_adapter(model, 0, kept / "prior" / "theta", config["base_model_name"], state=theta_state(model))
                _note_quant(quant, kept / "prior" / "theta")
                if prior is not None:
                    (kept / "prior").mkdir(parents=True, exist_ok=True)
                    (kept / "prior" / "prior.json").write_text(json.dumps(prior.state_dict(), indent=2))
        clock["save_s"] = clock.get("save_s", 0.0) + time.perf_counter() - t1  # adapters, prior (before the report)
        clock["peak_rss_mb"] = _peak_rss_mb()
        _report(rank, results, kept, mname)

    if spec.pesc.enabled and "pesc" not in results:
        if gates is not None:
            from models.gates.layer import remove_gates

            remove_gates(model)  # PESC is not gated: the plain base (+ LoRA) again
            init_state = {k.replace(".inner.", "."): v for k, v in init_state.items() if ".theta_" not in k}
        sink, log = _metric_sink(spec, config, rank, "pesc/train"), say
        if sink is not None:
            _, log = with_metrics(None, say, sink, "pesc", [names[g] for g in owned], model)
        try:
            results["pesc"] = run_pesc(model, data, spec, init_state, names, owned, log, device)
            judged = judge_owned()
            if judged:
                results["pesc"]["metrics"] = judged
        finally:
            if sink is not None:
                sink.close()
        if rank == 0:
            save_moe(model, kept / "pesc" / "moe")
            save_adapter(
                model, 0, kept / "pesc" / "attention_lora", config["base_model_name"], state=theta_state(model)
            )
            _note_quant(quant, kept / "pesc" / "attention_lora")
        _report(rank, results, kept, "pesc")


def _peak_rss_mb() -> float:
    """This worker process's peak resident memory so far (MiB; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _metric_sink(spec: JobSpec, config: dict, rank: int, stream: str) -> MetricSink | None:
    """Rank 0's metric stream when the job has ``report_to`` (every scalar written once)."""
    if rank != 0 or not spec.report_to or not config.get("metrics_dir"):
        return None
    return MetricSink(spec.report_to, Path(config["metrics_dir"]), spec.name, stream)


def _method_record(kind: str, tau, out: MethodResult, task: list[str], with_prior: bool,
                   gates: GateResults | None) -> MethodRecord:
    """The loop's result (task slots) as the method's record (task names), as checkpointed and merged."""
    rec = MethodRecord(
        kind=kind,
        tau=tau if tau != float("inf") else "inf",
        eval_nll={task[s]: v for s, v in out["eval_nll"].items()},
        failed={task[s]: why for s, why in out["failed"].items()},
        curve=out["curve"],
        seconds=out["seconds"],
        tokens_per_s=out["tokens_per_s"],
    )
    if "eval_curve" in out:  # train.eval_every > 0
        rec["eval_curve"] = [(step, {task[s]: v for s, v in nll.items()}) for step, nll in out["eval_curve"]]
    if with_prior:
        rec["tau_inferred"], rec["tau_history"] = out.get("tau"), out.get("tau_history")
    if gates is not None:
        rec["gates"] = gates
    return rec


def _note_quant(quant: dict | None, adapter_dir: Path) -> None:
    """Say beside an adapter that it was trained on the quantised base (it belongs with that base)."""
    if quant is not None:
        (adapter_dir / NOTE_FILE).write_text(json.dumps(adapter_note(quant), indent=2))


def _save_adapters(model, owned: list[int], names: list[str], where: Path, base_model_name: str | None,
                   quant: dict | None) -> None:
    """Every owned task's adapter as a PEFT directory, written by a few threads at once.

    Each write is atomic (``models.files.atomic_dir``) and mostly file I/O, which releases the
    GIL: with thousands of tasks the writes overlap instead of queueing one after another.
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(s: int, g: int) -> None:
        save_adapter(model, s, where / names[g], base_model_name)
        _note_quant(quant, where / names[g])

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(owned)))) as pool:
        for f in [pool.submit(one, s, g) for s, g in enumerate(owned)]:
            f.result()  # re-raise the first failure


def _report(rank: int, results: WorkerResults, kept: Path, step: str) -> None:
    """Checkpoint this worker's results so far (``kept``, the outputs folder, is not copied).

    The deliverables already sit in the outputs folder, written once; a checkpoint holds only
    ``results/rank<k>.json`` (the finished methods' figures), so its size does not grow with
    the number of tasks and the latest one is complete together with that folder.
    """
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "results").mkdir()
        (root / "results" / f"rank{rank}.json").write_text(json.dumps(results))
        ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
