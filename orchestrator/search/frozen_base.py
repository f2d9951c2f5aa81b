"""Whole-base quantisation for search trials: the frozen blocks, quantised once per base setting.

With ``search.quantize_layers: adapted`` (the default) a quantised trial quantises only the
adapted top blocks, so its 4-bit base is barely smaller (on SmolLM2, 4 of 30 blocks: 7%).
With ``all`` the blocks below (frozen: no adapter, no gate) are quantised too. Those blocks
are the same for every trial of one *base setting* (``bits`` below 16, or ``bit_budget``),
so :func:`build_frozen` quantises them **once per setting** and runs every training and
eval sequence through them: each setting gets its own frozen-prefix cache, which the
search payload carries to every trial through Ray's object store (one copy per node).
A trial never holds the quantised lower blocks: it starts at the first adapted block from
its setting's prefix and counts their stored bytes from the record (:func:`frozen_bytes`).

The token embedding (with a tied output head) is quantised at ``EMBED_BITS`` = 8 by every
setting (on SmolLM2 it is a fifth of the weights). The frozen blocks' quantisation is plain
(``W ~ Q``, no low-rank part: there is no adapter to start from it), with the search's
quantiser at ``bits``; a ``bit_budget`` (average bits per weight, every stored byte counted)
is allocated over *all* blocks' matrices by :func:`models.quant.bit_budget.allocate` (least
reconstruction error, widths ``BUDGET_CHOICES``), and the trial quantises its adapted blocks
with the allocation's widths (LQ-LoRA, as with ``bits``).

A picked whole-base trial (``search.pick``) is rebuilt as the model it was judged on. The
search keeps what it computed for each setting (the record's ``store``: packed codes of the
frozen blocks and the embedding, the allocation; never recomputed, so no Fisher pass runs
again) and writes the picked setting's to ``out/search/pick/quant_base/``
(:func:`write_frozen_base`), in the layout of the flock's ``quant_base/``:

    quantized_base.safetensors   <module>.codes/scales/codebook/header (+ .bias) of every frozen
                                 matrix, and of the token embedding (<embedding module>.codes ...)
    quant.json                   setting, quantizer, layers, matrices [{name, quantizer, bits,
                                 bytes, ...}], embedding {name, quantizer, bits, block_size},
                                 top_allocation (a bit_budget's widths of the adapted blocks)

:func:`load_frozen_base` (``orchestrator.base.quant.load_quant_base``) puts it into a loaded
base; the recycle stage and ``loraflock export --what pick`` rebuild the adapted blocks on top
(:mod:`orchestrator.search.pick`).

Plain PyTorch; it sits in ``orchestrator/`` because it reads the trials' configurations.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from orchestrator.base.quant import packed_tensors, write_packed_base

__all__ = [
    "BUDGET_CHOICES", "EMBED_BITS", "build_frozen", "frozen_bytes", "frozen_key", "load_embedding", "load_frozen_base",
    "read_frozen_section", "space_settings", "top_allocation", "write_frozen_base",
]

BUDGET_CHOICES: tuple[tuple[str, int], ...] = (("nf", 4), ("nf", 8))  # 2-3 bits lose too much on a 135M model
EMBED_BITS = 8  # the token embedding (and a tied output head) of a whole-base setting
EMBED_BLOCK = 64  # weights per fp16 scale of the embedding's codes
CALIB_ROWS = 32  # training rows (the first of each task) whose Fisher weights a bit budget's allocation


def frozen_key(config: dict) -> str | None:
    """The base setting of a trial's frozen blocks as a payload key, ``None`` when they stay unquantised.

    ``bit_budget`` (when set and below 16) wins over ``bits``.

    Example:
        >>> frozen_key({"bits": 4}), frozen_key({"bits": 16, "bit_budget": 5.5}), frozen_key({"bits": 16})
        ('bits4', 'budget5.5', None)
    """
    budget = config.get("bit_budget")
    if budget is not None and float(budget) < 16:
        return f"budget{float(budget):g}"
    bits = int(config.get("bits", 16))
    return f"bits{bits}" if bits < 16 else None


def space_settings(dimensions: dict) -> list[dict]:
    """Every base setting a space can sample (``bits`` < 16, ``bit_budget`` < 16), each once.

    Args:
        dimensions: ``tune_spaces.loader.SearchSpace.dimensions`` (name -> ``Dimension``).

    Raises:
        ValueError: ``bits`` or ``bit_budget`` is a continuous dimension (settings must be
            enumerable to be built before the trials start).
    """
    out = []
    for name in ("bits", "bit_budget"):
        dim = dimensions.get(name)
        if dim is None:
            continue
        if dim.kind not in ("grid", "choice", "value"):
            raise ValueError(f"search space `{name}`: with search.quantize_layers: all it must be a grid, choice or "
                             f"fixed value (each setting's quantised base is built before the trials), not {dim.kind}")
        for v in dim.values:
            if v is not None and float(v) < 16:
                out.append({name: int(v) if name == "bits" else float(v)})
    return out


def _quantize_frozen(
    model: nn.Module, lower: list[int], setting: dict, quantizer: str, top: list[int],
    fisher: Callable[[], dict | None],
) -> dict:
    """Quantise ``model``'s blocks ``lower`` in place (plain Q); the record of :func:`build_frozen`.

    A ``bit_budget`` is allocated by Fisher-weighted error (``fisher()``: the unquantised base's
    diagonal Fisher, computed once for every setting of the search): on
    SmolLM2 at 6 bits per weight the plain-error allocation cost +9.5% eval ppl on held-out
    stdlib code (26 frozen blocks), the Fisher-weighted one +7.7% (all 30 blocks).
    """
    from models.quant.bit_budget import allocate
    from models.quant.model import quantizable_matrices, quantize_model

    allocation = None
    if "bit_budget" in setting:
        mats = quantizable_matrices(model, "all-linear", layers=lower + top)
        alloc = allocate(mats, float(setting["bit_budget"]), choices=BUDGET_CHOICES, weights=fisher())
        allocation = {r.name: (r.quantizer, r.bits) for r in alloc.rows}
        bits = {n: allocation[n] for n in quantizable_matrices(model, "all-linear", layers=lower)}
    else:
        bits = int(setting["bits"])
    report = quantize_model(model, "all-linear", bits=bits, rank=0, layers=lower, quantizer=quantizer, iters=1,
                            cache_weight=True)
    names = {r["name"] for r in report.rows}
    bias = {n: 2 * int(m.bias.numel()) for n, m in model.named_modules()
            if n in names and getattr(m, "bias", None) is not None}
    stored = {r["name"]: int(r["bytes"]) + bias.get(r["name"], 0) for r in report.rows}
    tensors = packed_tensors(model)  # the lower blocks' codes (the embedding's join them below)
    embed = _quantize_embedding(model, quantizer)
    if embed is not None:
        stored[embed["name"]] = embed.pop("bytes")
        tensors.update(embed.pop("packed"))
    top = None if allocation is None else {n: [q, b] for n, (q, b) in allocation.items() if n not in names}
    section = {
        "mode": "search_setting", "key": frozen_key(setting), "setting": setting, "quantizer": quantizer,
        "layers": lower, "lq_rank": 0, "stored_bytes": sum(stored.values()),
        "recon_rel_error": report.recon_rel_error, "top_allocation": top,
        "matrices": [{k: r[k] for k in ("name", "quantizer", "bits", "bytes", "numel", "rel_error")}
                     for r in report.rows],
        "embedding": None if embed is None else {
            "name": embed["name"], "quantizer": embed["quantizer"], "bits": EMBED_BITS, "block_size": EMBED_BLOCK,
            "bytes": stored[embed["name"]]},
    }
    return {
        "bytes": stored,
        "embed": embed,
        "allocation": top,
        "recon_rel_error": report.recon_rel_error,
        "setting": setting,
        # what the pick writes (write_frozen_base); the search driver takes it out of the trials' payload
        "store": {"tensors": {k: v.numpy() for k, v in tensors.items()}, "section": section},
    }


@torch.no_grad()
def _quantize_embedding(model: nn.Module, quantizer: str) -> dict | None:
    """The token embedding at ``EMBED_BITS`` (in place: a tied output head follows); ``None`` below 10% of the weights.

    On SmolLM2 the embedding (tied with the output head) is 28M of 135M weights: left at 2
    bytes a weight it alone caps a whole-base setting at ~2x smaller. At 8 bits (NF8) the base's
    eval ppl on held-out stdlib code moved 20.66 -> 20.87 (+1%).
    """
    from models.quant.quantizers import quantize

    emb = model.get_input_embeddings()
    if emb is None or emb.weight.numel() < 0.1 * sum(p.numel() for p in model.parameters()):
        return None
    name = next(n for n, m in model.named_modules() if m is emb)
    method = quantizer if quantizer != "vq" else "nf"
    packed = quantize(emb.weight.detach().float().cpu(), method, EMBED_BITS, EMBED_BLOCK)
    weight = packed.dequantize().to(emb.weight.dtype)
    emb.weight.copy_(weight)
    return {"name": name, "weight": weight.numpy(), "bytes": int(packed.nbytes), "quantizer": method,
            "packed": packed.to_tensors(f"{name}.")}


@torch.no_grad()
def load_embedding(model: nn.Module, record: dict | None) -> None:
    """Give a trial's model its setting's quantised token embedding (and so the tied head), in place."""
    embed = None if record is None else record.get("embed")
    if embed is None:
        return
    emb = model.get_submodule(embed["name"])
    # torch.tensor copies: the stored rows are a read-only map (from_numpy would warn and alias them)
    emb.weight.copy_(torch.tensor(np.asarray(embed["weight"])).to(emb.weight.device, emb.weight.dtype))


@torch.no_grad()
def build_frozen(
    model: nn.Module, split: int, settings: list[dict], quantizer: str,
    prefix: Callable[[nn.Module, np.ndarray], np.ndarray], train: list[np.ndarray], evals: list[np.ndarray],
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, dict]:
    """Per base setting: quantise a copy of the blocks below ``split`` once and cache every sequence's prefix.

    Args:
        model: the unquantised base (not modified).
        split: the first adapted block; blocks ``0 .. split-1`` are frozen.
        settings: :func:`space_settings` (duplicates are built once).
        quantizer: the search's quantiser (``nf``, ``uniform``, ``vq``).
        prefix: ``prefix(model, ids)`` -> the hidden states entering block ``split`` (numpy).
        train, evals: each task's token ids.
        say: a progress line per setting (minutes each on SmolLM2: quantising, then every row's prefix).

    Returns:
        key (:func:`frozen_key`) -> ``{"train_prefix", "eval_prefix", "bytes": {matrix: stored
        bytes}, "allocation": {top matrix: [quantizer, bits]} | None, "recon_rel_error", "setting",
        "store"}``; ``store`` (packed codes as numpy and their ``quant.json`` section) is what
        :func:`write_frozen_base` writes for a picked trial.
    """
    from models.base import adaptable_layers

    lower, top = list(range(split)), list(range(split, len(adaptable_layers(model)[1])))
    rows = torch.as_tensor(np.concatenate([x[:CALIB_ROWS] for x in train])[:CALIB_ROWS])  # a budget's Fisher
    calib = [rows[i : i + 8] for i in range(0, len(rows), 8)]
    memo: dict[str, dict | None] = {}

    def fisher() -> dict | None:  # of the unquantised base: the same for every budget (~2 min on SmolLM2)
        if "f" not in memo:
            from models.quant.model import fisher_diag

            t0 = time.perf_counter()
            with torch.enable_grad():  # the payload is built under no_grad
                memo["f"] = fisher_diag(model, calib, layers=lower + top) if calib else None
            say(f"search: the base's Fisher for bit-budget allocation, {len(rows)} rows, in "
                f"{time.perf_counter() - t0:.0f}s")
        return memo["f"]

    out: dict[str, dict] = {}
    for setting in settings:
        key = frozen_key(setting)
        if key is None or key in out:
            continue
        q = copy.deepcopy(model)
        t0 = time.perf_counter()
        record = _quantize_frozen(q, lower, setting, quantizer, top, fisher)
        t1 = time.perf_counter()
        record["train_prefix"] = [prefix(q, x) for x in train]
        record["eval_prefix"] = [prefix(q, x) for x in evals]
        mb = sum(record["bytes"].values()) / 1e6
        say(f"search: base setting {key}: {len(lower)} frozen blocks quantised ({mb:,.1f} MB stored) in "
            f"{t1 - t0:.0f}s, their prefix of every row in {time.perf_counter() - t1:.0f}s")
        out[key] = record
        del q
    return out


def top_allocation(record: dict | None) -> dict[str, tuple[str, int]] | None:
    """The adapted blocks' widths of a ``bit_budget`` setting (``quantize_model``'s ``bits``), else ``None``."""
    if record is None or record.get("allocation") is None:
        return None
    return {n: (str(q), int(b)) for n, (q, b) in record["allocation"].items()}


def frozen_bytes(record: dict | None) -> dict[str, int]:
    """Stored bytes of each quantised frozen matrix (weight codes + scales + header, bias at 2 bytes)."""
    return {} if record is None else {n: int(b) for n, b in record["bytes"].items()}


def write_frozen_base(store: dict, directory: str | Path) -> Path:
    """Write a setting's ``store`` (from :func:`build_frozen`'s record) as a packed base directory, atomically.

    The layout of the flock's ``quant_base/`` (:func:`orchestrator.base.quant.write_packed_base`):
    ``quantized_base.safetensors`` holds each frozen block's packed matrices and the packed token
    embedding; ``quant.json`` names them (``matrices``, ``embedding``) with the setting, and the
    adapted blocks' widths of a ``bit_budget`` (``top_allocation``). The adapted blocks
    themselves are not in it: they are rebuilt with the trial (LQ, gates) and its adapters.
    """
    tensors = {k: torch.tensor(np.array(v)) for k, v in store["tensors"].items()}  # copies: Ray's arrays are read-only
    return write_packed_base(tensors, store["section"], directory)


def read_frozen_section(directory: str | Path) -> dict:
    """The ``quant.json`` of a written setting (:func:`write_frozen_base`), its files checked.

    Raises:
        StageError: the directory or one of its files is missing.
    """
    from orchestrator.errors import StageError

    directory = Path(directory)
    for f in ("quant.json", "quantized_base.safetensors"):
        if not (directory / f).is_file():
            raise StageError(f"search.picked: {directory / f} not found (the picked trial's quantised base, written by "
                             "the search): re-run the search stage (delete its entry in state.json)")
    return json.loads((directory / "quant.json").read_text())


def load_frozen_base(model: nn.Module, directory: str | Path) -> dict:
    """Put a picked trial's written setting (:func:`write_frozen_base`) into ``model``, in place; its ``quant.json``.

    The frozen blocks become the packed layers the search quantised (dequantised per forward)
    and the token embedding its dequantised codes: the model the trial's prefix cache came from.

    Raises:
        StageError: the directory or one of its files is missing.
    """
    from orchestrator.base.quant import load_quant_base

    section = read_frozen_section(directory)
    device = model.get_input_embeddings().weight.device
    for name in load_quant_base(model, directory):
        model.get_submodule(name).to(device)  # the packed layers load on the CPU
    return section
