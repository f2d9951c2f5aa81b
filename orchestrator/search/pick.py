"""The picked search trial as a model: rebuilt, its gates folded in, its adapters exported.

``search.pick`` chooses one point of the Pareto front; the recycle stage then works on that
compressed model instead of the flock's. Its Tune checkpoint (``trial_state.safetensors``,
copied to ``out/search/pick/``) holds only what the trial trained (adapters, gate logits);
everything else is rebuilt deterministically by
:func:`orchestrator.search.trial.build_trial_model` from the trial's configuration (same
seed, same LoRA init, same LQ quantisation, same gates).

In eval mode a gated layer computes ``y = g_r * (W (g_c * x) + s B A (g_c * x))`` with the
deterministic gates ``g_r`` (rows) and ``g_c`` (columns), so folding them gives exactly

    W' = diag(g_r) W diag(g_c),   b' = g_r * b,   B'_t = diag(g_r) B_t,   A'_t = A_t diag(g_c)

(``W`` the dequantised base weight): a plain ``nn.Linear`` base plus plain per-task LoRA
adapters at the original module names (PEFT layout). Pruned rows and columns are zero in
``W'`` and in every ``B'``/``A'``, so a subspace built from these adapters spans only kept
rows/columns, and coefficient-only adapters on it stay inside the pruned model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from models.files import atomic_write_json
from models.gates.layer import GatedLinear
from models.lora import MultiTaskLoraLinear, linear_weight
from models.peft_io import write_adapter_dir
from orchestrator.errors import StageError
from orchestrator.spec import JobSpec

__all__ = [
    "picked_config",
    "build_picked_trial",
    "load_picked_model",
    "fold_picked",
    "picked_base",
    "export_picked_adapters",
    "restrict_lora",
]

_HPARAMS = ("rank", "target_sparsity", "bits", "quantizer", "tau", "lr")
_PREFIX = "base_model.model."


def task_names(spec: JobSpec, picked: dict) -> list[str]:
    """The picked trial's tasks in slot order: recorded by the search (task sets expand at run
    time), else the job's explicit tasks (records written before task sets existed)."""
    return list(picked.get("tasks") or [t.name for t in spec.tasks])


def picked_config(picked: dict) -> dict:
    """The trial configuration (sampled dimensions) of a ``search.picked`` record."""
    return {k: picked[k] for k in _HPARAMS if picked.get(k) is not None}


def build_picked_trial(spec: JobSpec, picked: dict, checkpoint: str | Path, device: str = "cpu") -> nn.Module:
    """The picked trial's model before training: rebuilt from its config as the search built it.

    A whole-base pick (``picked["quant_base"]``, ``search.quantize_layers: all``) also gets its
    setting's quantised frozen blocks and embedding from ``checkpoint/quant_base`` (written by
    the search, :func:`orchestrator.search.frozen_base.write_frozen_base`) and quantises its
    adapted blocks with that setting's widths, so the full forward is the one the trial was
    judged on through its prefix cache.

    Raises:
        StageError: the written quantised base is missing.
    """
    from orchestrator.base.quant import QUANT_DIR
    from orchestrator.search.frozen_base import load_frozen_base, read_frozen_section, top_allocation
    from orchestrator.search.trial import build_trial_model

    qdir = Path(checkpoint) / QUANT_DIR if picked.get("quant_base") else None
    top = top_allocation({"allocation": read_frozen_section(qdir)["top_allocation"]}) if qdir is not None else None
    model, _ = build_trial_model(spec, picked_config(picked), len(task_names(spec, picked)), str(picked["quantizer"]),
                                 int(picked["lq_iters"]), device, top)
    if qdir is not None:
        load_frozen_base(model, qdir)
    return model


def load_picked_model(spec: JobSpec, picked: dict, checkpoint: str | Path, device: str = "cpu") -> nn.Module:
    """The picked trial's trained model (eval mode): rebuilt (:func:`build_picked_trial`), trained state loaded.

    Raises:
        StageError: the checkpoint is missing or does not fit the rebuilt model.
    """
    from orchestrator.search.trial import STATE_FILE, trial_state

    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise StageError(f"search.picked: {path} not found: re-run the search stage (delete its entry in state.json)")
    config = picked_config(picked)
    model = build_picked_trial(spec, picked, checkpoint, device)
    gate_lr = picked.get("gate_lr")  # only for checkpoints that stored gate logits scaled by gate_lr / lr
    state = trial_state(path, float(gate_lr) / float(config.get("lr", spec.train.lr)) if gate_lr else 1.0, device)
    params = dict(model.named_parameters())
    bad = [k for k, v in state.items() if k not in params or params[k].shape != v.shape]
    if bad:
        raise StageError(f"search.picked: {path} does not fit the rebuilt trial model (e.g. {bad[0]!r}): "
                         "the job's base, tasks or LoRA settings changed since the search")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    return model.eval()


@torch.no_grad()
def fold_picked(
    model: nn.Module,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[int, dict[str, torch.Tensor]], dict]:
    """Fold gates into the base and the adapters, in place (see the module docstring).

    Every adapted module (gated or not) becomes a frozen ``nn.Linear`` holding ``W'``.

    Returns:
        ``(gates, adapters, meta)``: ``gates[name] = (g_r, g_c)`` of each gated module,
        ``adapters[t]`` the PEFT-keyed ``B'_t, A'_t`` of task slot ``t``, and
        ``meta = {"ranks": {name: r}, "alphas": {name: alpha}}``.
    """
    targets = {}
    for name, mod in model.named_modules():
        if isinstance(mod, GatedLinear) and isinstance(mod.inner, MultiTaskLoraLinear):
            targets[name] = (mod, mod.inner)
        elif isinstance(mod, MultiTaskLoraLinear) and not name.endswith(".inner"):
            targets[name] = (None, mod)
    if not targets:
        raise StageError("search.picked: the rebuilt trial model has no adapters to fold")
    gates, adapters, ranks, alphas = {}, {}, {}, {}
    for name, (gate, lora) in targets.items():
        w = linear_weight(lora.base_layer).detach().float()
        bias = getattr(lora.base_layer, "bias", None)
        g_r = torch.ones(lora.out_features, device=w.device)
        g_c = torch.ones(lora.in_features, device=w.device)
        if gate is not None:
            rows, cols = gate.eval_gates()
            g_r = rows[0].float() if rows is not None else g_r
            g_c = cols[0].float() if cols is not None else g_c
            gates[name] = (g_r.cpu(), g_c.cpu())
        new = nn.Linear(lora.in_features, lora.out_features, bias=bias is not None, device=w.device)
        new.weight.copy_(g_r[:, None] * w * g_c[None, :])
        if bias is not None:
            new.bias.copy_(g_r * bias.float())
        new.requires_grad_(False)
        for t in range(lora.num_tasks):
            a, b = lora.task_A(t).float() * g_c[None, :], g_r[:, None] * lora.task_B(t).float()
            adapters.setdefault(t, {})[f"{_PREFIX}{name}.lora_A.weight"] = a.contiguous().cpu()
            adapters[t][f"{_PREFIX}{name}.lora_B.weight"] = b.contiguous().cpu()
        ranks[name], alphas[name] = lora.ranks[0], lora.alpha
        model.set_submodule(name, new)
    for p in model.parameters():
        p.requires_grad_(False)
    return gates, adapters, {"ranks": ranks, "alphas": alphas}


def picked_base(spec: JobSpec, picked: dict, checkpoint: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """The picked trial's compressed base without adapters, and its gates ``{name: (g_r, g_c)}``.

    The adapted modules are plain frozen ``nn.Linear`` layers at their original names
    (quantised and pruned weights folded in), so LoRA and eigen adapters inject as on any base.
    """
    model = load_picked_model(spec, picked, checkpoint, device)
    gates, _, _ = fold_picked(model)
    if hasattr(model, "_loraflock_router"):  # the trial's task router: new adapters get a fresh one
        del model._loraflock_router
    return model, gates


def export_picked_adapters(
    spec: JobSpec, picked: dict, checkpoint: str | Path, out_dir: str | Path, base_model_name: str | None
) -> dict[str, Path]:
    """Write every task's folded adapter of the picked trial as a PEFT directory ``out_dir/<task>``.

    A whole-base pick's adapters get the flock's quantised-base note (``NOTE_FILE``) naming the
    quantised base they belong with (``search/pick/quant_base``, next to ``out_dir``'s parent).
    """
    from orchestrator.base.quant import NOTE_FILE, QUANT_DIR

    model = load_picked_model(spec, picked, checkpoint)
    _, adapters, meta = fold_picked(model)
    dirs = {}
    for t, name in enumerate(task_names(spec, picked)):
        dirs[name] = write_adapter_dir(
            Path(out_dir) / name, adapters[t], meta["ranks"], meta["alphas"], base_model_name
        )
        if picked.get("quant_base"):
            atomic_write_json(dirs[name] / NOTE_FILE, {
                "trained_on_quantized_base": True, "setting": picked.get("base_setting"),
                "packed_base": os.path.relpath(Path(checkpoint) / QUANT_DIR, dirs[name]),
                "layers": "the blocks below the adapted ones, and the token embedding",
                "note": (f"This adapter belongs with the picked search trial's whole quantised base: the frozen blocks "
                         f"and the token embedding packed in {QUANT_DIR}/ (orchestrator.base.quant.load_quant_base "
                         "loads them), the adapted blocks rebuilt by the trial (loraflock export --what pick writes "
                         "the whole base dense)."),
            })
    return dirs


def restrict_lora(model: nn.Module, gates: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Keep fresh LoRA adapters inside the pruned model: ``B <- g_r B``, ``A <- A g_c`` at init,
    and the same factors on their gradients (0/1 gates: pruned rows/columns stay exactly 0)."""
    for name, mod in model.named_modules():
        if not isinstance(mod, MultiTaskLoraLinear) or name not in gates:
            continue
        g_r, g_c = (g.to(mod.lora_A.device) for g in gates[name])
        with torch.no_grad():
            for p in (mod.lora_A_shared, mod.lora_A):
                p.mul_(g_c)
            for p in (mod.lora_B_shared, mod.lora_B):
                p.mul_(g_r[:, None])
        for p in (mod.lora_A_shared, mod.lora_A):
            if p.requires_grad:
                p.register_hook(lambda g, m=g_c: g * m)
        for p in (mod.lora_B_shared, mod.lora_B):
            if p.requires_grad:
                p.register_hook(lambda g, m=g_r[:, None]: g * m)
