"""What a search trial's model would store when deployed: :func:`deployed_bytes`.

Deployed size, in bytes, of the model one would ship:

* base weights the trial does not compress (embeddings, lower blocks, norms, output head;
  tied weights once): 2 bytes each (bf16 deployment);
* each compressed matrix of the top blocks: its kept rows x kept columns (a row/column is
  removed when its eval gate is 0 for every task, as ``sparsity_report`` counts; the rows a
  gated consumer's closed columns take from its producers as well, as the export removes
  them: ``gate_proj``/``up_proj`` rows of a closed MLP channel, ``q_proj`` rows of a closed
  head, ``models.gates.export.coupled_producers``), stored at
  2 bytes per weight if unquantised, or as the real packed bytes of that kept submatrix
  (codes + fp16 block scales + codebook + header, ``models.quant.quantizers.PackedTensor.nbytes``);
  biases at 2 bytes per kept row; plus the kept-index bitmaps (ceil(out/8) + ceil(in/8)
  bytes) of each gated matrix;
* adapters: every task's full adapter (A_t = A_shared + dA[t], B_t likewise, the LQ
  low-rank part included) at its rank over the kept dimensions, 2 bytes per parameter.

Kept apart from the trial's training (:mod:`orchestrator.search.trial`) because the pack
host sizes its leases with it too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.gates.export import coupled_producers
from models.gates.heads import closed_per_bundle
from models.gates.layer import GatedLinear, sparsity_report
from models.lora import MultiTaskLoraLinear, linear_dims
from models.quant.linear import QuantizedLinear
from models.quant.quantizers import quantize

__all__ = ["deployed_bytes"]

_PACKED_CACHE: dict[tuple, int] = {}


def _packed_nbytes(method: str, bits: int, block_size: int, rows: int, cols: int) -> int:
    """Exact stored bytes of a (rows, cols) matrix in this packed format (shape-determined)."""
    key = (method, bits, block_size, rows, cols)
    if key not in _PACKED_CACHE:
        _PACKED_CACHE[key] = quantize(torch.zeros(rows, cols), method, bits, block_size).nbytes
    return _PACKED_CACHE[key]


def _base_matrix_bytes(base: nn.Module, rows: int, cols: int) -> int:
    bias = getattr(base, "bias", None)
    extra = 2 * rows if bias is not None else 0
    if isinstance(base, QuantizedLinear):
        return _packed_nbytes(base.method, base.bits, base.block_size, rows, cols) + extra
    return 2 * rows * cols + extra


def _adapter_bytes(layer: MultiTaskLoraLinear, rows: int, cols: int) -> int:
    return sum(2 * r * (rows + cols) for r in layer.ranks)


def _kept(mod: GatedLinear, report: dict | None, keep: float | None) -> tuple[int, int]:
    """Kept (rows, cols) of a gated matrix: now (``report``), or at ``keep`` of each gated side."""
    if keep is None:
        return report["rows_kept"], report["cols_kept"]
    rows = max(1, round(mod.out_features * keep)) if mod.theta_rows is not None else mod.out_features
    if mod.theta_cols is None:
        cols = mod.in_features
    elif mod.col_group > 1:  # heads: the same count closed under every KV head
        per = mod.in_features // mod.col_group // mod.col_bundles
        cols = (per - closed_per_bundle(per, 1.0 - keep)) * mod.col_bundles * mod.col_group
    else:
        cols = max(1, round(mod.in_features * keep))
    return rows, cols


@torch.no_grad()
def deployed_bytes(model: nn.Module, keep: float | None = None, frozen: dict[str, int] | None = None) -> dict:
    """Bytes of the deployed model (see the module docstring for the exact definition).

    Args:
        keep: instead of the gates' current state, keep this fraction of every gated
            matrix's rows and columns (``1 - target_sparsity``: the size the trial is
            headed for; the penalty drives the mean open gate to ``1 - target``).
        frozen: stored bytes of the frozen matrices a whole-base setting quantised once for
            every trial (:func:`orchestrator.search.frozen_base.frozen_bytes`, by module name);
            they count as compressed at those bytes instead of 2 bytes per weight.

    Returns:
        ``{"model_bytes", "base_bytes", "compressed_bytes", "adapter_bytes", "mask_bytes"}``.
    """
    gated = any(isinstance(m, GatedLinear) for m in model.modules())
    kept = sparsity_report(model)["layers"] if gated and keep is None else {}
    names = {id(m): n for n, m in model.named_modules()}
    implied: dict[int, int] = {}  # id(producer) -> the rows its gated consumer leaves it
    for consumer, producers in coupled_producers(model) if gated else []:
        cols = _kept(consumer, kept.get(names[id(consumer)]), keep)[1]
        implied.update({id(p): cols for p in producers})
    seen: set[int] = set()
    handled: set[int] = set()
    compressed = adapters = masks = 0

    def claim(module: nn.Module) -> None:
        handled.update(id(m) for m in module.modules())
        seen.update(id(p) for p in module.parameters())

    for name, mod in model.named_modules():
        if id(mod) in handled:
            continue
        if frozen and name in frozen:
            compressed += int(frozen[name])
            claim(mod)
            continue
        if isinstance(mod, GatedLinear):
            rows, cols = _kept(mod, kept.get(name), keep)
            masks += math.ceil(mod.out_features / 8) + math.ceil(mod.in_features / 8)
            inner = mod.inner
        elif isinstance(mod, (MultiTaskLoraLinear, QuantizedLinear)) or id(mod) in implied:
            in_f, out_f = (mod.in_features, mod.out_features) if isinstance(mod, MultiTaskLoraLinear) \
                else linear_dims(mod)[:2]
            rows, cols, inner = out_f, in_f, mod
        else:
            continue
        rows = min(rows, implied.get(id(mod), rows))
        if isinstance(inner, MultiTaskLoraLinear):
            adapters += _adapter_bytes(inner, rows, cols)
            compressed += _base_matrix_bytes(inner.base_layer, rows, cols)
        else:
            compressed += _base_matrix_bytes(inner, rows, cols)
        claim(mod)
    base = sum(2 * p.numel() for p in model.parameters() if id(p) not in seen)
    total = base + compressed + adapters + masks
    return {"model_bytes": int(total), "base_bytes": int(base), "compressed_bytes": int(compressed),
            "adapter_bytes": int(adapters), "mask_bytes": int(masks)}
