"""Instruction formats: which tokens each example holds and which of them are scored.

The byte tokenizer makes every check exact: token ids are the text's UTF-8 bytes, EOS = 256.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets import Dataset

from tasks import TaskSpec, build_task_data
from tasks.errors import TaskDataError
from tasks.examples import encode_examples
from tasks.spec import ExampleFields
from tasks.tokenizer import bytes_tokenizer

EOS = 256
# a tiny chat template in the shape of real ones: a header per turn, an end-of-turn marker
TINY_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _text(ids) -> str:
    return bytes(int(i) for i in ids if int(i) != EOS).decode("utf-8")


def _scored_text(ex, i: int = 0) -> str:
    return _text(ex.ids[i][ex.scored[i]])


def test_prompt_completion_scores_completion_and_eos():
    ds = Dataset.from_dict({"prompt": ["Q: 2+2? A:", "hi"], "completion": [" 4", " there"]})
    ex = encode_examples(ds, ExampleFields(example_format="prompt_completion"), bytes_tokenizer())
    assert ex.ids[0].tolist() == [*b"Q: 2+2? A:", *b" 4", EOS]
    assert ex.scored[0].tolist() == [False] * 10 + [True, True, True]
    assert ex.keep_from.tolist() == [10, 2] and ex.empty == 0
    assert _scored_text(ex, 1) == " there"


def test_train_on_prompt_scores_everything():
    ds = Dataset.from_dict({"prompt": ["Q:"], "completion": ["A"]})
    ex = encode_examples(ds, ExampleFields(example_format="prompt_completion"), bytes_tokenizer(), train_on_prompt=True)
    assert ex.scored[0].all() and ex.keep_from[0] == 2  # truncation still keeps the completion whole


def test_custom_field_names_and_empty_completions():
    ds = Dataset.from_dict({"question": ["a", "b", "c"], "answer": ["x", "", None], "other": [1, 2, 3]})
    fields = ExampleFields(example_format="prompt_completion", prompt_field="question", completion_field="answer")
    ex = encode_examples(ds, fields, bytes_tokenizer())
    assert len(ex) == 1 and ex.empty == 2 and ex.rows.tolist() == [0]


@pytest.mark.parametrize("inp, has_input", [("some context", True), ("", False), (None, False)])
def test_alpaca_prompt_with_and_without_input(inp, has_input):
    ds = Dataset.from_dict({"instruction": ["Add the numbers."], "input": [inp], "output": ["42"]})
    ex = encode_examples(ds, ExampleFields(example_format="alpaca"), bytes_tokenizer())
    prompt = _text(ex.ids[0][~ex.scored[0]])
    assert prompt.startswith("Below is an instruction") and prompt.endswith("### Response:\n")
    assert "### Instruction:\nAdd the numbers.\n\n" in prompt
    assert ("### Input:\nsome context\n\n" in prompt) is has_input
    assert _scored_text(ex) == "42" and ex.ids[0][-1] == EOS and ex.scored[0][-1]


def test_alpaca_without_input_column():
    ds = Dataset.from_dict({"task": ["Say hi."], "answer": ["hi"]})
    fields = ExampleFields(example_format="alpaca", instruction_field="task", output_field="answer")
    ex = encode_examples(ds, fields, bytes_tokenizer())
    assert "### Input:" not in _text(ex.ids[0]) and _scored_text(ex) == "hi"


def _chat(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def test_messages_score_every_assistant_turn_only():
    conv = _chat(
        ("system", "Be brief."), ("user", "France?"), ("assistant", "Paris"), ("user", "Italy?"), ("assistant", "Rome")
    )
    ex = encode_examples(Dataset.from_dict({"messages": [conv]}), ExampleFields(example_format="messages"),
                         bytes_tokenizer(), chat_template=TINY_TEMPLATE)
    ids, scored = ex.ids[0], ex.scored[0]
    full = "<system>Be brief.</s><user>France?</s><assistant>Paris</s><user>Italy?</s><assistant>Rome</s>"
    assert _text(ids) == full
    # exactly the replies and their end-of-turn markers are targets, nothing of system or user
    expected = np.zeros(len(full), dtype=bool)
    for reply in ("Paris</s>", "Rome</s>"):
        start = full.index(reply)
        expected[start : start + len(reply)] = True
    assert scored.tolist() == expected.tolist()
    assert ex.keep_from[0] == full.index("Rome</s>")


def test_messages_train_on_prompt_and_sharegpt_names():
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    fields = ExampleFields(example_format="messages", messages_field="conversations", role_field="from",
                           content_field="value", role_map={"human": "user", "gpt": "assistant"})
    ds = Dataset.from_dict({"conversations": [conv]})
    ex = encode_examples(ds, fields, bytes_tokenizer(), chat_template=TINY_TEMPLATE)
    assert _scored_text(ex) == "yo</s>"
    ex_all = encode_examples(ds, fields, bytes_tokenizer(), chat_template=TINY_TEMPLATE, train_on_prompt=True)
    assert ex_all.scored[0].all()


def test_chatml_override_by_name():
    ds = Dataset.from_dict({"messages": [_chat(("user", "q"), ("assistant", "a"))]})
    ex = encode_examples(ds, ExampleFields(example_format="messages"), bytes_tokenizer(), chat_template="chatml")
    assert _text(ex.ids[0]) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    assert _scored_text(ex) == "a<|im_end|>\n"


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_task_data_rows_and_masks_for_messages(tmp_path):
    """End to end: one example per row, right-padded with EOS (no pad token), pads never scored."""
    rows = [{"messages": _chat(("user", f"q{i}"), ("assistant", f"a{i}"))} for i in range(10)]
    spec = TaskSpec(
        name="chat",
        source={"kind": "files", "path": _jsonl(tmp_path / "c.jsonl", rows), "example_format": "messages"},
        eval_fraction=0.2,
    )
    (d,) = build_task_data([spec], bytes_tokenizer(), seq_len=32, chat_template=TINY_TEMPLATE)
    assert d.train_examples == 8 and d.eval_examples == 2 and d.train_ids.shape == (8, 32)
    assert d.train_mask.dtype == d.eval_mask.dtype and str(d.train_mask.dtype) == "torch.bool"
    for ids, mask in zip(d.train_ids.tolist() + d.eval_ids.tolist(), d.train_mask.tolist() + d.eval_mask.tolist()):
        text = "".join(chr(t) for t in ids if t != EOS)
        i = text[len("<user>q")]
        assert text == f"<user>q{i}</s><assistant>a{i}</s>"
        n = len(text)
        assert ids[n:] == [EOS] * (32 - n)  # right padding
        assert "".join(chr(t) for t, m in zip(ids, mask) if m) == f"a{i}</s>"
        assert not any(mask[n:]) and not mask[0]
    assert d.train_tokens == int(d.train_mask.sum()) == 8 * len("a0</s>")
    assert d.stats["format"] == "messages" and d.stats["train"]["examples"] == 8
    assert d.train.column_names == ["input_ids", "scored"]
    held = {t[7] for t in d.eval.with_format("numpy")["input_ids"]}
    assert not held & {t[7] for t in d.train.with_format("numpy")["input_ids"]}  # disjoint examples


def test_small_instruction_task_is_kept(tmp_path):
    """Two short examples: one trains, one evaluates; nothing is refused for being under a row."""
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}])
    spec = TaskSpec(name="tiny", source={"kind": "files", "path": path, "example_format": "prompt_completion"})
    (d,) = build_task_data([spec], bytes_tokenizer(), seq_len=64)
    assert d.train_examples == 1 and d.eval_examples == 1 and d.train_tokens == 2  # completion + EOS
    assert d.train_ids[0, 3:].eq(EOS).all() and not d.train_mask[0, 3:].any()


def test_eval_source_and_caps_count_examples(tmp_path):
    train = _jsonl(tmp_path / "t.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(30)])
    ev = _jsonl(tmp_path / "e.jsonl", [{"prompt": f"P{i}", "completion": f"C{i}"} for i in range(9)])
    src = {"kind": "files", "example_format": "prompt_completion"}
    spec = TaskSpec(name="t", source={**src, "path": train}, eval_source={**src, "path": ev},
                    max_train_sequences=7, max_eval_sequences=5)
    (d,) = build_task_data([spec], bytes_tokenizer(), seq_len=16)
    assert d.train_examples == 7 and d.eval_examples == 5
    assert all(chr(int(r[0])) == "P" for r in d.eval_ids)


def test_builtin_instruct_source():
    spec = TaskSpec(
        name="json-sub",
        source={"kind": "builtin", "suite": "stdlib-instruct", "subset": "submodule", "package": "json"},
    )
    (d,) = build_task_data([spec], bytes_tokenizer(), seq_len=512)
    assert d.stats["format"] == "prompt_completion" and d.train_examples + d.eval_examples == d.stats["examples"]
    labels = {_text(ids[mask]) for ids, mask in zip(d.train_ids.numpy(), d.train_mask.numpy())}
    assert labels <= {"__init__", "decoder", "encoder", "scanner", "tool"}


# ---- bad input: each error names the task, the file, the field and the fix ----

def _error(ds, fields, **kw) -> str:
    with pytest.raises(TaskDataError) as info:
        encode_examples(ds, fields, bytes_tokenizer(), task="acme", where="data/acme.jsonl", **kw)
    msg = str(info.value)
    assert "'acme'" in msg and "data/acme.jsonl" in msg
    return msg


def test_missing_field_lists_columns():
    msg = _error(
        Dataset.from_dict({"question": ["q"], "reply": ["r"]}), ExampleFields(example_format="prompt_completion")
    )
    assert "no column 'prompt'" in msg and "['question', 'reply']" in msg and "source.prompt_field" in msg


def test_missing_alpaca_output():
    msg = _error(Dataset.from_dict({"instruction": ["q"]}), ExampleFields(example_format="alpaca"))
    assert "no column 'output'" in msg and "source.output_field" in msg


def test_messages_missing_turn_key():
    ds = Dataset.from_dict({"messages": [[{"from": "user", "value": "x"}]]})
    msg = _error(ds, ExampleFields(example_format="messages"), chat_template="chatml")
    assert "no key 'role'" in msg and "['from', 'value']" in msg and "source.role_field" in msg


def test_messages_unknown_role():
    ds = Dataset.from_dict(
        {"messages": [_chat(("user", "a"), ("assistant", "b")), _chat(("human", "a"), ("assistant", "b"))]}
    )
    msg = _error(ds, ExampleFields(example_format="messages"), chat_template="chatml")
    assert "row 1" in msg and "unknown role 'human'" in msg and "'messages'" in msg and "role_map" in msg


def test_messages_without_assistant_turn():
    ds = Dataset.from_dict({"messages": [_chat(("user", "a"), ("user", "b"))]})
    msg = _error(ds, ExampleFields(example_format="messages"), chat_template="chatml")
    assert "row 0" in msg and "no assistant turn" in msg


def test_tokenizer_without_chat_template():
    ds = Dataset.from_dict({"messages": [_chat(("user", "a"), ("assistant", "b"))]})
    msg = _error(ds, ExampleFields(example_format="messages"))
    assert "has none" in msg and "chat_template: chatml" in msg


def test_template_that_rejects_a_conversation():
    strict = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first turn must be user') }}{% endif %}"
        + TINY_TEMPLATE
    )
    ds = Dataset.from_dict({"messages": [_chat(("assistant", "b"), ("user", "a"), ("assistant", "c"))]})
    msg = _error(ds, ExampleFields(example_format="messages"), chat_template=strict)
    assert "first turn must be user" in msg and "row 0" in msg


def test_non_text_prompt_column():
    msg = _error(
        Dataset.from_dict({"prompt": [1], "completion": ["x"]}), ExampleFields(example_format="prompt_completion")
    )
    assert "not text" in msg and "source.prompt_field" in msg


def test_no_usable_example_is_an_error(tmp_path):
    path = _jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "completion": ""}, {"prompt": "b", "completion": ""}])
    spec = TaskSpec(name="void", source={"kind": "files", "path": path, "example_format": "prompt_completion"})
    with pytest.raises(TaskDataError, match=r"task 'void'.*e\.jsonl.*no usable example"):
        build_task_data([spec], bytes_tokenizer(), seq_len=16)


@pytest.mark.parametrize(
    "template", [TINY_TEMPLATE, TINY_TEMPLATE.replace("m['content']", "m['content'] | trim"), "chatml"]
)
def test_one_render_per_shape_matches_rendering_every_row(template, monkeypatch):
    """The per-role-sequence fast path gives exactly the texts and masks of rendering each row."""
    from tasks import examples

    rng = np.random.default_rng(0)
    convs = []
    for i in range(40):
        turns = [("user", f" q{i} {{x}} "), ("assistant", f"a{'!' * int(rng.integers(0, 5))} ")]
        if i % 3 == 0:
            turns = [("system", "sys\n")] + turns + [("user", "more?"), ("assistant", "")]
        convs.append(_chat(*turns))
    ds = Dataset.from_dict({"messages": convs})
    fast = encode_examples(ds, ExampleFields(example_format="messages"), bytes_tokenizer(), chat_template=template)
    monkeypatch.setattr(examples._Structure, "CHECKS", 10**9)
    slow = encode_examples(ds, ExampleFields(example_format="messages"), bytes_tokenizer(), chat_template=template)
    assert len(fast) == len(slow) == 40
    for a, b, ma, mb in zip(fast.ids, slow.ids, fast.scored, slow.scored):
        assert a.tolist() == b.tolist() and ma.tolist() == mb.tolist()
    assert fast.keep_from.tolist() == slow.keep_from.tolist()
    if "trim" in template:  # a template that changes contents never takes the fast path
        assert _text(fast.ids[1]).startswith("<user>q1 {x}</s>")
