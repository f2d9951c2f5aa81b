"""The hierarchical prior against hand-written references (tiny random llama, CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from models.base import load_base
from models.lora import adapter_params, inject, lora_layers, set_trainable
from models.prior import HierarchicalPrior, PriorSettingError, tau_scale_note
from models.train.step import Batch, train_step

TINY = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 64,
}  # fmt: skip
RANKS = [2, 4, 3, 4, 1]  # per-task ranks: the masking of unused components is exercised
SIZES = [8, 16, 32, 64, 128]


def tiny_model(ranks=RANKS, seed: int = 0):
    model = load_base(random_init=TINY, seed=seed)
    inject(model, ["q_proj", "v_proj"], num_tasks=len(ranks), rank=ranks, alpha=8.0)
    return model


def fill_deltas(model, seed: int = 1, std: float = 0.05) -> None:
    """Random deltas everywhere, including the masked (inactive) components."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * std)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)
            layer.lora_B_shared.copy_(torch.randn(layer.lora_B_shared.shape, generator=g) * std)


def reference_penalty(model, tau: dict[str, float], tasks, sizes) -> torch.Tensor:
    """Loop over layers and tasks, squared norms of each task's trimmed delta."""
    total = torch.zeros((), dtype=torch.float64)
    for name, layer in lora_layers(model).items():
        t_g = tau[name.rsplit(".", 1)[-1]] if len(tau) > 1 else next(iter(tau.values()))
        for t in tasks:
            r = layer.ranks[t]
            dA = layer.lora_A[t][:r].double()
            dB = layer.lora_B[t][:, :r].double()
            total = total + t_g / 2 * (dA.pow(2).sum() + dB.pow(2).sum())
    return total / sum(sizes)


@pytest.fixture
def model():
    m = tiny_model()
    fill_deltas(m)
    return m


def test_penalty_matches_loop_and_vanishes_at_tau_zero(model):
    tau = {"q_proj": 50.0, "v_proj": 400.0}
    prior = HierarchicalPrior(model, SIZES, groups="module", tau=tau)
    ref = reference_penalty(model, tau, range(len(SIZES)), SIZES)
    assert ref > 0
    torch.testing.assert_close(prior.penalty().double(), ref, rtol=1e-5, atol=0)
    glob = HierarchicalPrior(model, SIZES, groups="global", tau=30.0)
    torch.testing.assert_close(
        glob.penalty().double(), reference_penalty(model, {"g": 30.0}, range(5), SIZES), rtol=1e-5, atol=0
    )
    assert float(HierarchicalPrior(model, SIZES, tau=0.0).penalty()) == 0.0


def test_penalty_gradient_is_tau_over_n_times_delta(model):
    tau = {"q_proj": 50.0, "v_proj": 400.0}
    prior = HierarchicalPrior(model, SIZES, tau=tau)
    prior.penalty().backward()
    for name, layer in lora_layers(model).items():
        c = tau[name.rsplit(".", 1)[-1]] / sum(SIZES)
        mask = layer.rank_mask  # inactive components get no gradient
        torch.testing.assert_close(layer.lora_A.grad, c * layer.lora_A.detach() * mask[:, :, None])
        torch.testing.assert_close(layer.lora_B.grad, c * layer.lora_B.detach() * mask[:, None, :])
        assert layer.lora_A_shared.grad is None and layer.lora_B_shared.grad is None  # Theta: no prior gradient


def test_owned_tasks_split_sums_to_whole(model):
    whole = HierarchicalPrior(model, SIZES, tau=100.0)
    w0 = HierarchicalPrior(model, SIZES, tau=100.0, owned_tasks=[0, 3])
    w1 = HierarchicalPrior(model, SIZES, tau=100.0, owned_tasks=[4, 1, 2])
    torch.testing.assert_close(w0.penalty() + w1.penalty(), whole.penalty())
    torch.testing.assert_close(
        w0.penalty().double(), reference_penalty(model, {"g": 100.0}, [0, 3], SIZES), rtol=1e-5, atol=0
    )
    s0, s1, sw = w0.sufficient_stats(), w1.sufficient_stats(), whole.sufficient_stats()
    for g in sw:
        assert math.isclose(s0[g][0] + s1[g][0], sw[g][0], rel_tol=1e-5)
        assert s0[g][1] + s1[g][1] == sw[g][1]
    # counts are the active parameters: sum_t r_t (in + out) per layer, 2 layers
    assert sw["q_proj"][1] == 2 * sum(RANKS) * (64 + 64)
    assert sw["v_proj"][1] == 2 * sum(RANKS) * (64 + 32)
    # the all-reduce path: packed tensors summed == whole
    packed = w0.stats_tensor() + w1.stats_tensor()
    assert whole.stats_from_tensor(packed).keys() == sw.keys()


def test_group_settings_errors(model):
    with pytest.raises(PriorSettingError, match="missing_group"):
        HierarchicalPrior(model, SIZES, groups={"attn": ["q_proj", "v_proj"], "missing_group": ["o_proj"]}, tau=1.0)
    with pytest.raises(PriorSettingError, match="no prior group"):
        HierarchicalPrior(model, SIZES, groups={"attn": ["q_proj"]}, tau=1.0)
    with pytest.raises(PriorSettingError, match="task_sizes"):
        HierarchicalPrior(model, SIZES[:2], tau=1.0)
    with pytest.raises(PriorSettingError, match="prior.tau"):
        HierarchicalPrior(model, SIZES, mode="fixed", tau=None)
    with pytest.raises(PriorSettingError, match="owned_tasks"):
        HierarchicalPrior(model, SIZES, tau=1.0, owned_tasks=[7])
    p = HierarchicalPrior(model, SIZES, groups={"low": ["*layers.0.*"], "high": ["*layers.1.*"]}, tau=1.0)
    assert [len(v) for v in p.groups.values()] == [2, 2]


def test_tau_inf_is_the_unified_limit(model):
    prior = HierarchicalPrior(model, SIZES, tau=math.inf)
    with pytest.raises(PriorSettingError, match="set_trainable"):
        prior.penalty()
    set_trainable(model, shared=True, task=False)
    assert prior.penalty().item() == 0.0


def test_log_prob_consistent_with_penalty(model):
    tau = {"q_proj": 50.0, "v_proj": 400.0}
    prior = HierarchicalPrior(model, SIZES, tau=tau, a=2.0, b=0.05)
    stats = prior.sufficient_stats()
    const = sum(
        stats[g][1] / 2 * (math.log(tau[g]) - math.log(2 * math.pi))
        + float(torch.distributions.Gamma(2.0, 0.05).log_prob(torch.tensor(tau[g], dtype=torch.float64)))
        for g in tau
    )
    lp = float(prior.log_prob().detach())
    assert math.isclose(prior.penalty().item(), -(lp - const) / sum(SIZES), rel_tol=1e-5)
    # and without the hand-written constant: the difference to zero deltas
    with torch.no_grad():
        saved = [(l.lora_A.clone(), l.lora_B.clone()) for l in lora_layers(model).values()]
        for l in lora_layers(model).values():
            l.lora_A.zero_(), l.lora_B.zero_()
        lp0 = float(prior.log_prob().detach())
        for l, (a_, b_) in zip(lora_layers(model).values(), saved):
            l.lora_A.copy_(a_), l.lora_B.copy_(b_)
    assert math.isclose(lp0, const, rel_tol=1e-9)
    assert math.isclose(prior.penalty().item(), -(lp - lp0) / sum(SIZES), rel_tol=1e-5)


def test_tau_recovery_from_synthetic_flock():
    true_tau = {"q_proj": 50.0, "v_proj": 400.0}
    ranks = [4, 2, 3, 4] * 6  # 24 tasks
    model = tiny_model(ranks)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            sd = true_tau[name.rsplit(".", 1)[-1]] ** -0.5
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * sd)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * sd)
            # inactive components hold garbage: it must not leak into the estimate
            layer.lora_A.mul_(layer.rank_mask[:, :, None]).add_(5.0 * (1 - layer.rank_mask[:, :, None]))
            layer.lora_B.mul_(layer.rank_mask[:, None, :]).add_(5.0 * (1 - layer.rank_mask[:, None, :]))
    prior = HierarchicalPrior(model, [10] * 24, mode="infer", tau_init=1.0)
    got = prior.update_tau(step=50)
    for grp, t in true_tau.items():
        assert abs(got[grp] / t - 1) < 0.05, (grp, got[grp], t)  # ~1% expected: n ~ 2e4 parameters
    assert prior.history == [{"step": 50, "tau": got}]
    # distributed: two workers' all-reduced statistics give the same update
    w0 = HierarchicalPrior(model, [10] * 24, mode="infer", owned_tasks=range(0, 24, 2))
    w1 = HierarchicalPrior(model, [10] * 24, mode="infer", owned_tasks=range(1, 24, 2))
    summed = w0.update_tau(w0.stats_tensor() + w1.stats_tensor())
    for grp in true_tau:
        assert math.isclose(summed[grp], got[grp], rel_tol=1e-6)


def test_update_tau_caps_degenerate_start_and_schedule():
    model = tiny_model()  # deltas are exactly zero after inject
    prior = HierarchicalPrior(model, SIZES, mode="infer", tau_max=3000.0, update_every=10)
    assert prior.tau == {"q_proj": 100.0, "v_proj": 100.0}  # tau_init
    assert [s for s in range(31) if prior.due(s)] == [10, 20, 30]
    assert prior.update_tau(step=10) == {"q_proj": 3000.0, "v_proj": 3000.0}
    fixed = HierarchicalPrior(model, SIZES, tau=10.0)
    assert not fixed.due(10)
    with pytest.raises(PriorSettingError, match="infer"):
        fixed.update_tau()


def test_state_dict_round_trip(model, tmp_path):
    prior = HierarchicalPrior(model, SIZES, mode="infer", a=1.5, b=0.2, tau_max=math.inf, update_every=5)
    prior.update_tau(step=5)
    prior.set_tau({"v_proj": 77.0})
    state = json.loads(json.dumps(prior.state_dict(), allow_nan=False))  # strict JSON
    other = HierarchicalPrior(tiny_model(), SIZES, mode="infer")
    other.load_state_dict(state)
    assert other.tau == prior.tau and other.history == prior.history
    assert (other.a, other.b, other.tau_max, other.update_every) == (1.5, 0.2, math.inf, 5)
    prior.save(tmp_path / "prior.json")
    third = HierarchicalPrior(model, SIZES, mode="infer")
    third.load(tmp_path / "prior.json")
    torch.testing.assert_close(third.penalty(), prior.penalty())
    wrong = HierarchicalPrior(model, SIZES, groups="global", tau=1.0)
    with pytest.raises(PriorSettingError, match="groups"):
        wrong.load_state_dict(state)


def test_train_step_adds_the_penalty(model):
    prior = HierarchicalPrior(model, SIZES, tau=100.0)
    expected = prior.penalty().item()
    params = [p for p in adapter_params(model) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randint(0, 300, (4, 8), generator=g), torch.tensor([0, 1, 3, 4]), torch.full((4,), 0.25))
    res = train_step(model, batch, opt, params, extra_loss=prior.penalty, max_grad_norm=None)
    assert math.isclose(res.loss - res.nll, expected, rel_tol=1e-4)
    assert "tau / sum N" in tau_scale_note
