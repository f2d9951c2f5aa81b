"""Bit budgets for the base: perplexity of the same LoRA training on bases quantised to 2-8 bits.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quant_budget.py            # SmolLM2-135M
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quant_budget.py --tiny     # random tiny llama

LoRA (all 7 projections) sits on the top ``--top`` blocks, and exactly those blocks' linear
layers are quantised (the lower blocks stay fp32 and are run once: their outputs are cached,
so every configuration trains and evaluates on identical inputs). For each budget of ``b``
bits the allocator (``models.quant.bit_budget.allocate``, NF 2/3/4/8 candidates) picks each
matrix's width under a byte budget equal to the b-bit NF format's own size (b + 16/block
bits per weight plus a 20-byte header per matrix: the fp16 block scales count), the base is decomposed as Q + L1 L2^T
(LQ-LoRA) and the adapters start from L1 L2^T. Then every configuration trains the same
steps on the same batches; fp32 is the reference. Data: Python standard-library source files
(file-level train / eval split: every 4th file of the same 7 packages is held out),
tokenised by the model's own tokenizer. ``--bits`` may hold fractional budgets (e.g. 3.5): the
allocator then mixes widths, which a uniform width cannot do within the same bytes.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.base import adaptable_layers, load_base, resolve_model  # noqa: E402
from models.lora import adapter_params, inject, set_trainable  # noqa: E402
from models.prefix import compute_prefix  # noqa: E402
from models.quant.bit_budget import allocate  # noqa: E402
from models.quant.model import quantizable_matrices, quantize_model  # noqa: E402
from models.quant.quantizers import packed_nbytes  # noqa: E402
from models.train.step import Batch, evaluate, seed_everything, train_step  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256}
PKGS = ["json", "logging", "email", "http", "concurrent", "importlib", "asyncio"]
EVAL_EVERY = 4  # every 4th file (sorted by path) is held out for evaluation


def corpus(pkgs: list[str], max_chars: int, held_out: bool) -> str:
    """Source of the packages' train (or held-out) files, in order, cut at ``max_chars``.

    A file-level split inside the same packages: the eval text is unseen, but from the
    distribution the adapters train on (an unrelated package would measure transfer instead).
    Files are interleaved across packages so a short cut still covers all of them.
    """
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for pkg in pkgs for p in sorted((lib / pkg).rglob("*.py"))]
    files = [p for i, p in enumerate(files) if (i % EVAL_EVERY == EVAL_EVERY - 1) == held_out]
    by_pkg = [[p for p in files if p.relative_to(lib).parts[0] == pkg] for pkg in pkgs]
    order = [p for group in zip(*[g + [None] * (max(map(len, by_pkg)) - len(g)) for g in by_pkg]) for p in group if p]
    text, size = [], 0
    for p in order:
        if size >= max_chars:
            break
        t = p.read_text(errors="ignore")
        text.append(t)
        size += len(t)
    return "\n".join(text)[:max_chars]


def chunks(ids: list[int], seq: int, count: int) -> torch.Tensor:
    n = min(count, len(ids) // seq)
    return torch.tensor(ids[: n * seq]).view(n, seq)


def build(args: argparse.Namespace):
    if args.tiny:
        model = load_base(random_init=TINY, seed=0)
        enc = lambda text: [b % TINY["vocab_size"] for b in text.encode()]  # noqa: E731
    else:
        from transformers import AutoTokenizer

        model = load_base("smollm2-135m")
        directory, gguf = resolve_model("smollm2-135m")
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
        enc = lambda text: tok(text)["input_ids"]  # noqa: E731
    chars = lambda n: 8 * args.seq * n  # ~3-4 characters per token in Python source  # noqa: E731
    train = chunks(enc(corpus(PKGS, chars(args.train_seqs), held_out=False)), args.seq, args.train_seqs)
    evals = chunks(enc(corpus(PKGS, chars(args.eval_seqs), held_out=True)), args.seq, args.eval_seqs)
    return model, train, evals


def run_config(args, bits: float | None, data: dict, table: dict | None) -> dict:
    """Load the base, inject LoRA, quantise the top blocks to ``bits`` (None: fp32), train, eval."""
    model = data["model_fn"]()
    n_blocks = len(adaptable_layers(model)[1])
    top = list(range(n_blocks - args.top, n_blocks))
    torch.manual_seed(args.seed)  # the same initial adapters (random A) in every configuration
    inject(model, PROJ, num_tasks=1, rank=args.rank, alpha=2.0 * args.rank, layers=top)
    out: dict = {}
    if bits is not None:
        t0 = time.time()
        mats = quantizable_matrices(model, PROJ, layers=top)
        # the b-bit NF format's own size (codes + fp16 scales + header), exactly, from the packer
        numel = sum(w.numel() for w in mats.values())
        whole = int(bits) if float(bits).is_integer() else 2
        nominal = sum(packed_nbytes(tuple(w.shape), "nf", whole, args.block_size) for w in mats.values())
        # b whole bits: the NF format's own size; fractional b: b plus the same per-weight overhead
        budget_bits = 8.0 * (nominal + 1) / numel + (bits - whole)
        alloc = allocate(
            mats, budget_bits, (("nf", 2), ("nf", 3), ("nf", 4), ("nf", 8)), block_size=args.block_size, table=table
        )
        report = quantize_model(model, PROJ, bits=alloc, layers=top, iters=args.lq_iters, block_size=args.block_size,
                                cache_weight=True)  # same numbers, no per-step dequantisation on 2 CPU cores
        counts: dict[str, int] = {}
        for r in alloc.rows:
            counts[f"nf{r.bits}"] = counts.get(f"nf{r.bits}", 0) + 1
        out = {"bits": int(bits) if float(bits).is_integer() else bits, "budget_bits_per_weight": budget_bits,
               "budget_bytes": alloc.budget_bytes, "stored_bytes": report.stored_bytes, "fp32_bytes": 4 * report.numel,
               "recon_rel_error": report.recon_rel_error,
               "recon_rel_error_q_only": math.sqrt(sum((r["rel_error_q_only"] ** 2) * r["norm2"] for r in report.rows)
                                                   / sum(r["norm2"] for r in report.rows)),
               "uniform_choice_total_error_ratio": (
                   (alloc.uniform["total_error"] / alloc.total_error) if alloc.uniform else None
               ),
               "matrices_per_width": counts, "quantize_s": round(time.time() - t0, 1)}
        table = alloc.table
    set_trainable(model, shared=True, task=False)
    params = [p for p in adapter_params(model) if p.requires_grad]
    seed_everything(args.seed)
    opt = torch.optim.AdamW(params, lr=args.lr)
    split, train, pre = data["split"], data["train"], data["train_prefix"]
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same batches in every configuration
    t0 = time.time()
    for _ in range(args.steps):
        rows = torch.randint(0, len(train), (args.batch,), generator=gen)
        b = Batch(train[rows], torch.zeros(args.batch, dtype=torch.long), torch.full((args.batch,), 1.0 / args.batch),
                  pre[rows], split)
        train_step(model, b, opt, params)
    out["train_s"] = round(time.time() - t0, 1)
    nll = evaluate(model, {0: data["eval"]}, batch_size=8, prefixes={0: data["eval_prefix"]}, split=split)[0]
    out["lora_ppl"] = math.exp(nll)
    return out, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="random tiny llama instead of SmolLM2-135M")
    ap.add_argument("--bits", type=float, nargs="+", default=[4, 3, 2, 8, 3.5],
                    help="budgets in bits per weight, run in this order (the time box may cut the last); "
                         "fractional ones mix widths")
    ap.add_argument("--top", type=int, default=2, help="adapted and quantised top blocks")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--train-seqs", type=int, default=96)
    ap.add_argument("--eval-seqs", type=int, default=24)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--lq-iters", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="adapter init and batch order (the data split is fixed)")
    ap.add_argument("--max-s", type=float, default=300.0, help="start no new budget after this many seconds")
    args = ap.parse_args()
    t_start = time.time()
    load_start = os.getloadavg()
    model, train, evals = build(args)
    n_blocks = len(adaptable_layers(model)[1])
    split = n_blocks - args.top
    data = {
        "train": train, "eval": evals, "split": split,
        "train_prefix": compute_prefix(model, train, split), "eval_prefix": compute_prefix(model, evals, split),
        "model_fn": (lambda: load_base(random_init=TINY, seed=0)) if args.tiny else (lambda: load_base("smollm2-135m")),
    }
    base_nll = evaluate_base(model, data)
    del model
    fp32, table = run_config(args, None, data, None)
    budgets = []
    skipped = []
    for b in args.bits:
        if time.time() - t_start > args.max_s:  # keep the run inside its time box; say what was left out
            skipped.append(b)
            continue
        res, table = run_config(args, b, data, table)
        res["ppl_ratio_vs_fp32"] = res["lora_ppl"] / fp32["lora_ppl"]
        budgets.append(res)
    print(json.dumps({
        "benchmark": "quant_budget",
        "model": "tiny-random-llama" if args.tiny else "smollm2-135m",
        "compared": "LoRA perplexity after identical training on an fp32 base vs LQ-quantised bases at bit budgets",
        "quantised": f"all 7 linear projections of the top {args.top} of {n_blocks} blocks "
                     "(where the LoRA adapters sit); lower blocks, embeddings and head stay fp32",
        "quantizer": "NF 2/3/4/8-bit per matrix chosen by the MILP allocator; "
                     "LQ (Q + rank-r L1 L2^T, adapters start from it)",
        "setup": {"rank": args.rank, "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
                  "train_seqs": len(train), "eval_seqs": len(evals), "block_size": args.block_size,
                  "lq_iters": args.lq_iters, "seed": args.seed, "threads": torch.get_num_threads(),
                  "note": "dequantised weights cached after the first forward (cache_weight=True): "
                          "same numbers, less CPU"},
        "base_ppl": math.exp(base_nll),
        "fp32_lora_ppl": fp32["lora_ppl"],
        "fp32_train_s": fp32["train_s"],
        "budgets": sorted(budgets, key=lambda r: r["bits"]),
        "skipped_bits_time_box": skipped,
        "total_s": round(time.time() - t_start, 1),
        "load_avg_1_5_15": {"start": load_start, "end": os.getloadavg()},
    }, indent=1))


def evaluate_base(model, data) -> float:
    """Untuned base NLL on the eval set (a single dummy LoRA slot with B = 0 routes the batch)."""
    n_blocks = len(adaptable_layers(model)[1])
    inject(model, ["q_proj"], num_tasks=1, rank=1, alpha=1.0, layers=[n_blocks - 1])
    return evaluate(model, {0: data["eval"]}, batch_size=8, prefixes={0: data["eval_prefix"]}, split=data["split"])[0]


if __name__ == "__main__":
    main()
