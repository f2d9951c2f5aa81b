"""The ``loraflock`` command line: parses arguments and calls the SDK, nothing more.

Bad input never shows a traceback: user errors print their message and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def _cmd_validate(a: argparse.Namespace) -> int:
    from orchestrator.preflight import preflight
    from orchestrator.spec import load_job

    spec = load_job(a.job)
    preflight(spec)  # target modules and ranks against the model's architecture (meta device)
    print(f"{a.job}: valid job {spec.name!r} ({len(spec.tasks)} tasks, {len(spec.task_sets)} task sets, "
          f"base {spec.base.name or 'random-init'})")
    if spec.task_sets:
        from tasks.task_sets import describe_task_sets

        for s in describe_task_sets(spec.task_sets, spec.train.seed, {t.name for t in spec.tasks}):
            print(f"  task set {s['name']!r}: {s['tasks']} tasks from {s['values']} values of {s['field']} "
                  f"({s['skipped']} skipped); rows per task min {s['min']}, median {s['median']:g}, max {s['max']}")
    if spec.base.quantized:
        from orchestrator.base.quant import describe_quant

        print(describe_quant(spec))
    return 0


def _cmd_schema(a: argparse.Namespace) -> int:
    from orchestrator.spec import JobSpec

    print(json.dumps(JobSpec.model_json_schema(), indent=2))
    return 0


def _cmd_run(a: argparse.Namespace) -> int:
    from orchestrator.pipeline import run_job
    from orchestrator.spec import load_job

    spec = load_job(a.job)
    out = a.out or f"runs/{spec.name}"
    run_job(spec, out, a.address)
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from orchestrator.demo import demo_job
    from orchestrator.pipeline import run_job

    run_job(demo_job(), a.out, a.address)
    return 0


def _cmd_adapt(a: argparse.Namespace) -> int:
    from orchestrator.cli.adapt import adapt_from_cli

    result = adapt_from_cli(a.subspace, a.task, a.out, a.job, a.steps, a.lr, a.k_extra, a.compare_lora)
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loraflock",
        description="Distributed multi-task LoRA on Ray: hierarchical-prior adapter flocks and their baselines.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="run a job on an embedded local Ray or a cluster (--address)")
    r.add_argument("job", help="job YAML file")
    r.add_argument("--out", help="output directory (default runs/<job name>); re-run on it to resume")
    r.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    r.set_defaults(func=_cmd_run)
    d = sub.add_parser("demo", help="run the builtin demo job (SmolLM2-135M, stdlib-code suite)")
    d.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    d.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    d.set_defaults(func=_cmd_demo)
    v = sub.add_parser("validate", help="check a job YAML; print every problem with its field path")
    v.add_argument("job")
    v.set_defaults(func=_cmd_validate)
    ad = sub.add_parser("adapt", help="train a new task's coefficients on a recycled subspace (EigenLoRAx)")
    ad.add_argument("--subspace", required=True, help="a recycle/subspace directory written by a job")
    ad.add_argument("task", help="YAML file with one task spec (name + source), as in a job's tasks list")
    ad.add_argument("--out", help="where the PEFT adapter goes (default <run>/adapt/<task>)")
    ad.add_argument("--job", help="job YAML giving base/lora/train (default: the run's job.json)")
    ad.add_argument("--steps", type=int, help="training steps (default: the job's train.steps)")
    ad.add_argument("--lr", type=float, help="coefficient learning rate (default: the job's train.lr)")
    ad.add_argument("--k-extra", type=int, default=0, help="random Gram-Schmidt directions per side")
    ad.add_argument("--compare-lora", action="store_true", help="also train a full LoRA with the same steps")
    ad.set_defaults(func=_cmd_adapt)
    s = sub.add_parser("schema", help="print the job spec's JSON schema")
    s.set_defaults(func=_cmd_schema)
    from orchestrator.cli.export import add_export_command

    add_export_command(sub)
    try:
        from orchestrator.cli.submit import add_submit_commands
    except ImportError:
        pass
    else:
        add_submit_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from orchestrator.errors import user_errors

    try:
        return int(args.func(args) or 0)
    except user_errors() as e:
        print(f"loraflock: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loraflock: interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
