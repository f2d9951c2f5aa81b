"""Step time vs number of tasks: the dense prior step against the lazy one (issue 19, item 3).

Run (SmolLM2-135M, LoRA r=8 on all 7 projections of the top 2 blocks, frozen-prefix cache,
batch 8 x 64 tokens; ~4 min on a 2-core CPU):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/step_scaling.py
Quick (tiny random llama, adapters on its top block): add ``--tiny``.

Each arm is ``models.train.loop.train_method`` (kind ``hierarchical``, fixed tau, the
prior's penalty, clipping, the NaN check: the product's step) on a flock of T = 8 and
T = 1,024 task slots with ``prior_update`` dense or lazy. Every step is a batch of 8 rows of
64 tokens drawn from the same 8 cached sequences (the frozen lower blocks ran once, as in
the flock stage), so the forward's FLOPs are the same for every T; only the number of task
adapters differs. Step seconds are the median of the timed steps (``on_step`` to
``on_step``), after ``--warmup`` steps. Target: ``lazy.ratio_1024_vs_8 <= 1.25``.
Prints ONE JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_model_args  # noqa: E402
from models.base import load_base, top_block_indices  # noqa: E402
from models.lora import adapter_params, inject  # noqa: E402
from models.prefix import compute_prefix  # noqa: E402
from models.prior import HierarchicalPrior  # noqa: E402
from models.train.hooks import TrainHooks  # noqa: E402
from models.train.loop import FlockData, MethodConfig, train_method  # noqa: E402

TINY = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 512,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _arm(args, num_tasks: int, mode: str) -> dict:
    base = load_base(random_init=TINY, seed=0) if args.tiny else load_base(args.model)
    layers = top_block_indices(base, args.top)
    split = layers[0]
    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    seqs = torch.randint(0, vocab, (args.batch, args.seq), generator=g)  # the 8 sequences every step draws
    prefix = compute_prefix(base, seqs, split)
    torch.manual_seed(0)
    inject(base, TARGETS, num_tasks=num_tasks, rank=args.rank, alpha=2.0 * args.rank, layers=layers)
    init = {n: p.detach().clone() for n, p in base.named_parameters() if any(p is q for q in adapter_params(base))}
    # Slot s trains on sequence s % batch (views: no memory per task); eval only slot 0.
    train = {s: seqs[s % args.batch][None] for s in range(num_tasks)}
    pre = {s: prefix[s % args.batch][None] for s in range(num_tasks)}
    data = FlockData([1] * num_tasks, list(range(num_tasks)), train, {0: seqs[:1]}, pre, {0: prefix[:1]}, split)
    prior = HierarchicalPrior(base, [1] * num_tasks, tau=args.tau)
    steps = args.warmup + args.steps + 1
    cfg = MethodConfig("bench", "hierarchical", steps=steps, batch_size=args.batch, lr=1e-3, seed=0,
                       log_every=10**9, temperature=0.0, prior_update=mode)
    stamps: list[float] = []
    hooks = TrainHooks(on_step=lambda step: stamps.append(time.perf_counter()))
    train_method(base, data, cfg, init, prior=prior, log=lambda s: None, hooks=hooks)
    times = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup :]
    return {"step_s": round(statistics.median(times), 4), "step_s_min": round(min(times), 4), "steps_timed": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--tasks", type=int, nargs=2, default=[8, 1024], metavar=("SMALL", "LARGE"))
    ap.add_argument("--tau", type=float, default=100.0)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per arm")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    args.top = args.top or (1 if args.tiny else 2)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load0 = os.getloadavg()
    small, large = args.tasks
    out: dict = {"compared": f"train step seconds at {large} vs {small} tasks, same batch, dense vs lazy prior step"}
    for mode in ("dense", "lazy"):
        res = {}
        for t in (small, large):
            print(f"{mode} T={t} ...", file=sys.stderr, flush=True)
            res[str(t)] = _arm(args, t, mode)
        res[f"ratio_{large}_vs_{small}"] = round(res[str(large)]["step_s"] / res[str(small)]["step_s"], 3)
        out[mode] = res
    out["target"] = f"lazy.ratio_{large}_vs_{small} <= 1.25"
    out["setup"] = {"model": "tiny" if args.tiny else args.model, "top_blocks": args.top, "rank": args.rank,
                    "targets": TARGETS, "batch": args.batch, "seq": args.seq, "tau": args.tau,
                    "threads": torch.get_num_threads(), "device": "cpu",
                    "loadavg_start": [round(x, 2) for x in load0],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
