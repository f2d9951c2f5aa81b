"""Bit allocation: the integer program against brute force, budgets, known answers."""

from __future__ import annotations

import itertools

import pytest
import torch

from models.base import load_base
from models.quant.bit_budget import BudgetError, allocate, error_table
from models.quant.lq import QuantTargetError
from models.quant.model import quantizable_matrices, quantize_model
from models.quant.quantizers import quantize

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 64}


def randn(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def two_sensitivities():
    """'big' weights are 100x larger: their squared error dominates the objective."""
    return {"big": randn(64, 128, seed=1), "small": randn(64, 128, seed=2, scale=0.01)}


def test_known_answer_beats_uniform_allocation():
    mats = two_sensitivities()
    alloc = allocate(mats, avg_bits=5.3, choices=(("nf", 2), ("nf", 4), ("nf", 8)))
    assert alloc.choices == {"big": ("nf", 8), "small": ("nf", 2)}
    assert alloc.total_bytes <= alloc.budget_bytes == int(5.3 * 2 * 64 * 128 / 8)
    assert alloc.uniform["bits"] == 4  # best single width that fits
    assert alloc.total_error < 0.1 * alloc.uniform["total_error"]
    # the errors are the real ones of the packed tensors
    real = sum(float((w - quantize(w, *alloc.choices[n]).dequantize()).pow(2).sum()) for n, w in mats.items())
    assert alloc.total_error == pytest.approx(real, rel=1e-6)
    assert sum(quantize(w, *alloc.choices[n]).nbytes for n, w in mats.items()) == alloc.total_bytes


def test_milp_equals_brute_force_enumeration():
    mats = {f"m{i}": randn(32, 64, seed=i, scale=s) for i, s in enumerate([1.0, 0.3, 0.05])}
    choices = (("nf", 2), ("uniform", 3), ("nf", 4), ("uniform", 8))
    err, nbytes, _ = error_table(mats, choices)
    table = None
    for avg_bits in (2.6, 3.4, 4.5, 6.0):
        alloc = allocate(mats, avg_bits, choices, table=table)
        table = alloc.table  # later budgets reuse the error table
        best = min(
            (sum(err[i, j] for i, j in enumerate(pick)), pick)
            for pick in itertools.product(range(len(choices)), repeat=3)
            if sum(nbytes[i, j] for i, j in enumerate(pick)) <= alloc.budget_bytes
        )
        assert alloc.total_error == pytest.approx(best[0], rel=1e-9), avg_bits
        assert alloc.total_bytes <= alloc.budget_bytes


def test_scalar_weights_move_bits_to_the_important_matrix():
    mats = {"a": randn(64, 128, seed=3), "b": randn(64, 128, seed=4)}
    choices = (("nf", 2), ("nf", 4), ("nf", 8))
    hot_a = allocate(mats, 5.3, choices, weights={"a": 1000.0, "b": 1.0}).choices
    hot_b = allocate(mats, 5.3, choices, weights={"a": 1.0, "b": 1000.0}).choices
    assert hot_a == {"a": ("nf", 8), "b": ("nf", 2)} and hot_b == {"a": ("nf", 2), "b": ("nf", 8)}


def test_fisher_weights_are_elementwise():
    w = randn(32, 64, seed=5)
    fisher = torch.zeros_like(w)
    fisher[:4] = 1.0  # only the first rows matter
    err, _, norm2 = error_table({"w": w}, (("nf", 3),), weights={"w": fisher})
    ref = float((fisher * (w - quantize(w, "nf", 3).dequantize()) ** 2).sum())
    assert err[0, 0] == pytest.approx(ref, rel=1e-6) and norm2[0] == pytest.approx(float(w[:4].pow(2).sum()), rel=1e-6)


def test_lq_aware_errors_are_lower():
    mats = {"w": randn(48, 64, seed=6)}
    plain, _, _ = error_table(mats, (("nf", 2),))
    lq, _, _ = error_table(mats, (("nf", 2),), rank=4, iters=2)
    assert lq[0, 0] < plain[0, 0]


def test_budget_below_minimum_names_the_minimum():
    mats = two_sensitivities()
    with pytest.raises(BudgetError, match=r"2\.\d+ bits per weight"):
        allocate(mats, avg_bits=2.0, choices=(("nf", 2), ("nf", 4)))  # 2-bit codes + fp16 scales > 2 bits


def test_nothing_to_allocate():
    with pytest.raises(BudgetError, match="no quantisable matrices"):
        allocate({}, 4.0)
    model = load_base(random_init=TINY, seed=0)
    with pytest.raises(QuantTargetError, match="match no linear layer"):
        quantizable_matrices(model, ["c_attn"])


def test_allocation_drives_quantize_model():
    model = load_base(random_init=TINY, seed=0)
    mats = quantizable_matrices(model, "all-linear", layers=[1])
    alloc = allocate(mats, avg_bits=3.5, choices=(("nf", 2), ("nf", 3), ("nf", 4), ("vq", 2)))
    report = quantize_model(model, "all-linear", bits=alloc, layers=[1])
    assert report.stored_bytes == alloc.total_bytes <= alloc.budget_bytes
    assert {r["name"]: (r["quantizer"], r["bits"]) for r in report.rows} == alloc.choices
