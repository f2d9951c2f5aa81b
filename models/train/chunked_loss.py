"""Next-token NLL with the fp32 logits one chunk at a time (issue 21, item 7): the loss never upcasts
whole (B, L, V) logits, nor keeps them for backward. :func:`models.train.step.row_nll_sum` calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["token_nll", "CE_CHUNK_ELEMENTS"]

# Model types whose causal-LM head is exactly ``lm_head(last hidden state)`` (no soft-capping,
# logit scale or multiplier): their loss can run the head chunk by chunk from the hidden states.
_PLAIN_HEAD_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gpt2", "gpt_neox", "phi3", "smollm3",
    "olmo", "olmo2", "starcoder2",
})
CE_CHUNK_ELEMENTS = 2**26  # fp32 logits alive at once in the loss: 256 MB (~1.4k tokens at SmolLM2's 49k vocab)


def _chunk_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target, reduction="none", ignore_index=-100)


def _head_chunk_nll(head: nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _chunk_nll(head(hidden), target)


def token_nll(model: nn.Module, input_ids: torch.Tensor, target: torch.Tensor,
              chunk_tokens: int | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token NLL of every position, fp32 (N, L); 0 where ``target`` is -100.

    Why chunks: the fp32 upcast of whole (N, L, V) logits is the largest tensor of a step
    (16 GB at 32k tokens x 128k vocab), and ``log_softmax`` saves another for backward. Here
    the tokens go through the loss ``chunk_tokens`` at a time (default: ``CE_CHUNK_ELEMENTS``
    logits), each chunk under activation checkpointing when there is more than one, so
    backward recomputes its logits instead of keeping them: only one chunk's fp32 logits ever
    exist. The price is one more head matmul per token in backward (the head can be the
    largest matmul of a top-blocks step), paid only by batches over one chunk. For a plain head
    (``_PLAIN_HEAD_TYPES``, head an unadapted linear layer) even the model-dtype logits are
    never whole: the backbone's hidden states go through ``lm_head`` chunk by chunk, and only
    at ``keep`` (flat positions whose target is scored, when the caller knows them: instruction
    rows score their completion only, so the head, the largest matmul of a top-blocks step at
    a 49k vocabulary, skips the prompt and the padding). Per token the arithmetic is the
    unchunked loss's (same head matmul row, same fp32 softmax).
    """
    n, length = input_ids.shape
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, "base_model", None)
    plain = (
        head is not None and backbone is not None and backbone is not model
        and getattr(getattr(model, "config", None), "model_type", None) in _PLAIN_HEAD_TYPES
        and (type(head) is nn.Linear or getattr(head, "is_quantized_linear", False))  # no adapter: no router
    )
    flat_target = target.reshape(-1)
    if plain:
        hidden = backbone(input_ids=input_ids).last_hidden_state.reshape(n * length, -1)
        if keep is not None and len(keep) == 0:
            keep = None  # nothing scored: no gather (the loss is 0 and keeps its graph)
        source = hidden if keep is None else hidden.index_select(0, keep)
        flat_target = flat_target if keep is None else flat_target.index_select(0, keep)
        vocab = head.out_features
    else:
        keep = None  # the model's head ran on every position already
        source = model(input_ids=input_ids).logits.reshape(n * length, -1)
        vocab = source.shape[-1]
    rows = source.shape[0]
    step = chunk_tokens or max(1, CE_CHUNK_ELEMENTS // vocab)
    # One chunk (small batches: SmolLM2 at 8 x 128 tokens) keeps the graph as it was; recomputing
    # costs one more head matmul per token in backward, paid only where the logits are too big.
    recompute = torch.is_grad_enabled() and source.requires_grad and rows > step
    parts = []
    for i in range(0, rows, step):
        args = (source[i : i + step], flat_target[i : i + step])
        fn = (lambda h, t: _head_chunk_nll(head, h, t)) if plain else _chunk_nll
        parts.append(checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args))
    nll = torch.cat(parts)
    if keep is not None:  # back to (N * L) positions, 0 where nothing is scored
        nll = nll.new_zeros(n * length).scatter(0, keep, nll)
    return nll.view(n, length)
