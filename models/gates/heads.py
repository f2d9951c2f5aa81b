"""FineGates on attention heads: one gate per query head, the same number closed per KV head.

MLP channels are not the whole base: on SmolLM2-135M, removing a third of them keeps 80% of
the parameters and gives 1.19x (benchmarks/README.md, FineGates accuracy arm), because
attention and the head are untouched. A query head is the next unit an export can really
remove: head ``h`` owns rows ``h*d .. h*d+d-1`` of ``q_proj`` and the same columns of
``o_proj`` (``d`` = head size), and nothing else reads them. So a head gate is a grouped
column gate on ``o_proj``'s input (:class:`~models.gates.layer.GatedLinear` with
``col_group = head_dim``): closing it zeroes the head's output, and the export drops the
head's ``q_proj`` rows and ``o_proj`` columns (exact).

Grouped-query attention constrains which heads may go: query head ``h`` reads KV head
``h // g`` (``g`` = ``num_key_value_groups``), so after removal every KV head must keep the
same number of query heads, and the module's ``num_key_value_groups`` becomes that number
(``transformers`` reads it per module, not from the config). Hardening therefore closes the
same count in every KV head's bundle: ``round(target * g)``, never all of them
(:func:`harden_grouped`). The KV heads themselves stay: they are shared by the kept heads.

Architectures: any ``transformers`` attention with ``q_proj``/``k_proj``/``v_proj``/``o_proj``
and the ``head_dim``/``num_key_value_groups`` attributes (Llama, Mistral, Qwen2/3, ...).
GPT-2's fused ``c_attn`` is refused with a clear error.

Model code only: no Ray here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.gates.layer import GateConfigError, GatedLinear, wrap_gated
from models.lora import MultiTaskLoraLinear, TaskRouter, block_index, linear_weight

__all__ = ["attention_modules", "inject_head_gates", "harden_grouped", "head_counts", "sync_head_counts",
           "kv_heads", "query_heads", "config_accepts_heads", "set_config_heads"]

_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def _base(module: nn.Module) -> nn.Module:
    module = module.inner if isinstance(module, GatedLinear) else module
    return module.base_layer if isinstance(module, MultiTaskLoraLinear) else module


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> attention module for every block whose heads can be gated, in model order."""
    return {
        n: m for n, m in model.named_modules()
        if all(isinstance(getattr(m, p, None), nn.Module) for p in _PROJ)
        and isinstance(getattr(m, "head_dim", None), int) and hasattr(m, "num_key_value_groups")
    }


def kv_heads(attn: nn.Module) -> int:
    """KV heads of an attention module (``k_proj``'s outputs over the head size)."""
    return int(linear_weight(_base(attn.k_proj)).shape[0]) // int(attn.head_dim)


def query_heads(attn: nn.Module) -> int:
    """Query heads of an attention module (``q_proj``'s outputs over the head size)."""
    return int(linear_weight(_base(attn.q_proj)).shape[0]) // int(attn.head_dim)


def head_counts(model: nn.Module) -> list[int]:
    """Query heads of every attention block."""
    return [query_heads(a) for a in attention_modules(model).values()]


def sync_head_counts(model: nn.Module) -> None:
    """Set every attention module's ``num_key_value_groups`` from its ``q_proj``/``k_proj`` shapes.

    After heads were removed (or a pruned model was rebuilt at its shapes) the constructor's
    value, taken from the config, is wrong for the blocks that lost heads.
    """
    for attn in attention_modules(model).values():
        attn.num_key_value_groups = max(1, query_heads(attn) // max(kv_heads(attn), 1))


def config_accepts_heads(cfg, heads: int, head_dim: int) -> bool:
    """Whether a ``transformers`` config validates with ``heads`` query heads of ``head_dim`` (tried on a copy).

    Some configs refuse counts that do not divide the hidden size
    (``LlamaConfig.validate_architecture``, run at save and load time).
    """
    import copy

    trial = copy.deepcopy(cfg)
    trial.head_dim, trial.num_attention_heads = int(head_dim), int(heads)
    validate = getattr(trial, "validate", None)
    try:
        if callable(validate):
            validate()
    except Exception:  # noqa: BLE001 - any validator's refusal means: not expressible in this config
        return False
    return True


def set_config_heads(cfg, heads: int, head_dim: int) -> bool:
    """Write ``heads`` query heads of ``head_dim`` into a config if it accepts them (else leave it, False).

    ``head_dim`` is written explicitly: the default ``hidden_size // num_attention_heads`` would
    change with the count. On False the caller keeps the per-block shapes instead
    (``pruned_shapes.json``) or pads to a count the config takes.
    """
    if not config_accepts_heads(cfg, heads, head_dim):
        return False
    cfg.head_dim, cfg.num_attention_heads = int(head_dim), int(heads)
    return True


def inject_head_gates(
    model: nn.Module,
    layers: Sequence[int] | None = None,
    scope: str = "shared",
    num_tasks: int = 1,
    sigma: float = 0.1,
    init_mean: float = 1.0,
    init_std: float = 0.1,
    sigma_reg: float = 0.5,
) -> list[str]:
    """Put one gate per query head on every attention block's ``o_proj`` (its input columns).

    Call after ``models.lora.inject`` (the gate wraps the LoRA layer) and before or after
    :func:`models.gates.layer.inject_gates` on other modules; ``o_proj`` must not be gated
    there too. Arguments as :func:`models.gates.layer.inject_gates`.

    Returns:
        Names of the gated ``o_proj`` modules.

    Example:
        >>> inject_gates(model, ["down_proj"], gate_rows=False); inject_head_gates(model)
    """
    router = getattr(model, "_loraflock_router", None) or TaskRouter()
    wanted = None if layers is None else set(layers)
    attns = {n: a for n, a in attention_modules(model).items() if wanted is None or block_index(n) in wanted}
    if not attns:
        raise GateConfigError(
            "gates.heads: no attention block with q_proj/k_proj/v_proj/o_proj"
            + (f" in layers {sorted(wanted)}" if wanted is not None else "")
            + " (Llama, Mistral, Qwen families): turn gates.heads off for this base (GPT-2's fused c_attn has no "
            "separate query heads to remove)"
        )
    names = []
    for name, attn in attns.items():
        if isinstance(attn.o_proj, GatedLinear):
            raise GateConfigError(
                f"{name}.o_proj is already gated: leave o_proj out of gates.target_modules when gates.heads is on"
            )
        attn.o_proj = wrap_gated(attn.o_proj, f"{name}.o_proj", scope, num_tasks, router, sigma=sigma,
                                 init_mean=init_mean, init_std=init_std, gate_rows=False, gate_cols=True,
                                 sigma_reg=sigma_reg, col_group=int(attn.head_dim), col_bundles=kv_heads(attn))
        names.append(f"{name}.o_proj")
    model._loraflock_router = router  # type: ignore[attr-defined]
    return names


def closed_per_bundle(per_bundle: int, target: float) -> int:
    """Heads to close in each KV head's bundle: ``round(target * per_bundle)``, at most all but one."""
    return max(0, min(per_bundle - 1, int(round(target * per_bundle))))


@torch.no_grad()
def harden_grouped(theta: torch.Tensor, target: float, bundles: int) -> torch.Tensor:
    """Binary mask (T, groups) of grouped gates: the lowest thetas of every bundle closed, the same count in each.

    Args:
        theta: (T, groups) gate logits, bundle-major (groups ``b*n .. b*n+n-1`` form bundle ``b``).
        target: fraction to close in each bundle (rounded, never the whole bundle).
        bundles: number of bundles (KV heads).
    """
    t, g = theta.shape
    per = g // bundles
    k = closed_per_bundle(per, target)
    mask = torch.ones(t, bundles, per, dtype=theta.dtype, device=theta.device)
    if k:
        idx = torch.topk(theta.view(t, bundles, per), k, dim=2, largest=False).indices
        mask.scatter_(2, idx, 0.0)
    return mask.view(t, g)
