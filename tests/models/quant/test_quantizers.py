"""Packed quantisers: real byte counts, exact reference reconstructions, error vs bits."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.quant.quantizers import (
    ALLOWED_BITS,
    QUANTIZERS,
    PackedTensor,
    QuantConfigError,
    nf_levels,
    pack_bits,
    quantize,
    uniform_levels,
    unpack_bits,
    vq_dim,
)

# QLoRA's published NF4 table (bitsandbytes functional.py)
QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def gaussian(shape=(96, 128), seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def rel(p: PackedTensor, w: torch.Tensor) -> float:
    return float((p.dequantize() - w).norm() / w.norm())


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_roundtrip_and_size(bits):
    codes = torch.randint(0, 2**bits, (1003,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1003 * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, 1003), codes)


def test_pack_bit_order_is_little_endian():
    # codes 1, 2 at 3 bits: bits 1 0 0 | 0 1 0 -> byte 0b00010001 = 17
    assert pack_bits(torch.tensor([1, 2]), 3).tolist() == [17]


def test_nf4_matches_qlora_table():
    assert torch.allclose(nf_levels(4), torch.tensor(QLORA_NF4), atol=1e-6)
    for b in ALLOWED_BITS:
        lv = nf_levels(b)
        assert lv.numel() == 2**b and (lv == 0).sum() == 1 and lv.min() == -1 and lv.max() == 1


@pytest.mark.parametrize("method", QUANTIZERS)
@pytest.mark.parametrize("bits", ALLOWED_BITS)
def test_nbytes_is_the_real_stored_size(method, bits, tmp_path):
    w = gaussian((7, 13))  # 91 weights: padding to whole blocks of 16
    p = quantize(w, method, bits, block_size=16)
    blocks = math.ceil(91 / 16)
    d = vq_dim(bits) if method == "vq" else 1
    codebook = 2 * (2 ** (bits * d)) * d if method == "vq" else 0
    expected = math.ceil(blocks * 16 * bits / 8) + 2 * blocks + codebook + 4 * (3 + 2)
    assert p.codes.dtype == torch.uint8 and p.scales.dtype == torch.float16
    assert p.nbytes == expected == sum(t.numel() * t.element_size() for t in p.to_tensors().values())
    save_file(p.to_tensors("m."), tmp_path / "q.safetensors")
    back = PackedTensor.from_tensors(load_file(tmp_path / "q.safetensors"), "m.")
    assert back.shape == (7, 13) and back.nbytes == p.nbytes
    assert torch.equal(back.dequantize(), p.dequantize())


@pytest.mark.parametrize("method", QUANTIZERS)
def test_error_falls_with_bits(method):
    w = gaussian()
    errs = [rel(quantize(w, method, b), w) for b in ALLOWED_BITS]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.02


def test_nf_beats_uniform_on_gaussian_at_4_bits():
    w = gaussian((256, 256))
    nf, uni = rel(quantize(w, "nf", 4), w), rel(quantize(w, "uniform", 4), w)
    assert nf < 0.95 * uni, (nf, uni)  # measured 0.092 vs 0.100


@pytest.mark.parametrize("method", ["uniform", "nf"])
def test_scalar_grid_reconstruction_matches_brute_force(method):
    w = gaussian((16, 64))
    p = quantize(w, method, 3, block_size=32)
    grid = nf_levels(3) if method == "nf" else uniform_levels(3)
    blocks = w.reshape(-1, 32)
    s = blocks.abs().amax(1).half().float()[:, None]
    ref = grid[((blocks / s)[..., None] - grid).abs().argmin(-1)] * s
    assert torch.allclose(p.dequantize(), ref.view_as(w), atol=1e-7)


def test_vq_assigns_every_vector_its_nearest_codeword():
    w = gaussian((32, 64))
    p = quantize(w, "vq", 3, block_size=32)
    d = vq_dim(3)
    cb = p.codebook.float()
    assert cb.shape == (2 ** (3 * d), d)
    s = p.scales.float()[:, None]
    vec = (w.reshape(-1, 32) / s).reshape(-1, d)
    ref = cb[torch.cdist(vec, cb).argmin(1)].reshape(-1, 32) * s
    assert torch.allclose(p.dequantize(), ref.view_as(w), atol=1e-6)
    assert rel(p, w) < rel(quantize(w, "uniform", 3, block_size=32), w)


def test_bad_settings_name_the_allowed_values():
    with pytest.raises(QuantConfigError, match=r"bits=5 .*\[2, 3, 4, 8\]"):
        quantize(gaussian(), "nf", 5)
    with pytest.raises(QuantConfigError, match="quantizer 'gptq'.*uniform"):
        quantize(gaussian(), "gptq", 4)
    with pytest.raises(QuantConfigError, match="block_size"):
        quantize(gaussian(), "nf", 4, block_size=7)


def test_zero_matrix_is_exact():
    w = torch.zeros(8, 32)
    for m in QUANTIZERS:
        assert torch.equal(quantize(w, m, 2, block_size=16).dequantize(), w)


@pytest.mark.parametrize("method", QUANTIZERS)
@pytest.mark.parametrize("bits", ALLOWED_BITS)
def test_sizes_from_the_shape_alone_match_the_packed_tensors(method, bits):
    """``packed_nbytes``/``packed_shapes`` (used on meta models in preflight) equal what ``quantize`` stores."""
    from models.quant.quantizers import packed_nbytes, packed_shapes

    p = quantize(gaussian((9, 22)), method, bits, block_size=16)
    assert packed_nbytes((9, 22), method, bits, 16) == p.nbytes
    shapes = packed_shapes((9, 22), method, bits, 16)
    assert shapes == {
        "codes": tuple(p.codes.shape),
        "scales": tuple(p.scales.shape),
        "codebook": tuple(p.codebook.shape),
    }
