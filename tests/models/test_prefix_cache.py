"""The on-demand frozen-prefix cache: same losses as no cache and as the precomputed cache, within any budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.base import load_base
from models.lora import adapter_params, inject
from models.prefix import compute_prefix
from models.prefix_cache import PrefixCache, plan_prefix_cache
from models.train.loop import FlockData, MethodConfig, train_method
from tests.conftest import TINY_LLAMA

SIZES = [5, 9, 14]


def _model():
    m = load_base(random_init=dict(TINY_LLAMA, num_hidden_layers=3), seed=0)
    torch.manual_seed(0)
    inject(m, ["q_proj", "v_proj", "down_proj"], num_tasks=len(SIZES), rank=4, alpha=8.0, layers=[2])
    ad = {id(p) for p in adapter_params(m)}
    return m, {n: p.detach().clone() for n, p in m.named_parameters() if id(p) in ad}


def _rows():
    g = torch.Generator().manual_seed(1)
    train = {s: torch.randint(0, 300, (n, 10), generator=g) for s, n in enumerate(SIZES)}
    evals = {s: torch.randint(0, 300, (4, 10), generator=g) for s in range(len(SIZES))}
    masks = {s: torch.rand(4, 10, generator=g) > 0.3 for s in range(len(SIZES))}
    masks[1] = None  # a task of full raw-text rows beside masked ones
    return train, evals, masks


def _cache(model, train, evals, capacity, scores=None):
    return PrefixCache(model, 2, {"train": [len(x) for x in train.values()], "eval": [len(x) for x in evals.values()]},
                       capacity, scores=scores)


def _run(mode: str, capacity: int = 0, scores=None) -> tuple[list[dict], PrefixCache | None]:
    """Two methods of the comparison, each 4 steps + a periodic and a final eval, under one prefix mode."""
    model, init = _model()
    train, evals, masks = _rows()
    data = FlockData(SIZES, [0, 1, 2], train, evals, eval_mask=masks)
    cache = None
    if mode == "precomputed":
        data.train_prefix = {s: compute_prefix(model, x, 2) for s, x in train.items()}
        data.eval_prefix = {s: compute_prefix(model, x, 2) for s, x in evals.items()}
        data.split = 2
    elif mode == "demand":
        cache = data.prefix_cache = _cache(model, train, evals, capacity, scores)
        data.split = 2
    outs = []
    for kind in ("independent", "unified"):
        cfg = MethodConfig(kind, kind, steps=4, batch_size=6, lr=1e-2, seed=0, log_every=1, eval_every=2, eval_rows=2)
        outs.append(train_method(model, data, cfg, init, log=lambda _: None))
    return outs, cache


def _close(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert [c[0] for c in x["curve"]] == [c[0] for c in y["curve"]]
        np.testing.assert_allclose([c[1] for c in x["curve"]], [c[1] for c in y["curve"]], rtol=1e-5, atol=1e-6)
        assert x["eval_nll"].keys() == y["eval_nll"].keys()
        for t in x["eval_nll"]:
            assert x["eval_nll"][t] == pytest.approx(y["eval_nll"][t], rel=1e-5, abs=1e-6)
        for (s1, e1), (s2, e2) in zip(x["eval_curve"], y["eval_curve"], strict=True):
            assert s1 == s2 and e1 == pytest.approx(e2, rel=1e-5, abs=1e-6)


def test_on_demand_cache_gives_the_losses_of_no_cache_and_of_the_precomputed_cache():
    none, _ = _run("none")
    pre, _ = _run("precomputed")
    demand, cache = _run("demand", capacity=1000)
    _close(demand, none)
    _close(demand, pre)
    s = cache.stats
    # the second method replays the first's draws and every eval reads the same rows: served, not recomputed
    assert s["hits"] > s["computed"] > 0 and s["evicted"] == 0
    assert s["computed"] <= sum(SIZES) + 4 * len(SIZES)  # at most every distinct row once
    assert none[0]["eval_nll"] != none[1]["eval_nll"]  # the methods differ: the comparison is not vacuous


def test_a_budget_smaller_than_the_rows_evicts_and_stays_exact():
    none, _ = _run("none")
    # 7 rows for 28 training + 12 eval rows; task 2's rows score highest, so they push out the others
    demand, cache = _run("demand", capacity=7, scores={"train": [1.0, 2.0, 3.0], "eval": [2.5] * 3})
    _close(demand, none)
    assert cache.stats["evicted"] > 0 and cache.used == 7
    kept = [(k, np.flatnonzero(cache.where[k] >= 0)) for k in ("train", "eval")]
    assert sum(len(r) for _, r in kept) == 7
    # what stays is the highest-scored: any kept row scores at least as much as any row it pushed out
    assert min(cache.score[k][r].min() for k, r in kept if len(r)) >= 2.0


def test_a_kept_row_is_served_without_running_the_frozen_blocks_and_equals_them():
    model, _ = _model()
    train, evals, _ = _rows()
    cache = _cache(model, train, evals, capacity=3)
    ids = torch.stack([train[0][1], train[2][3], train[0][1]])  # a row drawn twice is computed once
    first = cache.get("train", np.array([0, 2, 0]), np.array([1, 3, 1]), ids)
    assert cache.stats["computed"] == 2 and cache.used == 2
    ref = compute_prefix(model, ids, 2)
    torch.testing.assert_close(first, ref, rtol=0, atol=0)
    again = cache.get("train", np.array([2, 0]), np.array([3, 1]), ids[:2].flip(0))
    assert cache.stats["computed"] == 2 and cache.stats["hits"] == 2
    torch.testing.assert_close(again, ref[:2].flip(0), rtol=0, atol=0)


def test_the_cache_runs_the_frozen_blocks_without_dropout_even_in_training_mode():
    from tests.conftest import TINY_GPT2

    model = load_base(random_init=dict(TINY_GPT2, n_layer=3), seed=0)  # GPT-2 configs have dropout 0.1
    model.train()
    x = torch.randint(0, 300, (2, 8))
    cache = PrefixCache(model, 2, {"train": [2]}, capacity=2)
    got = cache.get("train", np.array([0, 0]), np.array([0, 1]), x)
    model.eval()
    torch.testing.assert_close(got, compute_prefix(model, x, 2), rtol=0, atol=0)
    model.train()
    assert all(m.training for m in model.modules())  # the caller's modes come back


@pytest.mark.parametrize(
    "mode,draws,methods,passes,budget_rows,kinds",
    [
        ("auto", 160, 1, 1, 10_000, ()),  # 160 draws of 6,000 rows, one method, one eval: each row seen once
        ("auto", 160, 3, 4, 10_000, ("train", "eval")),  # three methods replay the draws; four evals
        ("auto", 160, 1, 4, 10_000, ("eval",)),  # one method: its draws are seen once, the eval rows four times
        ("auto", 20_000, 1, 1, 10_000, ("train",)),  # epochs over the same rows
        ("auto", 20_000, 1, 1, 10, ()),  # ... but the budget holds almost nothing
        ("on", 160, 1, 1, 10_000, ("train", "eval")),
        ("off", 20_000, 3, 4, 10_000, ()),
    ],
)
def test_the_plan_caches_only_rows_used_again_and_only_when_they_fit(mode, draws, methods, passes, budget_rows, kinds):
    plan = plan_prefix_cache(mode, budget_rows * 100, 100, 6_000, 600, draws, methods, passes)
    assert plan.kinds == kinds and plan.use is bool(kinds)
    assert plan.reason.startswith(f"prefix cache {'on' if kinds else 'off'}") and "\n" not in plan.reason
    assert plan.capacity == (min(budget_rows, sum({"train": 6_000, "eval": 600}[k] for k in kinds)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host memory, non_blocking copies)")
def test_on_a_gpu_the_slab_is_pinned_host_memory_and_rows_reach_the_device_exact():
    from models.train.step import evaluate

    model, _ = _model()
    train, evals, masks = _rows()
    ref = {s: compute_prefix(model, x, 2) for s, x in train.items()}  # on the CPU
    ref_eval = evaluate(model, evals, 4, masks=masks)
    model.cuda()
    cache = _cache(model, train, evals, capacity=8)  # rows stay on the CPU, as a memory-mapped store keeps them
    assert cache.pinned
    for slots, rows in ([0, 1, 2], [3, 4, 5]), ([0, 2, 1], [3, 5, 4]), ([2, 2], [0, 1]):
        ids = torch.stack([train[s][r] for s, r in zip(slots, rows, strict=True)])
        got = cache.get("train", np.array(slots), np.array(rows), ids)
        assert got.is_cuda
        want = torch.stack([ref[s][r] for s, r in zip(slots, rows, strict=True)])
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
    assert cache.slab.is_pinned() and cache.slab.device.type == "cpu" and cache.stats["hits"] == 3
    got_eval = evaluate(model, evals, 4, None, 2, masks=masks, prefix_fn=lambda k, r, x: cache.get("eval", k, r, x))
    for t in evals:
        assert got_eval[t] == pytest.approx(ref_eval[t], rel=1e-4)
