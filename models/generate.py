"""Batched multi-task generation and label scoring: many tasks' rows in one pass, each through its slot.

Every row carries its task's adapter slot. Around the whole ``transformers`` ``generate``
call the model's :class:`~models.lora.TaskRouter` holds the batch's per-row slots, so each
forward (the prompt, then one token at a time with the KV cache) sends row ``i`` through
slot ``slots[i]``: greedy search on a fixed batch (no beams, no sampling) never reorders or
drops rows, so the routing stays right for every step. What follows the router (LoRA,
eigen-coefficient adapters, task-scope gates, the MoE's bookkeeping) works unchanged, on a
dense, quantised or pruned base.

Prompts are left-padded with an attention mask; ``generate`` derives each row's position
ids from the mask (``cumsum - 1``), so a padded row sees the positions it would see alone.
A row stops at any of ``stop_ids`` (EOS, a chat template's end of turn) or, with a
tokenizer, at any of ``stop`` strings (``transformers``' ``StopStringCriteria``); finished
rows are padded until the whole batch is done.

:func:`score_choices` ranks a fixed label set by log-likelihood instead of generating: each
(prompt, label) pair is one left-padded row, so every label sits at the end of its row and
only the last ``max label length + 1`` positions need logits (``logits_to_keep``).

Model code only: torch + transformers, no Ray.

Example:
    >>> out = generate(model, [[5, 6, 7], [8, 9]], slots=[0, 3], pad_id=2, stop_ids=[2], max_new_tokens=16)
    >>> out.ids[1]  # the tokens row 1 generated through slot 3, stop token excluded
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.lora import task_ids

__all__ = ["Generations", "generate", "score_choices", "left_pad"]


@dataclass
class Generations:
    """What :func:`generate` produced, one entry per prompt, in the prompts' order.

    Attributes:
        ids: generated token ids, up to (not including) the first stop id.
        texts: ``ids`` decoded without special tokens and cut before the first stop string
            (``None`` without a tokenizer).
    """

    ids: list[list[int]]
    texts: list[str] | None = None


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, max len), every sequence flush right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def _route(slots: Sequence[int], device) -> torch.Tensor | int:
    """One int when every row has the same slot (the layers' no-gather path), else a (B,) tensor."""
    return int(slots[0]) if len(set(slots)) == 1 else torch.as_tensor(list(slots), dtype=torch.long, device=device)


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped by similar length (longest first), ``batch_size`` at a time: less padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _device(model: nn.Module) -> torch.device:
    return next(iter([*model.parameters(), *model.buffers()])).device


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(hits)] if hits else text


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    slots: Sequence[int] | int,
    pad_id: int,
    stop_ids: Sequence[int],
    max_new_tokens: int = 64,
    stop: Sequence[str] = (),
    tokenizer=None,
    batch_size: int = 16,
) -> Generations:
    """Greedy generations for a mixed batch of tasks, each row through its own adapter slot.

    Args:
        model: a ``transformers`` causal LM, with or without injected adapters (a plain base
            ignores ``slots``).
        prompts: token ids per row (no padding).
        slots: each row's adapter slot, or one slot for every row.
        pad_id: the id to left-pad with (masked out; the tokenizer's pad or EOS).
        stop_ids: token ids that end a row (EOS, ``<|im_end|>``); at least one.
        max_new_tokens: generation length cap.
        stop: strings that end a row (needs ``tokenizer``); the text is cut before them.
        tokenizer: decodes ``texts`` and checks ``stop``; ``None``: ids only.
        batch_size: rows per ``generate`` call; rows of similar length are batched together.

    Returns:
        :class:`Generations`, in the prompts' order.
    """
    from transformers import GenerationConfig

    if not stop_ids:
        raise ValueError("generate needs at least one stop id (the tokenizer's EOS)")
    if stop and tokenizer is None:
        raise ValueError("stop strings need the tokenizer")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt: every row needs at least one token to generate from")
    slots = [int(slots)] * len(prompts) if isinstance(slots, int) else [int(s) for s in slots]
    if len(slots) != len(prompts):
        raise ValueError(f"{len(slots)} slots for {len(prompts)} prompts")
    config = GenerationConfig(
        max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1, eos_token_id=[int(t) for t in stop_ids],
        pad_token_id=int(pad_id), stop_strings=list(stop) or None,
    )
    device, was_training = _device(model), model.training
    model.eval()
    out: list[list[int]] = [[] for _ in prompts]
    stop_set = {int(t) for t in stop_ids}
    try:
        for rows in _batches([len(p) for p in prompts], batch_size):
            ids, mask = left_pad([prompts[i] for i in rows], pad_id, device)
            with task_ids(model, _route([slots[i] for i in rows], device)):
                seqs = model.generate(
                    input_ids=ids, attention_mask=mask, generation_config=config,
                    tokenizer=tokenizer if stop else None,
                )
            for i, new in zip(rows, seqs[:, ids.shape[1]:].tolist()):
                cut = next((j for j, t in enumerate(new) if t in stop_set), len(new))
                out[i] = new[:cut]
    finally:
        model.train(was_training)
    texts = None
    if tokenizer is not None:
        texts = [_cut_at_stop(tokenizer.decode(g, skip_special_tokens=True), stop) for g in out]
    return Generations(out, texts)


@torch.no_grad()
def score_choices(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    slots: Sequence[int] | int,
    choices: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Log-likelihood of every choice after its prompt: ``sum_j log p(c_j | prompt, c_<j)``.

    Args:
        model: as for :func:`generate`.
        prompts: token ids per row.
        slots: each row's adapter slot, or one for all.
        choices: per row, its candidate continuations as token ids (a task's label set,
            terminator included); rows may have different sets.
        pad_id: left padding (masked out).
        batch_size: (prompt, choice) sequences per forward pass, tasks mixed.

    Returns:
        Per row, a float32 (K_row,) tensor of summed log-probabilities; ``argmax`` is the choice.
    """
    slots = [int(slots)] * len(prompts) if isinstance(slots, int) else [int(s) for s in slots]
    pairs = [(i, k) for i, cs in enumerate(choices) for k in range(len(cs))]
    if any(len(c) == 0 for cs in choices for c in cs):
        raise ValueError("an empty choice: every label needs at least one token")
    scores = [torch.zeros(len(cs)) for cs in choices]
    device, was_training = _device(model), model.training
    model.eval()
    try:
        for batch in _batches([len(prompts[i]) + len(choices[i][k]) for i, k in pairs], batch_size):
            rows = [pairs[b] for b in batch]
            seqs = [[*prompts[i], *choices[i][k]] for i, k in rows]
            ids, mask = left_pad(seqs, pad_id, device)
            keep = max(len(choices[i][k]) for i, k in rows) + 1  # logits at the last `keep` positions
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            with task_ids(model, _route([slots[i] for i, _ in rows], device)):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                               logits_to_keep=keep).logits  # (B, keep, V)
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # predicts the last keep - 1 tokens
            targets = ids[:, -(keep - 1):]
            tok_logp = logp.gather(-1, targets[..., None])[..., 0]  # (B, keep - 1)
            for r, (i, k) in enumerate(rows):
                n = len(choices[i][k])
                scores[i][k] = tok_logp[r, -n:].sum().cpu()
    finally:
        model.train(was_training)
    return scores
