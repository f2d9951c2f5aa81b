"""`loraflock run` end to end on a real local Ray (integration): outputs, PEFT-loadable adapters,
resume, refusal of a foreign output directory, and 1 worker == 2 workers (the joint MAP); and
``init_ray`` with Ray already running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny.yaml"
CLI = [sys.executable, "-m", "orchestrator.cli"]


def _run(args: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(CLI + args, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)


def test_init_ray_uses_the_running_ray_and_starts_no_other(local_ray, monkeypatch):
    """The stages call ``init_ray`` in the driver; with Ray up (the tests' local_ray, or a
    caller's own ``ray.init``) it changes nothing, even with an address given."""
    from orchestrator.pipeline import init_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = local_ray.get_runtime_context().gcs_address
    init_ray(None)
    init_ray("127.0.0.1:1")  # not probed: nothing listens there
    assert local_ray.is_initialized() and local_ray.get_runtime_context().gcs_address == before


@pytest.mark.integration
def test_without_an_address_a_new_local_ray_starts_even_when_a_dead_cluster_is_on_file():
    """A killed head leaves ``ray_current_cluster`` behind; a bare ``ray.init()`` would join it
    and hang in GCS time-outs for minutes. ``init_ray(None)`` starts its own instance."""
    import shutil
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="lf", dir="/tmp"))  # Ray's socket paths must stay < 108 bytes
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    (ray_tmp / "ray_current_cluster").write_text("127.0.0.1:1")  # a head that is long gone
    code = ("import ray; from orchestrator.pipeline import init_ray; init_ray(None); "
            "print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                             timeout=90)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-2000:]
    gcs = out.stdout.split("GCS ", 1)[1].split()[0]
    assert not gcs.endswith(":1"), gcs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "out"
    r = _run(["run", str(TINY), "--out", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r


@pytest.mark.integration
def test_outputs_follow_the_contract(tiny_run):
    out, r = tiny_run
    rep = json.loads((out / "report.json").read_text())
    fl = rep["flock"]
    tasks = ["json", "http", "email"]
    assert sorted(fl["tasks"]) == sorted(tasks)
    for t in tasks:
        row = fl["tasks"][t]
        assert row["train_examples"] > 0
        assert row["eval_ppl"] == pytest.approx(torch.tensor(row["eval_loss"]).exp().item(), rel=1e-6)
        for b in ("independent", "unified"):
            assert t in fl["baselines"][b]["tasks"]
    assert fl["macro_ppl"] < fl["base_macro_ppl"]  # the adapters learned something
    assert {"data_s", "flock_s", "total_s"} <= set(rep["timing"])
    md = (out / "report.md").read_text()
    assert "| json |" in md and "plots/bora_per_task.png" in md
    assert (out / "plots" / "bora_per_task.png").stat().st_size > 1000
    for t in tasks:
        assert (out / "adapters" / t / "adapter_config.json").is_file()
        assert (out / "adapters" / t / "adapter_model.safetensors").is_file()
    # adapters are written once: the Ray checkpoints hold the results JSON only, no adapter copies
    checkpoints = [c for c in (out / "ray" / "flock").glob("checkpoint_*") if c.is_dir()]
    assert checkpoints and all(not (c / "adapters").exists() for c in checkpoints)
    assert all({p.name for p in c.iterdir()} == {"results"} for c in checkpoints)
    assert "step 12/12" in r.stdout + r.stderr  # progress is visible
    # PESC: trained on all tasks pooled, with a per-layer expert load that sums to 1
    pe = rep["pesc"]
    assert sorted(pe["tasks"]) == sorted(tasks) and pe["trainable_params"] > 0
    for shares in pe["expert_load"].values():
        assert len(shares) == 4 and abs(sum(shares) - 1) < 1e-6
    assert (out / "pesc" / "moe" / "moe_config.json").is_file() and (out / "plots" / "expert_load.png").is_file()
    # recycling: subspace + coefficients, and the held-out task trained both ways
    rc = rep["recycle"]
    assert rc["k"] == 4 and rc["storage_ratio"] > 1 and 0 <= rc["reconstruction_rel_error"] < 1
    nt = rc["new_task"]
    assert nt["task"] == "logging" and nt["coeff_params"] * 10 < nt["lora_params"]
    assert nt["coeff_ppl"] < nt["base_ppl"] and nt["lora_ppl"] < nt["base_ppl"]
    assert (out / "recycle" / "subspace" / "subspace.json").is_file()
    assert (out / "recycle" / "new_task" / "coeff" / "adapter_model.safetensors").is_file()
    assert (out / "prior" / "theta" / "adapter_config.json").is_file()
    assert "## PESC" in md and "## Recycling" in md


@pytest.mark.integration
def test_peft_reproduces_the_reported_eval_loss(tiny_run):
    """Load a delivered adapter with PEFT on the same base: its eval NLL is the report's."""
    from peft import PeftModel

    from models.base import load_base
    from models.train.step import Batch, row_nll  # noqa: F401  (row_nll needs injected layers; use plain CE)
    from orchestrator.spec import load_job
    from tasks import build_task_data
    from tasks.tokenizer import load_tokenizer

    out, _ = tiny_run
    spec = load_job(TINY)
    data = {
        d.name: d for d in build_task_data(spec.tasks, load_tokenizer("bytes"), spec.train.seq_len, spec.train.seed)
    }
    rep = json.loads((out / "report.json").read_text())
    base = load_base(random_init=spec.base.random_init, seed=spec.train.seed)
    model = PeftModel.from_pretrained(base, out / "adapters" / "http").eval()
    ids = data["http"].eval_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert float(nll) == pytest.approx(rep["flock"]["tasks"]["http"]["eval_loss"], rel=1e-4)


@pytest.mark.integration
def test_export_reproduces_the_reported_eval_loss_and_the_recycled_adapters(tiny_run, tmp_path):
    """`loraflock export` of the tiny run: the flock's adapters (eval loss as reported) and the recycled
    coefficient adapters (the logits of the project's own reconstruction) on one plain base."""
    from models.eigen.subspace import Subspace
    from models.lora import inject, task_ids
    from models.peft_io import load_adapter
    from orchestrator.base.load import load_job_base
    from orchestrator.spec import load_job
    from tests.orchestrator.export.served import check_flock_export, eval_rows, export_cli, served_model

    out, _ = tiny_run
    spec = load_job(TINY)
    m = check_flock_export(out, tmp_path / "flock", spec, "--max-lora-rank", "8")
    assert m["kind"] == "plain" and {a["rank"] for a in m["adapters"]} == {8}
    rc = export_cli(out, tmp_path / "recycle", "--what", "recycle")
    assert sorted(a["name"] for a in rc["adapters"]) == ["email", "http", "json", "logging"]
    sub, rows = Subspace.load(out / "recycle" / "subspace"), eval_rows(spec)
    for task in ("http", "logging"):
        own = load_job_base(spec, "cpu", "float32")
        inject(own, spec.lora.target_modules, 1, spec.lora.rank, spec.lora.alpha, layers=[1])
        if task == "logging":  # the held-out task adapted on coefficients only
            load_adapter(own, 0, out / "recycle" / "new_task" / "coeff")
            ids = rows["http"]
        else:
            sub.export_peft(task, tmp_path / "own")
            load_adapter(own, 0, tmp_path / "own")
            ids = rows[task]
        with torch.no_grad(), task_ids(own, 0):
            want = own(input_ids=ids).logits
        got = served_model(tmp_path / "recycle", task)(input_ids=ids).logits
        assert float((got - want).norm() / want.norm()) < 1e-4, task


@pytest.mark.integration
def test_rerun_resumes_and_foreign_dir_is_refused(tiny_run, tmp_path):
    out, _ = tiny_run
    r = _run(["run", str(TINY), "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "already finished, skipped" in r.stdout
    other = yaml.safe_load(TINY.read_text())
    other["train"]["steps"] = 3
    p = tmp_path / "other.yaml"
    p.write_text(yaml.safe_dump(other))
    r = _run(["run", str(p), "--out", str(out)])
    assert r.returncode == 2 and "holds the results of another job" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.integration
def test_bad_target_modules_fail_before_ray_starts(tmp_path):
    bad = yaml.safe_load(TINY.read_text())
    bad["lora"]["target_modules"] = ["qkv_nope"]
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(bad))
    r = _run(["run", str(p), "--out", str(tmp_path / "o")], timeout=120)
    assert r.returncode == 2 and "lora: target_modules ['qkv_nope'] match no layer" in r.stderr
    assert "Traceback" not in r.stderr and "starting an embedded local Ray" not in r.stdout


@pytest.mark.integration
def test_two_workers_give_the_single_process_joint_map(tiny_run, tmp_path):
    out1, _ = tiny_run
    two = yaml.safe_load(TINY.read_text())
    two["ray"] = {"num_workers": 2, "cpus_per_worker": 1}
    two["flock"]["baselines"] = []
    two["pesc"]["enabled"] = False
    two["recycle"]["enabled"] = False
    p = tmp_path / "two.yaml"
    p.write_text(yaml.safe_dump(two))
    r = _run(["run", str(p), "--out", str(tmp_path / "o2")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one = json.loads((out1 / "report.json").read_text())["flock"]
    rep2 = json.loads((tmp_path / "o2" / "report.json").read_text())["flock"]
    assert len(rep2["assignment"]) == 2 and all(rep2["assignment"].values())
    for t, row in one["tasks"].items():
        assert rep2["tasks"][t]["eval_loss"] == pytest.approx(row["eval_loss"], rel=2e-4), t


@pytest.mark.integration
def test_adapt_cli_trains_coefficients_on_the_recycled_subspace(tiny_run, tmp_path):
    out, _ = tiny_run
    task = tmp_path / "task.yaml"
    task.write_text(
        "name: concurrent\nsource: {kind: builtin, package: concurrent}\n"
        "max_train_sequences: 4\nmax_eval_sequences: 2\n"
    )
    r = _run(["adapt", "--subspace", str(out / "recycle" / "subspace"), str(task), "--steps", "3",
              "--out", str(tmp_path / "a")], timeout=200)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["task"] == "concurrent" and res["coeff_params"] < res["lora_params"]
    assert (tmp_path / "a" / "coeff" / "adapter_config.json").is_file()
    bad = _run(["adapt", "--subspace", str(tmp_path), str(task)], timeout=60)
    assert bad.returncode == 2 and "not a subspace directory" in bad.stderr


@pytest.mark.integration
def test_unreachable_cluster_fails_fast(tmp_path):
    import time

    t0 = time.monotonic()
    r = _run(["run", str(TINY), "--out", str(tmp_path / "o"), "--address", "127.0.0.1:1"], timeout=120)
    assert r.returncode == 2 and "cannot reach a Ray cluster at 127.0.0.1:1" in r.stderr
    assert "Traceback" not in r.stderr and time.monotonic() - t0 < 60


@pytest.mark.integration
def test_search_pick_feeds_the_recycle_stage_without_a_flock(tmp_path):
    """search.pick with a budget nothing meets: the closest point is picked (and said so), and
    recycle builds its subspace from that trial's adapters and adapts the new task on its base."""
    job = yaml.safe_load(TINY.read_text())
    job["flock"]["enabled"] = False
    job["pesc"]["enabled"] = False
    space = tmp_path / "space.yaml"  # the top blocks at 16 or 4 bits x 0/40% gates, one trial each
    space.write_text(yaml.safe_dump({"description": "pick test", "dimensions": {
        "bits": {"grid": [16, 4]}, "target_sparsity": {"grid": [0.0, 0.4]}, "rank": {"value": 4},
        "tau": {"value": 100.0}, "lr": {"value": 2.0e-3}}}))
    job["search"].update({"space": str(space), "num_samples": 1, "pick": {"max_bytes": 1}})
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(job))
    out = tmp_path / "out"
    r = _run(["run", str(spec), "--out", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    picked = rep["search"]["picked"]
    done = [t for t in rep["search"]["trials"] if t["status"] == "done"]
    assert not picked["met"] and picked["model_bytes"] == min(t["model_bytes"] for t in done)
    assert rep["recycle"]["source"] == "search.picked" and rep["recycle"]["picked"]["trial_id"] == picked["trial_id"]
    assert sorted(rep["recycle"]["adapters"]) == ["email", "http", "json"] and "flock" not in rep
    md = (out / "report.md").read_text()
    assert f"trial {picked['trial_id']}" in md and "none of the front meets it" in md and "compressed base" in md
    # the picked trial exported for a server: the rebuilt trial's logits on every task's eval rows
    from models.lora import task_ids
    from orchestrator.search.pick import load_picked_model
    from orchestrator.spec import load_job
    from tests.orchestrator.export.served import eval_rows, export_cli, served_model

    m = export_cli(out, tmp_path / "exp", "--what", "pick")
    run_spec = load_job(spec)
    trial, rows = load_picked_model(run_spec, picked, out / picked["checkpoint"]), eval_rows(run_spec)
    assert m["kind"] == "picked" and [a["name"] for a in m["adapters"]] == ["json", "http", "email"]
    for slot, task in enumerate(["json", "http", "email"]):
        with torch.no_grad(), task_ids(trial, slot):
            want = trial(input_ids=rows[task]).logits
        with torch.no_grad():
            got = served_model(tmp_path / "exp", task)(input_ids=rows[task]).logits
        assert float((got - want).norm() / want.norm()) < 1e-4, task
    rc = export_cli(out, tmp_path / "exp-recycle", "--what", "recycle")  # the recycled picked trial, same base
    assert rc["kind"] == "recycled" and len(rc["adapters"]) == 4
