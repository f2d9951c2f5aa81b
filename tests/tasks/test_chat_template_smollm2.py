"""``messages`` through SmolLM2's real chat template: only assistant tokens are scored.

SmolLM2's tokenizer (offline GGUF, ``load_tokenizer("smollm2-135m")``) carries a ChatML
template that inserts a default system turn when the conversation has none.
"""

from __future__ import annotations

import json

import pytest

from tasks import TaskSpec, build_task_data
from tasks.tokenizer import load_tokenizer

CONV = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, since 1871."},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


def _spec(tmp_path, convs, **kw) -> TaskSpec:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs), encoding="utf-8")
    return TaskSpec(name="chat", source={"kind": "files", "path": str(path), "example_format": "messages"}, **kw)


def test_only_assistant_tokens_are_scored(tmp_path, tok):
    assert tok.chat_template  # the real one, no override
    spec = _spec(tmp_path, [CONV, CONV], eval_fraction=0.5)
    (d,) = build_task_data([spec], tok, seq_len=128)
    ids, mask = d.train_ids[0], d.train_mask[0]
    # the row is the template's own tokenisation of the conversation, right-padded
    own = tok.apply_chat_template(CONV, tokenize=True)
    own = own["input_ids"] if hasattr(own, "keys") else own
    assert ids[: len(own)].tolist() == list(own)
    assert (ids[len(own):] == tok.pad_token_id).all() and not mask[len(own):].any()
    # scored: each reply and its end-of-turn marker, nothing of the system or user turns
    assert tok.decode(ids[mask]) == "Paris.<|im_end|>\nRome, since 1871.<|im_end|>\n"
    unscored = tok.decode(ids[: len(own)][~mask[: len(own)]])
    assert "What is the capital of France?" in unscored and "And of Italy?" in unscored
    assert "You are a helpful AI assistant" in unscored  # the template's default system turn
    assert "Paris" not in unscored and "Rome" not in unscored
    assert d.train_tokens == int(mask.sum()) == len(tok("Paris.<|im_end|>\nRome, since 1871.<|im_end|>\n")["input_ids"])


def test_left_truncation_keeps_the_last_reply(tmp_path, tok):
    spec = _spec(tmp_path, [CONV] * 2, eval_fraction=0.5)
    (d,) = build_task_data([spec], tok, seq_len=24)
    ids, mask = d.train_ids[0], d.train_mask[0]
    assert tok.decode(ids).endswith("<|im_start|>assistant\nRome, since 1871.<|im_end|>\n")
    assert tok.decode(ids[mask]) == "Rome, since 1871.<|im_end|>\n"
    assert d.stats["truncated"] == 2 and d.stats["train"]["truncated"] == 1


def test_train_on_prompt_scores_the_whole_conversation(tmp_path, tok):
    (d,) = build_task_data([_spec(tmp_path, [CONV] * 2, eval_fraction=0.5, train_on_prompt=True)], tok, seq_len=128)
    n = len(tok(tok.apply_chat_template(CONV, tokenize=False), add_special_tokens=False)["input_ids"])
    assert d.train_mask[0].tolist() == [False] + [True] * (n - 1) + [False] * (128 - n)  # pads (= <|im_end|>) unscored
