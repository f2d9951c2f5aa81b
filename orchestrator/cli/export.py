"""``loraflock export RUN_DIR --out DIR``: parse, call :func:`orchestrator.export.export_run`, print."""

from __future__ import annotations

import argparse

__all__ = ["add_export_command"]


def _cmd_export(a: argparse.Namespace) -> int:
    from orchestrator.export import export_run

    tasks = [t for part in a.tasks or [] for t in part.split(",") if t] or None
    m = export_run(a.run_dir, a.out, a.what, tasks, a.rank, a.max_lora_rank)
    print(f"exported {len(m['adapters'])} adapters ({m['kind']}, max rank {m['max_lora_rank']}) to {a.out}")
    for note in m["notes"]:
        print(f"  note: {note}")
    print(m["vllm"])
    return 0


def add_export_command(sub: argparse._SubParsersAction) -> None:
    """Mount ``export`` on the ``loraflock`` parser."""
    e = sub.add_parser("export", help="write a plain HF base + PEFT adapters + serve.json for a multi-LoRA server")
    e.add_argument("run_dir", help="the --out directory of a finished `loraflock run`")
    e.add_argument("--out", required=True, help="export directory (base/, adapters/<task>/, serve.json, README.md)")
    e.add_argument("--what", choices=["flock", "pick", "recycle"], default="flock",
                   help="the flock's adapters (default), the picked search trial, or the recycled adapters")
    e.add_argument("--tasks", nargs="+", help="only these adapters (names, space or comma separated)")
    e.add_argument("--rank", type=int, help="truncate every adapter to this rank by SVD (the error is reported)")
    e.add_argument("--max-lora-rank", type=int, help="pad every adapter to this one rank (the server's max_lora_rank)")
    e.set_defaults(func=_cmd_export)
