"""Batches cut to their scored columns (dynamic padding) and the head run on scored positions only: exact.

The reference is the same training with the cut switched off (every batch at the rows' full
width, the head on every position), with and without the on-demand prefix cache, whose rows
are then computed in batches of one width and read back in batches of another.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import models.train.data as data_mod
import models.train.step as step
from models.lora import adapter_params
from models.prefix_cache import PrefixCache
from models.train.loop import FlockData, MethodConfig, train_method
from models.train.trim import scored_positions, scored_width, trim_columns
from tests.models.test_prefix_cache import SIZES, _model  # the same flock: 3 tasks, adapters on block 2

LENGTH = 16


def _padded_mask(n: int, g: torch.Generator) -> torch.Tensor:
    """Instruction-like rows: a prompt, a scored completion, then right padding (lengths vary)."""
    mask = torch.zeros(n, LENGTH, dtype=torch.bool)
    for i in range(n):
        prompt = int(torch.randint(1, 5, (1,), generator=g))
        end = int(torch.randint(prompt + 1, 12, (1,), generator=g))  # never the last column: there is padding
        mask[i, prompt:end] = True
    return mask


def test_width_and_positions_match_a_loop():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = _padded_mask(5, g)
        last = max(j for i in range(5) for j in range(LENGTH) if mask[i, j])
        assert scored_width(mask, LENGTH) == last + 1
        want = [i * LENGTH + t for i in range(5) for t in range(LENGTH - 1) if mask[i, t + 1]]
        assert scored_positions(mask).tolist() == want
    assert scored_width(None, LENGTH) == LENGTH  # raw text: every token counts
    assert scored_width(torch.zeros(3, LENGTH, dtype=torch.bool), LENGTH) == 2
    ids = torch.arange(3 * LENGTH).view(3, LENGTH)
    full = torch.ones(3, LENGTH, dtype=torch.bool)
    assert trim_columns(ids, full)[0] is ids  # nothing to cut: the same tensor


def _run(trim: bool, cache: bool, monkeypatch) -> list[dict]:
    with monkeypatch.context() as mp:
        if not trim:  # the reference: full-width batches, head on every position
            mp.setattr(data_mod, "trim_columns", lambda ids, scored: (ids, scored))
            mp.setattr(step, "trim_columns", lambda ids, scored: (ids, scored))
            mp.setattr(data_mod, "scored_positions", lambda scored: None)
            mp.setattr(step, "scored_positions", lambda scored: None)
        model, init = _model()
        g = torch.Generator().manual_seed(1)
        train = {s: torch.randint(0, 300, (n, LENGTH), generator=g) for s, n in enumerate(SIZES)}
        evals = {s: torch.randint(0, 300, (5, LENGTH), generator=g) for s in range(len(SIZES))}
        tmask = {s: _padded_mask(n, g) for s, n in enumerate(SIZES)}
        emask = {s: _padded_mask(5, g) for s in range(len(SIZES))}
        data = FlockData(SIZES, [0, 1, 2], train, evals, train_mask=tmask, eval_mask=emask)
        if cache:
            data.prefix_cache = PrefixCache(model, 2, {"train": SIZES, "eval": [5] * len(SIZES)}, capacity=1000,
                                            length=LENGTH)
            data.split = 2
        outs = []
        for kind, bs in (("independent", 4), ("unified", 7)):  # other batch widths on the second pass
            cfg = MethodConfig(kind, kind, steps=5, batch_size=bs, lr=1e-2, seed=0, log_every=1, eval_every=2,
                               eval_rows=3, eval_batch_size=bs)
            out = train_method(model, data, cfg, init, log=lambda _: None)
            out["weights"] = [p.detach().clone() for p in adapter_params(model)]
            outs.append(out)
        return outs


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "prefix-cache"])
def test_cut_batches_train_and_evaluate_exactly_as_full_width(cache, monkeypatch):
    ref = _run(trim=False, cache=False, monkeypatch=monkeypatch)
    got = _run(trim=True, cache=cache, monkeypatch=monkeypatch)
    for x, y in zip(got, ref, strict=True):
        np.testing.assert_allclose([c[1] for c in x["curve"]], [c[1] for c in y["curve"]], rtol=1e-5, atol=1e-6)
        for t in y["eval_nll"]:
            assert x["eval_nll"][t] == pytest.approx(y["eval_nll"][t], rel=1e-5, abs=1e-6)
        for (s1, e1), (s2, e2) in zip(x["eval_curve"], y["eval_curve"], strict=True):
            assert s1 == s2 and e1 == pytest.approx(e2, rel=1e-5, abs=1e-6)
        # AdamW divides by sqrt(v): a near-zero gradient summed in another order (fewer padded
        # rows in each matmul) can move its weight differently by a fraction of one step (lr 1e-2)
        for a, b in zip(x["weights"], y["weights"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
