"""The shared training step: objective weighting, learning, distributed-safe grads, NaN guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.lora import adapter_params, inject
from models.train.step import Batch, BatchSampler, NonFiniteLossError, evaluate, row_nll, train_step


def test_sampler_weights_give_unbiased_size_weighted_mean():
    sizes = [8, 64, 256]
    s = BatchSampler(sizes, batch_size=16, seed=0, temperature=0.5)
    per_task_value = np.array([1.0, 2.0, 4.0])  # pretend mean NLL of each task
    est = []
    for _ in range(3000):
        t, idx, w = s.sample()
        assert (idx < np.array(sizes)[t]).all()
        est.append((w * per_task_value[t]).sum())
    target = (np.array(sizes) * per_task_value).sum() / sum(sizes)
    assert abs(np.mean(est) - target) < 0.02 * target
    # small tasks are over-sampled relative to their share (sqrt), large ones under
    assert s.p[0] > sizes[0] / sum(sizes) and s.p[2] < sizes[2] / sum(sizes)


def test_same_seed_same_batches():
    a, b = BatchSampler([5, 50], 8, seed=7), BatchSampler([5, 50], 8, seed=7)
    for _ in range(5):
        for x, y in zip(a.sample(), b.sample()):
            np.testing.assert_array_equal(x, y)


def test_train_step_learns_and_reports_per_task(tiny_llama):
    inject(tiny_llama, ["q_proj", "v_proj", "down_proj"], num_tasks=2, rank=4, alpha=8.0)
    params = adapter_params(tiny_llama)
    opt = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(0)
    x = torch.randint(0, 300, (4, 16))
    batch = Batch(x, torch.tensor([0, 0, 1, 1]), torch.full((4,), 0.25))
    first = train_step(tiny_llama, batch, opt, params)
    for _ in range(15):
        last = train_step(tiny_llama, batch, opt, params)
    assert last.nll < first.nll - 0.5
    assert set(last.task_nll) == {0, 1}
    nll = evaluate(tiny_llama, {0: x[:2], 1: x[2:]}, batch_size=1)
    ref = row_nll(tiny_llama, Batch(x, torch.tensor([0, 0, 1, 1]), torch.ones(4)))
    assert nll[0] == pytest.approx(float(ref[:2].mean()), rel=1e-5)


def test_empty_batch_still_takes_the_prior_step(tiny_llama):
    inject(tiny_llama, ["q_proj"], num_tasks=2, rank=2, alpha=4.0)
    params = adapter_params(tiny_llama)
    opt = torch.optim.SGD(params, lr=0.1)
    with torch.no_grad():
        params[2].fill_(1.0)  # lora_A deltas
    empty = Batch(torch.zeros(0, 8, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    train_step(tiny_llama, empty, opt, params, extra_loss=lambda: 0.5 * params[2].pow(2).sum(), max_grad_norm=None)
    assert torch.allclose(params[2], torch.full_like(params[2], 0.9))
    assert all(p.grad is not None for p in params)


def test_nonfinite_loss_names_the_task(tiny_llama):
    inject(tiny_llama, ["down_proj"], num_tasks=2, rank=2, alpha=4.0)
    params = adapter_params(tiny_llama)
    with torch.no_grad():
        tiny_llama.get_submodule("model.layers.1.mlp.down_proj").lora_A[1].fill_(float("nan"))
    opt = torch.optim.AdamW(params)
    batch = Batch(torch.randint(0, 300, (2, 8)), torch.tensor([0, 1]), torch.ones(2))
    with pytest.raises(NonFiniteLossError) as e:
        train_step(tiny_llama, batch, opt, params)
    assert e.value.tasks == [1]
