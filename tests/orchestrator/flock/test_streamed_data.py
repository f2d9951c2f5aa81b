"""Streamed rows (the row store, memory-mapped) train exactly like in-memory rows; workers are sent no rows."""

from __future__ import annotations

import pickle

import numpy as np
import torch

from models.base import load_base
from models.files import atomic_dir
from models.lora import adapter_params, inject, lora_layers
from models.prior import HierarchicalPrior
from models.train.loop import FlockData, MethodConfig, make_batch, train_method
from models.train.step import BatchSampler
from orchestrator.flock.driver import assign_tasks, worker_payloads
from tasks.row_store import RowStore, RowStoreWriter, owned_rows
from tasks.task_data import TaskData
from tests.conftest import TINY_LLAMA

L = 12


def _tasks(n=6, seed=0) -> list[TaskData]:
    """Tasks of unequal sizes; odd ones have instruction-style masks (a scored tail)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n):
        rows, ev = 3 + 4 * t, 2 + t % 3
        tm = em = None
        if t % 2:
            tm = torch.arange(L).expand(rows, L) >= torch.randint(2, L - 2, (rows, 1), generator=g)
            em = torch.arange(L).expand(ev, L) >= 5
        ids = torch.randint(0, 300, (rows, L), generator=g)
        out.append(TaskData(name=f"t{t}", train=None, eval=None, train_ids=ids,
                            eval_ids=torch.randint(0, 300, (ev, L), generator=g), train_examples=rows,
                            train_mask=tm, eval_mask=em))
    return out


def _store(tmp_path, tasks) -> RowStore:
    with atomic_dir(tmp_path / "rows") as tmp:
        w = RowStoreWriter(tmp, L)
        for d in tasks:
            w.add(d)
        w.finish()
    return RowStore(tmp_path / "rows")


def _in_memory(tasks, owned) -> FlockData:
    sizes = [d.train_examples for d in tasks]
    pick = lambda f: {s: getattr(tasks[g], f) for s, g in enumerate(owned)}  # noqa: E731
    return FlockData(sizes, owned, pick("train_ids"), pick("eval_ids"), train_mask=pick("train_mask"),
                     eval_mask=pick("eval_mask"))


def _streamed(store, tasks, owned) -> FlockData:
    train, evals, tm, em = owned_rows(store, owned)
    return FlockData([d.train_examples for d in tasks], owned, train, evals, train_mask=tm, eval_mask=em)


def test_streamed_batches_equal_in_memory_batches(tmp_path):
    tasks = _tasks()
    store = _store(tmp_path, tasks)
    for owned in ([0, 1, 2, 3, 4, 5], [1, 4, 5]):  # one worker, and one worker's share
        mem, streamed = _in_memory(tasks, owned), _streamed(store, tasks, owned)
        sizes = [d.train_examples for d in tasks]
        a, b = BatchSampler(sizes, 8, 7, 0.5), BatchSampler(sizes, 8, 7, 0.5)
        masked = 0
        for _ in range(40):
            x, y = make_batch(mem, a, torch.device("cpu")), make_batch(streamed, b, torch.device("cpu"))
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.task_ids, y.task_ids)
            assert torch.equal(x.weights, y.weights)
            assert (x.scored is None) == (y.scored is None)
            if x.scored is not None:
                masked += 1
                assert torch.equal(x.scored, y.scored)
        assert masked > 0  # the masks were exercised
        for s in range(len(owned)):  # the row interface serves both alike
            assert torch.equal(mem.eval_rows(s, 1, 3), streamed.eval_rows(s, 1, 3))
            rows = np.array([0, mem.train_count(s) - 1])
            assert torch.equal(mem.train_rows(s, rows), streamed.train_rows(s, rows))
            ma, mb = mem.train_mask_rows(s, rows), streamed.train_mask_rows(s, rows)
            assert (ma is None and mb is None) or torch.equal(ma, mb)


def test_streamed_training_equals_in_memory_training(tmp_path):
    tasks = _tasks()
    store = _store(tmp_path, tasks)
    owned = list(range(len(tasks)))
    sizes = [d.train_examples for d in tasks]
    results, adapters = [], []
    for data in (_in_memory(tasks, owned), _streamed(store, tasks, owned)):
        m = load_base(random_init=TINY_LLAMA, seed=0)
        torch.manual_seed(0)
        inject(m, ["q_proj", "v_proj"], num_tasks=len(owned), rank=4, alpha=8.0, max_rank=4)
        ad = {id(p) for p in adapter_params(m)}
        init = {n: p.detach().clone() for n, p in m.named_parameters() if id(p) in ad}
        cfg = MethodConfig("hierarchical", "hierarchical", steps=5, batch_size=6, lr=1e-2, seed=3, log_every=100)
        results.append(train_method(m, data, cfg, init, prior=HierarchicalPrior(m, sizes, tau=100.0), log=lambda _: 0))
        adapters.append(torch.cat([lay.lora_B.detach().flatten() for lay in lora_layers(m).values()]))
    assert results[0]["eval_nll"] == results[1]["eval_nll"] and results[0]["curve"] == results[1]["curve"]
    assert torch.equal(adapters[0], adapters[1]) and adapters[0].abs().max() > 0


def test_a_workers_payload_holds_no_rows_and_only_its_own_tasks(tmp_path):
    tasks = _tasks(8)
    store = _store(tmp_path, tasks)
    names, sizes = [d.name for d in tasks], [d.train_examples for d in tasks]
    assignment = assign_tasks(sizes, 3)
    plan = {n: {"settings": {}, "examples": [n] * 4} for n in names[::2]}  # tasks judged beyond ppl
    payloads = worker_payloads(names, sizes, assignment, store.folder, plan)
    assert len(payloads) == 3
    big = worker_payloads(names, [s * 1000 for s in sizes], assignment, store.folder, plan)

    def arrays(o) -> int:
        if isinstance(o, (np.ndarray, torch.Tensor)):
            return 1
        if isinstance(o, dict):
            return sum(arrays(v) for v in o.values())
        if isinstance(o, (list, tuple)):
            return sum(arrays(v) for v in o)
        return 0

    for rank, (p, owned) in enumerate(zip(payloads, assignment)):
        assert arrays(p) == 0
        assert set(p["metric_plan"]) == {names[g] for g in owned} & set(plan)  # its own tasks' plan only
        # a path and a few numbers per task: the size does not grow with the rows
        assert abs(len(pickle.dumps(p)) - len(pickle.dumps(big[rank]))) < 64 and len(pickle.dumps(p)) < 2000
        # what the worker maps from that path: its own tasks, each exactly its rows
        train, evals, _, _ = owned_rows(RowStore(p["rows_dir"]), owned)
        assert len(train) == len(owned)
        for s, g in enumerate(owned):
            assert torch.equal(train[s], tasks[g].train_ids) and torch.equal(evals[s], tasks[g].eval_ids)
    assert sorted(g for a in assignment for g in a) == list(range(8))
