"""Eigen-adapters for new tasks: train only coefficients on a recycled principal subspace.

For a module with frozen orthonormal bases V_A (n, K) and V_B (m, K) from
:func:`models.eigen.subspace.build_subspace`, task ``t`` trains only alpha_A[t], alpha_B[t] (K, r):

    A_t = (V_A alpha_A[t])^T     # (r, n)
    B_t =  V_B alpha_B[t]        # (m, r)
    y   = W x + b + s * B_t A_t x = W x + b + s * V_B alpha_B[t] alpha_A[t]^T (V_A^T x),  s = alpha / r

i.e. 2 K r parameters per module and task instead of LoRA's r (m + n). The subspace means
are NOT added: with alpha_B = 0 at init (LoRA's B = 0) every new task starts exactly at
the base model, and the mean of trained LoRA columns is small. Low-resource option
(EigenLoRAx): ``k_extra`` random directions, orthogonalised by Gram-Schmidt against the basis
and each other, widen the subspace to K + K'.

The batch is routed per row by the shared :class:`models.lora.TaskRouter`, so eigen layers
and :class:`models.lora.MultiTaskLoraLinear` layers can live in one model. The projection
V_A^T x and the lift V_B(.) run once for the whole batch; only the small (K, r)
coefficients are gathered per row (bmm, no loop over rows). Model code only: no Ray here.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.eigen.subspace import Subspace, SubspaceError
from models.lora import MultiTaskLoraLinear, TaskRouter, adapter_params, linear_dims
from models.peft_io import write_adapter_dir

__all__ = [
    "EigenLoraLinear",
    "gram_schmidt_extend",
    "inject_eigen",
    "eigen_layers",
    "eigen_params",
    "coeff_params",
    "lora_params",
    "eigen_adapter_state",
    "export_peft",
]

_PREFIX = "base_model.model."


def gram_schmidt_extend(basis: torch.Tensor, k_extra: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Append ``k_extra`` random unit directions orthogonal to ``basis`` (d, K) and each other.

    Modified Gram-Schmidt, applied twice per vector ("twice is enough" for float accuracy).
    Returns (d, K + k_extra); the first K columns are ``basis`` unchanged.
    """
    d, k = basis.shape
    if k_extra < 0 or k + k_extra > d:
        raise SubspaceError(
            f"k_extra={k_extra}: with K={k} directions a {d}-dimensional space holds at most {d - k} more; "
            "lower k_extra"
        )
    cols = [c for c in basis.double().T]
    for _ in range(k_extra):
        v = torch.randn(d, generator=generator, dtype=torch.float64)
        for _pass in range(2):
            for c in cols:
                v = v - (c @ v) * c
        v = v / v.norm()
        cols.append(v)
    return torch.stack(cols, dim=1).to(basis.dtype) if cols else basis.clone()


class EigenLoraLinear(nn.Module):
    """A frozen linear layer plus ``num_tasks`` coefficient-only adapters on a fixed subspace.

    Args:
        base: the frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) it wraps.
        basis_A: (in, K) orthonormal directions for the A side (frozen).
        basis_B: (out, K) orthonormal directions for the B side (frozen).
        num_tasks: adapter slots.
        rank: r of every task's adapter (columns of alpha).
        alpha: LoRA alpha; the adapter is scaled by ``alpha / rank``.
        router: the shared :class:`TaskRouter` carrying the batch's task ids.
        dropout: dropout on the adapter input.

    Example:
        >>> layer = EigenLoraLinear(nn.Linear(16, 8), torch.eye(16)[:, :3], torch.eye(8)[:, :3], 2, 4, 8.0,
        ...                         TaskRouter())
        >>> layer.router.single = 1; y = layer(torch.randn(2, 5, 16))
    """

    def __init__(
        self,
        base: nn.Module,
        basis_A: torch.Tensor,
        basis_B: torch.Tensor,
        num_tasks: int,
        rank: int,
        alpha: float,
        router: TaskRouter,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        in_f, out_f, fan_in_fan_out = linear_dims(base)
        if basis_A.shape[0] != in_f or basis_B.shape[0] != out_f or basis_A.shape[1] != basis_B.shape[1]:
            raise SubspaceError(
                f"subspace bases A {tuple(basis_A.shape)} / B {tuple(basis_B.shape)} "
                f"do not fit a {in_f}->{out_f} layer: "
                "the subspace was built on a different base model"
            )
        if int(rank) < 1 or num_tasks < 1:
            raise SubspaceError(
                f"eigen adapters need rank >= 1 and num_tasks >= 1 (got rank={rank}, num_tasks={num_tasks})"
            )
        k = basis_A.shape[1]
        dev = next(base.parameters()).device
        self.base_layer = base
        self.in_features, self.out_features = in_f, out_f
        self.fan_in_fan_out = fan_in_fan_out
        self.num_tasks, self.rank, self.alpha = num_tasks, int(rank), float(alpha)
        self.ranks = [self.rank] * num_tasks  # same attribute as MultiTaskLoraLinear
        self.scaling = self.alpha / self.rank
        self.router = router
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("basis_A", basis_A.detach().float().to(dev).contiguous())  # (in, K)
        self.register_buffer("basis_B", basis_B.detach().float().to(dev).contiguous())  # (out, K)
        # LoRA's init in coefficient space: B = 0, A random with the row norm of PEFT's A.
        self.coef_A = nn.Parameter(torch.randn(num_tasks, k, self.rank, device=dev) / math.sqrt(3 * k))
        self.coef_B = nn.Parameter(torch.zeros(num_tasks, k, self.rank, device=dev))
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def k(self) -> int:
        return int(self.basis_A.shape[1])

    def task_A(self, t: int) -> torch.Tensor:
        """A_t = (V_A alpha_A[t])^T: (r, in)."""
        return (self.basis_A @ self.coef_A[t]).T

    def task_B(self, t: int) -> torch.Tensor:
        """B_t = V_B alpha_B[t]: (out, r)."""
        return self.basis_B @ self.coef_B[t]

    def delta_weight(self, t: int) -> torch.Tensor:
        """s * B_t A_t in nn.Linear layout (out, in)."""
        return self.scaling * (self.task_B(t) @ self.task_A(t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # frozen base: once for the whole batch
        h = self.dropout(x).to(self.basis_A.dtype)  # adapter math in fp32 even on a bf16 base
        u = F.linear(h, self.basis_A.T)  # (N, ..., K): projection onto the subspace, shared
        router = self.router
        if router.single is not None:  # one task for every row: plain matmuls
            t = router.single
            z = u @ self.coef_A[t] @ self.coef_B[t].T  # (N, ..., K)
            return y + (self.scaling * F.linear(z, self.basis_B)).to(y.dtype)
        ids = router.ids
        if ids is None:
            raise RuntimeError("no task ids set: wrap the forward in `with task_ids(model, ids):`")
        shape = u.shape
        u = u.reshape(shape[0], -1, shape[-1])  # (N, L, K)
        z = torch.bmm(torch.bmm(u, self.coef_A[ids]), self.coef_B[ids].transpose(1, 2))  # (N, L, K)
        out = F.linear(z, self.basis_B) * self.scaling  # (N, L, out)
        return y + out.reshape(*shape[:-1], self.out_features).to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, tasks={self.num_tasks}, k={self.k}, rank={self.rank}"


# --------------------------------------------------------------------------- free functions
def inject_eigen(
    model: nn.Module,
    subspace: Subspace,
    num_tasks: int,
    rank: int,
    alpha: float,
    k_extra: int = 0,
    dropout: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """Replace every module the subspace covers with an :class:`EigenLoraLinear`.

    Args:
        model: the base model the subspace's adapters were trained on; modified in place.
        subspace: from :func:`models.eigen.subspace.build_subspace` or :meth:`Subspace.load`.
        num_tasks: new-task slots per layer.
        rank: r of each new task's adapter.
        alpha: LoRA alpha (scale alpha / r).
        k_extra: random Gram-Schmidt directions added per side (low-resource option).
        dropout: adapter-input dropout.
        seed: seed of the extra directions.

    Returns:
        The names of the replaced modules. Everything but the coefficients is frozen; the
        router is shared with :mod:`models.lora` (``model._loraflock_router``), so
        ``models.lora.task_ids(model, ids)`` routes these layers too.

    Example:
        >>> names = inject_eigen(model, Subspace.load("out/recycle/subspace"), num_tasks=1, rank=8, alpha=16)
    """
    router = getattr(model, "_loraflock_router", None) or TaskRouter()
    gen = torch.Generator().manual_seed(seed)
    for name in subspace.modules:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise SubspaceError(
                f"the subspace covers module {name!r}, which this model does not have: "
                "load the base model its adapters were trained on"
            ) from None
        if isinstance(module, (MultiTaskLoraLinear, EigenLoraLinear)):
            raise SubspaceError(
                f"module {name!r} already carries an adapter layer: inject eigen adapters into a bare base model"
            )
    for name, basis in subspace.modules.items():
        v_a = gram_schmidt_extend(basis.basis_A, k_extra, gen)
        v_b = gram_schmidt_extend(basis.basis_B, k_extra, gen)
        base = model.get_submodule(name)
        model.set_submodule(name, EigenLoraLinear(base, v_a, v_b, num_tasks, rank, alpha, router, dropout))
    model._loraflock_router = router  # type: ignore[attr-defined]
    # Only coefficients train (plus any models.lora adapters already in the model, untouched).
    keep = {id(p) for p in eigen_params(model)} | {id(p) for p in adapter_params(model) if p.requires_grad}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    return list(subspace.modules)


def eigen_layers(model: nn.Module) -> dict[str, EigenLoraLinear]:
    """Name -> layer for every eigen layer, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, EigenLoraLinear)}


def eigen_params(model: nn.Module) -> list[nn.Parameter]:
    """The trainable coefficients (alpha_A, alpha_B) of every eigen layer."""
    return [p for layer in eigen_layers(model).values() for p in (layer.coef_A, layer.coef_B)]


def coeff_params(model: nn.Module) -> int:
    """Trainable numbers per new task: sum over eigen layers of 2 (K + K') r."""
    return sum(2 * layer.k * layer.rank for layer in eigen_layers(model).values())


def lora_params(model: nn.Module) -> int:
    """Numbers per task of a full LoRA of the same rank on the same modules: sum r (m + n)."""
    return sum(layer.rank * (layer.in_features + layer.out_features) for layer in eigen_layers(model).values())


def eigen_adapter_state(model: nn.Module, task: int) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors ``base_model.model.<module>.lora_{A,B}.weight`` of one eigen task."""
    layers = eigen_layers(model)
    if not layers:
        raise SubspaceError("model has no eigen layers: call inject_eigen() first")
    if not 0 <= task < next(iter(layers.values())).num_tasks:
        raise SubspaceError(
            f"task {task} out of range: the eigen layers hold {next(iter(layers.values())).num_tasks} slots"
        )
    out = {}
    for name, layer in layers.items():
        out[f"{_PREFIX}{name}.lora_A.weight"] = layer.task_A(task).detach().contiguous().cpu()
        out[f"{_PREFIX}{name}.lora_B.weight"] = layer.task_B(task).detach().contiguous().cpu()
    return out


def export_peft(model: nn.Module, task: int, directory: str | Path, base_name: str | None = None) -> Path:
    """Write eigen task ``task`` as a plain PEFT LoRA adapter directory (B_t, A_t expanded).

    ``peft.PeftModel.from_pretrained(base, directory)`` then gives the same logits as this
    model routed to ``task``.

    Example:
        >>> export_peft(model, 0, "out/recycle/new_task", "HuggingFaceTB/SmolLM2-135M")
    """
    state = eigen_adapter_state(model, task)
    layers = eigen_layers(model)
    first = next(iter(layers.values()))
    return write_adapter_dir(
        directory,
        state,
        {n: l.rank for n, l in layers.items()},
        {n: l.alpha for n, l in layers.items()},
        base_name,
        dropout=float(getattr(first.dropout, "p", 0.0)),
        fan_in_fan_out=first.fan_in_fan_out,
    )
