"""The job pipeline: JobSpec -> [flock] -> report, on an embedded or remote Ray cluster.

State is explicit (:class:`StageState` per stage in ``state.json``), so re-running
``loraflock run`` on the same ``--out`` skips finished stages and lets a half-finished
stage resume from its Ray checkpoints. An output directory that holds another job's
results is refused rather than mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path

from models.files import atomic_write_json
from orchestrator.base.load import base_model_name
from orchestrator.cluster.ray_logging import SETUP_HOOK
from orchestrator.console import say
from orchestrator.data import build_job_data
from orchestrator.errors import ClusterAddressError, OutputDirError
from orchestrator.spec import JobSpec

__all__ = ["run_job", "StageState", "init_ray", "ROWS_DIR"]

ROWS_DIR = ".rows"  # the job's row store (tasks/row_store.py), inside --out


class StageState(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    FINISHED = "finished"


def spec_fingerprint(spec: JobSpec) -> str:
    """Hash of everything that changes results (not where it runs)."""
    d = spec.model_dump(mode="json", exclude={"ray": {"address", "include_dashboard"}, "report_to": True})
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _check_output(out: Path, spec: JobSpec) -> dict | None:
    """Refuse ``out`` if it is another job's or not loraflock's; return its saved state (None: a new job).

    Reads only, so it can run before anything (the row store included) is written there.
    """
    marker = out / "job.json"
    if marker.is_file():
        try:
            prev = json.loads(marker.read_text())
        except json.JSONDecodeError:
            prev = {}
        if prev.get("fingerprint") != spec_fingerprint(spec):
            raise OutputDirError(
                f"{out} holds the results of another job ({prev.get('name', 'unknown')!r}, a different spec); "
                "choose a new --out directory, or delete this one to start over"
            )
        state_file = out / "state.json"
        return json.loads(state_file.read_text()) if state_file.is_file() else {}
    if out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise OutputDirError(
            f"{out} is not empty and was not written by loraflock: choose an empty or new --out directory"
        )
    return None


def _claim_output(out: Path, spec: JobSpec) -> dict:
    """Create/verify ``out``; return its saved state (empty for a new job)."""
    state = _check_output(out, spec)
    if state is not None:
        return state
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "job.json", {"name": spec.name, "fingerprint": spec_fingerprint(spec),
                                         "spec": spec.model_dump(mode="json")})
    return {}


def init_ray(address: str | None, include_dashboard: bool = False) -> None:
    """Connect to ``address`` or start an embedded local Ray bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if address or os.environ.get("RAY_ADDRESS"):
        address = address or os.environ["RAY_ADDRESS"]
        _probe(address)
        say(f"connecting to the Ray cluster at {address}")
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        say("starting an embedded local Ray (127.0.0.1, dashboard " + ("on" if include_dashboard else "off") + ")")
        ray.init(
            # "local": always a new instance; a bare init() would join whatever cluster a stale
            # ray_current_cluster file names and hang for minutes when that head is dead
            address="local",
            include_dashboard=include_dashboard,
            dashboard_host="127.0.0.1",
            logging_level=logging.WARNING,
            configure_logging=True,
            # no dashboard, no State API: keep Ray Train's State API polling out of the console
            runtime_env=None if include_dashboard else {"worker_process_setup_hook": SETUP_HOOK},
        )


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when a cluster address does not answer."""
    import socket
    from urllib.parse import urlparse

    if address in ("auto", "local"):
        return
    u = urlparse(address if "://" in address else f"tcp://{address}")
    if not u.hostname or not u.port:
        raise ClusterAddressError(f"--address {address!r}: give HOST:PORT (GCS, e.g. 10.0.0.1:6379) or ray://HOST:10001")
    try:
        socket.create_connection((u.hostname, u.port), timeout=timeout).close()
    except OSError as e:
        raise ClusterAddressError(
            f"cannot reach a Ray cluster at {address} ({e.strerror or e}); check the address and that the head "
            "node is running, or leave --address out to run on an embedded local Ray"
        ) from None


def run_job(spec: JobSpec, out: str | Path, address: str | None = None) -> dict:
    """Run every enabled stage of ``spec``; write ``out``; return report.json's content.

    Args:
        spec: the validated job.
        out: output directory (local path).
        address: Ray address; overrides ``spec.ray.address``; ``None`` = embedded local Ray.

    Example:
        >>> from orchestrator import load_job, run_job
        >>> report = run_job(load_job("examples/tiny.yaml"), "runs/tiny")
    """
    from orchestrator.preflight import preflight
    from orchestrator.report.data import data_section
    from orchestrator.report.writer import flock_section, pesc_section, write_report

    out = Path(out).resolve()
    preflight(spec)  # bad targets/ranks fail here, in seconds, before Ray starts
    target = address or spec.ray.address or os.environ.get("RAY_ADDRESS")
    if target:
        _probe(target)  # an unreachable cluster fails before anything is written
    t0 = time.perf_counter()
    say(
        f"job {spec.name!r}: {len(spec.tasks)} tasks"
        + (f" + {len(spec.task_sets)} task sets" if spec.task_sets else "")
        + f", output {out}"
    )
    _check_output(out, spec)  # another job's or a foreign folder is refused before the row store goes there
    # Bad data files fail here, before Ray starts. The rows go to a row store in the run's folder
    # (a dot name: claiming the folder ignores it), which every node sees and the flock maps.
    data = build_job_data(spec, rows_dir=out / ROWS_DIR)
    new_task = None
    if spec.recycle.enabled and spec.recycle.new_task is not None:
        (new_task,) = build_job_data(spec, [spec.recycle.new_task])
    data_s = time.perf_counter() - t0
    state = _claim_output(out, spec)  # only now, so a failed data check leaves nothing behind
    state.setdefault("stages", {})
    state.setdefault("results", {})
    timing: dict[str, float] = dict(state.get("timing", {}))
    timing["data_s"] = data_s

    def save_state() -> None:
        state["timing"] = timing
        atomic_write_json(out / "state.json", state)

    enabled = {"flock": spec.flock.enabled, "search": spec.search.enabled, "recycle": spec.recycle.enabled}
    if any(on and state["stages"].get(n) != StageState.FINISHED for n, on in enabled.items()):
        init_ray(address or spec.ray.address, spec.ray.include_dashboard)  # only when there is work left

    def stage(name: str, enabled: bool, run: Callable[[], dict], what: str) -> None:
        """Run one stage unless it already finished (state.json), timing it."""
        if not enabled:
            return
        if state["stages"].get(name) == StageState.FINISHED:
            say(f"stage {name}: already finished, skipped")
            return
        state["stages"][name] = StageState.RUNNING
        save_state()
        say(f"stage {name}: {what}")
        t1 = time.perf_counter()
        state["results"][name] = run()
        timing[f"{name}_s"] = time.perf_counter() - t1
        state["stages"][name] = StageState.FINISHED
        save_state()

    def flock() -> dict:
        from orchestrator.flock.driver import run_flock

        return run_flock(spec, data, out, out / "ray", base_model_name(spec))

    def search() -> dict:
        from orchestrator.search.driver import run_search

        return run_search(spec, spec.search, data, out, base_model_name(spec))

    def recycle() -> dict:
        from orchestrator.recycle.driver import run_recycle

        picked = state["results"].get("search", {}).get("picked") if spec.search.enabled else None
        return run_recycle(spec, out, new_task, base_model_name(spec), picked, [d.name for d in data])

    methods = ", ".join(m for m, _, _ in _methods(spec)) + (", then pesc" if spec.pesc.enabled else "")
    stage("flock", spec.flock.enabled, flock, f"training {methods}")
    pesc = state["results"].get("flock", {}).get("pesc")
    if pesc and "pesc_s" not in timing:  # PESC ran on the flock's workers, base and prefix cache
        timing["pesc_s"] = pesc["seconds"]
        timing["flock_s"] -= pesc["seconds"]
        save_state()
    n_trials = spec.search.num_samples * (_grid_size(spec.search.space) if spec.search.enabled else 1)
    stage("search", spec.search.enabled, search, f"{n_trials} Ray Tune trials over tune_spaces/{spec.search.space}")
    what = "the picked search trial's" if spec.search.enabled and spec.search.pick else "the flock's"
    stage("recycle", spec.recycle.enabled, recycle, f"recycling {what} adapters into a principal subspace")

    report: dict = {"job": _job_summary(spec, data), "data": data_section(data, getattr(data, "task_sets", None)),
                    "timing": {}}
    if "flock" in state["results"]:
        report["flock"] = flock_section(state["results"]["flock"], spec.flock.tau, spec.flock.tau_sweep)
        if state["results"]["flock"].get("quant"):  # base.bits / base.bit_budget: the quantised base's figures
            report["base"] = {"quant": state["results"]["flock"]["quant"]}
        if "pesc" in state["results"]["flock"]:
            report["pesc"] = pesc_section(state["results"]["flock"])
    if "search" in state["results"]:
        report["search"] = state["results"]["search"]
    if "recycle" in state["results"]:
        report["recycle"] = state["results"]["recycle"]
    timing.pop("total_s", None)
    # every stage's time, across invocations when the job was resumed
    timing["total_s"] = sum(v for k, v in timing.items() if k.endswith("_s"))
    report["timing"] = timing
    save_state()
    write_report(out, report)
    fl = report.get("flock")
    if fl:
        say(f"macro perplexity: base {fl['base_macro_ppl']:.2f} -> flock {fl['macro_ppl']:.2f}"
             + "".join(f", {k} {v['macro_ppl']:.2f}" for k, v in fl["baselines"].items()))
    say(f"done in {time.perf_counter() - t0:.0f}s: {out / 'report.md'}")
    return report


def _methods(spec: JobSpec):
    from orchestrator.flock.methods import methods_of

    return methods_of(spec)


def _grid_size(space: str) -> int:
    from tune_spaces.loader import load_space

    return load_space(space).grid_size()


def _job_summary(spec: JobSpec, data: list) -> dict:
    return {
        "name": spec.name,
        "base": spec.base.name or f"random {spec.base.random_init.get('model_type')}",
        "tasks": [d.name for d in data],
        "rank": spec.lora.rank,
        "alpha": spec.lora.alpha,
        "target_modules": spec.lora.target_modules,
        "top_layers": spec.lora.top_layers,
        "steps": spec.train.steps,
        "batch_size": spec.train.batch_size,
        "seq_len": spec.train.seq_len,
        "seed": spec.train.seed,
        **({"gates": spec.gates.model_dump(mode="json", by_alias=True)} if spec.gates.enabled else {}),
    }
