"""FineGates layers: reference formulas, task routing, determinism, penalty, report."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.base import load_base
from models.gates.layer import (
    GateConfigError,
    GatedLinear,
    gate_layers,
    gate_params,
    inject_gates,
    open_probabilities,
    sparsity_penalty,
    sparsity_report,
)
from models.lora import MultiTaskLoraLinear, TaskRouter, adapter_params, inject, task_ids
from models.train.step import Batch, train_step

TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 64,
}


def _ref_gate(theta: torch.Tensor, eps: torch.Tensor | float = 0.0) -> torch.Tensor:
    return torch.clamp(torch.tanh(theta) + eps + 0.5, 0.0, 1.0)


def _spread_thetas(layer: GatedLinear, seed: int = 0) -> None:
    """Thetas that give closed, partial and open gates."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.theta_rows, layer.theta_cols):
            if p is not None:
                p.copy_(torch.rand(p.shape, generator=g) * 3.0 - 1.5)


def _randomise_lora(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_params(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_non_square_linear_matches_reference_in_eval_and_training() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(12, 7)
    layer = GatedLinear(lin, 12, 7)
    _spread_thetas(layer)
    x = torch.randn(3, 5, 12)
    g_r, g_c = _ref_gate(layer.theta_rows[0]), _ref_gate(layer.theta_cols[0])
    expect = g_r * ((x * g_c) @ lin.weight.T + lin.bias)
    assert torch.allclose(layer.eval()(x), expect, atol=1e-6)
    assert (g_r == 0).any() and ((g_r > 0) & (g_r < 1)).any()  # the spread covers every regime
    # training: same noise drawn in the same order (columns, then rows)
    layer.train()
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    e_c = torch.randn(1, 12) * layer.sigma
    e_r = torch.randn(1, 7) * layer.sigma
    g_r, g_c = _ref_gate(layer.theta_rows, e_r)[0], _ref_gate(layer.theta_cols, e_c)[0]
    assert torch.allclose(y, g_r * ((x * g_c) @ lin.weight.T + lin.bias), atol=1e-6)


def test_non_square_lora_layer_matches_reference() -> None:
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    lora = MultiTaskLoraLinear(base, 2, 3, 6.0, 0.0, TaskRouter())
    _randomise_lora(lora)
    layer = GatedLinear(lora, 10, 6).eval()
    _spread_thetas(layer)
    x = torch.randn(4, 10)
    g_r, g_c = _ref_gate(layer.theta_rows[0]), _ref_gate(layer.theta_cols[0])
    for t in range(2):
        w = base.weight + lora.scaling[t] * lora.task_B(t) @ lora.task_A(t)  # W + s B_t A_t
        lora.router.single = t
        assert torch.allclose(layer(x), g_r * ((x * g_c) @ w.T + base.bias), atol=1e-5)


def test_task_scope_batched_rows_equal_single_task_loop() -> None:
    model = load_base(random_init=TINY_LLAMA)
    inject(model, ["q_proj", "up_proj", "down_proj"], num_tasks=3, rank=4, alpha=8.0)
    _randomise_lora(model)
    names = inject_gates(model, ["up_proj", "down_proj", "o_proj"], scope="task", num_tasks=3)
    assert len(names) == 6
    for i, layer in enumerate(gate_layers(model).values()):
        assert layer.theta_rows.shape[0] == 3
        _spread_thetas(layer, seed=i)
    ids = torch.randint(0, 300, (6, 9), generator=torch.Generator().manual_seed(0))
    tids = torch.tensor([2, 0, 1, 1, 2, 0])
    model.eval()
    with torch.no_grad(), task_ids(model, tids):
        batched = model(input_ids=ids).logits
        for r in range(len(ids)):
            with task_ids(model, int(tids[r])):
                single = model(input_ids=ids[r : r + 1]).logits
            assert torch.allclose(batched[r : r + 1], single, atol=1e-5)
        # tasks really differ: the same row under another task's gates changes
        with task_ids(model, 0):
            other = model(input_ids=ids[:1]).logits
    assert not torch.allclose(batched[:1], other, atol=1e-3)


def test_task_scope_layer_matches_per_row_reference() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(9, 5)
    router = TaskRouter()
    layer = GatedLinear(lin, 9, 5, num_tasks=3, scope="task", router=router).eval()
    _spread_thetas(layer)
    x = torch.randn(4, 2, 9)
    router.ids = torch.tensor([1, 0, 2, 1])
    y = layer(x)
    for r, t in enumerate(router.ids.tolist()):
        g_r, g_c = _ref_gate(layer.theta_rows[t]), _ref_gate(layer.theta_cols[t])
        assert torch.allclose(y[r], g_r * ((x[r] * g_c) @ lin.weight.T + lin.bias), atol=1e-6)


def test_eval_gates_are_deterministic_and_training_gates_are_noisy() -> None:
    torch.manual_seed(0)
    layer = GatedLinear(nn.Linear(8, 8), 8, 8)
    with torch.no_grad():
        layer.theta_rows.fill_(0.0)  # z = 0.5: inside the clamp, so noise shows
        layer.theta_cols.fill_(0.0)
    x = torch.randn(2, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


def test_penalty_has_gradient_and_reaches_target_on_toy_problem() -> None:
    torch.manual_seed(0)
    layer = GatedLinear(nn.Linear(32, 24), 32, 24)
    target = 0.4
    pen = sparsity_penalty(layer, target)
    pen.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate_params(layer))
    opt = torch.optim.Adam(gate_params(layer), lr=0.05)
    x = torch.randn(64, 32)
    y_true = layer.inner(x).detach()
    layer.train()
    for _ in range(300):
        opt.zero_grad()
        loss = (layer(x) - y_true).pow(2).mean() + sparsity_penalty(layer, target)
        loss.backward()
        opt.step()
    mean_p = float(open_probabilities(layer).mean().detach())
    assert abs(mean_p - (1 - target)) < 0.03, mean_p
    # and the formula itself: lam * (mean P - keep)^2 with P = Phi((tanh(theta) + 0.5) / sigma_reg)
    mu = torch.cat([layer.theta_rows.flatten(), layer.theta_cols.flatten()]).tanh().detach()
    p = torch.tensor([0.5 * (1 + math.erf(float(m + 0.5) / (0.5 * math.sqrt(2)))) for m in mu])
    assert torch.allclose(sparsity_penalty(layer, target, lam=7.0), 7.0 * (p.mean() - 0.6) ** 2, atol=1e-5)


def test_sparsity_report_counts_removed_weights() -> None:
    model = load_base(random_init=TINY_LLAMA)
    inject_gates(model, ["up_proj"], layers=[0])
    inject_gates(model, ["down_proj"], layers=[0], gate_rows=False)
    up, down = gate_layers(model).values()
    with torch.no_grad():
        up.theta_rows[0, :10] = -3.0  # 10 of 96 rows closed
        up.theta_cols[0, :4] = -3.0  # 4 of 64 cols closed
        down.theta_cols[0, :24] = -3.0  # 24 of 96 cols closed
    rep = sparsity_report(model)
    a = rep["layers"]["model.layers.0.mlp.up_proj"]
    assert (a["rows_kept"], a["cols_kept"]) == (86, 60)
    assert a["removed_fraction"] == pytest.approx(1 - 86 * 60 / (96 * 64))
    b = rep["layers"]["model.layers.0.mlp.down_proj"]
    assert (b["rows_kept"], b["cols_kept"]) == (64, 72)
    total = 96 * 64 * 2
    assert rep["removed_fraction"] == pytest.approx((96 * 64 - 86 * 60 + 64 * 24) / total)


def test_train_step_moves_gates_and_adapters_together() -> None:
    model = load_base(random_init=TINY_LLAMA)
    inject(model, ["up_proj"], num_tasks=2, rank=4, alpha=8.0)
    inject_gates(model, ["gate_proj", "up_proj", "down_proj"])
    with torch.no_grad():
        for p in gate_params(model):
            p.fill_(0.0)  # inside the clamp: the data gradient reaches the gates
    params = gate_params(model) + adapter_params(model)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-2)
    batch = Batch(torch.randint(0, 300, (4, 8)), torch.tensor([0, 1, 0, 1]), torch.full((4,), 0.25))
    res = train_step(model, batch, opt, params, extra_loss=lambda: sparsity_penalty(model, 0.3))
    assert math.isfinite(res.loss)
    assert all(not torch.equal(a, b) for a, b in zip(before[:3], params[:3]))
    frozen = model.get_submodule("model.layers.0.mlp.gate_proj.inner")
    assert not frozen.weight.requires_grad


def test_bad_settings_raise_clear_errors() -> None:
    model = load_base(random_init=TINY_LLAMA)
    with pytest.raises(GateConfigError, match="match no layer"):
        inject_gates(model, ["nope_proj"])
    with pytest.raises(GateConfigError, match="scope"):
        inject_gates(model, ["up_proj"], scope="layer")
    with pytest.raises(GateConfigError, match="target_sparsity"):
        inject_gates(model, ["up_proj"])
        sparsity_penalty(model, 1.5)
    inject(lora_model := load_base(random_init=TINY_LLAMA), ["up_proj"], num_tasks=3, rank=2, alpha=4.0)
    with pytest.raises(GateConfigError, match="num_tasks=3"):
        inject_gates(lora_model, ["up_proj"], scope="task", num_tasks=2)
