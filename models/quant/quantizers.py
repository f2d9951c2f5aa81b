"""Weight quantisers that store real packed bytes: absmax uniform, NormalFloat and VQ.

Every quantiser works on blocks of ``block_size`` consecutive weights of the row-major
flattened matrix (zero-padded to a whole number of blocks). A block keeps one fp16 scale,
its absmax ``s = max |w|``, and each weight (or each vector of weights) keeps a b-bit code:

* ``uniform``: 2^b evenly spaced levels on [-1, 1]:  w ~ s * (-1 + 2 k / (2^b - 1)).
* ``nf`` (NormalFloat, QLoRA's NF4 for any b): levels are quantiles of N(0, 1) normalised
  to [-1, 1]; 2^(b-1) positive levels, 2^(b-1) - 1 negative ones and an exact zero, with
  QLoRA's end offset ``1 - (1/(2*2^b) + 1/(2*(2^b - 1))) / 2`` (0.9677 at 4 bits).
  Information-theoretically optimal for normally distributed weights.
* ``vq`` (ReALLM's vector quantisation, without its optional neural decoder): the
  normalised block is cut into vectors of ``d`` weights and each vector is replaced by the
  nearest of ``2^(b d)`` codewords of a k-means codebook learnt on this matrix (stored as
  fp16). We use ``d = 2`` for b <= 4 (16 / 64 / 256 codes: pairs capture the joint shape
  of the weights at the same b bits per weight) and ``d = 1`` at 8 bits (a 256-level
  scalar k-means grid; 2^16 codes of pairs would cost more to learn than they save).

Codes are bit-packed little-endian into a uint8 stream, so 3-bit codes really take 3 bits.
``PackedTensor.nbytes`` is the exact size of the tensors it stores (codes + fp16 scales +
codebook + a small int32 header): per weight that is ``b + 16 / block_size`` bits plus the
codebook, e.g. 4.25 bits for NF4 with blocks of 64 (scales are not double-quantised).
The uniform and NF grids are constants of the format and are not stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

__all__ = [
    "ALLOWED_BITS",
    "QUANTIZERS",
    "QuantConfigError",
    "PackedTensor",
    "quantize",
    "nf_levels",
    "uniform_levels",
    "vq_dim",
    "pack_bits",
    "unpack_bits",
    "packed_shapes",
    "packed_nbytes",
]

ALLOWED_BITS = (2, 3, 4, 8)
QUANTIZERS = ("uniform", "nf", "vq")
_KMEANS_ITERS = 12
_KMEANS_SAMPLE = 1 << 15  # vectors used to fit the codebook (all of them are then assigned)
_ASSIGN_CHUNK = 1 << 15


class QuantConfigError(ValueError):
    """A quantiser setting outside what is supported; the message names the allowed values."""


def _check(method: str, bits: int, block_size: int) -> None:
    if method not in QUANTIZERS:
        raise QuantConfigError(f"quantizer {method!r} is unknown: use one of {list(QUANTIZERS)}")
    if bits not in ALLOWED_BITS:
        raise QuantConfigError(f"bits={bits} is not supported: use one of {list(ALLOWED_BITS)}")
    if block_size < 2 or block_size % 2:
        raise QuantConfigError(f"block_size={block_size} must be an even number >= 2 (e.g. 64)")


def vq_dim(bits: int) -> int:
    """Weights per VQ vector: 2 up to 4 bits (2^(2b) codes), 1 at 8 bits (256 codes)."""
    return 2 if bits <= 4 else 1


# --------------------------------------------------------------------------- grids
@cache
def uniform_levels(bits: int) -> torch.Tensor:
    """2^b evenly spaced levels on [-1, 1] (both ends hit the block's absmax)."""
    return torch.linspace(-1.0, 1.0, 2**bits)


@cache
def nf_levels(bits: int) -> torch.Tensor:
    """NormalFloat levels (QLoRA's ``create_normal_map`` generalised to b bits), sorted."""
    from scipy.stats import norm

    n = 2**bits
    offset = 1.0 - 0.5 * (1.0 / (2 * n) + 1.0 / (2 * (n - 1)))
    pos = norm.ppf(torch.linspace(offset, 0.5, n // 2 + 1)[:-1].double().numpy())
    neg = -norm.ppf(torch.linspace(offset, 0.5, n // 2)[:-1].double().numpy())
    v = torch.tensor(sorted([*pos.tolist(), 0.0, *neg.tolist()]), dtype=torch.float64)
    return (v / v.abs().max()).float()


@cache
def _grid_on(method: str, bits: int, device: torch.device) -> torch.Tensor:
    """The level grid of ``method`` on ``device``, copied there once per process, not per forward."""
    grid = nf_levels(bits) if method == "nf" else uniform_levels(bits)
    return grid.to(device)


# --------------------------------------------------------------------------- bit packing
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) into a little-endian bit stream of ceil(n b / 8) uint8.

    Eight b-bit codes make exactly b bytes: they are summed into one int64 word
    ``sum_j code_j << (j b)`` whose b low bytes are stored.
    """
    codes = codes.reshape(-1).long()
    n = codes.numel()
    if bits == 8:
        return codes.to(torch.uint8)
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, plain uint8 arithmetic
        per = 8 // bits
        c = torch.cat([codes, codes.new_zeros((-n) % per)]).to(torch.uint8).view(-1, per)
        return (c << (torch.arange(per, dtype=torch.uint8) * bits)).sum(dim=1, dtype=torch.uint8)
    pad = (-n) % 8
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    words = (codes.view(-1, 8) << (torch.arange(8) * bits)).sum(dim=1)  # (groups,) b*8 bits each
    out = ((words[:, None] >> (torch.arange(bits) * 8)) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: (n * bits + 7) // 8]


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes as int64."""
    dev = packed.device
    if bits == 8:
        return packed[:count].long()
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=dev)
        return ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count].long()
    pad = (-packed.numel()) % bits
    if pad:
        packed = torch.cat([packed, packed.new_zeros(pad)])
    word_dtype = torch.int32 if bits * 8 <= 31 else torch.int64  # 8 codes = one 3*8 or 6*8-bit word
    words = (packed.view(-1, bits).to(word_dtype) << (torch.arange(bits, device=dev, dtype=word_dtype) * 8)).sum(
        dim=1, dtype=word_dtype
    )
    shifts = torch.arange(8, device=dev, dtype=word_dtype) * bits
    return ((words[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count].long()


# --------------------------------------------------------------------------- storage
def packed_shapes(shape: tuple[int, ...], method: str, bits: int, block_size: int = 64) -> dict[str, tuple[int, ...]]:
    """Shapes of the stored tensors (codes, scales, codebook) of a ``shape`` tensor, without quantising.

    Lets a model skeleton be built on the ``meta`` device (or a budget be checked) from the
    weight shapes alone; ``quantize`` produces exactly these shapes.
    """
    _check(method, bits, block_size)
    n_blocks = -(-math.prod(shape) // block_size)
    d = vq_dim(bits) if method == "vq" else 1
    n_codes = n_blocks * block_size // d
    return {
        "codes": ((n_codes * bits * d + 7) // 8,),
        "scales": (n_blocks,),
        "codebook": (2 ** (bits * d), d) if method == "vq" else (0, 1),
    }


def packed_nbytes(shape: tuple[int, ...], method: str, bits: int, block_size: int = 64) -> int:
    """Exact ``PackedTensor.nbytes`` of a ``shape`` tensor in this format (shape-determined)."""
    s = packed_shapes(shape, method, bits, block_size)
    codes = s["codes"][0]
    scales = 2 * s["scales"][0]
    codebook = 2 * math.prod(s["codebook"])
    header = 4 * (3 + len(shape))
    return codes + scales + codebook + header


_METHOD_ID = {m: i for i, m in enumerate(QUANTIZERS)}


@dataclass
class PackedTensor:
    """A quantised matrix held as real packed bytes.

    Attributes:
        method: ``uniform``, ``nf`` or ``vq``.
        bits: bits per weight of the codes.
        shape: shape of the original tensor.
        block_size: weights sharing one fp16 scale.
        codes: (ceil(n_codes * bits_per_code / 8),) uint8 packed codes.
        scales: (n_blocks,) fp16 absmax per block.
        codebook: (2^(b d), d) fp16 for ``vq``; empty otherwise.
    """

    method: str
    bits: int
    shape: tuple[int, ...]
    block_size: int
    codes: torch.Tensor
    scales: torch.Tensor
    codebook: torch.Tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def vec_dim(self) -> int:
        return vq_dim(self.bits) if self.method == "vq" else 1

    def _header(self) -> torch.Tensor:
        return torch.tensor([_METHOD_ID[self.method], self.bits, self.block_size, *self.shape], dtype=torch.int32)

    @property
    def nbytes(self) -> int:
        """Exact bytes of everything :meth:`to_tensors` stores (codes, scales, codebook, header)."""
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def dequantize(self) -> torch.Tensor:
        """The fp32 reconstruction, in the original shape."""
        n_blocks = self.scales.numel()
        padded = n_blocks * self.block_size
        d = self.vec_dim
        idx = unpack_bits(self.codes, self.bits * d, padded // d)
        if self.method == "vq":
            values = self.codebook.float()[idx].reshape(n_blocks, self.block_size)
        else:
            values = _grid_on(self.method, self.bits, self.codes.device)[idx].view(n_blocks, self.block_size)
        w = values * self.scales.float()[:, None]
        return w.reshape(-1)[: self.numel].view(self.shape)

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """safetensors-ready tensors (keys ``<prefix>codes/scales/codebook/header``)."""
        return {
            f"{prefix}codes": self.codes,
            f"{prefix}scales": self.scales,
            f"{prefix}codebook": self.codebook,
            f"{prefix}header": self._header(),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> PackedTensor:
        """Rebuild from :meth:`to_tensors` output (e.g. ``safetensors.torch.load_file``)."""
        try:
            header = tensors[f"{prefix}header"].tolist()
            method_id, bits, block_size, *shape = header
            return cls(
                QUANTIZERS[method_id], bits, tuple(shape), block_size,
                tensors[f"{prefix}codes"], tensors[f"{prefix}scales"], tensors[f"{prefix}codebook"],
            )
        except (KeyError, IndexError, ValueError) as e:
            raise QuantConfigError(f"not a packed tensor under prefix {prefix!r}: {e}") from None


# --------------------------------------------------------------------------- quantisers
def _nearest(values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of a sorted 1-D grid for every value."""
    mids = (grid[1:] + grid[:-1]) / 2
    return torch.bucketize(values, mids)


def _kmeans(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Lloyd's k-means on a sample of the rows of ``x`` (n, d); returns (k, d) centroids.

    Initialised from random distinct data points; an empty cluster is re-seeded with the
    point farthest from its centroid.
    """
    gen = torch.Generator().manual_seed(seed)
    if x.shape[0] > _KMEANS_SAMPLE:
        x = x[torch.randperm(x.shape[0], generator=gen)[:_KMEANS_SAMPLE]]
    uniq = torch.unique(x, dim=0)
    if uniq.shape[0] <= k:  # fewer distinct vectors than codes: store them exactly
        return torch.cat([uniq, uniq[:1].expand(k - uniq.shape[0], -1)])
    cent = uniq[torch.randperm(uniq.shape[0], generator=gen)[:k]].clone()
    for _ in range(_KMEANS_ITERS):
        assign = _assign(x, cent)
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        cent = torch.where(empty[:, None], cent, sums / counts.clamp(min=1)[:, None])
        if empty.any():
            far = (x - cent[assign]).pow(2).sum(1).topk(int(empty.sum())).indices
            cent[empty] = x[far]
    return cent


def _assign(x: torch.Tensor, cent: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of every row, in chunks to bound the (n, k) distance matrix."""
    out = []
    c2 = cent.pow(2).sum(1)
    for i in range(0, x.shape[0], _ASSIGN_CHUNK):
        xi = x[i : i + _ASSIGN_CHUNK]
        out.append((c2[None, :] - 2 * xi @ cent.T).argmin(dim=1))  # ||x||^2 is constant per row
    return torch.cat(out)


@torch.no_grad()
def quantize(
    weight: torch.Tensor, method: str = "nf", bits: int = 4, block_size: int = 64, seed: int = 0
) -> PackedTensor:
    """Quantise a tensor to packed codes.

    Args:
        weight: any-shape float tensor (usually a linear layer's (out, in) weight).
        method: ``uniform`` (blockwise absmax), ``nf`` (NormalFloat) or ``vq`` (k-means).
        bits: bits per weight, one of 2, 3, 4, 8.
        block_size: weights per fp16 absmax scale (even; 64 as in QLoRA).
        seed: k-means initialisation seed (``vq`` only).

    Example:
        >>> p = quantize(torch.randn(128, 64), "nf", 4)
        >>> err = (p.dequantize() - w).norm() / w.norm()
    """
    _check(method, bits, block_size)
    shape = tuple(weight.shape)
    flat = weight.detach().reshape(-1).float().cpu()
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, block_size)  # (n_blocks, block)
    scales = blocks.abs().amax(dim=1).to(torch.float16)
    s = scales.float().clamp(min=torch.finfo(torch.float16).tiny)
    normed = (blocks / s[:, None]).clamp(-1.0, 1.0)  # scale as stored: fp16 rounding included
    codebook = torch.zeros(0, 1, dtype=torch.float16)
    if method == "vq":
        d = vq_dim(bits)
        vectors = normed.reshape(-1, d)
        cent = _kmeans(vectors, 2 ** (bits * d), seed).to(torch.float16)
        codes, codebook = _assign(vectors, cent.float()), cent
        code_bits = bits * d
    else:
        grid = nf_levels(bits) if method == "nf" else uniform_levels(bits)
        codes, code_bits = _nearest(normed.reshape(-1), grid), bits
    return PackedTensor(method, bits, shape, block_size, pack_bits(codes, code_bits), scales, codebook)
