"""What every export kind produces, and the plain base directory written from it.

A kind (plain, quantised, pruned, picked, recycled) builds a :class:`Bundle`: a plain
``transformers`` model (no LoRA, no gates, no packed layers), the low-rank parts folded into
it, and each task's adapter as pairs. :mod:`orchestrator.export.driver` writes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from orchestrator.export.lowrank import Pairs

__all__ = ["Bundle", "dequantise", "fold_into_base", "save_base"]


@dataclass
class Bundle:
    """One export: the base to save and the adapters served on it.

    Attributes:
        kind: ``plain``, ``quantised``, ``pruned``, ``picked`` or ``recycled``.
        model: the plain base (eval mode, fp32, frozen).
        adapters: task -> pairs (scale in B) as trained, on this base's module names.
        folded: module -> pairs already added into ``model``'s weights; subtracted from
            every adapter when it is written.
        notes: what a user of the export must know (written to serve.json and README.md).
        base_name: what the adapters record as ``base_model_name_or_path``.
    """

    kind: str
    model: nn.Module
    adapters: dict[str, Pairs]
    folded: Pairs = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    base_name: str | None = None


@torch.no_grad()
def dequantise(model: nn.Module) -> list[str]:
    """Replace every packed :class:`~models.quant.linear.QuantizedLinear` by a plain ``nn.Linear``."""
    done = []
    for name, mod in list(model.named_modules()):
        if getattr(mod, "is_quantized_linear", False):
            w = mod.dequantized_weight().float()
            new = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            new.weight.copy_(w)
            if mod.bias is not None:
                new.bias.copy_(mod.bias.float())
            new.requires_grad_(False)
            model.set_submodule(name, new)
            done.append(name)
    return done


@torch.no_grad()
def fold_into_base(model: nn.Module, folded: Pairs) -> None:
    """``W += B @ A`` for every folded module (``nn.Linear``; GPT-2's ``Conv1D`` stores W^T)."""
    for name, (a, b) in folded.items():
        mod = model.get_submodule(name)
        delta = (b.double() @ a.double()).float()
        if isinstance(mod, nn.Linear):
            mod.weight.add_(delta.to(mod.weight))
        else:
            mod.weight.add_(delta.T.to(mod.weight))


def save_base(model: nn.Module, directory: Path, tokenizer: str | None) -> list[str]:
    """``save_pretrained`` (safetensors + config) so that ``from_pretrained`` works; the tokenizer too
    when it is a ``transformers`` one. Returns notes (e.g. no tokenizer saved)."""
    from models.files import atomic_dir

    notes = []
    if getattr(model, "hf_quantizer", None) is not None:  # a GGUF-loaded base refuses save_pretrained otherwise
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.config.use_cache = True  # training turned the KV cache off; servers want it
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer and tokenizer != "bytes":
            try:
                from tasks.tokenizer import load_tokenizer

                load_tokenizer(tokenizer).save_pretrained(tmp)
            except Exception as e:  # noqa: BLE001 - the weights are still useful; say why there is no tokenizer
                notes.append(f"no tokenizer saved in base/ ({type(e).__name__}: {e}); "
                             "copy the base's tokenizer files there")
        else:
            notes.append("the job used the offline byte tokenizer (tokenizer: bytes), which servers cannot load; "
                         "put a tokenizer in base/ before serving")
    return notes
