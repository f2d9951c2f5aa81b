"""Host-device syncs of the flock loop (issue 21, item 6): none per step on the dense path.

A CPU cannot time a sync, so the test counts the calls that would be one on a GPU: every
read of a tensor's value into Python (``item``, ``tolist``, ``bool``/``float``/``int`` of a
tensor, ``nonzero``). Training 4 and 12 steps with the same read points (first and last step,
no log, eval or checkpoint in between) must read equally often: the reads do not grow with steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from models.prior import HierarchicalPrior
from models.train.loop import train_method
from tests.models.train.test_collective_device import HostTensors
from tests.models.train.test_loop import SIZES, _cfg, _data, _model

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero"}
ROOT = str(Path(__file__).resolve().parents[3])


def _ours(filename: str) -> bool:
    """Whether ``filename`` is the project's own code (a venv inside the checkout, as ``make`` makes, is not)."""
    return filename.startswith(ROOT) and "site-packages" not in filename


class CountReads(HostTensors):
    """Counts the reads of device memory made by the project's own code (its caller's file is here).

    Left out: tensors a GPU run keeps in host memory (``HostTensors`` marks them: e.g. the
    optimizers' ``step`` counters, read on the host at no sync) and the model's own code
    (transformers' mask builder reads once per forward; not ours to change).
    """

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (getattr(func, "__name__", "") in READS and args and not getattr(args[0], "_host", False)
                and _ours(sys._getframe(1).f_code.co_filename)):
            self.n += 1
        return super().__torch_function__(func, types, args, kwargs)


def _reads(kind: str, steps: int, prior_update: str = "dense") -> int:
    m, init = _model(4)
    prior = HierarchicalPrior(m, SIZES, tau=50.0) if kind == "hierarchical" else None
    counter = CountReads()
    with counter:
        train_method(m, _data([0, 1, 2, 3]), _cfg(kind, steps=steps, prior_update=prior_update), init, prior=prior,
                     log=lambda s: None)
    return counter.n


@pytest.mark.parametrize("kind", ["hierarchical", "independent", "unified"])
def test_dense_steps_read_nothing_back(kind):
    assert _reads(kind, 12) == _reads(kind, 4)


def test_lazy_steps_read_only_the_gradient_norm():
    """The lazy step's closed-form catch-up needs each step's clip factor on the host: one read a step."""
    per_step = (_reads("hierarchical", 12, "lazy") - _reads("hierarchical", 4, "lazy")) / 8
    assert per_step <= 1


def test_a_task_diverging_mid_run_is_stopped_at_the_next_read_point_and_poisons_nothing():
    from dataclasses import replace

    import torch

    from models.lora import lora_layers
    from models.train.hooks import TrainHooks

    m, init = _model(4)

    def poison(step: int) -> None:
        if step == 3:  # task 2's offsets diverge mid-run (the flags are read at step 5, the first log)
            with torch.no_grad():
                for layer in lora_layers(m).values():
                    layer.lora_A[2].fill_(float("nan"))

    logs = []
    cfg = replace(_cfg("hierarchical", steps=8), log_every=5)
    out = train_method(m, _data([0, 1, 2, 3]), cfg, init, prior=HierarchicalPrior(m, SIZES, tau=50.0),
                       log=logs.append, hooks=TrainHooks(on_step=poison))
    assert list(out["failed"]) == [2] and "step 5" in out["failed"][2]
    for layer in lora_layers(m).values():  # Theta and every other task stayed finite: zeroed grads, not NaN
        assert torch.isfinite(layer.lora_A_shared).all() and torch.isfinite(layer.lora_B_shared).all()
        assert torch.isfinite(layer.lora_A).all() and torch.isfinite(layer.lora_B).all()  # task 2 reset to 0
    assert set(out["eval_nll"]) == {0, 1, 3} and all(v == v for v in out["eval_nll"].values())
