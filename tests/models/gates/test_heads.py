"""Attention-head gates: the gated forward, equal-per-KV-head hardening, and the export that drops heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from models.base import load_base
from models.gates.export import export_pruned, load_pruned, save_pruned, strip_adapters
from models.gates.heads import attention_modules, head_counts, inject_head_gates
from models.gates.layer import GateConfigError, gate_layers, inject_gates, sparsity_report
from models.gates.schedule import harden, importance_scores, init_from_importance
from models.lora import adapter_params, inject, lora_layers, task_ids
from models.peft_io import load_adapter, save_adapter

# 6 query heads of 16 over 2 KV heads: 3 query heads per KV head
TINY = {
    "model_type": "llama", "hidden_size": 96, "intermediate_size": 128, "num_hidden_layers": 3,
    "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 64,
}
IDS = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(0))
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(layers: list[int] | None = None, num_tasks: int = 2) -> nn.Module:
    """LoRA on every projection (non-zero B), MLP channel gates and head gates, all open."""
    model = load_base(random_init=TINY)
    inject(model, PROJ, num_tasks=num_tasks, rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_params(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    inject_gates(model, ["down_proj"], gate_rows=False, layers=layers)
    inject_head_gates(model, layers=layers)
    return model


def _logits(model: nn.Module, task: int) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), task_ids(model, task):
        return model(input_ids=IDS).logits


def _head_layer(model: nn.Module, block: int):
    return gate_layers(model)[f"model.layers.{block}.self_attn.o_proj"]


def test_a_closed_head_gate_zeroes_exactly_that_heads_output() -> None:
    model = _model()
    layer = _head_layer(model, 0)
    assert layer.theta_cols.shape == (1, 6) and layer.col_group == 16 and layer.col_bundles == 2
    with torch.no_grad():
        layer.theta_cols[0, 4] = -3.0  # head 4 closed
    x = torch.randn(2, 5, 96)
    layer.eval()
    with task_ids(model, 0):
        got = layer(x)
        ref_x = x.clone()
        ref_x[..., 64:80] = 0.0  # head 4's 16 inputs
        ref = layer.inner(ref_x)
    assert torch.allclose(got, ref, atol=1e-6)
    _, cols = layer.eval_gates()
    assert cols.shape == (1, 96) and (cols[0, 64:80] == 0).all() and (cols[0, :64] == 1).all()


def test_harden_closes_the_same_count_of_heads_under_every_kv_head() -> None:
    model = _model()
    with torch.no_grad():
        for block in range(3):  # lowest thetas: heads 0 and 1 (both in KV head 0's bundle) and 5
            _head_layer(model, block).theta_cols.copy_(torch.tensor([[0.1, 0.2, 5.0, 4.0, 3.0, 0.3]]))
    harden(model, target=0.34)
    for block in range(3):
        mask = _head_layer(model, block).hard_cols[0]
        # one of 3 per KV head: head 0 (not 1, whose bundle already lost one) and head 5
        assert mask.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    harden(model, target=0.9)  # never a whole bundle
    assert (_head_layer(model, 0).hard_cols.view(2, 3).sum(1) == 1).all()


@pytest.mark.parametrize("layers", [None, [1, 2]])
def test_export_drops_closed_heads_and_gives_the_gated_logits(layers, tmp_path) -> None:
    model = _model(layers)
    with torch.no_grad():
        for layer in gate_layers(model).values():
            if layer.col_group > 1:
                layer.theta_cols.copy_(torch.tensor([[2.0, -3.0, 2.0, 2.0, 2.0, -3.0]]))  # heads 1, 5 closed
            else:
                layer.theta_cols[:, :32] = -3.0  # 32 of 128 MLP channels
    harden(model, target=0.25)  # 32 channels; round(0.75) = 1 head per KV head
    expect = {t: _logits(model, t) for t in range(2)}
    report = sparsity_report(model)
    pruned = export_pruned(model)
    for t in range(2):
        assert torch.allclose(_logits(pruned, t), expect[t], atol=1e-5)
    gated_blocks = [0, 1, 2] if layers is None else layers
    assert head_counts(pruned) == [4 if b in gated_blocks else 6 for b in range(3)]
    for b, attn in enumerate(attention_modules(pruned).values()):
        assert attn.num_key_value_groups == (2 if b in gated_blocks else 3)
    o_proj = report["layers"][f"model.layers.{gated_blocks[0]}.self_attn.o_proj"]
    assert o_proj["cols_kept"] == 64 and o_proj["removed_fraction"] == pytest.approx(2 / 6)
    # the adapters travel: PEFT-format files load onto the plain pruned model and give the same logits
    for t in range(2):
        save_adapter(pruned, t, tmp_path / f"task{t}")
    names = list(lora_layers(pruned))
    plain = strip_adapters(pruned)
    base = load_base(random_init=TINY)
    removed = len(gated_blocks) * (2 * 16 * 96 * 2 + 32 * 96 * 3)  # q rows + o cols, 3 MLP matrices
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in base.parameters()) - removed
    save_pruned(plain, tmp_path / "model")
    loaded = load_pruned(tmp_path / "model")
    assert head_counts(loaded) == head_counts(plain)
    if layers is None:  # one head count and one MLP width: transformers alone loads it
        direct = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
        assert direct.config.num_attention_heads == 4 and direct.config.head_dim == 16
        assert torch.allclose(direct(input_ids=IDS).logits, plain(input_ids=IDS).logits, atol=1e-5)
    inject(loaded, names, num_tasks=2, rank=4, alpha=8.0)
    for t in range(2):
        load_adapter(loaded, t, tmp_path / f"task{t}")
        assert torch.allclose(_logits(loaded, t), expect[t], atol=1e-5)


def test_unequal_heads_per_kv_head_are_folded_not_removed() -> None:
    model = _model()
    with torch.no_grad():
        _head_layer(model, 0).theta_cols.copy_(torch.tensor([[-3.0, -3.0, 2.0, 2.0, 2.0, 2.0]]))  # 2 vs 0
    expect = _logits(model, 0)
    pruned = export_pruned(model)
    assert head_counts(pruned)[0] == 6
    assert torch.allclose(_logits(pruned, 0), expect, atol=1e-5)


def test_head_importance_scores_one_value_per_head() -> None:
    model = _model()

    def forward() -> torch.Tensor:
        with task_ids(model, 0):
            return model(input_ids=IDS).logits.float().logsumexp(-1).mean()

    for kind in ("magnitude", "taylor"):
        scores = importance_scores(model, forward, kind)
        head = scores["model.layers.0.self_attn.o_proj"]["cols"]
        assert head.shape == (6,) and (head > 0).all()
    init_from_importance(model, scores)
    theta = _head_layer(model, 0).theta_cols[0]
    assert torch.equal(torch.argsort(theta), torch.argsort(head))


def test_head_gates_refuse_a_gated_o_proj_and_gpt2() -> None:
    model = load_base(random_init=TINY)
    inject_gates(model, ["o_proj"])
    with pytest.raises(GateConfigError, match="leave o_proj out"):
        inject_head_gates(model)
    gpt2 = load_base(random_init={"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 300,
                                  "n_positions": 64})
    with pytest.raises(GateConfigError, match="gates.heads"):
        inject_head_gates(gpt2)


def test_task_scope_head_gates_export_each_tasks_own_heads() -> None:
    model = load_base(random_init=TINY)
    inject(model, PROJ, num_tasks=2, rank=4, alpha=8.0)
    with torch.no_grad():
        for p in adapter_params(model):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.2)
    inject_head_gates(model, scope="task", num_tasks=2)
    with torch.no_grad():
        for layer in gate_layers(model).values():
            layer.theta_cols.copy_(torch.tensor([[0.1, 2.0, 2.0, 2.0, 2.0, 0.1],     # task 0: heads 0 and 5
                                                 [2.0, 2.0, 0.1, 0.1, 2.0, 2.0]]))   # task 1: heads 2 and 3
    harden(model, target=0.34)
    for t, kept in ((0, [1, 2, 3, 4]), (1, [0, 1, 4, 5])):
        expect = _logits(model, t)
        pruned = export_pruned(model, task=t)
        assert torch.allclose(_logits(pruned, t), expect, atol=1e-5) and head_counts(pruned) == [4, 4, 4]
        ref = load_base(random_init=TINY).model.layers[0].self_attn.o_proj.weight
        cols = torch.cat([torch.arange(h * 16, h * 16 + 16) for h in kept])
        assert torch.equal(pruned.model.layers[0].self_attn.o_proj.base_layer.weight, ref[:, cols])
