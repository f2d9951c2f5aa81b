"""Whole-base quantised search trials (``search.quantize_layers: all``): each base setting's frozen
blocks are quantised once, trials train on that setting's prefix cache, and their size counts the
quantised matrices."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models.prefix import compute_prefix
from models.quant.model import quantize_model
from models.quant.quantizers import quantize
from models.train.step import evaluate
from orchestrator.base.load import load_job_base
from orchestrator.base.quant import QUANT_DIR
from orchestrator.search import frozen_base
from orchestrator.search.pack_settings import packable
from orchestrator.search.pick import load_picked_model
from orchestrator.search.trial import STATE_FILE, build_payload, build_trial_model, deployed_bytes, run_trial
from orchestrator.specs.search import SearchSpec
from tests.orchestrator.conftest import tiny_job_spec
from tune_spaces.loader import SpaceError, load_space, parse_space

NAMES = ["json", "http", "email"]


def _spec():
    return tiny_job_spec(num_layers=3, top_layers=1, steps=3)


def _data():
    g = torch.Generator().manual_seed(0)
    sizes = [3, 6, 9]
    train = [torch.randint(0, 300, (n, 16), generator=g).numpy() for n in sizes]
    evals = [torch.randint(0, 300, (2, 16), generator=g).numpy() for _ in sizes]
    return sizes, train, evals


def _reference_base(spec, bits: int):
    """The job's base with blocks 0-1 quantised plainly at ``bits`` and the embedding at 8 bits, by hand."""
    model = load_job_base(spec, "cpu", "float32")
    report = quantize_model(model, "all-linear", bits=bits, rank=0, layers=[0, 1], quantizer="nf", iters=1)
    emb = model.get_input_embeddings()
    packed = quantize(emb.weight.detach().float(), "nf", 8, 64)
    with torch.no_grad():
        emb.weight.copy_(packed.dequantize())
    return model, report.stored_bytes + packed.nbytes


@pytest.fixture(scope="module")
def built():
    """The payload with settings bits 4 (listed twice) and a 6-bit budget, and how often a setting was built."""
    calls = []
    real = frozen_base._quantize_frozen

    def counting(model, lower, setting, quantizer, top, calib):
        calls.append(dict(setting))
        return real(model, lower, setting, quantizer, top, calib)

    frozen_base._quantize_frozen = counting
    try:
        sizes, train, evals = _data()
        payload = build_payload(_spec().model_dump(mode="json"), NAMES, sizes, train, evals,
                                frozen_settings=[{"bits": 4}, {"bits": 4}, {"bit_budget": 6.0}])
    finally:
        frozen_base._quantize_frozen = real
    return payload, calls


def test_each_setting_is_built_once_with_its_own_prefix_cache(built):
    payload, calls = built
    assert calls == [{"bits": 4}, {"bit_budget": 6.0}]  # the duplicate setting is not built again
    assert set(payload["frozen"]) == {"bits4", "budget6"}
    spec = _spec()
    ref, stored = _reference_base(spec, 4)
    rec = payload["frozen"]["bits4"]
    for got, x in zip(rec["train_prefix"] + rec["eval_prefix"], payload["train"] + payload["eval"]):
        want = compute_prefix(ref, torch.as_tensor(x), 2).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    dense = payload["train_prefix"][0]
    assert not np.allclose(rec["train_prefix"][0], dense, atol=1e-4)  # a quantised base moves the activations
    assert sum(rec["bytes"].values()) == stored  # every frozen matrix's packed bytes, plus the embedding's
    budget = payload["frozen"]["budget6"]
    widths = {b for _, b in budget["allocation"].values()}
    assert widths <= {4, 8} and all(".layers.2." in n for n in budget["allocation"])  # the top block's widths


FIXED = {"steps": 3, "eval_every": 3, "eval_subset": 1, "quantizer": "nf", "lq_iters": 2, "gate_lambda": 0.0,
         "gate_lr": None, "threads": 1, "quantize_layers": "all"}  # a whole-base trial's search settings


def _train(payload: dict, config: dict) -> tuple[dict, dict]:
    """One whole-base trial of 3 steps on ``payload``: its final report's metrics and trained state."""
    reports = []
    run_trial({**config, "_search": FIXED}, payload, lambda m, s: reports.append((m, s)))
    [(metrics, state)] = reports
    return metrics, state


def test_a_whole_base_trial_trains_on_its_setting_and_counts_the_quantised_matrices(built):
    payload, _ = built
    spec = _spec()
    config = {"rank": 4, "bits": 4, "target_sparsity": 0.0, "tau": 100.0, "lr": 3e-3}
    metrics, state = _train(payload, config)
    # the same trained state on a base whose lower blocks are really quantised, without a prefix cache
    model, info = build_trial_model(spec, config, 3, "nf", 2)
    with torch.no_grad():
        quantize_model(model, "all-linear", bits=4, rank=0, layers=[0, 1], quantizer="nf", iters=1)
        frozen_base.load_embedding(model, payload["frozen"]["bits4"])
        params = dict(model.named_parameters())
        for k, v in state.items():
            params[k].copy_(v)
    evals = {i: torch.as_tensor(x) for i, x in enumerate(payload["eval"])}
    nll = evaluate(model, evals, 8)
    assert metrics["macro_ppl"] == pytest.approx(sum(math.exp(v) for v in nll.values()) / 3, rel=1e-4)
    emb = model.get_input_embeddings().weight
    want = deployed_bytes(model)["model_bytes"] - 2 * emb.numel() + quantize(emb.detach(), "nf", 8, 64).nbytes
    assert metrics["model_bytes"] == want
    dense = deployed_bytes(build_trial_model(spec, config, 3, "nf", 2)[0])["model_bytes"]
    assert metrics["model_bytes"] < 0.6 * dense  # 4-bit blocks and an 8-bit embedding (adapters stay 2 bytes)
    assert not packable({**config, "_search": FIXED}, 8)  # its own prefix cache: never on a shared pack host


def test_search_settings_validate():
    demo = load_space("demo")
    settings = frozen_base.space_settings(demo.dimensions)
    assert settings and all(frozen_base.frozen_key(s) for s in settings)
    SearchSpec(enabled=True, space="demo", quantize_layers="all")
    SearchSpec(enabled=True, space="demo", quantize_layers="all", pick={"max_bytes": 10**8})  # a picked whole base
    with pytest.raises(ValueError, match="search.metric 'exact_match' with search.quantize_layers: all"):
        SearchSpec(enabled=True, space="demo", quantize_layers="all", metric="exact_match")
    with pytest.raises(ValueError, match="bit_budget dimension.*set search.quantize_layers: all"):
        SearchSpec(enabled=True, space="demo")  # a whole-base budget would be ignored by top-block quantisation
    SearchSpec(enabled=True, space="default")  # bits: the top blocks' width, fine with `adapted`
    with pytest.raises(SpaceError, match="bit_budget"):
        parse_space({"dimensions": {"bit_budget": {"choice": [3.0]}}})
    with pytest.raises(SpaceError, match="bit_budget is discrete"):
        parse_space({"dimensions": {"bit_budget": {"uniform": [5.0, 7.0]}}})
    assert frozen_base.frozen_key({"bits": 16, "bit_budget": 16}) is None


def test_trial_gates_follow_the_gates_section():
    spec = _spec()
    _, info = build_trial_model(spec, {"rank": 4, "target_sparsity": 0.3}, 3)
    assert info["gated"] == ["model.layers.2.mlp.down_proj"]  # MLP channels only (the default)
    wide = spec.model_copy(update={"gates": spec.gates.model_copy(update={"target_modules": ["q_proj", "down_proj"],
                                                                           "sides": "both"})})
    model, info = build_trial_model(wide, {"rank": 4, "target_sparsity": 0.3}, 3)
    assert len(info["gated"]) == 2 and model.get_submodule(info["gated"][0]).theta_rows is not None


def test_a_picked_whole_base_trial_is_rebuilt_on_the_written_setting(built, tmp_path):
    """What the pick writes (the setting's packed frozen blocks and embedding, its widths) rebuilds
    the model the trial was judged on: a full forward, no prefix cache, gives the trial's NLL."""
    payload, _ = built
    spec = _spec()
    config = {"rank": 4, "bit_budget": 6.0, "target_sparsity": 0.0, "tau": 100.0, "lr": 3e-3}
    metrics, state = _train(payload, config)
    save_file(state, str(tmp_path / STATE_FILE))
    frozen_base.write_frozen_base(payload["frozen"]["budget6"]["store"], tmp_path / QUANT_DIR)
    picked = {**config, "trial_id": "t0", "bits": metrics["bits"], "quantizer": "nf", "lq_iters": 2, "tasks": NAMES,
              "quantize_layers": "all", "base_setting": "budget6", "quant_base": "search/pick/quant_base"}
    model = load_picked_model(spec, picked, tmp_path)
    evals = {i: torch.as_tensor(x) for i, x in enumerate(payload["eval"])}

    def macro(m):
        return sum(math.exp(v) for v in evaluate(m, evals, 8).values()) / 3

    assert macro(model) == pytest.approx(metrics["macro_ppl"], rel=1e-5)
    # the frozen blocks hold the search's codes: each matrix at its allocated width, not the float weight
    dense = load_job_base(spec, "cpu", "float32")
    section = json.loads((tmp_path / QUANT_DIR / "quant.json").read_text())
    lower = {r["name"] for r in section["matrices"]}
    assert lower | {section["embedding"]["name"]} == set(payload["frozen"]["budget6"]["bytes"])
    for row in section["matrices"]:
        assert ".layers.0." in row["name"] or ".layers.1." in row["name"]
        w = dense.get_submodule(row["name"]).weight.detach()
        got = model.get_submodule(row["name"]).dequantized_weight()
        assert torch.equal(got, quantize(w, row["quantizer"], row["bits"], 64).dequantize())
        assert not torch.allclose(got, w, atol=1e-4)
    emb = dense.get_input_embeddings().weight.detach()
    assert torch.equal(model.get_input_embeddings().weight, quantize(emb, "nf", 8, 64).dequantize())
    # the float frozen blocks (what a pick rebuilt before) give another model
    with torch.no_grad():
        for row in section["matrices"]:
            model.set_submodule(row["name"], dense.get_submodule(row["name"]))
    assert abs(macro(model) / metrics["macro_ppl"] - 1) > 1e-4
