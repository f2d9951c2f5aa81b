"""Several Ray nodes on this host (``ray.cluster_utils.Cluster``): what changes when a job spans nodes.

Two nodes of one CPU each, so no node has all the cluster's CPUs and two 1-CPU workers or
trials cannot share a node: a flock of 2 workers on two nodes equals the single-process flock;
search trials spread over the nodes; recycle and PESC run; the base sits once in each node's
object store and every worker of that node maps that one copy. A third node with a declared
GPU (Ray accepts declared GPUs on a CPU machine) is added for the GPU-sizing tests
(``test_gpu_sizing.py`` reuses this module's cluster through :func:`multinode_cluster`).

The session's embedded Ray (``local_ray``) is stopped for the module and started again after
it (:func:`tests.conftest.start_local_ray`), so the other tests keep their Ray.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import start_local_ray
from tests.orchestrator.conftest import tiny_job_spec

pytestmark = pytest.mark.multinode

STORE = 120 * 2**20  # bytes of object store per node: tiny models


@pytest.fixture(scope="module")
def cluster():
    """A head and one worker node, 1 CPU each (custom resources name them); yields (Cluster, ray)."""
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.cluster.ray_logging import SETUP_HOOK

    had_ray = ray.is_initialized()
    if had_ray:
        ray.shutdown()
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"lf_head": 1}, "object_store_memory": STORE,
        "include_dashboard": True, "dashboard_port": 0,  # the State API (which node ran what)
    })
    c.add_node(num_cpus=1, resources={"lf_b": 1}, object_store_memory=STORE)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False,
             runtime_env={"worker_process_setup_hook": SETUP_HOOK})
    try:
        yield c, ray
    finally:
        ray.shutdown()
        c.shutdown()
        if had_ray:
            start_local_ray()


def _node_ids(ray) -> dict[str, str]:
    """Custom resource name (lf_head, lf_b, ...) -> node id."""
    return {k: n["NodeID"] for n in ray.nodes() if n["Alive"] for k in n["Resources"] if k.startswith("lf_")}


def _actors() -> dict[str, tuple[str, str]]:
    """Every actor the cluster has run (dead ones too): id -> (class name, node id)."""
    from ray.util.state import list_actors

    return {a.actor_id: (a.class_name, a.node_id) for a in list_actors(limit=10000, detail=True)}


@pytest.mark.integration
def test_a_job_across_nodes_equals_one_process_and_runs_every_stage(cluster, tmp_path):
    """2 flock workers on 2 nodes give the 1-worker adapters; trials spread; PESC and recycle run."""
    from orchestrator.pipeline import run_job
    from orchestrator.spec import JobSpec

    _, ray = cluster
    nodes = _node_ids(ray)
    base = tiny_job_spec(steps=6).model_dump(mode="json")
    base["flock"] = {"tau": 100, "baselines": []}
    one = JobSpec.model_validate({**base, "name": "one"})
    t0 = time.monotonic()
    rep1 = run_job(one, tmp_path / "one")
    t_one = time.monotonic() - t0
    two = JobSpec.model_validate({
        **base, "name": "two", "ray": {"num_workers": 2},  # cpus_per_worker sized per node: 1
        "pesc": {"enabled": True, "num_experts": 2, "top_k": 1, "bottleneck": 8},
        "search": {"enabled": True, "space": "default", "num_samples": 2, "steps": 2, "eval_every": 2,
                   "grace_period": 2, "max_concurrent_trials": 2},  # no rung: both finish
        "recycle": {"enabled": True, "k": 2},
    })
    before = _actors()
    t0 = time.monotonic()
    rep2 = run_job(two, tmp_path / "two")
    print(f"\n[timing] 1-worker flock job {t_one:.1f} s, 2-node job (flock, pesc, search, recycle) "
          f"{time.monotonic() - t0:.1f} s")
    # (a) the workers ran on different nodes, and their flock is the single process's joint MAP
    new = [a for i, a in _actors().items() if i not in before]  # this job's actors
    workers = [n for c, n in new if c == "RayTrainWorker"]
    assert len(workers) == 2 and set(workers) == set(nodes.values()), new
    assert len(rep2["flock"]["assignment"]) == 2 and all(rep2["flock"]["assignment"].values())
    for t, row in rep1["flock"]["tasks"].items():
        assert rep2["flock"]["tasks"][t]["eval_loss"] == pytest.approx(row["eval_loss"], rel=2e-4), t
    # (c) the two concurrent 1-CPU trials could only run on two nodes
    assert {r["status"] for r in rep2["search"]["trials"]} == {"done"}
    trials = [n for c, n in new if c == "ImplicitFunc" or "search_trial" in c]  # Tune's function trainable
    assert len(trials) >= 2 and set(trials) == set(nodes.values()), new
    # (d) PESC (on the flock's workers) and recycle (one node's CPUs) ran with no node holding the cluster's 2
    assert sorted(rep2["pesc"]["tasks"]) == sorted(rep1["flock"]["tasks"])
    assert rep2["recycle"]["k"] == 2 and rep2["recycle"]["storage_ratio"] > 1
    assert Path(tmp_path / "two" / "recycle" / "subspace" / "subspace.json").is_file()


def test_the_base_is_held_once_per_node(cluster):
    """Two workers per node map the same object-store pages; the two nodes hold one copy each."""
    from models.base import load_base
    from orchestrator.base.store import put_base
    from tests.conftest import TINY_LLAMA

    _, ray = cluster
    ref = put_base(load_base(random_init=TINY_LLAMA, seed=0))

    def shm_location(model) -> tuple[set[tuple[int, int]], int, int]:
        """Where each base weight lives: {(inode of the shared mapping, offset in it)}, shared and total bytes.

        Two processes that map the same object-store copy see the same (inode, offset) for every
        weight; a second copy (another node's store, or a private one) has other inodes or none.
        """
        regions = []
        with open("/proc/self/maps") as maps:
            for line in maps:
                f = line.split()
                if len(f) >= 5 and f[1].endswith("s") and f[4] != "0":
                    lo, hi = (int(x, 16) for x in f[0].split("-"))
                    regions.append((lo, hi, int(f[2], 16), int(f[4])))
        where: set[tuple[int, int]] = set()
        shared = total = 0
        for t in {p.data_ptr(): p for p in model.parameters()}.values():
            n = t.numel() * t.element_size()
            total += n
            hit = [(ino, off + t.data_ptr() - lo) for lo, hi, off, ino in regions if lo <= t.data_ptr() < hi]
            if hit:
                shared += n
                where.add(hit[0])
        return where, shared, total

    @ray.remote(num_cpus=0.25)
    class Reader:
        def read(self, ref_list, config):
            from orchestrator.base.store import load_base_shared

            self.model = load_base_shared(ref_list[0], random_init=config)  # kept: its pages stay mapped
            return ray.get_runtime_context().get_node_id(), shm_location(self.model)

    readers = [Reader.options(resources={k: 0.25}).remote() for k in ("lf_head", "lf_head", "lf_b", "lf_b")]
    got = ray.get([r.read.remote([ref], TINY_LLAMA) for r in readers])  # in a list: each actor fetches it
    nodes = _node_ids(ray)
    assert [g[0] for g in got] == [nodes["lf_head"]] * 2 + [nodes["lf_b"]] * 2
    for _, (where, shared, total) in got:
        assert where and shared == total > 0  # every weight in shared memory: no private copy
    (h1, _, _), (h2, _, _), (b1, _, _), (b2, _, _) = (g[1] for g in got)
    assert h1 == h2 and b1 == b2  # one copy per node, mapped by both of its workers
    assert not {i for i, _ in h1} & {i for i, _ in b1}  # and each node has its own
    for r in readers:
        ray.kill(r)


@pytest.fixture(scope="module")
def gpu_node(cluster):
    """A third node with 4 CPUs and one declared GPU (a CPU machine: Ray only counts it); its id."""
    c, ray = cluster
    c.add_node(num_cpus=4, num_gpus=1, resources={"lf_gpu": 1}, object_store_memory=STORE)
    c.wait_for_nodes()
    deadline = time.monotonic() + 30
    while "lf_gpu" not in _node_ids(ray) and time.monotonic() < deadline:
        time.sleep(0.5)
    return _node_ids(ray)["lf_gpu"]


def test_search_concurrency_counts_gpu_shares_node_by_node(cluster, gpu_node, tmp_path):
    """gpus_per_trial 0.25 on one declared GPU: 4 trials at once, all on the GPU node, none beside it."""
    from ray import tune

    from orchestrator.search.driver import trial_concurrency, trial_resources
    from orchestrator.spec import JobSpec

    _, ray = cluster
    job = tiny_job_spec().model_dump(mode="json")
    spec = JobSpec.model_validate({**job, "ray": {"use_gpu": True},
                                   "search": {"enabled": True, "space": "default", "gpus_per_trial": 0.25}})
    assert trial_concurrency(spec.search, spec) == 4  # the CPU-only nodes hold no GPU trial
    resources = trial_resources(spec.search, spec)
    assert resources == {"cpu": 1, "gpu": 0.25}

    def sleeper(config):
        t0 = time.time()
        time.sleep(3)
        tune.report({"start": t0, "end": time.time(), "node": ray.get_runtime_context().get_node_id(),
                     "gpus": ray.get_runtime_context().get_accelerator_ids().get("GPU", [])})

    grid = tune.Tuner(
        tune.with_resources(sleeper, resources),
        param_space={"i": tune.grid_search(list(range(6)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=trial_concurrency(spec.search, spec)),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
    ).fit()
    runs = [r.metrics for r in grid]
    assert len(runs) == 6 and {r["node"] for r in runs} == {gpu_node}
    assert all(r["gpus"] == ["0"] for r in runs)  # a share of the node's one GPU
    events = sorted([(r["start"], 1) for r in runs] + [(r["end"], -1) for r in runs])
    running = peak = 0
    for _, d in events:
        running += d
        peak = max(peak, running)
    assert peak == 4, runs


def test_a_pack_host_whose_gpu_is_taken_fails_in_seconds_instead_of_pending(cluster, gpu_node):
    """The host's GPU share is reserved on its trial's node first; a share held elsewhere is a clear error."""
    from ray.util.placement_group import placement_group_table, remove_placement_group

    from orchestrator.cluster.nodes import ResourceRequestError
    from orchestrator.search.packed_trial import _host, reserve_gpu

    _, ray = cluster

    @ray.remote(num_gpus=1, num_cpus=0, resources={"lf_gpu": 0.01})
    class Holder:  # an unpacked trial that holds the node's only GPU
        def node(self):
            return ray.get_runtime_context().get_node_id()

    holder = Holder.remote()
    assert ray.get(holder.node.remote()) == gpu_node

    @ray.remote(num_cpus=0, resources={"lf_gpu": 0.01})
    def thin_trial(pack):  # what a packed trial does first: find or start its node's host
        try:
            _host(pack, {"bits": 16}, wait_s=3)
        except ResourceRequestError as e:
            return str(e)
        return "started"

    pack = {"tag": "t1", "gpu": 1.0, "capacity": 1, "max_rank": 4, "payload": None}
    t0 = time.monotonic()
    msg = ray.get(thin_trial.remote(pack), timeout=60)
    assert time.monotonic() - t0 < 30
    assert "waited 3 s for 1 GPU" in msg and "search.gpus_per_trial" in msg and "search.packing: false" in msg
    assert not [i for i in placement_group_table().values()
                if i["name"].startswith("loraflock-pack-t1") and i["state"] != "REMOVED"]  # nothing left behind

    ray.kill(holder)  # the GPU comes free: the reservation lands on that node, and only there
    pg = reserve_gpu("loraflock-pack-t2-x", gpu_node, 1.0, wait_s=30)
    assert placement_group_table(pg)["bundles_to_node_id"][0] == gpu_node
    remove_placement_group(pg)
    with pytest.raises(ResourceRequestError, match="no alive node has that much GPU"):
        reserve_gpu("loraflock-pack-t3-x", _node_ids(ray)["lf_b"], 1.0, wait_s=3)  # a node without a GPU
