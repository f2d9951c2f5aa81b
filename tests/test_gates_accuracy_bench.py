"""The helpers of ``benchmarks/gates_accuracy.py`` (the FineGates accuracy arm of ``gates_export.py``),
on the suite's real examples and a tiny random Llama."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from models.base import load_base
from tasks.metrics import accuracy
from tests.conftest import TINY_LLAMA

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gates_accuracy", ROOT / "benchmarks" / "gates_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gates_accuracy"] = module
    spec.loader.exec_module(module)
    return module


def _bytes(s: str) -> list[int]:
    return list(s.encode("utf-8"))


def test_split_holds_out_every_fifth_example_of_each_package(bench):
    from tasks.builtin.instruct import instruct_rows

    train, held = bench.classification_split(packages=["json", "http"])
    n = len(instruct_rows("submodule", "json")) + len(instruct_rows("submodule", "http"))
    assert len(train) + len(held) == n and len(held) == len(instruct_rows("submodule", "json")) // 5 + len(
        instruct_rows("submodule", "http")) // 5
    assert not set(held) & set(train)
    assert all("`json`" in p or "`http`" in p for p, _ in held) and {"`json`", "`http`"} <= {
        p.split(" package")[0].split("Python ")[1] for p, _ in held}
    assert all(p.endswith("Answer: ") for p, _ in train)


def test_rows_score_exactly_the_completion_and_eos(bench):
    pairs = [("Which module? " * 10 + "Answer: ", "decoder"), ("Q: ", "x")]
    ids, scored = bench.example_rows(_bytes, pairs, 32, eos_id=256, pad_id=257)
    assert ids.shape == scored.shape == (2, 32)
    row = ids[0].tolist()
    assert row[-8:] == _bytes("decoder") + [256] and scored[0].sum() == 8 and scored[0, -8:].all()  # cut on the left
    assert bytes(row[:24]).decode() == pairs[0][0][-24:]
    assert ids[1, :4].tolist() == _bytes("Q: x") and ids[1, 4] == 256 and (ids[1, 5:] == 257).all()
    assert scored[1].nonzero().flatten().tolist() == [3, 4]
    with pytest.raises(ValueError, match="raise --seq"):
        bench.example_rows(_bytes, [("p", "a" * 40)], 32, 256, 257)


def test_accuracy_equals_one_prompt_at_a_time_greedy_decoding(bench):
    torch.manual_seed(0)
    model = load_base(random_init={**TINY_LLAMA, "vocab_size": 258}, seed=0).eval()
    prompts = [_bytes("Answer: "), _bytes("Which one?\nAnswer: "), _bytes("x")]

    def one_by_one(p: list[int]) -> str:  # reference: no cache, no padding, argmax each step
        ids = list(p)
        for _ in range(6):
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt in (256, 10):
                break
            ids.append(nxt)
        return bytes(t for t in ids[len(p):] if t < 256).decode("utf-8", "ignore")

    want = [one_by_one(p) for p in prompts]
    refs = [want[0], want[1] + "!", "nothing"]  # right, right after normalisation, wrong
    decode = lambda ids: bytes(t for t in ids if t < 256).decode("utf-8", "ignore")  # noqa: E731
    acc, answers = bench.model_accuracy(model, prompts, refs, decode, [256, 10], 257, max_new_tokens=6, batch_size=2)
    assert answers == want
    assert acc == pytest.approx(accuracy(want, refs)) and acc == pytest.approx(2 / 3 if want[2] != "nothing" else 1)
