"""FineGates end to end: train gates + LoRA, export the pruned model, measure what it costs.

Run (real demo base; ~27 min on an idle 2-core CPU, under the benchmark lock):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/gates_export.py --steps 300 --batch 4 --seq 64 \
        --lr 1e-3 --lr-schedule cosine --harden-at 0.5 --calib 64 --distill 0.5 --align 64 \
        --eval-every 50   [--compare-init]
Quick check on a tiny random model (byte tokens):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gates_export.py --tiny --steps 20

Compares, with the same seed, LoRA init and batches:
  * ``lora``:  base + LoRA (all 7 projections of every block unless ``--lora-top``), trained
    ``--steps`` steps;
  * ``gated``: the same + one FineGate per MLP intermediate channel (the input columns of
    down_proj) in every block (``--heads``: also one per query head, on o_proj's input),
    trained on ``models.gates.schedule``'s schedule (importance init, penalty warm-up, noise
    annealing, binary gates with ``--target`` closed per layer (more with ``--align``) after
    ``--harden-at`` of the steps), then exported (gates folded, closed channels removed, adapter merged).
Data: training sequences from the stdlib's ``*.py`` (at most ``--per-file`` per file, drawn in
shuffled epochs), eval sequences from every 5th file (at most ``--eval-per-file`` per file, so
the default 128 come from 64 files). Prints ONE JSON object: removed_fraction (gated base
weights removed), ppl_increase_rel (gated eval ppl / lora eval ppl - 1), eval_ppl_by_step
(with ``--eval-every``), speedup (forward latency of the original model over the
exported one, full logits, same inputs, timed alternately), speedup_last_token_logits (the
same with ``logits_to_keep=1``, the prefill of generation), ppl of the untuned base, with
``--compare-init`` the ppl of one-shot pruning (no training) by each importance score,
exactness of the export, the settings and the load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gates_accuracy import classification_split, example_rows, model_accuracy, prompt_ids  # noqa: E402

from models.base import adaptable_layers, load_base, resolve_model  # noqa: E402
from models.gates.export import export_pruned, strip_adapters  # noqa: E402
from models.gates.heads import head_counts, inject_head_gates  # noqa: E402
from models.gates.layer import gate_params, inject_gates, sparsity_report  # noqa: E402
from models.gates.schedule import (  # noqa: E402
    GateController,
    GateSchedule,
    clear_hard,
    harden,
    importance_scores,
    init_from_importance,
)
from models.lora import adapter_params, inject, lora_layers, task_ids  # noqa: E402
from models.train.distill import kd_loss  # noqa: E402
from models.train.step import Batch, evaluate, row_nll, seed_everything, train_step  # noqa: E402
from models.train.trim import trim_columns  # noqa: E402

TINY = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256,
}


def corpus_ids(tokenize, seq: int, n_train: int, n_eval: int, per_file: int = 8,
               eval_per_file: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Train / eval sequences of ``seq`` tokens from the stdlib source; every 5th file is eval.

    Files are the stdlib's ``*.py`` at the top level first, then its packages (``rglob``), so
    a large ``n_train`` does not repeat sequences: with 256 sequences, LoRA on every block at
    lr 1e-3 overfits within 100 steps of 4 rows (held-out ppl 21.7 at step 50, 36.0 at 200),
    and a "same steps" comparison would then measure overfitting, not pruning.
    ``eval_per_file`` (default ``per_file``) caps the sequences taken from each held-out file:
    with 16 per file, 32 eval sequences came from only 2 files, too narrow a measure.
    """
    eval_cap = per_file if eval_per_file is None else eval_per_file
    root = Path(sysconfig.get_paths()["stdlib"])
    top = sorted(root.glob("*.py"))
    files = top + sorted(f for f in root.rglob("*.py") if f.parent != root and "site-packages" not in f.parts)
    train: list[list[int]] = []
    held: list[list[int]] = []
    for i, f in enumerate(files):
        pool, cap, take = (held, n_eval, eval_cap) if i % 5 == 4 else (train, n_train, per_file)
        if len(pool) >= cap:
            if len(train) >= n_train and len(held) >= n_eval:
                break
            continue
        ids = tokenize(f.read_text(encoding="utf-8", errors="ignore"))
        pool += [ids[j : j + seq] for j in range(0, len(ids) - seq + 1, seq)][: min(take, cap - len(pool))]
    return torch.tensor(train), torch.tensor(held)


def schedule(args) -> GateSchedule:
    return GateSchedule(args.steps, args.target, args.lam, args.warmup, args.sigma, 0.0, args.harden_at,
                        "layer", args.init_low, args.init_high, align=args.align)


def make_model(
    args, base_state, lora_layers_idx: list[int] | None, gated: bool, calib: torch.Tensor
) -> torch.nn.Module:
    model = load_base(random_init=TINY) if args.tiny else load_base(args.base)
    if base_state is not None:
        model.load_state_dict(base_state)
    seed_everything(args.seed)  # same LoRA init in both arms
    inject(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           num_tasks=1, rank=args.rank, alpha=2.0 * args.rank, layers=lora_layers_idx)
    if gated:
        # One gate per MLP intermediate channel (the input columns of down_proj) in every block:
        # exactly the dimension the export removes.
        inject_gates(model, ["down_proj"], gate_rows=False, sigma=args.sigma)
        if args.heads:  # and one per query head (o_proj's input), the same count closed under every KV head
            n = len(adaptable_layers(model)[1])
            inject_head_gates(model, layers=list(range(n - args.heads_top, n)) if args.heads_top else None,
                              sigma=args.sigma)
        if args.init in ("importance", "taylor") and len(calib):
            def forward() -> torch.Tensor:
                total = torch.zeros(())
                for i in range(0, len(calib), 8):
                    rows = calib[i : i + 8]
                    total = (
                        total
                        + row_nll(
                            model, Batch(rows, torch.zeros(len(rows), dtype=torch.long), torch.ones(len(rows)))
                        ).mean()
                    )
                return total

            kind = "taylor" if args.init == "taylor" else "magnitude"
            init_from_importance(model, importance_scores(model, forward, kind), args.init_low, args.init_high)
    return model


def row_batches(n: int, batch: int, steps: int, seed: int):
    """``steps`` index batches from successive random permutations of ``range(n)`` (epochs:
    no row repeats before every row has been seen)."""
    rng = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(order) < batch:
            order = torch.cat([order, torch.randperm(n, generator=rng)])
        rows, order = order[:batch], order[batch:]
        yield rows


def train(model, args, train_ids: torch.Tensor, gated: bool, teacher: torch.nn.Module | None = None,
          eval_ids: torch.Tensor | None = None, masks: tuple | None = None) -> tuple[float, dict[int, float]]:
    """``args.steps`` AdamW steps on epochs of shuffled rows; with ``teacher``, loss = (1 - w) CE
    + w KD. ``masks``: (train, eval) scored-token masks (instruction rows), else every token.
    Returns (seconds, {step: eval ppl} every ``--eval-every`` steps, untimed)."""
    train_mask, eval_mask = masks or (None, None)
    groups = [{"params": adapter_params(model), "lr": args.lr}]
    ctrl = None
    if gated:
        sched = schedule(args)
        args.gate_lr = args.gate_lr or round(sched.auto_gate_lr(), 4)
        groups.append({"params": gate_params(model), "lr": args.gate_lr})
        ctrl = GateController(model, sched)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    # cosine: every group's lr decays to 0 by the last step (both arms alike); constant: none
    decay = (
        (lambda i: 0.5 * (1 + math.cos(math.pi * i / args.steps))) if args.lr_schedule == "cosine" else (lambda i: 1.0)
    )
    sched_lr = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    curve: dict[int, float] = {}
    paused = 0.0
    t0 = time.perf_counter()
    for step, rows in enumerate(row_batches(len(train_ids), args.batch, args.steps, args.seed), start=1):
        if ctrl is not None:
            ctrl.on_step(step)
        if teacher is None:  # cut after the last scored token, as the flock's batches are (exact)
            ids, scored = trim_columns(train_ids[rows], None if train_mask is None else train_mask[rows])
            b = Batch(ids, torch.zeros(args.batch, dtype=torch.long), torch.full((args.batch,), 1 / args.batch),
                      scored=scored)
            nll = train_step(model, b, opt, params, extra_loss=ctrl.penalty if ctrl else None).nll
        else:
            nll = distill_step(model, teacher, train_ids[rows], opt, params, args, ctrl,
                               None if train_mask is None else train_mask[rows])
        sched_lr.step()
        if step % 10 == 0 or step == args.steps:
            extra = f" removed {sparsity_report(model)['removed_fraction']:.3f}" if ctrl else ""
            print(
                f"  step {step} nll {nll:.3f}{extra} {time.perf_counter() - t0 - paused:.0f}s",
                file=sys.stderr,
                flush=True,
            )
        if args.eval_every and eval_ids is not None and step % args.eval_every == 0 and step < args.steps:
            t_eval = time.perf_counter()
            curve[step] = round(math.exp(evaluate(model, {0: eval_ids}, 8, masks={0: eval_mask})[0]), 3)
            print(f"  step {step} eval ppl {curve[step]:.3f}", file=sys.stderr, flush=True)
            paused += time.perf_counter() - t_eval
    if ctrl is not None:
        ctrl.finish()
    return time.perf_counter() - t0 - paused, curve


def distill_step(model, teacher, ids: torch.Tensor, opt, params, args, ctrl, scored=None) -> float:
    """One step of ``(1 - w) * next-token CE + w * KD(teacher)`` (+ the gate penalty), clipped at 1.
    ``scored``: CE on these targets only (KD stays on every position up to the last scored one: the
    teacher's view of the prompt too)."""
    model.train()
    opt.zero_grad(set_to_none=True)
    if scored is not None:  # padding after the last completion token teaches nothing: cut it (as the CE arm does)
        ids, scored = trim_columns(ids, scored)
    with task_ids(model, 0):
        logits = model(input_ids=ids).logits[:, :-1]
    with torch.no_grad(), task_ids(teacher, 0):
        teacher.eval()
        t_logits = teacher(input_ids=ids).logits[:, :-1]
    target = ids[:, 1:] if scored is None else ids[:, 1:].masked_fill(~scored[:, 1:], -100)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100)
    loss = (1 - args.distill) * ce + args.distill * kd_loss(logits, t_logits, args.kd_temp)
    if ctrl is not None:
        loss = loss + ctrl.penalty()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(ce.detach())


@torch.no_grad()
def latency(models: dict[str, torch.nn.Module], ids: torch.Tensor, reps: int, **kw) -> dict[str, float]:
    """Median forward seconds of each model, timed alternately (same load for both)."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m(input_ids=ids, **kw)  # warm-up
    for _ in range(reps):
        for k, m in models.items():
            t0 = time.perf_counter()
            m(input_ids=ids, **kw)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random llama + byte tokens")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lora-top", type=int, default=0, help="LoRA on the top N blocks (0 = every block)")
    ap.add_argument("--target", type=float, default=0.3, help="fraction of MLP channels removed (one gate each)")
    ap.add_argument("--heads", action="store_true",
                    help="also gate attention heads (models.gates.heads): --target of each KV head's query heads")
    ap.add_argument("--heads-top", type=int, default=0, help="with --heads: gate heads of the top N blocks only")
    ap.add_argument("--lam", type=float, default=50.0)
    ap.add_argument("--sigma", type=float, default=0.1, help="training noise at step 1 (annealed to 0)")
    ap.add_argument("--warmup", type=float, default=0.2, help="penalty warm-up, fraction of steps")
    ap.add_argument("--harden-at", type=float, default=0.7, help="binary gates after this fraction of steps")
    ap.add_argument("--init", choices=["importance", "taylor", "constant"], default="importance")
    ap.add_argument("--init-low", type=float, default=0.6)
    ap.add_argument("--init-high", type=float, default=8.0)
    ap.add_argument("--calib", type=int, default=16, help="calibration sequences for the importance init")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                    help="cosine: adapters' and gates' lr decay to 0 by the last step, in both arms")
    ap.add_argument("--gate-lr", type=float, default=None, help="default: GateSchedule.auto_gate_lr()")
    ap.add_argument("--align", type=int, default=1,
                    help="round each layer's kept MLP width down to a multiple of this (64: kernel-friendly)")
    ap.add_argument("--train-seqs", type=int, default=2048, help="training sequences (no repeats at the default steps)")
    ap.add_argument(
        "--distill",
        type=float,
        default=0.0,
        help="KD weight w for the gated arm: (1 - w) CE + w KL to the trained ungated LoRA arm (0 = CE only)",
    )
    ap.add_argument("--kd-temp", type=float, default=1.0, help="distillation temperature")
    ap.add_argument("--compare-init", action="store_true", help="also measure one-shot pruning by each importance")
    ap.add_argument("--lat-batch", type=int, default=4)
    ap.add_argument("--lat-seq", type=int, default=128)
    ap.add_argument("--eval", type=int, default=128, help="eval sequences (held-out files)")
    ap.add_argument("--eval-per-file", type=int, default=2, help="at most this many eval sequences per held-out file")
    ap.add_argument("--per-file", type=int, default=4, help="at most this many training sequences per file")
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0 = only at the end)")
    ap.add_argument("--reps", type=int, default=10, help="latency repetitions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--metric", choices=["ppl", "accuracy"], default="ppl",
                    help="accuracy: train and judge on stdlib-instruct's classification subset (gates_accuracy.py)")
    ap.add_argument("--max-new-tokens", type=int, default=12, help="answer length cap of the accuracy arm")
    ap.add_argument("--eval-examples", type=int, default=1000, help="accuracy arm: at most ~this many eval examples")
    ap.add_argument("--base-accuracy", action="store_true", help="accuracy arm: also judge the untuned base (slow)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]

    if args.tiny:
        tokenize = lambda s: list(s.encode("utf-8"))  # noqa: E731  bytes < 300 = vocab
        decode = lambda ids: bytes(t for t in ids if t < 256).decode("utf-8", "ignore")  # noqa: E731
        eos_id, pad_id, newline = 256, 257, [10]
        base_state = load_base(random_init=TINY).state_dict()
    else:
        from transformers import AutoTokenizer

        directory, gguf = resolve_model(args.base)
        tok = (
            AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
            if gguf
            else AutoTokenizer.from_pretrained(directory)
        )
        tokenize = lambda s: tok(s)["input_ids"]  # noqa: E731
        decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
        eos_id, newline = tok.eos_token_id, tokenize("\n")
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_id
        base_state = None
    masks = judge = None
    if args.metric == "accuracy":  # instruction rows (completion scored) + greedy answers judged by accuracy
        train_pairs, eval_pairs = classification_split()
        eval_pairs = eval_pairs[:: max(1, math.ceil(len(eval_pairs) / args.eval_examples))]  # every package kept
        train_ids, train_mask = example_rows(tokenize, train_pairs, args.seq, eos_id, pad_id)
        eval_ids, eval_mask = example_rows(tokenize, eval_pairs, args.seq, eos_id, pad_id)
        masks = (train_mask, eval_mask)
        prompts = prompt_ids(tokenize, eval_pairs, args.seq - 1)
        refs = [c for _, c in eval_pairs]

        def judge(m: torch.nn.Module) -> float:
            return model_accuracy(m, prompts, refs, decode, [eos_id, *newline], pad_id, args.max_new_tokens)[0]
    else:
        train_ids, eval_ids = corpus_ids(tokenize, args.seq, n_train=args.train_seqs, n_eval=args.eval,
                                         per_file=args.per_file, eval_per_file=args.eval_per_file)
    eval_masks = {0: masks[1] if masks else None}
    lat_ids = corpus_ids(tokenize, args.lat_seq, n_train=0, n_eval=args.lat_batch)[1][: args.lat_batch]

    probe = load_base(random_init=TINY) if args.tiny else load_base(args.base)
    n_blocks = len(adaptable_layers(probe)[1])
    del probe
    top = list(range(n_blocks - args.lora_top, n_blocks)) if args.lora_top else None

    results = {}
    models = {}
    probe = make_model(args, base_state, top, False, train_ids[:0])  # B = 0: the base itself
    results["base"] = {"eval_ppl": math.exp(evaluate(probe, {0: eval_ids}, 8, masks=eval_masks)[0])}
    if judge is not None and args.base_accuracy:
        results["base"]["accuracy"] = judge(probe)
    del probe
    oneshot = {}
    if args.compare_init:  # no training: prune the target fraction by each importance, measure
        calib = train_ids[: args.calib]
        probe = make_model(args, base_state, top, True, calib[:0])
        for kind in ("magnitude", "taylor"):
            def forward() -> torch.Tensor:
                return sum(
                    row_nll(
                        probe,
                        Batch(
                            calib[i : i + 8],
                            torch.zeros(len(calib[i : i + 8]), dtype=torch.long),
                            torch.ones(len(calib[i : i + 8])),
                        ),
                    ).mean()
                    for i in range(0, len(calib), 8)
                )

            with torch.no_grad():  # all gates open again before scoring
                for p in gate_params(probe):
                    p.fill_(1.0)
            init_from_importance(probe, importance_scores(probe, forward, kind))
            harden(probe, args.target, align=args.align)
            oneshot[kind] = math.exp(evaluate(probe, {0: eval_ids}, 8, masks=eval_masks)[0])
            clear_hard(probe)
            print(
                f"[{time.perf_counter() - t_start:.0f}s] one-shot {kind} pruning, no training: ppl {oneshot[kind]:.2f}",
                file=sys.stderr,
                flush=True,
            )
        del probe
    for arm in ("lora", "gated"):
        model = make_model(args, base_state, top, arm == "gated", train_ids[: args.calib])
        teacher = models["lora"] if arm == "gated" and args.distill > 0 else None
        secs, curve = train(model, args, train_ids, gated=arm == "gated", teacher=teacher, eval_ids=eval_ids,
                            masks=masks)
        nll = evaluate(model, {0: eval_ids}, 8, masks=eval_masks)[0]
        print(f"[{time.perf_counter() - t_start:.0f}s] {arm}: {args.steps} steps in {secs:.0f}s, "
              f"eval ppl {math.exp(nll):.3f}", file=sys.stderr, flush=True)
        results[arm] = {
            "train_s": round(secs, 1),
            "eval_ppl": math.exp(nll),
            "curve": curve | {args.steps: round(math.exp(nll), 3)},
        }
        if judge is not None:
            results[arm]["accuracy"] = judge(model)
            print(f"  {arm} accuracy {results[arm]['accuracy']:.4f}", file=sys.stderr, flush=True)
        models[arm] = model

    gated = models["gated"]
    report = sparsity_report(gated)
    with torch.no_grad(), task_ids(gated, 0):
        before = gated.eval()(input_ids=lat_ids).logits
    pruned = export_pruned(gated, inplace=True)
    with torch.no_grad(), task_ids(pruned, 0):
        export_diff = float((pruned(input_ids=lat_ids).logits - before).abs().max())
    exp_nll = evaluate(pruned, {0: eval_ids}, 8, masks=eval_masks)[0]
    accuracy_fields = {}
    if judge is not None:  # the exported (pruned) model, still with its adapter unmerged
        acc = {k: results[k]["accuracy"] for k in ("base", "lora", "gated") if "accuracy" in results[k]}
        acc["exported"] = judge(pruned)
        accuracy_fields = {
            "metric": "accuracy (stdlib-instruct submodule, greedy, first line normalised)",
            "eval_examples": len(refs),
            **{f"accuracy_{k}": round(v, 4) for k, v in acc.items()},
            "accuracy_drop": round(100 * (acc["lora"] - acc["exported"]), 2),  # points, ungated minus exported
        }
    for m in (pruned, models["lora"]):  # deploy form: adapter merged into the base
        for layer in lora_layers(m).values():
            layer.merge(0)
        strip_adapters(m)
    original = models["lora"]
    n_orig = sum(p.numel() for p in original.parameters())
    n_pruned = sum(p.numel() for p in pruned.parameters())
    block_weights = {k: sum(p.numel() for n, p in m.named_parameters() if ".layers." in n and n.endswith("proj.weight"))
                     for k, m in (("original", original), ("exported", pruned))}
    full = latency({"original": original, "exported": pruned}, lat_ids, args.reps)
    prefill = latency({"original": original, "exported": pruned}, lat_ids, args.reps, logits_to_keep=1)

    print(
        json.dumps(
            {
                "benchmark": "gates_export",
                "compared": "LoRA+FineGates exported (pruned, merged) vs LoRA-only on the same base, steps, batches",
                "gated_loss": (
                    f"{1 - args.distill:g} * CE + {args.distill:g} * KD from the trained LoRA arm (T={args.kd_temp:g})"
                    if args.distill > 0
                    else "CE"
                ),
                "base": "tiny-random-llama" if args.tiny else args.base,
                "removed_fraction": round(report["removed_fraction"], 4),
                # of all the blocks' projection weights (q/k/v/o and the MLP), gated or not
                "removed_fraction_of_block_weights": round(
                    1 - block_weights["exported"] / block_weights["original"], 4
                ),
                **accuracy_fields,
                "ppl_base": round(results["base"]["eval_ppl"], 4),
                "ppl_oneshot_pruned_untrained": {k: round(v, 3) for k, v in oneshot.items()},
                "ppl_lora": round(results["lora"]["eval_ppl"], 4),
                "ppl_gated": round(results["gated"]["eval_ppl"], 4),
                "ppl_exported": round(math.exp(exp_nll), 4),
                "export_max_abs_logit_diff": export_diff,
                "ppl_increase_rel": round(results["gated"]["eval_ppl"] / results["lora"]["eval_ppl"] - 1, 4),
                "speedup": round(full["original"] / full["exported"], 3),
                "speedup_last_token_logits": round(prefill["original"] / prefill["exported"], 3),
                "speedup_last_token": round(prefill["original"] / prefill["exported"], 3),
                "latency_s": {"full_logits": full, "last_token_logits": prefill},
                "params": {"original": n_orig, "exported": n_pruned, "ratio": round(n_pruned / n_orig, 4)},
                "heads": {"original": head_counts(original), "exported": head_counts(pruned)},
                "train_s": {k: v["train_s"] for k, v in results.items() if "train_s" in v},
                "eval_ppl_by_step": {k: v["curve"] for k, v in results.items() if "curve" in v},
                "settings": {k: v for k, v in vars(args).items()}
                | {"lora_blocks": top, "threads": torch.get_num_threads(), "latency_batch": list(lat_ids.shape)},
                "total_s": round(time.perf_counter() - t_start, 1),
                "loadavg_start_end": [load_start, [round(x, 2) for x in os.getloadavg()]],
            }
        )
    )


if __name__ == "__main__":
    main()
