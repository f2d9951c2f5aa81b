"""The metric-gain plot: drawn for every judged metric at 10,000 tasks, its size-binned trend, linked in report.md."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.report.plots import make_plots, size_binned_mean


def _report(n: int) -> dict:
    """A flock report of ``n`` tasks judged by exact_match and rouge_l: the flock gains more on small tasks."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(3, 3000, size=n)
    tasks, indep, unified = {}, {}, {}
    for i, k in enumerate(sizes):
        gain = 0.3 / np.log10(k + 1)  # larger on small tasks, as partial pooling should give
        em = float(np.clip(rng.integers(0, 13) / 12, 0, 1))
        tasks[f"t{i}"] = {"train_examples": int(k), "eval_ppl": 5.0, "base_ppl": 9.0, "exact_match": em,
                          "base_exact_match": 0.0, "rouge_l": min(1.0, 0.5 + gain), "base_rouge_l": 0.1}
        indep[f"t{i}"] = {"eval_ppl": 6.0, "exact_match": em, "rouge_l": 0.5}
        unified[f"t{i}"] = {"eval_ppl": 7.0, "exact_match": max(0.0, em - 0.1), "rouge_l": 0.45}
    return {"flock": {"tasks": tasks, "metrics": ["exact_match", "rouge_l"], "curves": {},
                      "baselines": {"independent": {"tasks": indep}, "unified": {"tasks": unified}}}}


def testsize_binned_mean_follows_the_trend_of_a_dense_cloud():
    rng = np.random.default_rng(1)
    xs = rng.integers(2, 5000, size=10_000)
    ys = 10.0 / np.log10(xs) + rng.normal(0, 3.0, size=xs.size)  # noisy, falling with size
    bx, by = size_binned_mean(xs, ys, bins=8)
    assert len(bx) == 8 and np.all(np.diff(bx) > 0)
    assert np.all(np.diff(by) < 0)  # the trend comes through the noise
    assert xs.min() <= bx[0] and bx[-1] <= xs.max()
    low = xs < np.geomspace(xs.min(), xs.max() * 1.0001, 9)[1]  # the first of 8 log-spaced bins
    assert by[0] == pytest.approx(ys[low].mean()) and by[0] > ys.mean()


def test_metric_gain_plot_is_drawn_at_ten_thousand_tasks(tmp_path):
    files = make_plots(tmp_path, _report(10_000))
    assert files["metric_gains"] == "plots/metric_gains.png" and files["task_gains"] == "plots/task_gains.png"
    png = (tmp_path / files["metric_gains"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    few = make_plots(tmp_path / "few", _report(12))  # a small job: the per-task ppl plot, and the metric plot too
    assert "metric_gains" in few and "bora_per_task" in few
    no_metric = _report(12)
    del no_metric["flock"]["metrics"]
    assert "metric_gains" not in make_plots(tmp_path / "none", no_metric)
