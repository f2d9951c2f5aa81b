"""Chunked cross-entropy (issue 21, item 7): same loss and gradients as the whole-logits loss, less memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.lora import adapter_params, inject, task_ids
from models.train.step import Batch, row_nll_sum


def _reference(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss as it was: whole (N, L, V) logits upcast to fp32 at once."""
    ids = batch.task_ids
    with task_ids(model, ids):
        logits = model(input_ids=batch.input_ids).logits
    nxt = batch.input_ids[:, 1:]
    if batch.scored is not None:
        nxt = nxt.masked_fill(~batch.scored[:, 1:], -100)
    target = F.pad(nxt, (0, 1), value=-100)
    n, length = batch.input_ids.shape
    nll = F.cross_entropy(logits.reshape(n * length, -1).float(), target.reshape(-1), reduction="none",
                          ignore_index=-100)
    return nll.view(n, length).sum(1), (target != -100).sum(1)


def _batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 300, (4, 12), generator=g)
    scored = torch.rand(4, 12, generator=g) > 0.3
    scored[:, 0] = False
    return Batch(x, torch.tensor([0, 1, 1, 0]), torch.full((4,), 0.25), scored=scored)


def _grads(model, fn) -> list[torch.Tensor]:
    params = adapter_params(model)
    for p in params:
        p.grad = None
    total, _ = fn()
    total.sum().backward()
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("chunk", [5, 7, 10_000])  # uneven chunks, one chunk
def test_chunked_loss_and_grads_equal_the_whole_logits_loss(model_name, chunk, request):
    model = request.getfixturevalue(model_name)
    inject(model, ["q_proj", "v_proj", "c_attn"] if model_name == "tiny_llama" else ["c_attn"], num_tasks=2,
           rank=4, alpha=8.0)
    with torch.no_grad():
        for p in adapter_params(model):
            p.normal_(0, 0.05)  # B != 0: adapters change the loss, so the grads are compared for real
    batch = _batch()
    got, count = row_nll_sum(model, batch, chunk_tokens=chunk)
    ref, ref_count = _reference(model, batch)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(count, ref_count)
    g_chunk = _grads(model, lambda: row_nll_sum(model, batch, chunk_tokens=chunk))
    g_ref = _grads(model, lambda: _reference(model, batch))
    for a, b in zip(g_chunk, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # fp32 sums in another order (head on scored rows)


def test_adapted_head_takes_the_logits_path_with_the_same_result(tiny_llama):
    """A LoRA on lm_head routes per task: the loss then chunks the model's logits, still exact."""
    inject(tiny_llama, ["q_proj", "lm_head"], num_tasks=2, rank=4, alpha=8.0)
    with torch.no_grad():
        for p in adapter_params(tiny_llama):
            p.normal_(0, 0.05)
    batch = _batch()
    got, _ = row_nll_sum(tiny_llama, batch, chunk_tokens=6)
    torch.testing.assert_close(got, _reference(tiny_llama, batch)[0], rtol=1e-6, atol=1e-6)
    g_chunk = _grads(tiny_llama, lambda: row_nll_sum(tiny_llama, batch, chunk_tokens=6))
    g_ref = _grads(tiny_llama, lambda: _reference(tiny_llama, batch))
    for a, b in zip(g_chunk, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # fp32 sums in another order (head on scored rows)


def _largest_saved_fp32_logits(fn, vocab: int = 300) -> int:
    """Elements of the largest fp32 (..., vocab) tensor the autograd graph of ``fn()`` saves for backward."""
    sizes: list[int] = [0]

    def pack(t: torch.Tensor):
        if t.dtype == torch.float32 and t.dim() and t.shape[-1] == vocab:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total, _ = fn()
    total.sum().backward()
    return max(sizes)


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
def test_no_whole_fp32_logits_are_saved_for_backward(model_name, request):
    model = request.getfixturevalue(model_name)
    inject(model, ["v_proj", "c_attn"] if model_name == "tiny_llama" else ["c_attn"], num_tasks=2, rank=2,
           alpha=4.0)
    batch = _batch()
    n, length = batch.input_ids.shape
    whole = n * length * 300  # fp32 logits of the batch
    assert _largest_saved_fp32_logits(lambda: _reference(model, batch)) >= whole  # the old loss keeps them: could fail
    assert _largest_saved_fp32_logits(lambda: row_nll_sum(model, batch, chunk_tokens=8)) <= 8 * 300
