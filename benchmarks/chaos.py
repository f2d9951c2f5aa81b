"""Chaos check: kill Ray workers mid-job, interrupt the driver, and verify nothing is lost.

Run (tiny random-init model, ~4-6 min on a shared 2-core CPU):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/chaos.py

What it does, each step through ``python -m orchestrator.cli run`` as a subprocess on an
embedded local Ray:

1. Run A (flock + search, 4 tasks, ``train.checkpoint_every``): once Ray Train has recorded
   a mid-method checkpoint (``OUT_A/ray/flock/checkpoint_manager_snapshot.json``), SIGKILL the
   flock's Ray Train worker (``ray::RayTrainWorker``); once a Tune trial has checkpointed under
   ``OUT_A/ray/search/``, SIGKILL the trial's process (Ray 2.60 names a function trainable's
   actor ``ImplicitFunc``). Both are found only among the psutil descendants of this job's
   own CLI process: never a machine-wide name search, never ``ray stop``. The job must finish
   (``FailureConfig(max_failures)`` restarts the worker group from its last checkpoint; Tune
   retries the trial) with every adapter written.
2. Run B (flock only, new ``--out``): SIGINT the driver after the flock's first recorded checkpoint,
   then re-run the same command on the same ``--out``; the re-run must resume from the
   checkpoint (the worker prints "resumed from checkpoint" / "resumed at step") and give the
   same report task list (and, resume being exact, the same eval losses) as run A's flock,
   whose driver was never interrupted.

Prints ONE JSON object (progress goes to stderr): ``faults_injected``, ``job_succeeded``,
``adapters_expected``, ``adapters_written``, ``resumed_from_checkpoint``,
``resumed_report_tasks_equal``, plus the evidence behind each.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["json", "http", "email", "logging"]
RESUME_MARKERS = ("resumed at step", "resumed from checkpoint")
TRIAL_MARKERS = ("ImplicitFunc", "search_trial")  # Tune's function-trainable actor in Ray 2.60


def say(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def job_spec(name: str, steps: int, checkpoint_every: int, search: bool) -> dict:
    """A tiny random-init job: 4 tasks, the flock + one baseline, checkpoints every N steps."""
    return {
        "name": name,
        "base": {
            "random_init": {
                "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 257, "max_position_embeddings": 256,
            },
            "tokenizer": "bytes",
        },
        "tasks": [
            {"name": t, "source": {"kind": "builtin", "package": t}, "max_train_sequences": 16, "max_eval_sequences": 4}
            for t in TASKS
        ],
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "top_layers": 1},
        "train": {"steps": steps, "batch_size": 4, "seq_len": 64, "lr": 0.003, "log_every": 10,
                  "checkpoint_every": checkpoint_every},
        "flock": {"tau": 100, "baselines": ["unified"]},
        "search": {"enabled": search, "space": "demo", "num_samples": 3, "steps": 12, "eval_every": 3,
                   "grace_period": 12, "max_concurrent_trials": 1},
        "ray": {"max_failures": 2},
    }


class Job:
    """One ``loraflock run`` subprocess whose output is captured line by line."""

    def __init__(self, job_file: Path, out: Path, log_file: Path) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.log_file = log_file
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "run", str(job_file), "--out", str(out)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        self.seen: set[int] = set()  # every pid ever seen in this job's tree (for cleanup)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.log_file, "w") as log:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                self.lines.append(line)
                log.write(line)
                log.flush()

    def text(self) -> str:
        return "".join(self.lines)

    def descendants(self) -> list[psutil.Process]:
        """This job's process tree (children of the CLI process, recursively)."""
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen.update(p.pid for p in kids)
        return kids

    def find(self, markers: tuple[str, ...]) -> psutil.Process | None:
        for p in self.descendants():
            try:
                cmd = " ".join(p.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if any(m in cmd for m in markers):
                return p
        return None

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            say(f"job {self.proc.pid} ran past {timeout:.0f}s: killing its process tree")
            self.kill_tree()
            rc = self.proc.wait()
        self._reader.join(timeout=10)
        return rc

    def kill_tree(self) -> None:
        """SIGKILL this job's own processes, by pid (leftovers only; Ray normally cleans up)."""
        self.descendants()
        for pid in sorted(self.seen | {self.proc.pid}):
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass


def wait_for(cond, timeout: float, job: Job, poll: float = 0.1):
    """Poll ``cond()`` until it returns something truthy, the job exits, or time runs out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and job.proc.poll() is None:
        v = cond()
        if v:
            return v
        time.sleep(poll)
    return None


def has_checkpoint(d: Path) -> bool:
    return d.is_dir() and any(p.is_dir() for p in d.rglob("checkpoint_*"))


def registered_mid_method_checkpoint(flock_dir: Path) -> str | None:
    """The step of the latest mid-method checkpoint Ray Train has registered, e.g. ``hierarchical@20``.

    A checkpoint directory exists before the controller records it in
    ``checkpoint_manager_snapshot.json``; only a recorded one is restored after a failure,
    so the faults wait for it (killing earlier restarts the method from step 1: nothing to show).
    """
    f = flock_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(f.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):
        return None
    step = str((latest.get("metrics") or {}).get("step", ""))
    return step if "@" in step else None


def kill(job: Job, markers: tuple[str, ...], what: str, faults: list[dict]) -> None:
    p = job.find(markers)
    if p is None:
        say(f"no {what} process found in the job's tree: no fault injected")
        return
    try:
        cmd = " ".join(p.cmdline())[:120]
        p.send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        say(f"{what} process {p.pid} exited before the kill")
        return
    say(f"SIGKILL {what} pid {p.pid} ({cmd})")
    faults.append({"kind": "SIGKILL", "target": what, "pid": p.pid, "cmdline": cmd})


def adapters_in(out: Path) -> list[str]:
    return sorted(t for t in TASKS if (out / "adapters" / t / "adapter_model.safetensors").is_file()
                  and (out / "adapters" / t / "adapter_config.json").is_file())


def report_of(out: Path) -> dict | None:
    f = out / "report.json"
    return json.loads(f.read_text()) if f.is_file() else None


def run_a(work: Path, steps: int, every: int, faults: list[dict], timeout: float) -> dict:
    """Flock + search with a worker killed mid-flock and a trial killed mid-search."""
    job_file, out = work / "a.yaml", work / "a_out"
    job_file.write_text(yaml.safe_dump(job_spec("chaos-a", steps, every, search=True)))
    job = Job(job_file, out, work / "a.log")
    t0 = time.monotonic()
    try:
        at = wait_for(lambda: registered_mid_method_checkpoint(out / "ray" / "flock"), timeout, job)
        if at:
            kill(job, ("RayTrainWorker",), f"Ray Train worker (flock, after checkpoint {at})", faults)
        if wait_for(lambda: has_checkpoint(out / "ray" / "search") and job.find(TRIAL_MARKERS), timeout, job):
            kill(job, TRIAL_MARKERS, "Tune trial (search)", faults)
        rc = job.wait(max(10.0, timeout - (time.monotonic() - t0)))
    finally:
        job.kill_tree()
    text = job.text()
    rep = report_of(out)
    trials = (rep or {}).get("search", {}).get("trials", [])
    return {
        "rc": rc, "out": str(out), "seconds": round(time.monotonic() - t0, 1), "report": rep,
        "worker_resume_lines": [ln.strip()[:160] for ln in text.splitlines() if any(m in ln for m in RESUME_MARKERS)],
        "trial_status": [t.get("status") for t in trials],
        "driver_traceback": _driver_traceback(text),
    }


def _driver_traceback(text: str) -> bool:
    """A traceback printed by the CLI process itself (Ray actors' lines carry a ``(Name pid=..)`` prefix)."""
    return any(ln.startswith("Traceback") for ln in text.splitlines())


def run_b(work: Path, steps: int, every: int, faults: list[dict], timeout: float) -> dict:
    """Flock only: SIGINT the driver after the first checkpoint, then re-run on the same --out."""
    job_file, out = work / "b.yaml", work / "b_out"
    job_file.write_text(yaml.safe_dump(job_spec("chaos-b", steps, every, search=False)))
    job = Job(job_file, out, work / "b1.log")
    try:
        at = wait_for(lambda: registered_mid_method_checkpoint(out / "ray" / "flock"), timeout, job)
        if at:
            job.proc.send_signal(signal.SIGINT)
            say(f"SIGINT driver pid {job.proc.pid} during the flock (after checkpoint {at})")
            faults.append({"kind": "SIGINT", "target": f"driver (loraflock run), after checkpoint {at}",
                           "pid": job.proc.pid})
        rc1 = job.wait(120)
    finally:
        job.kill_tree()  # whatever Ray's own shutdown left behind, by pid
    interrupted = report_of(out) is None
    say(f"interrupted run exited {rc1}; report.json written: {not interrupted}; re-running on the same --out")
    job2 = Job(job_file, out, work / "b2.log")
    try:
        rc2 = job2.wait(timeout)
    finally:
        job2.kill_tree()
    text = job2.text()
    return {
        "rc_interrupted": rc1, "rc_resumed": rc2, "out": str(out), "interrupted_before_report": interrupted,
        "report": report_of(out),
        "resume_lines": [ln.strip()[:160] for ln in text.splitlines() if any(m in ln for m in RESUME_MARKERS)],
        "driver_traceback": _driver_traceback(text),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120, help="flock steps per method (time to kill)")
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=240, help="seconds allowed per job run")
    ap.add_argument("--workdir", help="keep outputs here (default: a temporary directory)")
    a = ap.parse_args()
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    work = Path(a.workdir or tempfile.mkdtemp(prefix="loraflock-chaos-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    say(f"work directory {work}")
    faults: list[dict] = []
    A = run_a(work, a.steps, a.checkpoint_every, faults, a.timeout)
    say(f"run A exited {A['rc']} in {A['seconds']}s")
    B = run_b(work, a.steps, a.checkpoint_every, faults, a.timeout)
    say(f"run B resumed run exited {B['rc_resumed']}")

    rep_a, rep_b = A["report"] or {}, B["report"] or {}
    written = adapters_in(Path(A["out"])) + adapters_in(Path(B["out"]))
    tasks_a = sorted(rep_a.get("flock", {}).get("tasks", {}))
    tasks_b = sorted(rep_b.get("flock", {}).get("tasks", {}))
    rel = None
    if tasks_a and tasks_a == tasks_b:
        la = [rep_a["flock"]["tasks"][t]["eval_loss"] for t in tasks_a]
        lb = [rep_b["flock"]["tasks"][t]["eval_loss"] for t in tasks_b]
        rel = max(abs(x - y) / abs(x) for x, y in zip(la, lb))
    result = {
        "faults_injected": len(faults),
        "job_succeeded": A["rc"] == 0 and B["rc_resumed"] == 0 and bool(rep_a) and bool(rep_b),
        "adapters_expected": 2 * len(TASKS),
        "adapters_written": len(written),
        "resumed_from_checkpoint": bool(B["resume_lines"]) and B["interrupted_before_report"],
        "resumed_report_tasks_equal": bool(tasks_b) and tasks_b == tasks_a
        and rep_b.get("job", {}).get("tasks") == rep_a.get("job", {}).get("tasks"),
        "resumed_eval_loss_max_rel_diff": rel,
        "faults": faults,
        "run_a": {k: v for k, v in A.items() if k != "report"},
        "run_b": {k: v for k, v in B.items() if k != "report"},
        "flock_steps": a.steps, "checkpoint_every": a.checkpoint_every,
        "seconds": round(time.monotonic() - t0, 1),
        "loadavg_1m_start": round(load0, 2), "loadavg_1m_end": round(os.getloadavg()[0], 2),
        "machine": f"{os.cpu_count()}-core CPU, OMP_NUM_THREADS=1",
        "workdir": str(work),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
