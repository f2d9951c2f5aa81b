"""PESC without host syncs in the forward (issue 21, item 6): dense dispatch and the load bookkeeping."""

from __future__ import annotations

import torch

from models.base import load_base
from models.lora import inject, task_ids
from models.moe import convert_to_moe, moe_layers, reset_load, task_expert_load
from tests.conftest import TINY_LLAMA
from tests.models.train.test_host_syncs import CountReads


def _model(dispatch: str, with_lora: bool = True):
    torch.manual_seed(0)
    m = load_base(random_init=TINY_LLAMA, seed=0)
    if with_lora:
        inject(m, ["q_proj"], num_tasks=3, rank=2, alpha=4.0)
    convert_to_moe(m, num_experts=4, top_k=2, bottleneck=8, dispatch=dispatch)
    return m


def test_dense_forward_with_task_ids_reads_nothing_back():
    m = _model("dense")
    x = torch.randint(0, 300, (4, 10), generator=torch.Generator().manual_seed(1))
    counter = CountReads()
    with counter, task_ids(m, torch.tensor([0, 2, 2, 1])):
        m(input_ids=x).logits.sum().backward()
    assert counter.n == 0


def test_per_task_load_on_the_device_equals_counting_row_by_row():
    m = _model("dense")
    assert all(layer.task_slots == 3 for layer in moe_layers(m).values())
    x = torch.randint(0, 300, (4, 10), generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([0, 2, 2, 0])
    with torch.no_grad(), task_ids(m, ids):
        m(input_ids=x)
    got = task_expert_load(m)
    reset_load(m)
    assert task_expert_load(m) == {}
    ref: dict[int, torch.Tensor] = {}
    for r in range(4):  # one row at a time, one task each: the single-task path
        with torch.no_grad(), task_ids(m, int(ids[r])):
            m(input_ids=x[r : r + 1])
    ref = task_expert_load(m)
    assert set(got) == {0, 2} == set(ref)
    for t in got:
        for name in got[t]:
            assert got[t][name] == ref[t][name]


def test_auto_dispatch_is_sparse_on_the_cpu_with_the_same_result():
    x = torch.randint(0, 300, (3, 8), generator=torch.Generator().manual_seed(2))
    outs = []
    for dispatch in ("auto", "sparse", "dense"):
        m = _model(dispatch, with_lora=False)
        with torch.no_grad():
            for layer in moe_layers(m).values():
                layer.up.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
            outs.append(m(input_ids=x).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-5, atol=1e-5)
