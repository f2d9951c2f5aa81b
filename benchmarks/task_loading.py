"""Loading at scale: 1,000 tasks from one 200,000-row parquet table, one pass.

    OMP_NUM_THREADS=1 flock /tmp/loraflock-test.lock python benchmarks/task_loading.py [--format messages]

Writes a parquet file of support-chat rows (``customer_id``, ``split``, ``prompt``,
``completion``, ``messages``) for 1,000 customers of Zipf-like sizes (20 to ~2,000 rows) in
a temporary directory, then times ``tasks.build_task_data`` on one task set that splits it by
``customer_id`` (eval rows by the ``split`` column), with the SmolLM2 tokenizer and a
fresh ``datasets`` cache: load, group, render, tokenise, rows, masks, caps, for every task.

Prints one JSON object: ``{"tasks", "rows", "seconds", ...}`` with the format timed, the
target (60 s on 2 CPU cores) and the ratio to it, plus the other instruction format's time
for comparison (``--compare``).

Measured (shared 2-core CPU, seq_len 256, Dec 2026): ``messages`` 41.3 s (0.69 of the
target) for 1,000 tasks / 200,000 rows; ``prompt_completion`` 22.7 s (run second, so its
parquet load hit the ``datasets`` cache the first run filled).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_S = 60.0


def _vocab() -> list[str]:
    """Real English words from the stdlib's own docs (offline, deterministic)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    text = " ".join(
        (root / f).read_text(encoding="utf-8") for f in ("json/decoder.py", "logging/__init__.py", "email/message.py")
    )
    return sorted(set(re.findall(r"\b[a-z]{3,12}\b", text)))


def make_table(path: Path, tasks: int = 1000, rows: int = 200_000, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    sizes = 1.0 / np.arange(1, tasks + 1) ** 0.8
    sizes = np.maximum(20, np.floor(sizes / sizes.sum() * rows)).astype(np.int64)
    sizes[0] += rows - sizes.sum()  # exactly `rows` in all
    customer = np.repeat(np.arange(tasks), sizes)
    rng.shuffle(customer)
    words = np.array(_vocab())

    def sentences(lo: int, hi: int) -> list[str]:
        lens = rng.integers(lo, hi, size=rows)
        flat = words[rng.integers(0, len(words), size=int(lens.sum()))]
        cuts = np.cumsum(lens)[:-1]
        return [" ".join(s) + "." for s in np.split(flat, cuts)]

    prompts, completions = sentences(15, 60), sentences(10, 50)
    messages = [
        [{"role": "system", "content": f"You answer for customer {c}."}, {"role": "user", "content": p},
         {"role": "assistant", "content": a}]
        for c, p, a in zip(customer, prompts, completions)
    ]
    split = np.where(rng.random(rows) < 0.1, "test", "train")
    table = pa.table({
        "customer_id": [f"cust-{c:04d} Inc." for c in customer], "split": split,
        "prompt": prompts, "completion": completions, "messages": messages,
    })
    pq.write_table(table, path)


def time_format(path: Path, fmt: str, seq_len: int) -> tuple[float, list]:
    from tasks import TaskSetSpec, build_task_data
    from tasks.tokenizer import load_tokenizer

    tok = load_tokenizer("smollm2-135m")  # not timed: loaded once per job anyway
    fields = {"example_format": fmt}
    spec = TaskSetSpec(
        name="customers",
        source={"kind": "files", "path": str(path), **fields},
        task_field="customer_id",
        eval_split={"field": "split", "value": "test"},
        min_examples=10,
    )
    t = time.perf_counter()
    data = build_task_data([], tok, seq_len, seed=0, task_sets=[spec])
    return time.perf_counter() - t, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="messages", choices=["messages", "prompt_completion"])
    ap.add_argument("--compare", action="store_true", help="also time the other instruction format")
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--seq-len", type=int, default=256)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_DATASETS_CACHE"] = str(Path(tmp) / "cache")  # cold cache: nothing reused from a former run
        import datasets

        datasets.disable_progress_bars()
        path = Path(tmp) / "chats.parquet"
        t = time.perf_counter()
        make_table(path, a.tasks, a.rows)
        gen_s = time.perf_counter() - t
        seconds, data = time_format(path, a.format, a.seq_len)
        out = {
            "tasks": len(data),
            "rows": a.rows,
            "seconds": round(seconds, 2),
            "format": a.format,
            "seq_len": a.seq_len,
            "target_s": TARGET_S,
            "ratio_to_target": round(seconds / TARGET_S, 3),
            "train_examples": int(sum(d.train_examples for d in data)),
            "eval_examples": int(sum(d.eval_examples for d in data)),
            "truncated": int(sum(d.stats["truncated"] for d in data)),
            "scored_train_tokens": int(sum(d.train_tokens for d in data)),
            "table_generation_s": round(gen_s, 2),
            "cpus": os.cpu_count(),
            "compared": (
                f"build_task_data on one task set (1 table -> {len(data)} tasks) against the {TARGET_S:.0f} s target"
            ),
        }
        if a.compare:
            other = "prompt_completion" if a.format == "messages" else "messages"
            out[f"{other}_seconds"] = round(time_format(path, other, a.seq_len)[0], 2)
        print(json.dumps(out))


if __name__ == "__main__":
    main()
