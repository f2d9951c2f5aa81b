"""The lazy (row-sparse) prior step against today's dense joint-MAP step (models/train/lazy.py).

Tolerances, measured on this tiny llama (4 tasks, batch 6, lr 1e-3, 60 steps; see the module
docstring of models/train/lazy.py for what the approximation drops):
* every task in every batch: the same adapters as the dense step up to float rounding;
* no prior (tau = 0): idle rows caught up exactly up to eps placement: rel. diff <= 2e-3
  (measured 4e-4 over 10 scripted steps);
* a small flock with the prior (tau 5 and 50): adapters within 10% relative Frobenius norm
  of the dense step's (measured 1.9% and 2.3%; the deltas alone 1.4% and 5.7%) and every
  task's eval NLL within 1e-3 nats (measured <= 2e-4).
"""

from __future__ import annotations

import pytest
import torch

from models.lora import adapter_params, lora_layers
from models.prior import HierarchicalPrior
from models.train.lazy import LazyRowAdamW
from models.train.loop import LAZY_ABOVE, MethodConfig, train_method, uses_lazy_step
from models.train.step import Batch, train_step
from tests.models.train.test_loop import SIZES, _data, _model


def _optimizers(m, prior, lr=1e-2):
    params = adapter_params(m)
    rows = {id(p) for p in adapter_params(m, "task")}
    dense_part = [p for p in params if id(p) not in rows]
    return params, dense_part, LazyRowAdamW([{"params": dense_part}], lora_layers(m), lr=lr, prior=prior)


def _scripted(mode, seq, tau, n=4, lr=1e-2):
    """Run ``seq`` (one list of task slots per step) with the dense AdamW or the lazy step."""
    m, _ = _model(n)
    prior = HierarchicalPrior(m, [10] * n, tau=tau)
    params, dense_part, lazy = _optimizers(m, prior, lr)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if mode == "dense" else lazy
    g = torch.Generator().manual_seed(1)
    for tasks in seq:
        batch = Batch(torch.randint(0, 300, (len(tasks), 12), generator=g), torch.tensor(tasks),
                      torch.full((len(tasks),), 1.0 / len(tasks)))
        step_params = params if mode == "dense" else dense_part + lazy.stage(tasks)
        res = train_step(m, batch, opt, step_params, extra_loss=prior.penalty if tau else None, max_grad_norm=1.0)
        if mode == "lazy":
            lazy.note_clip(1.0 / (res.grad_norm + 1e-6) if res.grad_norm > 1.0 else 1.0)
    if mode == "lazy":
        lazy.flush()
    return [p.detach().clone() for p in params]


def _rel(a, b):
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b))
    return (num / sum(float(x.pow(2).sum()) for x in a)) ** 0.5


def test_a_lazy_step_touches_only_the_rows_of_the_batch():
    m, _ = _model(6)
    prior = HierarchicalPrior(m, [5] * 6, tau=50.0)
    _, dense_part, opt = _optimizers(m, prior)
    with torch.no_grad():  # idle rows with offsets the dense step's prior would pull
        for p in adapter_params(m, "task"):
            p.normal_(0, 0.01)
    before = {n: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for n, l in lora_layers(m).items()}
    moments = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in adapter_params(m, "task")}
    leaves = opt.stage([1, 4])
    assert all(x.shape[0] == 2 for x in leaves)  # the forward and backward see 2 rows, not 6
    full = sum(float(l.lora_A.detach()[[1, 4]].pow(2).sum() + l.lora_B.detach()[[1, 4]].pow(2).sum())
               for l in lora_layers(m).values())
    assert float(prior.penalty().detach()) == pytest.approx(50.0 / (2 * 30) * full, rel=1e-5)  # the staged rows only
    batch = Batch(torch.randint(0, 300, (3, 12)), torch.tensor([4, 1, 4]), torch.full((3,), 1 / 3))
    train_step(m, batch, opt, dense_part + leaves, extra_loss=prior.penalty)
    idle = [0, 2, 3, 5]
    for n, layer in lora_layers(m).items():
        for p, old in ((layer.lora_A, before[n][0]), (layer.lora_B, before[n][1])):
            assert torch.equal(p[idle], old[idle])  # bit-identical
            assert not torch.equal(p[[1, 4]], old[[1, 4]])
            for k, v in opt.state[p].items():
                if v.dim():
                    assert torch.equal(v[idle], moments[id(p)][k][idle])
        assert layer.staged_A is None and layer.router.staged is None  # unstaged after the step


def test_lazy_equals_dense_while_every_task_is_in_every_batch():
    seq = [[0, 1, 2, 3, 1]] * 6
    dense, lazy = _scripted("dense", seq, tau=50.0), _scripted("lazy", seq, tau=50.0)
    for a, b in zip(dense, lazy):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_without_a_prior_idle_rows_are_caught_up_exactly_up_to_eps():
    seq = [[0, 1]] * 3 + [[1, 2]] * 5 + [[0, 1, 3]] * 2
    dense, lazy = _scripted("dense", seq, tau=0.0), _scripted("lazy", seq, tau=0.0)
    assert _rel(dense, lazy) < 2e-3


@pytest.mark.parametrize("tau", [5.0, 50.0])
def test_a_small_flock_trained_lazily_matches_the_dense_step_within_tolerance(tau):
    data = _data([0, 1, 2, 3])
    outs, adapters = {}, {}
    for mode in ("dense", "lazy"):
        m, init = _model(4)
        cfg = MethodConfig("h", "hierarchical", steps=60, batch_size=6, lr=1e-3, seed=0, log_every=100,
                           prior_update=mode)
        outs[mode] = train_method(m, data, cfg, init, prior=HierarchicalPrior(m, SIZES, tau=tau), log=lambda s: None)
        adapters[mode] = [p.detach().clone() for p in adapter_params(m)]
    assert _rel(adapters["dense"], adapters["lazy"]) < 0.1
    for t, nll in outs["dense"]["eval_nll"].items():
        assert outs["lazy"]["eval_nll"][t] == pytest.approx(nll, abs=1e-3)


def test_auto_picks_the_lazy_step_above_the_threshold_and_only_for_task_offsets():
    cfg = MethodConfig("h", "hierarchical", steps=1, batch_size=2, lr=1e-3, seed=0)
    assert not uses_lazy_step(cfg, LAZY_ABOVE) and uses_lazy_step(cfg, LAZY_ABOVE + 1)
    assert not uses_lazy_step(MethodConfig("u", "unified", 1, 2, 1e-3, 0, prior_update="lazy"), 10_000)
    with pytest.raises(ValueError, match="dense, lazy or auto"):
        uses_lazy_step(MethodConfig("h", "hierarchical", 1, 2, 1e-3, 0, prior_update="sparse"), 4)


def test_a_lazy_run_resumes_from_its_checkpoint(tmp_path):
    data = _data([0, 1, 2, 3])

    def run(state_dir):
        m, init = _model(4)
        cfg = MethodConfig("h", "hierarchical", steps=7, batch_size=3, lr=1e-2, seed=0, log_every=100,
                           prior_update="lazy")
        return train_method(m, data, cfg, init, prior=HierarchicalPrior(m, SIZES, tau=50.0), log=lambda s: None,
                            state_dir=state_dir, checkpoint_every=3)

    full = run(tmp_path / "st")  # leaves step 6's (flushed) state on disk
    resumed = run(tmp_path / "st")  # a restarted worker: steps 7 only
    for t, nll in full["eval_nll"].items():
        assert resumed["eval_nll"][t] == pytest.approx(nll, rel=1e-6)
