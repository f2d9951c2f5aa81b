"""evaluate() in mixed-task batches: each task's token-weighted NLL equals a per-task reference, masks included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.lora import inject, lora_layers, task_ids
from models.prefix import compute_prefix
from models.train.step import evaluate


def _reference(model, ids: torch.Tensor, mask: torch.Tensor | None, slot: int) -> float:
    """One task alone, one forward: sum of -log p(token t | < t) over its scored tokens / their count."""
    with torch.no_grad(), task_ids(model, slot):
        logp = model(input_ids=ids).logits.double().log_softmax(-1)  # (M, L, V)
    got = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # (M, L-1)
    scored = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
    scored = scored[:, 1:]
    return float(-(got * scored).sum() / scored.sum().clamp(min=1))


@pytest.fixture
def flock(tiny_llama):
    inject(tiny_llama, ["q_proj", "down_proj"], num_tasks=4, rank=4, alpha=8.0, layers=[1])
    with torch.no_grad():  # distinct adapters: a row through the wrong slot would change its NLL
        for layer in lora_layers(tiny_llama).values():
            layer.lora_B.normal_(std=0.2)
    g = torch.Generator().manual_seed(0)
    sets = {0: torch.randint(0, 300, (5, 12), generator=g), 1: torch.randint(0, 300, (1, 12), generator=g),
            2: torch.randint(0, 300, (0, 12), generator=g), 3: torch.randint(0, 300, (7, 12), generator=g),
            7: torch.randint(0, 300, (3, 9), generator=g)}  # another row length: batched apart
    masks = {t: torch.rand(x.shape, generator=g) > 0.4 for t, x in sets.items()}
    masks[1] = None
    masks[3][2] = False  # a row with no scored token adds nothing
    return tiny_llama, sets, masks


@pytest.mark.parametrize("batch_size", [1, 3, 4, 64])
def test_mixed_batches_equal_each_task_alone(flock, batch_size):
    model, sets, masks = flock
    slot = {0: 0, 1: 1, 2: 2, 3: 3, 7: 2}
    got = evaluate(model, sets, batch_size, slot_of=slot.__getitem__, masks=masks)
    assert got[2] == 0.0  # no rows: no NLL
    for t, ids in sets.items():
        if len(ids):
            assert got[t] == pytest.approx(_reference(model, ids, masks.get(t), slot[t]), rel=1e-5), t


def test_mixed_batches_with_precomputed_and_on_demand_prefixes(flock):
    model, sets, masks = flock
    sets = {t: x for t, x in sets.items() if t != 7}
    pre = {t: compute_prefix(model, x, 1) if len(x) else torch.zeros(0, 12, 64) for t, x in sets.items()}
    calls = []

    def prefix_fn(keys: np.ndarray, rows: np.ndarray, ids: torch.Tensor) -> torch.Tensor:
        calls.append(len(set(keys.tolist())))
        for k, r, row in zip(keys.tolist(), rows.tolist(), ids, strict=True):
            assert torch.equal(sets[k][r], row)  # the keys name the rows the batch holds
        return torch.stack([pre[k][r] for k, r in zip(keys.tolist(), rows.tolist(), strict=True)])

    full = evaluate(model, sets, 4, masks=masks)
    cached = evaluate(model, sets, 4, pre, 1, masks=masks)
    demand = evaluate(model, sets, 4, None, 1, masks=masks, prefix_fn=prefix_fn)
    assert max(calls) > 1  # batches did mix tasks
    for t in sets:
        assert cached[t] == pytest.approx(full[t], rel=1e-5)
        assert demand[t] == pytest.approx(full[t], rel=1e-5)
        if len(sets[t]):
            assert full[t] == pytest.approx(_reference(model, sets[t], masks[t], t), rel=1e-5)
