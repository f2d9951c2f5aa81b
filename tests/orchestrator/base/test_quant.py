"""Quantised bases in jobs (base.bits / base.bit_budget): spec and preflight errors that name
the setting, quantise-then-inject equals inject-then-quantise, and two end-to-end runs whose
delivered adapters reproduce the reported loss on the delivered packed base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from models.base import load_base
from models.lora import inject, task_ids
from models.quant.linear import QuantizedLinear
from models.quant.model import apply_lq_init, quantize_model
from orchestrator.base.quant import NOTE_FILE, build_quant_base, check_quant, load_quant_base
from orchestrator.errors import SpecError
from orchestrator.preflight import preflight
from orchestrator.spec import parse_job
from tests.conftest import TINY_LLAMA
from tests.orchestrator.test_pipeline import ROOT, TINY, _run

EXAMPLE = ROOT / "examples" / "tiny-bit-budget.yaml"


def _job(base: dict | None = None, **changes) -> dict:
    d = {
        "name": "q", "base": {"random_init": dict(TINY_LLAMA), "tokenizer": "bytes", **(base or {})},
        "tasks": [{"name": "json", "source": {"kind": "builtin", "package": "json"}},
                  {"name": "http", "source": {"kind": "builtin", "package": "http"}}],
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "top_layers": 1},
    }
    d.update(changes)
    return d


@pytest.mark.parametrize(
    "base, lora, needles",
    [
        ({"bits": 5}, None, ["base.bits: bits=5 is not supported", "use 2, 3, 4 or 8", "base.bit_budget"]),
        ({"bits": 4, "bit_budget": 3.5}, None, ["give base.bits (4) or base.bit_budget (3.5), not both"]),
        ({"bit_budget": 1.5}, None, ["bit_budget=1.5 is below the smallest encoding", "raise base.bit_budget to 2.25"]),
        ({"bit_budget": 0}, None, ["base.bit_budget: bit_budget=0 must be"]),
        ({"quant": {"quantizer": "vq"}}, None, ["base.quant has no effect without base.bits"]),
        ({"bits": 4, "quant": {"block_size": 63}}, None, ["block_size must be even"]),
        (
            {"bits": 4},
            {"rank": 4, "ranks": {"json": 8}, "target_modules": ["q_proj"]},
            ["base.quant.lq_rank 4 needs one LoRA rank", "lq_rank: 0"],
        ),
        ({"bits": 4, "quant": {"lq_rank": 8}}, None, ["base.quant.lq_rank 8 exceeds lora.rank 4"]),
    ],
)
def test_spec_errors_name_the_setting_and_the_fix(base, lora, needles):
    d = _job(base)
    if lora:
        d["lora"] = lora
    with pytest.raises(SpecError) as e:
        parse_job(d, "job.yaml")
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_unquantised_settings_and_mixed_ranks_with_plain_quantisation_are_accepted():
    assert not parse_job(_job({"bits": 16})).base.quantized
    assert not parse_job(_job()).base.quantized
    spec = parse_job(
        _job({"bits": 3, "quant": {"lq_rank": 0}}, lora={"rank": 4, "ranks": {"json": 8}, "target_modules": ["q_proj"]})
    )
    assert spec.base.quantized and spec.lq_rank() == 0


def test_preflight_budget_floor_is_exact_for_the_model():
    """The smallest budget preflight names (from meta shapes) is the real packed size: it just fits."""
    with pytest.raises(SpecError) as e:
        preflight(parse_job(_job({"bit_budget": 2.26})))
    msg = str(e.value)
    assert "base.bit_budget = 2.26 is below the smallest encoding of the 7 quantised matrices" in msg
    need = float(msg.split("raise base.bit_budget to at least ")[1].split()[0])
    spec = parse_job(_job({"bit_budget": need}))
    preflight(spec)  # accepted
    section, _ = build_quant_base(load_base(random_init=TINY_LLAMA, seed=0), spec)
    assert section["widths"] == {"nf2": 7} and section["within_budget"]
    assert section["stored_bytes"] <= section["budget_bytes"] < section["stored_bytes"] + 8


def test_a_model_with_no_quantisable_layers_is_refused():
    spec = parse_job(_job({"bits": 4, "quant": {"layers": "all"}}))
    with pytest.raises(SpecError, match=r"base.bits \(4\): this model has no quantisable layers"):
        check_quant(spec, nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)))


def test_quantise_then_inject_equals_inject_then_quantise():
    """The shared-store order (quantise once, workers inject + LQ init) gives the same model."""
    spec = parse_job(_job({"bits": 3}))
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    a = load_base(random_init=TINY_LLAMA, seed=0)
    section, factors = build_quant_base(a, spec)
    torch.manual_seed(1)
    inject(a, ["q_proj", "v_proj"], num_tasks=2, rank=4, alpha=8, layers=[1])
    apply_lq_init(a, factors)
    b = load_base(random_init=TINY_LLAMA, seed=0)
    torch.manual_seed(1)
    inject(b, ["q_proj", "v_proj"], num_tasks=2, rank=4, alpha=8, layers=[1])
    rep = quantize_model(b, "all-linear", bits=3, layers=[1], iters=2)
    assert sorted(factors) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]  # LoRA'd only
    assert (
        section["stored_bytes"] == rep.stored_bytes
        and section["recon_rel_error"] == pytest.approx(rep.recon_rel_error)
    )
    with torch.no_grad(), task_ids(a, 1), task_ids(b, 1):
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    # the LQ part helps: Q + L1 L2^T is closer to W than Q alone
    assert section["recon_rel_error"] < section["recon_rel_error_q_only"]
    assert sum(isinstance(m, QuantizedLinear) for m in a.modules()) == 7


def test_quantised_layers_keep_fp16_scales_under_a_dtype_cast():
    spec = parse_job(_job({"bits": 4}))
    model = load_base(random_init=TINY_LLAMA, seed=0)
    build_quant_base(model, spec)
    model.to(torch.bfloat16)
    q = next(m for m in model.modules() if isinstance(m, QuantizedLinear))
    assert q.scales.dtype == torch.float16 and q.codes.dtype == torch.uint8


# ------------------------------------------------------------------ end to end (real local Ray)
def _eval_loss_on_delivered_base(out: Path, spec, task: str) -> float:
    """Fresh unquantised base + the run's quant_base/ + the run's adapter: the eval NLL of ``task``."""
    from models.peft_io import load_adapter
    from models.train.step import evaluate
    from tasks import build_task_data
    from tasks.tokenizer import load_tokenizer

    data = {
        d.name: d for d in build_task_data(spec.tasks, load_tokenizer("bytes"), spec.train.seq_len, spec.train.seed)
    }
    model = load_base(random_init=spec.base.random_init, seed=spec.train.seed)
    load_quant_base(model, out / "quant_base")
    n = spec.base.random_init["num_hidden_layers"]
    inject(model, spec.lora.target_modules, num_tasks=1, rank=spec.lora.rank, alpha=spec.lora.alpha,
           layers=list(range(n - spec.lora.top_layers, n)))
    load_adapter(model, 0, out / "adapters" / task)
    return evaluate(model, {0: data[task].eval_ids}, batch_size=8)[0]


def _check_outputs(out: Path, spec, matrices: int = 7) -> dict:
    rep = json.loads((out / "report.json").read_text())
    q = rep["base"]["quant"]
    assert q["matrices_count"] == matrices and len(q["matrices"]) == matrices
    assert q["stored_bytes"] == sum(r["bytes"] for r in q["matrices"]) and q["bf16_bytes"] == 2 * q["numel"]
    assert 0 < q["recon_rel_error"] < q["recon_rel_error_q_only"] < 1
    for t in ("json", "http"):
        note = json.loads((out / "adapters" / t / NOTE_FILE).read_text())
        assert note["trained_on_quantized_base"] and "quant_base" in note["note"]
        assert (out / "adapters" / t / "adapter_model.safetensors").is_file()
    assert (out / "quant_base" / "quantized_base.safetensors").is_file()
    assert "## Quantised base" in (out / "report.md").read_text()
    fl = rep["flock"]
    assert fl["macro_ppl"] < fl["base_macro_ppl"]  # the adapters learned on top of the quantised base
    # the delivered adapter on the delivered packed base reproduces the reported loss
    assert _eval_loss_on_delivered_base(out, spec, "http") == pytest.approx(fl["tasks"]["http"]["eval_loss"], rel=1e-4)
    return rep


@pytest.mark.integration
def test_bit_budget_example_runs_end_to_end(tmp_path):
    """examples/tiny-bit-budget.yaml: shared store (default), a mixed allocation within budget."""
    from orchestrator.spec import load_job

    out = tmp_path / "out"
    r = _run(["run", str(EXAMPLE), "--out", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = _check_outputs(out, load_job(EXAMPLE))
    q = rep["base"]["quant"]
    assert q["mode"] == "bit_budget" and q["within_budget"] and q["stored_bytes"] <= q["budget_bytes"]
    assert len(q["widths"]) > 1  # 3.5 bits on average: a mix of widths
    assert q["uniform_alternative"]["total_error"] > q["allocator_total_error"]
    assert "base quantised to 3.4" in r.stdout + r.stderr
    from tests.orchestrator.export.served import check_flock_export

    m = check_flock_export(out, tmp_path / "exp", load_job(EXAMPLE))  # dequantised base, LQ part folded in
    assert m["kind"] == "quantised" and any("folded into the base" in n for n in m["notes"])


@pytest.mark.integration
def test_bits_4_job_without_shared_store_runs_end_to_end(tmp_path):
    """base.bits: 4 on every block with ray.share_base: false (each worker quantises): one width, the
    baseline and PESC on the same base, and the frozen-prefix cache computed through the quantised lower block (the
    delivered base + adapter, run without any cache, reproduce the reported loss)."""
    d = yaml.safe_load(TINY.read_text())
    for stage in ("recycle", "search"):  # PESC stays: it runs on the same quantised base
        d[stage]["enabled"] = False
    d["tasks"] = d["tasks"][:2]
    d["base"]["bits"] = 4
    d["base"]["quant"] = {"layers": "all"}
    d["train"]["steps"] = 6
    d["flock"]["baselines"] = ["unified"]
    d["ray"] = {"share_base": False}
    p = tmp_path / "bits4.yaml"
    p.write_text(yaml.safe_dump(d))
    out = tmp_path / "out"
    r = _run(["run", str(p), "--out", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from orchestrator.spec import load_job

    rep = _check_outputs(out, load_job(p), matrices=14)
    q = rep["base"]["quant"]
    assert (
        q["mode"] == "bits"
        and q["widths"] == {"nf4": 14}
        and q["layers"] == "all"
        and 4.25 < q["bits_per_weight"] < 4.5
    )
    assert "unified" in rep["flock"]["baselines"]
    assert rep["pesc"]["macro_ppl"] > 0 and (out / "pesc" / "attention_lora" / NOTE_FILE).is_file()


def test_recycle_new_task_on_a_quantised_base_is_refused_with_the_fix():
    d = _job(
        {"bits": 4},
        recycle={"enabled": True, "new_task": {"name": "logging", "source": {"kind": "builtin", "package": "logging"}}},
    )
    with pytest.raises(SpecError, match="drop recycle.new_task"):
        parse_job(d)
    d["recycle"].pop("new_task")
    assert parse_job(d).recycle.enabled  # the subspace alone is fine


def test_specs_survive_the_model_dump_round_trip_to_the_workers():
    """Workers re-validate ``spec.model_dump()``: defaults written out must not read as user settings."""
    for d in (_job(), _job({"bits": 4}), _job({"bit_budget": 3.5, "quant": {"quantizer": "vq", "lq_rank": 2}})):
        spec = parse_job(d)
        assert parse_job(spec.model_dump(mode="json")) == spec


def test_validate_cli_reports_the_quantised_base_and_refuses_a_too_small_budget(tmp_path, capsys):
    from orchestrator.cli import main

    assert main(["validate", str(EXAMPLE)]) == 0
    assert "quantised base: bit_budget 3.5 (nf, LQ rank 4) over 7 matrices" in capsys.readouterr().out
    d = yaml.safe_load(EXAMPLE.read_text())
    d["base"]["bit_budget"] = 2.26
    p = tmp_path / "low.yaml"
    p.write_text(yaml.safe_dump(d))
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err
    assert "loraflock: error: base.bit_budget = 2.26 is below the smallest encoding" in err and "Traceback" not in err
