"""Adapters as plain low-rank pairs, and what a multi-LoRA server needs of them.

Every export kind hands its adapters over as ``{module: (A (r, in), B (out, r))}`` with the
LoRA scale already in ``B`` (``delta W = B @ A``), whatever they were in the run (a slot of a
multi-task layer, a folded picked trial, coefficients on a subspace). From there one path
makes the served adapter:

1. subtract what the export folded into the base (the LQ part ``L1 L2^T`` of a quantised
   base): ``delta - L = [B | -L1] [A ; L2^T]``, exact at rank ``r + r_L``;
2. optionally truncate to a rank by SVD, with the relative Frobenius error reported
   (``||delta - delta_k|| / ||delta||``, from the singular values: nothing is approximated
   silently);
3. pad with zeros to the base module's shape (a padded pruned base) and to one rank for all
   modules (servers take one ``r`` per adapter; ``--max-lora-rank`` pads every adapter).

Written with ``lora_alpha = r`` (scale 1): vLLM and LoRAX read ``r`` and ``lora_alpha`` only,
not PEFT's per-module ``rank_pattern``/``alpha_pattern``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from models.lora import linear_weight
from models.peft_io import module_of_key, read_adapter, write_adapter_dir

__all__ = ["Pairs", "pairs_of_peft", "pairs_of_state", "subtract", "truncate", "served_adapter", "write_served"]

Pairs = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (r, in), B (out, r)), delta W = B @ A
_PREFIX = "base_model.model."


def pairs_of_state(tensors: dict[str, torch.Tensor], scales: dict[str, float]) -> Pairs:
    """PEFT-keyed tensors + each module's ``alpha / r`` -> pairs with the scale in B."""
    ab: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        hit = module_of_key(key)
        if hit:
            ab.setdefault(hit[0], {})[hit[1]] = value.float()
    return {n: (d["A"], d["B"] * scales[n]) for n, d in sorted(ab.items())}


def pairs_of_peft(directory: str | Path) -> Pairs:
    """A PEFT LoRA directory as pairs (``lora_alpha / r`` per module, ``/ sqrt(r)`` with rsLoRA)."""
    cfg, tensors = read_adapter(directory)
    scales = {}
    for key, value in tensors.items():
        hit = module_of_key(key)
        if hit and hit[1] == "A":
            n, r = hit[0], value.shape[0]
            alpha = float(cfg.get("alpha_pattern", {}).get(n, cfg.get("lora_alpha", r)))
            scales[n] = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    return pairs_of_state(tensors, scales)


def subtract(pairs: Pairs, folded: Pairs) -> Pairs:
    """``pairs - folded`` per module, exactly, by stacking factors (rank grows by the folded rank)."""
    out = dict(pairs)
    for n, (a0, b0) in folded.items():
        if n in out:
            a, b = out[n]
            out[n] = (torch.cat([a, a0.to(a)]), torch.cat([b, -b0.to(b)], dim=1))
        else:
            out[n] = (a0.clone(), -b0.clone())
    return out


def truncate(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-``rank`` factors of ``B @ A`` (SVD through the small core); (A', B', err2, norm2).

    ``B = Q_b R_b``, ``A^T = Q_a R_a``, ``R_b R_a^T = U S V^T`` (r x r), so ``B A = (Q_b U) S (Q_a V)^T``
    without forming the (out, in) matrix; ``sqrt(S)`` goes to both sides.
    """
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b2 = (qb @ u[:, :k]) * root
    a2 = (root[:, None] * vh[:k]) @ qa.T
    return a2.float(), b2.float(), float(s[k:].pow(2).sum()), float(s.pow(2).sum())


def _pad(t: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    if tuple(t.shape) == tuple(shape):
        return t.contiguous()
    if t.shape[0] > shape[0] or t.shape[1] > shape[1]:
        raise ValueError(f"cannot pad a {tuple(t.shape)} tensor to {shape}")
    out = torch.zeros(shape, dtype=t.dtype)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def served_adapter(pairs: Pairs, base: nn.Module, folded: Pairs | None = None, rank: int | None = None,
                   pad_rank: int | None = None) -> tuple[Pairs, dict]:
    """Steps 1-3 of the module docstring; returns (pairs, info) with ``info = {rank, truncated_from,
    truncation_rel_error, modules}``.

    Raises:
        ValueError: an adapter rank above ``pad_rank`` (truncate with ``rank``) or a module the base lacks.
    """
    pairs = subtract(pairs, folded or {})
    err2 = norm2 = 0.0
    before = max(a.shape[0] for a, _ in pairs.values())
    if rank is not None:
        cut = {}
        for n, (a, b) in pairs.items():
            a2, b2, e2, n2 = truncate(a, b, rank)
            cut[n], err2, norm2 = (a2, b2), err2 + e2, norm2 + n2
        pairs = cut
    r = max(a.shape[0] for a, _ in pairs.values())
    if pad_rank is not None and r > pad_rank:
        raise ValueError(f"an adapter has rank {r} > --max-lora-rank {pad_rank}: raise it, "
                         f"or truncate with --rank {pad_rank}")
    r = pad_rank or r
    out: Pairs = {}
    for n, (a, b) in pairs.items():
        out_f, in_f = linear_weight(base.get_submodule(n)).shape
        out[n] = (_pad(a, (r, in_f)), _pad(b, (out_f, r)))
    info = {"rank": r, "truncated_from": before if rank is not None and before > rank else None,
            "truncation_rel_error": math.sqrt(err2 / norm2) if norm2 > 0 else 0.0, "modules": len(out)}
    return out, info


def write_served(directory: Path, pairs: Pairs, base: nn.Module, base_name: str | None) -> Path:
    """Write pairs of one rank as a PEFT directory with ``lora_alpha = r`` (scale 1)."""
    tensors, ranks = {}, {}
    for n, (a, b) in pairs.items():
        tensors[f"{_PREFIX}{n}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{_PREFIX}{n}.lora_B.weight"] = b.float().contiguous()
        ranks[n] = int(a.shape[0])
    conv = any(type(base.get_submodule(n)).__name__ == "Conv1D" for n in pairs)  # GPT-2: PEFT's fan_in_fan_out
    return write_adapter_dir(directory, tensors, ranks, {n: float(r) for n, r in ranks.items()}, base_name,
                             fan_in_fan_out=conv)
