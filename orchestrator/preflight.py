"""Checks run on the driver before any Ray work starts, so bad input fails in seconds.

Target modules, ranks and layer choices are checked against the architecture built on the
``meta`` device (no weights, no memory); errors name the spec field and the fix. A quantised
base (``base.bits`` / ``base.bit_budget``) is checked there too: something to quantise, and a
budget no smaller than the smallest packed encoding of those matrices' shapes.
"""

from __future__ import annotations

from models.base import load_config, meta_model
from models.lora import LoraTargetError, inject
from orchestrator.errors import SpecError
from orchestrator.spec import JobSpec

__all__ = ["preflight"]


def preflight(spec: JobSpec) -> list[str]:
    """Validate the spec against the model; return the module names that get adapters."""
    from models.base import top_block_indices
    from orchestrator.base.quant import check_quant

    b = spec.base
    model = meta_model(load_config(b.name, b.gguf_file, b.random_init))
    check_quant(spec, model)  # before inject: the matrices as the quantiser will see them
    layers = top_block_indices(model, spec.lora.top_layers)
    try:
        names = inject(
            model,
            spec.lora.target_modules,
            num_tasks=max(1, len(spec.tasks)),  # only task sets: one stand-in task (the check is per layer)
            rank=[spec.rank_of(t.name) for t in spec.tasks] or [spec.lora.rank],
            alpha=spec.lora.alpha,
            layers=layers,
        )
    except LoraTargetError as e:
        raise SpecError(f"lora: {e}") from None
    if spec.gates.enabled:
        from models.gates.layer import GateConfigError
        from orchestrator.flock.gating import inject_spec_gates

        g = spec.gates
        try:
            inject_spec_gates(model, g, layers if g.layers == "adapted" else None, g.scope, max(1, len(spec.tasks)))
        except GateConfigError as e:
            raise SpecError(f"gates: {e}") from None
    if layers and layers[0] > 0 and not (spec.gates.enabled and spec.gates.layers == "all"):
        from models.base import resolve_dtype
        from orchestrator.flock.prefix import check_prefix_budget

        dtype = resolve_dtype(b.dtype, "cuda" if spec.ray.use_gpu else "cpu")
        check_prefix_budget(spec, int(model.config.hidden_size), dtype.itemsize)  # one batch must fit
    return names
