"""Multi-task throughput: one batched flock vs T PEFT trainings one after another.

Run (defaults: SmolLM2-135M, 8 tasks x 4 sequences of 128 tokens, 4 epochs, LoRA on all 7
projections of the top 4 blocks; ~5 min on a 2-core CPU):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/multitask_throughput.py
Quick (tiny random llama; adapters on all its blocks, so no prefix cache):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/multitask_throughput.py --model tiny --top-layers 0
GPU (unchanged code; reports MFU): add ``--batch 8 --seq 512 --seqs-per-task 32``.

MFU (``benchmarks/mfu.py``): ``mfu_model`` counts the model FLOPs of LoRA training, 4N per
trained token plus attention and adapters, whatever the arm skips; ``hfu`` the FLOPs the arm
actually ran (the prefix cache skips the lower blocks' forward every step, the backward stops
at the lowest adapted block). Both use the timed steps only: the first ``--warmup`` steps of
every training run (CUDA kernels' first launches, allocator growth) are timed apart in
``warmup_s``. The GPU's peak comes from its exact name; an unknown GPU gives no MFU and a
``mfu_note`` unless ``--peak-tflops`` is passed.

Every arm trains the same adapters (same rank, alpha, target modules, layers, optimizer,
learning rate, gradient clipping) on the same tokens: each task's ``--seqs-per-task``
sequences seen ``--epochs`` times, ``--batch`` rows of every task per step. Each arm is
timed end to end: base loading, adapter creation, training, saving the adapters in PEFT's
format.

* ``flock`` (a): the product's path. One base load, ``models.lora.inject`` with T slots, one
  AdamW over the task slots (independent kind), and, when the adapters sit on the top
  blocks only, the frozen-prefix cache the flock stage and the Tune trials use
  (``models.prefix``): the frozen lower blocks run ONCE per training sequence (``prefix_s``)
  and every step runs only the top blocks + head from the cache. Then ``models.train.step.
  train_step`` on mixed batches of ``T * batch`` rows, and T ``save_adapter`` calls.
* ``flock_noprefix``: the same without the prefix cache (the full forward every step).
* ``peft_sequential`` (b): what users do today, T times: ``load_base``,
  ``peft.get_peft_model``, a plain AdamW loop on ``batch`` rows of that task with the full
  forward (``loss = model(input_ids, labels).loss``), ``save_pretrained``.
* ``single_adapter`` (c): that PEFT loop for ONE adapter at the flock's batch (``T * batch``
  rows per step, same steps, same total tokens).
* ``single_core`` (d, optional): our core with one slot at that batch, product path.

Where the flock's advantage comes from (SmolLM2, 2-core CPU, see benchmarks/README.md):
on a CPU the step is FLOP-bound (``aten::mm`` ~73% of a flock step in torch.profiler; the
gathers, bmm and index_put of the adapter slots ~7%, log-softmax ~8%), so batching alone
cannot beat PEFT by much per token. The real saving is work not done: with LoRA on the top
4 of 30 blocks, the prefix cache runs the 26 frozen blocks once per sequence instead of once
per epoch (``ratio_vs_peft_sequential``); without it (``ratio_vs_peft_sequential_noprefix``)
what remains is one model load instead of T, full batches instead of T runs of small ones
(PEFT's per-run first steps are slow), and a loss without a logits copy.
``per_token_cost_vs_single_adapter`` compares like with like: ``flock_noprefix`` (T slots,
gathered per row) against ``single_adapter`` (one PEFT adapter), both full forward at the
same batch: the cost of routing rows to T adapters, which should be ~1.0. Prints ONE JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.mfu import flops_model, linear_params, match_peak  # noqa: E402
from models.base import load_base, top_block_indices  # noqa: E402
from models.lora import adapter_params, inject, lora_layers, set_trainable  # noqa: E402
from models.peft_io import save_adapter  # noqa: E402
from models.prefix import compute_prefix  # noqa: E402
from models.train.chunked_loss import CE_CHUNK_ELEMENTS  # noqa: E402
from models.train.step import Batch, seed_everything, train_step  # noqa: E402

TINY = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 512,
}

# SmolLM2-135M's architecture with random weights: the GPU check's model (no download, same FLOPs).
SMOLLM2_SHAPED = {
    "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
    "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
}


def _load(args) -> nn.Module:
    if args.model == "tiny":
        return load_base(random_init=TINY, device=args.device)
    if args.model == "smollm2-shaped":
        return load_base(random_init=SMOLLM2_SHAPED, device=args.device)
    return load_base(args.model, device=args.device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _top_layers(model: nn.Module, k: int) -> list[int] | None:
    """``--top-layers k`` as block indices; ``None`` when that is every block (``k <= 0`` or
    ``k >= n``): then no frozen prefix is cached and PEFT gets no ``layers_to_transform``."""
    layers = top_block_indices(model, k if k > 0 else None)
    return None if not layers or layers[0] == 0 else layers


class _Clock:
    """Phase timer: seconds of load / prefix / warm-up / train / save plus every timed step's duration.

    The first ``warmup`` steps of each training run (:meth:`new_run`) go to ``warmup_s``: the
    train rates and MFU use the steps after them only.
    """

    def __init__(self, device: str, warmup: int = 0) -> None:
        self.device, self.steps, self.warmup, self._left = device, [], warmup, warmup
        self.phases = {"load_s": 0.0, "prefix_s": 0.0, "warmup_s": 0.0, "train_s": 0.0, "save_s": 0.0}
        self.t = time.perf_counter()

    def new_run(self) -> None:
        self._left = self.warmup

    def lap(self, phase: str) -> None:
        _sync(self.device)
        now = time.perf_counter()
        if phase == "train_s" and self._left > 0:
            phase, self._left = "warmup_s", self._left - 1
        self.phases[phase] += now - self.t
        if phase == "train_s":
            self.steps.append(now - self.t)
        self.t = now


def _rows(data: torch.Tensor, s: int, b: int) -> torch.Tensor:
    """Rows of step ``s`` for every task: (T, b, L). Epochs wrap around each task's sequences."""
    n = data.shape[1]
    idx = torch.arange(s * b, (s + 1) * b) % n
    return data[:, idx]


def run_flock(args, data: torch.Tensor, out: Path, slots: int, prefix: bool) -> dict:
    """Arm (a) with ``slots`` = T, arm (d) with ``slots`` = 1 (rows of every task in one slot).

    ``prefix``: the product's path when adapters sit on the top blocks only (what the flock
    stage and the Tune trials do): the frozen lower blocks run once per training sequence
    (``models.prefix.compute_prefix``, timed in ``prefix_s``) and every step runs the top
    blocks + head from the cache (``Batch.prefix``). Exact: same loss to float rounding.
    """
    clock = _Clock(args.device, args.warmup)
    model = _load(args)
    seed_everything(args.seed)
    layers = _top_layers(model, args.top_layers)
    inject(model, args.targets, num_tasks=slots, rank=args.rank, alpha=2.0 * args.rank, layers=layers)
    set_trainable(model, shared=slots == 1, task=slots > 1)  # independent kind; 1 slot = plain LoRA
    params = [p for p in adapter_params(model) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    clock.lap("load_s")
    T, N, L = data.shape
    split = layers[0] if prefix and layers else 0
    cache = None
    if split:
        flat = data.reshape(T * N, L).to(args.device)
        cache = compute_prefix(model, flat, split, batch_size=16).view(T, N, L, -1)  # (T, N, L, H)
        clock.lap("prefix_s")
    B = args.batch
    tid = (
        torch.arange(T, device=args.device).repeat_interleave(B)
        if slots > 1
        else torch.zeros(T * B, dtype=torch.long, device=args.device)
    )
    w = torch.full((T * B,), 1.0 / (T * B), device=args.device)
    losses = []
    for s in range(args.steps):
        idx = torch.arange(s * B, (s + 1) * B) % N
        rows = data[:, idx].reshape(T * B, L).to(args.device)  # (T*B, L), task-major
        pre = cache[:, idx.to(cache.device)].reshape(T * B, L, -1) if cache is not None else None
        losses.append(train_step(model, Batch(rows, tid, w, pre, split), opt, params, max_grad_norm=1.0).nll)
        clock.lap("train_s")
    for t in range(slots):
        save_adapter(model, t, out / f"task{t}")
    clock.lap("save_s")
    return {"clock": clock, "loss_first_last": [losses[0], losses[-1]], "model": model, "split": split}


def _peft_model(args, base: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank, lora_dropout=0.0, bias="none",
                     target_modules=list(args.targets), layers_to_transform=_top_layers(base, args.top_layers))
    return get_peft_model(base, cfg)


def _peft_train(args, rows_of_step: Callable[[int], torch.Tensor], out: Path, clock: _Clock, losses: list) -> None:
    clock.new_run()
    model = _peft_model(args, _load(args))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    clock.lap("load_s")
    model.train()
    for s in range(args.steps):
        ids = rows_of_step(s).to(args.device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        clock.lap("train_s")
    model.save_pretrained(out)
    clock.lap("save_s")


def run_peft_sequential(args, data: torch.Tensor, out: Path) -> dict:
    """Arm (b): T independent PEFT trainings, one after another, ``batch`` rows per step."""
    clock, losses, B = _Clock(args.device, args.warmup), [], args.batch
    for t in range(data.shape[0]):
        _peft_train(args, lambda s, t=t: _rows(data, s, B)[t], out / f"task{t}", clock, losses)
    return {"clock": clock, "loss_first_last": [losses[0], losses[-1]]}


def run_single_adapter(args, data: torch.Tensor, out: Path) -> dict:
    """Arm (c): one PEFT adapter at the flock's batch (T * batch rows per step)."""
    clock, losses, (T, B) = _Clock(args.device, args.warmup), [], (data.shape[0], args.batch)
    _peft_train(args, lambda s: _rows(data, s, B).reshape(T * B, -1), out, clock, losses)
    return {"clock": clock, "loss_first_last": [losses[0], losses[-1]]}


def arm_flops(model: nn.Module, args, split: int, ours: bool = True):
    """The FLOPs model (``benchmarks/mfu.py``) of a step of ``model`` (adapters injected), cache from ``split``;
    ``ours``: our loss (chunked, recomputing the head in backward when a batch's logits exceed one chunk)."""
    layers = lora_layers(model)
    lowest = min(int(p) for n in layers for p in n.split(".") if p.isdigit())
    blocks, head = linear_params(model)
    cfg = model.config
    attn_dim = getattr(cfg, "num_attention_heads", 0) * (
        getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    )
    adapters = [(m.in_features, m.out_features, args.rank) for m in layers.values()]
    chunked = ours and args.tasks * args.batch * args.seq * cfg.vocab_size > CE_CHUNK_ELEMENTS
    return flops_model(blocks, head, args.seq, attn_dim, adapters, lowest, split, head_recompute=chunked)


def summarise(result: dict, tokens: int, flops, peak: float | None, timed_tokens: int, prefix_tokens: int) -> dict:
    """One arm's row. ``tokens``: every trained token; ``timed_tokens``: those of the steps after warm-up;
    ``prefix_tokens``: tokens the prefix cache runs through the lower blocks once (arms that cache)."""
    clock = result["clock"]
    total = sum(clock.phases.values())
    work = clock.phases["prefix_s"] + clock.phases["train_s"]  # timed training work, no loads/saves/warm-up
    row = {**{k: round(v, 3) for k, v in clock.phases.items()}, "seconds": round(total, 3), "tokens": tokens,
           "tokens_per_s": round(tokens / total, 1), "train_tokens_per_s": round(timed_tokens / work, 1),
           "step_s_median": round(statistics.median(clock.steps), 4),
           "loss_first_last": [round(x, 4) for x in result["loss_first_last"]]}
    if flops is not None:
        split = result.get("split", 0)
        fm = flops(split, "split" in result)  # PEFT arms: transformers' own loss, no recomputed head
        hw = fm.hardware_per_token * timed_tokens + (fm.prefix_per_token * prefix_tokens if split else 0.0)
        row["model_flops_per_token"] = fm.model_per_token
        row["hardware_flops_per_token"] = fm.hardware_per_token
        row["hardware_tflops_per_s"] = round(hw / work / 1e12, 3)
        if peak:
            row["mfu_model"] = round(fm.model_per_token * timed_tokens / work / peak, 4)
            row["hfu"] = round(hw / work / peak, 4)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m",
                    help="smollm2-135m | smollm2-shaped (its architecture, random weights) | tiny | any load_base name")
    ap.add_argument("--seqs-per-task", type=int, default=4, help="training sequences of each task")
    ap.add_argument("--epochs", type=int, default=4, help="passes over each task's sequences")
    ap.add_argument("--batch", type=int, default=1, help="rows per task per step (the flock's batch is tasks*batch)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--top-layers", type=int, default=4, help="adapt only the top k blocks (0 = all)")
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense bf16 peak TFLOP/s for MFU (default: from the GPU's exact name, benchmarks/mfu.py)")
    ap.add_argument("--warmup", type=int, default=2, help="steps of each training run left out of the timed rates")
    ap.add_argument("--arms", default="flock,flock_noprefix,peft_sequential,single_adapter")
    ap.add_argument(
        "--repeats", type=int, default=1, help="run the arms this many times, interleaved; keep each arm's fastest"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.targets = args.targets.split(",")
    if (args.seqs_per_task * args.epochs) % args.batch:
        ap.error("--seqs-per-task x --epochs must be a multiple of --batch (whole steps)")
    args.steps = args.seqs_per_task * args.epochs // args.batch
    if not 0 <= args.warmup < args.steps:
        ap.error(f"--warmup {args.warmup} must leave timed steps: use 0..{args.steps - 1}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    arms = args.arms.split(",")
    load_start = os.getloadavg()
    import peft  # noqa: F401  (import cost ~5 s: paid before any arm is timed)

    probe = _load(args)  # warm the page cache / converted-model cache for every arm alike
    vocab = probe.config.vocab_size
    cached = _top_layers(probe, args.top_layers) is not None  # adapters on the top blocks only
    del probe
    gen = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, vocab, (args.tasks, args.seqs_per_task, args.seq), generator=gen)  # (T, N, L)
    tokens = args.tasks * args.steps * args.batch * args.seq  # trained tokens (every epoch counts)
    timed_tokens = args.tasks * (args.steps - args.warmup) * args.batch * args.seq
    prefix_tokens = args.tasks * args.seqs_per_task * args.seq
    peak, peak_label, mfu_note = None, None, None
    if args.peak_tflops:
        peak, peak_label = 1e12 * args.peak_tflops, "--peak-tflops"
    elif args.device.startswith("cuda"):
        found = match_peak(torch.cuda.get_device_name())
        if found:
            peak_label, peak = found
        else:
            mfu_note = (f"no MFU: {torch.cuda.get_device_name()!r} is not in benchmarks/mfu.py's peak table; "
                        "pass --peak-tflops (its dense bf16 TFLOP/s)")
    else:
        mfu_note = "no MFU on the CPU unless --peak-tflops is given"
    results, flops = {}, None
    with tempfile.TemporaryDirectory(prefix="loraflock-bench-") as tmp:
        runners = {
            "flock": lambda: run_flock(args, data, Path(tmp) / "flock", args.tasks, prefix=True),
            "flock_noprefix": lambda: run_flock(args, data, Path(tmp) / "flock_np", args.tasks, prefix=False),
            "peft_sequential": lambda: run_peft_sequential(args, data, Path(tmp) / "peft"),
            "single_adapter": lambda: run_single_adapter(args, data, Path(tmp) / "single"),
            "single_core": lambda: run_flock(args, data, Path(tmp) / "single_core", 1, prefix=True),
        }
        unknown = sorted(set(arms) - set(runners))
        if unknown:
            ap.error(f"--arms: unknown {unknown}; choose from {sorted(runners)}")
        for rep in range(args.repeats):  # arms interleaved; each keeps its fastest repeat
            for arm in arms:
                res = runners[arm]()
                if "model" in res:
                    model = res.pop("model")
                    flops = flops or (lambda split, ours=True, m=model: arm_flops(m, args, split, ours))
                secs = sum(res["clock"].phases.values())
                if arm not in results or secs < sum(results[arm]["clock"].phases.values()):
                    results[arm] = res
                print(f"repeat {rep}: {arm} {secs:.1f}s", file=sys.stderr)
    rows = {arm: summarise(r, tokens, flops, peak, timed_tokens, prefix_tokens) for arm, r in results.items()}
    T, B, S = args.tasks, args.batch, args.steps
    does = {
        "flock": f"1 base load; inject {T} slots; 1 AdamW; "
                 + (f"frozen lower blocks run once for the {T}x{args.seqs_per_task} sequences (prefix cache); "
                    if cached else "")
                 + f"{S} train_step calls on mixed batches of {T}x{B} rows; save {T} PEFT adapters",
        "flock_noprefix": f"as flock but every step runs the full forward (no prefix cache): {S} train_step calls "
                          f"of {T}x{B} rows",
        "peft_sequential": f"{T} x (load base; peft.get_peft_model; AdamW loop of {S} steps of "
                           f"{B} rows of one task, full forward; save_pretrained)",
        "single_adapter": f"1 x (load base; peft.get_peft_model; AdamW loop of {S} steps of "
                          f"{T * B} rows, full forward; save_pretrained)",
        "single_core": f"our core with 1 slot, product path (prefix cache if top blocks only), {S} train_step calls "
                       f"of {T * B} rows",
    }
    for arm in rows:
        rows[arm]["does"] = does[arm]
    per_tok = lambda arm: rows[arm]["seconds"] / rows[arm]["tokens"]  # noqa: E731
    report = {
        "benchmark": "multitask_throughput",
        "compared": "flock (a, product path) vs peft_sequential (b) and single_adapter (c), same tokens, end to end",
        "settings": {k: v for k, v in vars(args).items()},
        "prefix_cache": cached,
        "machine": {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                    "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "flops_model": flops(0).as_dict() if flops else None,
        "peak": {"label": peak_label, "tflops": None if peak is None else peak / 1e12},
        **({"mfu_note": mfu_note} if mfu_note else {}),
        "arms": rows,
    }
    for arm, key in (("flock", "ratio_vs_peft_sequential"), ("flock_noprefix", "ratio_vs_peft_sequential_noprefix")):
        if arm in rows and "peft_sequential" in rows:
            report[key] = round(rows[arm]["tokens_per_s"] / rows["peft_sequential"]["tokens_per_s"], 3)
            # Without loading/saving: what remains for long trainings where loads are amortised.
            report["train_only_" + key] = round(
                rows[arm]["train_tokens_per_s"] / rows["peft_sequential"]["train_tokens_per_s"], 3
            )
    # The adapter-routing overhead, like for like: both arms run the full forward every step.
    like = "flock_noprefix" if "flock_noprefix" in rows else "flock"
    if like in rows and "single_adapter" in rows:
        report["per_token_cost_vs_single_adapter"] = round(per_tok(like) / per_tok("single_adapter"), 3)
        report["per_token_cost_vs_single_adapter_arm"] = like
        report["step_cost_vs_single_adapter"] = round(
            rows[like]["step_s_median"] / rows["single_adapter"]["step_s_median"], 3
        )
    if "flock" in rows and "single_core" in rows:
        report["per_token_cost_vs_single_core"] = round(per_tok("flock") / per_tok("single_core"), 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
