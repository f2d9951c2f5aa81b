"""Export a gated model to a smaller dense model: fold the gates, drop closed channels.

Every :class:`~models.gates.layer.GatedLinear` computes ``g_r * ((W + s B A)(g_c x) + b)``. With
the eval gates fixed this is one linear layer with

    W' = diag(g_r) W diag(g_c),   b' = g_r * b,   B' = diag(g_r) B,   A' = A diag(g_c)

(``s B' A' = diag(g_r) s B A diag(g_c)``, so every task's LoRA slot folds the same way and
stays a valid low-rank adapter). Folding alone is exact but saves nothing; dimensions whose
gate is 0 are then *removed* with ``index_select`` where the architecture allows it:

| dimension                                   | shrinks? | why                                   |
|---------------------------------------------|----------|---------------------------------------|
| MLP intermediate (Llama-style rows of        | yes      | channel ``k`` only feeds ``down[:, k]``:|
| gate_proj/up_proj, cols of down_proj; GPT-2 |          | it is dropped when any gate on its    |
| rows of c_fc, cols of c_proj)               |          | path is 0 (exact: its contribution is |
|                                             |          | 0; a closed pre-activation gate needs |
|                                             |          | ``act(0) == 0``, checked)             |
| hidden size (cols of q/k/v/gate/up/c_attn/  | no       | the residual stream and the norms are |
| c_fc, rows of o/down/c_proj)                |          | shared by every block: gate folded in |
|                                             |          | (closed = zero column/row)            |
| query heads (head gates on o_proj's input,  | yes      | head ``h`` only feeds ``o_proj``'s    |
| ``models.gates.heads``): q_proj rows,        |          | columns of ``h``; removed when every  |
| o_proj cols                                 |          | KV head keeps as many query heads     |
|                                             |          | (then ``num_key_value_groups`` is set |
|                                             |          | per module), else folded              |
| KV heads (k/v rows)                         | no       | shared by the kept query heads        |

Route for the intermediate size: HF Llama has one global ``config.intermediate_size``, but
``LlamaMLP.forward``/``GPT2MLP.forward`` never read it, so each block's MLP layers are
replaced by smaller ``nn.Linear``/``Conv1D`` modules of their own size. The result is the
same ``transformers`` class and runs unchanged, with real smaller matmuls (a real speedup,
unlike padding every block to the largest kept size). :func:`save_pruned` writes it with
``save_pretrained`` plus ``pruned_shapes.json``; when every block kept the same width
(``gates.allocation: layer`` on every block) the config's ``intermediate_size`` says so and
plain ``from_pretrained`` loads it; otherwise :func:`load_pruned` rebuilds the shapes. Heads
likewise: when every block kept the same number and the config accepts it (Llama's wants it
to divide ``hidden_size``), ``num_attention_heads`` says so, with ``head_dim`` written out
(``models.gates.heads.set_config_heads``).

Model code only: no Ray here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from models.gates.heads import attention_modules, head_counts, kv_heads, set_config_heads, sync_head_counts
from models.gates.layer import GatedLinear, gate_layers
from models.lora import MultiTaskLoraLinear, linear_weight

__all__ = ["GateExportError", "export_pruned", "strip_adapters", "pruned_shapes", "save_pruned", "load_pruned",
           "mlp_widths", "coupled_producers", "WIDTH_KEYS"]

SHAPES_FILE = "pruned_shapes.json"
WIDTH_KEYS = ("intermediate_size", "n_inner")  # the config's MLP width (Llama-style, GPT-2)

# (modules producing the intermediate, module consuming it, activated producer, activation attr)
_MLP_PATTERNS: tuple[tuple[tuple[str, ...], str, str | None, str], ...] = (
    (("gate_proj", "up_proj"), "down_proj", "gate_proj", "act_fn"),  # Llama, Mistral, Qwen2 ...
    (("c_fc",), "c_proj", "c_fc", "act"),  # GPT-2
)


class GateExportError(ValueError):
    """The gated model cannot be exported as asked; the message says what to pass."""


def _unwrap(module: nn.Module) -> nn.Module:
    return module.inner if isinstance(module, GatedLinear) else module


def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, MultiTaskLoraLinear) else module


def _eval_gates(layer: GatedLinear, task: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row gates (out,), col gates (in,)) of one task; ones where a side is not gated."""
    rows, cols = layer.eval_gates()
    t = 0 if layer.num_tasks == 1 else task
    dev = next(layer.parameters()).device
    g_r = rows[t] if rows is not None else torch.ones(layer.out_features, device=dev)
    g_c = cols[t] if cols is not None else torch.ones(layer.in_features, device=dev)
    return g_r, g_c


def _new_base(base: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A frozen module of ``base``'s kind holding ``weight`` (out, in) and ``bias``."""
    out_f, in_f = weight.shape
    if isinstance(base, nn.Linear):
        new = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        new.weight.data.copy_(weight)
    else:  # GPT-2 Conv1D keeps (in, out)
        new = type(base)(out_f, in_f).to(device=weight.device, dtype=weight.dtype)
        new.weight.data.copy_(weight.T)
    if bias is not None:
        new.bias.data.copy_(bias)
    for p in new.parameters():
        p.requires_grad_(False)
    return new


@torch.no_grad()
def _fold_and_slice(
    module: nn.Module,
    g_r: torch.Tensor | None,
    g_c: torch.Tensor | None,
    rows: torch.Tensor | None,
    cols: torch.Tensor | None,
) -> nn.Module:
    """Fold gates into ``module`` (linear / Conv1D / LoRA) and keep only ``rows``/``cols``."""
    base = _base_of(module)
    w = linear_weight(base).detach()  # (out, in)
    b = base.bias.detach() if base.bias is not None else None
    if g_r is not None:
        w = w * g_r[:, None]
        b = b * g_r if b is not None else None
    if g_c is not None:
        w = w * g_c[None, :]
    if rows is not None:
        w = w.index_select(0, rows)
        b = b.index_select(0, rows) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols)
    new_base = _new_base(base, w.contiguous(), b)
    if not isinstance(module, MultiTaskLoraLinear):
        return new_base
    # LoRA: A_t = A_shared + dA[t] (r, in) scale/keep columns; B_t (out, r) rows, both parts alike.
    for name, axis in (("lora_A_shared", 1), ("lora_A", 2), ("lora_B_shared", 0), ("lora_B", 1)):
        p = getattr(module, name)
        v = p.detach()
        is_a = name.startswith("lora_A")
        gate, keep = (g_c, cols) if is_a else (g_r, rows)
        if gate is not None:
            shape = [1] * v.dim()
            shape[axis] = -1
            v = v * gate.view(shape)
        if keep is not None:
            v = v.index_select(axis, keep)
        setattr(module, name, nn.Parameter(v.contiguous(), requires_grad=p.requires_grad))
    module.base_layer = new_base
    module.out_features, module.in_features = w.shape
    return module


def _act_zero_at_zero(act: Callable | None) -> bool:
    if act is None:
        return False
    with torch.no_grad():
        return bool(act(torch.zeros(1)).abs().item() == 0.0)


def _mlp_groups(model: nn.Module) -> list[tuple[nn.Module, tuple[str, ...], str, str | None, str]]:
    """Every MLP block whose intermediate channels may be removed."""
    found = []
    for mod in model.modules():
        for producers, consumer, activated, act_attr in _MLP_PATTERNS:
            names = (*producers, consumer)
            if all(isinstance(getattr(mod, n, None), nn.Module) for n in names) and hasattr(mod, act_attr):
                found.append((mod, producers, consumer, activated, act_attr))
                break
    return found


@torch.no_grad()
def export_pruned(model: nn.Module, task: int | None = None, inplace: bool = False) -> nn.Module:
    """A dense model without gates: gate values folded in, closed MLP channels removed.

    Outputs equal the gated model's eval outputs (for every task with shared gates; for
    ``task`` with task-scope gates). LoRA layers stay in place, sliced like their base, so
    ``models.peft_io.save_adapter(pruned, t, dir)`` writes task ``t``'s PEFT adapter for the
    pruned base and :func:`strip_adapters` gives the plain ``transformers`` model.

    Args:
        model: a model with :class:`GatedLinear` layers.
        task: which task's gates to fold; required when any gate has task scope (the
            result then serves that task only).
        inplace: modify ``model`` itself instead of a deep copy (saves memory).

    Example:
        >>> pruned = export_pruned(gated)
        >>> save_adapter(pruned, 0, "out/adapters/json"); plain = strip_adapters(pruned)
    """
    layers = gate_layers(model)
    if not layers:
        raise GateExportError("model has no gates to export: call inject_gates() and train first")
    multi = [n for n, l in layers.items() if l.num_tasks > 1]
    if multi and task is None:
        raise GateExportError(f"{multi[0]} has task-scope gates: pass task=<slot> to export one task's model")
    if task is not None and multi and not 0 <= task < layers[multi[0]].num_tasks:
        raise GateExportError(f"task {task} is out of range: the gates have {layers[multi[0]].num_tasks} slots")
    if not inplace:
        model = copy.deepcopy(model)
        layers = gate_layers(model)
    done = _remove_closed_heads(model, task)
    for mlp, producers, consumer, activated, act_attr in _mlp_groups(model):
        mods = {n: getattr(mlp, n) for n in (*producers, consumer)}
        if not any(isinstance(m, GatedLinear) for m in mods.values()):
            continue
        gates = {n: _eval_gates(m, task) if isinstance(m, GatedLinear) else (None, None) for n, m in mods.items()}
        zero_ok = _act_zero_at_zero(getattr(mlp, act_attr, None))
        consumer_weight = linear_weight(_base_of(_unwrap(mods[consumer])))  # (hidden, width)
        width, dev = consumer_weight.shape[1], consumer_weight.device
        dead = torch.zeros(width, dtype=torch.bool, device=dev)
        for n in producers:
            g_r = gates[n][0]
            if g_r is not None and (n != activated or zero_ok):
                dead |= g_r == 0
        if gates[consumer][1] is not None:
            dead |= gates[consumer][1] == 0
        keep = torch.nonzero(~dead).flatten()
        if keep.numel() == 0:
            keep = torch.zeros(1, dtype=torch.long, device=dev)  # one (all-zero) channel keeps shapes legal
        for n, m in mods.items():
            g_r, g_c = gates[n]
            rows, cols = (keep, None) if n in producers else (None, keep)
            setattr(mlp, n, _fold_and_slice(_unwrap(m), g_r, g_c, rows, cols))
            done.add(id(m))
    for name, layer in layers.items():  # gates outside removable MLP dims: fold only
        if id(layer) in done:
            continue
        g_r, g_c = _eval_gates(layer, task)
        model.set_submodule(name, _fold_and_slice(layer.inner, g_r, g_c, None, None))
    return model


@torch.no_grad()
def _remove_closed_heads(model: nn.Module, task: int | None) -> set[int]:
    """Drop closed query heads (``q_proj`` rows, ``o_proj`` columns); ids of the gated modules done.

    A block whose KV heads would keep unequal numbers of query heads (gates not hardened by
    ``harden_grouped``) is left to the fold-only pass: exact, but nothing removed.
    """
    done: set[int] = set()
    for attn in attention_modules(model).values():
        o, q = attn.o_proj, attn.q_proj
        d = int(attn.head_dim)
        if not (isinstance(o, GatedLinear) and o.col_group == d):
            continue
        g_r, g_c = _eval_gates(o, task)
        open_heads = g_c.view(-1, d)[:, 0] != 0  # (H,): a head's columns share one gate
        per = open_heads.view(kv_heads(attn), -1).sum(1)
        if int(per.min()) != int(per.max()) or int(per.min()) == 0:
            continue
        cols = (torch.nonzero(open_heads).flatten()[:, None] * d + torch.arange(d, device=g_c.device)).flatten()
        gq_r, gq_c = _eval_gates(q, task) if isinstance(q, GatedLinear) else (None, None)
        attn.o_proj = _fold_and_slice(_unwrap(o), g_r if o.theta_rows is not None else None, g_c, None, cols)
        attn.q_proj = _fold_and_slice(_unwrap(q), gq_r, gq_c, cols, None)
        attn.num_key_value_groups = int(per[0])
        done |= {id(o), id(q)}
    return done


def coupled_producers(model: nn.Module) -> list[tuple[nn.Module, list[nn.Module]]]:
    """(gated consumer, the modules whose output rows its input columns are) for every block.

    What the export removes beyond the gated matrix itself: an MLP channel closed on
    ``down_proj``'s input is a ``gate_proj``/``up_proj`` row gone too, a head closed on
    ``o_proj``'s input is its ``q_proj`` rows gone. Sizes of a gated model count them
    (``orchestrator.search.sizes``).
    """
    pairs = []
    for mlp, producers, consumer, _, _ in _mlp_groups(model):
        cons = getattr(mlp, consumer)
        if isinstance(cons, GatedLinear) and cons.theta_cols is not None:
            pairs.append((cons, [getattr(mlp, n) for n in producers]))
    for attn in attention_modules(model).values():
        if isinstance(attn.o_proj, GatedLinear) and attn.o_proj.col_group == int(attn.head_dim):
            pairs.append((attn.o_proj, [attn.q_proj]))
    return pairs


def strip_adapters(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by its (frozen) base: the plain ``transformers`` model, in place."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, MultiTaskLoraLinear):
            model.set_submodule(name, mod.base_layer)
    return model


def pruned_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Module name -> [out, in] of every linear layer, to rebuild a pruned model's shapes."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
            w = linear_weight(mod)
            out[name] = [int(w.shape[0]), int(w.shape[1])]
    return out


def mlp_widths(model: nn.Module) -> list[int]:
    """Every MLP block's intermediate width (the consumer's input size), in module order."""
    return [int(linear_weight(_base_of(_unwrap(getattr(mlp, consumer)))).shape[1])
            for mlp, _, consumer, _, _ in _mlp_groups(model)]


def _uniform_width(model: nn.Module) -> int | None:
    """The MLP width shared by every block, or None when blocks differ."""
    widths = set(mlp_widths(model))
    return widths.pop() if len(widths) == 1 else None


def save_pruned(model: nn.Module, directory) -> None:
    """Write a pruned plain model (no gates, no LoRA layers) with its shapes.

    ``save_pretrained`` (safetensors) plus ``pruned_shapes.json`` (module -> [out, in]).
    When every MLP block has the same width the config's intermediate size is set to it
    (``intermediate_size``, GPT-2's ``n_inner``), so ``from_pretrained`` alone loads it.

    Example:
        >>> save_pruned(strip_adapters(export_pruned(gated)), "out/export/model")
    """
    import json
    from pathlib import Path

    if gate_layers(model) or any(isinstance(m, MultiTaskLoraLinear) for m in model.modules()):
        raise GateExportError("save_pruned takes the plain model: export_pruned() then strip_adapters() first")
    directory = Path(directory)
    width = _uniform_width(model)
    cfg = model.config
    if width is not None:
        for key in WIDTH_KEYS:
            if hasattr(cfg, key):
                setattr(cfg, key, width)
    for attr in ("hf_quantizer",):  # a GGUF-loaded base refuses save_pretrained otherwise
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    heads = set(head_counts(model))
    if len(heads) == 1 and hasattr(cfg, "num_attention_heads"):  # else (or if refused) load_pruned rebuilds them
        set_config_heads(cfg, heads.pop(), int(next(iter(attention_modules(model).values())).head_dim))
    if getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config
    model.save_pretrained(directory, safe_serialization=True)
    (directory / SHAPES_FILE).write_text(json.dumps(pruned_shapes(model), indent=1))


def load_pruned(directory, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load what :func:`save_pruned` wrote: the same ``transformers`` class at the pruned shapes.

    Example:
        >>> model = load_pruned("out/export/model")
        >>> peft = PeftModel.from_pretrained(model, "out/export/adapters/json")
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    shapes = json.loads((directory / SHAPES_FILE).read_text())
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=dtype)
    for name, (out_f, in_f) in shapes.items():
        mod = model.get_submodule(name)
        w = linear_weight(mod)
        if tuple(w.shape) != (out_f, in_f):
            fresh = torch.zeros(out_f, in_f, dtype=w.dtype)
            bias = torch.zeros(out_f, dtype=w.dtype) if getattr(mod, "bias", None) is not None else None
            model.set_submodule(name, _new_base(mod, fresh, bias))
    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
        raise GateExportError(
            f"{directory}: weights do not match the pruned shapes (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    sync_head_counts(model)  # blocks that lost query heads read fewer per KV head
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
