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
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from models.gates.export import WIDTH_KEYS, load_pruned, mlp_widths
from orchestrator.export.bundle import Bundle
from orchestrator.export.lowrank import pairs_of_peft
from orchestrator.export.run_dir import ExportError, Run, need

__all__ = ["pruned_bundle", "pad_to_one_width"]


@torch.no_grad()
def pad_to_one_width(pruned: nn.Module) -> tuple[nn.Module, list[int]]:
    """The same model class at one MLP width (the largest kept), zero-padded; (model, old widths)."""
    from transformers import AutoModelForCausalLM

    widths = mlp_widths(pruned)
    width = max(widths)
    cfg = copy.deepcopy(pruned.config)
    for key in WIDTH_KEYS:
        if hasattr(cfg, key):
            setattr(cfg, key, width)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    src = pruned.state_dict()
    state = {}
    for k, v in model.state_dict().items():
        t = src[k].float()
        if t.shape != v.shape:
            pad = torch.zeros_like(v)
            pad[tuple(slice(0, n) for n in t.shape)] = t
            t = pad
        state[k] = t
    model.load_state_dict(state)
    model.tie_weights()
    model.requires_grad_(False)
    return model.eval(), widths


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
    model, widths = pad_to_one_width(pruned)
    adapters = {t: pairs_of_peft(need(d, f"the pruned model's adapter of task {t!r}")) for t, d in adapter_dirs.items()}
    w = max(widths)
    if len(set(widths)) > 1:
        note = (f"base: the pruned model with MLP widths {widths} per block, zero-padded to {w} (exact) so that one "
                f"intermediate_size holds; the per-block widths stay in {model_dir} (models.gates.export.load_pruned)")
    else:
        note = f"base: the pruned model, every block at MLP width {w} (nothing padded)"
    return Bundle("pruned", model, adapters, notes=[note], base_name=None)
