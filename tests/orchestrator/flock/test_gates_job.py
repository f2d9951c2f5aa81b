"""The job's `gates:` section, a gated flock end to end, and its export (pruned model + PEFT)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from orchestrator.errors import SpecError
from orchestrator.spec import GatesSpec, parse_job
from tests.orchestrator.conftest import run_job_cli

ROOT = Path(__file__).resolve().parents[3]
JOB = ROOT / "examples" / "tiny-gates.yaml"


def _job(**gates) -> dict:
    d = yaml.safe_load(JOB.read_text())
    d["gates"] = {"enabled": True, **gates}
    return d


def test_gates_section_reads_lambda_and_round_trips_through_model_dump() -> None:
    spec = parse_job(_job(target_sparsity=0.4, **{"lambda": 20}))
    assert spec.gates.lam == 20 and spec.gates.target_sparsity == 0.4 and spec.gates.scope == "shared"
    again = parse_job(spec.model_dump(mode="json"))  # the hand-off to Ray re-validates
    assert again.gates == spec.gates
    assert "lambda" in spec.model_dump(mode="json", by_alias=True)["gates"]
    assert GatesSpec().enabled is False  # off unless asked


@pytest.mark.parametrize(
    "gates, needle",
    [
        ({"target_sparsity": 0.0}, "gates.target_sparsity must be > 0"),
        ({"target_sparsity": 1.0}, "gates.target_sparsity"),
        ({"scope": "row"}, "gates.scope"),
        ({"sigma": 0.1, "sigma_final": 0.2}, "noise anneals down"),
        ({"warmup": 0.6, "harden_at": 0.5}, "must come after the warm-up"),
        ({"lambda": -1}, "gates.lambda"),
        ({"gate_lr": 0}, "gates.gate_lr"),
        ({"sparsity": 0.3}, "gates.sparsity: unknown field"),
        ({"heads": True, "target_modules": ["down_proj", "o_proj"]}, "take o_proj out of gates.target_modules"),
    ],
)
def test_gates_errors_name_the_field(gates, needle) -> None:
    with pytest.raises(SpecError) as e:
        parse_job(_job(**gates), "job.yaml")
    assert needle in str(e.value)


def test_gates_need_the_flock_and_gateable_targets() -> None:
    d = _job()
    d["flock"]["enabled"] = False
    with pytest.raises(SpecError, match="gates train in the flock stage"):
        parse_job(d)
    d = _job()
    d["base"]["bits"] = 4
    with pytest.raises(SpecError, match="gates on a quantised base"):
        parse_job(d)
    from orchestrator.preflight import preflight

    with pytest.raises(SpecError, match="gates: gate target_modules \\['nope'\\] match no layer"):
        preflight(parse_job(_job(target_modules=["nope"])))
    d = _job(heads=True, target_modules=["mlp.c_proj"])  # GPT-2's fused c_attn has no query heads to remove
    d["base"]["random_init"] = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 257,
                                "n_positions": 256}
    d["lora"]["target_modules"] = ["c_attn", "c_fc"]
    with pytest.raises(SpecError, match="gates: gates.heads: no attention block .* turn gates.heads off"):
        preflight(parse_job(d))


def _nll(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


@pytest.mark.integration
def test_gated_flock_job_reports_sparsity_and_exports_a_model_that_reproduces_it(tmp_path) -> None:
    from peft import PeftModel

    from models.gates.export import load_pruned
    from orchestrator.spec import load_job
    from tasks import build_task_data
    from tasks.tokenizer import load_tokenizer

    out = tmp_path / "out"
    rep = run_job_cli(JOB, out)
    g = rep["flock"]["gates"]
    # 25% of 128 MLP channels = 32 closed in each of the 2 blocks, and 2 of 8 query heads (1 per KV
    # head: 16 of o_proj's 64 inputs), for every method (same gating)
    assert g["removed_fraction"] == pytest.approx(0.25) and set(g["methods"]) == {"hierarchical", "unified"}
    assert all(v == pytest.approx(0.25) for v in g["methods"].values()) and set(g["tasks"]) == {"json", "http"}
    assert {n: row["cols_kept"] for n, row in g["layers"].items()} == {
        **{f"model.layers.{b}.mlp.down_proj": 96 for b in (0, 1)},
        **{f"model.layers.{b}.self_attn.o_proj": 48 for b in (0, 1)},
    }
    assert rep["pesc"]["macro_ppl"] > 1  # PESC ran after the gated flock, on the ungated model
    md = (out / "report.md").read_text()
    assert "### FineGates" in md and "| model.layers.1.mlp.down_proj | 64 | 96 | 25.0% |" in md
    assert "| model.layers.1.self_attn.o_proj | 64 | 48 | 25.0% |" in md and "Query heads are gated" in md
    # the export: a plain LlamaForCausalLM at intermediate 96 (+ PEFT adapters) gives the reported eval loss
    cfg = json.loads((out / "export" / "model" / "config.json").read_text())
    # 6 heads do not divide the hidden size 64, which LlamaConfig refuses: the config keeps 8 and
    # load_pruned rebuilds the 6-head blocks from pruned_shapes.json
    assert cfg["intermediate_size"] == 96 and cfg["num_attention_heads"] == 8
    spec = load_job(JOB)
    data = {
        d.name: d for d in build_task_data(spec.tasks, load_tokenizer("bytes"), spec.train.seq_len, spec.train.seed)
    }
    for task in ("json", "http"):
        model = PeftModel.from_pretrained(
            load_pruned(out / "export" / "model"), out / "export" / "adapters" / task
        ).eval()
        assert _nll(model, data[task].eval_ids) == pytest.approx(rep["flock"]["tasks"][task]["eval_loss"], rel=1e-4)
    from tests.orchestrator.export.served import check_flock_export

    m = check_flock_export(out, tmp_path / "exp", spec)  # loraflock export: one width (96), plain from_pretrained
    config = json.loads((tmp_path / "exp" / "base" / "config.json").read_text())
    assert m["kind"] == "pruned" and config["intermediate_size"] == 96 and config["num_attention_heads"] == 8
    assert any("query heads per block [6, 6], zero-padded to 8" in n for n in m["notes"])


def _random_gated_model(
    lora_targets: list[str], lora_tasks: int, seed: int, closed: float, heads: bool = False, **gate_kwargs
) -> tuple[torch.nn.Module, torch.Generator]:
    """The tiny job's base with rank-4 LoRA, ``down_proj`` column gates (and head gates), random
    adapters and gates, hardened to ``closed``; the generator is returned to draw the test's inputs from."""
    from models.base import load_base
    from models.gates.heads import inject_head_gates
    from models.gates.layer import gate_params, inject_gates
    from models.gates.schedule import harden
    from models.lora import adapter_params, inject

    spec = parse_job(yaml.safe_load(JOB.read_text()))
    model = load_base(random_init=spec.base.random_init, seed=0)
    inject(model, lora_targets, num_tasks=lora_tasks, rank=4, alpha=8.0)
    inject_gates(model, ["down_proj"], gate_rows=False, **gate_kwargs)
    if heads:
        inject_head_gates(model, **gate_kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_params(model) + gate_params(model):
            p.copy_(torch.randn(p.shape, generator=g))
    harden(model, closed)
    return model, g


def test_task_scope_export_gives_each_task_its_own_pruned_model(tmp_path) -> None:
    """export_gated with per-task gates: task t's pruned model + adapter = the gated model's eval logits for t."""
    from peft import PeftModel

    from models.gates.export import load_pruned
    from models.lora import task_ids
    from orchestrator.flock.worker import export_gated

    model, g = _random_gated_model(["q_proj", "down_proj"], 2, seed=0, closed=0.25, scope="task", num_tasks=2)
    ids = torch.randint(0, 257, (2, 16), generator=g)
    export_gated(model, tmp_path, ["a", "b"], [0, 1], 0, "task")
    closed = []
    for slot, name in enumerate("ab"):
        with torch.no_grad(), task_ids(model, slot):
            ref = model.eval()(input_ids=ids).logits
        pruned = PeftModel.from_pretrained(load_pruned(tmp_path / name / "model"), tmp_path / name / "adapter").eval()
        with torch.no_grad():
            assert torch.allclose(pruned(input_ids=ids).logits, ref, atol=1e-5)
        closed.append(torch.nonzero(model.model.layers[0].mlp.down_proj.hard_cols[slot] == 0).flatten().tolist())
    assert closed[0] != closed[1]  # the two tasks really pruned different channels


def test_export_of_top_blocks_only_keeps_per_block_widths(tmp_path) -> None:
    """Gates on the top block only: widths differ per block; load_pruned rebuilds them exactly."""
    from peft import PeftModel

    from models.gates.export import load_pruned
    from models.lora import task_ids
    from orchestrator.flock.worker import export_gated

    model, g = _random_gated_model(["v_proj", "down_proj"], 1, seed=1, closed=0.5, layers=[1])
    ids = torch.randint(0, 257, (2, 16), generator=g)
    with torch.no_grad(), task_ids(model, 0):
        ref = model.eval()(input_ids=ids).logits
    export_gated(model, tmp_path, ["a"], [0], 0, "shared")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["intermediate_size"] == 128
    plain = load_pruned(tmp_path / "model")
    assert (
        plain.model.layers[0].mlp.down_proj.in_features == 128 and plain.model.layers[1].mlp.down_proj.in_features == 64
    )
    with torch.no_grad():
        out = PeftModel.from_pretrained(plain, tmp_path / "adapters" / "a").eval()(input_ids=ids).logits
    assert torch.allclose(out, ref, atol=1e-5)
