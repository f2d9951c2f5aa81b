"""The report for many tasks: every task's figures in ``tasks.csv``, distributions in ``report.md``.

A per-task table is what a person reads for six tasks and skims past for sixty; at thousands
it is noise. Past :data:`MANY_TASKS` tasks the report shows instead how the per-task gains are
distributed (against the untuned base and each baseline), how the gain depends on task size
(small tasks are where the prior should help), and the ten best and worst tasks. Every figure
of every task stays available in ``tasks.csv``, one row per task, for a spreadsheet or pandas.

Gains are relative perplexity reductions: ``(ref - flock) / ref``, positive when the flock is
better than ``ref``.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from statistics import median
from typing import Any

from models.files import atomic_write_text

__all__ = ["MANY_TASKS", "task_rows", "write_tasks_csv", "render_many_md", "skipped_tasks"]

MANY_TASKS = 50  # above this, report.md shows distributions instead of a per-task table


def _gain(ref: float | None, got: float | None) -> float | None:
    if ref is None or got is None or not math.isfinite(ref) or not math.isfinite(got) or ref <= 0:
        return None
    return (ref - got) / ref


def task_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: size, format, perplexities of every method and the gains.

    Columns: ``task, train_examples, format, truncated, dropped, base_ppl, flock_ppl``, then
    ``<baseline>_ppl`` per baseline, ``gain_vs_base`` and ``gain_vs_<baseline>``; task-set
    tasks add ``task_set`` and ``source_value`` (the original column value or file).
    """
    fl = report.get("flock") or {}
    data = (report.get("data") or {}).get("tasks", {})
    origin = {}
    for set_name, s in ((report.get("data") or {}).get("task_sets") or {}).items():
        for value, name in s.get("tasks", {}).items():
            origin[name] = (set_name, value)
    baselines = list(fl.get("baselines", {}))
    rows = []
    for name, t in fl.get("tasks", {}).items():
        d = data.get(name, {})
        row: dict[str, Any] = {
            "task": name,
            "train_examples": t.get("train_examples"),
            "format": d.get("format", "text"),
            "truncated": d.get("truncated", 0),
            "dropped": d.get("dropped", 0),
            "base_ppl": t.get("base_ppl"),
            "flock_ppl": t.get("eval_ppl"),
        }
        for b in baselines:
            row[f"{b}_ppl"] = fl["baselines"][b]["tasks"].get(name, {}).get("eval_ppl")
        for m in fl.get("metrics", []):  # each task's own metrics (eval:), for every method
            row[f"base_{m}"], row[f"flock_{m}"] = t.get(f"base_{m}"), t.get(m)
            for b in baselines:
                row[f"{b}_{m}"] = fl["baselines"][b]["tasks"].get(name, {}).get(m)
        row["gain_vs_base"] = _gain(row["base_ppl"], row["flock_ppl"])
        for b in baselines:
            row[f"gain_vs_{b}"] = _gain(row[f"{b}_ppl"], row["flock_ppl"])
        if name in origin:
            row["task_set"], row["source_value"] = origin[name]
        rows.append(row)
    return rows


def write_tasks_csv(out: Path, rows: list[dict[str, Any]]) -> None:
    """``tasks.csv``: every task's row (columns as :func:`task_rows`), written atomically."""
    if not rows:
        return
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns})
    atomic_write_text(out / "tasks.csv", buf.getvalue())


def skipped_tasks(report: dict[str, Any]) -> list[dict[str, str]]:
    """Task-set values that became no task, with the reason (too few examples, no usable example)."""
    out = []
    for set_name, s in ((report.get("data") or {}).get("task_sets") or {}).items():
        for value, why in s.get("skipped", {}).items():
            out.append({"task_set": set_name, "value": str(value), "reason": str(why)})
    return out


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def render_many_md(rows: list[dict[str, Any]], baselines: list[str], k: int = 10) -> list[str]:
    """Markdown for many tasks: gain distribution per reference, the k best and worst tasks."""
    lines = [f"{len(rows)} tasks: distributions below, every task's figures in `tasks.csv`.", "",
             "| flock vs | tasks better | median gain | 10th pct | 90th pct |", "|---|---:|---:|---:|---:|"]
    for ref in ["base", *baselines]:
        gains = sorted(g for r in rows if (g := r.get(f"gain_vs_{ref}")) is not None)
        if not gains:
            continue
        better = sum(g > 0 for g in gains)
        p10, p90 = gains[int(0.1 * (len(gains) - 1))], gains[int(0.9 * (len(gains) - 1))]
        lines.append(f"| {ref} | {better}/{len(gains)} | {_pct(median(gains))} | {_pct(p10)} | {_pct(p90)} |")
    ranked = sorted((r for r in rows if r.get("gain_vs_base") is not None), key=lambda r: r["gain_vs_base"])
    ref = baselines[0] if baselines else None
    head = "| task | train examples | base ppl | flock ppl | gain vs base |" + (f" gain vs {ref} |" if ref else "")
    sep = "|---|---:|---:|---:|---:|" + ("---:|" if ref else "")

    def table(title: str, chosen: list[dict]) -> list[str]:
        out = ["", f"**{title}**", "", head, sep]
        for r in chosen:
            extra = f" {_pct(r[f'gain_vs_{ref}'])} |" if ref and r.get(f"gain_vs_{ref}") is not None else (
                " |" if ref else "")
            out.append(f"| {r['task']} | {r['train_examples']} | {r['base_ppl']:.2f} | {r['flock_ppl']:.2f} | "
                       f"{_pct(r['gain_vs_base'])} |{extra}")
        return out

    lines += table(f"{k} best tasks (gain vs the untuned base)", ranked[::-1][:k])
    lines += table(f"{k} worst tasks", ranked[:k])
    return lines + [""]
