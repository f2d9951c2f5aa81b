"""Every tensor the flock loop hands to a collective lives on the gradients' device (NCCL).

A CPU cannot show a CPU tensor meeting NCCL, so the test emulates the GPU's two memories: a
``TorchFunctionMode`` marks every tensor that a GPU run would hold in host memory (made by a
factory such as ``torch.zeros`` without ``device=``, or computed only from such tensors),
while the parameters, and whatever is made with an explicit ``device=`` or moved with
``.to(device)``, count as device memory. A fake ``torch.distributed`` (two identical workers)
fails on a marked tensor and on one whose device differs from the trainable parameters'.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import models.train.loop as loop
from models.prior import HierarchicalPrior
from tests.models.train.test_loop import SIZES, _cfg, _data, _model

FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.as_tensor, torch.arange,
             torch.linspace, torch.rand, torch.randn, torch.randint, torch.eye, torch.from_numpy}


def _names_a_device(args, kwargs) -> bool:
    return "device" in kwargs or any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args)


class HostTensors(TorchFunctionMode):
    """Marks (``t._host = True``) the tensors that a GPU run would create in host memory."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if not isinstance(out, torch.Tensor):
            return out
        if func in FACTORIES:
            host = kwargs.get("device") is None
        elif name in ("to", "cuda", "cpu") and (name != "to" or _names_a_device(args[1:], kwargs)):
            if out is args[0]:  # a no-op move here is a copy between the two memories on a GPU
                out = out.view_as(out)
            host = name == "cpu"
        elif name.endswith("_") or name.startswith("__set") or name == "to":
            return out  # an in-place op (the target keeps its memory) or a dtype cast
        else:  # an op's result is in host memory when all its tensor inputs are
            tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            host = bool(tensors) and all(getattr(t, "_host", False) for t in tensors)
        if host:
            out._host = True
        return out


class TwoWorkers:
    """``torch.distributed`` for two workers holding the same values; checks each tensor's memory."""

    class ReduceOp:
        SUM, MAX = "sum", "max"

    def __init__(self, device: torch.device):
        self.device, self.seen, self.wrong = device, [], []

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self):
        return 2

    def all_reduce(self, t, op="sum"):
        self.seen.append((tuple(t.shape), op))
        if getattr(t, "_host", False) or t.device != self.device:
            self.wrong.append(f"{tuple(t.shape)} {op}: host memory" if t.device == self.device else str(t.device))
        if op == "sum":
            t.mul_(2)

    def broadcast(self, t, src=0):  # not used today: a new collective is checked all the same
        self.all_reduce(t, "broadcast")

    def all_gather(self, out, t):
        self.all_reduce(t, "all_gather")


def test_the_host_memory_marker_tells_the_two_memories_apart():
    with HostTensors():
        p = torch.nn.Parameter(torch.ones(3, device="cpu"))
        assert getattr(torch.zeros(2), "_host", False) and getattr(torch.zeros(2) + 1, "_host", False)
        assert not getattr(torch.zeros(2, device="cpu"), "_host", False)
        assert not getattr(torch.tensor([1.0]).to("cpu"), "_host", False)
        assert not getattr(p * torch.tensor(2.0), "_host", False)


@pytest.mark.parametrize("kind, prior_update", [("hierarchical", "dense"), ("hierarchical", "lazy"),
                                                ("unified", "dense")])
def test_every_collective_of_a_step_runs_on_the_gradients_device(monkeypatch, kind, prior_update):
    m, init = _model(4)
    prior = HierarchicalPrior(m, SIZES, mode="infer", tau_init=100.0, update_every=2, a=1.0, b=0.01,
                              owned_tasks=[0, 1]) if kind == "hierarchical" else None
    fake = TwoWorkers(next(m.parameters()).device)
    monkeypatch.setattr(loop, "dist", fake)
    with HostTensors():
        out = loop.train_method(m, _data([0, 1]), _cfg(kind, steps=4, prior_update=prior_update), init,
                                prior=prior, log=lambda s: None)
    assert fake.wrong == []
    ops = {op for _, op in fake.seen}
    assert ops == {"sum", "max"}  # Theta's gradient and the clipping norm; the failed-task flags
    assert (len(prior.groups), 2) in {shape for shape, _ in fake.seen} if prior else True  # tau's statistics
    assert all(torch.isfinite(torch.tensor(v)) for v in out["eval_nll"].values())


@pytest.mark.parametrize("helper", ["grad_reducer", "sync_failures", "update_tau"])
def test_each_collective_helper_puts_its_tensor_next_to_the_parameters(monkeypatch, helper):
    """The helpers alone, with the parameters on a device that is not the default for new tensors."""
    m, _ = _model(2)
    fake = TwoWorkers(torch.device("cpu"))
    monkeypatch.setattr(loop, "dist", fake)
    params = [p for p in m.parameters() if p.requires_grad][:3]
    for p in params:
        p.grad = torch.ones_like(p)
    with torch.device("meta"):  # a new tensor without device= lands on meta, not next to the parameters
        if helper == "grad_reducer":
            loop.grad_reducer(params[:1], sync=True)(params)
        elif helper == "sync_failures":
            loop._sync_failures({1}, 2, torch.device("cpu"))
        else:
            prior = HierarchicalPrior(m, [4, 8], mode="infer", tau_init=10.0, update_every=1)
            monkeypatch.setattr(prior, "update_tau", lambda stats, step: None)  # host maths, after the collective
            loop._update_tau(prior, 1, torch.device("cpu"))
    assert fake.seen and fake.wrong == []
