"""Frozen-prefix activation cache: run the lower, un-adapted blocks once for all tasks.

When adapters sit only on the top blocks, everything below them is a fixed function of the
input tokens. We run it once per sequence, keep the hidden states entering the first adapted
block, and from then on every step and every method (hierarchical, baselines, Tune trials)
runs only the top blocks + head. The result is exact (same loss to float precision).

Works by swapping the lower blocks for pass-through modules and feeding the cached states
into the first kept block through a forward pre-hook, so the model's own code still builds
rotary embeddings, masks and position embeddings (Llama, GPT-2, ... alike).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from models.base import adaptable_layers

__all__ = ["compute_prefix", "use_prefix"]


class _Stop(Exception):
    pass


class _PassThrough(nn.Module):
    """Stands in for a skipped block: returns its hidden-state input unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@torch.no_grad()
def compute_prefix(model: nn.Module, input_ids: torch.Tensor, split: int, batch_size: int = 16) -> torch.Tensor:
    """Hidden states entering block ``split`` for every row of ``input_ids``: (N, L, H).

    Stops the forward there (the upper blocks and the head are never run).
    """
    _, blocks = adaptable_layers(model)
    if not 0 < split < len(blocks):
        raise ValueError(f"prefix split {split} must be inside 1..{len(blocks) - 1}")
    captured: list[torch.Tensor] = []

    def grab(_mod, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        captured.append(hs.detach().clone())
        raise _Stop

    handle = blocks[split].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, len(input_ids), batch_size):
            try:
                model(input_ids=input_ids[i : i + batch_size])
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(captured)


@contextmanager
def use_prefix(model: nn.Module, split: int, hidden: torch.Tensor) -> Iterator[None]:
    """Within the block, ``model(input_ids=...)`` starts at block ``split`` from ``hidden``.

    ``input_ids`` must be the rows ``hidden`` was computed from (they still drive the
    position ids and masks); the lower blocks are skipped.
    """
    _, blocks = adaptable_layers(model)
    saved = [blocks[i] for i in range(split)]

    def feed(_mod, args, kwargs):
        if args:
            return (hidden.to(args[0].dtype),) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = hidden.to(kwargs["hidden_states"].dtype)
        return args, kwargs

    for i in range(split):
        blocks[i] = _PassThrough()
    handle = blocks[split].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for i, blk in enumerate(saved):
            blocks[i] = blk
