"""Right-padded instruction rows: full-width batches vs batches cut to their last scored token.

Run (SmolLM2-135M, 8 tasks, rows of ``--seq 256`` holding a prompt of 16-96 and a completion
of 8-48 tokens, LoRA r=8 on all 7 projections of the top 4 blocks, 30 steps of 8 rows, then
an evaluation of 16 held-out rows a task; ~6 min on a 2-core CPU):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/dynamic_padding.py
Quick (tiny random llama): add ``--tiny``.

Both arms run the product's ``train_method`` (kind ``independent``, no prefix cache: every
block runs every step, as when the cache does not pay) on the same rows, seed and batches:

* ``before``: every batch at the rows' full ``--seq`` width, the head on every position
  (the loop as it was: ``models.train.trim`` switched off);
* ``after``: each batch cut to the columns up to its last scored token, the head only at
  scored positions (``models.train.trim``, ``models.train.chunked_loss.token_nll``).

Token ids are random (a forward's cost does not depend on them); the lengths are what
matter, and the JSON reports them (``row_fill``: a row's share of ``--seq`` up to its last
scored token; ``scored_share``: its scored tokens' share). Prints ONE JSON object: steps and
evaluation seconds per arm, their speedups, and ``max_abs_eval_nll_diff`` (the cut is exact).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models.train.data as data_mod  # noqa: E402
import models.train.step as step_mod  # noqa: E402
from models.base import load_base, top_block_indices  # noqa: E402
from models.lora import adapter_params, inject  # noqa: E402
from models.train.data import FlockData  # noqa: E402
from models.train.loop import MethodConfig, train_method  # noqa: E402

TINY = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 512,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rows(n: int, args, vocab: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` right-padded rows: prompt (unscored), completion (scored), padding (id 0, unscored)."""
    ids = torch.zeros((n, args.seq), dtype=torch.long)
    mask = torch.zeros((n, args.seq), dtype=torch.bool)
    for i in range(n):  # building the data, not a hot path
        p = int(rng.integers(args.prompt_len[0], args.prompt_len[1] + 1))
        c = int(rng.integers(args.completion_len[0], args.completion_len[1] + 1))
        end = min(args.seq, p + c)
        ids[i, :end] = torch.from_numpy(rng.integers(1, vocab, size=end))
        mask[i, p:end] = True
    return ids, mask


def _arm(cut: bool, args, base, init, data) -> dict:
    saved = (data_mod.trim_columns, step_mod.trim_columns, data_mod.scored_positions, step_mod.scored_positions)
    if not cut:
        data_mod.trim_columns = step_mod.trim_columns = lambda ids, scored: (ids, scored)
        data_mod.scored_positions = step_mod.scored_positions = lambda scored: None
    try:
        cfg = MethodConfig("independent", "independent", steps=args.steps, batch_size=args.batch, lr=1e-3, seed=0,
                           log_every=args.steps, eval_batch_size=args.batch)
        t0 = time.perf_counter()
        out = train_method(base, data, cfg, init, log=lambda _: None)
        total = time.perf_counter() - t0
    finally:
        data_mod.trim_columns, step_mod.trim_columns, data_mod.scored_positions, step_mod.scored_positions = saved
    return {"steps_s": round(out["seconds"], 2), "eval_s": round(total - out["seconds"], 2),
            "eval_nll": out["eval_nll"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--rows", type=int, default=32, help="training rows per task")
    p.add_argument("--eval-rows", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompt-len", type=int, nargs=2, default=[16, 96])
    p.add_argument("--completion-len", type=int, nargs=2, default=[8, 48])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--top", type=int, default=4)
    args = p.parse_args()

    base = load_base(random_init=TINY, seed=0) if args.tiny else load_base("smollm2-135m")
    base.eval()
    torch.manual_seed(0)
    inject(base, TARGETS, num_tasks=args.tasks, rank=8, alpha=16.0, layers=top_block_indices(base, args.top))
    with torch.no_grad():
        for q in adapter_params(base):
            if q.abs().sum() == 0:
                q.normal_(0, 0.01)  # B != 0: the adapters change the NLLs compared below
    init = {n: q.detach().clone() for n, q in base.named_parameters() if q.requires_grad}
    vocab = int(base.config.vocab_size)
    rng = np.random.default_rng(0)
    train, tmask, evals, emask = {}, {}, {}, {}
    for t in range(args.tasks):
        train[t], tmask[t] = _rows(args.rows, args, vocab, rng)
        evals[t], emask[t] = _rows(args.eval_rows, args, vocab, rng)
    data = FlockData([args.rows] * args.tasks, list(range(args.tasks)), train, evals, train_mask=tmask,
                     eval_mask=emask)
    masks = torch.cat(list(tmask.values()))
    cols = torch.arange(args.seq)
    fill = float(((masks * cols).amax(dim=1) + 1).float().mean() / args.seq)

    before = _arm(False, args, base, init, data)
    after = _arm(True, args, base, init, data)
    diff = max(abs(before["eval_nll"][t] - after["eval_nll"][t]) for t in before["eval_nll"])
    print(json.dumps({
        "benchmark": "dynamic_padding",
        "compared": "full-width batches, head on every position (before) vs batches cut to their last scored "
                    "token, head on scored positions (after)",
        "model": "tiny" if args.tiny else "smollm2-135m", "tasks": args.tasks, "seq": args.seq,
        "steps": args.steps, "batch": args.batch, "top_blocks": args.top,
        "row_fill": round(fill, 3), "scored_share": round(float(masks.float().mean()), 3),
        "before": {k: v for k, v in before.items() if k != "eval_nll"},
        "after": {k: v for k, v in after.items() if k != "eval_nll"},
        "steps_speedup": round(before["steps_s"] / max(after["steps_s"], 1e-9), 2),
        "eval_speedup": round(before["eval_s"] / max(after["eval_s"], 1e-9), 2),
        "max_abs_eval_nll_diff": float(f"{diff:.3g}"),
        "threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
