"""Export of gated models: the smaller dense model gives the gated model's eval logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.base import load_base
from models.gates.export import GateExportError, export_pruned, pruned_shapes, strip_adapters
from models.gates.layer import gate_layers, inject_gates, sparsity_report
from models.lora import adapter_params, inject, lora_layers, task_ids
from models.peft_io import load_adapter, save_adapter

TINY = {
    "llama": {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 64,
    },
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 300, "n_positions": 64},
}
# (LoRA targets, MLP producers, MLP consumer, attention layer gated fold-only)
NAMES = {
    "llama": (["q_proj", "up_proj", "down_proj"], ["gate_proj", "up_proj"], "down_proj", "o_proj"),
    "gpt2": (["c_attn", "c_fc", "mlp.c_proj"], ["c_fc"], "mlp.c_proj", "attn.c_proj"),
}
INTERMEDIATE = {"llama": 96, "gpt2": 256}
IDS = torch.randint(0, 300, (3, 10), generator=torch.Generator().manual_seed(0))


def _gated_model(arch: str, scope: str = "shared", num_tasks: int = 2) -> tuple[nn.Module, dict[int, set[int]]]:
    """Tiny model with LoRA + gates; gates set to closed on known channels, partial elsewhere.

    Returns the model and, per block, the intermediate channels that must be removed.
    """
    model = load_base(random_init=TINY[arch])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # HF initialises biases to 0, which would hide bias folding errors
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lora_targets, producers, consumer, attn = NAMES[arch]
    inject(model, lora_targets, num_tasks=num_tasks, rank=4, alpha=8.0)
    with torch.no_grad():
        for p in adapter_params(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    inject_gates(model, [*producers, consumer, attn], scope=scope, num_tasks=num_tasks)
    closed: dict[int, set[int]] = {}
    with torch.no_grad():
        for name, layer in gate_layers(model).items():
            for p in (layer.theta_rows, layer.theta_cols):
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 - 0.5)  # tanh > -0.47: partial or open
            block = int(name.split(".")[2])
            leaf = name.split(".", 3)[3]
            if leaf.endswith(producers[0]):  # close rows 0-9 (+ 30-34 on the last producer)
                layer.theta_rows[:, :10] = -3.0
                closed.setdefault(block, set()).update(range(10))
            if leaf.endswith(producers[-1]):
                layer.theta_rows[:, 30:35] = -3.0
                closed.setdefault(block, set()).update(range(30, 35))
            if leaf.endswith(consumer):
                layer.theta_cols[:, 50:60] = -3.0  # intermediate columns: removable
                layer.theta_rows[:, :3] = -3.0  # hidden rows: folded (zero), not removed
                closed.setdefault(block, set()).update(range(50, 60))
            if leaf.endswith(attn) or leaf.endswith(producers[0]):
                layer.theta_cols[:, 5:8] = -3.0  # hidden / head inputs: fold only
    return model, closed


def _logits(model: nn.Module, task: int) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), task_ids(model, task):
        return model(input_ids=IDS).logits


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_gives_gated_eval_logits_with_smaller_model(arch: str, tmp_path) -> None:
    gated, closed = _gated_model(arch)
    expect = {t: _logits(gated, t) for t in range(2)}
    pruned = export_pruned(gated)
    assert not gate_layers(pruned) and gate_layers(gated)  # a copy; the original keeps its gates
    for t in range(2):
        assert torch.allclose(_logits(pruned, t), expect[t], atol=1e-5)
    _, producers, consumer, _ = NAMES[arch]
    shapes = pruned_shapes(pruned)
    for block, gone in closed.items():
        width = INTERMEDIATE[arch] - len(gone)
        mlp = f"{'model.layers' if arch == 'llama' else 'transformer.h'}.{block}.mlp"
        cons = consumer.split(".")[-1]
        assert shapes[f"{mlp}.{cons}.base_layer"][1] == width
        for prod in producers:
            key = f"{mlp}.{prod}.base_layer" if f"{mlp}.{prod}.base_layer" in shapes else f"{mlp}.{prod}"
            assert shapes[key][0] == width
    plain_gated = _n_params(strip_adapters(export_pruned(gated)))
    base = load_base(random_init=TINY[arch])
    assert plain_gated < _n_params(base)
    assert plain_gated == _n_params(base) - sum(len(c) for c in closed.values()) * 64 * (len(producers) + 1) - (
        sum(len(c) for c in closed.values()) * (len(producers) if arch == "gpt2" else 0)  # c_fc bias
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exported_adapters_round_trip_on_plain_pruned_model(arch: str, tmp_path) -> None:
    gated, _ = _gated_model(arch)
    pruned = export_pruned(gated)
    names = list(lora_layers(pruned))
    for t in range(2):
        save_adapter(pruned, t, tmp_path / f"task{t}")
    expect = {t: _logits(pruned, t) for t in range(2)}
    plain = strip_adapters(pruned)
    assert type(plain) is type(load_base(random_init=TINY[arch]))
    assert not lora_layers(plain)
    inject(plain, names, num_tasks=2, rank=4, alpha=8.0)
    for t in range(2):
        load_adapter(plain, t, tmp_path / f"task{t}")
        assert torch.allclose(_logits(plain, t), expect[t], atol=1e-5)


def test_task_scope_export_serves_one_task() -> None:
    gated, _ = _gated_model("llama", scope="task", num_tasks=2)
    with torch.no_grad():  # task 1 closes extra channels of its own
        gate_layers(gated)["model.layers.0.mlp.up_proj"].theta_rows[1, 60:70] = -3.0
    with pytest.raises(GateExportError, match="task="):
        export_pruned(gated)
    for t in range(2):
        pruned = export_pruned(gated, task=t)
        assert torch.allclose(_logits(pruned, t), _logits(gated, t), atol=1e-5)
    w0 = export_pruned(gated, task=0).get_submodule("model.layers.0.mlp.down_proj.base_layer").weight.shape[1]
    w1 = export_pruned(gated, task=1).get_submodule("model.layers.0.mlp.down_proj.base_layer").weight.shape[1]
    assert w0 - w1 == 10


def test_inplace_export_and_report_agree_on_mlp_only_gates() -> None:
    model = load_base(random_init=TINY["llama"])
    inject_gates(model, ["gate_proj", "up_proj"], gate_cols=False)
    inject_gates(model, ["down_proj"], gate_rows=False)
    with torch.no_grad():
        for layer in gate_layers(model).values():
            p = layer.theta_rows if layer.theta_rows is not None else layer.theta_cols
            p[:, :24] = -3.0  # the same 24 of 96 channels everywhere
    removed = sparsity_report(model)["removed_fraction"]
    expect = _logits(model, 0)
    same = export_pruned(model, inplace=True)
    assert same is model and not gate_layers(model)
    assert torch.allclose(_logits(model, 0), expect, atol=1e-5)
    mlp_weights = 2 * 3 * 96 * 64  # 2 blocks x 3 projections
    assert removed == pytest.approx(24 / 96)
    base = _n_params(load_base(random_init=TINY["llama"]))
    assert _n_params(model) == base - int(removed * mlp_weights)  # physically gone, as reported
