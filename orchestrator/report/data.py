"""The data section of the report: what each task was trained and scored on.

Instruction formats score completions only (unless ``train_on_prompt``), so a perplexity in
this report is over scored tokens, not over every token of a row; the section says which
tokens those are, how many examples each format contributed, and how many were truncated or
dropped for being longer than a row. Task sets add the mapping from each original value
(a column value or a file) to its task's name.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

__all__ = ["data_section", "render_data_md"]

_SCORING = {
    "text": "every token of the packed text",
    "prompt_completion": "completion tokens only",
    "alpaca": "output tokens only",
    "messages": "assistant turns only",
}


def data_section(data: list, task_sets: dict | None = None) -> dict[str, Any]:
    """``report.json``'s ``data`` block from the built tasks (``tasks.TaskData``) and set mapping.

    Returns:
        ``{"tasks": {name: {format, train_examples, eval_examples, train_tokens, truncated,
        dropped, empty}}, "formats": {format: tasks}, "truncated", "dropped", "scoring",
        "task_sets"}``.
    """
    tasks: dict[str, dict] = {}
    for d in data:
        st = d.stats or {}
        fmt = st.get("format", "text")
        prompts = bool(st.get("train_on_prompt"))
        tasks[d.name] = {
            "format": fmt,
            "train_examples": int(d.train_examples),
            "eval_examples": int(d.eval_examples),
            "train_tokens": int(d.train_tokens),
            "truncated": int(st.get("truncated", 0)),
            "dropped": int(st.get("dropped", 0)),
            "empty": int(st.get("empty", 0)),
            "scored": "every token" if prompts and fmt != "text" else _SCORING.get(fmt, "every token"),
        }
    formats = Counter(t["format"] for t in tasks.values())
    return {
        "tasks": tasks,
        "formats": dict(formats),
        "truncated": sum(t["truncated"] for t in tasks.values()),
        "dropped": sum(t["dropped"] for t in tasks.values()),
        "scoring": "perplexities are over scored tokens only (padding never; instruction formats: the completion)",
        "task_sets": task_sets or {},
    }


def render_data_md(section: dict[str, Any], max_rows: int = 50) -> list[str]:
    """Markdown lines: formats and what they score, truncation counts, task-set sizes."""
    tasks = section["tasks"]
    lines = ["## Data", ""]
    by_fmt: dict[str, list[dict]] = {}
    for t in tasks.values():
        by_fmt.setdefault(t["format"], []).append(t)
    lines += ["| format | tasks | train examples | eval examples | scored | truncated | dropped |",
              "|---|---:|---:|---:|---|---:|---:|"]
    for fmt, ts in sorted(by_fmt.items()):
        scored = sorted({t["scored"] for t in ts})
        lines.append(f"| {fmt} | {len(ts)} | {sum(t['train_examples'] for t in ts):,} | "
                     f"{sum(t['eval_examples'] for t in ts):,} | {'; '.join(scored)} | "
                     f"{sum(t['truncated'] for t in ts):,} | {sum(t['dropped'] for t in ts):,} |")
    lines += ["", "Perplexities in this report are over scored tokens only: padding never counts, and instruction "
              "formats count their completions (every assistant turn for `messages`) unless `train_on_prompt` is set. "
              "`truncated`: examples longer than a row, cut from the left of the prompt; `dropped`: left out "
              "(`truncation: drop`).", ""]
    for name, s in (section.get("task_sets") or {}).items():
        n, skipped = len(s.get("tasks", {})), len(s.get("skipped", {}))
        lines.append(f"Task set **{name}** (split by `{s.get('field')}`): {n} tasks"
                     + (f", {skipped} values skipped (see `report.json` `data.task_sets`)" if skipped else "") + ".")
    if section.get("task_sets"):
        lines.append("")
    if len(tasks) > max_rows:
        lines += [f"({len(tasks)} tasks: per-task counts are in `report.json` under `data.tasks`.)", ""]
    return lines
