"""Export kind ``picked``: the search trial that ``search.pick`` chose, as a plain base + adapters.

:mod:`orchestrator.search.pick` already rebuilds the trial and folds its gates into the base
and the adapters (``W' = diag(g_r) W diag(g_c)``, ``B' = diag(g_r) B``, ``A' = A diag(g_c)``,
W dequantised); pruned rows and columns are zeros at the original widths (a trial gates
q/v rows and columns, which no server can drop). With a quantised trial, its LQ part
``L1 L2^T`` sits in every adapter (Theta starts there), as in the quantised flock: it is read
from the rebuilt, untrained trial (``s B_Theta A_Theta`` at init), folded through the gates
into the base and subtracted from every adapter (:mod:`orchestrator.export.quantised`).
A whole-base pick (``search.quantize_layers: all``) is rebuilt on the search's quantised frozen
blocks and embedding (``search/pick/quant_base/``), so the exported dense base holds their
dequantised codes: the model the trial was judged on.
"""

from __future__ import annotations

import torch
from torch import nn

from models.lora import MultiTaskLoraLinear
from models.peft_io import peft_layers
from orchestrator.export.bundle import Bundle, dequantise, fold_into_base
from orchestrator.export.lowrank import Pairs, pairs_of_state
from orchestrator.export.run_dir import ExportError, Run, need

__all__ = ["picked_bundle", "picked_record"]


def picked_record(run: Run) -> dict:
    """``search.picked`` of the run, or an error naming the setting that makes one."""
    picked = (run.results.get("search") or {}).get("picked")
    if not picked:
        raise ExportError(f"{run.path}: the run has no picked search trial; set search.pick ({{max_bytes: N}} or "
                          "{max_ppl: P}) and run the search, or export --what flock")
    return picked


@torch.no_grad()
def _initial_shared(model: nn.Module) -> Pairs:
    """``(A_Theta, s B_Theta)`` of every layer whose shared adapter starts non-zero (the LQ part)."""
    out: Pairs = {}
    for name, layer in peft_layers(model).items():
        if isinstance(layer, MultiTaskLoraLinear):
            r = layer.ranks[0]
            a, b = layer.lora_A_shared[:r].float(), layer.lora_B_shared[:, :r].float() * float(layer.scaling[0])
            if b.abs().max() > 0:
                out[name] = (a.clone(), b.clone())
    return out


def picked_bundle(run: Run, tasks: list[str]) -> Bundle:
    """The picked trial's folded base (LQ part included) and its tasks' adapters."""
    from orchestrator.search.pick import build_picked_trial, fold_picked, load_picked_model, task_names
    from orchestrator.search.trial import STATE_FILE

    spec, picked = run.spec, picked_record(run)
    ckpt = run.path / picked["checkpoint"]
    need(ckpt / STATE_FILE, "the picked trial's checkpoint, copied by the search")
    names = task_names(spec, picked)
    model = load_picked_model(spec, picked, ckpt)
    gates, states, meta = fold_picked(model)
    if hasattr(model, "_loraflock_router"):
        del model._loraflock_router
    dequantise(model)
    folded: Pairs = {}
    if int(picked.get("bits") or 16) < 16:
        init = build_picked_trial(spec, picked, ckpt)
        for n, (a, b) in _initial_shared(init).items():
            g_r, g_c = gates.get(n, (torch.ones(b.shape[0]), torch.ones(a.shape[1])))
            folded[n] = (a * g_c[None, :], g_r[:, None] * b)
        fold_into_base(model, folded)
    scales = {n: meta["alphas"][n] / meta["ranks"][n] for n in meta["ranks"]}
    slot = {t: i for i, t in enumerate(names)}
    missing = [t for t in tasks if t not in slot]
    if missing:
        raise ExportError(f"tasks {missing} are not in the picked trial (it has {names})")
    adapters = {t: pairs_of_state(states[slot[t]], scales) for t in tasks}
    notes = [f"base: search trial {picked['trial_id']} (bits {picked.get('bits', 16)}, sparsity "
             f"{float(picked.get('sparsity') or 0):.2f}, rank {picked.get('rank')}), gates folded in: pruned rows and "
             "columns are zeros at the original widths"]
    if picked.get("quant_base"):
        notes.append(f"the whole base is quantised (search setting {picked.get('base_setting')}): the frozen blocks "
                     f"and the token embedding are the search's codes in {picked['quant_base']}/, dequantised to fp32")
    if folded:
        notes.append(f"the trial's LQ low-rank part ({len(folded)} matrices) is folded into the base and subtracted "
                     "from every adapter (exact; the rank grows by the LQ rank unless --rank truncates)")
    return Bundle("picked", model, adapters, folded, notes)
