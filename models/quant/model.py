"""Whole-model quantisation: swap a model's linear layers for packed ones, LQ-initialise LoRA.

``quantize_model`` swaps linear layers for :class:`QuantizedLinear` (packed codes only,
dequantised per forward). Where ``models.lora.inject`` already wrapped a layer, the
``MultiTaskLoraLinear.base_layer`` is replaced and the low-rank part becomes the adapters'
shared starting point: ``A_shared = L2^T``, ``B_shared = L1 / s`` with ``s = alpha / r``, so
``s B A = L1 L2^T`` and with zero task offsets the layer computes ``(Q + L1 L2^T) x + b``.
Without LoRA on a matrix only Q is kept (its best approximation is then plain quant(W)).
Call ``inject`` first: LoRA cannot yet be injected onto a QuantizedLinear.

``quantize_base`` does the same before ``inject`` (a shared base built once) and keeps the
factors for ``apply_lq_init``; ``fisher_diag`` gives the weights of LQ's Fisher-weighted
error. The per-matrix maths is in ``models.quant.lq``, which re-exports these names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.lora import (
    LoraTargetError,
    MultiTaskLoraLinear,
    block_index,
    linear_dims,
    linear_weight,
    matches_target,
    task_ids,
)
from models.quant.linear import QuantizedLinear
from models.quant.lq import LQDecomposition, QuantTargetError, lq_decompose
from models.train.step import Batch, row_nll

__all__ = [
    "QuantReport",
    "quantizable_matrices",
    "quantize_model",
    "quantize_base",
    "apply_lq_init",
    "fisher_diag",
]


def _linear_weight(module: nn.Module) -> torch.Tensor | None:
    """(out, in) weight of an unquantised nn.Linear / GPT-2 Conv1D, None for anything else."""
    if isinstance(module, QuantizedLinear):
        return None
    try:
        return linear_weight(module)
    except LoraTargetError:
        return None


def _targets(
    model: nn.Module, target_modules: str | Sequence[str], layers: Sequence[int] | None
) -> dict[str, nn.Module]:
    """Logical name -> module to quantise (a MultiTaskLoraLinear or a plain linear)."""
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [target_modules]
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if ".base_layer" in name or module is out_emb:
            continue
        inner = module.base_layer if isinstance(module, MultiTaskLoraLinear) else module
        if _linear_weight(inner) is None and not isinstance(inner, QuantizedLinear):
            continue
        if target_modules != "all-linear" and not matches_target(name, target_modules):
            continue
        if layers is not None and block_index(name) not in set(layers):
            continue
        found[name] = module
    if not found:
        raise QuantTargetError(
            f"target_modules {target_modules!r}" + (f" in layers {list(layers)}" if layers is not None else "")
            + " match no linear layer of this model (the output head is never quantised)"
        )
    return found


def quantizable_matrices(
    model: nn.Module, target_modules: str | Sequence[str] = "all-linear", layers: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Name -> (out, in) base weight of every layer :func:`quantize_model` would replace.

    Raises:
        QuantTargetError: when nothing matches (or a match is already quantised).
    """
    out = {}
    for name, module in _targets(model, target_modules, layers).items():
        inner = module.base_layer if isinstance(module, MultiTaskLoraLinear) else module
        w = _linear_weight(inner)
        if w is None:
            raise QuantTargetError(f"{name} is already quantised: quantise a model once")
        out[name] = w.detach()
    return out


@dataclass
class QuantReport:
    """What :func:`quantize_model` did; ``rows`` has one dict per replaced matrix."""

    rows: list[dict] = field(default_factory=list)

    @property
    def stored_bytes(self) -> int:
        return sum(r["bytes"] for r in self.rows)

    @property
    def numel(self) -> int:
        return sum(r["numel"] for r in self.rows)

    @property
    def recon_rel_error(self) -> float:
        """sqrt(sum ||W - W_hat||^2 / sum ||W||^2) over all replaced matrices (Q + L1 L2^T)."""
        return math.sqrt(sum(r["err2"] for r in self.rows) / max(sum(r["norm2"] for r in self.rows), 1e-30))

    def as_dict(self) -> dict:
        return {
            "stored_bytes": self.stored_bytes, "fp32_bytes": 4 * self.numel, "numel": self.numel,
            "bits_per_weight": 8 * self.stored_bytes / max(self.numel, 1),
            "recon_rel_error": self.recon_rel_error, "matrices": self.rows,
        }


def _choice_of(name: str, bits: int | Mapping | object, quantizer: str) -> tuple[str, int]:
    if isinstance(bits, int):
        return quantizer, bits
    table = bits.choices if hasattr(bits, "choices") else bits  # an Allocation or a plain dict
    if name not in table:
        raise QuantTargetError(
            f"the bit allocation has no entry for {name}: allocate over the same target_modules/layers"
        )
    q, b = table[name]
    return str(q), int(b)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    target_modules: str | Sequence[str] = "all-linear",
    bits: int | Mapping[str, tuple[str, int]] | object = 4,
    rank: int | None = None,
    layers: Sequence[int] | None = None,
    quantizer: str = "nf",
    iters: int = 5,
    fisher: Mapping[str, torch.Tensor] | None = None,
    block_size: int = 64,
    cache_weight: bool = False,
) -> QuantReport:
    """Replace linear layers by :class:`QuantizedLinear`; LQ-initialise LoRA where present.

    Args:
        model: modified in place (after ``models.lora.inject`` if LoRA is used).
        target_modules: ``"all-linear"`` (every linear but the output head) or names as in inject.
        bits: one bit width for all, or an ``Allocation`` / dict name -> (quantizer, bits).
        rank: rank of L1 L2^T on LoRA-wrapped layers; None = the layer's LoRA rank, 0 = plain Q.
        layers: only blocks with these indices.
        quantizer: quantiser when ``bits`` is an int.
        iters: LQ rounds.
        fisher: optional name -> diagonal Fisher (from :func:`fisher_diag`).
        block_size: quantiser block size.
        cache_weight: keep each dequantised weight after its first forward (faster on
            CPU, but the fp32 copies are held: off by default).

    Returns:
        :class:`QuantReport` (bytes, errors, per matrix).

    Example:
        >>> inject(model, ["q_proj", "v_proj"], num_tasks=4, rank=8, alpha=16)
        >>> report = quantize_model(model, ["q_proj", "v_proj"], bits=3)
    """
    report = QuantReport()
    for name, module in _targets(model, target_modules, layers).items():
        wrapped = isinstance(module, MultiTaskLoraLinear)
        inner = module.base_layer if wrapped else module
        w = _linear_weight(inner)
        if w is None:
            raise QuantTargetError(f"{name} is already quantised: quantise a model once")
        method, b = _choice_of(name, bits, quantizer)
        r = 0
        if wrapped:
            if len(set(module.ranks)) > 1 and rank != 0:
                raise QuantTargetError(
                    f"{name}: LQ init needs one LoRA rank for all tasks (got {module.ranks}); pass rank=0"
                )
            r = min(module.ranks) if rank is None else min(rank, min(module.ranks))
        fis = None if fisher is None else fisher.get(name)
        dec, row = _decompose(name, w, method, b, r, iters, fis, block_size)
        new = QuantizedLinear(dec.Q, getattr(inner, "bias", None), cache_weight).to(w.device)
        if wrapped:
            module.base_layer = new
            if dec.best > 0:  # else L = 0: keep LoRA's own init (A random, B = 0), or A = B = 0 would never train
                _set_shared(module, dec.L1, dec.L2)
        else:
            model.set_submodule(name, new)
        report.rows.append(row)
    return report


def _decompose(
    name: str, w: torch.Tensor, method: str, b: int, r: int, iters: int, fis: torch.Tensor | None, block_size: int
) -> tuple[LQDecomposition, dict]:
    """LQ-decompose one matrix; the report row measures W - (Q + L1 L2^T) of the kept iterate."""
    wf = w.detach().float().cpu()
    dec = lq_decompose(wf, b, min(r, min(wf.shape)), method, iters, fis, block_size)
    w_hat = dec.Q.dequantize()
    if dec.best > 0:
        w_hat = w_hat + dec.L1 @ dec.L2.T
    err2 = float((wf - w_hat).double().pow(2).sum())
    norm2 = float(wf.double().pow(2).sum())
    row = {
        "name": name, "quantizer": method, "bits": b, "rank": r if dec.best > 0 else 0, "numel": wf.numel(),
        "bytes": dec.Q.nbytes, "rel_error": math.sqrt(err2 / max(norm2, 1e-30)),
        "rel_error_q_only": dec.history[0] / math.sqrt(max(norm2, 1e-30)) if fis is None else None,
        "lq_history": dec.history, "err2": err2, "norm2": norm2,
    }
    return dec, row


@torch.no_grad()
def _set_shared(module: MultiTaskLoraLinear, l1: torch.Tensor, l2: torch.Tensor) -> None:
    """Start the layer's shared adapter Theta at L1 L2^T: ``A[:r] = L2^T``, ``B[:, :r] = L1 / s``."""
    r = l1.shape[1]
    if r > min(module.ranks) or len(set(module.ranks)) > 1:
        raise QuantTargetError(
            f"LQ rank {r} needs one LoRA rank >= {r} for every task (the layer has ranks {module.ranks}): "
            "lower the LQ rank (0 = plain quantisation) or use one LoRA rank"
        )
    s = float(module.scaling[0])
    module.lora_A_shared[:r] = l2.T.to(module.lora_A_shared)
    module.lora_B_shared[:, :r] = (l1 / s).to(module.lora_B_shared)
    module.lora_B_shared[:, r:] = 0.0  # components above r: standard init, B = 0


@torch.no_grad()
def quantize_base(
    model: nn.Module,
    bits: int | Mapping[str, tuple[str, int]] | object = 4,
    layers: Sequence[int] | None = None,
    target_modules: str | Sequence[str] = "all-linear",
    lq_rank: int = 0,
    lq_targets: Sequence[str] = (),
    quantizer: str = "nf",
    iters: int = 2,
    block_size: int = 64,
) -> tuple[QuantReport, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Quantise a model that has no LoRA yet; keep the LQ factors for the adapters injected later.

    This is the order of a shared base: the quantised base is built once (and put in the
    object store), and every worker injects its own adapters on top and starts their shared
    part from the stored factors (:func:`apply_lq_init`). For the same matrices and settings
    the result equals :func:`quantize_model` after ``inject``.

    Args:
        model: modified in place (its linear layers become :class:`QuantizedLinear`).
        bits: one bit width for all, or an ``Allocation`` / dict name -> (quantizer, bits).
        layers: only blocks with these indices.
        target_modules: which linear layers to quantise (``"all-linear"``: all but the head).
        lq_rank: rank of L1 L2^T for the matrices matching ``lq_targets`` (0: plain Q).
        lq_targets: module names that will get LoRA (as in ``inject``); the others keep plain Q.
        quantizer, iters, block_size: as in :func:`quantize_model`.

    Returns:
        (report, factors) with ``factors[name] = (L1 (out, r), L2 (in, r))`` for every matrix
        whose kept iterate has a low-rank part.

    Example:
        >>> report, factors = quantize_base(model, 4, layers=[1], lq_rank=8, lq_targets=["q_proj"])
        >>> inject(model, ["q_proj"], num_tasks=2, rank=8, alpha=16, layers=[1])
        >>> apply_lq_init(model, factors)
    """
    report = QuantReport()
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in _targets(model, target_modules, layers).items():
        if isinstance(module, MultiTaskLoraLinear):
            raise QuantTargetError(f"{name} already has LoRA: use quantize_model, or quantise before inject")
        w = _linear_weight(module)
        if w is None:
            raise QuantTargetError(f"{name} is already quantised: quantise a model once")
        method, b = _choice_of(name, bits, quantizer)
        r = lq_rank if lq_targets and matches_target(name, lq_targets) else 0
        dec, row = _decompose(name, w, method, b, r, iters, None, block_size)
        model.set_submodule(name, QuantizedLinear(dec.Q, getattr(module, "bias", None)).to(w.device))
        if dec.best > 0:
            factors[name] = (dec.L1.contiguous(), dec.L2.contiguous())
        report.rows.append(row)
    return report, factors


def apply_lq_init(model: nn.Module, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Start every LoRA layer named in ``factors`` at its L1 L2^T (after ``inject``).

    With zero task offsets each such layer then computes ``(Q + L1 L2^T) x + b``: the LQ
    approximation of the original weight, which the adapters improve on.

    Raises:
        QuantTargetError: a factor's layer has no LoRA, or task ranks that cannot hold it.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MultiTaskLoraLinear)}
    for name, (l1, l2) in factors.items():
        if name not in layers:
            raise QuantTargetError(f"{name} has LQ factors but no LoRA layer: inject the same target_modules/layers")
        _set_shared(layers[name], torch.as_tensor(l1), torch.as_tensor(l2))


def fisher_diag(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Batch],
    target_modules: str | Sequence[str] = "all-linear",
    layers: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher of the base weights: mean over batches of grad(loss)^2.

    Each batch contributes the square of its mean-loss gradient (batches of one sequence
    give the per-example empirical Fisher LQ-LoRA uses; larger batches are a cheaper,
    smoother estimate). Batches are ``input_ids`` tensors (N, L) or :class:`Batch` objects.
    A model with LoRA layers is routed to task 0 for plain tensors.

    Returns:
        name -> (out, in) tensor, keyed like :func:`quantizable_matrices`.
    """
    targets = _targets(model, target_modules, layers)
    params: dict[str, torch.Tensor] = {}
    params_owner: dict[str, nn.Module] = {}
    for name, module in targets.items():
        inner = module.base_layer if isinstance(module, MultiTaskLoraLinear) else module
        if _linear_weight(inner) is None:
            raise QuantTargetError(f"{name} is already quantised: compute the Fisher before quantize_model")
        params[name], params_owner[name] = inner.weight, inner
    was = {n: p.requires_grad for n, p in params.items()}
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    has_router = getattr(model, "_loraflock_router", None) is not None
    training = model.training
    model.eval()
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            if isinstance(batch, Batch):
                loss = (batch.weights * row_nll(model, batch)).sum()
            else:
                with task_ids(model, 0) if has_router else nullcontext():
                    logits = model(input_ids=batch).logits[:, :-1].float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            grads = torch.autograd.grad(loss, list(params.values()))
            for n, g in zip(params, grads):
                sums[n] += g.float().pow(2)
            count += 1
    finally:
        for n, p in params.items():
            p.requires_grad_(was[n])
        model.train(training)
    if count == 0:
        raise QuantTargetError("fisher_diag got no calibration batches: pass at least one")
    # Conv1D stores (in, out): report every Fisher in the (out, in) layout of the weight.
    return {n: (f / count).T.contiguous() if linear_dims(params_owner[n])[2] else f / count for n, f in sums.items()}
