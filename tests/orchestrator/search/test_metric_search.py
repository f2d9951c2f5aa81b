"""The compression search on a task metric: the seeded rows every trial judges, and a real Tune run on local Ray
whose trials report the metric at every rung, whose front and pick use it, and whose reported value is the
picked model's metric recomputed."""

from __future__ import annotations

import csv
import glob
import json
from pathlib import Path

import numpy as np
import pytest

from orchestrator.spec import JobSpec
from tests.conftest import TINY_LLAMA

SPACE = """\
dimensions:
  rank: {value: 4}
  bits: {grid: [4, 16]}
  tau: {value: 100.0}
  lr: {grid: [0.003, 0.03]}
"""
TASKS = ("rev", "rot1", "rot2")


def _write_tasks(tmp: Path) -> None:
    """Each task's completion is a fixed function of its prompt's word (its own rule)."""
    rng = np.random.default_rng(0)
    for t, name in enumerate(TASKS):
        with open(tmp / f"{name}.jsonl", "w") as f:
            for _ in range(40):
                w = "".join(rng.choice(list("abcdefgh"), size=4))
                out = " ".join(w[::-1] if t == 0 else w[t:] + w[:t])  # letters as words: ROUGE-L's partial credit
                f.write(json.dumps({"prompt": f"say {w}: ", "completion": out}) + "\n")


def _job(tmp: Path, **search) -> JobSpec:
    _write_tasks(tmp)
    (tmp / "space.yaml").write_text(SPACE)
    return JobSpec.model_validate({
        "name": "metric-search",
        "base": {"random_init": {**TINY_LLAMA, "vocab_size": 257}, "tokenizer": "bytes"},
        "tasks": [{"name": n, "source": {"kind": "files", "path": str(tmp / f"{n}.jsonl"),
                                         "example_format": "prompt_completion"}, "eval_fraction": 0.25}
                  for n in TASKS],
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "top_layers": 1},
        "train": {"steps": 6, "batch_size": 8, "seq_len": 32, "lr": 3e-3, "log_every": 100},
        "eval": {"metrics": ["ppl", "rouge_l"], "max_new_tokens": 6},
        "flock": {"enabled": False},
        "search": {"enabled": True, "space": str(tmp / "space.yaml"), "num_samples": 1, "steps": 30,
                   "eval_every": 10, "eval_subset": 2, "grace_period": 10, "max_concurrent_trials": 1,
                   "metric": "rouge_l", "metric_rows": 4, **search},
    })


def test_every_trial_judges_the_same_seeded_rows_of_each_task(tmp_path):
    from orchestrator.data import build_job_data
    from orchestrator.search.judge import trial_judge_plan

    spec = _job(tmp_path)
    data = build_job_data(spec)
    plan = trial_judge_plan(spec, spec.search, data)
    again = trial_judge_plan(spec, spec.search, list(reversed(data)))  # task order does not move a task's rows
    other = trial_judge_plan(spec, spec.search.model_copy(update={"seed": 1}), data)
    assert plan["metric"] == "rouge_l" and sorted(plan["plan"]) == sorted(TASKS)
    assert plan["slots"] == {d.name: i for i, d in enumerate(data)}
    for name, p in plan["plan"].items():
        ex = p["examples"]
        assert len(ex) == 4 and p["settings"]["metrics"] == ["rouge_l"]  # only the searched metric is judged
        assert ex.prompts == again["plan"][name]["examples"].prompts
        full = next(d for d in data if d.name == name)
        assert len(full.eval_prompt_lens) > 4  # a real subset of the task's eval rows
    assert any(plan["plan"][n]["examples"].prompts != other["plan"][n]["examples"].prompts for n in TASKS)
    assert trial_judge_plan(spec, spec.search.model_copy(update={"metric": "ppl"}), data) is None


def test_a_trial_reports_the_metric_at_every_rung_and_it_is_its_trained_model_judged(tmp_path):
    """run_trial (what a Tune trial runs, without Ray): every report holds macro_rouge_l; the last one equals
    the trial's trained model, rebuilt from the reported state, judged by evaluate_metrics on the plan's rows."""
    import torch

    from orchestrator.data import build_job_data
    from orchestrator.search.driver import trial_job
    from orchestrator.search.judge import trial_judge_plan
    from orchestrator.search.trial import build_payload, build_trial_model, run_trial
    from orchestrator.task_metrics import job_tokenizer
    from tasks.evaluate import evaluate_metrics
    from tasks.metric_spec import MetricSettings

    spec = _job(tmp_path)
    data = build_job_data(spec)
    payload = build_payload(trial_job(spec), [d.name for d in data], [int(d.train_examples) for d in data],
                            [d.train_ids.numpy() for d in data], [d.eval_ids.numpy() for d in data], 1,
                            [d.train_mask.numpy() for d in data], [d.eval_mask.numpy() for d in data])
    plan = trial_judge_plan(spec, spec.search, data)
    fixed = {"steps": 30, "eval_every": 10, "eval_subset": 2, "quantizer": "nf", "lq_iters": 1, "gate_lambda": 0.0,
             "gate_lr": 0.1, "threads": 1}
    config = {"rank": 4, "bits": 16, "tau": 100.0, "lr": 0.03, "_search": fixed}
    reports = []
    run_trial(config, {**payload, "judge": plan}, lambda m, state: reports.append((dict(m), state)))
    assert [m["step"] for m, _ in reports] == [10, 20, 30] and reports[-1][0]["final"]
    assert all(0.0 <= m["macro_rouge_l"] <= 1.0 and m["judge_s"] > 0 for m, _ in reports)
    model, _ = build_trial_model(spec, config, len(data), "nf", 1)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in reports[-1][1].items():
            params[k].copy_(v)
    got = evaluate_metrics(model, {t: p["examples"] for t, p in plan["plan"].items()},
                           {t: MetricSettings.model_validate(p["settings"]) for t, p in plan["plan"].items()},
                           job_tokenizer(spec), slot_of=plan["slots"])
    final = reports[-1][0]["macro_rouge_l"]
    assert final > 0 and final == pytest.approx(np.mean([m["rouge_l"] for m in got.values()]), abs=1e-9)
    assert len({m["macro_rouge_l"] for m, _ in reports}) > 1  # judged anew at each rung


@pytest.mark.integration
def test_search_on_rouge_l_reports_it_at_every_rung_and_the_front_and_pick_use_it(local_ray, tmp_path):
    from orchestrator.data import build_job_data
    from orchestrator.report.search import render_search_md
    from orchestrator.search.driver import run_search
    from orchestrator.search.judge import trial_judge_plan
    from orchestrator.search.pick import load_picked_model
    from orchestrator.task_metrics import job_tokenizer
    from tasks.evaluate import evaluate_metrics
    from tasks.metric_spec import MetricSettings

    spec = _job(tmp_path, pick={"min_metric": {"rouge_l": 0.99}})  # out of reach of 30 steps: the closest point
    data = build_job_data(spec)
    out = tmp_path / "out"
    section = run_search(spec, spec.search, data, out, "tiny")

    # every report of every trial (each rung and the final one) holds the metric
    results = glob.glob(str(out / "ray" / "search" / "*" / "result.json"))
    assert len(results) == 4
    for f in results:
        reports = [json.loads(line) for line in Path(f).read_text().splitlines()]
        assert reports and all(0.0 <= r["macro_rouge_l"] <= 1.0 and r["judge_s"] > 0 for r in reports)
        assert [r["step"] for r in reports] == [10, 20, 30][: len(reports)]
    with open(out / "search" / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    assert header[header.index("macro_ppl") + 1] == "macro_rouge_l"
    assert section["metric"] == "rouge_l" and section["objective"] == {
        "key": "macro_rouge_l", "mode": "max", "rows_per_task": 4, "tasks": sorted(TASKS)}

    # the front: the finished trials no other beats on (rouge_l up, bytes down), by the definition
    done = [r for r in section["trials"] if r["status"] == "done"]
    assert done and max(r["macro_rouge_l"] for r in done) > 0  # the lr 0.03 trials learn some of the letters

    def beats(p, q):
        return (p["macro_rouge_l"] >= q["macro_rouge_l"] and p["model_bytes"] <= q["model_bytes"]
                and (p["macro_rouge_l"] > q["macro_rouge_l"] or p["model_bytes"] < q["model_bytes"]))

    want = sorted(r["trial_id"] for r in done if not any(beats(o, r) for o in done))
    assert sorted(r["trial_id"] for r in section["pareto"]) == want
    # the pick: the smallest point of the front with macro rouge_l >= 0.99, else (on_miss: closest) the highest
    picked = section["picked"]
    assert picked["rule"]["min_metric"] == {"rouge_l": 0.99}
    assert_picked_on_metric(section)

    # the reported metric is the picked trial's trained model judged on the plan's rows
    model = load_picked_model(spec, picked, out / "search" / "pick")
    plan = trial_judge_plan(spec, spec.search, data)
    got = evaluate_metrics(model, {t: p["examples"] for t, p in plan["plan"].items()},
                           {t: MetricSettings.model_validate(p["settings"]) for t, p in plan["plan"].items()},
                           job_tokenizer(spec), slot_of=plan["slots"])
    assert picked["macro_rouge_l"] == pytest.approx(np.mean([m["rouge_l"] for m in got.values()]), abs=1e-6)

    md = "\n".join(render_search_md(section))
    assert "macro rouge l" in md and "higher is better" in md and "rouge_l >= 0.99" in md
    assert (out / "plots" / "pareto.png").is_file()


class _Result:
    """What the driver reads of a Tune ``Result``: last metrics, config, path, error, checkpoint."""

    def __init__(self, path: Path, config: dict, metrics: dict) -> None:
        from ray.tune import Checkpoint

        (path / "ckpt").mkdir(parents=True)
        (path / "ckpt" / "trial_state.safetensors").write_bytes(b"")
        self.path, self.config, self.metrics, self.error = str(path), config, metrics, None
        self.checkpoint = Checkpoint.from_directory(str(path / "ckpt"))


def test_the_driver_writes_the_metric_column_and_its_front_and_picks_on_it(tmp_path):
    """The driver's collection of finished trials (no Ray run): CSV column, front on (rouge_l up, bytes down),
    the section's objective, and min_metric picks (met and closest)."""
    from orchestrator.report.search import render_search_md
    from orchestrator.search.driver import _collect  # noqa: PLC2701 (the driver's collection step)
    from orchestrator.specs.search import SearchSpec

    trials = {"a": (0.30, 900, True), "b": (0.50, 1000, True), "c": (0.20, 500, True), "d": (0.25, 950, True),
              "e": (0.90, 100, False)}  # e: stopped early, never on the front
    results = [_Result(tmp_path / "ray" / t, {"rank": 4, "bits": 16, "lr": 0.01},
                       {"trial_id": t, "final": fin, "step": 30 if fin else 10, "macro_ppl": 10.0 + i,
                        "macro_rouge_l": m, "model_bytes": b, "judge_s": 0.5, "sparsity": 0.0})
               for i, (t, (m, b, fin)) in enumerate(trials.items())]
    quant = {"quantizer": "nf", "lq_iters": 2}
    for bound, want, met in [(0.25, "a", True), (0.45, "b", True), (0.95, "b", False)]:
        search = SearchSpec(metric="rouge_l", pick={"min_metric": {"rouge_l": bound}})
        out = tmp_path / f"out{bound}"
        sec = _collect(results, search, "space.yaml", 30, out, "tiny", 1.0, quant, ["x", "y"], ["x", "y"])
        assert [r["trial_id"] for r in sec["pareto"]] == ["b", "a", "c"]  # d is beaten by a; e is not done
        assert (sec["picked"]["trial_id"], sec["picked"]["met"]) == (want, met)
        assert sec["objective"] == {"key": "macro_rouge_l", "mode": "max", "rows_per_task": 32, "tasks": ["x", "y"]}
        with open(out / "search" / "trials.csv", newline="") as f:
            header = next(csv.reader(f))
        assert header[header.index("macro_ppl") + 1] == "macro_rouge_l" and "judge_s" in header
    md = "\n".join(render_search_md(sec))
    assert "| macro rouge l | macro ppl |" in md and "rouge_l >= 0.95" in md and "none of the front meets it" in md
    by_ppl = _collect(results, SearchSpec(), "space.yaml", 30, tmp_path / "ppl", "tiny", 1.0, quant, ["x"], [])
    assert [r["trial_id"] for r in by_ppl["pareto"]] == ["a", "c"]  # on perplexity a is best, c smallest


def assert_picked_on_metric(section: dict, key: str = "macro_rouge_l", bound: float = 0.99) -> None:
    """The pick of ``min_metric``: the smallest point of the front reaching ``bound``, else the highest."""
    picked, front = section["picked"], section["pareto"]
    reach = [r for r in front if r[key] >= bound]
    if reach:
        assert picked["met"] and picked["model_bytes"] == min(r["model_bytes"] for r in reach)
    else:
        assert not picked["met"] and picked[key] == max(r[key] for r in front)
