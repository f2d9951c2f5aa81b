"""A new task on a recycled subspace (EigenLoRAx): train coefficients only, compare with LoRA.

Plain PyTorch (the recycle stage runs it as a Ray task; ``loraflock adapt`` runs it in
process). Both arms share the base, the cached frozen prefix, the seed, the batches and the
number of steps, so the comparison is like for like:

* ``coeff``: every adapted module gets ``B = V_B alpha_B``, ``A = (V_A alpha_A)^T`` on the
  flock's principal directions; only ``alpha`` (2 K r numbers per module) trains;
* ``lora``: a full LoRA of the flock's rank on the same modules.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models.base import top_block_indices
from models.eigen.layer import coeff_params, eigen_params, export_peft, inject_eigen, lora_params
from models.eigen.subspace import Subspace
from models.lora import adapter_params, inject
from models.peft_io import save_adapter
from models.prefix import compute_prefix
from models.train.loop import FlockData, train_method
from models.train.step import evaluate, perplexity, seed_everything
from orchestrator.base.load import load_job_base
from orchestrator.flock.methods import method_config
from orchestrator.spec import JobSpec

__all__ = ["adapt_new_task"]


def adapt_new_task(
    spec: JobSpec,
    subspace_dir: str | Path,
    name: str,
    train_ids: torch.Tensor,
    eval_ids: torch.Tensor,
    out_dir: str | Path,
    base_model_name: str | None,
    steps: int | None = None,
    lr: float | None = None,
    k_extra: int = 0,
    compare_lora: bool = True,
    log: Callable[[str], None] = print,
    device: str = "cpu",
    picked: dict | None = None,
    train_mask: torch.Tensor | None = None,
    eval_mask: torch.Tensor | None = None,
) -> dict:
    """Train ``name`` on the subspace (and, to compare, as a full LoRA); export PEFT adapters.

    Args:
        picked: the search's ``search.picked`` record with ``checkpoint`` an absolute path:
            both arms train on that trial's compressed base (its bits, LQ quantisation and
            pruned rows/columns, :func:`orchestrator.search.pick.picked_base`) at its rank,
            the full LoRA kept inside the pruned rows/columns; ``None`` = the job's base.
        train_mask, eval_mask: the task's scored-token masks (``tasks.TaskData``); ``None``:
            every token is scored.

    Returns:
        ``{coeff_params, lora_params, base_ppl, coeff_ppl, lora_ppl, ...}`` (the report's
        ``recycle.new_task`` block); adapters land in ``out_dir/{coeff,lora}``.
    """

    tr = spec.train
    sub = Subspace.load(subspace_dir)
    out_dir = Path(out_dir)
    seed_everything(tr.seed)
    rank, gates = spec.lora.rank, {}
    if picked is not None:
        from orchestrator.search.pick import picked_base

        compressed, gates = picked_base(spec, picked, picked["checkpoint"], device)
        rank = int(picked.get("rank", rank))

    def base_model():
        if picked is not None:
            return copy.deepcopy(compressed)
        return load_job_base(spec, device)

    model = base_model()
    layers = top_block_indices(model, spec.lora.top_layers)
    split = layers[0] if layers and layers[0] > 0 else 0
    train_ids, eval_ids = train_ids.to(device), eval_ids.to(device)
    t0 = time.perf_counter()
    tp = {0: compute_prefix(model, train_ids, split)} if split else None
    ep = {0: compute_prefix(model, eval_ids, split)} if split else None
    data = FlockData([len(train_ids)], [0], {0: train_ids}, {0: eval_ids}, tp, ep, split,
                     None if train_mask is None else {0: train_mask.to(device)},
                     None if eval_mask is None else {0: eval_mask.to(device)})
    log(
        f"[adapt {name}] {len(train_ids)} train / {len(eval_ids)} eval sequences, "
        f"prefix cached in {time.perf_counter() - t0:.1f}s"
    )
    base_nll = (
        evaluate(model, data.eval, tr.eval_batch_size, data.eval_prefix, split, masks=data.eval_mask) if split else None
    )

    cfg = method_config(tr, f"adapt {name}: coefficients", "coeff", steps=steps or tr.steps, lr=lr or tr.lr,
                        weight_decay=0.0, temperature=1.0)
    torch.manual_seed(tr.seed)
    inject_eigen(model, sub, num_tasks=1, rank=rank, alpha=spec.lora.alpha, k_extra=k_extra, seed=tr.seed)
    if base_nll is None:
        base_nll = evaluate(model, data.eval, tr.eval_batch_size, masks=data.eval_mask)  # alpha_B = 0: the base itself
    res_c = train_method(model, data, cfg, {}, log=log, device=device, trainable=eigen_params(model))
    result = {
        "task": name,
        "train_examples": len(train_ids),
        "k": max(l.k for l in sub.modules.values()),
        "k_extra": k_extra,
        "coeff_params": coeff_params(model),
        "lora_params": lora_params(model),
        "base_ppl": perplexity(base_nll[0]),
        "coeff_ppl": perplexity(res_c["eval_nll"][0]),
        "coeff_seconds": res_c["seconds"],
    }
    export_peft(model, 0, out_dir / "coeff", base_model_name)
    if compare_lora:
        del model
        model = base_model()
        torch.manual_seed(tr.seed)
        inject(model, spec.lora.target_modules, 1, rank, spec.lora.alpha, spec.lora.dropout, layers=layers)
        if gates:
            from orchestrator.search.pick import restrict_lora

            restrict_lora(model, gates)
        ad = {id(p) for p in adapter_params(model)}
        init = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in ad}
        cfg_l = method_config(tr, f"adapt {name}: full LoRA", "independent", steps=steps or tr.steps,
                              weight_decay=0.0, temperature=1.0)
        res_l = train_method(model, data, cfg_l, init, log=log, device=device)
        save_adapter(model, 0, out_dir / "lora", base_model_name)
        gain_l = result["base_ppl"] - perplexity(res_l["eval_nll"][0])
        gain_c = result["base_ppl"] - result["coeff_ppl"]
        result |= {
            "lora_ppl": perplexity(res_l["eval_nll"][0]),
            "lora_seconds": res_l["seconds"],
            "gain_fraction": gain_c / gain_l if gain_l > 0 else float("nan"),
        }
    result["param_ratio"] = result["lora_params"] / result["coeff_params"]
    return result
