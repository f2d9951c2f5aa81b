"""A flock over one table of 300 tasks (split by a column) plus a 3-example task: the users' shape of data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from orchestrator.spec import JobSpec
from tests.conftest import TINY_LLAMA

pytestmark = pytest.mark.integration

N_TASKS = 300


def _table(path) -> None:
    """Each customer's completion is a fixed function of the prompt (the customer's own rule)."""
    rng = np.random.default_rng(0)
    rows = []
    for c in range(N_TASKS):
        for _ in range(int(rng.integers(3, 7))):
            word = "".join(rng.choice(list("abcdefgh"), size=4))
            rows.append(
                {"customer": f"Cust #{c:03d}", "prompt": f"echo {word}: ", "completion": word[c % 4 :] + word[: c % 4]}
            )
    rows.append({"customer": "lonely", "prompt": "echo abcd: ", "completion": "abcd"})  # 1 row < min_examples (2)
    pd.DataFrame(rows).to_parquet(path)


@pytest.fixture(scope="module")
def job_run(tmp_path_factory, local_ray):
    from orchestrator.pipeline import run_job

    tmp = tmp_path_factory.mktemp("sets")
    _table(tmp / "customers.parquet")
    with open(tmp / "tiny_task.jsonl", "w") as f:  # three examples: two to train on, one held out
        for p, c in [("2+2=", "4"), ("3+3=", "6"), ("4+4=", "8")]:
            f.write(json.dumps({"prompt": p, "completion": c}) + "\n")
    spec = JobSpec.model_validate({
        "name": "sets",
        "base": {"random_init": {**TINY_LLAMA, "vocab_size": 257}, "tokenizer": "bytes"},
        "tasks": [{"name": "three", "source": {"kind": "files", "path": str(tmp / "tiny_task.jsonl"),
                                                "example_format": "prompt_completion"}, "eval_fraction": 0.3}],
        "task_sets": [{"name": "customers", "task_field": "customer", "name_prefix": "c-",
                       "source": {"kind": "files", "path": str(tmp / "customers.parquet"),
                                  "example_format": "prompt_completion"}}],
        "lora": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "train": {"steps": 3, "batch_size": 8, "seq_len": 32, "lr": 1e-3, "log_every": 10},
        "flock": {"tau": 100, "baselines": ["unified"]},
        "eval": {"metrics": ["ppl", "exact_match", "rouge_l"], "max_new_tokens": 6},
        "ray": {"num_workers": 1},
    })
    out = tmp / "out"
    report = run_job(spec, out)
    return out, report


def test_every_task_of_the_set_trains_and_gets_its_adapter(job_run):
    out, report = job_run
    tasks = report["flock"]["tasks"]
    assert len(tasks) == N_TASKS + 1
    adapters = sorted(p.name for p in (out / "adapters").iterdir())
    assert len(adapters) == N_TASKS + 1 and "three" in adapters
    assert all((out / "adapters" / a / "adapter_model.safetensors").is_file() for a in adapters)
    mapping = report["data"]["task_sets"]["customers"]["tasks"]
    assert len(mapping) == N_TASKS and mapping["Cust #007"] == "c-Cust__007"  # unsafe characters become "_"


def test_a_three_example_task_trains_and_is_reported(job_run):
    out, report = job_run
    three = report["flock"]["tasks"]["three"]
    assert three["train_examples"] == 2 and np.isfinite(three["eval_ppl"])
    assert report["data"]["tasks"]["three"]["format"] == "prompt_completion"
    md = (out / "report.md").read_text()
    assert "## Data" in md and "completion tokens only" in md


def test_many_tasks_get_distributions_in_the_report_and_every_row_in_tasks_csv(job_run):
    import csv

    out, report = job_run
    with open(out / "tasks.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == N_TASKS + 1
    assert {"task", "train_examples", "base_ppl", "flock_ppl", "gain_vs_base"} <= set(rows[0])
    by_task = {r["task"]: r for r in rows}
    assert by_task["c-Cust__007"]["source_value"] == "Cust #007" and by_task["c-Cust__007"]["task_set"] == "customers"
    md = (out / "report.md").read_text()
    assert "tasks better" in md and "10 best tasks" in md and "10 worst tasks" in md
    assert "| c-Cust__" in md and md.count("| c-Cust__") <= 20  # the best and worst ten, not 300 rows
    assert (out / "plots" / "task_gains.png").is_file() and not (out / "plots" / "bora_per_task.png").exists()
    [skipped] = report["skipped_tasks"]
    assert (skipped["task_set"], skipped["value"]) == ("customers", "lonely") and skipped["reason"]


def test_each_task_is_judged_by_its_metrics_for_every_method(job_run):
    out, report = job_run
    fl = report["flock"]
    assert fl["metrics"] == ["exact_match", "rouge_l"]
    three = fl["tasks"]["three"]
    assert {"exact_match", "base_exact_match", "rouge_l", "base_rouge_l"} <= set(three)
    assert 0.0 <= three["exact_match"] <= 1.0 and "exact_match" in fl["baselines"]["unified"]["tasks"]["three"]
    judged = [t for t in fl["tasks"].values() if "rouge_l" in t]
    assert len(judged) == N_TASKS + 1
    assert fl["macro_rouge_l"] == pytest.approx(sum(t["rouge_l"] for t in judged) / len(judged))
    w = fl["wins"]["unified"]["rouge_l"]
    assert w["wins"] + w["losses"] + w["ties"] == N_TASKS + 1 and 0.0 <= w["p_value"] <= 1.0
    md = (out / "report.md").read_text()
    assert "Task metrics" in md
    assert "](plots/metric_gains.png)" in md and (out / "plots" / "metric_gains.png").is_file()  # gain vs size
    with open(out / "tasks.csv") as f:
        assert {"flock_exact_match", "base_exact_match", "unified_rouge_l"} <= set(f.readline().strip().split(","))
