"""Generation throughput: one mixed batch of 8 tasks (each row through its own adapter slot) vs PEFT task by task.

Run (defaults: SmolLM2-135M, 8 tasks of the builtin ``stdlib-instruct`` signature subset, 4
prompts each, 32 new tokens, LoRA r=8 on all 7 projections of every block; ~2 min on a 2-core CPU):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/generate_throughput.py
Quick (tiny random llama and the bytes tokenizer):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/generate_throughput.py --model tiny
Label scoring (``choice_accuracy``) instead of generation:
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/generate_throughput.py --choices

Both arms generate greedily from the same prompts with the same adapters (random, B != 0, so
the tasks differ), the same stop ids and ``max_new_tokens``, with a KV cache:

* ``mixed`` (ours): :func:`models.generate.generate` on all ``tasks * rows`` prompts at once
  (``--batch`` rows per ``generate`` call, tasks mixed), routed per row by slot.
* ``peft_task_by_task``: the 8 adapters saved in PEFT's format and loaded into one
  ``PeftModel``; for each task ``set_adapter`` then ``generate`` on that task's rows
  (left-padded, one batch).

Loading is not timed; each arm is warmed up once. Tokens are the generated ones up to each
row's stop (the same count for both arms when their tokens agree; ``same_tokens`` says
whether they do). Prints ONE JSON object with tokens/s of each arm and
``ratio_vs_peft_task_by_task``.

``--choices``: ``choice_accuracy``'s label scoring on the classification set of
``examples/instruct.yaml`` (builtin ``stdlib-instruct`` ``submodule`` subset, ``messages``
through the chat template; each task's labels are its distinct training completions), all
tasks' rows mixed, with :func:`models.generate.score_choices` two ways on the same model and
rows: ``before`` runs one whole (prompt, label) sequence per pair (``share_prompt=False``, the
code before the shared prompt), ``after`` runs each prompt once and every label from its KV
cache. Prints ONE JSON object with both times, ``speedup`` (before / after), the largest
score difference and whether every row picks the same label.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.base import load_base  # noqa: E402
from models.generate import generate, left_pad  # noqa: E402
from models.lora import inject, lora_layers  # noqa: E402
from models.peft_io import save_adapter  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=1024)


def _prompts(args, tok) -> list[list[list[int]]]:
    """Per task, ``rows`` prompts: eval examples of one stdlib package's signature task."""
    from tasks import build_task_data
    from tasks.evaluate import eval_examples
    from tasks.spec import STDLIB_PACKAGES, TaskSpec

    specs = [TaskSpec(name=p, source={"kind": "builtin", "suite": "stdlib-instruct", "subset": "signature",
                                      "package": p}, eval_fraction=0.5)
             for p in STDLIB_PACKAGES[: args.tasks]]
    data = build_task_data(specs, tok, seq_len=args.seq if args.model != "tiny" else 4 * args.seq)
    out = []
    for d in data:
        ex = eval_examples(d, tok)
        prompts = ex.prompts if len(ex) >= args.rows else ex.prompts + [list(r) for r in ex.prompts] * args.rows
        out.append(prompts[: args.rows])
    return out


def _choice_rows(args, tok):
    """(prompts, slots, label ids per row) of the classification tasks: every eval row of each task."""
    from tasks import build_task_data
    from tasks.evaluate import eval_examples
    from tasks.metric_spec import MetricSettings
    from tasks.spec import STDLIB_PACKAGES, TaskSpec

    specs = [TaskSpec(name=p, source={"kind": "builtin", "suite": "stdlib-instruct", "subset": "submodule",
                                      "package": p, "example_format": "messages"}, eval_fraction=0.2)
             for p in STDLIB_PACKAGES[: args.tasks]]
    data = build_task_data(specs, tok, seq_len=args.seq if args.model != "tiny" else 4 * args.seq,
                           chat_template="chatml" if args.model == "tiny" else None)  # bytes: no template
    settings = MetricSettings(metrics=["choice_accuracy"])
    prompts, slots, choices = [], [], []
    for t, d in enumerate(data):
        ex = eval_examples(d, tok, settings, max_examples=args.rows)
        prompts += ex.prompts
        slots += [t] * len(ex)
        choices += [ex.choices.ids] * len(ex)
    return prompts, slots, choices


def choices_main(args, tok, model) -> None:
    """The ``--choices`` arm (see the module docstring)."""
    from models.generate import score_choices

    prompts, slots, choices = _choice_rows(args, tok)
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    kw = dict(pad_id=pad, batch_size=args.batch)
    score_choices(model, prompts[:2], slots[:2], choices[:2], **kw)  # warm-up
    times, scores = {}, {}
    for arm, share in (("before", False), ("after", True)):
        t0 = time.perf_counter()
        scores[arm] = score_choices(model, prompts, slots, choices, share_prompt=share, **kw)
        times[arm] = time.perf_counter() - t0
    diff = max(float((a - b).abs().max()) for a, b in zip(scores["before"], scores["after"]))
    same = sum(int(a.argmax()) == int(b.argmax()) for a, b in zip(scores["before"], scores["after"]))
    print(json.dumps({
        "benchmark": "score_choices",
        "compared": "choice_accuracy label scoring: one (prompt, label) sequence per pair (before) vs each prompt "
                    "once + every label from its KV cache (after), tasks mixed, per-row adapter slots",
        "model": args.model,
        "tasks": len(set(slots)),
        "rows": len(prompts),
        "pairs": sum(len(c) for c in choices),
        "labels_per_row_mean": round(sum(len(c) for c in choices) / len(choices), 2),
        "prompt_tokens_mean": round(sum(len(p) for p in prompts) / len(prompts), 1),
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "before_s": round(times["before"], 3),
        "after_s": round(times["after"], 3),
        "speedup": round(times["before"] / times["after"], 2),
        "max_abs_score_diff": diff,
        "same_choice_rows": same,
    }))


def _model(args):
    if args.model == "tiny":
        return load_base(random_init=TINY, seed=0)
    return load_base(args.model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m | tiny | any load_base name")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--rows", type=int, default=4, help="prompts per task")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32, help="rows per generate call of the mixed arm")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seq", type=int, default=160, help="tokens per example (prompt cut from the left; x4 for tiny)")
    ap.add_argument("--choices", action="store_true", help="time choice_accuracy's label scoring instead")
    args = ap.parse_args()
    from peft import PeftModel

    from tasks.tokenizer import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer("bytes" if args.model == "tiny" else args.model)
    per_task = _prompts(args, tok)
    prompts = [p for ps in per_task for p in ps]
    slots = [t for t, ps in enumerate(per_task) for _ in ps]
    eos = int(tok.eos_token_id)
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else eos)

    model = _model(args).eval()
    inject(model, TARGETS, num_tasks=len(per_task), rank=args.rank, alpha=2.0 * args.rank)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "trained" adapters: B != 0, each task its own
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)
    if args.choices:
        return choices_main(args, tok, model)
    kw = dict(pad_id=pad, stop_ids=[eos], max_new_tokens=args.max_new_tokens)
    generate(model, prompts[:2], slots[:2], **{**kw, "max_new_tokens": 2})  # warm-up
    t0 = time.perf_counter()
    mixed = generate(model, prompts, slots, batch_size=args.batch, **kw)
    mixed_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        for t in range(len(per_task)):
            save_adapter(model, t, Path(tmp) / f"t{t}")
        del model
        peft = PeftModel.from_pretrained(_model(args), Path(tmp) / "t0", adapter_name="t0")
        for t in range(1, len(per_task)):
            peft.load_adapter(Path(tmp) / f"t{t}", adapter_name=f"t{t}")
    peft.eval()
    gen_kw = dict(max_new_tokens=args.max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                  pad_token_id=pad)

    def peft_run(tasks: list[list[list[int]]], names: list[str]) -> list[list[int]]:
        out = []
        for ps, name in zip(tasks, names):
            peft.set_adapter(name)
            ids, mask = left_pad(ps, pad)
            with torch.no_grad():
                seqs = peft.generate(input_ids=ids, attention_mask=mask, **gen_kw)
            for new in seqs[:, ids.shape[1]:].tolist():
                out.append(new[: new.index(eos)] if eos in new else new)
        return out

    gen_kw["max_new_tokens"] = 2
    peft_run([per_task[0][:2]], ["t0"])  # warm-up
    gen_kw["max_new_tokens"] = args.max_new_tokens
    t0 = time.perf_counter()
    peft_ids = peft_run(per_task, [f"t{t}" for t in range(len(per_task))])
    peft_s = time.perf_counter() - t0

    tokens = sum(len(x) for x in mixed.ids)
    peft_tokens = sum(len(x) for x in peft_ids)
    same = sum(a == b for a, b in zip(mixed.ids, peft_ids))
    print(json.dumps({
        "benchmark": "generate_throughput",
        "compared": "one mixed-task batched generation (per-row adapter slots, KV cache, greedy) vs PEFT "
                    "set_adapter + generate for each task's rows",
        "model": args.model,
        "tasks": len(per_task),
        "rows": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "mixed_tokens": tokens,
        "mixed_s": round(mixed_s, 3),
        "mixed_tokens_per_s": round(tokens / mixed_s, 1),
        "peft_tokens": peft_tokens,
        "peft_task_by_task_s": round(peft_s, 3),
        "peft_task_by_task_tokens_per_s": round(peft_tokens / peft_s, 1),
        "same_tokens": same == len(prompts),
        "rows_with_same_tokens": same,
        "ratio_vs_peft_task_by_task": round((tokens / mixed_s) / (peft_tokens / peft_s), 2),
    }))


if __name__ == "__main__":
    main()
