"""Bit budgets: choose each matrix's quantiser and bit width under a total byte budget.

LQ-LoRA's mixed-precision step as a small integer program. For matrix m and choice c
(a quantiser and a bit width) let ``e[m, c]`` be the (optionally weighted) squared
reconstruction error ``sum_ij w_ij (W - W_hat)_ij^2`` and ``n[m, c]`` the exact bytes of
the packed result. With one-hot ``x[m, c]`` in {0, 1}:

    minimise    sum_{m,c} e[m, c] x[m, c]
    subject to  sum_c x[m, c] = 1                       (one encoding per matrix)
                sum_{m,c} n[m, c] x[m, c] <= budget     (budget = avg_bits * sum numel / 8)

solved exactly by ``scipy.optimize.milp`` (HiGHS). The bytes are real packed sizes, so the
fp16 block scales (0.25 bits per weight at block 64) count against the budget: a 4-bit
budget cannot hold NF4 everywhere, only a mix of 4 and fewer bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from models.quant.lq import lq_decompose, weighted_error
from models.quant.quantizers import quantize

__all__ = ["DEFAULT_CHOICES", "BudgetError", "AllocationRow", "Allocation", "allocate", "error_table"]

DEFAULT_CHOICES: tuple[tuple[str, int], ...] = (("nf", 2), ("nf", 3), ("nf", 4), ("nf", 8))


class BudgetError(ValueError):
    """The budget cannot be met, or there is nothing to allocate."""


@dataclass
class AllocationRow:
    name: str
    quantizer: str
    bits: int
    bytes: int
    numel: int
    rel_error: float  # sqrt(e / sum w W^2) of the chosen encoding


@dataclass
class Allocation:
    """The chosen encoding of every matrix.

    Attributes:
        budget_bytes: the byte budget (avg_bits * numel / 8).
        rows: one :class:`AllocationRow` per matrix, in input order.
        total_error: sum of the chosen (weighted) squared errors.
        uniform: the best single choice for every matrix within the same budget, for
            comparison (``None`` when no single choice fits).
    """

    budget_bytes: int
    rows: list[AllocationRow]
    total_error: float
    uniform: dict | None = None
    table: dict = field(default_factory=dict, repr=False)

    @property
    def choices(self) -> dict[str, tuple[str, int]]:
        """name -> (quantizer, bits): what ``models.quant.model.quantize_model(bits=...)`` takes."""
        return {r.name: (r.quantizer, r.bits) for r in self.rows}

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def avg_bits(self) -> float:
        return 8.0 * self.total_bytes / max(sum(r.numel for r in self.rows), 1)

    def as_dict(self) -> dict:
        return {
            "budget_bytes": self.budget_bytes, "total_bytes": self.total_bytes, "avg_bits": self.avg_bits,
            "total_error": self.total_error, "uniform": self.uniform,
            "matrices": [r.__dict__ for r in self.rows],
        }


def error_table(
    matrices: Mapping[str, torch.Tensor],
    choices: Sequence[tuple[str, int]] = DEFAULT_CHOICES,
    weights: Mapping[str, torch.Tensor | float] | None = None,
    block_size: int = 64,
    rank: int = 0,
    iters: int = 3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(errors (M, C), bytes (M, C), reference norms (M,)) for every matrix and choice.

    ``weights[name]`` is a diagonal Fisher (shape of the matrix) or a scalar importance.
    With ``rank > 0`` the error is the LQ decomposition's (Q + rank-r part), as LQ-LoRA's
    budget does when the adapters start from L1 L2^T.
    """
    err = np.zeros((len(matrices), len(choices)))
    nbytes = np.zeros((len(matrices), len(choices)), dtype=np.int64)
    norm2 = np.zeros(len(matrices))
    for i, (name, w) in enumerate(matrices.items()):
        w = w.detach().float().cpu()
        wt = None if weights is None else weights.get(name)
        fisher = wt if isinstance(wt, torch.Tensor) else None
        scalar = float(wt) if wt is not None and fisher is None else 1.0
        norm2[i] = scalar * weighted_error(w, fisher) ** 2
        for j, (method, bits) in enumerate(choices):
            if rank > 0 and w.dim() == 2:
                dec = lq_decompose(w, bits, min(rank, min(w.shape)), method, iters, fisher, block_size)
                e, nb = dec.history[dec.best], dec.Q.nbytes
            else:
                packed = quantize(w, method, bits, block_size)
                e, nb = weighted_error(w - packed.dequantize(), fisher), packed.nbytes
            err[i, j], nbytes[i, j] = scalar * e**2, nb
    return err, nbytes, norm2


def allocate(
    matrices: Mapping[str, torch.Tensor],
    avg_bits: float,
    choices: Sequence[tuple[str, int]] = DEFAULT_CHOICES,
    weights: Mapping[str, torch.Tensor | float] | None = None,
    block_size: int = 64,
    rank: int = 0,
    iters: int = 3,
    table: Mapping | None = None,
) -> Allocation:
    """Choose (quantiser, bits) per matrix: least total error within ``avg_bits`` on average.

    Args:
        matrices: name -> weight (e.g. ``models.quant.model.quantizable_matrices(model)``).
        avg_bits: budget in bits per weight, all stored bytes included.
        choices: candidate (quantizer, bits) pairs, e.g. (("nf", 3), ("vq", 2)).
        weights: optional name -> diagonal Fisher or scalar importance.
        block_size: quantiser block size.
        rank: LQ rank the errors are measured with (0 = plain quantisation).
        iters: LQ rounds when ``rank > 0``.
        table: ``Allocation.table`` of an earlier call over the same matrices and choices:
            reuses its errors (the expensive part) for a different budget.

    Raises:
        BudgetError: no matrices, no choices, or a budget below the smallest encoding.

    Example:
        >>> alloc = allocate(quantizable_matrices(model), avg_bits=3.0)
        >>> quantize_model(model, bits=alloc)
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    if not matrices:
        raise BudgetError(
            "no quantisable matrices: check target_modules / layers (the model has no matching linear layer)"
        )
    if not choices:
        raise BudgetError("choices is empty: give (quantizer, bits) pairs such as (('nf', 4), ('nf', 8))")
    names = list(matrices)
    numel = sum(int(w.numel()) for w in matrices.values())
    budget = int(math.floor(avg_bits * numel / 8))
    if table is not None and list(table["choices"]) == list(choices) and table["names"] == names:
        err, nbytes, norm2 = table["errors"], table["bytes"], table["norm2"]
    else:
        err, nbytes, norm2 = error_table(matrices, choices, weights, block_size, rank, iters)
    m, c = err.shape
    min_bytes = int(nbytes.min(axis=1).sum())
    if budget < min_bytes:
        raise BudgetError(
            f"avg_bits={avg_bits} ({budget} bytes) is below the smallest encoding of these matrices: "
            f"{min_bytes} bytes = {8 * min_bytes / numel:.4f} bits per weight; raise avg_bits to at least that"
        )
    scale = max(float(err.max()), 1e-30)  # keep the objective O(1) for the solver
    one_hot = np.kron(np.eye(m), np.ones((1, c)))  # (M, M*C)
    res = milp(
        c=(err / scale).reshape(-1),
        constraints=[
            LinearConstraint(one_hot, 1, 1),
            LinearConstraint(nbytes.reshape(1, -1).astype(float), -np.inf, budget),
        ],
        integrality=np.ones(m * c),
        bounds=Bounds(0, 1),
    )
    if res.x is None:
        raise BudgetError(f"the integer program found no allocation ({res.message}); raise avg_bits")
    pick = np.round(res.x).reshape(m, c).argmax(axis=1)
    rows = [
        AllocationRow(names[i], choices[j][0], int(choices[j][1]), int(nbytes[i, j]), int(matrices[names[i]].numel()),
                      math.sqrt(err[i, j] / max(norm2[i], 1e-30)))
        for i, j in enumerate(pick)
    ]
    uniform = None
    fits = [j for j in range(c) if nbytes[:, j].sum() <= budget]
    if fits:
        j = min(fits, key=lambda k: err[:, k].sum())
        uniform = {"quantizer": choices[j][0], "bits": int(choices[j][1]), "bytes": int(nbytes[:, j].sum()),
                   "total_error": float(err[:, j].sum())}
    total = float(sum(err[i, j] for i, j in enumerate(pick)))
    return Allocation(
        budget,
        rows,
        total,
        uniform,
        table={"errors": err, "bytes": nbytes, "norm2": norm2, "choices": list(choices), "names": names},
    )
