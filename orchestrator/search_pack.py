"""Packed search trials (``search.packing: true``): thin Tune trials leasing slots on a host.

Unpacked, each trial of the compression search loads the base and trains alone
(:func:`orchestrator.search_trial.search_trial`). Packed:

* the driver starts one :class:`orchestrator.pack_host.PackHostActor` per node
  (:meth:`PackHosts.start`): the base, injected with ``capacity`` slot groups, and the
  search payload's prefix activations, loaded once;
* a packable trial (unquantised, ungated: see :func:`orchestrator.pack_host.packable`) is a
  thin function trainable (:func:`packed_search_trial`) that leases a slot group on its
  node's host and asks it for ``eval_every`` steps at a time; the host fuses the steps of
  every trial training at that moment into one batched forward/backward;
* between chunks the trial reports exactly what the unpacked trial reports (same metrics,
  same checkpoint files, :data:`~orchestrator.search_trial.STATE_FILE` under the unpacked
  parameter names), so ASHA decides on the same numbers; a stopped, finished or failed
  trial releases its slots (``finally``); a resumed trial leases again from its checkpoint
  (Adam restarts, as unpacked), and a checkpoint of either mode resumes in the other;
* other trials (quantised or gated: they change the base) run :func:`search_trial` as before.

Resources: a packed trial holds ``PACKED_TRIAL_CPUS`` of a CPU in Tune's accounting (it only
waits); the host actor holds none and runs its fused steps on the node's CPUs.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import ray
from safetensors.numpy import load_file, save_file

from orchestrator.search_spec import SearchSpec
from orchestrator.spec import JobSpec

# A thin trial imports neither torch nor transformers (its process starts in moments); the
# host (orchestrator.pack_host) and the unpacked fallback (search_trial) are imported lazily.
STATE_FILE = "trial_state.safetensors"  # = orchestrator.search_trial.STATE_FILE (tested)
META_FILE = "trial.json"  # = orchestrator.search_trial.META_FILE

__all__ = ["PackHosts", "packed_search_trial", "packable", "PACKED_TRIAL_CPUS"]

PACKED_TRIAL_CPUS = 0.01  # Tune's share for a trial that only waits on its host


def packable(config: dict, max_rank: int) -> bool:
    """Whether a trial can run as a slot group on a host: unquantised, ungated, rank fits.

    Quantised trials (LQ-LoRA's ``Q`` depends on the trial's rank) and gated ones (trainable
    gates on the base weights) change the base itself, so they cannot share it.
    """
    return (int(config.get("bits", 16)) >= 16 and float(config.get("target_sparsity", 0.0)) == 0.0
            and int(config.get("rank", 0)) <= max_rank)


class PackHosts:
    """The search's pack hosts, one per alive node; :meth:`stop` ends them.

    Example:
        >>> pack = PackHosts.start(payload, spec, search, max_rank=8, capacity=4)
        >>> trainable = pack.trainable(payload, {"cpu": 1})
        >>> ...; pack.stop()
    """

    def __init__(self, names: dict[str, str], handles: list, max_rank: int) -> None:
        self.names, self.handles, self.max_rank = names, handles, max_rank

    @classmethod
    def start(cls, payload: dict, spec: JobSpec, search: SearchSpec, max_rank: int, capacity: int) -> "PackHosts":
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from orchestrator.pack_host import PackHostActor

        ref = ray.put(payload)
        tag = uuid.uuid4().hex[:8]
        names, handles = {}, []
        gpu = 1 if spec.ray.use_gpu else 0
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            nid = node["NodeID"]
            if gpu and node["Resources"].get("GPU", 0) < 1:
                continue
            threads = max(1, int(node["Resources"].get("CPU", 1)))
            actor = ray.remote(PackHostActor).options(
                name=f"loraflock-pack-{tag}-{nid[:16]}", num_cpus=0, num_gpus=gpu, max_concurrency=4 * capacity + 8,
                scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False),
            ).remote(ref, capacity, max_rank, threads, "cuda" if gpu else "cpu")
            names[nid] = f"loraflock-pack-{tag}-{nid[:16]}"
            handles.append(actor)
        return cls(names, handles, max_rank)

    def trainable(self, payload: dict, resources: dict):
        """The Tune trainable: packable trials are thin, the others keep ``resources``."""
        from ray import tune

        info = {"names": self.names, "max_rank": self.max_rank}

        full = tune.PlacementGroupFactory([{k.upper(): v for k, v in resources.items()}])
        thin = tune.PlacementGroupFactory([{"CPU": PACKED_TRIAL_CPUS}])

        def need(config: dict):
            return thin if packable(config, self.max_rank) else full

        return tune.with_resources(tune.with_parameters(packed_search_trial, payload=payload, pack=info), need)

    def stats(self) -> dict:
        """``{"hosts", "fused_steps", "trial_steps", "trials_per_step"}`` over every host."""
        each = ray.get([h.stats.remote() for h in self.handles])
        steps, rows = sum(e["fused_steps"] for e in each), sum(e["trial_steps"] for e in each)
        return {"hosts": len(each), "fused_steps": steps, "trial_steps": rows, "trials_per_step": rows / max(steps, 1)}

    def stop(self) -> None:
        for h in self.handles:
            ray.kill(h)


def _host(pack: dict):
    node = ray.get_runtime_context().get_node_id()
    name = pack["names"].get(node) or next(iter(pack["names"].values()))  # a node without a host: use another's
    return ray.get_actor(name)


def packed_search_trial(config: dict, payload: dict, pack: dict) -> None:
    """Ray Tune function trainable: a packable trial runs on its node's host, others alone.

    Reports the same metrics and checkpoints as :func:`search_trial` at the same steps.
    """
    if not packable(config, int(pack["max_rank"])):
        from orchestrator.search_trial import search_trial

        return search_trial(config, payload)
    from ray import tune

    fixed = config["_search"]
    spec = JobSpec.model_validate(payload["spec"])
    t0 = time.perf_counter()
    steps, every, done = int(fixed["steps"]), int(fixed["eval_every"]), 0
    state = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:  # resumed: continue from the last reported state (Adam restarts)
        with ckpt.as_directory() as d:
            state = load_file(str(Path(d) / STATE_FILE))
            done = int(json.loads((Path(d) / META_FILE).read_text())["step"])
    host = _host(pack)
    lid = ray.get(host.lease.remote(config, spec.train.seed + done, state))
    try:
        size = ray.get(host.deployed_bytes.remote(lid))

        def report(step: int, nll: dict, final: bool) -> None:
            metrics = {
                "step": step, "macro_ppl": float(np.mean([math.exp(min(v, 50.0)) for v in nll.values()])), "final": final, "eval": "full" if final else "subset",
                "sparsity": 0.0, "bits": int(config.get("bits", 16)), **size, "quant_rel_error": None,
                "seconds": time.perf_counter() - t0,
            }
            trained = ray.get(host.state.remote(lid))
            with tempfile.TemporaryDirectory() as tmp:
                save_file({k: np.ascontiguousarray(v) for k, v in trained.items()}, str(Path(tmp) / STATE_FILE))
                (Path(tmp) / META_FILE).write_text(json.dumps(metrics))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

        step = done
        while step < steps:
            n = min(every, steps - step)
            ray.get(host.train.remote(lid, n))
            step += n
            if step < steps:
                report(step, ray.get(host.evaluate.remote(lid, int(fixed["eval_subset"]))), final=False)
        report(steps, ray.get(host.evaluate.remote(lid, None)), final=True)
    finally:
        ray.get(host.release.remote(lid))
