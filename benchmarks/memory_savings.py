"""Memory of the loss and of quantised layers (issue 21, item 7): bytes kept for backward, before and after.

Two measurements, each with the old code path (re-implemented here as the reference) and the
product's:

* ``loss``: a LoRA step's loss on a SmolLM2-shaped model (random init; its 49,152-token vocabulary
  and width, ``--layers`` blocks) for ``--rows`` x ``--seq`` tokens. ``whole``: the logits upcast
  to fp32 at once (``F.cross_entropy`` of ``logits.float()``); ``chunked``: ``models.train.step.
  row_nll_sum`` (``models.train.chunked_loss``). Reported: the fp32 (.., vocab) bytes the autograd
  graph saves for backward, all bytes it saves, the process's peak RSS growth during forward +
  backward (VmHWM reset before it; each arm in its own process), and the seconds.
* ``quant``: one 4-bit NF ``QuantizedLinear`` of SmolLM2's MLP shape (576 -> 1536) on 4,096 tokens:
  bytes saved for backward by ``F.linear`` on the dequantised weight (old) vs the layer (new).

Run: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/memory_savings.py`` (~1 min, ~3 GB). Prints ONE
JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.multitask_throughput import SMOLLM2_SHAPED  # noqa: E402
from models.base import load_base  # noqa: E402
from models.lora import adapter_params, inject, task_ids  # noqa: E402
from models.quant.linear import QuantizedLinear  # noqa: E402
from models.quant.quantizers import quantize  # noqa: E402
from models.train.step import Batch, row_nll_sum  # noqa: E402


def _whole(model, batch: Batch):
    with task_ids(model, batch.task_ids):
        logits = model(input_ids=batch.input_ids).logits
    n, length = batch.input_ids.shape
    target = F.pad(batch.input_ids[:, 1:], (0, 1), value=-100)
    nll = F.cross_entropy(logits.reshape(n * length, -1).float(), target.reshape(-1), reduction="none",
                          ignore_index=-100)
    return nll.view(n, length).sum(1)


def _saved(fn, vocab: int) -> tuple[torch.Tensor, int, int]:
    """fn()'s output, bytes of fp32 (.., vocab) tensors saved for backward, and all saved bytes."""
    logits_bytes, total = [0], [0]

    def pack(t: torch.Tensor):
        b = t.numel() * t.element_size()
        total[0] += b
        if t.dtype == torch.float32 and t.dim() and t.shape[-1] == vocab:
            logits_bytes[0] += b
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, logits_bytes[0], total[0]


def _peak_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> int:
    """Reset the process's peak RSS to its current RSS (Linux: ``clear_refs`` 5); returns it in kB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak then includes model loading (the figure says less)
    return _peak_rss_kb()


def loss_arm(arm: str, rows: int, seq: int, layers: int) -> dict:
    cfg = {**SMOLLM2_SHAPED, "num_hidden_layers": layers}
    model = load_base(random_init=cfg, seed=0)
    torch.manual_seed(0)  # the same adapters in both arms' processes
    inject(model, ["q_proj", "v_proj"], num_tasks=2, rank=8, alpha=16.0)
    with torch.no_grad():
        for p in adapter_params(model):
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)  # B = 0 at init: give the adapters a say in the loss
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randint(0, cfg["vocab_size"], (rows, seq), generator=g), torch.arange(rows) % 2,
                  torch.full((rows,), 1.0 / rows))
    fn = (lambda: _whole(model, batch)) if arm == "whole" else (lambda: row_nll_sum(model, batch)[0])
    rss0 = _reset_peak_rss()
    t0 = time.perf_counter()
    out, logits_saved, saved = _saved(fn, cfg["vocab_size"])
    (out * batch.weights).sum().backward()
    secs = time.perf_counter() - t0
    rss = _peak_rss_kb()
    grad = sum(float(p.grad.double().pow(2).sum()) for p in adapter_params(model) if p.grad is not None) ** 0.5
    return {"saved_fp32_logits_mb": round(logits_saved / 2**20, 1), "saved_mb": round(saved / 2**20, 1),
            "peak_rss_growth_mb": round((rss - rss0) / 1024, 1), "seconds": round(secs, 2),
            "loss": round(float((out * batch.weights).sum()), 6), "grad_norm": round(grad, 6)}


def quant_arm() -> dict:
    w = 0.02 * torch.randn(1536, 576, generator=torch.Generator().manual_seed(0))
    layer = QuantizedLinear(quantize(w, "nf", 4))
    x = torch.randn(4096, 576, requires_grad=True)
    _, _, old = _saved(lambda: F.linear(x, layer.dequantized_weight()), -1)
    _, _, new = _saved(lambda: layer(x), -1)
    return {"weight_mb": round(w.numel() * 4 / 2**20, 2), "saved_old_mb": round(old / 2**20, 2),
            "saved_new_mb": round(new / 2**20, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--arm", choices=["whole", "chunked"], help="internal: run one loss arm in this process")
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(loss_arm(args.arm, args.rows, args.seq, args.layers)))
        return
    arms = {}
    for arm in ("whole", "chunked"):  # own processes: ru_maxrss is a process-wide high-water mark
        cmd = [sys.executable, __file__, "--arm", arm, "--rows", str(args.rows), "--seq", str(args.seq),
               "--layers", str(args.layers)]
        arms[arm] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        print(f"{arm}: {arms[arm]}", file=sys.stderr)
    report = {
        "benchmark": "memory_savings",
        "compared": "loss: whole fp32 logits vs chunked (models.train.chunked_loss); quantised layer: weight kept for "
                    "backward vs re-dequantised",
        "settings": {**vars(args), "model": "SmolLM2-shaped (random), LoRA r=8 on q,v",
                     "threads": torch.get_num_threads()},
        "loss": arms,
        "loss_equal": abs(arms["whole"]["loss"] - arms["chunked"]["loss"]) <= 1e-4 * abs(arms["whole"]["loss"]),
        "peak_rss_ratio_chunked_vs_whole": round(arms["chunked"]["peak_rss_growth_mb"]
                                                  / max(arms["whole"]["peak_rss_growth_mb"], 1e-9), 3),
        "quant": quant_arm(),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
