"""Packed search trials (``search.packing: true``): thin Tune trials leasing slots on a host.

Unpacked, each trial of the compression search loads the base and trains alone
(:func:`orchestrator.search.trial.search_trial`). Packed:

* one :class:`orchestrator.search.pack_actor.PackHostActor` per (node, base setting) holds the
  base (quantised once for a quantised setting), injected with ``capacity`` slot groups, and
  the search payload's prefix activations; the first trial that needs it creates it;
* a packable trial (ungated: see :func:`orchestrator.search.pack_settings.base_setting`) is a thin function trainable
  (:func:`packed_search_trial`) that leases a slot group on its node's host for its setting
  and asks it for ``eval_every`` steps at a time; the host fuses the steps of every trial
  training at that moment into one batched forward/backward;
* between chunks the trial reports exactly what the unpacked trial reports (same metrics:
  ``macro_ppl``, the sizes with ``rung_bytes`` for the scheduler, and with a task
  ``search.metric`` its ``macro_<metric>`` and ``judge_s``, judged on the host through the
  trial's slots; same checkpoint files, :data:`~orchestrator.search.trial.STATE_FILE` under the unpacked
  parameter names), so ASHA decides on the same numbers; a stopped, finished or failed
  trial releases its slots (``finally``); a resumed trial leases again from its checkpoint
  (Adam restarts, as unpacked), and a checkpoint of either mode resumes in the other;
* gated trials (their trainable gates change the base per trial) run :func:`search_trial`
  as before.

Resources: a packed trial holds ``PACKED_TRIAL_CPUS`` of a CPU in Tune's accounting (it only
waits); a host actor holds no CPU and runs its fused steps on the node's CPUs (hosts of
different settings on one node share them). With ``ray.use_gpu`` a host needs a GPU share
(``search.gpus_per_trial``) on its trial's node, and that share may be held by unpacked
(gated) trials: the host first reserves it with a placement group pinned to the node and
waits at most ``HOST_START_S`` for it (:func:`reserve_gpu`); a share that does not come is a
:class:`~orchestrator.cluster.nodes.ResourceRequestError` naming the node and the fix, never an
actor pending forever. The reservation lives as long as the host. Hosts and their
reservations are detached, ended by the driver (:meth:`PackHosts.stop`); a driver killed
mid-search leaves them to the cluster's end.
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
# host (orchestrator.search.pack_actor, pack_host) and the unpacked fallback (search_trial) are imported lazily.
STATE_FILE = "trial_state.safetensors"  # = orchestrator.search.trial.STATE_FILE (tested)
META_FILE = "trial.json"  # = orchestrator.search.trial.META_FILE

__all__ = ["PackHosts", "packed_search_trial", "reserve_gpu", "PACKED_TRIAL_CPUS", "HOST_START_S"]

PACKED_TRIAL_CPUS = 0.01  # Tune's share for a trial that only waits on its host
HOST_START_S = 120.0  # how long a GPU host waits for its node's GPU share before failing the trial


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
        self.gpu = float(spec.search.gpus_per_trial) if spec.ray.use_gpu else 0.0  # one trial's share
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
        """Over every host: ``hosts``, ``fused_steps``, ``trial_steps``, ``trials_per_step``, ``step_s``,
        ``eval_s``, and with a task metric ``judge_s``, ``judge_passes`` and ``judged_trials`` (trials per pass)."""
        each = ray.get([h.stats.remote() for h in self._hosts()])
        steps, rows = sum(e["fused_steps"] for e in each), sum(e["trial_steps"] for e in each)
        return {"hosts": len(each), "fused_steps": steps, "trial_steps": rows, "trials_per_step": rows / max(steps, 1),
                "step_s": sum(e["step_s"] for e in each), "eval_s": sum(e["eval_s"] for e in each),
                "judge_s": sum(e.get("judge_s", 0.0) for e in each),
                "judge_passes": sum(e.get("judge_passes", 0) for e in each),
                "judged_trials": sum(e.get("judged_trials", 0) for e in each)}

    def stop(self) -> None:
        for h in self._hosts():
            ray.kill(h)
        from ray.util.placement_group import placement_group_table, remove_placement_group

        for info in placement_group_table().values():  # the hosts' GPU reservations
            if info.get("name", "").startswith(f"loraflock-pack-{self.tag}-") and info.get("state") != "REMOVED":
                remove_placement_group(ray.util.get_placement_group(info["name"]))


def reserve_gpu(name: str, node: str, gpus: float, wait_s: float = HOST_START_S):
    """Reserve ``gpus`` on ``node`` for a pack host (a detached placement group named ``name``).

    Returns the placement group once the GPU share is held (the host is then scheduled into
    it and starts at once). A share that another trial holds for longer than ``wait_s``
    removes the reservation and raises, instead of leaving a host pending forever.

    Raises:
        ResourceRequestError: the node has no GPU, or its GPU stayed taken for ``wait_s``.
    """
    from ray.util.placement_group import (
        NODE_ID_LABEL_KEY,
        placement_group,
        placement_group_table,
        remove_placement_group,
    )

    from orchestrator.cluster.nodes import ResourceRequestError, check_fits

    here = [n for n in ray.nodes() if n["NodeID"] == node and n.get("Alive", True)]
    check_fits({"GPU": gpus}, here, f"the pack host on node {node[:16]}",
               "give search trials a GPU node (search.packing needs one per node it runs on) or set "
               "search.packing: false")
    try:
        pg = ray.util.get_placement_group(name)  # another trial of this node reserved it first
        if placement_group_table(pg).get("state") == "REMOVED":  # an earlier reservation that gave up
            raise ValueError(name)
    except ValueError:
        pg = placement_group([{"GPU": gpus}], name=name, lifetime="detached",
                             bundle_label_selector=[{NODE_ID_LABEL_KEY: node}])  # this node only
    ready, _ = ray.wait([pg.ready()], timeout=wait_s)
    if ready:
        return pg
    remove_placement_group(pg)
    raise ResourceRequestError(
        f"the pack host on node {node[:16]} waited {wait_s:g} s for {gpus:g} GPU and the node's GPUs stayed "
        f"taken (by unpacked, gated trials or other work): set search.gpus_per_trial below 1 so hosts and "
        f"trials share a GPU, leave gated sparsities out of a packed search, or set search.packing: false"
    )


def _host(pack: dict, setting: dict, wait_s: float = HOST_START_S):
    """This node's host for ``setting``, created by the first trial that needs it (a GPU host
    inside its GPU reservation, :func:`reserve_gpu`)."""
    node = ray.get_runtime_context().get_node_id()
    name = f"loraflock-pack-{pack['tag']}-{node[:16]}-{host_key(setting)}"
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        pass
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

    from orchestrator.search.pack_actor import PackHostActor

    here = [n for n in ray.nodes() if n["NodeID"] == node]
    cpus = here[0]["Resources"].get("CPU", 1) if here else 1
    strategy = NodeAffinitySchedulingStrategy(node, soft=False)
    if pack["gpu"]:  # the host is pinned to this trial's node: reserve its GPU share there first, or fail
        pg = reserve_gpu(name, node, pack["gpu"], wait_s)
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
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
            scheduling_strategy=strategy,
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

        judged = payload.get("judge") is not None  # search.metric beyond ppl: the host judges (pack_host.judge)

        def report(step: int, nll: dict, final: bool) -> None:
            metric = ray.get(host.judge.remote(lid)) if judged else {}
            metrics = TrialMetrics(**{
                "step": step, "macro_ppl": macro_perplexity(nll), "final": final, "eval": "full" if final else "subset",
                "sparsity": 0.0, "bits": int(config.get("bits", 16)), **size,
                # ungated: already at its size, as the unpacked trial reports it (ParetoASHA's size at a rung)
                "target_bytes": size["model_bytes"], "rung_bytes": size["model_bytes"],
                "quant_rel_error": quant_error, "seconds": time.perf_counter() - t0, **metric,
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
