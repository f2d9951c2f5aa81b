"""The picked search trial as a model (rebuilt from config + checkpoint, gates folded into the
base and the adapters) and the two-objective successive-halving rule; no Ray cluster."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from models.gates.layer import GatedLinear, gate_params
from models.lora import adapter_params, inject, set_trainable, task_ids
from models.peft_io import load_adapter
from orchestrator.search.pick import export_picked_adapters, load_picked_model, picked_base, restrict_lora
from orchestrator.search.scheduler import ParetoASHA, rungs
from orchestrator.search.trial import STATE_FILE, _trained_state, build_trial_model, trial_state
from tests.orchestrator.search.test_driver import _spec

PICKED = {"trial_id": "t0", "rank": 4, "bits": 4, "target_sparsity": 0.3, "lr": 1e-3, "tau": 100.0,
          "quantizer": "nf", "lq_iters": 2, "gate_lr": 0.2}


def _trained_trial(tmp_path):
    """A 'trained' trial: random task deltas, some gates closed, some half open; its checkpoint."""
    spec = _spec()
    model, _ = build_trial_model(spec, PICKED, 3, "nf", 2)
    set_trainable(model, shared=True, task=True)
    params = [p for p in adapter_params(model) if p.requires_grad] + gate_params(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("lora_A", "lora_B", "lora_B_shared")):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        for layer in (m for m in model.modules() if isinstance(m, GatedLinear)):
            rows, cols = layer.theta_rows.clone(), layer.theta_cols.clone()
            rows[0, :3], cols[0, 1:3] = -2.0, -2.0  # closed
            rows[0, 5] = -0.2  # tanh(-0.2) + 0.5 ~ 0.3: a fractional gate
            layer.theta_rows.copy_(rows)
            layer.theta_cols.copy_(cols)
    save_file(_trained_state(model, params), str(tmp_path / STATE_FILE))
    return spec, model.eval()


def test_picked_model_is_rebuilt_exactly_and_folding_keeps_every_tasks_logits(tmp_path):
    spec, trial = _trained_trial(tmp_path)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    rebuilt = load_picked_model(spec, PICKED, tmp_path)
    dirs = export_picked_adapters(spec, PICKED, tmp_path, tmp_path / "adapters", "tiny")
    assert sorted(dirs) == sorted(t.name for t in spec.tasks)
    for t, task in enumerate(spec.tasks):
        with torch.no_grad(), task_ids(trial, t):
            want = trial(input_ids=ids).logits
        with torch.no_grad(), task_ids(rebuilt, t):
            assert torch.allclose(rebuilt(input_ids=ids).logits, want, atol=1e-5)  # same seed, LQ, gates
        base, gates = picked_base(spec, PICKED, tmp_path)  # plain nn.Linear layers, gates folded in
        assert len(gates) == 3 and not any(isinstance(m, GatedLinear) for m in base.modules())
        inject(base, spec.lora.target_modules, 1, 4, spec.lora.alpha, layers=[1])
        load_adapter(base, 0, dirs[task.name])
        with torch.no_grad(), task_ids(base, 0):
            assert torch.allclose(base(input_ids=ids).logits, want, atol=1e-4), task.name


def test_restricted_lora_never_touches_pruned_rows_or_columns(tmp_path):
    spec, _ = _trained_trial(tmp_path)
    base, gates = picked_base(spec, PICKED, tmp_path)
    assert all(0.2 < float(g[0][5]) < 0.4 for g in gates.values())
    inject(base, spec.lora.target_modules, 1, 4, spec.lora.alpha, layers=[1])
    restrict_lora(base, gates)
    opt = torch.optim.Adam(adapter_params(base), lr=0.1)
    ids = torch.randint(0, 300, (2, 16))
    for _ in range(2):
        with task_ids(base, 0):
            loss = base(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer = base.model.layers[1].self_attn.q_proj
    g_r, g_c = gates["model.layers.1.self_attn.q_proj"]
    assert (g_r[:3] == 0).all() and (g_c[1:3] == 0).all()
    assert layer.task_B(0)[:3].abs().max() == 0 and layer.task_A(0)[:, 1:3].abs().max() == 0
    assert layer.task_B(0)[3:].abs().max() > 0  # the kept rows trained



def test_a_checkpoint_with_step_size_scaled_gates_still_loads(tmp_path):
    """Checkpoints from before the gates had their own optimizer group stored phi = theta * lr / gate_lr."""
    from safetensors.torch import load_file

    spec, trial = _trained_trial(tmp_path)
    new = load_file(str(tmp_path / STATE_FILE))
    scale = PICKED["gate_lr"] / PICKED["lr"]
    old = {}
    for k, v in new.items():
        head, _, side = k.rpartition(".")
        old[f"{head}.parametrizations.{side}.original" if side.startswith("theta_") else k] = (
            v / scale if side.startswith("theta_") else v)
    (tmp_path / "old").mkdir()
    save_file(old, str(tmp_path / "old" / STATE_FILE))
    back = trial_state(tmp_path / "old" / STATE_FILE, scale)
    assert set(back) == set(new) and all(torch.allclose(back[k], new[k]) for k in new)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    rebuilt = load_picked_model(spec, PICKED, tmp_path / "old")
    with torch.no_grad(), task_ids(trial, 1), task_ids(rebuilt, 1):
        assert torch.allclose(rebuilt(input_ids=ids).logits, trial(input_ids=ids).logits, atol=1e-5)


class _T:
    def __init__(self, i: str) -> None:
        self.trial_id = i


def test_pareto_asha_stops_only_dominated_trials():
    assert rungs(10, 2, 30) == [10, 20] and rungs(10, 3, 30) == [10] and rungs(30, 2, 30) == []
    s = ParetoASHA("step", ("macro_ppl", "rung_bytes"), max_t=30, grace_period=10, reduction_factor=2)

    def at(i, step, ppl, size):
        return s.on_trial_result(None, _T(i), {"step": step, "macro_ppl": ppl, "rung_bytes": size})

    assert at("a", 10, 10.0, 100) == "CONTINUE"  # the first at a rung always goes on
    assert at("b", 10, 12.0, 100) == "STOP"  # dominated by a: 1 >= ceil(1 / 2)
    assert at("c", 10, 12.0, 50) == "CONTINUE"  # worse but smaller: on the rung's front
    assert at("d", 10, 11.0, 120) == "CONTINUE"  # dominated by 1 of 3 < ceil(3 / 2)
    assert at("e", 10, 13.0, 130) == "STOP"  # dominated by all 4
    assert at("c", 15, 12.0, 50) == "CONTINUE"  # between rungs: no decision
    assert at("c", 20, 20.0, 50) == "CONTINUE"  # first at rung 20
    assert at("a", 20, 9.0, 100) == "CONTINUE"
    assert at("d", 20, 9.5, 120) == "STOP"  # dominated by a at rung 20: 1 >= ceil(2 / 2)
    assert at("a", 30, 1.0, 1) == "CONTINUE"  # max_t: the trial ends by itself
    assert s.on_trial_result(None, _T("f"), {"step": 10, "macro_ppl": 1.0}) == "CONTINUE"  # no size: no decision


def test_pareto_asha_on_a_maximised_metric_stops_only_trials_beaten_on_it():
    s = ParetoASHA("step", ("macro_exact_match", "rung_bytes"), max_t=30, grace_period=10, reduction_factor=2,
                   modes=("max", "min"))

    def at(i, em, size):
        return s.on_trial_result(None, _T(i), {"step": 10, "macro_exact_match": em, "rung_bytes": size})

    assert at("a", 0.5, 100) == "CONTINUE"
    assert at("b", 0.7, 100) == "CONTINUE"  # a higher metric is better: a does not dominate b
    assert at("c", 0.4, 100) == "STOP"  # dominated by a and b: 2 >= ceil(2 / 2)
    assert at("d", 0.2, 50) == "CONTINUE"  # worse but smaller
