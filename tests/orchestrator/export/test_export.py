"""`loraflock export` on runs built in process (no Ray): for each kind of run, the exported plain
base + each exported adapter, loaded with transformers + PEFT, gives the run's own logits; and
bad runs are refused naming what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from models.files import atomic_write_json
from models.lora import adapter_params, inject, task_ids
from models.peft_io import save_adapter
from orchestrator.export import ExportError, export_run
from orchestrator.spec import JobSpec, parse_job

ROOT = Path(__file__).resolve().parents[3]


def _job(example: str, **changes) -> JobSpec:
    job = yaml.safe_load((ROOT / "examples" / example).read_text())
    for k in ("search", "recycle", "pesc"):
        job.pop(k, None)
    job.update(changes)
    return parse_job(job)


def _claim(run: Path, spec: JobSpec, tasks: list[str], results: dict | None = None, stages: dict | None = None) -> None:
    """What the pipeline leaves in a finished run directory (job.json, state.json, report.json)."""
    from orchestrator.pipeline import spec_fingerprint

    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / "job.json", {"name": spec.name, "fingerprint": spec_fingerprint(spec),
                                         "spec": spec.model_dump(mode="json")})
    atomic_write_json(run / "state.json", {"stages": stages or {"flock": "finished"}, "results": results or {}})
    atomic_write_json(run / "report.json", {"job": {"tasks": tasks}})


def _randomise(model, seed: int = 0, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_params(model):
            p.add_(scale * torch.randn(p.shape, generator=g))


def _served(out: Path, task: str) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    return PeftModel.from_pretrained(base, out / "adapters" / task).eval()


def _logits(model, ids: torch.Tensor, slot: int | None = None) -> torch.Tensor:
    with torch.no_grad():
        if slot is None:
            return model(input_ids=ids).logits
        with task_ids(model, slot):
            return model.eval()(input_ids=ids).logits


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4) -> None:
    err = float((got - want).norm() / want.norm())
    assert err < rel, err


IDS = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(7))


def _flock_run(run: Path, spec: JobSpec, tasks: list[str]):
    """A 'trained' flock on the job's base: random adapters written as the worker writes them."""
    from orchestrator.base.load import load_job_base

    model = load_job_base(spec, "cpu", "float32")
    n = spec.base.random_init["num_hidden_layers"]
    inject(model, spec.lora.target_modules, len(tasks), spec.lora.rank, spec.lora.alpha,
           layers=list(range(n - spec.lora.top_layers, n)))
    _randomise(model)
    for s, t in enumerate(tasks):
        save_adapter(model, s, run / "adapters" / t)
    return model


def test_plain_flock_export_gives_the_runs_logits_and_the_serve_line(tmp_path):
    spec, tasks = _job("tiny.yaml"), ["json", "http", "email"]
    run, out = tmp_path / "run", tmp_path / "exp"
    model = _flock_run(run, spec, tasks)
    _claim(run, spec, tasks)
    m = export_run(run, out, max_lora_rank=8)
    for s, t in enumerate(tasks):
        _close(_logits(_served(out, t), IDS), _logits(model, IDS, s))
        assert json.loads((out / "adapters" / t / "adapter_config.json").read_text())["r"] == 8
    serve = json.loads((out / "serve.json").read_text())
    assert serve == m and serve["kind"] == "plain" and [a["name"] for a in serve["adapters"]] == tasks
    assert m["vllm"].startswith(f"vllm serve {out / 'base'} --enable-lora --max-lora-rank 8")
    assert f"json={out / 'adapters' / 'json'}" in m["vllm"] and m["vllm"] in (out / "README.md").read_text()
    # truncation by SVD: rank 2 of a rank-4 adapter, its error reported and equal to the logit-free measure
    m2 = export_run(run, tmp_path / "exp2", tasks=["http"], rank=2)
    (a,) = m2["adapters"]
    assert a["rank"] == 2 and a["truncated_from"] == 4 and 0 < a["truncation_rel_error"] < 1


def test_quantised_flock_export_folds_the_lq_part_into_the_base(tmp_path):
    from models.quant.model import apply_lq_init
    from orchestrator.base.load import load_job_base
    from orchestrator.base.quant import LQ_FILE, QUANT_DIR, build_quant_base, write_quant_base

    spec, tasks = _job("tiny-bit-budget.yaml"), ["json", "http"]
    run = tmp_path / "run"
    model = load_job_base(spec, "cpu", "float32")
    quant, factors = build_quant_base(model, spec)
    inject(model, spec.lora.target_modules, 2, spec.lora.rank, spec.lora.alpha, layers=[1])
    apply_lq_init(model, factors)
    _randomise(model, scale=0.02)
    for s, t in enumerate(tasks):
        save_adapter(model, s, run / "adapters" / t)
    write_quant_base(model, quant, run / QUANT_DIR, factors)
    _claim(run, spec, tasks)
    m = export_run(run, tmp_path / "exp")
    assert m["kind"] == "quantised" and m["adapters"][0]["rank"] == 2 * spec.lora.rank  # r + lq_rank, exact
    for s, t in enumerate(tasks):
        _close(_logits(_served(tmp_path / "exp", t), IDS), _logits(model, IDS, s))
    # the base alone is Q + L1 L2^T: closer to the original weights than Q
    from transformers import AutoModelForCausalLM

    orig = load_job_base(spec, "cpu", "float32").model.layers[1].self_attn.q_proj.weight
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "exp" / "base").model.layers[1].self_attn.q_proj.weight
    q = model.model.layers[1].self_attn.q_proj.base_layer.dequantized_weight()
    assert (base - orig).norm() < (q - orig).norm()
    # a run from before the factors were stored: the LQ part stays in the adapters, still exact
    (run / QUANT_DIR / LQ_FILE).unlink()
    m = export_run(run, tmp_path / "exp-old")
    assert m["adapters"][0]["rank"] == spec.lora.rank and any("absent" in n for n in m["notes"])
    _close(_logits(_served(tmp_path / "exp-old", "http"), IDS), _logits(model, IDS, 1))


def test_pruned_export_pads_per_block_widths_to_one_with_zeros(tmp_path):
    from orchestrator.flock.gating import export_gated
    from tests.orchestrator.flock.test_gates_job import _random_gated_model

    spec = _job("tiny-gates.yaml")
    run = tmp_path / "run"
    model, _ = _random_gated_model(["v_proj", "down_proj"], 2, seed=1, closed=0.5, layers=[1])
    export_gated(model, run / "export", ["json", "http"], [0, 1], 0, "shared")
    _claim(run, spec, ["json", "http"])
    m = export_run(run, tmp_path / "exp")
    assert m["kind"] == "pruned" and any("zero-padded to 128" in n for n in m["notes"])
    cfg = json.loads((tmp_path / "exp" / "base" / "config.json").read_text())
    assert cfg["intermediate_size"] == 128
    for s, t in enumerate(["json", "http"]):
        _close(_logits(_served(tmp_path / "exp", t), IDS), _logits(model, IDS, s), rel=1e-5)


def test_pruned_export_pads_removed_heads_inside_their_kv_groups(tmp_path):
    """Block 1 lost two of the four query heads per KV head, block 0 none: the served base has 8 heads
    everywhere, block 1's kept heads sit first in each KV head's group (a tail pad would pair them with the
    wrong KV head), and its q_proj / o_proj adapters move with them."""
    from orchestrator.flock.gating import export_gated
    from tests.orchestrator.flock.test_gates_job import _random_gated_model

    spec = _job("tiny-gates.yaml")
    run = tmp_path / "run"
    model, _ = _random_gated_model(["q_proj", "o_proj", "down_proj"], 2, seed=2, closed=0.5, heads=True, layers=[1])
    export_gated(model, run / "export", ["json", "http"], [0, 1], 0, "shared")
    _claim(run, spec, ["json", "http"])
    m = export_run(run, tmp_path / "exp")
    assert any("query heads per block [8, 4]" in n for n in m["notes"])
    cfg = json.loads((tmp_path / "exp" / "base" / "config.json").read_text())
    assert cfg["num_attention_heads"] == 8 and cfg["head_dim"] == 8
    for s, t in enumerate(["json", "http"]):
        _close(_logits(_served(tmp_path / "exp", t), IDS), _logits(model, IDS, s), rel=1e-5)


def test_picked_trial_export_folds_gates_and_lq_part(tmp_path):
    from tests.orchestrator.search.test_pick import PICKED, _trained_trial

    run = tmp_path / "run"
    (run / "search" / "pick").mkdir(parents=True)
    spec, trial = _trained_trial(run / "search" / "pick")
    names = [t.name for t in spec.tasks]
    picked = {**PICKED, "checkpoint": "search/pick", "tasks": names, "sparsity": 0.3}
    _claim(run, spec, names, {"search": {"picked": picked}}, {"flock": "finished", "search": "finished"})
    m = export_run(run, tmp_path / "exp", what="pick")
    assert m["kind"] == "picked" and any("LQ" in n for n in m["notes"])
    for s, t in enumerate(names):
        _close(_logits(_served(tmp_path / "exp", t), IDS % 300), _logits(trial, IDS % 300, s))


def test_recycled_export_expands_coefficients_to_lora_factors(tmp_path):
    from models.eigen.subspace import build_subspace, load_peft_adapters
    from models.peft_io import load_adapter
    from orchestrator.base.load import load_job_base

    spec, tasks = _job("tiny.yaml"), ["json", "http", "email"]
    run = tmp_path / "run"
    _flock_run(run, spec, tasks)
    adapters, scales = load_peft_adapters({t: run / "adapters" / t for t in tasks})
    sub = build_subspace(adapters, k=1, scales=scales)
    sub.save(run / "recycle" / "subspace")
    rc = {"source": "flock", "adapters": tasks, "k": 1, "reconstruction_rel_error": 0.3}
    _claim(run, spec, tasks, {"recycle": rc},
           {"flock": "finished", "recycle": "finished"})
    m = export_run(run, tmp_path / "exp", what="recycle")
    assert m["kind"] == "recycled" and [a["name"] for a in m["adapters"]] == tasks
    for t in tasks:  # the project's own reading of a coefficient adapter: reconstructed into a LoRA slot
        sub.export_peft(t, tmp_path / "own" / t)
        own = load_job_base(spec, "cpu", "float32")
        inject(own, spec.lora.target_modules, 1, spec.lora.rank, spec.lora.alpha, layers=[1])
        load_adapter(own, 0, tmp_path / "own" / t)
        _close(_logits(_served(tmp_path / "exp", t), IDS), _logits(own, IDS, 0))


def test_unfinished_foreign_and_mismatched_runs_are_refused(tmp_path):
    spec, tasks = _job("tiny.yaml"), ["json", "http", "email"]
    run = tmp_path / "run"
    with pytest.raises(ExportError, match="no such run directory"):
        export_run(run, tmp_path / "exp")
    _flock_run(run, spec, tasks)
    with pytest.raises(ExportError, match="job.json is missing"):
        export_run(run, tmp_path / "exp")
    _claim(run, spec, tasks, stages={"flock": "running"})
    with pytest.raises(ExportError, match=r"unfinished: stage flock \(running\)"):
        export_run(run, tmp_path / "exp")
    _claim(run, spec, tasks)
    job = json.loads((run / "job.json").read_text())
    job["spec"]["lora"]["old_field"] = 1
    (run / "job.json").write_text(json.dumps(job))
    with pytest.raises(ExportError, match="(?s)another version of the job schema.*old_field"):
        export_run(run, tmp_path / "exp")
    _claim(run, spec, tasks)
    job["spec"]["lora"].pop("old_field")
    job["fingerprint"] = "0123"
    (run / "job.json").write_text(json.dumps(job))
    with pytest.raises(ExportError, match="another version of the job schema"):
        export_run(run, tmp_path / "exp")
    _claim(run, spec, tasks)
    (run / "adapters" / "http" / "adapter_config.json").unlink()
    with pytest.raises(Exception, match="adapter_config.json"):
        export_run(run, tmp_path / "exp")
    with pytest.raises(ExportError, match=r"--tasks: \['nope'\]"):
        export_run(run, tmp_path / "exp", tasks=["nope"])
    with pytest.raises(ExportError, match="no picked search trial"):
        export_run(run, tmp_path / "exp", what="pick")
    with pytest.raises(ExportError, match="max-lora-rank 2"):
        export_run(run, tmp_path / "exp", tasks=["json"], max_lora_rank=2)
    assert not (tmp_path / "exp").exists()  # nothing half-written
