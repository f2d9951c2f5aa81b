"""Packed search trials (``search.packing: true``): thin Tune trials leasing slots on a host.

Unpacked, each trial of the compression search loads the base and trains alone
(:func:`orchestrator.search.trial.search_trial`). Packed:

* one :class:`orchestrator.search.pack_host.PackHostActor` per (node, base setting) holds the
  base (quantised once for a quantised setting), injected with ``capacity`` slot groups, and
  the search payload's prefix activations; the first trial that needs it creates it;
* a packable trial (ungated: see :func:`orchestrator.search.pack_settings.base_setting`) is a thin function trainable
  (:func:`packed_search_trial`) that leases a slot group on its node's host for its setting
  and asks it for ``eval_every`` steps at a time; the host fuses the steps of every trial
  training at that moment into one batched forward/backward;
* between chunks the trial reports exactly what the unpacked trial reports (same metrics,
  same checkpoint files, :data:`~orchestrator.search.trial.STATE_FILE` under the unpacked
  parameter names), so ASHA decides on the same numbers; a stopped, finished or failed
  trial releases its slots (``finally``); a resumed trial leases again from its checkpoint
  (Adam restarts, as unpacked), and a checkpoint of either mode resumes in the other;
* gated trials (their trainable gates change the base per trial) run :func:`search_trial`
  as before.

Resources: a packed trial holds ``PACKED_TRIAL_CPUS`` of a CPU in Tune's accounting (it only
waits); a host actor holds none and runs its fused steps on the node's CPUs (hosts of
different settings on one node share them). Hosts are detached actors ended by the driver
(:meth:`PackHosts.stop`); a driver killed mid-search leaves them to the cluster's end.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import ray
from safetensors.numpy import load_file, save_file

from models.train.perplexity import macro_perplexity  # torch-free
from orchestrator.contracts import TrialMetrics
from orchestrator.search.pack_settings import host_key, packable, setting_of
from orchestrator.spec import JobSpec

# A thin trial imports neither torch nor transformers (its process starts in moments); the
# host (orchestrator.search.pack_host) and the unpacked fallback (search_trial) are imported lazily.
STATE_FILE = "trial_state.safetensors"  # = orchestrator.search.trial.STATE_FILE (tested)
META_FILE = "trial.json"  # = orchestrator.search.trial.META_FILE

__all__ = ["PackHosts", "packed_search_trial", "PACKED_TRIAL_CPUS"]

PACKED_TRIAL_CPUS = 0.01  # Tune's share for a trial that only waits on its host


NAMESPACE = "loraflock-pack"


class PackHosts:
    """The search's pack hosts: created on demand, one per (node, base setting); :meth:`stop` ends them.

    The first packable trial of a base setting on a node creates that node's host (a named,
    detached actor in namespace ``loraflock-pack``, so it outlives the trial that made it);
    later trials find it by name. The driver ends every host of the search when it is over.

    Example:
        >>> pack = PackHosts(payload, spec, max_rank=8, capacity=4)
        >>> trainable = pack.trainable(payload, {"cpu": 1})
        >>> ...; pack.stop()
    """

    def __init__(self, payload: dict, spec: JobSpec, max_rank: int, capacity: int) -> None:
        self.tag = uuid.uuid4().hex[:8]
        self.max_rank, self.capacity = int(max_rank), int(capacity)
        self.gpu = 1 if spec.ray.use_gpu else 0
        self.payload_ref = ray.put(payload)  # hosts read it from the object store (no copy per trial)

    def trainable(self, payload: dict, resources: dict):
        """The Tune trainable: packable trials are thin, the others keep ``resources``."""
        from ray import tune

        info = {"tag": self.tag, "max_rank": self.max_rank, "capacity": self.capacity, "gpu": self.gpu,
                "payload": self.payload_ref}
        full = tune.PlacementGroupFactory([{k.upper(): v for k, v in resources.items()}])
        thin = tune.PlacementGroupFactory([{"CPU": PACKED_TRIAL_CPUS}])
        max_rank = self.max_rank

        def need(config: dict):
            return thin if packable(config, max_rank) else full

        return tune.with_resources(tune.with_parameters(packed_search_trial, payload=payload, pack=info), need)

    def _hosts(self) -> list:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a.get("namespace") == NAMESPACE and a["name"].startswith(f"loraflock-pack-{self.tag}-")]
        return [ray.get_actor(n, namespace=NAMESPACE) for n in names]

    def stats(self) -> dict:
        """``{"hosts", "fused_steps", "trial_steps", "trials_per_step"}`` over every host."""
        each = ray.get([h.stats.remote() for h in self._hosts()])
        steps, rows = sum(e["fused_steps"] for e in each), sum(e["trial_steps"] for e in each)
        return {"hosts": len(each), "fused_steps": steps, "trial_steps": rows, "trials_per_step": rows / max(steps, 1),
                "step_s": sum(e["step_s"] for e in each), "eval_s": sum(e["eval_s"] for e in each)}

    def stop(self) -> None:
        for h in self._hosts():
            ray.kill(h)


def _host(pack: dict, setting: dict):
    """This node's host for ``setting``, created by the first trial that needs it."""
    node = ray.get_runtime_context().get_node_id()
    name = f"loraflock-pack-{pack['tag']}-{node[:16]}-{host_key(setting)}"
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        pass
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from orchestrator.cluster.nodes import check_fits
    from orchestrator.search.pack_host import PackHostActor

    here = [n for n in ray.nodes() if n["NodeID"] == node]
    cpus = here[0]["Resources"].get("CPU", 1) if here else 1
    if pack["gpu"]:  # the host is pinned to this trial's node: a node without a GPU would pend forever
        check_fits({"GPU": pack["gpu"]}, here, f"the pack host on node {node[:16]}",
                   "give search trials a GPU node (search.packing needs one per node it runs on) or set "
                   "search.packing: false")
    return (
        ray.remote(PackHostActor)
        .options(
            name=name,
            namespace=NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            num_gpus=pack["gpu"],
            max_concurrency=4 * int(pack["capacity"]) + 8,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        )
        .remote(
            pack["payload"],
            int(pack["capacity"]),
            int(pack["max_rank"]),
            max(1, int(cpus)),
            "cuda" if pack["gpu"] else "cpu",
            setting,
        )
    )


def packed_search_trial(config: dict, payload: dict, pack: dict) -> None:
    """Ray Tune function trainable: a packable trial runs on its node's host, others alone.

    Reports the same metrics and checkpoints as :func:`search_trial` at the same steps.
    """
    setting = setting_of(config, int(pack["max_rank"]))
    if setting is None:
        from orchestrator.search.trial import search_trial

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
    host = _host(pack, setting)
    lid = ray.get(host.lease.remote(config, spec.train.seed + done, state))
    try:
        size = ray.get(host.deployed_bytes.remote(lid))
        quant_error = ray.get(host.quant_error.remote())

        def report(step: int, nll: dict, final: bool) -> None:
            metrics = TrialMetrics(**{  # no target_bytes/rung_bytes: see TrialMetrics
                "step": step, "macro_ppl": macro_perplexity(nll), "final": final, "eval": "full" if final else "subset",
                "sparsity": 0.0, "bits": int(config.get("bits", 16)), **size, "quant_rel_error": quant_error,
                "seconds": time.perf_counter() - t0,
            })
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
