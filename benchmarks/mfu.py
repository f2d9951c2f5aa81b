"""MFU for the throughput benchmarks: GPU peak FLOP/s by exact name, and a LoRA FLOPs model.

Two figures, because a flock with the prefix cache does less work than the model nominally needs:

* **model FLOPs** per trained token, the field's convention for LoRA fine-tuning: ``4 N`` (forward
  ``2 N`` plus the activation gradients ``2 N`` of backward; the frozen base needs no weight
  gradients, which is why it is 4 and not the 6 of full training), ``N`` = every linear weight
  of the model, the LM head included, embeddings excluded (a lookup). Plus attention's score and
  value products, ``12 n_layer L d`` per token as PaLM counts them (``4 L d`` forward, twice that
  backward; no causal halving), and the adapters' own ``6 r (d_in + d_out)`` per adapted matrix.
  The same count for every arm: MFU from it says how fast the *model* trains.
* **hardware FLOPs** actually executed per step token: the forward only through the blocks that
  run every step (with the prefix cache, the blocks from ``split`` up, plus the head), the
  backward only from the lowest adapted block up (autograd stops there), attention likewise;
  plus, once per cached sequence token, the prefix pass through the lower blocks. HFU from it
  says how busy the GPU was.

Peaks are dense bf16 tensor-core FLOP/s (no sparsity) from NVIDIA's data sheets, matched on the
whole device name as ``torch.cuda.get_device_name`` reports it: an H100 PCIe (756 TFLOP/s) is not
an H100 SXM (989), and a name the table does not know gives no MFU and a note asking for
``--peak-tflops``, never a guess.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from torch import nn

__all__ = ["GPU_PEAKS", "match_peak", "linear_params", "FlopsModel", "flops_model"]

# (full-name pattern after normalising: upper case, "NVIDIA "/"GEFORCE " dropped), label, dense bf16 TFLOP/s
GPU_PEAKS: list[tuple[str, str, float]] = [
    (r"H100 (80GB )?HBM3|H100 SXM5?( \d+GB)?", "H100 SXM", 989.4),
    (r"H100 PCIE( \d+GB)?", "H100 PCIe", 756.0),
    (r"H100 NVL( \d+GB)?", "H100 NVL", 835.0),
    (r"H200( SXM)?( \d+GB)?( HBM3E)?", "H200 SXM", 989.4),
    (r"H200 NVL( \d+GB)?", "H200 NVL", 835.0),
    (r"GH200( \d+GB)?", "GH200", 989.4),
    (r"A100[- ]SXM4?[- ]40GB", "A100 40GB SXM", 312.0),
    (r"A100[- ]SXM4?[- ]80GB", "A100 80GB SXM", 312.0),
    (r"A100[- ]PCIE[- ]40GB|A100 40GB PCIE", "A100 40GB PCIe", 312.0),
    (r"A100[- ]PCIE[- ]80GB|A100 80GB PCIE", "A100 80GB PCIe", 312.0),
    (r"L40S", "L40S", 362.0),
    (r"L40", "L40", 181.0),
    (r"L4", "L4", 121.0),
    (r"A10", "A10", 125.0),
    (r"A10G", "A10G", 70.0),  # AWS's A10G: lower clocks than the A10
    (r"RTX 4090", "RTX 4090", 165.2),  # bf16 with fp32 accumulation (what torch's matmuls use)
    (r"RTX A6000", "RTX A6000", 154.8),
    (r"RTX 6000 ADA GENERATION", "RTX 6000 Ada", 364.2),
]


def _normalise(name: str) -> str:
    n = re.sub(r"\s+", " ", name.upper().strip())
    for prefix in ("NVIDIA ", "GEFORCE "):
        n = n.removeprefix(prefix)
    return n


def match_peak(device_name: str) -> tuple[str, float] | None:
    """(label, dense bf16 FLOP/s) of a GPU by its full device name; ``None`` when unknown.

    Example:
        >>> match_peak("NVIDIA H100 PCIe")
        ('H100 PCIe', 756000000000000.0)
        >>> match_peak("NVIDIA H100") is None   # which H100? no guess
        True
    """
    n = _normalise(device_name)
    for pattern, label, tflops in GPU_PEAKS:
        if re.fullmatch(pattern, n):
            return label, tflops * 1e12
    return None


def _block_of(name: str) -> int | None:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def linear_params(model: nn.Module) -> tuple[dict[int, int], int]:
    """Frozen linear weights per transformer block ({block: numel}) and outside blocks (the head).

    Counts ``nn.Linear`` and quantised layers (``is_quantized_linear``) by their (out, in)
    shape; a LoRA-wrapped layer is counted once, through its ``base_layer``. Tied or not,
    the LM head is a matmul and counts.
    """
    blocks: dict[int, int] = {}
    other = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or getattr(mod, "is_quantized_linear", False):
            numel = mod.out_features * mod.in_features
            b = _block_of(name)
            if b is None:
                other += numel
            else:
                blocks[b] = blocks.get(b, 0) + numel
    return blocks, other


@dataclass
class FlopsModel:
    """FLOPs per token of one training step (see the module docstring for what each counts)."""

    model_per_token: float  # 4 N + attention + adapters: the convention MFU is quoted in
    hardware_per_token: float  # what a step actually runs per token (cache and early-stopped backward)
    prefix_per_token: float  # once per cached sequence token: the lower blocks' forward (0 without cache)
    n_linear: int  # N: frozen linear weights, head included
    n_layers: int

    def as_dict(self) -> dict:
        return asdict(self)


def flops_model(
    blocks: dict[int, int], head: int, seq: int, attn_dim: int, adapters: list[tuple[int, int, int]],
    lowest_adapted: int, split: int = 0, head_recompute: bool = False,
) -> FlopsModel:
    """The FLOPs model of a LoRA training step.

    Args:
        blocks: frozen linear weights per block (:func:`linear_params`).
        head: linear weights outside the blocks (the LM head).
        seq: tokens per sequence (attention's length).
        attn_dim: query width, heads x head dim.
        adapters: (d_in, d_out, rank) of every adapted matrix.
        lowest_adapted: the lowest block with an adapter (backward stops below it).
        split: first block that runs every step (prefix cache); 0 = no cache.
        head_recompute: the chunked loss recomputes the head in backward (a batch's logits over
            one chunk, ``models.train.chunked_loss``): one more head forward per token.
    """
    n_layers = len(blocks)
    n = sum(blocks.values()) + head
    attn_fwd = 4.0 * seq * attn_dim  # per token per layer: Q K^T and P V, 2 L d each
    adapter = sum(6.0 * r * (i + o) for i, o, r in adapters)
    model = 4.0 * n + 3 * attn_fwd * n_layers + adapter
    fwd_blocks = [b for b in blocks if b >= split]
    bwd_blocks = [b for b in blocks if b >= lowest_adapted]
    hardware = (
        2.0 * (sum(blocks[b] for b in fwd_blocks) + head) + attn_fwd * len(fwd_blocks)
        + 2.0 * (sum(blocks[b] for b in bwd_blocks) + head) + 2 * attn_fwd * len(bwd_blocks)
        + adapter + (2.0 * head if head_recompute else 0.0)
    )
    lower = [b for b in blocks if b < split]
    prefix = 2.0 * sum(blocks[b] for b in lower) + attn_fwd * len(lower)
    return FlopsModel(model, hardware, prefix, n, n_layers)
