"""PESC adapter-expert MoE against reference computations (per-token loops, the dense model)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from models.base import load_base
from models.lora import adapter_params, inject, lora_layers, task_ids
from models.moe import (
    MOE_CONFIG_NAME,
    AdapterExpertMoE,
    MoEConfigError,
    balance_loss,
    convert_to_moe,
    expert_load,
    load_moe,
    moe_layers,
    moe_params,
    reset_load,
    save_moe,
    task_expert_load,
)
from models.train.step import Batch, train_step
from tests.conftest import TINY_GPT2, TINY_LLAMA

MODELS = {"tiny_llama": TINY_LLAMA, "tiny_gpt2": TINY_GPT2}


def _randomise_experts(model, std=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe_params(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _reference(moe: AdapterExpertMoE, x: torch.Tensor) -> torch.Tensor:
    """Eq. of the module docstring, one token at a time (the test's loop, not the product's)."""
    h = moe.ffn(x).reshape(-1, moe.out_features)
    xs = x.reshape(-1, moe.in_features)
    out = []
    for t in range(len(xs)):
        logits = moe.expert_router.weight @ xs[t]
        val, idx = logits.topk(moe.top_k)
        g = val.softmax(-1)
        y = h[t].clone()
        for gi, i in zip(g, idx.tolist()):
            y = y + moe.scale * gi * (moe.up[i] @ F.gelu(moe.down[i] @ h[t]))
        out.append(y)
    return torch.stack(out).view(*x.shape[:-1], moe.out_features)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_output_at_init_equals_dense_model_exactly(name, dispatch):
    model = load_base(random_init=MODELS[name], seed=0)
    x = torch.randint(0, 300, (3, 10))
    with torch.no_grad():
        dense = model(input_ids=x).logits
    names = convert_to_moe(model, num_experts=8, top_k=2, bottleneck=16, dispatch=dispatch)
    assert len(names) == 2 and all(n.endswith(".mlp") for n in names)
    with torch.no_grad():
        moe = model(input_ids=x).logits
    assert torch.equal(dense, moe)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_batched_routing_equals_per_token_loop(name, dispatch):
    model = load_base(random_init=MODELS[name], seed=0)
    convert_to_moe(model, num_experts=6, top_k=2, bottleneck=8, scale=0.7, dispatch=dispatch)
    _randomise_experts(model)
    torch.manual_seed(0)
    for moe in moe_layers(model).values():
        x = torch.randn(3, 7, moe.in_features)
        with torch.no_grad():
            torch.testing.assert_close(moe(x), _reference(moe, x), atol=1e-5, rtol=1e-5)


def test_sparse_and_dense_dispatch_give_the_same_logits_and_gradients():
    x = torch.randint(0, 300, (2, 9))
    outs = []
    for dispatch in ("sparse", "dense"):
        model = load_base(random_init=TINY_LLAMA, seed=0)
        convert_to_moe(model, num_experts=4, top_k=2, bottleneck=8, dispatch=dispatch)
        _randomise_experts(model)
        logits = model(input_ids=x).logits
        (logits.square().mean() + balance_loss(model)).backward()
        outs.append((logits.detach(), [p.grad.clone() for p in moe_params(model)]))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_balance_loss_is_switch_formula_with_gradient_through_full_softmax():
    torch.manual_seed(0)
    moe = AdapterExpertMoE(torch.nn.Linear(12, 12), 12, 12, num_experts=5, top_k=2, bottleneck=4)
    x = torch.randn(4, 6, 12)
    moe(x)
    moe.last_aux.backward()
    grad = moe.expert_router.weight.grad.clone()
    assert grad.abs().sum() > 0
    # Reference: f from the top-k assignments (constant), P the mean full softmax.
    w = moe.expert_router.weight.detach().clone().requires_grad_(True)
    logits = x.reshape(-1, 12) @ w.T
    f = torch.bincount(logits.topk(2).indices.reshape(-1), minlength=5).float() / (24 * 2)
    ref = 5 * (f * logits.softmax(-1).mean(0)).sum()
    ref.backward()
    torch.testing.assert_close(moe.last_aux.detach(), ref.detach())
    torch.testing.assert_close(grad, w.grad)


def test_balance_loss_over_model_layers():
    model = load_base(random_init=TINY_GPT2, seed=0)
    convert_to_moe(model, num_experts=4, top_k=1, bottleneck=8)
    with pytest.raises(RuntimeError, match="forward"):
        balance_loss(model)
    model(input_ids=torch.randint(0, 300, (2, 8)))
    auxes = torch.stack([m.last_aux for m in moe_layers(model).values()])
    torch.testing.assert_close(balance_loss(model), auxes.mean())
    torch.testing.assert_close(balance_loss(model, "sum"), auxes.sum())
    assert bool((auxes >= 1 - 1e-5).all())  # E sum f P >= 1 for top-1 routing (Cauchy-Schwarz bound)


def _train_toy(aux_coef: float, steps: int = 150) -> tuple[float, float]:
    """A skewed router (inputs share a mean the router aligns with expert 0); busiest share."""
    torch.manual_seed(0)
    dim, E = 16, 4
    ffn = torch.nn.Linear(dim, dim).requires_grad_(False)
    moe = AdapterExpertMoE(ffn, dim, dim, num_experts=E, top_k=2, bottleneck=4)
    mu = torch.randn(dim)
    with torch.no_grad():
        moe.expert_router.weight[0] += 2.0 * mu / mu.norm()
        moe.expert_router.weight[1] += 1.0 * mu / mu.norm()
    target = torch.nn.Linear(dim, dim).requires_grad_(False)
    opt = torch.optim.Adam([moe.expert_router.weight, moe.down, moe.up], lr=1e-2)
    data = lambda n: mu + 0.5 * torch.randn(n, dim)  # noqa: E731
    with torch.no_grad():
        moe(data(512))
    before = max(_shares(moe.load))
    for _ in range(steps):
        x = data(64)
        loss = (moe(x) - target(x)).square().mean() + aux_coef * moe.last_aux
        opt.zero_grad()
        loss.backward()
        opt.step()
    moe.load.zero_()
    with torch.no_grad():
        moe(data(512))
    return before, max(_shares(moe.load))


def _shares(load: torch.Tensor) -> list[float]:
    return (load / load.sum()).tolist()


def test_aux_loss_flattens_expert_load():
    before, without = _train_toy(0.0)
    before2, with_aux = _train_toy(0.5)
    assert before == before2 and before > 0.45  # expert 0 takes (almost) every token's first slot
    assert with_aux < without - 0.1, (without, with_aux)
    assert with_aux < 0.25 + 0.08  # close to 1/E


def test_expert_load_sums_to_one_and_per_task_loads_match_separate_runs():
    model = load_base(random_init=TINY_LLAMA, seed=0)
    convert_to_moe(model, num_experts=4, top_k=2, bottleneck=8)
    x = torch.randint(0, 300, (5, 8))
    ids = torch.tensor([1, 0, 1, 2, 0])
    with torch.no_grad(), task_ids(model, ids):
        model(input_ids=x)
    load = expert_load(model)
    assert set(load) == set(moe_layers(model))
    for shares in load.values():
        assert len(shares) == 4 and abs(sum(shares) - 1) < 1e-9
    per_task = task_expert_load(model)
    assert sorted(per_task) == [0, 1, 2]
    for t in range(3):  # routing is per token: each task's rows alone route the same way
        reset_load(model)
        with torch.no_grad(), task_ids(model, t):
            model(input_ids=x[ids == t])
        for layer, shares in expert_load(model).items():
            assert shares == pytest.approx(per_task[t][layer], abs=1e-12)
            assert task_expert_load(model)[t][layer] == pytest.approx(shares, abs=1e-12)
    reset_load(model)
    assert all(sum(s) == 0 for s in expert_load(model).values()) and task_expert_load(model) == {}


def test_composes_with_lora_on_attention_through_train_step():
    model = load_base(random_init=TINY_LLAMA, seed=0)
    inject(model, ["q_proj", "v_proj"], num_tasks=2, rank=4, alpha=8.0)
    convert_to_moe(model, num_experts=4, top_k=2, bottleneck=8, layers=[1])
    assert list(moe_layers(model)) == ["model.layers.1.mlp"]
    lora, moe = adapter_params(model), moe_params(model)
    params = lora + moe
    assert all(p.requires_grad for p in params)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    before = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-2)
    x = torch.randint(0, 300, (4, 10))
    batch = Batch(x, torch.tensor([0, 1, 0, 1]), torch.full((4,), 0.25))
    for _ in range(3):
        res = train_step(model, batch, opt, params, extra_loss=lambda: 0.01 * balance_loss(model))
        assert res.loss > res.nll  # the balance term was added
    moved = [not torch.equal(a, p) for a, p in zip(before, params)]
    assert all(moved), moved  # every LoRA slot and every router/expert tensor trained
    # The composed model still routes LoRA per row: batched equals a per-row loop.
    model.eval()
    with torch.no_grad(), task_ids(model, batch.task_ids):
        batched = model(input_ids=x).logits
    for r in range(4):
        with torch.no_grad(), task_ids(model, int(batch.task_ids[r])):
            torch.testing.assert_close(batched[r : r + 1], model(input_ids=x[r : r + 1]).logits, atol=1e-5, rtol=1e-5)
    assert len(lora_layers(model)) == 4


@pytest.mark.parametrize("name", list(MODELS))
def test_save_load_roundtrip_gives_identical_logits(name, tmp_path):
    model = load_base(random_init=MODELS[name], seed=0)
    convert_to_moe(model, num_experts=4, top_k=2, bottleneck=8, scale=0.5, layers=[1], dispatch="dense")
    params = moe_params(model)
    opt = torch.optim.Adam(params, lr=1e-2)
    x = torch.randint(0, 300, (2, 12))
    for _ in range(3):
        train_step(model, Batch(x, torch.zeros(2, dtype=torch.long), torch.full((2,), 0.5)), opt, params,
                   extra_loss=lambda: 0.01 * balance_loss(model))
    assert all(m.up.abs().sum() > 0 for m in moe_layers(model).values())  # trained, non-zero
    model.eval()
    with torch.no_grad():
        want = model(input_ids=x).logits
    save_moe(model, tmp_path / "moe")
    cfg = json.loads((tmp_path / "moe" / MOE_CONFIG_NAME).read_text())
    assert cfg["layers"] == [1] and cfg["num_experts"] == 4 and cfg["dispatch"] == "dense"
    fresh = load_base(random_init=MODELS[name], seed=0)
    assert load_moe(fresh, tmp_path / "moe") == list(moe_layers(model))
    with torch.no_grad():
        got = fresh(input_ids=x).logits
    assert torch.equal(want, got)
    other = load_base(random_init=MODELS["tiny_gpt2" if name == "tiny_llama" else "tiny_llama"], seed=0)
    with pytest.raises(MoEConfigError, match="same base"):
        load_moe(other, tmp_path / "moe")
    cfg["weights_sha256"] = "0" * 64
    (tmp_path / "moe" / MOE_CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(MoEConfigError, match="does not match"):
        load_moe(load_base(random_init=MODELS[name], seed=0), tmp_path / "moe")


def test_bad_settings_raise_clear_errors(tmp_path):
    model = load_base(random_init=TINY_LLAMA, seed=0)
    with pytest.raises(MoEConfigError, match="top_k"):
        convert_to_moe(model, num_experts=2, top_k=3)
    with pytest.raises(MoEConfigError, match="pesc.layers"):
        convert_to_moe(model, layers=[5])
    with pytest.raises(MoEConfigError, match="dispatch"):
        convert_to_moe(model, dispatch="loop")
    with pytest.raises(MoEConfigError, match="no saved MoE"):
        load_moe(model, tmp_path)
    convert_to_moe(model, layers=[0])
    with pytest.raises(MoEConfigError, match="already converted"):
        convert_to_moe(model, layers=[0])
    model.model.layers[1].mlp = torch.nn.Linear(64, 64)  # an FFN of unknown shape
    with pytest.raises(MoEConfigError, match="gate_proj"):
        convert_to_moe(model, layers=[1])
