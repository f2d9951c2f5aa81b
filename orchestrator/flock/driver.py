"""The flock stage on the driver: split tasks over Ray Train workers, run, collect.

Data is tokenised once on the driver and put in the object store; each worker reads its
tasks' rows from there. Tasks are assigned to workers by size (longest-processing-time
greedy), so workers finish together. Results and the flock's adapters come back through
the final Ray Train checkpoint (merged from every worker), so this works on a multi-node
cluster with any ``storage_path``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import cast

import numpy as np
import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from orchestrator.contracts import FlockResults, MethodRecord, PescPart, WorkerResults
from orchestrator.errors import StageError
from orchestrator.flock.methods import methods_of
from orchestrator.flock.worker import flock_worker
from orchestrator.metrics.flock import log_flock_results
from orchestrator.metrics.sink import MetricSink, metrics_dir
from orchestrator.pesc.stage import merge_pesc
from orchestrator.spec import JobSpec
from orchestrator.task_metrics import metric_plan

__all__ = ["assign_tasks", "run_flock"]


def assign_tasks(sizes: list[int], workers: int) -> list[list[int]]:
    """Balance tasks over workers by training size (LPT greedy); every worker gets >= 1 task."""
    if workers > len(sizes):
        raise StageError(
            f"ray.num_workers = {workers} but the job has only {len(sizes)} tasks: use at most {len(sizes)} workers"
        )
    loads = [0] * workers
    out: list[list[int]] = [[] for _ in range(workers)]
    for t in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        w = min(range(workers), key=lambda i: (loads[i], len(out[i])))
        out[w].append(t)
        loads[w] += sizes[t]
    return [sorted(a) for a in out]


@ray.remote(num_cpus=1)
def _base_arrays(spec_dict: dict) -> dict:
    """Load the base once (on CPU) and hand its weights to the object store as numpy.

    In the workers' dtype (:func:`orchestrator.base.load.store_dtype`: bf16 for GPU workers
    with ``base.dtype: auto``, fp32 for CPU workers), so a GPU worker's copy to its device is
    the only copy. With ``base.bits``/``base.bit_budget`` the base is quantised here, once for
    the job, from its fp32 weights: the store then holds the packed codes, the LQ factors (fp32)
    and the rest of the base in the workers' dtype, not the fp32 matrices.
    """
    import torch

    from models.precision import cast_frozen
    from orchestrator.base.load import load_job_base, store_dtype
    from orchestrator.base.store import base_arrays

    spec = JobSpec.model_validate(spec_dict)
    b = spec.base
    dtype = store_dtype(spec)
    if not b.quantized:
        return base_arrays(load_job_base(spec, "cpu", dtype))
    from orchestrator.base.quant import build_quant_base

    model = load_job_base(spec, "cpu", "float32")
    summary, factors = build_quant_base(model, spec)
    cast_frozen(model, getattr(torch, dtype))
    return base_arrays(model, factors, summary)


def _cpus_per_worker(spec: JobSpec) -> float:
    """Sized per node (a worker's share never exceeds what one node has); an impossible request raises."""
    from orchestrator.cluster.nodes import cpus_per_worker

    return cpus_per_worker(spec.ray.cpus_per_worker, spec.ray.num_workers, spec.ray.use_gpu, ray.nodes())


def run_flock(spec: JobSpec, data: list, out: Path, storage: Path, base_model_name: str | None) -> FlockResults:
    """Train the flock (and its baselines); write ``adapters/``; return the stage's results.

    Args:
        spec: the validated job.
        data: ``tasks.TaskData`` list (tokenised on the driver).
        out: the job's output directory.
        storage: Ray Train storage path (checkpoints).
        base_model_name: recorded in every adapter_config.json.
    """
    names = [d.name for d in data]
    sizes = [int(d.train_examples) for d in data]
    payload = {
        "names": names,
        "sizes": sizes,
        "train": [np.ascontiguousarray(d.train_ids.numpy()) for d in data],
        "eval": [np.ascontiguousarray(d.eval_ids.numpy()) for d in data],
        # scored-token masks (instruction formats, padded rows); None: every token is scored
        "train_mask": [None if d.train_mask is None else d.train_mask.numpy() for d in data],
        "eval_mask": [None if d.eval_mask is None else d.eval_mask.numpy() for d in data],
    }
    payload["metric_plan"] = metric_plan(spec, data)  # tasks judged beyond ppl: prompts, references, labels
    assignment = assign_tasks(sizes, spec.ray.num_workers)
    # The frozen base goes into the object store once (as numpy, returned by a Ray task so the
    # driver owns it); every flock worker on a node maps those pages instead of loading a copy.
    base_ref = _base_arrays.remote(spec.model_dump(mode="json")) if spec.ray.share_base else None
    cpus = _cpus_per_worker(spec)
    trainer = TorchTrainer(
        flock_worker,
        train_loop_config={
            "spec": spec.model_dump(mode="json"),
            "data_ref": ray.put(payload),
            "assignment": assignment,
            "base_model_name": base_model_name,
            "base_ref": base_ref,
            "outputs_dir": str(storage / "flock" / "outputs"),  # deliverables, written once by the workers
            "metrics_dir": str(metrics_dir(out)),  # report_to: rank 0 writes its streams here
        },
        scaling_config=ScalingConfig(
            num_workers=spec.ray.num_workers,
            use_gpu=spec.ray.use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if spec.ray.use_gpu else {})},
        ),
        run_config=RunConfig(
            name="flock",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=spec.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except SystemExit:  # Ray Train V2's own SIGINT handler aborts the run with sys.exit(0)
        raise KeyboardInterrupt from None
    if result.checkpoint is None:
        raise StageError(f"the flock finished without a checkpoint: see the worker logs under {storage}/flock")
    merged = cast(FlockResults, {"base_eval_nll": {}, "methods": {}})  # assignment and sizes come last
    pesc_parts: list[PescPart] = []
    with result.checkpoint.as_directory() as d:
        for f in sorted((Path(d) / "results").glob("rank*.json")):
            part = cast(WorkerResults, json.loads(f.read_text()))
            merged["base_eval_nll"].update(part["base_eval_nll"])
            if part.get("base_metrics"):
                merged.setdefault("base_metrics", {}).update(part["base_metrics"])
            if "pesc" in part:
                pesc_parts.append(part["pesc"])
            if part.get("quant"):  # the quantised base's report (identical on every worker)
                merged["quant"] = part["quant"]
            for m, r in part["methods"].items():
                _merge_method(merged["methods"], m, r)
    _deliver(storage / "flock" / "outputs", out)
    expected = [m for m, _, _ in methods_of(spec)]
    missing = [m for m in expected if m not in merged["methods"]]
    if missing:
        raise StageError(f"the flock did not finish methods {missing}; re-run the job to resume")
    if spec.pesc.enabled:
        if not pesc_parts:
            raise StageError("the pesc stage did not finish; re-run the job to resume")
        merged["pesc"] = merge_pesc(pesc_parts)
    merged["assignment"] = {f"worker{i}": [names[t] for t in a] for i, a in enumerate(assignment)}
    merged["sizes"] = dict(zip(names, sizes))
    if spec.report_to:  # every task's curves (all workers' results), tau, expert load
        log_flock_results(lambda stream: MetricSink(spec.report_to, metrics_dir(out), spec.name, stream),
                          cast(dict, merged))
    return merged


def _deliver(outputs: Path, out: Path) -> None:
    """Move the workers' deliverables into the run's folder: a rename each, no copy.

    ``adapters/``, ``prior/``, ``pesc/``, ``quant_base/`` and ``export/`` each replace their old
    version whole. A folder already moved (a driver that stopped half-way and re-ran) is left
    as it is; a storage path on another filesystem falls back to a copy.
    """
    for sub in ("adapters", "prior", "pesc", "quant_base", "export"):
        src = outputs / sub
        if not src.is_dir():
            continue
        dst, old = out / sub, out / f".{sub}.old"
        shutil.rmtree(old, ignore_errors=True)
        if dst.exists():
            dst.rename(old)
        try:
            src.rename(dst)
        except OSError:  # another filesystem: copy, then drop the source
            shutil.copytree(src, dst)
            shutil.rmtree(src)
        shutil.rmtree(old, ignore_errors=True)


def _merge_method(methods: dict[str, MethodRecord], name: str, r: MethodRecord) -> None:
    """Fold one worker's record of a method into the merged one (tasks are disjoint across workers)."""
    tgt = methods.get(name)
    if tgt is None:  # the first worker's record, without its per-task figures
        tgt = methods[name] = cast(
            MethodRecord, {k: v for k, v in r.items() if k not in ("eval_nll", "failed")} | {"eval_nll": {}}
        )
        if "eval_curve" in r:
            tgt["eval_curve"] = [[step, {}] for step, _ in r["eval_curve"]]
    tgt["eval_nll"].update(r["eval_nll"])
    if r.get("metrics"):
        tgt.setdefault("metrics", {}).update(r["metrics"])
    tgt.setdefault("failed", {}).update(r.get("failed", {}))
    if "gates" in r:  # per-task sparsity from every worker (task scope differs per task)
        tgt["gates"]["tasks"].update(r["gates"]["tasks"])
    for mine, theirs in zip(tgt.get("eval_curve", []), r.get("eval_curve", [])):  # same steps on every worker
        mine[1].update(theirs[1])
    tgt["seconds"] = max(tgt["seconds"], r["seconds"])
