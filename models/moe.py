"""PESC / Camelidae: turn each dense FFN block into a mixture of adapter experts.

The frozen FFN ``F`` runs once per token and is shared by ``E`` experts; expert ``i`` only
adds a bottleneck adapter on top of its output (Wu et al. 2024, "Parameter-Efficient
Sparsity Crafting"):

    h   = F(x)                                        # (T, H) frozen, computed once
    g   = softmax(topk(W_r x))                        # (T, k) router over the layer input
    y   = h + s * sum_{i in topk} g_i * U_i GELU(D_i h)
          D_i: (b, H), U_i: (H, b), U_i = 0 at init   # so y == F(x) exactly at init

Load balancing is Switch-style, ``aux = E * sum_i f_i P_i``: ``f_i`` is the share of the
top-k assignments dispatched to expert ``i`` (a constant) and ``P_i`` the mean *full*
softmax probability of expert ``i`` over the tokens, which carries the gradient to ``W_r``
(the released Camelidae code multiplies two constants, which trains nothing). It is minimal,
``aux = 1``, when both are uniform.

Routing never reads task ids (PESC is task-agnostic); when the shared
:class:`models.lora.TaskRouter` carries them, they are used only to count per-task load.
Model code only: no Ray here.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from models.base import adaptable_layers
from models.files import atomic_write_bytes, atomic_write_json
from models.lora import LoraTargetError, TaskRouter, linear_dims, lora_layers

__all__ = [
    "AdapterExpertMoE",
    "MoEConfigError",
    "convert_to_moe",
    "moe_layers",
    "moe_params",
    "balance_loss",
    "expert_load",
    "task_expert_load",
    "reset_load",
    "save_moe",
    "load_moe",
    "MOE_CONFIG_NAME",
    "MOE_WEIGHTS_NAME",
]

MOE_CONFIG_NAME = "moe_config.json"
MOE_WEIGHTS_NAME = "moe_model.safetensors"
_FORMAT = "loraflock-pesc-moe"
_DISPATCH = ("auto", "sparse", "dense")


class MoEConfigError(ValueError):
    """Bad MoE settings, an FFN that cannot be converted, or saved experts that do not fit."""


def _ffn_dims(ffn: nn.Module) -> tuple[int, int]:
    """(input size, output size) of a Llama-family (gate/up/down) or GPT-2 (c_fc/c_proj) FFN."""

    def in_out(layer: nn.Module) -> tuple[int, int]:
        layer = getattr(layer, "base_layer", layer)  # LoRA-wrapped projections
        try:
            in_f, out_f, _ = linear_dims(layer)
        except LoraTargetError:
            raise MoEConfigError(f"unsupported FFN projection {type(layer).__name__}") from None
        return in_f, out_f

    if all(hasattr(ffn, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return in_out(ffn.up_proj)[0], in_out(ffn.down_proj)[1]
    if all(hasattr(ffn, n) for n in ("c_fc", "c_proj")):
        return in_out(ffn.c_fc)[0], in_out(ffn.c_proj)[1]
    raise MoEConfigError(
        f"cannot convert a {type(ffn).__name__} FFN: PESC needs a Llama-family mlp "
        "(gate_proj/up_proj/down_proj) or a GPT-2 mlp (c_fc/c_proj)"
    )


class AdapterExpertMoE(nn.Module):
    """A frozen FFN block shared by ``num_experts`` bottleneck-adapter experts, top-k routed.

    Args:
        ffn: the model's FFN module (frozen; LoRA inside it is allowed).
        in_features: size of the FFN input (the router reads it).
        out_features: size of the FFN output (the experts read and write it).
        num_experts: E.
        top_k: experts per token (k <= E).
        bottleneck: adapter width b.
        scale: s, multiplies the experts' sum.
        dispatch: ``sparse`` runs each expert on its own tokens only (compute ~ k/E of all
            experts; a Python loop over the E experts whose split sizes are read from the
            device: one host sync per layer); ``dense`` runs every expert on every token as two
            matmuls and zeroes the unrouted ones (no loop, no host sync). Same result. ``auto``:
            dense on a GPU, where a sync per layer stalls the queue and the experts' extra
            FLOPs (E/k x an adapter of width b) are small next to the FFN; sparse on a CPU,
            which is FLOP-bound.
        task_router: the model's shared :class:`TaskRouter`, read for load bookkeeping only.

    Example:
        >>> moe = AdapterExpertMoE(model.model.layers[0].mlp, 64, 64, 8, 2, 16, 1.0)
        >>> y = moe(torch.randn(2, 5, 64)); aux = moe.last_aux
    """

    def __init__(
        self,
        ffn: nn.Module,
        in_features: int,
        out_features: int,
        num_experts: int = 8,
        top_k: int = 2,
        bottleneck: int = 64,
        scale: float = 1.0,
        dispatch: str = "auto",
        task_router: TaskRouter | None = None,
    ) -> None:
        super().__init__()
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise MoEConfigError(f"pesc: need 1 <= top_k ({top_k}) <= num_experts ({num_experts})")
        if bottleneck < 1:
            raise MoEConfigError(f"pesc.bottleneck must be >= 1, got {bottleneck}")
        if not math.isfinite(scale):
            raise MoEConfigError(f"pesc.scale must be a finite number, got {scale}")
        if dispatch not in _DISPATCH:
            raise MoEConfigError(f"pesc.dispatch must be one of {_DISPATCH}, got {dispatch!r}")
        dev = next(ffn.parameters()).device
        self.ffn = ffn
        self.num_experts, self.top_k, self.bottleneck = num_experts, top_k, bottleneck
        self.scale, self.dispatch = float(scale), dispatch
        self.in_features, self.out_features = in_features, out_features
        self.task_router = task_router
        self.expert_router = nn.Linear(in_features, num_experts, bias=False, device=dev)  # W_r
        self.down = nn.Parameter(torch.empty(num_experts, bottleneck, out_features, device=dev))  # D_i
        self.up = nn.Parameter(torch.zeros(num_experts, out_features, bottleneck, device=dev))  # U_i = 0
        # Switch Transformer's router init (truncated normal, std sqrt(0.1 / fan_in)): small
        # logits, so routing starts near uniform even on a pretrained model's outlier features.
        std = math.sqrt(0.1 / in_features)
        nn.init.trunc_normal_(self.expert_router.weight, std=std, a=-2 * std, b=2 * std)
        for i in range(num_experts):
            nn.init.kaiming_uniform_(self.down[i], a=math.sqrt(5))  # nn.Linear's init, per expert
        self.register_buffer("load", torch.zeros(num_experts, dtype=torch.float64, device=dev), persistent=False)
        self._task_load: dict[int, torch.Tensor] = {}  # task id -> (E,) assignment counts (slots unknown)
        # With the number of task slots known (convert_to_moe reads it off the LoRA layers), the
        # per-task counts go into one (slots, E) tensor on the device: no host sync per forward.
        self.task_slots: int | None = None
        self._task_counts: torch.Tensor | None = None
        self.last_aux: torch.Tensor | None = None

    @property
    def task_load(self) -> dict[int, torch.Tensor]:
        """Task id -> (E,) assignment counts of the forwards that carried task ids (reads the device)."""
        out = dict(self._task_load)
        if self._task_counts is not None:
            seen = self._task_counts.sum(dim=1).tolist()
            out.update({t: self._task_counts[t] for t, n in enumerate(seen) if n > 0})
        return out

    def reset_task_load(self) -> None:
        self._task_load.clear()
        if self._task_counts is not None:
            self._task_counts.zero_()

    # ------------------------------------------------------------------------ experts
    def _experts_sparse(self, h: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Each expert on its own tokens: a loop over experts, never over tokens."""
        T, k = idx.shape
        flat = idx.reshape(-1)  # (T k,) expert of each assignment
        order = flat.argsort()
        tok = torch.arange(T, device=h.device).repeat_interleave(k)[order]  # token of each
        w = gates.reshape(-1)[order]
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        out = torch.zeros_like(h)
        for i, (tok_i, w_i) in enumerate(zip(tok.split(counts), w.split(counts))):
            if len(tok_i):
                z = F.linear(F.gelu(F.linear(h[tok_i], self.down[i])), self.up[i])  # (n_i, H)
                out.index_add_(0, tok_i, z * w_i[:, None].to(z.dtype))
        return out

    def _experts_dense(self, h: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """All experts on all tokens, unrouted ones weighted by exactly 0."""
        T, E, b = h.shape[0], self.num_experts, self.bottleneck
        z = F.gelu(F.linear(h, self.down.reshape(E * b, -1))).view(T, E, b)  # (T, E, b)
        combine = torch.zeros(T, E, dtype=z.dtype, device=h.device).scatter(1, idx, gates.to(z.dtype))
        up = self.up.transpose(1, 2).reshape(E * b, -1)  # (E b, H)
        return (z * combine[:, :, None]).reshape(T, E * b) @ up  # (T, H)

    # ------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.ffn(x, *args, **kwargs)  # frozen F(x): once, shared by every expert
        shape = h.shape
        xf, hf = x.reshape(-1, x.shape[-1]), h.reshape(-1, shape[-1])  # (T, H_in), (T, H)
        logits = self.expert_router(xf.to(self.expert_router.weight.dtype)).float()  # (T, E)
        probs = logits.softmax(dim=-1)  # full softmax: P for the balance loss
        top_val, idx = logits.topk(self.top_k, dim=-1)  # (T, k)
        gates = top_val.softmax(dim=-1)  # renormalised over the chosen k
        dense = self.dispatch == "dense" or (self.dispatch == "auto" and h.device.type != "cpu")
        experts = self._experts_dense if dense else self._experts_sparse
        # Experts run in their own dtype (fp32 adapters on a bf16 base), cast back after.
        y = hf + self.scale * experts(hf.to(self.down.dtype), idx, gates).to(hf.dtype)
        # Switch balance: f (constant shares of the k T assignments) . P (differentiable).
        flat = idx.reshape(-1)  # index_add, not bincount: bincount reads its max back on a GPU
        counts = flat.new_zeros(self.num_experts).index_add_(0, flat, torch.ones_like(flat))  # (E,)
        f = counts.to(probs.dtype) / idx.numel()
        self.last_aux = self.num_experts * (f * probs.mean(dim=0)).sum()
        self._count(counts, idx, x.shape[0] if x.dim() > 2 else None)
        return y.view(shape)

    @torch.no_grad()
    def _count(self, counts: torch.Tensor, idx: torch.Tensor, rows: int | None) -> None:
        """Accumulate assignment counts (and per task, when the batch carries task ids)."""
        self.load += counts.to(self.load.dtype)
        router = self.task_router
        if router is None or rows is None:
            return
        if self.task_slots is not None and (router.single is not None or
                                            (router.ids is not None and len(router.ids) == rows)):
            E = self.num_experts
            if self._task_counts is None:
                self._task_counts = torch.zeros(self.task_slots, E, dtype=self.load.dtype, device=idx.device)
            if router.single is not None:
                self._task_counts[router.single] += counts.to(self.load.dtype)
            else:
                tid = router.ids.to(idx.device).repeat_interleave(idx.numel() // rows)
                flat = tid * E + idx.reshape(-1)
                self._task_counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=self.load.dtype))
            return
        if router.single is not None:
            tasks = {int(router.single): counts}
        elif router.ids is not None and len(router.ids) == rows:
            E = self.num_experts
            tid = router.ids.to(idx.device).repeat_interleave(idx.numel() // rows)  # row -> its assignments
            n_tasks = int(tid.max()) + 1
            per = torch.bincount(tid * E + idx.reshape(-1), minlength=n_tasks * E).view(n_tasks, E)
            tasks = {t: per[t] for t in range(n_tasks) if bool(per[t].any())}
        else:
            return
        for t, c in tasks.items():
            prev = self._task_load.get(t)
            self._task_load[t] = c.to(self.load) + (prev if prev is not None else 0)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, bottleneck={self.bottleneck}, "
            f"scale={self.scale}, dispatch={self.dispatch}"
        )


# --------------------------------------------------------------------------- free functions
def convert_to_moe(
    model: nn.Module,
    num_experts: int = 8,
    top_k: int = 2,
    bottleneck: int = 64,
    scale: float = 1.0,
    layers: list[int] | None = None,
    dispatch: str = "auto",
) -> list[str]:
    """Replace the FFN (``mlp``) of the chosen blocks by an :class:`AdapterExpertMoE`, in place.

    The output is unchanged at conversion (``U_i = 0``). Only the new router and experts
    are made trainable; nothing else changes its ``requires_grad``. Note that
    ``models.lora.inject`` freezes every non-LoRA parameter: inject LoRA first and convert
    after, or re-enable ``moe_params(model)`` afterwards.

    Args:
        model: a Llama-family or GPT-2 causal LM (``load_base``), possibly with LoRA.
        num_experts: E experts per converted block.
        top_k: experts per token.
        bottleneck: adapter width b.
        scale: s on the experts' sum.
        layers: block indices to convert (``None``: all blocks).
        dispatch: ``auto``, ``sparse`` or ``dense`` (see :class:`AdapterExpertMoE`).

    Returns:
        Names of the converted modules (``model.layers.3.mlp`` ...), in model order.

    Example:
        >>> names = convert_to_moe(model, num_experts=8, top_k=2, bottleneck=64, layers=[22, 23])
    """
    path, blocks = adaptable_layers(model)
    chosen = list(range(len(blocks))) if layers is None else sorted({int(i) for i in layers})
    bad = [i for i in chosen if not 0 <= i < len(blocks)]
    if bad or not chosen:
        raise MoEConfigError(f"pesc.layers {layers} must be block indices in 0..{len(blocks) - 1}")
    router = getattr(model, "_loraflock_router", None) or TaskRouter()
    model._loraflock_router = router  # type: ignore[attr-defined]  # train_step routes through it
    slots = max((layer.num_tasks for layer in lora_layers(model).values()), default=None)
    names = []
    for i in chosen:
        block = blocks[i]
        ffn = getattr(block, "mlp", None)
        if ffn is None:
            raise MoEConfigError(f"block {i} of {type(model).__name__} has no `mlp` to convert")
        if isinstance(ffn, AdapterExpertMoE):
            raise MoEConfigError(f"block {i} is already converted: convert a fresh model")
        d_in, d_out = _ffn_dims(ffn)
        block.mlp = AdapterExpertMoE(ffn, d_in, d_out, num_experts, top_k, bottleneck, scale, dispatch, router)
        block.mlp.task_slots = slots
        names.append(f"{path}.{i}.mlp")
    for p in moe_params(model):
        p.requires_grad_(True)
    return names


def moe_layers(model: nn.Module) -> dict[str, AdapterExpertMoE]:
    """Name -> MoE block, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterExpertMoE)}


def moe_params(model: nn.Module) -> list[nn.Parameter]:
    """The trainable PESC parameters: every block's router ``W_r`` and experts ``D, U``."""
    out: list[nn.Parameter] = []
    for m in moe_layers(model).values():
        out += [m.expert_router.weight, m.down, m.up]
    return out


def balance_loss(model: nn.Module, reduction: str = "mean") -> torch.Tensor:
    """Switch balance loss of the last forward, ``E sum_i f_i P_i``, over the MoE blocks.

    Add ``coef * balance_loss(model)`` (coef ~ 0.01) to the objective, e.g. through
    ``train_step(..., extra_loss=lambda: 0.01 * balance_loss(model))``.

    Args:
        reduction: ``mean`` or ``sum`` over blocks.
    """
    if reduction not in ("mean", "sum"):
        raise MoEConfigError(f"balance_loss reduction must be 'mean' or 'sum', got {reduction!r}")
    auxes = [m.last_aux for m in moe_layers(model).values()]
    if not auxes:
        raise MoEConfigError("model has no MoE blocks: call convert_to_moe() first")
    if any(a is None for a in auxes):
        raise RuntimeError("balance_loss needs a forward pass first")
    total = torch.stack(auxes).sum()
    return total / len(auxes) if reduction == "mean" else total


def _shares(counts: torch.Tensor) -> list[float]:
    n = float(counts.sum())
    return [float(c) / n if n else 0.0 for c in counts]


def expert_load(model: nn.Module) -> dict[str, list[float]]:
    """Block -> share of the top-k assignments each expert received since :func:`reset_load`.

    Each list sums to 1 (all zeros before any forward); ``1 / E`` everywhere is perfect balance.
    """
    return {name: _shares(m.load) for name, m in moe_layers(model).items()}


def task_expert_load(model: nn.Module) -> dict[int, dict[str, list[float]]]:
    """Task id -> block -> expert shares, for forwards that carried task ids (bookkeeping only)."""
    out: dict[int, dict[str, list[float]]] = {}
    for name, m in moe_layers(model).items():
        for t, c in sorted(m.task_load.items()):
            out.setdefault(t, {})[name] = _shares(c)
    return out


def reset_load(model: nn.Module) -> None:
    """Zero the load counters of every MoE block."""
    for m in moe_layers(model).values():
        m.load.zero_()
        m.reset_task_load()


# --------------------------------------------------------------------------- save / load
def save_moe(model: nn.Module, directory: str | Path) -> Path:
    """Write routers + experts (safetensors) and their settings (JSON), each atomically.

    The config is written last and records the weights' sha256, so a reader never pairs a
    config with weights from another save. Files: ``moe_model.safetensors``, ``moe_config.json``.

    Example:
        >>> save_moe(model, "out/pesc/moe"); load_moe(load_base("smollm2-135m"), "out/pesc/moe")
    """
    layers = moe_layers(model)
    if not layers:
        raise MoEConfigError("model has no MoE blocks: call convert_to_moe() first")
    first = next(iter(layers.values()))
    state = {}
    for name, m in layers.items():
        state[f"{name}.expert_router.weight"] = m.expert_router.weight.detach().contiguous().cpu()
        state[f"{name}.down"] = m.down.detach().contiguous().cpu()
        state[f"{name}.up"] = m.up.detach().contiguous().cpu()
    blob = save(state, metadata={"format": _FORMAT})
    directory = Path(directory)
    atomic_write_bytes(directory / MOE_WEIGHTS_NAME, blob)
    path, blocks = adaptable_layers(model)
    index = {id(b.mlp): i for i, b in enumerate(blocks) if hasattr(b, "mlp")}
    config = {
        "format": _FORMAT,
        "version": 1,
        "model_class": type(model).__name__,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "num_experts": first.num_experts,
        "top_k": first.top_k,
        "bottleneck": first.bottleneck,
        "scale": first.scale,
        "dispatch": first.dispatch,
        "layers": [index[id(m)] for m in layers.values()],
        "modules": list(layers),
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
    }
    atomic_write_json(directory / MOE_CONFIG_NAME, config)
    return directory


def load_moe(base_model: nn.Module, directory: str | Path) -> list[str]:
    """Convert a fresh ``base_model`` as recorded in ``directory`` and load its experts.

    Returns:
        The converted module names.

    Raises:
        MoEConfigError: missing files, another model class, or weights that do not fit.
    """
    directory = Path(directory)
    cfg_path, w_path = directory / MOE_CONFIG_NAME, directory / MOE_WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise MoEConfigError(
            f"{directory} holds no saved MoE ({MOE_CONFIG_NAME} + {MOE_WEIGHTS_NAME}): run save_moe first"
        )
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format") != _FORMAT:
        raise MoEConfigError(f"{cfg_path} is not a loraflock MoE config (format {cfg.get('format')!r})")
    if cfg["model_class"] != type(base_model).__name__:
        raise MoEConfigError(
            f"the MoE in {directory} was trained on a {cfg['model_class']}, not a {type(base_model).__name__}: "
            "load it onto the same base"
        )
    blob = w_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != cfg["weights_sha256"]:
        raise MoEConfigError(f"{w_path} does not match {cfg_path} (interrupted save?): save again")
    names = convert_to_moe(
        base_model,
        cfg["num_experts"],
        cfg["top_k"],
        cfg["bottleneck"],
        cfg["scale"],
        cfg["layers"],
        cfg.get("dispatch", "sparse"),
    )
    state = load_file(str(w_path))
    want = {f"{n}.{p}" for n in names for p in ("expert_router.weight", "down", "up")}
    if set(state) != want:
        raise MoEConfigError(
            f"{w_path} holds {sorted(set(state) ^ want)[:4]} ... that do not fit this model's MoE blocks"
        )
    params = dict(base_model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            target = params[key]
            if target.shape != value.shape:
                raise MoEConfigError(
                    f"{key}: saved shape {tuple(value.shape)} != model's {tuple(target.shape)}: use the same base"
                )
            target.copy_(value)
    return names
