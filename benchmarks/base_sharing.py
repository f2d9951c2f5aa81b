"""Base sharing: memory of N Ray workers holding the base privately vs via the object store.

Run (quick, random-init llama of ~21M parameters, ~1 min on a shared 2-core CPU):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/base_sharing.py --workers 4 --model tiny
Real demo base (SmolLM2-135M, 540 MB fp32; needs ~3 GB free):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/base_sharing.py --workers 4 --model smollm2-135m

Starts a local Ray instance and, for each mode, N fresh actors (1 CPU each) that have
imported torch + transformers, then:

* ``private``: every actor calls ``models.base.load_base`` (what a worker does alone);
* ``shared``: the driver loads the base once, ``orchestrator.base.store.put_base`` puts it in
  the object store, the driver drops its own copy, and every actor calls
  ``load_base_shared`` (zero-copy views of the node's shared memory).

Each actor then runs one forward pass (so every weight page is really mapped) and reports its
PSS (``psutil.Process().memory_full_info().pss``: shared pages are divided among the processes
mapping them, so PSS sums to real memory, unlike RSS). ``base_copies_in_memory`` = the rise in
PSS summed over the driver and every process of the Ray session (object store included)
divided by the base's bytes: ~N for private, ~1 for shared. Prints ONE JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = {  # big enough that its 84 MB stand out of each process's few-MB noise
    "model_type": "llama", "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 16000,
    "max_position_embeddings": 256, "tie_word_embeddings": True,
}
WARMUP = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64, "max_position_embeddings": 64}
# what the warm-up model copies from the base's config: its architecture and sizes
SIZES = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings")
MB = 2**20


def _trim() -> None:
    """Return freed heap pages to the OS, so a dropped model stops counting (glibc)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _spec(model: str) -> dict:
    return {"random_init": TINY} if model == "tiny" else {"name": model}


def tree_pss() -> int:
    """PSS of this process and all its descendants (the whole local Ray session)."""
    import psutil

    me = psutil.Process()
    total = 0
    for p in [me] + me.children(recursive=True):
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def make_holder(ray):
    @ray.remote(num_cpus=1)
    class BaseHolder:
        """A worker that holds the base like a flock worker would."""

        def __init__(self, spec: dict) -> None:
            import torch

            import orchestrator.base.store  # noqa: F401  (imported by load() in both modes)
            from models.base import load_base, load_config, meta_model

            torch.set_num_threads(1)
            self.model = None
            # Pay the one-off costs before the baseline: imports of the architecture's code
            # (meta model: no weights) and of the loaders both modes use, and torch's first
            # forward. Otherwise ~7 MB of module and allocator memory per worker counted as
            # "base copies" (0.37 of the 79 MB tiny base over 4 workers; 0.07 of SmolLM2).
            config = load_config(**spec)
            meta_model(config)
            # The first forward runs a random model of the base's own architecture and sizes
            # (then freed and trimmed): the allocator keeps buffers of that size, no weights.
            warm = load_base(random_init={**WARMUP, **{k: v for k, v in config.to_dict().items() if k in SIZES}})
            with torch.no_grad():
                warm(input_ids=torch.zeros(1, 16, dtype=torch.long))
            del warm
            _trim()

        def pss(self) -> int:
            import psutil

            _trim()
            return psutil.Process().memory_full_info().pss

        def load(self, spec: dict, shared_ref: list | None) -> dict:
            import torch

            from models.base import load_base
            from orchestrator.base.store import load_base_shared, object_store_bytes

            if shared_ref is None:
                self.model = load_base(**spec)
            else:
                self.model = load_base_shared(shared_ref[0], **spec)
            ids = torch.randint(0, self.model.config.vocab_size, (1, 16))
            with torch.no_grad():  # touch every weight: all pages mapped, as in training
                self.model(input_ids=ids)
            in_store, total = object_store_bytes(self.model)
            return {"pss": self.pss(), "weights_in_shared_memory_fraction": in_store / max(total, 1)}

    return BaseHolder


def run_mode(ray, holder_cls, workers: int, spec: dict, shared: bool) -> dict:
    from models.base import load_base
    from orchestrator.base.store import put_base

    actors = [holder_cls.remote(spec) for _ in range(workers)]
    before = ray.get([a.pss.remote() for a in actors])
    _trim()
    time.sleep(1.0)
    tree_before = tree_pss()
    t0 = time.perf_counter()
    ref = None
    if shared:
        model = load_base(**spec)
        ref = put_base(model)
        del model
        _trim()
    after = ray.get([a.load.remote(spec, None if ref is None else [ref]) for a in actors])
    seconds = time.perf_counter() - t0
    _trim()
    tree_after = tree_pss()
    out = {
        "pss_before_mb": [round(b / MB, 1) for b in before],
        "pss_with_base_mb": [round(a["pss"] / MB, 1) for a in after],
        "pss_delta_per_worker_mb": round(statistics.mean(a["pss"] - b for a, b in zip(after, before)) / MB, 1),
        "session_pss_delta_mb": round((tree_after - tree_before) / MB, 1),
        "weights_in_shared_memory_fraction": [round(a["weights_in_shared_memory_fraction"], 3) for a in after],
        "load_seconds": round(seconds, 2),
        "_extra": tree_after - tree_before,
    }
    for a in actors:
        ray.kill(a)
    del ref
    time.sleep(1.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--model", default="tiny", help="tiny | smollm2-135m | any load_base name")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray
    import torch

    from models.base import load_base
    from orchestrator.base.store import base_arrays

    spec = _spec(args.model)
    probe = load_base(**spec)  # base bytes, counting tied weights once (as stored)
    base_bytes = sum(a.nbytes for a in base_arrays(probe)["arrays"].values())
    n_params = sum(p.numel() for p in probe.parameters())
    del probe
    _trim()
    load_start = os.getloadavg()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
             object_store_memory=max(256 * MB, int(2 * base_bytes)),
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        holder = make_holder(ray)
        modes = {name: run_mode(ray, holder, args.workers, spec, name == "shared") for name in ("private", "shared")}
    finally:
        ray.shutdown()
    for m in modes.values():
        m["base_copies_in_memory"] = round(m.pop("_extra") / base_bytes, 2)
    print(json.dumps({
        "benchmark": "base_sharing",
        "compared": "N Ray actors holding the base privately (load_base) vs shared (put_base + load_base_shared)",
        "workers": args.workers,
        "model": args.model,
        "base_params": n_params,
        "base_mb": round(base_bytes / MB, 1),
        "memory_per_worker_mb": {k: v["pss_with_base_mb"] for k, v in modes.items()},
        "base_copies_in_memory": {k: v["base_copies_in_memory"] for k, v in modes.items()},
        "shared_vs_private_memory_ratio": round(
            modes["shared"]["session_pss_delta_mb"] / modes["private"]["session_pss_delta_mb"], 3
        ),
        "modes": modes,
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
                    "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "method": "PSS (psutil memory_full_info().pss) after one forward; session delta sums the driver and "
                  "every descendant process (raylet, object store, workers)",
    }, indent=1))


if __name__ == "__main__":
    main()
