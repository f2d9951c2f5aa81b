"""The flock loop without Ray: methods, shared init, and the collectives on 2 gloo processes."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.base import load_base
from models.lora import adapter_params, inject, lora_layers
from models.prior import HierarchicalPrior
from models.train.loop import FlockData, MethodConfig, train_method
from tests.conftest import TINY_LLAMA

SIZES = [4, 8, 16, 12]


def _data(owned):
    g = torch.Generator().manual_seed(0)
    train = {g_: torch.randint(0, 300, (SIZES[g_], 12), generator=g) for g_ in range(len(SIZES))}
    evals = {g_: torch.randint(0, 300, (3, 12), generator=g) for g_ in range(len(SIZES))}
    return FlockData(
        SIZES, owned, {s: train[t] for s, t in enumerate(owned)}, {s: evals[t] for s, t in enumerate(owned)}
    )


def _model(n_slots):
    m = load_base(random_init=TINY_LLAMA, seed=0)
    torch.manual_seed(0)
    inject(m, ["q_proj", "v_proj", "down_proj"], num_tasks=n_slots, rank=4, alpha=8.0, max_rank=4)
    ad = {id(p) for p in adapter_params(m)}
    init = {n: p.detach().clone() for n, p in m.named_parameters() if id(p) in ad}
    return m, init


def _cfg(kind, steps=6, sync_every=1, prior_update="auto"):
    return MethodConfig(kind, kind, steps=steps, batch_size=6, lr=1e-2, seed=0, log_every=100, sync_every=sync_every,
                        prior_update=prior_update)


def test_methods_share_init_and_respect_their_parametrisation():
    m, init = _model(4)
    data = _data([0, 1, 2, 3])
    logs = []
    out = train_method(m, data, _cfg("unified"), init, log=logs.append)
    assert set(out["eval_nll"]) == {0, 1, 2, 3} and logs
    for layer in lora_layers(m).values():  # unified: deltas never move, all tasks share Theta
        assert layer.lora_A.abs().max() == 0 and layer.lora_B.abs().max() == 0
    train_method(m, data, _cfg("independent"), init, log=logs.append)
    for n, layer in lora_layers(m).items():  # independent: Theta stays at its (shared) init
        assert torch.equal(layer.lora_A_shared, init[f"{n}.lora_A_shared"])
        assert layer.lora_B.abs().max() > 0
    def delta_norm():
        return sum(float(l.lora_B.detach().norm()) for l in lora_layers(m).values())

    a = train_method(m, data, _cfg("hierarchical"), init, prior=HierarchicalPrior(m, SIZES, tau=1e4), log=logs.append)
    strong = delta_norm()
    b = train_method(m, data, _cfg("hierarchical"), init, prior=HierarchicalPrior(m, SIZES, tau=1e4), log=logs.append)
    assert a["eval_nll"] == b["eval_nll"]  # same seed, same batches, same init: same result
    train_method(m, data, _cfg("hierarchical"), init, prior=HierarchicalPrior(m, SIZES, tau=1e-3), log=logs.append)
    assert strong < 0.5 * delta_norm()  # a strong prior ties the task offsets to Theta


def _worker(rank, world, port, sync_every, q, prior_update="auto"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    owned = [[0, 3], [1, 2]][rank] if world == 2 else [0, 1, 2, 3]
    m, init = _model(len(owned))
    prior = HierarchicalPrior(m, [SIZES[t] for t in owned], tau=50.0, total_size=sum(SIZES))
    cfg = _cfg("hierarchical", steps=8, sync_every=sync_every, prior_update=prior_update)
    out = train_method(m, _data(owned), cfg, init, prior=prior, log=lambda s: None)
    q.put({owned[s]: v for s, v in out["eval_nll"].items()})
    dist.destroy_process_group()


def _run(world, sync_every=1, prior_update="auto"):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, sync_every, q, prior_update)) for r in range(world)]
    for p in procs:
        p.start()
    res = {}
    for _ in procs:
        res.update(q.get(timeout=240))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return res


def test_two_processes_equal_one_and_local_steps_have_a_measured_gap():
    one = _run(1)
    two = _run(2)
    for t in one:
        assert two[t] == pytest.approx(one[t], rel=1e-5, abs=1e-6)
    local = _run(2, sync_every=4)
    gap = max(abs(local[t] - one[t]) for t in one)
    assert 0 < gap < 0.5  # averaging Theta every 4 steps approximates the joint MAP, not exactly
    lazy_one, lazy_two = _run(1, prior_update="lazy"), _run(2, prior_update="lazy")
    for t in one:  # the lazy step keeps Theta's all-reduce exact: one worker or two, same adapters
        assert lazy_two[t] == pytest.approx(lazy_one[t], rel=1e-5, abs=1e-6)


def test_inferred_tau_is_updated_and_logged():
    m, init = _model(4)
    prior = HierarchicalPrior(m, SIZES, mode="infer", tau_init=100.0, update_every=2, a=1.0, b=0.01)
    out = train_method(m, _data([0, 1, 2, 3]), _cfg("hierarchical", steps=6), init, prior=prior, log=lambda s: None)
    assert [h["step"] for h in out["tau_history"]] == [2, 4, 6]
    assert set(out["tau"]) == {"q_proj", "v_proj", "down_proj"}
    assert all(0 < t <= prior.tau_max for t in out["tau"].values())
    assert all(t != 100.0 for t in out["tau"].values())  # the data moved tau off its start


def test_resume_from_mid_method_state_matches_an_uninterrupted_run(tmp_path):
    data = _data([0, 1, 2, 3])
    m, init = _model(4)
    calls = []
    full = train_method(m, data, _cfg("hierarchical", steps=7), init, prior=HierarchicalPrior(m, SIZES, tau=50.0),
                        log=lambda s: None, state_dir=tmp_path / "st", checkpoint_every=3, on_checkpoint=calls.append)
    assert calls == [3, 6]  # the state on disk is step 6's, as if the worker died just after
    m2, init2 = _model(4)  # a restarted worker: fresh process state, same files
    logs = []
    resumed = train_method(m2, data, _cfg("hierarchical", steps=7), init2, prior=HierarchicalPrior(m2, SIZES, tau=50.0),
                           log=logs.append, state_dir=tmp_path / "st", checkpoint_every=3)
    assert any("resumed at step 7" in line for line in logs)
    for t in full["eval_nll"]:
        assert resumed["eval_nll"][t] == pytest.approx(full["eval_nll"][t], rel=1e-6)


def test_a_diverged_task_is_stopped_and_the_others_train_on():
    m, init = _model(4)
    data = _data([0, 1, 2, 3])
    ref = train_method(m, data, _cfg("independent", steps=6), init, log=lambda s: None)
    poisoned = dict(init)
    for k in poisoned:
        if k.endswith("mlp.down_proj.lora_A"):
            poisoned[k] = poisoned[k].clone()
            poisoned[k][2] = float("nan")  # task 2's offset diverged
    logs = []
    out = train_method(m, data, _cfg("independent", steps=6), poisoned, log=logs.append)
    assert list(out["failed"]) == [2] and "NaN/inf" in out["failed"][2]
    assert set(out["eval_nll"]) == {0, 1, 3}
    assert all(torch.isfinite(torch.tensor(v)) for v in out["eval_nll"].values())
    assert any("the other tasks continue" in line for line in logs)
    for t in (0, 1, 3):  # the others learned (not necessarily the same batches once task 2 stopped)
        assert out["eval_nll"][t] < ref["eval_nll"][t] + 0.5



def test_hooks_run_at_their_moments_and_periodic_evals_do_not_change_training():
    from dataclasses import replace

    from models.train.hooks import TrainHooks

    data = _data([0, 1, 2, 3])
    m, init = _model(4)
    plain = train_method(m, data, _cfg("independent", steps=7), init, log=lambda s: None)
    assert "eval_curve" not in plain  # eval_every = 0: only the final evaluation
    seen: list[tuple[str, int]] = []
    hooks = TrainHooks(on_step=lambda s: seen.append(("step", s)), before_eval=lambda: seen.append(("final", 0)),
                       on_eval=lambda s, nll: seen.append(("eval", s)))
    cfg = replace(_cfg("independent", steps=7), eval_every=3, eval_rows=2)
    out = train_method(m, data, cfg, init, log=lambda s: None, hooks=hooks)
    assert [x for x in seen if x[0] != "step"] == [("eval", 3), ("eval", 6), ("final", 0)]
    assert [s for k, s in seen if k == "step"] == list(range(1, 8))
    assert [s for s, _ in out["eval_curve"]] == [3, 6] and set(out["eval_curve"][0][1]) == {0, 1, 2, 3}
    assert out["eval_nll"] == plain["eval_nll"]  # evaluating in between leaves training as it was


def test_the_hierarchical_prior_is_a_prior():
    from models.train.hooks import Prior

    m, _ = _model(4)
    assert isinstance(HierarchicalPrior(m, SIZES, tau=1.0), Prior)


def test_on_log_reports_each_tasks_mean_training_nll_since_the_previous_log(monkeypatch):
    from dataclasses import replace

    from models.train.hooks import TrainHooks

    m, init = _model(4)
    seen: list[tuple[int, float, dict[int, float]]] = []
    per_step: list[dict[int, float]] = []
    import models.train.loop as loop_mod

    original = loop_mod.train_step

    def spy(*a, **k):
        res = original(*a, **k)
        per_step.append(res.task_nll)
        return res

    monkeypatch.setattr(loop_mod, "train_step", spy)  # to see each step's per-task NLL
    hooks = TrainHooks(on_log=lambda step, loss, tasks: seen.append((step, loss, tasks)))
    train_method(m, _data([0, 1, 2, 3]), replace(_cfg("independent", steps=6), log_every=3), init,
                 log=lambda s: None, hooks=hooks)
    assert [s for s, _, _ in seen] == [3, 6]
    for (_, _, tasks), window in zip(seen, (per_step[:3], per_step[3:])):
        expect = {t: [w[t] for w in window if t in w] for t in set().union(*window)}
        assert tasks == pytest.approx({t: sum(v) / len(v) for t, v in expect.items()})
