"""Task metrics end to end: eval rows -> prompts and references, training reaches exact match 1.0, labels."""

from __future__ import annotations

import json

import pytest
import torch

from models.base import load_base
from models.lora import adapter_params, inject
from models.train.step import Batch, train_step
from orchestrator.spec import parse_job
from tasks import build_task_data
from tasks.errors import TaskDataError
from tasks.evaluate import eval_examples, evaluate_metrics, label_choices
from tasks.metrics import accuracy, exact_match, normalize, rouge_l
from tasks.tokenizer import bytes_tokenizer
from tests.conftest import TINY_LLAMA

ANSWERS = {"animal": ["cat", "dog", "owl", "emu"], "color": ["red", "tan", "blue", "gray"]}
# The tiny random base needs larger weights than HF's 0.02 init for its frozen head to give
# confident next-token probabilities at all (logits are bounded by |h| |w_v|).
TINY = dict(TINY_LLAMA, initializer_range=0.5)


def _write_tasks(tmp_path, n=48):
    """Two tasks on the same prompts (``2=``): the completion is a fixed word per digit, one table per task."""
    g = torch.Generator().manual_seed(0)
    for task, words in ANSWERS.items():
        with open(tmp_path / f"{task}.jsonl", "w") as f:
            for i in range(n):
                d = i % len(words) if i < len(words) else int(torch.randint(0, len(words), (1,), generator=g))
                f.write(json.dumps({"prompt": f"{d}=", "completion": words[d]}) + "\n")


def _job(tmp_path, **eval_section):
    tasks = [{"name": t, "source": {"kind": "files", "path": str(tmp_path / f"{t}.jsonl"),
                                    "example_format": "prompt_completion"}, "eval_fraction": 0.25} for t in ANSWERS]
    tasks[1]["metrics"] = ["ppl", "exact_match", "choice_accuracy"]  # a per-task override
    return parse_job({"base": {"random_init": TINY_LLAMA, "tokenizer": "bytes"}, "tasks": tasks,
                      "eval": eval_section})


def test_string_metrics_normalise_as_documented():
    assert normalize("  Decoder.\n") == "decoder" and normalize("def f(x):") == "def f(x)"
    assert exact_match(["Cat!", "dog", "owl"], ["cat", "dog.", "Owls"]) == pytest.approx(2 / 3)
    assert accuracy(["\ncat\nand more", "the dog"], ["cat", "dog"]) == 0.5
    assert exact_match(["\ncat\nand more"], ["cat"]) == 0.0
    assert rouge_l(["def f(a, b):"], ["def f(a, b):"]) == 1.0
    assert 0 < rouge_l(["def f(a):"], ["def f(a, b):"]) < 1


def test_tiny_job_reaches_exact_match_one_after_training_and_the_base_does_not(tmp_path):
    _write_tasks(tmp_path)
    spec = _job(tmp_path, metrics=["ppl", "exact_match", "accuracy", "rouge_l"], max_new_tokens=6)
    tok = bytes_tokenizer()
    data = build_task_data(spec.tasks, tok, seq_len=16)
    settings = {t.name: spec.eval.for_task(t) for t in spec.tasks}
    assert settings["color"].metrics == ["ppl", "exact_match", "choice_accuracy"]
    examples = {d.name: eval_examples(d, tok, settings[d.name]) for d in data}
    assert examples["animal"].references[0] in ANSWERS["animal"]
    assert tok.decode(examples["animal"].prompts[0]).endswith("=")
    assert sorted(examples["color"].choices.texts) == sorted(ANSWERS["color"])

    torch.manual_seed(0)
    model = load_base(random_init=TINY, seed=0)
    inject(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], num_tasks=2,
           rank=16, alpha=32.0)
    slot_of = {d.name: i for i, d in enumerate(data)}
    before = evaluate_metrics(model, examples, settings, tok, slot_of=slot_of, batch_size=8)

    ids = torch.cat([d.train_ids for d in data])
    mask = torch.cat([d.train_mask for d in data])
    slots = torch.cat([torch.full((len(d.train_ids),), i) for i, d in enumerate(data)])
    params = adapter_params(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(150):
        train_step(model, Batch(ids, slots, torch.full((len(ids),), 1 / len(ids)), scored=mask), opt, params)
    after = evaluate_metrics(model, examples, settings, tok, slot_of=slot_of, batch_size=8)

    assert set(after) == {"animal", "color"}
    assert set(after["animal"]) == {"exact_match", "accuracy", "rouge_l"}  # ppl: the training loop's
    assert set(after["color"]) == {"exact_match", "choice_accuracy"}
    for task in after:
        assert after[task]["exact_match"] == 1.0, (task, after)
        assert before[task]["exact_match"] < 1.0, (task, before)
    assert after["animal"]["accuracy"] == after["animal"]["rouge_l"] == 1.0
    assert after["color"]["choice_accuracy"] == 1.0
    # Routing matters: the animal adapter answers the colour task's prompts with animals.
    swapped = evaluate_metrics(model, examples, settings, tok, slot_of={"animal": 1, "color": 0})
    assert swapped["animal"]["exact_match"] == 0.0 and swapped["color"]["exact_match"] == 0.0


def test_label_sets_from_completions_or_given_and_bad_ones_refused(tmp_path):
    _write_tasks(tmp_path, n=12)
    spec = _job(tmp_path)
    tok = bytes_tokenizer()
    animal, color = build_task_data(spec.tasks, tok, seq_len=16)
    got = label_choices(animal, tok)
    assert sorted(got.texts) == sorted(ANSWERS["animal"])
    assert all(ids[-1] == tok.eos_token_id for ids in got.ids)  # closed like the training completions
    given = label_choices(animal, tok, ["cat", "catfish"])
    assert given.ids == [[*b"cat", tok.eos_token_id], [*b"catfish", tok.eos_token_id]]
    one = build_task_data(spec.tasks[:1], tok, seq_len=16)[0]
    one.train_mask[:, :] = False
    with pytest.raises(TaskDataError, match="fewer|at least 2"):
        label_choices(one, tok)


def test_text_task_has_no_prompts(tmp_path):
    (tmp_path / "doc.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 20}) + "\n" for i in range(6)))
    tok = bytes_tokenizer()
    spec = parse_job({"base": {"random_init": TINY_LLAMA, "tokenizer": "bytes"},
                      "tasks": [{"name": "doc", "source": {"kind": "files", "path": str(tmp_path / "doc.jsonl")}}]})
    data = build_task_data(spec.tasks, tok, seq_len=32)
    assert data[0].eval_prompt_lens is None
    with pytest.raises(TaskDataError, match="`text` task"):
        eval_examples(data[0], tok)
