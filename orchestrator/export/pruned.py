"""Export kind ``pruned``: the gated flock's pruned model, at one MLP width, and its adapters.

The run's ``export/model`` keeps each block's own kept width (real smaller matmuls), which
only :func:`models.gates.export.load_pruned` can build: ``transformers`` configs, vLLM and
LoRAX all take one ``intermediate_size``. The export therefore pads every block to the
largest kept width with zeros: channel ``k >= width_l`` of block ``l`` gets zero rows in
``gate_proj``/``up_proj`` (GPT-2: ``c_fc``, zero bias) and a zero column in ``down_proj``
(``c_proj``), so it adds ``act(0) * 0`` (Llama) or ``0 * act(0)`` (GPT-2) = 0: exact, and
``from_pretrained`` loads it anywhere. The cost is honest too: blocks narrower than the widest
run at the widest width in a server; with ``gates.allocation: layer`` on every block (one
width) nothing is padded and the speedup is kept whole.

Query heads (``gates.heads``) are padded the same way, one config ``num_attention_heads`` for
all blocks, but not at the tail: query head ``h`` reads KV head ``h // g``, so a block that
kept ``k`` of ``g`` heads per KV head puts them at heads ``b*g .. b*g+k-1`` of KV head ``b``'s
bundle and zeros after them (:func:`head_slots`). A zero head adds nothing: its ``o_proj``
columns are zero. The served count is the most any block kept, raised by whole KV groups
until the config accepts it (Llama's must divide ``hidden_size``; :func:`served_heads`). Its
adapters (``q_proj``'s B rows, ``o_proj``'s A columns) move alike.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from models.gates.export import WIDTH_KEYS, load_pruned, mlp_widths
from models.gates.heads import attention_modules, config_accepts_heads, head_counts, kv_heads, set_config_heads
from orchestrator.export.bundle import Bundle
from orchestrator.export.lowrank import pairs_of_peft
from orchestrator.export.run_dir import ExportError, Run, need

__all__ = ["pruned_bundle", "pad_to_one_width", "served_heads", "head_slots", "place_head_adapters"]


def served_heads(pruned: nn.Module) -> int | None:
    """The query-head count of the served config: the most any block kept, or the next count the
    config accepts (a multiple of the KV heads; Llama's must divide ``hidden_size``); None: no heads."""
    counts = head_counts(pruned)
    if not counts:
        return None
    attn = next(iter(attention_modules(pruned).values()))
    kv, d = kv_heads(attn), int(attn.head_dim)
    for heads in range(max(counts), max(counts) + 64 * kv + 1, kv):
        if config_accepts_heads(pruned.config, heads, d):
            return heads
    raise ExportError(f"{type(pruned.config).__name__} accepts no query-head count from {max(counts)} up: "
                      "export this run's pruned model with models.gates.export.load_pruned instead of a served bundle")


def head_slots(pruned: nn.Module, widest: int | None) -> dict[str, torch.Tensor]:
    """Attention module -> the padded positions of its kept heads' rows/columns, for every block
    with fewer query heads than ``widest`` (bundle ``b``'s ``j``-th kept head -> head ``b * g_max + j``)."""
    counts = head_counts(pruned)
    if not counts or widest is None:
        return {}
    out = {}
    for (name, attn), heads in zip(attention_modules(pruned).items(), counts, strict=True):
        if heads == widest:
            continue
        kv, d = kv_heads(attn), int(attn.head_dim)
        at = (torch.arange(kv)[:, None] * (widest // kv) + torch.arange(heads // kv)[None, :]).flatten()
        out[name] = (at[:, None] * d + torch.arange(d)[None, :]).flatten()
    return out


def _placed(t: torch.Tensor, shape: tuple[int, ...], dim: int, at: torch.Tensor) -> torch.Tensor:
    return torch.zeros(shape, dtype=t.dtype).index_copy_(dim, at, t)


def place_head_adapters(pairs: dict, slots: dict[str, torch.Tensor], width: int) -> dict:
    """Move the adapters of blocks with fewer heads to the padded head positions (``width`` = heads x head size)."""
    out = dict(pairs)
    for name, at in slots.items():
        if f"{name}.q_proj" in out:  # B rows are query outputs
            a, b = out[f"{name}.q_proj"]
            out[f"{name}.q_proj"] = (a, _placed(b, (width, b.shape[1]), 0, at))
        if f"{name}.o_proj" in out:  # A columns are head inputs
            a, b = out[f"{name}.o_proj"]
            out[f"{name}.o_proj"] = (_placed(a, (a.shape[0], width), 1, at), b)
    return out


@torch.no_grad()
def pad_to_one_width(pruned: nn.Module) -> tuple[nn.Module, list[int], dict[str, torch.Tensor]]:
    """The same model class at one MLP width (the largest kept) and one query-head count, zero-padded;
    (model, old widths, :func:`head_slots` of the blocks whose heads were padded)."""
    from transformers import AutoModelForCausalLM

    widths = mlp_widths(pruned)
    width = max(widths)
    cfg = copy.deepcopy(pruned.config)
    for key in WIDTH_KEYS:
        if hasattr(cfg, key):
            setattr(cfg, key, width)
    heads = served_heads(pruned)
    if heads is not None:
        set_config_heads(cfg, heads, int(next(iter(attention_modules(pruned).values())).head_dim))
    slots = head_slots(pruned, heads)
    where = {f"{n}.q_proj.{p}": (n, 0) for n in slots for p in ("weight", "bias")}
    where |= {f"{n}.o_proj.weight": (n, 1) for n in slots}
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    src = pruned.state_dict()
    state = {}
    for k, v in model.state_dict().items():
        t = src[k].float()
        if t.shape != v.shape and k in where:  # a block with fewer query heads: into its heads' slots
            name, dim = where[k]
            t = _placed(t, tuple(v.shape), dim, slots[name])
        elif t.shape != v.shape:
            pad = torch.zeros_like(v)
            pad[tuple(slice(0, n) for n in t.shape)] = t
            t = pad
        state[k] = t
    model.load_state_dict(state)
    model.tie_weights()
    model.requires_grad_(False)
    return model.eval(), widths, slots


def pruned_bundle(run: Run, tasks: list[str]) -> Bundle:
    """The gated flock's pruned base (padded to one width) and its adapters (``export/``)."""
    exp = run.path / "export"
    if run.spec.gates.scope == "task":  # every task has its own pruned base: one task per export
        if len(tasks) != 1:
            raise ExportError(f"{run.path}: gates.scope is `task`, so each task has its own pruned base and a "
                              "multi-LoRA server needs one: export one task at a time with --tasks TASK")
        model_dir, adapter_dirs = exp / tasks[0] / "model", {tasks[0]: exp / tasks[0] / "adapter"}
    else:
        model_dir, adapter_dirs = exp / "model", {t: exp / "adapters" / t for t in tasks}
    pruned = load_pruned(need(model_dir, "the pruned model, written by the gated flock"))
    model, widths, slots = pad_to_one_width(pruned)
    full = int(model.config.num_attention_heads) * int(getattr(model.config, "head_dim", 0) or 0)
    adapters = {t: place_head_adapters(pairs_of_peft(need(d, f"the pruned model's adapter of task {t!r}")), slots, full)
                for t, d in adapter_dirs.items()}
    w = max(widths)
    if len(set(widths)) > 1:
        note = (f"base: the pruned model with MLP widths {widths} per block, zero-padded to {w} (exact) so that one "
                f"intermediate_size holds; the per-block widths stay in {model_dir} (models.gates.export.load_pruned)")
    else:
        note = f"base: the pruned model, every block at MLP width {w} (nothing padded)"
    notes = [note]
    if slots:
        notes.append(f"base: query heads per block {head_counts(pruned)}, zero-padded to "
                     f"{model.config.num_attention_heads} within each KV head's group (exact)")
    return Bundle("pruned", model, adapters, notes=notes, base_name=None)
