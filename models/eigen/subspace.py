"""EigenLoRAx recycling: N task adapters -> one principal subspace per module + coefficients.

Per adapted module (Kaushik et al. 2025), the N adapters' B matrices are stacked side by
side and their A^T likewise, each column being one data point:

    X_B = [s_1 B_1 | ... | s_N B_N]        # (m, R),  R = sum_t r_t   (ranks may differ)
    X_A = [A_1^T   | ... | A_N^T  ]        # (n, R)
    mu  = column mean,   X - mu 1^T = U S V^T,   V_B = U[:, :K]        # (m, K), same for A

``s_t = alpha_t / r_t`` is folded into B so that the columns are in units of delta W: tasks
trained with different alpha/r weigh by their real effect. Every adapter is then stored as
its coefficients

    alpha_B[t] = V_B^T (s_t B_t - mu_B 1^T)     # (K, r_t)
    alpha_A[t] = V_A^T (A_t^T  - mu_A 1^T)      # (K, r_t)

and reconstructed as ``s_t B_t ~ mu_B 1^T + V_B alpha_B[t]``, ``A_t^T ~ mu_A 1^T + V_A alpha_A[t]``.
If the centred columns span at most K directions the reconstruction is exact. K is fixed, or
per module the smallest K whose explained variance sum_{i<K} S_i^2 / sum_i S_i^2 reaches the
threshold on both the A and the B side. Storage: K (m + n) + m + n numbers per module for the
subspace plus 2 K r_t per task, against r_t (m + n) per task for the full adapters.

Saved as ``subspace.safetensors`` + ``subspace.json`` (atomic; nothing is unpickled).
Model code only: no Ray here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from models.files import atomic_dir
from models.peft_io import WEIGHTS_NAME, AdapterFormatError, module_of_key, read_adapter, write_adapter_dir

__all__ = [
    "SubspaceError",
    "ModuleBasis",
    "Subspace",
    "build_subspace",
    "load_peft_adapters",
    "SUBSPACE_CONFIG",
    "SUBSPACE_WEIGHTS",
]

SUBSPACE_CONFIG = "subspace.json"
SUBSPACE_WEIGHTS = "subspace.safetensors"
_PREFIX = "base_model.model."
_FORMAT_VERSION = 1

# module -> (A (r, n), B (m, r)): one adapter; task -> that: the adapters to recycle
AdapterPairs = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
Adapters = Mapping[str, AdapterPairs]
Loaded = dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]


class SubspaceError(ValueError):
    """Adapters that cannot share a subspace, a bad k / threshold, or a damaged subspace file."""


@dataclass
class ModuleBasis:
    """The principal subspace of one adapted module (float32, frozen).

    Attributes:
        mean_B: (m,) column mean of the stacked, scaled B matrices.
        basis_B: (m, K) orthonormal principal directions of the B columns.
        mean_A: (n,) column mean of the stacked A^T.
        basis_A: (n, K) orthonormal principal directions of the A^T columns.
        variance_B / variance_A: explained-variance ratio of every component (all of them,
            not only the K kept: a scree plot's data).
    """

    mean_B: torch.Tensor
    basis_B: torch.Tensor
    mean_A: torch.Tensor
    basis_A: torch.Tensor
    variance_B: list[float] = field(default_factory=list)
    variance_A: list[float] = field(default_factory=list)

    @property
    def k(self) -> int:
        return int(self.basis_B.shape[1])

    @property
    def explained_variance(self) -> dict[str, float]:
        """Fraction of the centred variance the K kept directions explain, per side."""
        return {"B": float(sum(self.variance_B[: self.k])), "A": float(sum(self.variance_A[: self.k]))}


@dataclass
class Subspace:
    """Principal subspaces of every module plus each recycled adapter's coefficients.

    Attributes:
        modules: module name (as in the base model) -> :class:`ModuleBasis`.
        coefficients: task -> module -> (alpha_A (K, r), alpha_B (K, r)).
        scales: task -> module -> s = lora_alpha / r of the original adapter (folded into B).
        rel_error: task -> ||dW_hat - dW||_F / ||dW||_F over all its modules, dW = s B A.

    Example:
        >>> adapters, scales = load_peft_adapters(["out/adapters/json", "out/adapters/http"])
        >>> sub = build_subspace(adapters, k=None, explained_variance=0.9, scales=scales)
        >>> sub.save("out/recycle/subspace")
        >>> sub.summary()["storage_ratio"]  # subspace + coefficients vs the full adapters
    """

    modules: dict[str, ModuleBasis]
    coefficients: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]
    scales: dict[str, dict[str, float]]
    rel_error: dict[str, float] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.coefficients)

    # ------------------------------------------------------------------ coefficients
    def project(
        self, adapter: AdapterPairs, scale: float | Mapping[str, float] = 1.0
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Coefficients (alpha_A, alpha_B), each (K, r), of one adapter {module: (A, B)}."""
        out = {}
        for name, basis in self.modules.items():
            if name not in adapter:
                raise SubspaceError(f"adapter lacks module {name!r} that the subspace covers")
            a, b = (x.detach().double() for x in adapter[name])
            s = float(scale[name] if isinstance(scale, Mapping) else scale)
            alpha_a = basis.basis_A.double().T @ (a.T - basis.mean_A.double()[:, None])
            alpha_b = basis.basis_B.double().T @ (s * b - basis.mean_B.double()[:, None])
            out[name] = (alpha_a.float(), alpha_b.float())
        return out

    def add_task(self, task: str, adapter: AdapterPairs, scale: float | Mapping[str, float] = 1.0) -> float:
        """Store one more adapter as coefficients; returns its relative reconstruction error."""
        self.coefficients[task] = self.project(adapter, scale)
        self.scales[task] = {n: float(scale[n] if isinstance(scale, Mapping) else scale) for n in self.modules}
        self.rel_error[task] = _rel_error(self, task, adapter)
        return self.rel_error[task]

    def reconstruct(self, task: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (A (r, n), B (m, r))} of a stored task, in its original scaling s_t."""
        if task not in self.coefficients:
            raise SubspaceError(f"task {task!r} is not stored in this subspace; stored: {self.tasks}")
        out = {}
        for name, (alpha_a, alpha_b) in self.coefficients[task].items():
            basis = self.modules[name]
            a = (basis.mean_A[:, None] + basis.basis_A @ alpha_a).T
            b = (basis.mean_B[:, None] + basis.basis_B @ alpha_b) / self.scales[task][name]
            out[name] = (a.contiguous(), b.contiguous())
        return out

    def adapter_state(self, task: str) -> dict[str, torch.Tensor]:
        """PEFT-keyed tensors ``base_model.model.<module>.lora_{A,B}.weight`` of a stored task."""
        out = {}
        for name, (a, b) in self.reconstruct(task).items():
            out[f"{_PREFIX}{name}.lora_A.weight"] = a
            out[f"{_PREFIX}{name}.lora_B.weight"] = b
        return out

    def export_peft(self, task: str, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
        """Write a stored task's reconstructed adapter as a PEFT LoRA directory."""
        rec = self.reconstruct(task)
        ranks = {n: int(a.shape[0]) for n, (a, _) in rec.items()}
        alphas = {n: self.scales[task][n] * ranks[n] for n in rec}
        return write_adapter_dir(directory, self.adapter_state(task), ranks, alphas, base_model_name_or_path)

    # ---------------------------------------------------------------------- storage
    def storage_bytes(self) -> int:
        """Bytes of the subspace (means + bases) plus every task's coefficients (float32)."""
        n = sum(
            b.mean_A.numel() + b.mean_B.numel() + b.basis_A.numel() + b.basis_B.numel() for b in self.modules.values()
        )
        n += sum(a.numel() + b.numel() for coeffs in self.coefficients.values() for a, b in coeffs.values())
        return 4 * n

    def full_bytes(self) -> int:
        """Bytes the stored tasks' full adapters take in float32: sum_t r_t (m + n) per module."""
        total = 0
        for coeffs in self.coefficients.values():
            for name, (alpha_a, _) in coeffs.items():
                basis = self.modules[name]
                total += alpha_a.shape[1] * (basis.mean_A.numel() + basis.mean_B.numel())
        return 4 * total

    @property
    def storage_ratio(self) -> float:
        """storage_bytes / full_bytes: below 1 means the subspace saves space."""
        full = self.full_bytes()
        return self.storage_bytes() / full if full else float("nan")

    def summary(self) -> dict:
        """The figures the report needs.

        ``recycle.{k, explained_variance, storage_ratio, reconstruction_rel_error}``.
        """
        ks = {n: b.k for n, b in self.modules.items()}
        ev = {n: b.explained_variance for n, b in self.modules.items()}
        errors = dict(self.rel_error)
        return {
            "k": max(ks.values()),
            "k_per_module": ks,
            # mean over modules of the smaller of the two sides' explained variance
            "explained_variance": sum(min(v.values()) for v in ev.values()) / len(ev),
            "explained_variance_per_module": ev,
            "storage_bytes": self.storage_bytes(),
            "full_adapter_bytes": self.full_bytes(),
            "storage_ratio": self.storage_ratio,
            "reconstruction_rel_error": sum(errors.values()) / len(errors) if errors else float("nan"),
            "reconstruction_rel_error_per_task": errors,
        }

    # ------------------------------------------------------------------------ files
    def save(self, directory: str | Path) -> Path:
        """Write ``subspace.safetensors`` + ``subspace.json`` into ``directory`` (atomically)."""
        tensors: dict[str, torch.Tensor] = {}
        for name, b in self.modules.items():
            for part in ("mean_A", "basis_A", "mean_B", "basis_B"):
                tensors[f"basis/{name}/{part}"] = getattr(b, part).contiguous()
        for i, coeffs in enumerate(self.coefficients.values()):
            for name, (alpha_a, alpha_b) in coeffs.items():
                tensors[f"coef/{i}/{name}/alpha_A"] = alpha_a.contiguous()
                tensors[f"coef/{i}/{name}/alpha_B"] = alpha_b.contiguous()
        config = {
            "format_version": _FORMAT_VERSION,
            "tasks": self.tasks,
            "modules": {
                n: {"k": b.k, "variance_A": b.variance_A, "variance_B": b.variance_B} for n, b in self.modules.items()
            },
            "scales": self.scales,
            "rel_error": self.rel_error,
            "summary": {k: v for k, v in self.summary().items() if not k.endswith("_per_module")},
        }
        with atomic_dir(directory) as tmp:
            (tmp / SUBSPACE_WEIGHTS).write_bytes(save(tensors, metadata={"format": "pt"}))
            (tmp / SUBSPACE_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> Subspace:
        """Read a directory written by :meth:`save`."""
        d = Path(directory)
        cfg_path, w_path = d / SUBSPACE_CONFIG, d / SUBSPACE_WEIGHTS
        if not cfg_path.is_file() or not w_path.is_file():
            raise SubspaceError(f"{d} is not a subspace directory: it needs {SUBSPACE_CONFIG} and {SUBSPACE_WEIGHTS}")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SubspaceError(f"{cfg_path}: not valid JSON ({e})") from None
        if cfg.get("format_version") != _FORMAT_VERSION:
            raise SubspaceError(f"{cfg_path}: format_version {cfg.get('format_version')!r}, expected {_FORMAT_VERSION}")
        try:
            tensors = load_file(str(w_path))
        except Exception as e:  # safetensors raises its own SafetensorError on damaged files
            raise SubspaceError(f"{w_path}: not a readable safetensors file ({e}); rebuild the subspace") from None
        try:
            modules = {
                n: ModuleBasis(
                    *(tensors[f"basis/{n}/{p}"] for p in ("mean_B", "basis_B", "mean_A", "basis_A")),
                    m["variance_B"],
                    m["variance_A"],
                )
                for n, m in cfg["modules"].items()
            }
            coefficients = {
                t: {n: (tensors[f"coef/{i}/{n}/alpha_A"], tensors[f"coef/{i}/{n}/alpha_B"]) for n in modules}
                for i, t in enumerate(cfg["tasks"])
            }
        except KeyError as e:
            raise SubspaceError(
                f"{d}: {SUBSPACE_WEIGHTS} lacks tensor {e}; the directory is damaged, rebuild it"
            ) from None
        return cls(
            modules, coefficients, {t: dict(s) for t, s in cfg["scales"].items()}, dict(cfg.get("rel_error", {}))
        )


# ---------------------------------------------------------------------------- building
def _principal(
    x: torch.Tensor, k: int | None, threshold: float | None
) -> tuple[torch.Tensor, torch.Tensor, list[float], int]:
    """Column mean, all principal directions (sign-fixed), variance ratios, K for the threshold."""
    mean = x.mean(dim=1)
    u, s, _ = torch.linalg.svd(x - mean[:, None], full_matrices=False)  # u (d, min(d, R))
    # Deterministic signs (sklearn's svd_flip): the largest-|.| entry of each direction > 0.
    pick = u.abs().argmax(dim=0)
    u = u * torch.sign(u[pick, torch.arange(u.shape[1])])[None, :]
    var = s**2
    total = float(var.sum())
    ratios = [float(v) / total for v in var] if total > 0 else [1.0] + [0.0] * (len(var) - 1)
    if threshold is None:
        need = int(k)  # type: ignore[arg-type]
    else:
        cum, need = 0.0, len(ratios)
        for i, r in enumerate(ratios):
            cum += r
            if cum >= threshold - 1e-12:
                need = i + 1
                break
    return mean, u, ratios, need


def build_subspace(
    adapters: Adapters,
    k: int | None = None,
    explained_variance: float | None = None,
    scales: Mapping[str, float | Mapping[str, float]] | None = None,
) -> Subspace:
    """Recycle N adapters into per-module principal subspaces and store them as coefficients.

    Args:
        adapters: task -> module -> (A (r, n), B (m, r)), e.g. from :func:`load_peft_adapters`.
            All tasks must cover the same modules with the same (m, n); ranks may differ.
        k: number of principal directions per module (clamped to min(m, n, sum of ranks)).
        explained_variance: instead of ``k``, per module the smallest K whose kept directions
            explain at least this fraction of the centred variance on both sides, in (0, 1].
        scales: task -> s = lora_alpha / r (one float, or per module); default 1.

    Returns:
        The :class:`Subspace`, with each task's relative reconstruction error filled in.

    Example:
        >>> sub = build_subspace({"a": {"q": (A1, B1)}, "b": {"q": (A2, B2)}}, k=4)
    """
    if (k is None) == (explained_variance is None):
        raise SubspaceError(
            "give exactly one of k (a fixed number of directions) or explained_variance (a fraction in (0, 1])"
        )
    if k is not None and int(k) < 1:
        raise SubspaceError(f"k={k}: use k >= 1")
    if explained_variance is not None and not 0.0 < float(explained_variance) <= 1.0:
        raise SubspaceError(f"explained_variance={explained_variance}: use a fraction in (0, 1], e.g. 0.9")
    if not adapters:
        raise SubspaceError("no adapters given: recycling needs at least one task adapter")
    tasks = list(adapters)
    module_names = list(adapters[tasks[0]])
    _check_compatible(
        {t: {n: (tuple(a.shape), tuple(b.shape)) for n, (a, b) in ad.items()} for t, ad in adapters.items()}
    )

    def scale_of(t: str, n: str) -> float:
        s = 1.0 if scales is None or t not in scales else scales[t]
        return float(s[n] if isinstance(s, Mapping) else s)

    modules: dict[str, ModuleBasis] = {}
    for name in module_names:
        x_b = torch.cat([scale_of(t, name) * adapters[t][name][1].detach().double() for t in tasks], dim=1)  # (m, R)
        x_a = torch.cat([adapters[t][name][0].detach().double().T for t in tasks], dim=1)  # (n, R)
        mean_b, u_b, var_b, need_b = _principal(x_b, k, explained_variance)
        mean_a, u_a, var_a, need_a = _principal(x_a, k, explained_variance)
        kk = min(max(need_b, need_a), u_b.shape[1], u_a.shape[1])
        modules[name] = ModuleBasis(
            mean_b.float(),
            u_b[:, :kk].float().contiguous(),
            mean_a.float(),
            u_a[:, :kk].float().contiguous(),
            var_b,
            var_a,
        )
    sub = Subspace(modules, {}, {})
    for t in tasks:
        sub.add_task(t, adapters[t], {n: scale_of(t, n) for n in module_names})
    return sub


def _rel_error(sub: Subspace, task: str, adapter: AdapterPairs) -> float:
    """||dW_hat - dW||_F / ||dW||_F summed over modules, dW = s B A, without forming dW.

    With stacked factors P = [B_hat | -B] (m, 2r) and Q = [A_hat; A] (2r, n), dW_hat - dW = s P Q
    and ||P Q||_F^2 = sum((P^T P) * (Q Q^T)): (2r x 2r) Gram matrices, O((m + n) r^2) in float64.
    """
    num = den = 0.0
    for name, (a_hat, b_hat) in sub.reconstruct(task).items():
        s = sub.scales[task][name]
        a, b = (x.detach().double() for x in adapter[name])
        p = s * torch.cat([b_hat.double(), -b], dim=1)
        q = torch.cat([a_hat.double(), a], dim=0)
        num += max(float(((p.T @ p) * (q @ q.T)).sum()), 0.0)
        den += float(((s * b).T @ (s * b) * (a @ a.T)).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _check_compatible(
    shapes: Mapping[str, Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]]], where: Mapping[str, str] | None = None
) -> None:
    """Same modules and (m, n) in every adapter; A and B of one adapter agree on r."""
    where = where or {t: f"task {t!r}" for t in shapes}
    tasks = list(shapes)
    ref_task = tasks[0]
    ref = shapes[ref_task]
    for t in tasks:
        missing, extra = sorted(set(ref) - set(shapes[t])), sorted(set(shapes[t]) - set(ref))
        if missing or extra:
            bad = (missing or extra)[0]
            raise SubspaceError(
                f"{where[t]} {'lacks' if missing else 'has an extra'} module {bad!r} compared with {where[ref_task]}: "
                "recycled adapters must share target modules and layers; train them with the same LoRA targets"
            )
        for name, (a_shape, b_shape) in shapes[t].items():
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise SubspaceError(
                    f"{where[t]} module {name!r}: A {a_shape} and B {b_shape} are not a LoRA pair (r, n) / (m, r)"
                )
            ra, rb = ref[name]
            if a_shape[1] != ra[1] or b_shape[0] != rb[0]:
                raise SubspaceError(
                    f"{where[t]} module {name!r} maps {a_shape[1]}->{b_shape[0]} "
                    f"but {where[ref_task]} maps {ra[1]}->{rb[0]}: "
                    "recycled adapters must come from the same base model"
                )


# ------------------------------------------------------------------------- PEFT files
def load_peft_adapters(
    dirs: Sequence[str | Path] | Mapping[str, str | Path],
) -> tuple[Loaded, dict[str, dict[str, float]]]:
    """Read PEFT LoRA adapter directories for recycling.

    Args:
        dirs: directories (task name = directory name) or task name -> directory.

    Returns:
        (adapters, scales): task -> module -> (A (r, n), B (m, r)) in float32, and
        task -> module -> s = lora_alpha / r (``/ sqrt(r)`` with rsLoRA).

    Example:
        >>> adapters, scales = load_peft_adapters({"json": "out/adapters/json", "http": "out/adapters/http"})
    """
    named = dict(dirs) if isinstance(dirs, Mapping) else {Path(d).name: d for d in dirs}
    if not isinstance(dirs, Mapping) and len(named) != len(dirs):
        raise SubspaceError(
            f"two adapter directories share a name: {[str(d) for d in dirs]}; pass a task -> directory mapping"
        )
    if not named:
        raise SubspaceError("no adapter directories given: recycling needs at least one")
    adapters: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    scales: dict[str, dict[str, float]] = {}
    for task, d in named.items():
        try:
            cfg, tensors = read_adapter(d)
        except AdapterFormatError as e:
            raise SubspaceError(str(e)) from None
        if cfg.get("use_dora"):
            raise SubspaceError(
                f"{d}: DoRA adapters carry magnitude vectors and cannot be recycled; use plain LoRA adapters"
            )
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            hit = module_of_key(key)
            if hit:
                pairs.setdefault(hit[0], {})[hit[1]] = value.float()
        if not pairs or any(len(ab) != 2 for ab in pairs.values()):
            raise SubspaceError(f"{d}: {WEIGHTS_NAME} has no complete lora_A/lora_B pairs")
        adapters[task] = {n: (ab["A"], ab["B"]) for n, ab in sorted(pairs.items())}
        scales[task] = {}
        for n, (a, _) in adapters[task].items():
            r = a.shape[0]
            alpha = float(cfg.get("alpha_pattern", {}).get(n, cfg.get("lora_alpha", r)))
            scales[task][n] = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    _check_compatible(
        {t: {n: (tuple(a.shape), tuple(b.shape)) for n, (a, b) in ad.items()} for t, ad in adapters.items()},
        where={t: f"adapter directory {str(d)!r}" for t, d in named.items()},
    )
    return adapters, scales
