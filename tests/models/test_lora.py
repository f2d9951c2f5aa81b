"""The multi-task LoRA layer against reference computations."""

from __future__ import annotations

import pytest
import torch

from models.lora import (
    LoraTargetError,
    MultiTaskLoraLinear,
    TaskRouter,
    adapter_params,
    inject,
    lora_layers,
    set_trainable,
    task_ids,
)


def _randomise(model, std=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (layer.lora_A, layer.lora_B, layer.lora_A_shared, layer.lora_B_shared):
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
def test_batched_forward_equals_loop_of_single_adapters(model_name, request):
    model = request.getfixturevalue(model_name)
    targets = ["q_proj", "v_proj", "down_proj"] if model_name == "tiny_llama" else ["c_attn", "c_fc"]
    inject(model, targets, num_tasks=4, rank=[4, 2, 3, 4], alpha=8.0)
    _randomise(model)
    x = torch.randint(0, 300, (6, 12))
    ids = torch.tensor([3, 0, 2, 1, 0, 3])
    with torch.no_grad(), task_ids(model, ids):
        batched = model(input_ids=x).logits
    for row in range(len(x)):
        with torch.no_grad(), task_ids(model, int(ids[row])):
            single = model(input_ids=x[row : row + 1]).logits
        torch.testing.assert_close(batched[row : row + 1], single, atol=1e-5, rtol=1e-5)


def test_layer_matches_explicit_formula_with_heterogeneous_ranks():
    torch.manual_seed(0)
    base = torch.nn.Linear(10, 7)
    layer = MultiTaskLoraLinear(base, 3, [1, 3, 2], alpha=6.0, dropout=0.0, router=TaskRouter())
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.lora_A_shared, layer.lora_B_shared):
            p.normal_()
    x = torch.randn(3, 5, 10)
    layer.router.ids = torch.tensor([0, 1, 2])
    y = layer(x)
    for t, r in enumerate([1, 3, 2]):
        a = (layer.lora_A_shared + layer.lora_A[t])[:r]
        b = (layer.lora_B_shared + layer.lora_B[t])[:, :r]
        ref = base(x[t]) + (6.0 / r) * x[t] @ a.T @ b.T
        torch.testing.assert_close(y[t], ref, atol=1e-5, rtol=1e-5)


def test_a_task_loss_changes_no_other_task_adapter(tiny_llama):
    inject(tiny_llama, ["q_proj", "v_proj"], num_tasks=3, rank=4, alpha=8.0)
    set_trainable(tiny_llama, shared=False, task=True)
    _randomise(tiny_llama)
    x = torch.randint(0, 300, (2, 8))
    with task_ids(tiny_llama, torch.tensor([1, 1])):
        tiny_llama(input_ids=x).logits.sum().backward()
    for layer in lora_layers(tiny_llama).values():
        for p in (layer.lora_A, layer.lora_B):
            assert p.grad[1].abs().sum() > 0
            assert p.grad[0].abs().sum() == 0 and p.grad[2].abs().sum() == 0


def test_rank_mask_blocks_unused_components():
    layer = MultiTaskLoraLinear(torch.nn.Linear(8, 8), 2, [2, 4], 4.0, 0.0, TaskRouter())
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_A.normal_()
    layer.router.ids = torch.tensor([0])
    layer(torch.randn(1, 3, 8)).sum().backward()
    assert layer.lora_A.grad[0, 2:].abs().sum() == 0  # beyond task 0's rank: no signal
    assert layer.lora_A.grad[0, :2].abs().sum() > 0


def test_merge_unmerge_roundtrip(tiny_llama):
    inject(tiny_llama, ["q_proj", "o_proj"], num_tasks=2, rank=4, alpha=8.0)
    _randomise(tiny_llama)
    x = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        with task_ids(tiny_llama, 1):
            ref = tiny_llama(input_ids=x).logits
        w0 = {n: l.base_layer.weight.clone() for n, l in lora_layers(tiny_llama).items()}
        for l in lora_layers(tiny_llama).values():
            l.merge(1)
        merged = tiny_llama(input_ids=x).logits
        for l in lora_layers(tiny_llama).values():
            l.unmerge()
    torch.testing.assert_close(merged, ref, atol=1e-5, rtol=1e-5)
    for n, l in lora_layers(tiny_llama).items():
        torch.testing.assert_close(l.base_layer.weight, w0[n], atol=1e-6, rtol=0)


def test_inject_errors_name_the_problem(tiny_llama):
    with pytest.raises(LoraTargetError, match="match no layer.*q_proj"):
        inject(tiny_llama, ["nonexistent"], num_tasks=2, rank=4, alpha=8.0)
    with pytest.raises(LoraTargetError, match="rank 1000 does not fit"):
        inject(tiny_llama, ["q_proj"], num_tasks=2, rank=1000, alpha=8.0)


def test_only_adapters_train_and_top_layers_selection(tiny_llama):
    names = inject(tiny_llama, ["q_proj"], num_tasks=2, rank=2, alpha=4.0, layers=[1])
    assert names == ["model.layers.1.self_attn.q_proj"]
    trainable = {id(p) for p in tiny_llama.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_params(tiny_llama)}
