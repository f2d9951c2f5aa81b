"""Mid-training state as files: safetensors for tensors, JSON for everything else.

A killed worker restarts from here: trainable parameters, the optimizer's moments, the batch
sampler's RNG state, the step and whatever small JSON the caller adds (the prior's tau, the
loss curve). Nothing is pickled; ``torch.optim`` state is flattened into named tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from models.files import atomic_write_bytes, atomic_write_text

__all__ = ["save_train_state", "load_train_state"]

_TENSORS = "train_state.safetensors"
_META = "train_state.json"


def save_train_state(
    directory: str | Path,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
) -> None:
    """Write parameters, optimizer state and ``meta`` (JSON-able) to ``directory``.

    Args:
        params: name -> tensor of every trainable parameter, in the optimizer's order.
        optimizer: its per-parameter state (e.g. Adam's ``exp_avg``) is stored by position.
        meta: step, sampler state, curve ... (must be JSON-serialisable).
    """
    d = Path(directory)
    tensors = {f"param/{k}": v.detach().contiguous().cpu() for k, v in params.items()}
    sd = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val) and val.dim() > 0:
                tensors[f"opt/{idx}/{key}"] = val.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = float(val) if torch.is_tensor(val) else val
    atomic_write_bytes(d / _TENSORS, save(tensors))
    atomic_write_text(d / _META, json.dumps({"meta": meta, "opt_scalars": scalars, "param_groups": sd["param_groups"]}))


def load_train_state(
    directory: str | Path,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any] | None:
    """Restore what :func:`save_train_state` wrote into ``params``/``optimizer``; return ``meta``.

    Returns ``None`` when ``directory`` holds no state (a fresh start).
    """
    d = Path(directory)
    if not (d / _TENSORS).is_file() or not (d / _META).is_file():
        return None
    tensors = load_file(str(d / _TENSORS))
    info = json.loads((d / _META).read_text())
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param/{k}"].to(p.device))
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        if key.startswith("opt/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = val
    for idx, sc in info["opt_scalars"].items():
        for name, val in sc.items():
            state.setdefault(int(idx), {})[name] = torch.tensor(val) if name == "step" else val
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    return info["meta"]
