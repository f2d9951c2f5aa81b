"""The PESC stage: train the mixture of adapter experts on a flock worker, merge the workers' results.

:func:`run_pesc` runs inside each flock worker after the flock's methods (same base, same
cached prefix, same batches); :func:`merge_pesc` combines the workers' results on the driver.
Plain PyTorch: Ray is touched only by the worker that calls it. It sits in ``orchestrator/``
because it reads the job's ``pesc:`` and ``train:`` sections; the layer is :mod:`models.moe`.
"""

from __future__ import annotations

import time

import torch

from models.base import top_block_indices
from models.train.hooks import TrainHooks
from models.train.loop import FlockData, train_method
from orchestrator.contracts import PescPart, PescResult
from orchestrator.flock.methods import method_config
from orchestrator.spec import JobSpec

__all__ = ["merge_pesc", "run_pesc"]


def run_pesc(
    model, data: FlockData, spec: JobSpec, init_state: dict, names: list[str], owned: list[int], say, device
) -> PescPart:
    """PESC on the same workers, base and cached prefix as the flock (the top blocks only).

    The FFN of every adapted block becomes ``E`` adapter experts with a top-k router; the
    attention projections keep one shared (unified) LoRA; everything is trained on all tasks
    pooled with the flock's steps and batches. Routing never sees task ids.
    """
    from models.lora import lora_layers
    from models.moe import balance_loss, convert_to_moe, expert_load, moe_params, reset_load, task_expert_load

    p, tr = spec.pesc, spec.train
    layers = top_block_indices(model, spec.lora.top_layers)
    with torch.no_grad():  # start from the common initial adapters (B = 0: the base itself)
        named = dict(model.named_parameters())
        for k, v in init_state.items():
            named[k].copy_(v)
    torch.manual_seed(tr.seed)
    before = {n: id(q) for n, q in model.named_parameters() if n in init_state}
    converted = convert_to_moe(model, p.num_experts, p.top_k, p.bottleneck, p.scale, layers=layers)
    renamed = {id(q): n for n, q in model.named_parameters()}  # the FFNs moved under the MoE
    init_state = {renamed[before[k]]: v for k, v in init_state.items()}
    # LoRA on attention only: FFN projections inside the experts' shared F stay frozen at B = 0.
    attention = [l for n, l in lora_layers(model).items() if not any(n.startswith(c + ".") for c in converted)]
    params = moe_params(model) + [q for l in attention for q in (l.lora_A_shared, l.lora_B_shared)]
    cfg = method_config(tr, "pesc", "pesc", sync_every=spec.flock.sync_every)
    coef = p.balance_coef
    say(
        f"PESC: {len(converted)} FFN blocks -> {p.num_experts} experts (top-{p.top_k}), "
        f"LoRA on {len(attention)} attention projections"
    )
    t0 = time.perf_counter()
    hooks = TrainHooks(extra_loss=(lambda: coef * balance_loss(model)) if coef > 0 else None,
                       before_eval=lambda: reset_load(model))  # expert load of the eval pass
    out = train_method(model, data, cfg, init_state, None, say, device, trainable=params, hooks=hooks)
    return PescPart(
        eval_nll={names[owned[s]]: v for s, v in out["eval_nll"].items()},
        eval_rows=sum(len(x) for x in data.eval.values()),
        expert_load=expert_load(model),
        task_expert_load={names[owned[s]]: v for s, v in task_expert_load(model).items()},
        trainable_params=sum(q.numel() for q in params),
        seconds=time.perf_counter() - t0,  # training + evaluation
        curve=out["curve"],
    )


def merge_pesc(parts: list[PescPart]) -> PescResult:
    """Combine the workers' PESC results; expert load is weighted by each worker's eval rows."""
    total = sum(p["eval_rows"] for p in parts)
    load: dict[str, list[float]] = {}
    for p in parts:
        for layer, shares in p["expert_load"].items():
            acc = load.setdefault(layer, [0.0] * len(shares))
            for i, v in enumerate(shares):
                acc[i] += v * p["eval_rows"] / total
    merged = PescResult(
        eval_nll={k: v for p in parts for k, v in p["eval_nll"].items()},
        expert_load=load,
        task_expert_load={k: v for p in parts for k, v in p["task_expert_load"].items()},
        trainable_params=parts[0]["trainable_params"],
        seconds=max(p["seconds"] for p in parts),
        curve=parts[0]["curve"],
    )
    if any(p.get("metrics") for p in parts):  # tasks judged beyond ppl
        merged["metrics"] = {k: v for p in parts for k, v in p.get("metrics", {}).items()}
    return merged
