"""The ``base:`` section of a job: which frozen model the flock adapts, and how it is quantised.

Kept apart from ``orchestrator.spec`` (which assembles the whole job) because the base and
its quantisation settings carry most of the cross-field rules (one source, bits vs
bit_budget, the smallest encodable budget); ``orchestrator.spec`` re-exports both classes.

Example (YAML, inside a job)::

    base:
      name: smollm2-135m
      bits: 4                  # or bit_budget: 3.0 (a width chosen per matrix)
      quant: {quantizer: nf, lq_rank: 8, layers: adapted}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tasks.strict import Strict

__all__ = ["QUANT_BITS", "QuantSpec", "BaseSpec"]


QUANT_BITS = (2, 3, 4, 8)


class QuantSpec(Strict):
    """How the base is quantised when ``base.bits`` < 16 or ``base.bit_budget`` is set.

    LQ-LoRA / ReALLM: each chosen matrix becomes ``W ~ Q + L1 L2^T`` with Q packed at b bits
    (dequantised per layer in the forward) and the rank-r part starting the adapters'
    shared Theta. The defaults match the search trials (``orchestrator/search/trial.py``).

    Args:
        quantizer: ``nf`` (NormalFloat), ``uniform`` (blockwise absmax) or ``vq`` (k-means
            codebook). For ``bit_budget`` the candidates are this quantizer at 2, 3, 4, 8 bits.
        lq_rank: rank of L1 L2^T on matrices that get LoRA; ``None`` = ``lora.rank``;
            0 = plain quantisation (adapters keep their usual init).
        lq_iters: LQ rounds (SVD, re-quantise); the best iterate is kept.
        layers: ``adapted`` = every linear layer of the blocks that get adapters
            (``lora.top_layers``); ``all`` = every block's. The output head is never quantised.
        block_size: weights per fp16 absmax scale (scales cost 16 / block_size bits per weight).
    """

    quantizer: Literal["nf", "uniform", "vq"] = "nf"
    lq_rank: int | None = Field(None, ge=0, le=4096)
    lq_iters: int = Field(2, ge=1, le=20)
    layers: Literal["adapted", "all"] = "adapted"
    block_size: int = Field(64, ge=2, le=4096)

    @field_validator("block_size")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"block_size must be even (e.g. 64), got {v}")
        return v


class BaseSpec(Strict):
    """The frozen base model.

    Args:
        name: builtin name (``smollm2-135m``), hub id or local directory.
        gguf_file: a GGUF file inside ``name`` (dequantised to fp32 once and cached).
        random_init: a ``transformers`` config dict with ``model_type``: random weights (tests).
        tokenizer: tokenizer name/path, or ``bytes`` (offline byte-level); default: ``name``.
        dtype: ``auto`` = fp32 on CPU, bf16 on GPU.
        bits: quantise the base to 2, 3, 4 or 8 bits per weight (16 or unset = unquantised);
            the flock's adapters then train on the quantised base (see ``quant``).
        bit_budget: instead of one width, an average bits-per-weight budget for the quantised
            matrices (codes, scales and codebooks all count); each matrix's width is chosen
            to minimise the total reconstruction error within it (``models.quant.bit_budget``).
        quant: quantiser, LQ rank/rounds and which layers (used with ``bits``/``bit_budget``).
    """

    name: str | None = None
    gguf_file: str | None = None
    random_init: dict[str, Any] | None = None
    tokenizer: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    bits: int | None = None
    bit_budget: float | None = None
    quant: QuantSpec = Field(default_factory=QuantSpec)

    @field_validator("bits")
    @classmethod
    def _bits_ok(cls, v: int | None) -> int | None:
        if v is not None and v not in (*QUANT_BITS, 16):
            raise ValueError(
                f"bits={v} is not supported: use 2, 3, 4 or 8 (quantised) or 16 (unquantised); "
                "for an average between widths use base.bit_budget instead"
            )
        return v

    @field_validator("bit_budget")
    @classmethod
    def _budget_ok(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 16:  # NaN fails the comparison too
            raise ValueError(f"bit_budget={v:g} must be an average number of bits per weight in (0, 16], e.g. 3.0")
        return v

    @property
    def quantized(self) -> bool:
        """Whether the flock trains on a quantised base."""
        return self.bit_budget is not None or (self.bits is not None and self.bits < 16)

    @model_validator(mode="after")
    def _one_source(self) -> BaseSpec:
        if (self.name is None) == (self.random_init is None):
            raise ValueError("give exactly one of `name` (hub id, local path, builtin) or `random_init`")
        if self.random_init is not None:
            if "model_type" not in self.random_init:
                raise ValueError("random_init needs a `model_type` (e.g. llama, gpt2)")
            if self.tokenizer is None:
                raise ValueError("random_init models need `tokenizer` (e.g. `bytes`, vocab 257)")
        if self.bits is not None and self.bit_budget is not None:
            raise ValueError(
                f"give base.bits ({self.bits}) or base.bit_budget ({self.bit_budget:g}), not both: "
                "bits quantises every matrix to one width, bit_budget chooses a width per matrix"
            )
        if self.bit_budget is not None:
            floor = 2 + 16 / self.quant.block_size  # 2-bit codes + one fp16 scale per block
            if self.bit_budget < floor:
                raise ValueError(
                    f"bit_budget={self.bit_budget:g} is below the smallest encoding: 2-bit codes plus fp16 scales "
                    f"take at least {floor:g} bits per weight at quant.block_size {self.quant.block_size}; "
                    f"raise base.bit_budget to {floor:g} or more (or use a larger base.quant.block_size)"
                )
        if self.quant != QuantSpec() and not self.quantized:  # by value: model_dump() round trips carry the defaults
            raise ValueError(
                "base.quant has no effect without base.bits (2, 3, 4 or 8) or base.bit_budget: "
                "set one, or drop base.quant"
            )
        return self
