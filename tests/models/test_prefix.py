"""The frozen-prefix cache gives exactly the full model's outputs (Llama and GPT-2)."""

from __future__ import annotations

import pytest
import torch

from models.lora import inject, lora_layers, task_ids
from models.prefix import compute_prefix, use_prefix


@pytest.mark.parametrize(
    "model_name,targets", [("tiny_llama", ["q_proj", "down_proj"]), ("tiny_gpt2", ["c_attn", "c_fc"])]
)
def test_prefix_cache_is_exact(model_name, targets, request):
    model = request.getfixturevalue(model_name)
    inject(model, targets, num_tasks=2, rank=4, alpha=8.0, layers=[1])
    with torch.no_grad():
        for l in lora_layers(model).values():
            l.lora_B.normal_(std=0.1)
    x = torch.randint(0, 300, (5, 16))
    ids = torch.tensor([0, 1, 1, 0, 1])
    hidden = compute_prefix(model, x, split=1, batch_size=2)
    assert hidden.shape == (5, 16, 64)
    with torch.no_grad(), task_ids(model, ids):
        full = model(input_ids=x).logits
        with use_prefix(model, 1, hidden):
            cached = model(input_ids=x).logits
        again = model(input_ids=x).logits  # the context restores the lower blocks
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, full, atol=0, rtol=0)


def test_prefix_backward_reaches_top_adapters_only(tiny_llama):
    inject(tiny_llama, ["q_proj"], num_tasks=1, rank=2, alpha=4.0, layers=[1])
    x = torch.randint(0, 300, (2, 8))
    hidden = compute_prefix(tiny_llama, x, split=1)
    with use_prefix(tiny_llama, 1, hidden), task_ids(tiny_llama, 0):
        tiny_llama(input_ids=x).logits.pow(2).mean().backward()
    (layer,) = lora_layers(tiny_llama).values()
    assert layer.lora_A_shared.grad is not None
