"""Where a many-task job's time and memory go, from 8 to 4,096 tasks (issue 19, item 7).

    OMP_NUM_THREADS=1 flock /tmp/loraflock-test.lock .venv/bin/python benchmarks/task_scaling.py \\
        --model tiny --tasks 8,64,512,4096
    ... --model smollm2 --tasks 8,64,256 --steps 100           # SmolLM2-135M, the demo's base
Quick: ``--model tiny --tasks 8,64`` (~1 min).

Each configuration is a whole ``loraflock run`` (``orchestrator.run_job``) in a fresh process
with an embedded Ray started before the clock: a parquet table of ``--rows`` training and
``--eval-rows`` held-out ``prompt_completion`` examples per task (random sentences of
``--words`` words each side, by default long enough that a row nearly fills ``--seq`` tokens:
batches are cut to their last scored token, so shorter rows would measure shorter rows;
``row_fill`` in the JSON is the share of ``--seq`` a row uses), one task set split by its ``task``
column, the hierarchical flock only (no baselines, PESC, search or recycle), adapters (rank
``--rank``) on the top ``--top`` blocks so the frozen-prefix cache runs, ``--steps`` steps of
``--batch`` rows, ``--workers`` Ray Train workers.

Prints one JSON line per configuration: seconds for ``data`` (tokenise + row store),
``startup`` (Ray Train's worker start + base load + adapter injection, the slowest worker),
``prefix``, ``steps`` (the step loop), ``eval`` (base and final evaluations), ``save``
(adapters, prior, checkpoints), ``report`` (the rest of the job: report.md/json, tasks.csv,
plots), ``total`` and ``outside_steps`` (= total - steps), each worker's peak RSS and the
driver's, and the bytes the job wrote (row store, adapters, Ray storage, the rest). Worker
phases are the workers' own ``timing`` (report.json ``flock.workers``); a phase is the
maximum over workers (they run side by side). Targets (issue 19): a 1,024-task tiny job
spends < 60 s outside training steps; SmolLM2 256 tasks x 100 steps x 8 rows x 64 tokens:
flock stage <= 1.5x its steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 257, "max_position_embeddings": 256}
WORDS = ("alpha beta gamma delta river stone cloud paper orange window silver garden market pencil "
         "yellow bridge candle forest button rocket").split()


def make_table(path: Path, tasks: int, rows: int, eval_rows: int, words: int, seed: int = 0) -> None:
    """``tasks`` x (``rows`` train + ``eval_rows`` test) prompt/completion examples, tasks interleaved."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n = tasks * (rows + eval_rows)
    task = np.repeat(np.arange(tasks), rows + eval_rows)
    split = np.tile(np.array(["train"] * rows + ["test"] * eval_rows), tasks)
    order = rng.permutation(n)
    vocab = np.array(WORDS)

    def sentences(k: int) -> list[str]:
        return [" ".join(s) for s in vocab[rng.integers(0, len(vocab), size=(n, k))]]

    pq.write_table(pa.table({"task": [f"t{t:05d}" for t in task[order]], "split": split[order],
                             "prompt": sentences(words), "completion": sentences(words)}), path)


def job_spec(args, n: int, table: Path) -> dict:
    base = {"random_init": TINY, "tokenizer": "bytes"} if args.model == "tiny" else {"name": "smollm2-135m"}
    targets = ["q_proj", "v_proj", "down_proj"] if args.model == "tiny" else [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    workers = min(args.workers, n)
    return {
        "name": f"scale-{args.model}-{n}",
        "base": base,
        "task_sets": [{"name": "tasks", "task_field": "task", "min_examples": 1,
                       "eval_split": {"field": "split", "value": "test"},
                       "source": {"kind": "files", "path": str(table), "example_format": "prompt_completion"}}],
        "lora": {"rank": args.rank, "alpha": 2 * args.rank, "target_modules": targets, "top_layers": args.top},
        "train": {"steps": args.steps, "batch_size": args.batch, "seq_len": args.seq, "lr": 3e-3,
                  "log_every": max(1, args.steps // 4)},
        "flock": {"tau": 100, "baselines": []},
        "pesc": {"enabled": False},
        "search": {"enabled": False},
        "recycle": {"enabled": False},
        "ray": {"num_workers": workers, "cpus_per_worker": max(0.1, (os.cpu_count() or 2) / workers)},
    }


def _bytes(root: Path) -> dict:
    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0

    from orchestrator.pipeline import ROWS_DIR

    parts = {"row_store": size(root / ROWS_DIR), "adapters": size(root / "adapters"), "ray_storage": size(root / "ray")}
    parts["total"] = size(root)
    parts["other"] = parts["total"] - sum(v for k, v in parts.items() if k != "total")
    return parts


def _fill(root: Path) -> float:
    """Mean share of a row's ``--seq`` columns up to its last scored token (what a cut batch runs)."""
    from orchestrator.pipeline import ROWS_DIR
    from tasks.row_store import RowStore

    store = RowStore(root / ROWS_DIR)
    used = []
    for t in range(min(len(store), 64)):
        m = store.mask(t)
        if m is None:
            return 1.0
        cols = np.arange(m.shape[1])
        used.append(((m * cols).max(axis=1) + 1) / m.shape[1])
    return round(float(np.concatenate(used).mean()), 3) if used else 0.0


def run_one(args, n: int) -> dict:
    """One configuration in this process: table, Ray (untimed), the job, its figures."""
    from orchestrator.pipeline import init_ray, run_job
    from orchestrator.spec import JobSpec

    work = Path(args.out) / f"{args.model}-{n}"
    work.mkdir(parents=True, exist_ok=True)
    table = work / "table.parquet"
    make_table(table, n, args.rows, args.eval_rows, args.words)
    spec = JobSpec.model_validate(job_spec(args, n, table))
    init_ray(None)
    out = work / "run"
    t0 = time.perf_counter()
    report = run_job(spec, out)
    total = time.perf_counter() - t0
    timing, workers = report["timing"], report["flock"].get("workers", {})

    def worst(*keys: str) -> float:
        return round(max((sum(w.get(k, 0.0) for k in keys) for w in workers.values()), default=0.0), 2)

    phases = {"data_s": round(timing["data_s"], 2), "startup_s": worst("launch_s", "startup_s"),
              "prefix_s": worst("prefix_s"), "steps_s": worst("steps_s"), "eval_s": worst("base_eval_s", "eval_s"),
              "save_s": worst("save_s"), "report_s": round(total - timing["data_s"] - timing["flock_s"], 2)}
    return {
        "model": args.model, "tasks": n, "workers": spec.ray.num_workers,
        "rows_per_task": args.rows, "eval_rows_per_task": args.eval_rows, "steps": args.steps,
        "batch": args.batch, "seq": args.seq, **phases,
        "flock_s": round(timing["flock_s"], 2), "total_s": round(total, 2),
        "outside_steps_s": round(total - phases["steps_s"], 2),
        "flock_over_steps": round(timing["flock_s"] / max(phases["steps_s"], 1e-9), 2),
        "peak_rss_mb": {k: round(w.get("peak_rss_mb", 0.0)) for k, w in sorted(workers.items())},
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "bytes_written": _bytes(out),
        "row_fill": _fill(out),
        "macro_ppl": {k: round(report["flock"][f], 3) for k, f in (("base", "base_macro_ppl"), ("flock", "macro_ppl"))},
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--tasks", default="8,64,512,4096", help="comma-separated task counts")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rows", type=int, default=8, help="training examples per task")
    p.add_argument("--eval-rows", type=int, default=2, help="held-out examples per task")
    p.add_argument("--words", type=int, default=None,
                   help="words per prompt and per completion (default: rows nearly full at --seq 64: "
                        "4 tiny (byte tokens), 29 smollm2)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--top", type=int, default=1, help="adapted top blocks (the rest is the frozen prefix)")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one, removed)")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # run one size in this process
    args = p.parse_args()
    args.words = args.words or (4 if args.model == "tiny" else 29)
    if args.one is not None:
        print(json.dumps(run_one(args, args.one)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="task-scaling-") as tmp:
        out = args.out or tmp
        for n in [int(x) for x in args.tasks.split(",")]:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--one", str(n), "--out", out]
            res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
            if res.returncode != 0 or not lines:
                print(json.dumps({"model": args.model, "tasks": n, "error": f"exit {res.returncode}"}), flush=True)
                continue
            print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
