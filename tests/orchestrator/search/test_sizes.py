"""A gated trial's deployed size is what the export really keeps: producer rows and heads included."""

from __future__ import annotations

import math

import torch

from models.base import load_base
from models.gates.export import export_pruned, strip_adapters
from models.gates.heads import inject_head_gates
from models.gates.layer import gate_layers, gate_params, inject_gates
from models.gates.schedule import harden
from models.lora import inject, lora_layers
from orchestrator.search.sizes import deployed_bytes
from tests.models.gates.test_heads import TINY


def _gated(seed: int) -> torch.nn.Module:
    model = load_base(random_init=TINY)
    inject(model, ["q_proj", "o_proj", "up_proj", "down_proj"], num_tasks=2, rank=4, alpha=8.0)
    inject_gates(model, ["down_proj"], gate_rows=False)
    inject_head_gates(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gate_params(model):
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_deployed_bytes_equal_the_exported_model_and_the_goal_equals_the_hardened_size() -> None:
    target = 1 / 3  # 43 of 128 channels (round(42.7)) and 1 of the 3 heads under each KV head
    model = _gated(0)
    goal = deployed_bytes(model, keep=1 - target)["model_bytes"]
    harden(model, target)
    got = deployed_bytes(model)
    assert got["model_bytes"] == goal
    pruned = export_pruned(model)
    adapters = sum(2 * r * (layer.in_features + layer.out_features)
                   for layer in lora_layers(pruned).values() for r in layer.ranks)
    masks = sum(math.ceil(m.out_features / 8) + math.ceil(m.in_features / 8) for m in gate_layers(model).values())
    weights = 2 * sum(p.numel() for p in strip_adapters(pruned).parameters())
    assert got["adapter_bytes"] == adapters and got["mask_bytes"] == masks
    assert got["model_bytes"] == weights + adapters + masks
