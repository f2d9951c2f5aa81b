"""One copy of the frozen base per node: weights in Ray's object store, mapped by every worker.

A node that runs W flock workers (or W packed Tune trials) would otherwise hold W private
copies of the base (SmolLM2-135M: 540 MB fp32 each). Instead the driver puts the weights
into the object store ONCE (:func:`put_base`) as a dict of numpy arrays; Ray stores numpy
buffers out of band (pickle protocol 5), so ``ray.get`` in any worker of that node returns
arrays that point straight into the node's shared-memory segment (``/dev/shm/plasma*``),
with no copy. :func:`load_base_shared` builds the model skeleton on the ``meta`` device
(shapes only, no memory) and makes every parameter and buffer a ``torch.from_numpy`` view
of those arrays. Every worker's page tables then point at the same physical pages: the base
costs ~1 copy per node, whatever the number of workers (``benchmarks/base_sharing.py``).

Why this is safe although the arrays are read-only. Ray hands out object-store buffers as
non-writable numpy arrays, because objects are immutable and shared by every process;
``torch.from_numpy`` cannot express "read-only" and warns. We silence exactly that warning,
deliberately: the base is frozen (``requires_grad=False``), no optimizer ever holds it, and
the forward/backward passes only read it. What would be wrong is an in-place write
(``MultiTaskLoraLinear.merge``, ``load_state_dict`` into the base, pruning in place): it
would change the base of every worker on the node. Code that must modify the base calls
:func:`private_copy` first.

Why not ``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS``. Ray 2.60 can serialise torch tensors zero-copy
when that environment variable is set. We do not use it: (1) it is a process-global switch
that must be set in the environment of every Ray process before it starts, and it then
changes how *all* tensors are passed (checkpoints, metrics, gradients sent between actors),
handing out shared, silently-writable tensors where code expects private ones; (2) Ray marks
it experimental and warns on every serialised tensor; (3) its deserialiser moves the tensor
back to the device it came from, so a base put from a GPU worker would be copied to every
reader's GPU. The explicit numpy dict works with Ray's default configuration, is scoped to
the base weights only, and says in code which tensors are shared. Its one gap, numpy having
no bfloat16, is closed by storing such tensors as int16 bit patterns and viewing them back.

Quantised bases (``base.bits`` / ``base.bit_budget``, :mod:`orchestrator.base.quant`). When the
model holds :class:`models.quant.linear.QuantizedLinear` layers, what sits in the store for them is the
packed format itself (uint8 codes, fp16 scales and codebooks), never a dequantised matrix, plus
a small manifest (format of each layer) and the LQ low-rank factors ``L1, L2`` that start the
adapters. A worker builds each such layer as a meta skeleton and points its buffers at the
store (:meth:`QuantizedLinear.skeleton`), so the quantised matrices exist once per node, packed,
and are dequantised one layer at a time in the forward.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from models.base import load_config, meta_model
from models.quant.linear import QuantizedLinear

__all__ = [
    "BaseStoreError",
    "base_arrays",
    "lq_factors",
    "model_from_arrays",
    "put_base",
    "load_base_shared",
    "private_copy",
    "object_store_bytes",
]

# numpy has no bfloat16: such tensors travel as int16 bit patterns (same size, exact).
_BIT_VIEWS = {torch.bfloat16: torch.int16}


class BaseStoreError(ValueError):
    """The stored base does not fit the model it is loaded into; the message says why."""


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """Names of each distinct parameter/buffer, aliases (tied weights) grouped together.

    SmolLM2 ties ``lm_head.weight`` to ``model.embed_tokens.weight``: one tensor, two names.
    It is stored once and assigned to every name, so the rebuilt model stays tied.
    """
    groups: dict[int, list[str]] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(t), []).append(name)
    for name, t in model.named_buffers(remove_duplicate=False):
        groups.setdefault(id(t), []).append(name)
    return list(groups.values())


def base_arrays(
    model: nn.Module,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    summary: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """The model's weights as ``{"arrays": {name: ndarray}, "torch_dtypes": {name: str}}``.

    Every distinct tensor (parameters and buffers, including non-persistent ones such as
    rotary ``inv_freq``) appears once, under the first of its names. The arrays are CPU
    views of the model's own memory (no copy here; ``ray.put`` makes the one copy).

    A quantised model (with :class:`QuantizedLinear` layers) also gets ``"quant"``:
    ``{"modules": {name: format}, "lq": {name: {"L1", "L2"}}, "summary": summary}``; its
    layers' arrays are their packed codes, scales and codebooks.

    Args:
        model: the base (quantised or not), without adapters.
        factors: LQ factors ``name -> (L1, L2)`` from ``models.quant.model.quantize_base``.
        summary: the quantisation report (``report.json`` ``base.quant``), passed along.
    """
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for group in _alias_groups(model):
        t = tensors[group[0]].detach().cpu().contiguous()
        dtypes[group[0]] = str(t.dtype).removeprefix("torch.")
        if t.dtype in _BIT_VIEWS:
            t = t.view(_BIT_VIEWS[t.dtype])
        arrays[group[0]] = t.numpy()
    out: dict[str, Any] = {"arrays": arrays, "torch_dtypes": dtypes}
    modules = {
        name: {"method": m.method, "bits": m.bits, "shape": [m.out_features, m.in_features],
               "block_size": m.block_size, "bias": m.bias is not None}
        for name, m in model.named_modules() if isinstance(m, QuantizedLinear)
    }
    if modules or factors:
        lq = {
            n: {
                "L1": l1.detach().float().cpu().contiguous().numpy(),
                "L2": l2.detach().float().cpu().contiguous().numpy(),
            }
            for n, (l1, l2) in (factors or {}).items()
        }
        out["quant"] = {"modules": modules, "lq": lq, "summary": summary}
    return out


def lq_factors(state: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The stored LQ factors as zero-copy, read-only tensors (``models.quant.model.apply_lq_init`` copies them)."""
    lq = (state.get("quant") or {}).get("lq") or {}
    return {n: (_as_tensor(f["L1"], "float32"), _as_tensor(f["L2"], "float32")) for n, f in lq.items()}


def _as_tensor(array: np.ndarray, dtype_name: str) -> torch.Tensor:
    """A torch view of ``array`` (no copy), bit-cast back to its original dtype."""
    with warnings.catch_warnings():
        # Object-store arrays are read-only; the base is never written (module docstring).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(array)
    dtype = getattr(torch, dtype_name)
    return t.view(dtype) if t.dtype != dtype else t


def model_from_arrays(state: dict[str, dict[str, Any]], config: Any) -> nn.Module:
    """Build ``config``'s model on ``meta`` and point every weight at ``state``'s arrays.

    Args:
        state: what :func:`base_arrays` returned (typically fetched by ``ray.get``).
        config: the ``transformers`` config of the same architecture.

    Returns:
        The model, frozen, in eval mode, on CPU, its weights sharing ``state``'s memory.

    Raises:
        BaseStoreError: a weight is missing from ``state`` or has another shape.
    """
    arrays, dtypes = state["arrays"], state["torch_dtypes"]
    model = meta_model(config)
    for name, fmt in ((state.get("quant") or {}).get("modules") or {}).items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise BaseStoreError(
                f"the stored quantised base has a layer {name!r} this model lacks: "
                "load it with the config it was put with"
            ) from None
        layer = QuantizedLinear.skeleton(
            tuple(fmt["shape"]), fmt["method"], fmt["bits"], fmt["block_size"], fmt["bias"]
        )
        model.set_submodule(name, layer)
    meta = dict(model.named_parameters(remove_duplicate=False))
    meta_buffers = dict(model.named_buffers(remove_duplicate=False))
    for group in _alias_groups(model):
        stored = next((n for n in group if n in arrays), None)
        if stored is None:
            raise BaseStoreError(
                f"the stored base has no weight for {group[0]!r}: it was put from another "
                "architecture; pass the same name/gguf_file/random_init the base was loaded with"
            )
        tensor = _as_tensor(arrays[stored], dtypes[stored])
        is_param = group[0] in meta
        want = (meta[group[0]] if is_param else meta_buffers[group[0]]).shape
        if tuple(tensor.shape) != tuple(want):
            raise BaseStoreError(
                f"stored weight {stored!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(want)}: load the shared base with the config it was put with"
            )
        value = nn.Parameter(tensor, requires_grad=False) if is_param else tensor
        for name in group:  # every alias gets the same object: ties survive
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            (owner._parameters if is_param else owner._buffers)[leaf] = value
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.eval()


def put_base(model: nn.Module):
    """Put the base weights into Ray's object store once; returns the ``ObjectRef``.

    Call it once per job on the driver (Ray copies the object to another node's store the
    first time a worker there asks for it, then every worker on that node shares that copy).
    Keep the returned ref alive for as long as workers use the base.

    Example:
        >>> ref = put_base(load_base("smollm2-135m"))
        >>> model = load_base_shared(ref, name="smollm2-135m")   # in each worker
    """
    import ray

    return ray.put(base_arrays(model))


def load_base_shared(
    ref: Any,
    name: str | None = None,
    gguf_file: str | None = None,
    random_init: dict[str, Any] | None = None,
    device: str = "cpu",
) -> nn.Module:
    """The base model whose weights are zero-copy, read-only views of the object store.

    Args:
        ref: the ``ObjectRef`` from :func:`put_base` (or the fetched dict itself).
        name, gguf_file, random_init: what the base was loaded with (``models.base.load_base``);
            only its config is read here, never its weights.
        device: ``cpu`` shares memory; any other device gets one copy per worker there (a GPU
            worker needs its own copy in GPU memory anyway).

    Returns:
        The frozen model in eval mode; inject adapters on top as usual (``models.lora.inject``).

    Example:
        >>> model = load_base_shared(ref, random_init=TINY)
        >>> inject(model, ["q_proj", "v_proj"], num_tasks=4, rank=8, alpha=16)
    """
    if isinstance(ref, dict):
        state = ref
    else:
        import ray

        state = ray.get(ref)
    model = model_from_arrays(state, load_config(name, gguf_file, random_init))
    return model.to(device) if device != "cpu" else model


def private_copy(model: nn.Module) -> nn.Module:
    """Give ``model`` private, writable copies of its weights (before merging or pruning in place).

    Ties are preserved: each distinct tensor is copied once and re-assigned to all its names.
    """
    for group in _alias_groups(model):
        owner_name, _, leaf = group[0].rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        is_param = leaf in owner._parameters
        old = owner._parameters[leaf] if is_param else owner._buffers[leaf]
        new = nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad) if is_param else old.clone()
        for name in group:
            o_name, _, lf = name.rpartition(".")
            o = model.get_submodule(o_name) if o_name else model
            (o._parameters if is_param else o._buffers)[lf] = new
    return model


def object_store_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of distinct weights in shared memory mappings, bytes of all distinct weights).

    Reads ``/proc/self/maps`` (Linux): a weight counts as shared when its memory lies in a
    shared mapping (``rw-s``, e.g. ``/dev/shm/plasma...``). Used by tests and the benchmark
    to prove that no worker made a private copy.
    """
    regions: list[tuple[int, int]] = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) > 1 and fields[1].endswith("s"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                regions.append((lo, hi))
    shared = total = 0
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.device.type != "cpu":
            continue
        seen.add(t.data_ptr())
        n = t.numel() * t.element_size()
        total += n
        if any(lo <= t.data_ptr() and t.data_ptr() + n <= hi for lo, hi in regions):
            shared += n
    return shared, total
