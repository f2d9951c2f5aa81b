"""The gate schedule: warm-up, annealing, hardening, importance init (reference numbers)."""

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
    sparsity_report,
)
from models.gates.schedule import GateController, GateSchedule, harden, importance_scores, init_from_importance
from models.lora import adapter_params, inject
from models.train.step import Batch, train_step

TINY = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 32,
}


def test_penalty_warms_up_linearly_and_stops_once_hard() -> None:
    s = GateSchedule(steps=100, target=0.3, lam=50.0, warmup=0.2, sigma=0.1, sigma_final=0.0, harden_at=0.75)
    assert s.harden_step == 75
    assert s.lam_at(1) == pytest.approx(50.0 / 20) and s.lam_at(10) == pytest.approx(25.0)
    assert s.lam_at(20) == 50.0 and s.lam_at(75) == 50.0 and s.lam_at(76) == 0.0
    assert s.sigma_at(1) == pytest.approx(0.1) and s.sigma_at(38) == pytest.approx(0.05) and s.sigma_at(75) == 0.0
    assert GateSchedule(10, 0.3, warmup=0.0).lam_at(1) == 50.0  # no warm-up: full from step 1
    never = GateSchedule(10, 0.3, harden_at=1.0)
    assert never.harden_step is None and never.lam_at(10) == 50.0
    # auto step size: the target quantile (theta 0.6 + 7.4 * 0.3) reaches -0.55 by step 75, x2
    assert s.auto_gate_lr() == pytest.approx(2.0 * (0.6 + 7.4 * 0.3 + 0.55) / 75)
    with pytest.raises(GateConfigError, match="target_sparsity"):
        GateSchedule(10, 1.0)
    with pytest.raises(GateConfigError, match="allocation"):
        GateSchedule(10, 0.3, allocation="row")


def test_controller_applies_the_schedule_then_hardens_to_exactly_the_target() -> None:
    torch.manual_seed(0)
    model = load_base(random_init=TINY)
    inject(model, ["down_proj"], num_tasks=1, rank=2, alpha=4.0)
    inject_gates(model, ["down_proj"], gate_rows=False)
    with torch.no_grad():
        for p in gate_params(model):
            p.copy_(torch.randn(p.shape) * 0.5 + 0.3)
    sched = GateSchedule(steps=8, target=0.3, lam=10.0, warmup=0.5, sigma=0.2, harden_at=0.5)
    ctrl = GateController(model, sched)
    params = adapter_params(model) + gate_params(model)
    opt = torch.optim.Adam(params, lr=0.05)
    ids = torch.randint(0, 100, (2, 12))
    batch = Batch(ids, torch.zeros(2, dtype=torch.long), torch.full((2,), 0.5))
    for step in range(1, 9):
        ctrl.on_step(step)
        layer = next(iter(gate_layers(model).values()))
        assert layer.sigma == pytest.approx(sched.sigma_at(step))
        if step <= 4:
            keep = 0.7
            expect = sched.lam_at(step) * (float(open_probabilities(model).detach().mean()) - keep) ** 2
            assert float(ctrl.penalty()) == pytest.approx(expect, rel=1e-6) and not layer.is_hard
        else:
            assert layer.is_hard and float(ctrl.penalty()) == 0.0
        train_step(model, batch, opt, params, extra_loss=ctrl.penalty)
        if step > 5:  # hard gates: no gradient reaches theta, the mask stays
            assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in gate_params(model))
    # exactly round(0.3 * 40) = 12 channels closed in every layer, the rest fully open
    for layer in gate_layers(model).values():
        _, cols = layer.eval_gates()
        assert int((cols == 0).sum()) == 12 and int((cols == 1).sum()) == 28
    assert sparsity_report(model)["removed_fraction"] == pytest.approx(12 / 40)
    ctrl.finish()  # theta is pinned to the mask: a model rebuilt from theta alone has the same gates
    for layer in gate_layers(model).values():
        mask = layer.hard_cols.clone()
        layer.hard_cols = None
        assert torch.equal(layer.eval_gates()[1], mask)
        layer.hard_cols = mask
    # hard gates ignore the noise: training-mode forward is deterministic
    model.train()
    with torch.no_grad():
        from models.lora import task_ids

        with task_ids(model, 0):
            a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(a, b)


def test_harden_closes_the_lowest_thetas_per_layer_or_globally() -> None:
    l1, l2 = GatedLinear(nn.Linear(4, 3), 4, 3, gate_rows=False), GatedLinear(nn.Linear(4, 3), 4, 3, gate_rows=False)
    model = nn.ModuleDict({"a": l1, "b": l2})
    with torch.no_grad():
        l1.theta_cols.copy_(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
        l2.theta_cols.copy_(torch.tensor([[1.1, 1.2, 1.3, 1.4]]))
    harden(model, 0.5, "global")  # the 4 lowest of 8 all sit in layer a
    assert l1.eval_gates()[1].tolist() == [[0, 0, 0, 0]] and l2.eval_gates()[1].tolist() == [[1, 1, 1, 1]]
    for l in (l1, l2):
        l.hard_cols = None
    with torch.no_grad():
        l1.theta_cols.copy_(torch.tensor([[0.4, 0.1, 0.3, 0.2]]))
        l2.theta_cols.copy_(torch.tensor([[1.1, 1.4, 1.3, 1.2]]))
    harden(model, 0.5, "layer")
    assert l1.eval_gates()[1].tolist() == [[1, 0, 1, 0]] and l2.eval_gates()[1].tolist() == [[0, 1, 1, 0]]


def test_importance_is_activation_weighted_weight_norm_and_orders_the_init() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    layer = GatedLinear(lin, 6, 5)
    model = nn.Sequential(layer)
    x = torch.randn(3, 7, 6) * torch.tensor([0.1, 1, 2, 3, 4, 5])
    scores = importance_scores(model, lambda: model(x))
    rms_x = x.reshape(-1, 6).pow(2).mean(0).sqrt()
    assert torch.allclose(scores["0"]["cols"], rms_x * lin.weight.norm(dim=0), rtol=1e-5)
    rms_y = lin(x).detach().reshape(-1, 5).pow(2).mean(0).sqrt()
    assert torch.allclose(scores["0"]["rows"], rms_y, rtol=1e-5)
    init_from_importance(model, scores, 0.6, 8.0)
    th = layer.theta_cols[0].detach()
    assert th.min() == pytest.approx(0.6) and th.max() == pytest.approx(8.0)
    assert torch.equal(torch.argsort(th), torch.argsort(scores["0"]["cols"]))
    rows, cols = layer.eval_gates()  # init_low >= 0.55: the model starts exactly ungated
    assert (
        bool((rows == 1).all() and (cols == 1).all())
        and math.isclose(float(torch.tanh(torch.tensor(0.6))) + 0.5, 1.037, abs_tol=1e-3)
    )


def test_taylor_importance_is_the_first_order_loss_change_of_closing_a_gate() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(6, 5)
    model = nn.Sequential(GatedLinear(lin, 6, 5))
    x = torch.randn(3, 7, 6)
    target = torch.randn(3, 7, 5)
    scores = importance_scores(model, lambda: (model(x) - target).pow(2).sum(), kind="taylor")
    xr = x.clone().requires_grad_(True)
    y = lin(xr)
    y.retain_grad()
    (y - target).pow(2).sum().backward()
    expect_cols = (xr * xr.grad).sum(1).abs().mean(0)  # (in,): |d loss / d g_c| at g = 1, per sequence
    expect_rows = (y * y.grad).sum(1).abs().mean(0)
    assert torch.allclose(scores["0"]["cols"], expect_cols.detach(), rtol=1e-5)
    assert torch.allclose(scores["0"]["rows"], expect_rows.detach(), rtol=1e-5)
    assert all(p.grad is None for p in lin.parameters() if not p.requires_grad)
    with pytest.raises(GateConfigError, match="taylor importance needs"):
        importance_scores(model, lambda: (model(x), None)[1], kind="taylor")


def test_closed_count_aligns_the_kept_width():
    from models.gates.schedule import closed_count

    assert closed_count(1536, 0.3) == 461  # exact: width 1075
    assert closed_count(1536, 0.3, align=64) == 512  # width 1024, a multiple of 64
    assert closed_count(1536, 0.25, align=64) == 384  # 1152 is already aligned
    assert closed_count(40, 0.3, align=64) == 12  # no aligned width left: the exact count
    assert closed_count(100, 0.0, align=64) == 0


def test_harden_with_align_keeps_multiples():
    layer = torch.nn.Linear(96, 8)
    model = torch.nn.Sequential(layer)
    inject_gates(model, ["0"], gate_rows=False)
    with torch.no_grad():
        gate_layers(model)["0"].theta_cols.copy_(torch.linspace(-1, 1, 96))
    out = harden(model, 0.3, align=32)
    mask = gate_layers(model)["0"].hard_cols
    assert out["closed"] == 96 - 64 and int(mask.sum()) == 64
    assert bool((mask[..., :32] == 0).all())  # the lowest thetas are the ones closed
    with pytest.raises(GateConfigError, match="align"):
        GateSchedule(10, 0.3, align=0)

