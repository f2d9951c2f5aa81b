"""Trial packing: trials fused on one host train exactly like the same trials alone."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from models.grouped_lora import initial_adapter_state
from models.lora import lora_layers
from orchestrator.search.pack_actor import PackHostActor
from orchestrator.search.pack_host import PackHost
from orchestrator.search.pack_settings import packable
from orchestrator.search.trial import build_payload, build_trial_model, run_trial
from orchestrator.spec import JobSpec
from tests.orchestrator.conftest import tiny_job_spec


def _spec() -> JobSpec:
    return tiny_job_spec(num_layers=3, top_layers=2, steps=6)


@pytest.fixture(scope="module")
def payload():
    spec = _spec()
    g = torch.Generator().manual_seed(0)
    sizes = [3, 6, 9]
    train = [torch.randint(0, 300, (n, 16), generator=g).numpy() for n in sizes]
    evals = [torch.randint(0, 300, (2, 16), generator=g).numpy() for _ in sizes]
    return build_payload(spec.model_dump(mode="json"), ["json", "http", "email"], sizes, train, evals)


def _unpacked(payload, config: dict, steps: int, quantizer: str = "nf", lq_iters: int = 2,
              resume: tuple[dict, int] | None = None) -> tuple[dict, dict, dict]:
    """The unpacked trial, run by the product's code without Ray (``run_trial``, which ``search_trial``
    runs under Tune), for ``steps`` steps with one report at the end (``resume``: from a checkpoint's
    state after that many steps, as a resumed Tune trial does).

    Returns:
        (eval NLL per task, trained state, the final report's metrics).
    """
    fixed = {"steps": steps, "eval_every": steps, "eval_subset": 1, "quantizer": quantizer, "lq_iters": lq_iters,
             "gate_lambda": 0.0, "gate_lr": None, "threads": 1}
    reports = []
    nll = run_trial(
        {**config, "_search": fixed}, payload, lambda metrics, state: reports.append((metrics, state)), resume
    )
    [(metrics, state)] = reports
    assert metrics["final"] and metrics["step"] == steps
    return nll, state, metrics


def test_initial_state_matches_inject(payload):
    spec = JobSpec.model_validate(payload["spec"])
    model, _ = build_trial_model(spec, {"rank": 2}, 3)
    ref = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    got = initial_adapter_state(lora_layers(model), 2, 3, spec.train.seed)
    assert set(ref) == set(got)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)


def test_packed_trials_match_unpacked_trials(payload):
    """Three trials of different rank, tau and lr, fused on one host (with a late joiner and a
    released neighbour), give each trial the eval NLL, weights and model bytes it gets alone."""
    configs = [
        {"rank": 4, "tau": 100.0, "lr": 3e-3, "bits": 16, "target_sparsity": 0.0},
        {"rank": 2, "tau": 0.0, "lr": 1e-3, "bits": 16, "target_sparsity": 0.0},
        {"rank": 4, "tau": 30.0, "lr": 2e-3, "bits": 16, "target_sparsity": 0.0},
    ]
    host = PackHost(payload, capacity=3, max_rank=4)
    seed = _spec().train.seed
    a, b = host.lease(configs[0], seed), host.lease(configs[1], seed)
    for _ in range(2):
        host.step([a, b])
    c = host.lease(configs[2], seed)  # joins late; a and b are mid-training
    for _ in range(2):
        host.step([a, b, c])
    host.step([a, c])
    host.step([a, c])  # b (4 steps) is done; a and c train on
    state_b, bytes_b = host.state(b), host.deployed_bytes(b)
    nll_b = host.evaluate(b)
    host.release(b)
    host.step([c])
    host.step([c])
    runs = {a: (configs[0], 6), b: (configs[1], 4), c: (configs[2], 6)}
    for lid, (cfg, steps) in runs.items():
        ref_nll, ref_state, ref_metrics = _unpacked(payload, cfg, steps)
        nll = nll_b if lid == b else host.evaluate(lid)
        state = state_b if lid == b else host.state(lid)
        assert set(state) == set(ref_state)
        for k in ref_state:
            torch.testing.assert_close(state[k], ref_state[k], rtol=1e-4, atol=1e-6)
        for t in ref_nll:
            assert math.isclose(nll[t], ref_nll[t], rel_tol=1e-5)
        assert (bytes_b if lid == b else host.deployed_bytes(lid)).items() <= ref_metrics.items()  # the sizes Tune saw
    # training moved the adapters (the comparison is not trivially of initial weights)
    init = initial_adapter_state(host.layers, 4, 3, seed)
    assert any(not torch.equal(host.state(a)[k], init[k]) for k in host.state(a))


def test_packable_and_capacity(payload):
    assert packable({"rank": 8, "bits": 16, "target_sparsity": 0.0}, 8)
    assert packable({"rank": 8, "bits": 4, "target_sparsity": 0.0}, 8)  # on a quantised host
    assert not packable({"rank": 8, "bits": 16, "target_sparsity": 0.2}, 8)
    assert not packable({"rank": 16, "bits": 16}, 8)
    host = PackHost(payload, capacity=1, max_rank=4)
    cfg = {"rank": 4, "tau": 0.0, "lr": 1e-3}
    lid = host.lease(cfg, 0)
    with pytest.raises(RuntimeError, match="capacity"):
        host.lease(cfg, 0)
    host.release(lid)
    host.lease(cfg, 0)  # the freed group is reused


def test_thin_trial_checkpoint_names_match_the_unpacked_trial():
    from orchestrator.search import packed_trial as search_pack
    from orchestrator.search import trial as search_trial

    assert (search_pack.STATE_FILE, search_pack.META_FILE) == (search_trial.STATE_FILE, search_trial.META_FILE)


def test_resume_from_an_unpacked_checkpoint(payload):
    """A trial checkpointed unpacked after 2 steps resumes packed (Adam restarts, sampler seed
    ``seed + done``, as an unpacked resume does) and ends where the unpacked resume ends."""
    cfg = {"rank": 4, "tau": 100.0, "lr": 3e-3, "bits": 16, "target_sparsity": 0.0}
    seed = _spec().train.seed
    _, ckpt, _ = _unpacked(payload, cfg, 2)
    ref, _, _ = _unpacked(payload, cfg, 4, resume=(ckpt, 2))  # the unpacked trial resumed at step 2
    host = PackHost(payload, capacity=2, max_rank=4)
    other = host.lease({**cfg, "rank": 2, "tau": 0.0}, seed)  # a neighbour trains alongside
    lid = host.lease(cfg, seed + 2, ckpt)
    host.step([lid, other])
    host.step([lid, other])
    got = host.evaluate(lid)
    for k in ref:
        assert math.isclose(got[k], ref[k], rel_tol=1e-5)


def test_quantised_trials_share_one_quantised_host(payload):
    """Two 4-bit rank-4 trials (different tau and lr) on one host that quantised the base once
    match the unpacked trials, which each quantise it themselves."""
    from orchestrator.search.pack_settings import base_setting

    configs = [{"rank": 4, "tau": 100.0, "lr": 3e-3, "bits": 4, "target_sparsity": 0.0},
               {"rank": 4, "tau": 0.0, "lr": 1e-3, "bits": 4, "target_sparsity": 0.0}]
    setting = base_setting(configs[0], "nf", 2, 8)
    assert setting == {"bits": 4, "quantizer": "nf", "lq_iters": 2, "rank": 4} == base_setting(configs[1], "nf", 2, 8)
    assert base_setting({**configs[0], "rank": 2}, "nf", 2, 8) != setting  # LQ's Q depends on the rank
    assert base_setting({**configs[0], "target_sparsity": 0.2}, "nf", 2, 8) is None
    host = PackHost(payload, capacity=2, max_rank=4, setting=setting)
    seed = _spec().train.seed
    lids = [host.lease(c, seed) for c in configs]
    with pytest.raises(ValueError, match="does not fit"):
        host.lease({**configs[0], "bits": 16}, seed)
    for _ in range(3):
        host.step(lids)
    for lid, cfg in zip(lids, configs):
        ref_nll, ref_state, ref_metrics = _unpacked(payload, cfg, 3)
        got = host.evaluate(lid)
        for t in ref_nll:
            assert math.isclose(got[t], ref_nll[t], rel_tol=1e-5)
        for k, v in host.state(lid).items():
            torch.testing.assert_close(v, ref_state[k], rtol=1e-4, atol=1e-6)
        assert host.deployed_bytes(lid).items() <= ref_metrics.items()


class _DeviceTensor(torch.Tensor):
    """A tensor that, like a CUDA one, refuses ``.numpy()`` until it is copied to the host."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert cuda:0 device type tensor to numpy: use Tensor.cpu() first")
        out = super().__torch_function__(func, types, args, kwargs or {})
        if func is torch.Tensor.cpu:
            return out.as_subclass(torch.Tensor)
        return out


def test_a_packed_trials_state_leaves_a_gpu_host_as_numpy():
    actor = object.__new__(PackHostActor)  # its state read only: no base, no Ray
    actor.compute = threading.Lock()
    trained = torch.nn.Parameter(torch.ones(2, 3)).as_subclass(_DeviceTensor)
    actor.host = type("Host", (), {"state": lambda self, lid: {"w": trained}})()
    out = actor.state("lease-0")
    assert isinstance(out["w"], np.ndarray) and out["w"].shape == (2, 3)
