"""Frozen-prefix and evaluation overheads of a many-task flock worker: precomputed + per-task vs on demand + mixed.

Run (SmolLM2-135M, 256 tasks of 24 training and 6 eval rows of 16 tokens, LoRA r=8 on
q/v/down of the top 2 blocks, three methods of 20 steps of 8 rows; ~4 min on a 2-core CPU):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/prefix_cache.py
Quick (tiny random llama, adapters on its top block): add ``--tiny``.

Both arms do a flock worker's work in-process, with the product's functions: the base
evaluated, then ``hierarchical``, ``independent`` and ``unified`` (``train_method``), each
ending with an evaluation of every task.

* ``before`` (the worker until issue 19's item 2): the frozen blocks run up front for every
  training and eval row (``compute_prefix`` per task, as the worker did), and evaluation runs
  task by task (``evaluate`` once per task: each task's rows in their own batches, which is
  what the per-task loop did).
* ``after``: the worker's on-demand cache (``models.prefix_cache``, planned as
  ``orchestrator.flock.prefix`` plans it) and mixed-task evaluation batches.

Token rows are random (the cost of a forward does not depend on the tokens). Reported per
arm: ``prefix_s`` (all time in the frozen blocks), ``eval_s`` (evaluation wall time, its
frozen-block part excluded), ``steps_s`` (training wall time, its frozen-block part
excluded) and ``overhead_s = prefix_s + eval_s``; ``overhead_ratio`` is before / after, and
``max_abs_eval_nll_diff`` checks that both arms give the same figures. Prints ONE JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models.train.loop as loop  # noqa: E402
from benchmarks._common import add_model_args  # noqa: E402
from models.base import load_base, top_block_indices  # noqa: E402
from models.lora import adapter_params, inject  # noqa: E402
from models.prefix import compute_prefix  # noqa: E402
from models.prefix_cache import PrefixCache, plan_prefix_cache  # noqa: E402
from models.prior import HierarchicalPrior  # noqa: E402
from models.train.hooks import TrainHooks  # noqa: E402
from models.train.loop import FlockData, MethodConfig, train_method  # noqa: E402
from models.train.step import evaluate  # noqa: E402

TINY = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 512,
}
TARGETS = ["q_proj", "v_proj", "down_proj"]
METHODS = ("hierarchical", "independent", "unified")


def _per_task(model, sets, batch_size=8, prefixes=None, split=0, slot_of=None, masks=None, prefix_fn=None):
    """The evaluation as it was: one task at a time, each in its own batches."""
    out = {}
    for t in sets:
        out |= evaluate(model, {t: sets[t]}, batch_size, None if prefixes is None else {t: prefixes[t]}, split,
                        slot_of, None if masks is None else {t: masks.get(t)})
    return out


def _arm(args, arm: str) -> tuple[dict, dict]:
    base = load_base(random_init=TINY, seed=0) if args.tiny else load_base(args.model)
    layers = top_block_indices(base, args.top)
    split = layers[0]
    torch.manual_seed(0)
    inject(base, TARGETS, num_tasks=args.tasks, rank=args.rank, alpha=2.0 * args.rank, layers=layers)
    init = {n: p.detach().clone() for n, p in base.named_parameters() if any(p is q for q in adapter_params(base))}
    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    train = {s: torch.randint(0, vocab, (args.train_rows, args.seq), generator=g) for s in range(args.tasks)}
    evals = {s: torch.randint(0, vocab, (args.eval_rows, args.seq), generator=g) for s in range(args.tasks)}
    sizes = [args.train_rows] * args.tasks
    data = FlockData(sizes, list(range(args.tasks)), train, evals, split=split)
    clock = {"prefix_s": 0.0, "eval_s": 0.0, "steps_s": 0.0}
    cache = None
    t0 = time.perf_counter()
    if arm == "before":
        data.train_prefix = {s: compute_prefix(base, x, split) for s, x in train.items()}
        data.eval_prefix = {s: compute_prefix(base, x, split) for s, x in evals.items()}
        clock["prefix_s"] = time.perf_counter() - t0
        evaluator = _per_task
        decided = "precomputed"
    else:
        row_bytes = args.seq * base.config.hidden_size * 4
        plan = plan_prefix_cache("auto", int(args.budget_gb * 2**30), row_bytes, sum(sizes),
                                 args.tasks * args.eval_rows, args.steps * args.batch, len(METHODS), 1 + len(METHODS))
        decided = plan.reason
        print(decided, file=sys.stderr, flush=True)
        if plan.use:
            rows = {"train": sizes, "eval": [args.eval_rows] * args.tasks}
            cache = data.prefix_cache = PrefixCache(base, split, rows, plan.capacity, keep=plan.kinds)
        else:
            data.split = 0
        evaluator = evaluate

    def cached_s() -> float:
        return cache.stats["seconds"] if cache is not None else 0.0

    t1, c1 = time.perf_counter(), cached_s()
    base_nll = evaluator(base, evals, 8, data.eval_prefix, data.split, prefix_fn=data.eval_prefix_fn())
    clock["eval_s"] += time.perf_counter() - t1 - (cached_s() - c1)
    clock["prefix_s"] += cached_s() - c1
    results = {"base": base_nll}
    loop.evaluate = evaluator  # the loop's final evaluation, by this arm's evaluator (restored below)
    try:
        for kind in METHODS:
            cfg = MethodConfig(kind, kind, steps=args.steps, batch_size=args.batch, lr=1e-3, seed=0, log_every=10**9)
            prior = HierarchicalPrior(base, sizes, tau=100.0) if kind == "hierarchical" else None
            marks: dict[str, float] = {}

            def before_eval(marks=marks) -> None:
                marks["t"], marks["c"] = time.perf_counter(), cached_s()

            t1, c1 = time.perf_counter(), cached_s()
            out = train_method(base, data, cfg, init, prior=prior, log=lambda s: None,
                               hooks=TrainHooks(before_eval=before_eval))
            t2, c2 = time.perf_counter(), cached_s()
            clock["steps_s"] += marks["t"] - t1 - (marks["c"] - c1)
            clock["eval_s"] += t2 - marks["t"] - (c2 - marks["c"])
            clock["prefix_s"] += c2 - c1
            results[kind] = out["eval_nll"]
    finally:
        loop.evaluate = evaluate
    res = {k: round(v, 3) for k, v in clock.items()}
    res["overhead_s"] = round(clock["prefix_s"] + clock["eval_s"], 3)
    res["total_s"] = round(time.perf_counter() - t0, 3)
    res["decided"] = decided
    if cache is not None:
        res["cache"] = {**{k: round(v, 3) for k, v in cache.stats.items()}, "rows_kept": cache.used}
    return res, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)
    ap.add_argument("--tasks", type=int, default=256)
    ap.add_argument("--train-rows", type=int, default=24, help="training rows per task")
    ap.add_argument("--eval-rows", type=int, default=6, help="eval rows per task")
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--budget-gb", type=float, default=4.0)
    args = ap.parse_args()
    args.top = args.top or (1 if args.tiny else 2)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load0 = os.getloadavg()
    out: dict = {"compared": "frozen-prefix + evaluation seconds of a flock worker: precomputed cache and per-task "
                             "evaluation (before) vs on-demand cache and mixed-task evaluation (after)"}
    nll = {}
    for arm in ("before", "after"):
        print(f"{arm} ...", file=sys.stderr, flush=True)
        out[arm], nll[arm] = _arm(args, arm)
    out["overhead_ratio"] = round(out["before"]["overhead_s"] / out["after"]["overhead_s"], 2)
    out["prefix_ratio"] = round(out["before"]["prefix_s"] / max(out["after"]["prefix_s"], 1e-9), 2)
    out["eval_ratio"] = round(out["before"]["eval_s"] / out["after"]["eval_s"], 2)
    out["max_abs_eval_nll_diff"] = float(max(abs(nll["before"][m][t] - nll["after"][m][t])
                                             for m in nll["before"] for t in nll["before"][m]))
    out["setup"] = {"model": "tiny" if args.tiny else args.model, "top_blocks": args.top, "rank": args.rank,
                    "targets": TARGETS, "tasks": args.tasks, "train_rows": args.train_rows,
                    "eval_rows": args.eval_rows, "seq": args.seq, "steps": args.steps, "batch": args.batch,
                    "methods": list(METHODS), "budget_gb": args.budget_gb, "threads": torch.get_num_threads(),
                    "device": "cpu",
                    "loadavg_start": [round(x, 2) for x in load0],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
