"""What judging a task metric costs a search trial per rung, next to the rung's training.

Run (SmolLM2-135M-Instruct on examples/instruct.yaml's 18 tasks; ~6 min on a 2-core CPU):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/search_judge.py
Quick (tiny random model, examples/tiny.yaml is text-only, so a prompt/completion job is made):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/search_judge.py --tiny

One unpacked search trial (:func:`orchestrator.search.trial.run_trial`, the code a Tune trial
runs, here without Ray) trains ``--steps`` steps with a report every ``--eval-every`` steps,
once per metric of ``--metrics`` (``ppl``: no judging, the reference). With a task metric
every report judges it (``search.metric``) on ``--rows`` seeded eval rows of each task judged
by it, tasks mixed (:mod:`orchestrator.search.judge`). Prints ONE JSON object: per metric, the
tasks and rows judged, the mean seconds per rung spent training (between two reports, judging
excluded) and judging (``judge_s``), ``judge_share`` (judging / the whole rung) and the
trial's final ``macro_<metric>``.

``--packed N`` (N >= 2) adds, per task metric, packed trials (``search.packing``): N trials of
different ``lr`` (``lr * 2**i``) leased on one :class:`orchestrator.search.pack_host.PackHost` and
trained ``--steps`` fused steps, then judged two ways on the same weights: each trial
in its own pass (``separate_s``, N passes), and all N in one mixed pass (``mixed_s``, what the
host does when its trials report together); ``speedup`` = separate / mixed, ``same_values``
whether every trial gets the same ``macro_<metric>`` both ways.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _tiny_job(tmp: Path):
    """A tiny random Llama on three prompt/completion tasks (each completion a function of its prompt)."""
    import random

    from orchestrator.spec import JobSpec

    rng = random.Random(0)
    tasks = []
    for t, name in enumerate(("rev", "rot1", "rot2")):
        with open(tmp / f"{name}.jsonl", "w") as f:
            for _ in range(60):
                w = "".join(rng.choice("abcdefgh") for _ in range(4))
                f.write(json.dumps({"prompt": f"say {w}: ", "completion": w[::-1] if t == 0 else w[t:] + w[:t]}) + "\n")
        tasks.append({"name": name, "source": {"kind": "files", "path": str(tmp / f"{name}.jsonl"),
                                               "example_format": "prompt_completion"}, "eval_fraction": 0.5})
    return JobSpec.model_validate({
        "base": {"random_init": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "vocab_size": 257, "max_position_embeddings": 256}, "tokenizer": "bytes"},
        "tasks": tasks, "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "top_layers": 1},
        "train": {"steps": 20, "batch_size": 8, "seq_len": 32, "lr": 3e-3},
        "eval": {"metrics": ["ppl", "exact_match", "rouge_l"], "max_new_tokens": 6},
    })


def _packed(payload: dict, config: dict, n: int, steps: int, seed: int) -> dict:
    """N packed trials on one host after ``steps`` fused steps: judged one pass each vs one mixed pass."""
    from orchestrator.search.pack_host import PackHost

    host = PackHost(payload, capacity=n, max_rank=int(config["rank"]))
    lids = [host.lease({**config, "lr": float(config["lr"]) * 2.0**i}, seed) for i in range(n)]  # lr, 2 lr, 4 lr ...
    for _ in range(steps):
        host.step(lids)
    host.judge(lids[:1])  # warm-up (first generate call)
    t0 = time.perf_counter()
    separate = {lid: host.judge([lid])[lid] for lid in lids}
    separate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mixed = host.judge(lids)
    mixed_s = time.perf_counter() - t0
    key = next(k for k in mixed[lids[0]] if k != "judge_s")
    return {"trials": n, "steps": steps, "separate_s": round(separate_s, 3), "mixed_s": round(mixed_s, 3),
            "speedup": round(separate_s / mixed_s, 2),
            "same_values": all(separate[x][key] == mixed[x][key] for x in lids),
            "values": [round(mixed[x][key], 4) for x in lids]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default="examples/instruct.yaml")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model on three prompt/completion tasks")
    ap.add_argument("--metrics", default="ppl,choice_accuracy,rouge_l")
    ap.add_argument("--rows", type=int, default=8, help="search.metric_rows: eval rows judged per task")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--packed", type=int, default=0, help="N >= 2: also judge N packed trials separately vs mixed")
    args = ap.parse_args()
    import numpy as np
    import torch

    from orchestrator.data import build_job_data
    from orchestrator.search.driver import trial_job
    from orchestrator.search.judge import trial_judge_plan
    from orchestrator.search.trial import build_payload, run_trial
    from orchestrator.spec import load_job
    from orchestrator.specs.search import objective

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="search-judge-"))
    spec = _tiny_job(tmp) if args.tiny else load_job(args.job)
    data = build_job_data(spec)
    payload = build_payload(
        trial_job(spec), [d.name for d in data], [int(d.train_examples) for d in data],
        [d.train_ids.numpy() for d in data], [d.eval_ids.numpy() for d in data], args.threads,
        [None if d.train_mask is None else d.train_mask.numpy() for d in data],
        [None if d.eval_mask is None else d.eval_mask.numpy() for d in data],
    )
    fixed = {"steps": args.steps, "eval_every": args.eval_every, "eval_subset": 4, "quantizer": "nf", "lq_iters": 2,
             "gate_lambda": 50.0, "gate_lr": 0.1, "threads": args.threads}
    config = {"rank": spec.lora.rank, "bits": 16, "target_sparsity": 0.0, "tau": 100.0, "lr": spec.train.lr,
              "_search": fixed}
    arms = {}
    for metric in args.metrics.split(","):
        search = spec.search.model_copy(update={"metric": metric, "metric_rows": args.rows})
        plan = trial_judge_plan(spec, search, data)
        reports: list[dict] = []
        t0 = time.perf_counter()
        judged = {**payload, **({"judge": plan} if plan else {})}
        run_trial(config, judged, lambda m, s, out=reports: out.append(dict(m)))
        wall = time.perf_counter() - t0
        # seconds between two reports, judging excluded: training plus the perplexity eval
        marks = [0.0, *(r["seconds"] for r in reports)]
        judge = [r.get("judge_s", 0.0) for r in reports]
        rung = [b - a for a, b in zip(marks, marks[1:])]
        train = [r - j for r, j in zip(rung, judge)]
        key, _ = objective(metric)
        arms[metric] = {
            "tasks_judged": len(plan["plan"]) if plan else 0,
            "rows_judged": sum(len(p["examples"]) for p in plan["plan"].values()) if plan else 0,
            "reports": len(reports),
            "train_s_per_rung": round(float(np.mean(train)), 2),
            "judge_s_per_rung": round(float(np.mean(judge)), 2),
            "judge_share": round(float(np.sum(judge) / np.sum(rung)), 3),
            "final": round(float(reports[-1][key]), 4),
            "wall_s": round(wall, 1),
        }
        if plan and args.packed >= 2:
            arms[metric]["packed"] = _packed(judged, config, args.packed, args.steps, spec.train.seed)
    print(json.dumps({
        "benchmark": "search_judge",
        "compared": "one search trial's seconds per rung: training (+ perplexity eval) vs judging search.metric",
        "job": "tiny" if args.tiny else args.job, "tasks": len(data), "rows_per_task": args.rows,
        "steps": args.steps, "eval_every": args.eval_every, "threads": args.threads,
        "load_avg_1m": round(os.getloadavg()[0], 2), "arms": arms,
    }))


if __name__ == "__main__":
    main()
