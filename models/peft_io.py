"""Adapters in PEFT's file format: ``adapter_config.json`` + ``adapter_model.safetensors``.

One slot of a multi-task layer is saved as an ordinary single LoRA adapter, so
``peft.PeftModel.from_pretrained(base, dir)`` loads it and gives the same logits as our
model for that task; and any PEFT LoRA adapter of the same base can be read into a slot.
The config is written by PEFT's own ``LoraConfig`` (imported lazily: ``import peft`` costs
seconds), the weights by safetensors; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from models.files import atomic_dir
from models.lora import MultiTaskLoraLinear, lora_layers

__all__ = [
    "save_adapter",
    "load_adapter",
    "adapter_state",
    "peft_layers",
    "theta_state",
    "read_adapter",
    "write_adapter_dir",
    "module_of_key",
    "AdapterFormatError",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


class AdapterFormatError(ValueError):
    """An adapter directory that is missing, not LoRA, or does not fit the model."""


def peft_layers(model: torch.nn.Module) -> dict[str, MultiTaskLoraLinear]:
    """LoRA layers by the name PEFT gives them on the plain model.

    A gated layer (``models.gates.layer.GatedLinear``) holds the LoRA layer as ``.inner``; the
    adapter belongs to the module the gate wraps, so that suffix is dropped.
    """
    return {name.removesuffix(".inner"): layer for name, layer in lora_layers(model).items()}


def adapter_state(model: torch.nn.Module, task: int) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors of one task: ``base_model.model.<module>.lora_{A,B}.weight``."""
    out = {}
    for name, layer in peft_layers(model).items():
        out[f"{_PREFIX}{name}.lora_A.weight"] = layer.task_A(task).detach().contiguous().cpu()
        out[f"{_PREFIX}{name}.lora_B.weight"] = layer.task_B(task).detach().contiguous().cpu()
    return out


def theta_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors of the shared adapter Theta (BoRA's global adapter), at slot 0's rank."""
    out = {}
    for name, layer in peft_layers(model).items():
        r = layer.ranks[0]
        out[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A_shared[:r].detach().contiguous().cpu()
        out[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B_shared[:, :r].detach().contiguous().cpu()
    return out


def save_adapter(
    model: torch.nn.Module,
    task: int,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write task ``task``'s adapter as a PEFT LoRA adapter directory (atomically).

    Args:
        model: a model with injected :class:`MultiTaskLoraLinear` layers.
        task: slot index.
        directory: target directory (replaced whole on success).
        base_model_name_or_path: recorded in the config, as PEFT does.
        state: optional precomputed tensors (e.g. an exported / re-projected adapter).

    Example:
        >>> save_adapter(model, 0, "out/adapters/json", "HuggingFaceTB/SmolLM2-135M")
    """
    layers = peft_layers(model)
    if not layers:
        raise AdapterFormatError("model has no LoRA layers to save")
    first = next(iter(layers.values()))
    tensors = state if state is not None else adapter_state(model, task)
    return write_adapter_dir(
        directory,
        tensors,
        ranks={n: l.ranks[task] for n, l in layers.items()},
        alphas={n: l.alpha for n, l in layers.items()},
        base_model_name_or_path=base_model_name_or_path,
        dropout=float(getattr(first.dropout, "p", 0.0)),
        fan_in_fan_out=first.fan_in_fan_out,
    )


def write_adapter_dir(
    directory: str | Path,
    tensors: Mapping[str, torch.Tensor],
    ranks: Mapping[str, int],
    alphas: Mapping[str, float],
    base_model_name_or_path: str | None = None,
    dropout: float = 0.0,
    fan_in_fan_out: bool = False,
) -> Path:
    """Write PEFT-keyed LoRA tensors as a PEFT adapter directory (config by ``peft.LoraConfig``).

    Every writer of adapters goes through here (``save_adapter``, eigen-adapter export), so
    the format is produced in one place.
    """
    from peft import LoraConfig  # lazy: heavy import

    names = list(ranks)
    r0, a0 = ranks[names[0]], alphas[names[0]]
    config = LoraConfig(
        r=r0,
        lora_alpha=a0,
        lora_dropout=dropout,
        target_modules=names,  # full module names: exact, no pattern guessing
        fan_in_fan_out=fan_in_fan_out,  # GPT-2 Conv1D bases; the LoRA tensors keep Linear layout
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
        rank_pattern={n: r for n, r in ranks.items() if r != r0},
        alpha_pattern={n: a for n, a in alphas.items() if a != a0},
    )
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    with atomic_dir(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, default=str))
        (tmp / WEIGHTS_NAME).write_bytes(
            save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
        )
    return Path(directory)


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a PEFT LoRA adapter directory: (config dict, {module: (A, B)} tensors)."""
    d = Path(directory)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise AdapterFormatError(
            f"{d} is not a PEFT adapter directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{cfg_path}: not valid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be loaded")
    return cfg, load_file(str(w_path))


def module_of_key(key: str) -> tuple[str, str] | None:
    """``base_model.model.x.y.lora_A[.default].weight`` -> (``x.y``, ``A``)."""
    if not key.startswith(_PREFIX):
        return None
    body = key[len(_PREFIX):]
    for part in ("lora_A", "lora_B"):
        marker = f".{part}."
        if marker in body:
            return body.split(marker)[0], part[-1]
    return None


@torch.no_grad()
def load_adapter(model: torch.nn.Module, task: int, directory: str | Path) -> list[str]:
    """Load a PEFT LoRA adapter into slot ``task`` (its rank must fit the slot).

    The slot's delta is set so that shared + delta equals the file's adapter, and the slot's
    scaling follows the file's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).

    Returns the names of the modules loaded.
    """
    cfg, tensors = read_adapter(directory)
    layers = peft_layers(model)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        hit = module_of_key(key)
        if hit:
            pairs.setdefault(hit[0], {})[hit[1]] = value
    missing = [m for m in pairs if m not in layers]
    if missing:
        raise AdapterFormatError(
            f"{directory}: adapter has modules this model does not adapt: {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}; inject the same target_modules/layers first"
        )
    if not pairs:
        raise AdapterFormatError(f"{directory}: no lora_A/lora_B tensors found")
    for name, ab in pairs.items():
        layer: MultiTaskLoraLinear = layers[name]
        a, b = ab["A"].float(), ab["B"].float()
        r = a.shape[0]
        if r > layer.lora_A.shape[1] or a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise AdapterFormatError(
                f"{directory}: {name} has A {tuple(a.shape)} / B {tuple(b.shape)}, which does not fit "
                f"a slot of rank <= {layer.lora_A.shape[1]} on a {layer.in_features}->{layer.out_features} layer"
            )
        r_cfg = cfg.get("rank_pattern", {}).get(name, r)
        alpha = float(cfg.get("alpha_pattern", {}).get(name, cfg.get("lora_alpha", r_cfg)))
        file_scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        layer.ranks[task] = r
        layer.rank_mask[task].zero_()
        layer.rank_mask[task, :r] = 1.0
        layer.scaling[task] = layer.alpha / r
        b = b * (file_scale / float(layer.scaling[task]))
        layer.lora_A[task].zero_()
        layer.lora_B[task].zero_()
        layer.lora_A[task, :r] = a.to(layer.lora_A.device) - layer.lora_A_shared[:r]
        layer.lora_B[task, :, :r] = b.to(layer.lora_B.device) - layer.lora_B_shared[:, :r]
    return sorted(pairs)
