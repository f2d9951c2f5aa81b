"""Scored-token masks: padding never enters the loss, prompts get no gradient, eval counts tokens."""

from __future__ import annotations

import pytest
import torch

from models.lora import inject
from models.train.step import Batch, evaluate, row_nll, row_nll_sum

PAD = 0


def _padded(examples: list[tuple[list[int], int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``(tokens, prompt_len)`` examples, right-padded; the mask scores the completion."""
    ids = torch.full((len(examples), length), PAD, dtype=torch.long)
    scored = torch.zeros(len(examples), length, dtype=torch.bool)
    for i, (toks, prompt) in enumerate(examples):
        ids[i, : len(toks)] = torch.tensor(toks)
        scored[i, prompt : len(toks)] = True
    return ids, scored


EXAMPLES = [([5, 17, 33, 9, 41, 42, 8], 4), ([7, 3, 250, 11, 12], 2), ([99, 98, 97, 96, 95, 94, 93, 92, 91], 6)]


def test_a_padded_row_scores_exactly_its_example_alone(tiny_llama):
    """Right padding in a causal LM: no real token attends to a pad, and pads are not scored."""
    ids, scored = _padded(EXAMPLES, 16)
    tid = torch.zeros(len(ids), dtype=torch.long)
    with torch.no_grad():
        total, count = row_nll_sum(tiny_llama, Batch(ids, tid, torch.ones(len(ids)), scored=scored))
    for i, (toks, prompt) in enumerate(EXAMPLES):
        alone_ids, alone_scored = _padded([(toks, prompt)], len(toks))  # no padding at all
        with torch.no_grad():
            a_total, a_count = row_nll_sum(tiny_llama, Batch(alone_ids, tid[:1], torch.ones(1), scored=alone_scored))
        assert int(count[i]) == int(a_count[0]) == len(toks) - prompt
        assert float(total[i]) == pytest.approx(float(a_total[0]), abs=1e-5)


def test_full_rows_without_a_mask_score_every_token_after_the_first(tiny_llama):
    ids = torch.randint(1, 300, (3, 12))
    tid = torch.zeros(3, dtype=torch.long)
    full = torch.ones_like(ids, dtype=torch.bool)
    full[:, 0] = False
    with torch.no_grad():
        plain = row_nll(tiny_llama, Batch(ids, tid, torch.ones(3)))
        masked = row_nll(tiny_llama, Batch(ids, tid, torch.ones(3), scored=full))
    torch.testing.assert_close(plain, masked)


def _logit_grads(model, ids: torch.Tensor, scored: torch.Tensor | None) -> torch.Tensor:
    captured = {}

    def keep(_m, _inp, out):
        out.retain_grad()
        captured["logits"] = out

    # The head's input (the final norm's output), not its logits: the loss runs the head chunk
    # by chunk and recomputes it in backward (models.train.step.token_nll), so no whole logits
    # tensor exists to hook. The head is linear, so a position's logits get zero gradient
    # exactly when its hidden state does.
    handle = model.model.norm.register_forward_hook(keep)
    try:
        tid = torch.zeros(len(ids), dtype=torch.long)
        row_nll(model, Batch(ids, tid, torch.ones(len(ids)), scored=scored)).sum().backward()
    finally:
        handle.remove()
    return captured["logits"].grad  # (N, L, H)


def test_prompt_logits_get_exactly_zero_gradient_unless_prompts_are_scored(tiny_llama):
    inject(tiny_llama, ["q_proj", "v_proj"], num_tasks=1, rank=4, alpha=8)
    ids, completion_only = _padded(EXAMPLES, 12)
    grad = _logit_grads(tiny_llama, ids, completion_only)
    # position t predicts token t + 1: its logits train only when token t + 1 is scored
    predicts_scored = torch.zeros_like(completion_only)
    predicts_scored[:, :-1] = completion_only[:, 1:]
    per_position = grad.abs().sum(dim=-1)
    assert torch.all(per_position[~predicts_scored] == 0.0)  # prompt and padding positions: exactly zero
    assert torch.all(per_position[predicts_scored] > 0.0)

    with_prompts = torch.zeros_like(completion_only)  # train_on_prompt: every real token after the first
    for i, (toks, _) in enumerate(EXAMPLES):
        with_prompts[i, 1 : len(toks)] = True
    tiny_llama.zero_grad()
    grad = _logit_grads(tiny_llama, ids, with_prompts)
    prompt_positions = predicts_scored.clone()
    for i, (_toks, prompt) in enumerate(EXAMPLES):
        prompt_positions[i, : prompt - 1] = True  # positions predicting prompt tokens 1 .. prompt-1
    assert torch.all(grad.abs().sum(dim=-1)[prompt_positions] > 0.0)


def test_eval_nll_is_per_scored_token_not_per_row(tiny_llama):
    """Two rows with 1 and 5 scored tokens weigh 1:5 in the task's eval NLL (token mean)."""
    ids, scored = _padded([([5, 6, 7, 8, 9, 10, 11], 6), ([12, 13, 14, 15, 16, 17, 18], 2)], 8)
    with torch.no_grad():
        total, count = row_nll_sum(
            tiny_llama, Batch(ids, torch.zeros(2, dtype=torch.long), torch.ones(2), scored=scored)
        )
    expect = float(total.sum() / count.sum())
    got = evaluate(tiny_llama, {0: ids}, batch_size=1, masks={0: scored})[0]
    assert got == pytest.approx(expect, rel=1e-6)
    assert got != pytest.approx(float((total / count).mean()), rel=1e-4)  # not the mean of row means
