"""Which search trials can share a pack host, and under which key: pure functions of a config.

Its own module because both sides need it without importing each other: the thin trial
(:mod:`orchestrator.search.packed_trial`, which must not import torch) picks the host to
lease from, and the host (:mod:`orchestrator.search.pack_host`) checks every lease.
"""

from __future__ import annotations

from orchestrator.search.frozen_base import frozen_key

__all__ = ["base_setting", "host_key", "packable", "setting_of"]


def base_setting(config: dict, quantizer: str, lq_iters: int, max_rank: int) -> dict | None:
    """The base a trial trains on, as a pack host's key; ``None`` when it cannot share one.

    Gated trials (trainable gates on the base weights) do not pack; the unquantised base
    serves every rank up to ``max_rank``; a quantised base is specific to (bits, quantizer,
    LQ iterations, rank), since LQ-LoRA's ``Q`` depends on the rank.
    """
    if float(config.get("target_sparsity", 0.0)) > 0:
        return None
    bits, rank = int(config.get("bits", 16)), int(config.get("rank", 0))
    if bits >= 16:
        return {"bits": 16} if rank <= max_rank else None
    return {"bits": bits, "quantizer": str(config.get("quantizer", quantizer)), "lq_iters": int(lq_iters), "rank": rank}


def setting_of(config: dict, max_rank: int) -> dict | None:
    """A Tune config's base setting, with the search's fixed quantiser and LQ rounds (``config['_search']``)."""
    fixed = config.get("_search", {})
    if fixed.get("quantize_layers") == "all" and frozen_key(config) is not None:
        return None  # whole-base settings run unpacked, on their own prefix cache (orchestrator.search.frozen_base)
    return base_setting(config, fixed.get("quantizer", "nf"), int(fixed.get("lq_iters", 2)), max_rank)


def packable(config: dict, max_rank: int) -> bool:
    """Whether a trial runs as a slot group on some pack host (see :func:`base_setting`)."""
    return setting_of(config, max_rank) is not None


def host_key(setting: dict) -> str:
    """A short, name-safe key of a base setting (part of a pack host's actor name)."""
    if setting["bits"] >= 16:
        return "dense"
    return f"q{setting['bits']}-{setting['quantizer']}-i{setting['lq_iters']}-r{setting['rank']}"
