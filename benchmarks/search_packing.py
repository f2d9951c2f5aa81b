"""Search wall time with trial packing vs without: the same Tune search run twice, in one process.

Run (SmolLM2-135M, a scaled-down demo search; ~8 min on a shared 2-core CPU):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/search_packing.py
Quick (tiny random model, ~2 min):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/search_packing.py --job examples/tiny.yaml --steps 6 --eval-every 2

Both arms run ``orchestrator.search.driver.run_search`` on the same job, data, space, seed, ASHA and
steps; only ``search.packing`` and the trial concurrency differ:

* ``unpacked``: every trial loads the base and trains alone in its own Tune process, at most
  ``cpus // cpus_per_trial`` at once (more would only oversubscribe the CPUs);
* ``packed``: one host per node holds the base and the prefix cache; trials are thin and lease
  slot groups on it, up to ``--packed-concurrency`` at once, and the host fuses the steps of
  the trials that train together into one forward/backward.

The default space is the demo space restricted to what packs (``bits: 16``, no gates: rank,
tau, lr vary); ``--space demo`` runs the demo space itself, where quantised and gated trials
fall back to unpacked ones. Both arms include building the payload (the frozen-prefix pass)
and Ray Tune's own overheads: this is search wall time end to end. Prints ONE JSON object:
both wall times, ``speedup`` (unpacked / packed), the host's fusion statistics and the
largest relative difference of a trial's ``macro_ppl`` between the arms (same configs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DENSE_SPACE = """\
# the demo space restricted to trials that pack (unquantised, ungated)
dimensions:
  rank: {choice: [4, 8]}
  bits: {value: 16}
  target_sparsity: {value: 0.0}
  tau: {choice: [0.0, 100.0]}
  lr: {loguniform: [5.0e-4, 3.0e-3]}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(__file__).resolve().parents[1]
    ap.add_argument("--job", default=str(root / "examples" / "demo.yaml"))
    ap.add_argument("--space", default="dense", help="dense (the demo space's packable part) | demo | a space file")
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12, help="steps per trial")
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--max-train", type=int, default=32, help="cap on each task's training sequences")
    ap.add_argument("--max-eval", type=int, default=8, help="cap on each task's eval sequences")
    ap.add_argument("--packed-concurrency", type=int, default=8)
    ap.add_argument("--arms", default="unpacked,packed")
    args = ap.parse_args()

    import ray
    import torch

    from orchestrator.data import build_job_data
    from orchestrator.search.driver import run_search
    from orchestrator.spec import load_job
    from orchestrator.specs.search import SearchSpec

    load_start = os.getloadavg()
    spec = load_job(args.job)
    tasks = [t.model_copy(update={"max_train_sequences": min(t.max_train_sequences or args.max_train, args.max_train),
                                  "max_eval_sequences": min(t.max_eval_sequences or args.max_eval, args.max_eval)})
             for t in spec.tasks]
    spec = spec.model_copy(update={"tasks": tasks})
    with contextlib.redirect_stdout(sys.stderr):  # progress lines: stdout carries only the JSON
        data = build_job_data(spec)
    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="loraflock-packbench-") as tmp:
        space = args.space
        if space == "dense":
            space = str(Path(tmp) / "dense.yaml")
            Path(space).write_text(DENSE_SPACE)
        base = SearchSpec(enabled=True, space=space, num_samples=args.num_samples, steps=args.steps,
                          eval_every=args.eval_every, eval_subset=2, grace_period=args.eval_every,
                          max_concurrent_trials=max(1, cpus), cpus_per_trial=1)
        settings = {
            "unpacked": base,
            "packed": base.model_copy(update={"packing": True, "max_concurrent_trials": args.packed_concurrency}),
        }
        for arm in args.arms.split(","):
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # Tune's tables: stdout carries only the JSON
                section = run_search(spec, settings[arm], data, Path(tmp) / arm, spec.base.name)
            wall = time.perf_counter() - t0
            trials = section["trials"]
            rows[arm] = {
                "wall_s": round(wall, 2), "max_concurrent_trials": settings[arm].max_concurrent_trials,
                "trials": len(trials), "done": sum(t["status"] == "done" for t in trials),
                "trial_steps": sum(int(t.get("step") or 0) for t in trials),
                "packing": section.get("packing"),
                "ppl": {_key(t): t.get("macro_ppl") for t in trials if t["status"] == "done"},
            }
            print(f"{arm}: {wall:.1f}s", file=sys.stderr)
    ray.shutdown()
    report = {
        "benchmark": "search_packing",
        "compared": "the same Tune search unpacked (a trial = a process loading the base) vs packed (trials = slot "
                    "groups on one host per node, steps fused)",
        "settings": {**vars(args), "model": spec.base.name, "tasks": [d.name for d in data],
                     "train_sequences": [int(d.train_examples) for d in data], "cpus": cpus},
        "machine": {"device": "cuda" if torch.cuda.is_available() and spec.ray.use_gpu else "cpu", "cpu_count": cpus,
                    "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
    }
    for arm, r in rows.items():
        report[arm] = {k: v for k, v in r.items() if k != "ppl"}
    if "unpacked" in rows and "packed" in rows:
        report["speedup"] = round(rows["unpacked"]["wall_s"] / rows["packed"]["wall_s"], 3)
        a, b = rows["unpacked"]["ppl"], rows["packed"]["ppl"]
        both = [k for k in a if k in b and a[k] and b[k]]
        report["same_trials_done"] = len(both)
        report["max_rel_ppl_diff"] = max((abs(a[k] - b[k]) / a[k] for k in both), default=None)
    print(json.dumps(report, indent=1))


def _key(trial: dict) -> str:
    return ",".join(f"{k}={trial.get(k)}" for k in ("rank", "bits", "target_sparsity", "tau", "lr"))


if __name__ == "__main__":
    main()
