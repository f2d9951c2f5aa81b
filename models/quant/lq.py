"""Low-rank plus quantised bases (LQ-LoRA / ReALLM): W ~ Q + L1 L2^T, one matrix at a time.

``lq_decompose`` alternates, as LQ-LoRA's Algorithm 1:

    L1 L2^T = SVD_r(W - Q)          (best rank-r fit of what the quantiser missed)
    Q       = quant(W - L1 L2^T)    (quantise what the low-rank part cannot hold)

starting from Q = quant(W), and keeps the iterate with the smallest error
``||W - Q - L1 L2^T||`` (Fisher-weighted if a diagonal Fisher F is given:
``sum F (W - Q - L1 L2^T)^2``); it stops as soon as the error rises. With F, the SVD step
is LQ-LoRA's weighted one: F is approximated by the rank-1 ``r c^T / sum(F)`` of its row
and column sums and ``L = D_r^-1/2 SVD_r(D_r^1/2 (W - Q) D_c^1/2) D_c^-1/2``.

This module holds only that per-matrix maths, so ``models.quant.bit_budget`` can score widths
without the model-level code. The packed layer lives in ``models.quant.linear``
(:class:`QuantizedLinear`) and whole-model quantisation in ``models.quant.model``
(``quantize_model``, ``quantize_base``, ``apply_lq_init``, ``fisher_diag``); both import
this module, never the other way round.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from models.quant.quantizers import PackedTensor, quantize

__all__ = ["LQDecomposition", "QuantTargetError", "lq_decompose", "weighted_error"]


# Exact SVD up to this size; above it a randomised rank-(r + 16) SVD with 4 power iterations:
# ~30x faster on a 1536x576 matrix, and still a projection of the residual, so the first
# LQ iterate can never be worse than plain quantisation.
_EXACT_SVD_MAX = 256
_OVERSAMPLE = 16
_POWER_ITERS = 4


class QuantTargetError(ValueError):
    """No layer to quantise, or a layer that cannot be quantised as asked."""


class LQDecomposition(NamedTuple):
    """``W ~ Q.dequantize() + L1 @ L2.T``; ``history[0]`` is plain quant(W)'s error."""

    Q: PackedTensor
    L1: torch.Tensor  # (out, r), = U sqrt(S)
    L2: torch.Tensor  # (in, r),  = V sqrt(S)
    history: list[float]  # error of every iterate (rank 0 first), sqrt of squared error
    best: int  # index into history of the kept iterate


def weighted_error(diff: torch.Tensor, fisher: torch.Tensor | None = None) -> float:
    """sqrt(sum F diff^2) (plain Frobenius norm without F)."""
    d2 = diff.double().pow(2)
    return math.sqrt(float((d2 * fisher.double()).sum() if fisher is not None else d2.sum()))


def _low_rank(residual: torch.Tensor, rank: int, fisher: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced rank-r factors (L1 (out, r), L2 (in, r)) of the residual (weighted by F)."""
    if fisher is None:
        row = col = None
        m = residual
    else:  # rank-1 approximation of F: F_ij ~ r_i c_j / sum F
        f = fisher.double().clamp(min=0) + 1e-12 * float(fisher.abs().max() + 1e-30)
        row = (f.sum(1) / f.sum().sqrt()).sqrt().float()  # (out,)  sqrt(r_i / sqrt(sum F))
        col = (f.sum(0) / f.sum().sqrt()).sqrt().float()  # (in,)
        m = row[:, None] * residual * col[None, :]
    if min(m.shape) <= _EXACT_SVD_MAX or rank + _OVERSAMPLE >= min(m.shape):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        v = vh.T
    else:  # randomised range finder (Halko et al.); a fixed seed keeps the result reproducible
        with torch.random.fork_rng():
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(m, q=rank + _OVERSAMPLE, niter=_POWER_ITERS)
    root = s[:rank].sqrt()
    l1, l2 = u[:, :rank] * root, v[:, :rank] * root
    if row is not None:
        l1, l2 = l1 / row[:, None], l2 / col[:, None]
    return l1.contiguous(), l2.contiguous()


@torch.no_grad()
def lq_decompose(
    W: torch.Tensor,
    bits: int,
    rank: int,
    quantizer: str = "nf",
    iters: int = 5,
    fisher: torch.Tensor | None = None,
    block_size: int = 64,
) -> LQDecomposition:
    """Decompose ``W (out, in)`` into a b-bit quantised Q plus a rank-r L1 L2^T.

    Args:
        W: the weight in nn.Linear layout.
        bits: bits of Q (2, 3, 4 or 8).
        rank: rank r of the high-precision part (0 gives plain quantisation).
        quantizer: ``uniform``, ``nf`` or ``vq`` (see :mod:`models.quant.quantizers`).
        iters: at most this many (SVD, quantise) rounds.
        fisher: optional diagonal Fisher, shape of W, weighting the error and the SVD.
        block_size: quantiser block size.

    Returns:
        :class:`LQDecomposition` with the best iterate and the error history.

    Example:
        >>> Q, L1, L2, hist, best = lq_decompose(W, bits=3, rank=8)
        >>> W_hat = Q.dequantize() + L1 @ L2.T
    """
    W = W.detach().float().cpu()
    if W.dim() != 2:
        raise QuantTargetError(f"lq_decompose needs a 2-D weight, got shape {tuple(W.shape)}")
    if not 0 <= rank <= min(W.shape):
        raise QuantTargetError(f"rank={rank} does not fit a {tuple(W.shape)} matrix: use 0..{min(W.shape)}")
    if fisher is not None and fisher.shape != W.shape:
        raise QuantTargetError(f"fisher has shape {tuple(fisher.shape)}, the weight {tuple(W.shape)}")
    fisher = None if fisher is None else fisher.detach().float().cpu()
    q = quantize(W, quantizer, bits, block_size)
    resid = W - q.dequantize()  # (out, in) what Q misses
    zero1, zero2 = W.new_zeros(W.shape[0], rank), W.new_zeros(W.shape[1], rank)
    history = [weighted_error(resid, fisher)]
    best = LQDecomposition(q, zero1, zero2, history, 0)
    if rank == 0:
        return best
    for it in range(1, iters + 1):
        l1, l2 = _low_rank(resid, rank, fisher)
        low = l1 @ l2.T
        err = weighted_error(resid - low, fisher)
        history.append(err)
        if err >= history[best.best]:
            break  # the error rose: keep the best iterate so far
        best = LQDecomposition(q, l1, l2, history, it)
        if it < iters:
            q = quantize(W - low, quantizer, bits, block_size)
            resid = W - q.dequantize()
    return best

