"""The job's quantised base (``base.bits`` / ``base.bit_budget``): checks, build, report, notes.

The flock trains its adapters on a base quantised with LQ-LoRA / ReALLM: every linear layer
of the chosen blocks becomes ``W ~ Q + L1 L2^T`` with Q packed at b bits (dequantised per
layer in the forward, :class:`models.quant.linear.QuantizedLinear`) and the rank-r part starting the
adapters' shared Theta. With ``bit_budget`` each matrix's width is chosen by the knapsack of
:mod:`models.quant.bit_budget` (least total squared error of plain quantisation, all stored bytes
counted). The base is quantised ONCE per job, in the task that puts it into Ray's object
store (``orchestrator.flock.driver._base_arrays``): workers map the packed codes and the factors
zero-copy (:mod:`orchestrator.base.store`) instead of quantising or holding fp32 copies.

* :func:`check_quant` runs in preflight on the ``meta`` model: no weights, shapes only;
* :func:`build_quant_base` quantises a loaded base in place and returns the report section
  (``report.json`` ``base.quant``) and the LQ factors;
* :func:`write_quant_base` saves the packed Q next to the adapters, which belong with it
  (:func:`write_packed_base` writes that layout from tensors: a picked whole-base search trial's
  ``search/pick/quant_base/`` too, with its packed token embedding), :func:`load_quant_base` reads it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from models.base import top_block_indices
from models.files import atomic_dir
from models.lora import block_index, matches_target
from models.quant.bit_budget import BudgetError, allocate
from models.quant.linear import QuantizedLinear
from models.quant.lq import QuantTargetError
from models.quant.model import quantizable_matrices, quantize_base
from models.quant.quantizers import ALLOWED_BITS, packed_nbytes
from orchestrator.errors import SpecError

if TYPE_CHECKING:  # annotations only: the search's frozen_base (which the job spec's checks import) imports this
    from orchestrator.spec import JobSpec

__all__ = [
    "quant_layers",
    "check_quant",
    "build_quant_base",
    "write_quant_base",
    "packed_tensors",
    "write_packed_base",
    "load_quant_base",
    "render_quant_md",
    "describe_quant",
    "adapter_note",
    "NOTE_FILE",
    "QUANT_DIR",
    "LQ_FILE",
]

NOTE_FILE = "loraflock_quantized_base.json"  # next to adapter_config.json of every delivered adapter
QUANT_DIR = "quant_base"  # the packed base, in the job's output directory
LQ_FILE = "lq_factors.safetensors"  # <module>.L1 / <module>.L2 of W ~ Q + L1 L2^T, in QUANT_DIR


def quant_layers(model: nn.Module, spec: JobSpec) -> list[int] | None:
    """Block indices whose linear layers are quantised (``None`` = every block)."""
    return None if spec.base.quant.layers == "all" else top_block_indices(model, spec.lora.top_layers)


def _setting(spec: JobSpec) -> str:
    b = spec.base
    return f"base.bit_budget ({b.bit_budget:g})" if b.bit_budget is not None else f"base.bits ({b.bits})"


def _matrices(model: nn.Module, spec: JobSpec) -> dict[str, torch.Tensor]:
    try:
        return quantizable_matrices(model, "all-linear", quant_layers(model, spec))
    except QuantTargetError as e:
        raise SpecError(
            f"{_setting(spec)}: this model has no quantisable layers ({e}); remove base.bits/base.bit_budget, "
            "or set base.quant.layers: all / raise lora.top_layers"
        ) from None


def _choices(spec: JobSpec) -> list[tuple[str, int]]:
    return [(spec.base.quant.quantizer, b) for b in ALLOWED_BITS]


def check_quant(spec: JobSpec, model: nn.Module) -> dict[str, Any] | None:
    """Preflight (``meta`` model, shapes only): something to quantise, a budget that fits.

    Returns ``{"matrices", "numel", "min_bits_per_weight"}`` or ``None`` when not quantised.

    Raises:
        SpecError: naming ``base.bits`` / ``base.bit_budget`` and the fix.
    """
    b = spec.base
    if not b.quantized:
        return None
    mats = _matrices(model, spec)
    numel = sum(int(w.numel()) for w in mats.values())
    bs = b.quant.block_size
    smallest = sum(min(packed_nbytes(tuple(w.shape), q, k, bs) for q, k in _choices(spec)) for w in mats.values())
    min_bits = 8 * smallest / numel
    if b.bit_budget is not None and math.floor(b.bit_budget * numel / 8) < smallest:
        need = math.ceil(min_bits * 1e4) / 1e4
        raise SpecError(
            f"base.bit_budget = {b.bit_budget:g} is below the smallest encoding of the {len(mats)} quantised matrices: "
            f"{smallest} bytes = {min_bits:.4f} bits per weight ({b.quant.quantizer} at 2 bits, fp16 scales per "
            f"{bs} weights, codebooks and headers included); raise base.bit_budget to at least {need:g} "
            "or use base.bits: 2"
        )
    return {"matrices": len(mats), "numel": numel, "min_bits_per_weight": min_bits}


def describe_quant(spec: JobSpec) -> str:
    """One line for ``loraflock validate``: what will be quantised and the smallest possible budget."""
    from models.base import load_config, meta_model

    b = spec.base
    info = check_quant(spec, meta_model(load_config(b.name, b.gguf_file, b.random_init)))
    setting = f"bit_budget {b.bit_budget:g}" if b.bit_budget is not None else f"bits {b.bits}"
    return (
        f"  quantised base: {setting} ({b.quant.quantizer}, LQ rank {spec.lq_rank()}) "
        f"over {info['matrices']} matrices, "
        f"{info['numel']:,} weights; the smallest encoding is {info['min_bits_per_weight']:.3f} bits/weight"
    )


@torch.no_grad()
def build_quant_base(
    model: nn.Module, spec: JobSpec
) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Quantise ``model`` (no LoRA yet) as the job asks; return (report section, LQ factors).

    The LQ low-rank part is computed for the matrices that will get LoRA (``lora.target_modules``
    in the adapted blocks) at ``spec.lq_rank()``; the others keep plain Q.
    """
    t0 = time.perf_counter()
    b, q = spec.base, spec.base.quant
    layers = quant_layers(model, spec)
    mats = _matrices(model, spec)
    adapted = top_block_indices(model, spec.lora.top_layers)
    lq_names = [n for n in mats if matches_target(n, spec.lora.target_modules)
                and (adapted is None or block_index(n) in set(adapted))]
    alloc = None
    bits: Any = b.bits
    if b.bit_budget is not None:
        try:
            alloc = allocate(mats, b.bit_budget, _choices(spec), block_size=q.block_size)
        except BudgetError as e:
            raise SpecError(f"base.bit_budget: {e}") from None
        bits = alloc
    report, factors = quantize_base(model, bits, layers, lq_rank=spec.lq_rank(), lq_targets=lq_names,
                                    quantizer=q.quantizer, iters=q.lq_iters, block_size=q.block_size)
    rows = report.rows
    norm2 = sum(r["norm2"] for r in rows)
    widths: dict[str, int] = {}
    for r in rows:
        widths[f"{r['quantizer']}{r['bits']}"] = widths.get(f"{r['quantizer']}{r['bits']}", 0) + 1
    numel, stored = report.numel, report.stored_bytes
    section: dict[str, Any] = {
        "mode": "bit_budget" if alloc is not None else "bits",
        "bits": b.bits,
        "bit_budget": b.bit_budget,
        "quantizer": q.quantizer,
        "lq_rank": spec.lq_rank(),
        "lq_iters": q.lq_iters,
        "block_size": q.block_size,
        "layers": layers if layers is not None else "all",
        "matrices_count": len(rows),
        "numel": numel,
        "stored_bytes": stored,
        "bf16_bytes": 2 * numel,
        "fp32_bytes": 4 * numel,
        "bits_per_weight": 8 * stored / max(numel, 1),
        "bf16_over_stored": 2 * numel / max(stored, 1),
        "recon_rel_error": report.recon_rel_error,
        "recon_rel_error_q_only": math.sqrt(
            sum(r["rel_error_q_only"] ** 2 * r["norm2"] for r in rows) / max(norm2, 1e-30)
        ),
        "widths": widths,
        "matrices": [
            {k: r[k] for k in ("name", "quantizer", "bits", "rank", "bytes", "numel", "rel_error")} for r in rows
        ],
        "seconds": time.perf_counter() - t0,
    }
    if alloc is not None:
        section["budget_bytes"] = alloc.budget_bytes
        section["within_budget"] = stored <= alloc.budget_bytes
        section["uniform_alternative"] = alloc.uniform  # best single width within the same budget
        section["allocator_total_error"] = alloc.total_error
    return section, factors


def adapter_note(section: dict[str, Any], packed_dir: str = f"../../{QUANT_DIR}") -> dict[str, Any]:
    """What goes into ``NOTE_FILE`` beside an adapter trained on the quantised base."""
    setting = f"bit_budget {section['bit_budget']:g}" if section["mode"] == "bit_budget" else f"bits {section['bits']}"
    return {
        "trained_on_quantized_base": True,
        "setting": setting,
        "quantizer": section["quantizer"], "lq_rank": section["lq_rank"], "block_size": section["block_size"],
        "layers": section["layers"], "packed_base": packed_dir,
        "note": (
            "This adapter was trained on a quantised base (LQ-LoRA): the listed layers' weights are Q, packed in "
            f"{QUANT_DIR}/ of this run, and the low-rank part L1 L2^T of the decomposition W ~ Q + L1 L2^T is inside "
            "this adapter's weights. Use it with that quantised base; on the unquantised base it would add "
            "L1 L2^T to W a second time."
        ),
    }


def packed_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every :class:`QuantizedLinear`'s packed tensors (+ bias) by the module's name in the unmodified model.

    Keys are ``<module>.codes/scales/codebook/header`` (``PackedTensor.from_tensors(t, prefix)``
    rebuilds one) and ``<module>.bias``: the layout of ``quantized_base.safetensors``.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            name = name.replace(".base_layer", "")  # the module's name in the unmodified model
            tensors.update({k: v.detach().cpu().contiguous() for k, v in m.packed.to_tensors(f"{name}.").items()})
            if m.bias is not None:
                tensors[f"{name}.bias"] = m.bias.detach().cpu().contiguous()
    return tensors


def write_packed_base(tensors: dict[str, torch.Tensor], section: dict[str, Any], directory: str | Path,
                      factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Path:
    """Write a packed base directory atomically: ``quantized_base.safetensors``, ``quant.json``
    (``section``: its ``matrices`` name the packed layers, an optional ``embedding`` the packed
    token embedding) and, with ``factors``, ``LQ_FILE``."""
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / "quantized_base.safetensors"))
        (tmp / "quant.json").write_text(json.dumps(section, indent=2))
        if factors:
            lq = {f"{n}.{k}": torch.as_tensor(t).detach().cpu().float().contiguous()
                  for n, (l1, l2) in factors.items() for k, t in (("L1", l1), ("L2", l2))}
            save_file(lq, str(tmp / LQ_FILE))
    return Path(directory)


def write_quant_base(model: nn.Module, section: dict[str, Any], directory: str | Path,
                     factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Path:
    """Save every :class:`QuantizedLinear`'s packed tensors (+ bias) and ``quant.json``, atomically.

    Keys as :func:`packed_tensors`. ``factors`` (the LQ parts L1 (out, r), L2 (in, r)) go to
    ``LQ_FILE``: ``loraflock export`` folds them into a plain base and takes them out of the
    adapters, which carry them (the shared adapter Theta starts at L1 L2^T).
    """
    return write_packed_base(packed_tensors(model), section, directory, factors)


def render_quant_md(section: dict[str, Any], max_rows: int = 40) -> list[str]:
    """The report.md section for ``report.json`` ``base.quant``."""
    s = section
    setting = f"bit budget {s['bit_budget']:g} bits/weight" if s["mode"] == "bit_budget" else f"{s['bits']} bits"
    ls = s["layers"]
    layers = "every block" if ls == "all" else f"block {ls[0]}" if len(ls) == 1 else f"blocks {ls[0]}-{ls[-1]}"
    lines = [
        "## Quantised base", "",
        f"The adapters were trained on a **quantised base** ({setting}, {s['quantizer']} quantiser, LQ rank "
        f"{s['lq_rank']}: W ~ Q + L1 L2^T, the low-rank part starting the shared adapter). They belong with that "
        f"base: its packed weights are in `{QUANT_DIR}/`, and each adapter directory says so in `{NOTE_FILE}`. "
        "The flock's base perplexity above is the quantised base's (Q + L1 L2^T, before training).", "",
        "| | value |", "|---|---:|",
        f"| quantised matrices | {s['matrices_count']} ({layers}, {s['numel']:,} weights) |",
        f"| stored bytes | {s['stored_bytes']:,} ({s['bits_per_weight']:.3f} bits/weight) |",
        f"| bf16 bytes | {s['bf16_bytes']:,} ({s['bf16_over_stored']:.2f}x the stored size) |",
    ]
    if s["mode"] == "bit_budget":
        lines.append(f"| budget bytes | {s['budget_bytes']:,} ({'within' if s['within_budget'] else 'OVER'} budget) |")
    lines += [
        f"| reconstruction rel. error | {s['recon_rel_error']:.4f} (Q alone: {s['recon_rel_error_q_only']:.4f}) |",
        f"| widths | {', '.join(f'{k}: {v}' for k, v in sorted(s['widths'].items()))} |", "",
    ]
    if s["mode"] == "bit_budget":
        u = s.get("uniform_alternative")
        if u:
            lines += [
                f"One width for every matrix within the same budget ({u['quantizer']}{u['bits']}) would give a total "
                f"squared error {u['total_error'] / max(s['allocator_total_error'], 1e-30):.2f}x the allocation's.",
                "",
            ]
        rows = s["matrices"]
        lines += ["| matrix | quantizer | bits | bytes | rel. error |", "|---|---|---:|---:|---:|"]
        lines += [
            f"| {r['name']} | {r['quantizer']} | {r['bits']} | {r['bytes']:,} | {r['rel_error']:.4f} |"
            for r in rows[:max_rows]
        ]
        if len(rows) > max_rows:
            lines.append(f"| ... {len(rows) - max_rows} more in report.json `base.quant.matrices` | | | | |")
        lines.append("")
    return lines


def load_quant_base(model: nn.Module, directory: str | Path) -> list[str]:
    """Put a run's packed base (``quant_base/``) into a freshly loaded unquantised base, in place.

    The delivered adapters then load on top exactly as they were trained (inject the job's
    target modules and layers, then ``models.peft_io.load_adapter``). A ``quant.json`` with an
    ``embedding`` entry (a picked whole-base search trial, :mod:`orchestrator.search.frozen_base`)
    also replaces the token embedding's weight by its dequantised codes (a tied head follows).

    Returns:
        The names of the replaced layers (and of the embedding, when one was stored).

    Example:
        >>> model = load_base(...); load_quant_base(model, "runs/job/quant_base")
        >>> inject(model, targets, num_tasks=1, rank=8, alpha=16, layers=[29])
        >>> load_adapter(model, 0, "runs/job/adapters/json")
    """
    from safetensors.torch import load_file

    from models.quant.quantizers import PackedTensor

    directory = Path(directory)
    section = json.loads((directory / "quant.json").read_text())
    tensors = load_file(str(directory / "quantized_base.safetensors"))
    names = [r["name"] for r in section["matrices"]]
    for name in names:
        packed = PackedTensor.from_tensors(tensors, f"{name}.")
        layer = QuantizedLinear(packed, tensors.get(f"{name}.bias"))
        model.set_submodule(name, layer)
    embed = section.get("embedding")
    if embed:
        weight = model.get_submodule(embed["name"]).weight
        with torch.no_grad():
            weight.copy_(PackedTensor.from_tensors(tensors, f"{embed['name']}.").dequantize().to(weight))
        names.append(embed["name"])
    return names
