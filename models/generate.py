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

:func:`score_choices` ranks a fixed label set by log-likelihood instead of generating. A
task's K labels share their prompt, so the prompt runs once per row (left-padded, a batch of
rows of any tasks): its last position's logits score every label's first token, and its KV
cache is copied to the row's (row, label) pairs, which then run only the label tokens (right-
padded, positions continuing the prompt's) to score the rest. Before, every (prompt, label)
pair ran the whole prompt: K times the prompt's FLOPs (``share_prompt=False`` still does,
the reference the shared path is tested and benchmarked against). Memory: a label pass holds
the KV cache of at most ``4 * batch_size`` (row, label) pairs (copies of their rows' prompt
caches), not of all K labels of every row at once.

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


def _check_choices(prompts, slots, choices) -> list[int]:
    slots = [int(slots)] * len(prompts) if isinstance(slots, int) else [int(s) for s in slots]
    if len(slots) != len(prompts) or len(choices) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts, {len(slots)} slots and {len(choices)} label sets: one each per row")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt: every row needs at least one token to score labels after")
    if any(len(c) == 0 for cs in choices for c in cs):
        raise ValueError("an empty choice: every label needs at least one token")
    return slots


@torch.no_grad()
def score_choices(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    slots: Sequence[int] | int,
    choices: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    batch_size: int = 16,
    share_prompt: bool = True,
) -> list[torch.Tensor]:
    """Log-likelihood of every choice after its prompt: ``sum_j log p(c_j | prompt, c_<j)``.

    Args:
        model: as for :func:`generate`.
        prompts: token ids per row.
        slots: each row's adapter slot, or one for all.
        choices: per row, its candidate continuations as token ids (a task's label set,
            terminator included); rows may have different sets.
        pad_id: padding id (masked out).
        batch_size: prompts per prefill (their (row, label) pairs then run ``4 * batch_size``
            at a time); with ``share_prompt=False``, (prompt, label) sequences per forward.
        share_prompt: run each prompt once and the labels from its KV cache (see the module
            docstring); ``False``: one whole (prompt, label) sequence per pair.

    Returns:
        Per row, a float32 (K_row,) tensor of summed log-probabilities; ``argmax`` is the choice.
    """
    slots = _check_choices(prompts, slots, choices)
    device, was_training = _device(model), model.training
    model.eval()
    try:
        if share_prompt:
            return _score_shared(model, prompts, slots, choices, pad_id, batch_size, device)
        return _score_pairs(model, prompts, slots, choices, pad_id, batch_size, device)
    finally:
        model.train(was_training)


def _cache_kwarg(model: nn.Module) -> str:
    """The forward's KV-cache argument: ``cache`` (transformers >= 5.2x), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _score_shared(model, prompts, slots, choices, pad_id: int, batch_size: int, device) -> list[torch.Tensor]:
    """Prompt once per row (prefill), then every label's tokens from a copy of the row's KV cache."""
    from transformers import DynamicCache

    offset = [0]
    for cs in choices:
        offset.append(offset[-1] + len(cs))
    flat = torch.zeros(offset[-1])  # every (row, label) pair's score, rows in order
    for rows in _batches([len(p) for p in prompts], batch_size):
        ids, mask = left_pad([prompts[i] for i in rows], pad_id, device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with task_ids(model, _route([slots[i] for i in rows], device)):
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                        logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (R, V): each label's first token
        prefix = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        kv = [(layer.keys, layer.values) for layer in prefix.layers]  # each (R, H, P, D)
        pairs = [(r, k) for r, i in enumerate(rows) for k in range(len(choices[i]))]
        where = torch.as_tensor([offset[rows[r]] + k for r, k in pairs], dtype=torch.long)
        heads = torch.as_tensor([choices[rows[r]][k][0] for r, k in pairs], dtype=torch.long, device=device)
        flat[where] = first[torch.as_tensor([r for r, _ in pairs], device=device), heads].cpu()
        # labels of similar length together: less right-padding in the label passes
        width_of = {(r, k): len(choices[rows[r]][k]) for r, k in pairs}
        rest = sorted((rk for rk in pairs if width_of[rk] > 1), key=width_of.__getitem__)
        for c0 in range(0, len(rest), 4 * batch_size):
            chunk = rest[c0 : c0 + 4 * batch_size]
            labels = [choices[rows[r]][k] for r, k in chunk]
            width = max(len(c) for c in labels) - 1
            # inputs c_0 .. c_{n-2} predict targets c_1 .. c_{n-1}; right-padded after every real token
            tail_ids = torch.full((len(chunk), width), int(pad_id), dtype=torch.long)
            targets = torch.zeros((len(chunk), width), dtype=torch.long)
            tail_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, c in enumerate(labels):
                tail_ids[b, : len(c) - 1] = torch.as_tensor(c[:-1])
                targets[b, : len(c) - 1] = torch.as_tensor(c[1:])
                tail_mask[b, : len(c) - 1] = 1
            tail_ids, targets, tail_mask = tail_ids.to(device), targets.to(device), tail_mask.to(device)
            pick = torch.as_tensor([r for r, _ in chunk], dtype=torch.long, device=device)
            cache = DynamicCache([(key.index_select(0, pick), val.index_select(0, pick)) for key, val in kv],
                                 config=model.config)
            pos = mask.sum(-1).index_select(0, pick)[:, None] + torch.arange(width, device=device)[None, :]
            with task_ids(model, _route([slots[rows[r]] for r, _ in chunk], device)):
                logits = model(input_ids=tail_ids, attention_mask=torch.cat([mask.index_select(0, pick), tail_mask], 1),
                               position_ids=pos, use_cache=True, **{_cache_kwarg(model): cache}).logits  # (C, W, V)
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]  # (C, W)
            at = torch.as_tensor([offset[rows[r]] + k for r, k in chunk], dtype=torch.long)
            flat[at] += (logp * tail_mask).sum(-1).cpu()
    return list(flat.split([len(cs) for cs in choices]))


def _score_pairs(model, prompts, slots, choices, pad_id: int, batch_size: int, device) -> list[torch.Tensor]:
    """One left-padded (prompt, label) sequence per pair: only the last ``max label + 1`` positions need logits."""
    pairs = [(i, k) for i, cs in enumerate(choices) for k in range(len(cs))]
    scores = [torch.zeros(len(cs)) for cs in choices]
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
    return scores
