"""The report's plots (matplotlib, Agg backend, PNG files under ``plots/``)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from models.files import atomic_write_bytes  # noqa: E402

__all__ = ["make_plots", "metric_gains", "size_binned_mean"]

_COLORS = {"base": "#9e9e9e", "hierarchical": "#1f77b4", "independent": "#ff7f0e", "unified": "#2ca02c"}


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _per_task(out: Path, fl: dict) -> str:
    tasks = sorted(
        (t for t in fl["tasks"] if fl["tasks"][t]["eval_ppl"] is not None),
        key=lambda t: fl["tasks"][t]["train_examples"],
    )
    sizes = [fl["tasks"][t]["train_examples"] for t in tasks]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    series = [
        ("base", [fl["tasks"][t]["base_ppl"] for t in tasks]),
        ("hierarchical", [fl["tasks"][t]["eval_ppl"] for t in tasks]),
    ]
    for b, v in fl.get("baselines", {}).items():
        series.append((b, [v["tasks"][t]["eval_ppl"] or float("nan") for t in tasks]))
    for name, ys in series:
        ax.plot(sizes, ys, marker="o", label=name, color=_COLORS.get(name), linestyle="--" if name == "base" else "-")
    for x, t in zip(sizes, tasks):
        ax.annotate(
            t, (x, series[0][1][tasks.index(t)]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8
        )
    ax.set_xscale("log")
    ax.set_xlabel("training examples of the task (log)")
    ax.set_ylabel("eval perplexity")
    ax.set_title("Per-task perplexity vs task size")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, out / "plots" / "bora_per_task.png")
    return "plots/bora_per_task.png"


def _curves(out: Path, fl: dict) -> str:
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for name, pts in fl.get("curves", {}).items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=name, color=_COLORS.get(name))
    ax.set_xlabel("step")
    ax.set_ylabel("training objective (size-weighted NLL)")
    ax.set_title("Training curves (same batches for every method)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, out / "plots" / "curves.png")
    return "plots/curves.png"


def _tau(out: Path, fl: dict) -> str | None:
    hist = fl.get("tau_history")
    if not hist:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.5))
    groups = sorted({g for h in hist for g in h.get("tau", {})})
    for g in groups:
        ax.plot([h["step"] for h in hist], [h["tau"].get(g) for h in hist], label=g)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("tau (prior precision)")
    ax.set_title("Inferred tau per module group")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, out / "plots" / "tau.png")
    return "plots/tau.png"


def _expert_load(out: Path, pe: dict) -> str:
    """Load per expert per layer (left) and which experts each task uses (right)."""
    import numpy as np

    layers = list(pe["expert_load"])
    grid = np.array([pe["expert_load"][k] for k in layers])
    tasks = list(pe["task_expert_load"])
    per_task = (
        np.array([np.mean([pe["task_expert_load"][t][k] for k in layers], axis=0) for t in tasks]) if tasks else None
    )
    fig, axes = plt.subplots(
        1, 2 if per_task is not None else 1, figsize=(11, 0.45 * max(len(layers), len(tasks)) + 2.2), squeeze=False
    )
    by_layer = [k.split(".")[-2] if "." in k else k for k in layers]
    panels = [(axes[0, 0], grid, by_layer, "share of tokens per expert, by layer")]
    if per_task is not None:
        panels.append((axes[0, 1], per_task, tasks, "share of tokens per expert, by task (mean over layers)"))
    for ax, data, rows, title in panels:
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_xticks(range(data.shape[1]))
        ax.set_xlabel("expert")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    _save(fig, out / "plots" / "expert_load.png")
    return "plots/expert_load.png"


def _gains(out: Path, rows: list[dict], baselines: list[str]) -> str:
    """Many tasks: the distribution of per-task gains (left) and gain against task size (right).

    Histograms and a scatter with small translucent markers stay readable at 10,000 tasks,
    where one annotated line per task would not.
    """
    import numpy as np

    refs = [r for r in ["base", *baselines] if any(x.get(f"gain_vs_{r}") is not None for x in rows)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.0))
    for ref in refs:
        g = np.array([x[f"gain_vs_{ref}"] for x in rows if x.get(f"gain_vs_{ref}") is not None]) * 100
        color = _COLORS.get(ref if ref != "base" else "base")
        left.hist(g, bins=min(60, max(10, len(g) // 20)), alpha=0.5, label=f"vs {ref}", color=color)
        pts = [(x["train_examples"], x[f"gain_vs_{ref}"] * 100) for x in rows if x.get(f"gain_vs_{ref}") is not None]
        xs, ys = zip(*pts) if pts else ((), ())
        right.scatter(xs, ys, s=6 if len(pts) > 500 else 14, alpha=0.35 if len(pts) > 500 else 0.7,
                      label=f"vs {ref}", color=color)
    left.axvline(0, color="black", linewidth=0.8)
    left.set_xlabel("flock's perplexity gain per task (%)")
    left.set_ylabel("tasks")
    left.set_title(f"Per-task gain of the flock ({len(rows)} tasks)")
    left.legend(fontsize=8)
    right.axhline(0, color="black", linewidth=0.8)
    right.set_xscale("log")
    right.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    right.set_xlabel("training examples of the task (log)")
    right.set_ylabel("gain (%)")
    right.set_title("Gain against task size")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    _save(fig, out / "plots" / "task_gains.png")
    return "plots/task_gains.png"


def size_binned_mean(xs, ys, bins: int = 12):
    """Mean of ``ys`` in log-spaced bins of ``xs`` (bins with a point): the trend a dense cloud hides."""
    import numpy as np

    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    if len(xs) < 2 or xs.min() <= 0 or xs.min() == xs.max():
        return xs, ys
    edges = np.geomspace(xs.min(), xs.max() * 1.0001, bins + 1)
    at = np.digitize(xs, edges) - 1
    keep = [b for b in range(bins) if (at == b).any()]
    return (np.array([np.exp(np.log(xs[at == b]).mean()) for b in keep]),
            np.array([ys[at == b].mean() for b in keep]))


def metric_gains(out: Path, rows: list[dict], metrics: list[str], baselines: list[str]) -> str:
    """Each task metric: the flock's gain over the base and each baseline (points) against task size.

    One panel per metric; a task's gain is ``flock - reference`` on that task (metrics are in
    [0, 1], so in points, not relative). Per-task points are small and translucent past 500
    tasks, and a line joins each reference's mean gain in log-spaced size bins, so the plot
    stays readable at 10,000 tasks where metric values (k / eval rows) pile up on a few levels.
    """
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.0), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        n_tasks = 0
        for ref in ["base", *baselines]:
            pts = [(x["train_examples"], 100 * (x[f"flock_{m}"] - x[f"{ref}_{m}"])) for x in rows
                   if x.get(f"flock_{m}") is not None and x.get(f"{ref}_{m}") is not None and x.get("train_examples")]
            if not pts:
                continue
            n_tasks = max(n_tasks, len(pts))
            xs, ys = zip(*pts)
            many = len(pts) > 500
            ax.scatter(xs, ys, s=5 if many else 14, alpha=0.25 if many else 0.6, color=_COLORS.get(ref), linewidths=0)
            bx, by = size_binned_mean(xs, ys)
            mean = sum(ys) / len(ys)
            ax.plot(bx, by, color=_COLORS.get(ref), linewidth=1.8, label=f"vs {ref} (mean {mean:+.1f} pts)")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training examples of the task (log)")
        ax.set_ylabel(f"flock's {m} gain (points)")
        ax.set_title(f"{m}: gain against task size ({n_tasks} tasks)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _save(fig, out / "plots" / "metric_gains.png")
    return "plots/metric_gains.png"


def make_plots(out: Path, report: dict) -> dict[str, str]:
    """Draw every plot the report's data allows; return {key: relative path}."""
    files: dict[str, str] = {}
    fl = report.get("flock")
    if fl:
        from orchestrator.report.many_tasks import MANY_TASKS, task_rows

        if len(fl["tasks"]) > MANY_TASKS:
            files["task_gains"] = _gains(out, task_rows(report), list(fl.get("baselines", {})))
        else:
            files["bora_per_task"] = _per_task(out, fl)
        if fl.get("metrics"):  # each task's own metric (eval:): gain over each baseline against size
            files["metric_gains"] = metric_gains(out, task_rows(report), fl["metrics"], list(fl.get("baselines", {})))
        files["curves"] = _curves(out, fl)
        t = _tau(out, fl)
        if t:
            files["tau"] = t
    if report.get("pesc"):
        files["expert_load"] = _expert_load(out, report["pesc"])
    return files
