"""Export kind ``quantised``: a flock trained on an LQ-quantised base, served from a plain one.

The run's base is ``W ~ Q + L1 L2^T``: Q packed in ``quant_base/``, and ``L1 L2^T`` inside every
adapter (the shared adapter Theta started there). A multi-LoRA server wants a dense base and
plain adapters, so the export writes

    base    = dequant(Q) + L1 L2^T          (close to the original W: useful on its own)
    adapter = s B_t A_t - L1 L2^T = [s B_t | -L1] [A_t ; L2^T]      (exact, rank r + lq_rank)

and ``base + adapter`` is exactly the run's ``Q + s B_t A_t``. ``--rank r`` truncates the
adapter back to r by SVD, with the error reported. Runs written before the LQ factors were
stored (``quant_base/lq_factors.safetensors``) keep the LQ part in the adapters (base = Q).
"""

from __future__ import annotations

from safetensors.torch import load_file

from orchestrator.base.quant import LQ_FILE, QUANT_DIR, load_quant_base
from orchestrator.export.bundle import Bundle, dequantise, fold_into_base
from orchestrator.export.plain import flock_adapters
from orchestrator.export.run_dir import Run, need

__all__ = ["quantised_bundle"]


def quantised_bundle(run: Run, tasks: list[str]) -> Bundle:
    """The dequantised base with the LQ part folded in, and the flock's adapters of ``tasks``."""
    from orchestrator.base.load import load_job_base

    qdir = run.path / QUANT_DIR
    need(qdir / "quant.json", "the packed quantised base, written by the flock")
    model = load_job_base(run.spec, "cpu", "float32")
    load_quant_base(model, qdir)
    names = dequantise(model)
    notes = [f"base: the run's quantised base dequantised to fp32 ({len(names)} matrices, {QUANT_DIR}/)"]
    folded = {}
    if (qdir / LQ_FILE).is_file():
        t = load_file(str(qdir / LQ_FILE))
        mods = [k.removesuffix(".L1") for k in t if k.endswith(".L1")]
        folded = {n: (t[f"{n}.L2"].T.contiguous(), t[f"{n}.L1"]) for n in mods}  # (A = L2^T, B = L1)
        fold_into_base(model, folded)
        notes.append(f"the LQ low-rank part L1 L2^T of {len(folded)} matrices is folded into the base and subtracted "
                     "from every adapter (exact; the adapters' rank grows by the LQ rank unless --rank truncates)")
    else:
        notes.append(f"{QUANT_DIR}/{LQ_FILE} is absent (a run from before it was stored): the LQ part stays inside "
                     "every adapter, so the base alone is Q without it")
    return Bundle("quantised", model, flock_adapters(run, tasks), folded, notes)
