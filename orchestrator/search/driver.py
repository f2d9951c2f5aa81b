"""The search stage on the driver: Ray Tune over a compression space, two-objective ASHA, Pareto front.

``run_search`` builds the shared payload once (token ids plus the frozen lower blocks'
activations, computed by one Ray task and handed to every trial through
``tune.with_parameters``, i.e. one object-store copy), runs a ``ray.tune.Tuner`` over
:func:`orchestrator.search.trial.search_trial` with two-objective ASHA on (the objective, size), and writes
``out/search/trials.csv`` (every trial) and ``out/search/pareto.csv`` (the non-dominated
completed trials in (objective, model_bytes)). The objective is ``macro_ppl`` (minimised), or
with a task ``search.metric`` ``macro_<metric>`` (maximised), judged by every trial at every
report on the same seeded rows (:mod:`orchestrator.search.judge`; the payload carries them, to the pack hosts
too, which judge packed trials through their slots). An interrupted search resumes with ``Tuner.restore``
from ``<storage>/search``: finished trials are kept, not re-run; unfinished ones continue from their last checkpoint.

Which trials the front is computed over: the ``done`` ones only, i.e. trials that trained
every step and were measured on the whole eval set. A trial stopped early by the scheduler
keeps its last measurement in ``trials.csv`` (status ``stopped``), but that is a subset eval
after fewer steps: not comparable with the others, and not the model its configuration would
give, so it is plotted and never on the front. The scheduler
(:class:`orchestrator.search.scheduler.ParetoASHA`) stops a trial only when enough trials
that are at least as small beat it, so compressed trials reach the end and the front spans
the sizes. With ``search.pick`` the job picks one point of the front
(:func:`orchestrator.search.pareto.pick_point`) for the recycle stage: ``report.json``
``search.picked`` and its checkpoint in ``out/search/pick/``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import ray
from ray import tune

from models.files import atomic_write_text
from orchestrator.base.quant import QUANT_DIR
from orchestrator.errors import StageError
from orchestrator.metrics.sink import metrics_dir
from orchestrator.metrics.tune import tune_callbacks
from orchestrator.report.search import plot_pareto
from orchestrator.search.frozen_base import frozen_key, space_settings, write_frozen_base
from orchestrator.search.judge import trial_judge_plan
from orchestrator.search.pareto import pareto_front, pick_point
from orchestrator.search.trial import build_payload, search_trial
from orchestrator.spec import JobSpec
from orchestrator.specs.search import SearchSpec, objective
from tune_spaces.loader import Dimension, SearchSpace, load_space, to_optuna, to_tune

__all__ = ["run_search", "trial_rows", "write_csv", "trial_resources", "trial_concurrency", "TRIAL_COLUMNS"]

TRIAL_COLUMNS = [
    "trial_id", "status", "rank", "target_sparsity", "bits", "quantizer", "tau", "lr", "step",
    "macro_ppl", "model_bytes", "sparsity", "adapter_bytes", "seconds",
]
METRIC_KEYS = ("macro_exact_match", "macro_accuracy", "macro_choice_accuracy", "macro_rouge_l", "judge_s")


def columns(search: SearchSpec) -> list[str]:
    """The CSV columns: :data:`TRIAL_COLUMNS`, with the task metric's after ``macro_ppl``."""
    key, _ = objective(search.metric)
    if search.metric == "ppl":
        return list(TRIAL_COLUMNS)
    at = TRIAL_COLUMNS.index("macro_ppl") + 1
    return [*TRIAL_COLUMNS[:at], key, *TRIAL_COLUMNS[at:], "judge_s"]


def _scheduler(search: SearchSpec, steps: int):
    """Two-objective ASHA (see :mod:`orchestrator.search.scheduler`) on (the objective, rung_bytes)."""
    from orchestrator.search.scheduler import ParetoASHA

    key, mode = objective(search.metric)
    return ParetoASHA("step", (key, "rung_bytes"), max_t=steps, grace_period=min(search.grace_period, steps),
                      reduction_factor=search.reduction_factor, modes=(mode, "min"))


def _optuna_search(seed: int, space, metric: str = "ppl"):
    from orchestrator.search.scheduler import FinalOnlyOptunaSearch

    try:
        import optuna  # noqa: F401
    except ImportError:
        raise StageError("search.algorithm 'optuna' needs optuna: pip install 'loraflock[optuna]'") from None
    key, mode = objective(metric)
    return FinalOnlyOptunaSearch(space=to_optuna(space), metric=[key, "model_bytes"], mode=[mode, "min"], seed=seed)


def _search_alg(search: SearchSpec, concurrent: int, space):
    if search.algorithm == "optuna":
        return _optuna_search(search.seed, space, search.metric)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=concurrent, random_state=search.seed)


def _num(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def trial_rows(results) -> list[dict]:
    """One row per trial of a ``ResultGrid``: hyperparameters, status and last measurements."""
    rows = []
    for r in results:
        m = r.metrics or {}
        config = r.config or {}
        if not config and (Path(r.path) / "params.json").is_file():  # a trial ended before its first report
            config = json.loads((Path(r.path) / "params.json").read_text())
        cfg = {k: _num(v) for k, v in config.items() if k != "_search"}
        status = "done" if m.get("final") else ("error" if r.error is not None else "stopped")
        row = {"trial_id": m.get("trial_id") or Path(r.path).name, "status": status, **cfg}
        for k in ("step", "macro_ppl", "model_bytes", "sparsity", "adapter_bytes", "seconds"):
            row[k] = _num(m.get(k))
        row.update({k: _num(m[k]) for k in METRIC_KEYS if k in m})
        row["bits"] = int(m.get("bits") or cfg.get("bits", 16))  # a bit_budget trial reports its rounded budget
        row["timestamp"] = m.get("timestamp")
        row["checkpoint"] = r.checkpoint.path if r.checkpoint is not None else None
        rows.append(row)
    return sorted(rows, key=lambda x: str(x["trial_id"]))


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """Rows as CSV (the given columns first, then any other keys), written atomically."""
    extra = sorted({k for r in rows for k in r} - set(columns) - {"checkpoint", "timestamp"})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns + extra, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns + extra})
    atomic_write_text(path, buf.getvalue())


def trial_job(spec: JobSpec) -> dict:
    """The job as the trials re-validate it: without its search section (a space path may
    not exist on workers) and without recycle (its checks may depend on ``search.pick``;
    trials do not recycle)."""
    return spec.model_dump(mode="json", exclude={"search", "recycle"})


def trial_resources(search: SearchSpec, spec: JobSpec) -> dict[str, float]:
    """One (unpacked) trial's Ray resources: its CPUs, and its GPU share with ``ray.use_gpu``."""
    return {"cpu": search.cpus_per_trial, **({"gpu": search.gpus_per_trial} if spec.ray.use_gpu else {})}


def trial_concurrency(search: SearchSpec, spec: JobSpec, nodes: list[dict] | None = None) -> int:
    """Trials at once: ``max_concurrent_trials``, else as many as the nodes hold, CPUs and GPUs counted
    per node (4 trials per GPU at ``gpus_per_trial: 0.25``).

    Raises:
        ResourceRequestError: no alive node can hold one trial (Tune would wait for one forever).
    """
    from orchestrator.cluster.nodes import alive_nodes, check_fits, fits_at_once

    nodes = alive_nodes(nodes)
    request = {k.upper(): float(v) for k, v in trial_resources(search, spec).items()}
    fix = ("lower search.gpus_per_trial or search.cpus_per_trial, or set ray.use_gpu: false" if spec.ray.use_gpu
           else "lower search.cpus_per_trial")
    check_fits(request, nodes, "each search trial", fix)
    if search.max_concurrent_trials is not None:
        return search.max_concurrent_trials
    return max(1, fits_at_once(request, nodes))


def with_job_base(space: SearchSpace, spec: JobSpec) -> SearchSpace:
    """The space with ``bits`` fixed to ``base.bits`` when the space does not vary it.

    A user who quantises the base (``base.bits: 4``) and searches rank, tau or sparsity
    expects every trial to run on that 4-bit base, not on the unquantised one. A mixed
    ``base.bit_budget`` is a per-matrix allocation that trials do not reproduce: trials
    then stay unquantised unless the space gives ``bits`` (the report says which bits
    each trial used).
    """
    b = spec.base
    if "bits" in space.dimensions or b.bits is None or b.bits >= 16:
        return space
    dims = {**space.dimensions, "bits": Dimension("bits", "value", (int(b.bits),))}
    return dataclasses.replace(space, dimensions=dims)


def trial_quant(search: SearchSpec, spec: JobSpec) -> dict:
    """Quantiser and LQ rounds of the trials: the search section's if set, else the base's."""
    q = spec.base.quant if spec.base.quantized else None
    pick = lambda field: getattr(search, field) if field in search.model_fields_set or q is None else getattr(q, field)  # noqa: E731
    return {"quantizer": pick("quantizer"), "lq_iters": pick("lq_iters")}


def run_search(
    spec: JobSpec,
    search: SearchSpec,
    data: list,
    out: str | Path,
    base_model_name: str | None = None,
    *,
    storage: str | Path | None = None,
) -> dict:
    """Run (or resume) the compression search and return the report's ``search`` section.

    Writes ``out/search/trials.csv``, ``out/search/pareto.csv``, ``out/plots/pareto.png`` and,
    with a pick rule, the picked trial's checkpoint under ``out/search/pick/``. A resumed run
    keeps the settings it was started with (Tune restores its own pickled state); change the
    search only with a new ``storage``.

    Args:
        spec: the job (base, tasks, LoRA targets and ``top_layers``, training settings).
        search: the search settings.
        data: ``tasks.TaskData`` list (tokenised on the driver).
        out: the job's output directory.
        base_model_name: recorded with the results.
        storage: Tune storage path (default ``out/ray``); the run lives in ``<storage>/search``
            and a later call with the same storage resumes it.

    Returns:
        ``{"space", "algorithm", "num_trials", "steps", "trials": [...], "pareto": [...],
        "pick": row | None, "pick_rule": {...} | None, "seconds", "plot": "plots/pareto.png"}``.

    Example:
        >>> section = run_search(spec, SearchSpec(enabled=True, space="demo"), data, "runs/demo")
    """
    t0 = time.perf_counter()
    out = Path(out).resolve()
    storage = Path(storage).resolve() if storage is not None else out / "ray"
    space = with_job_base(load_space(search.space), spec)
    steps = search.steps or spec.train.steps
    every = min(search.eval_every, steps)
    if search.grace_period > steps:
        raise StageError(f"search.grace_period ({search.grace_period}) exceeds the {steps} steps per trial: lower it")
    concurrent = trial_concurrency(search, spec)
    names = [d.name for d in data]
    # The prefix pass may use the whole search's CPUs, but no more than one node has.
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=1.0)
    threads = max(1, min(search.cpus_per_trial * concurrent, int(node_cpus)))
    payload_task = ray.remote(num_cpus=threads, num_gpus=0)(build_payload)
    job = trial_job(spec)
    payload = ray.get(
        payload_task.remote(
            job,
            names,
            [int(d.train_examples) for d in data],
            [np.ascontiguousarray(d.train_ids.numpy()) for d in data],
            [np.ascontiguousarray(d.eval_ids.numpy()) for d in data],
            threads,
            [None if d.train_mask is None else d.train_mask.numpy() for d in data],
            [None if d.eval_mask is None else d.eval_mask.numpy() for d in data],
            space_settings(space.dimensions) if search.quantize_layers == "all" else None,
            trial_quant(search, spec)["quantizer"],
        )
    )
    # each whole-base setting's packed codes: the pick writes its setting's; the trials never read them. Copied
    # out of the fetched object, whose zero-copy views would otherwise pin the whole payload during the search.
    stores = {key: {"section": st["section"], "tensors": {k: np.array(v) for k, v in st["tensors"].items()}}
              for key, st in ((key, rec.pop("store")) for key, rec in payload.get("frozen", {}).items())}
    judged = trial_judge_plan(spec, search, data)  # search.metric beyond ppl: the rows every trial judges
    if judged is not None:
        payload["judge"] = judged
    resources = trial_resources(search, spec)
    pack = None
    if search.packing:  # trial packing: see orchestrator/search/packed_trial.py
        from orchestrator.search.packed_trial import PackHosts

        if not spec.ray.use_gpu:
            print("[loraflock] search.packing on CPU: expect it to be slower than unpacked trials (fusing trials "
                  "saves no FLOPs on a CPU; see benchmarks/README.md); it pays off on GPUs", flush=True)

        rank_dim = space.dimensions.get("rank")
        max_rank = max([spec.lora.rank, *(int(v) for v in (rank_dim.values if rank_dim else ()))])
        pack = PackHosts(payload, spec, max_rank, capacity=2 * concurrent)
        trainable = pack.trainable(payload, resources)
    else:
        trainable = tune.with_resources(tune.with_parameters(search_trial, payload=payload), resources)
    del payload  # the trials read the object-store copy
    exp = storage / "search"
    if exp.exists() and tune.Tuner.can_restore(str(exp)):
        tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        fixed = {
            "steps": steps, "eval_every": every, "eval_subset": search.eval_subset, **trial_quant(search, spec),
            "gate_lambda": search.gate_lambda, "gate_lr": search.gate_lr, "threads": search.cpus_per_trial,
            "quantize_layers": search.quantize_layers,
        }
        tuner = tune.Tuner(
            trainable,
            # Optuna samples from its own define-by-run space (tune_spaces.loader.to_optuna)
            param_space={**(to_tune(space) if search.algorithm == "random" else {}), "_search": fixed},
            tune_config=tune.TuneConfig(
                num_samples=search.num_samples, scheduler=_scheduler(search, steps),
                search_alg=_search_alg(search, concurrent, space),
                # the variant generator enforces its own limit; Tune's applies to Searchers (optuna)
                max_concurrent_trials=concurrent if search.algorithm != "random" else None,
                reuse_actors=True,  # a trial's process keeps torch/transformers imported for the next
            ),
            run_config=tune.RunConfig(
                name="search", storage_path=str(storage), verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                failure_config=tune.FailureConfig(max_failures=spec.ray.max_failures),
                callbacks=tune_callbacks(spec.report_to, metrics_dir(out), spec.name) or None,  # report_to
            ),
        )
    try:
        results = tuner.fit()
        packing = pack.stats() if pack is not None else None
    finally:
        if pack is not None:
            pack.stop()
    section = _collect(results, search, space.source, steps, out, base_model_name, time.perf_counter() - t0,
                       trial_quant(search, spec), names, sorted(judged["plan"]) if judged else [], stores)
    return {**section, "packing": packing} if packing is not None else section


def _pick(search: SearchSpec, front: list[dict], out: Path, quant: dict, stores: dict[str, dict]) -> dict | None:
    """Apply ``search.pick`` to the front; copy the picked trial's checkpoint to ``out/search/pick``.

    With ``quantize_layers: all`` and a quantised pick, its base setting's packed frozen blocks
    and embedding (``stores[key]``, built once by the search) go to ``out/search/pick/quant_base``
    (:func:`orchestrator.search.frozen_base.write_frozen_base`).

    Returns the picked row plus what rebuilds its model (``quantizer``, ``lq_iters``,
    ``gate_lr``, ``quantize_layers``, and ``base_setting`` / ``quant_base`` for a whole-base
    setting), ``rule``, ``met`` (False: no point met the rule and ``on_miss: closest`` took the
    nearest one) and ``checkpoint`` (relative to ``out``); ``None`` without a rule.
    """
    if search.pick is None:
        return None
    rule = search.pick.model_dump(exclude_none=True, exclude={"on_miss"})
    key, mode = objective(search.metric)
    row = pick_point(front, **rule, objective=key, mode=mode)
    met = row is not None
    if row is None:
        what = ", ".join(f"{k} = {v}" for k, v in rule.items())
        if search.pick.on_miss == "error" or not front:
            raise StageError(
                f"search.pick ({what}): no point of the Pareto front meets it ({len(front)} finished trials; "
                f"see {out}/search/pareto.csv): relax the rule, or set search.pick.on_miss: closest"
            )
        # the nearest to the rule: the smallest model, the lowest perplexity, the highest metric
        if "max_bytes" in rule:
            key, sign = "model_bytes", 1.0
        elif "max_ppl" in rule:
            key, sign = "macro_ppl", 1.0
        else:
            key, sign = f"macro_{next(iter(rule['min_metric']))}", -1.0
        row = min(front, key=lambda r: (sign * float(r[key]), float(r["macro_ppl"]), float(r["model_bytes"])))
        print(f"[loraflock] search.pick ({what}): no point of the front meets it; picked the closest, trial "
              f"{row['trial_id']} ({key} {row[key]:.4g})", flush=True)
    if not row.get("checkpoint"):
        raise StageError(f"search.pick: trial {row['trial_id']} has no checkpoint under {out}/ray/search")
    dst = out / "search" / "pick"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(row["checkpoint"], dst)
    whole = {"quantize_layers": search.quantize_layers}
    key = frozen_key(row) if search.quantize_layers == "all" else None
    if key is not None:
        if key not in stores:
            raise StageError(f"search.pick: trial {row['trial_id']}'s base setting {key!r} was not built by this "
                             f"search (built: {sorted(stores)}); re-run the search stage")
        write_frozen_base(stores[key], dst / QUANT_DIR)
        whole |= {"base_setting": key, "quant_base": f"search/pick/{QUANT_DIR}"}
    return {**row, "quantizer": row.get("quantizer") or quant["quantizer"], "lq_iters": quant["lq_iters"],
            "gate_lr": search.gate_lr, **whole, "rule": {**rule, "on_miss": search.pick.on_miss}, "met": met,
            "checkpoint": "search/pick"}


def _collect(
    results, search: SearchSpec, source: str, steps: int, out: Path, base_model_name: str | None, seconds: float,
    quant: dict, names: list[str], judged_tasks: list[str], stores: dict[str, dict] | None = None,
) -> dict:
    rows = trial_rows(results)
    if not rows:
        raise StageError(f"the search produced no trials: see the logs under {out}/ray/search")
    done = [r for r in rows if r["status"] == "done"]
    key, mode = objective(search.metric)
    front = pareto_front(done, (key, "model_bytes"), (mode, "min"))
    front_ids = {r["trial_id"] for r in front}
    for r in rows:
        r["pareto"] = r["trial_id"] in front_ids
    (out / "search").mkdir(parents=True, exist_ok=True)
    write_csv(out / "search" / "trials.csv", rows, columns(search))
    write_csv(out / "search" / "pareto.csv", front, columns(search))
    picked = _pick(search, front, out, quant, stores or {})

    def public(r: dict) -> dict:
        return {k: v for k, v in r.items() if k not in ("checkpoint", "timestamp", "rule", "met")
                and not (isinstance(v, float) and math.isnan(v))}

    section = {
        "space": source,
        "algorithm": search.algorithm,
        "metric": search.metric,
        "objective": {"key": key, "mode": mode, **({"rows_per_task": search.metric_rows,
                                                    "tasks": judged_tasks} if judged_tasks else {})},
        "base": base_model_name,
        "num_trials": len(rows),
        "steps": steps,
        "trials": [public(r) for r in rows],
        "pareto": [public(r) for r in front],
        "picked": None if picked is None else {
            **public(picked), "rule": picked["rule"], "met": picked["met"], "checkpoint": picked["checkpoint"],
            "tasks": names},
        "seconds": seconds,
    }
    section["plot"] = plot_pareto(out, section)
    return section
