"""Resource requests sized per node: a worker's share never exceeds one node; impossible asks raise."""

from __future__ import annotations

import pytest

from orchestrator.cluster.nodes import ResourceRequestError, check_fits, cpus_per_worker, fits_at_once, largest_node


def _node(cpu, gpu=0, alive=True):
    return {"Alive": alive, "Resources": {"CPU": float(cpu), **({"GPU": float(gpu)} if gpu else {})}}


def test_a_workers_share_is_capped_by_one_node_not_the_cluster():
    nodes = [_node(8), _node(8), _node(64, alive=False)]
    assert cpus_per_worker(None, 1, False, nodes) == 8  # the cluster's 16 would fit no node
    assert cpus_per_worker(None, 4, False, nodes) == 4
    assert cpus_per_worker(None, 64, False, nodes) == 1
    gpu_nodes = [_node(16, gpu=4), _node(32)]
    assert cpus_per_worker(None, 1, True, gpu_nodes) == 4  # one node's CPUs per GPU, so its 4 GPUs all get a worker


@pytest.mark.parametrize("configured, use_gpu, match", [(12, False, r"CPU.*lower ray.cpus_per_worker"),
                                                        (None, True, r"GPU.*ray.use_gpu: false")])
def test_a_request_no_node_can_meet_is_an_error_naming_the_resource_and_the_fix(configured, use_gpu, match):
    with pytest.raises(ResourceRequestError, match=match):
        cpus_per_worker(configured, 2, use_gpu, [_node(8), _node(8)])


def test_check_fits_needs_one_node_with_everything():
    nodes = [_node(32), _node(4, gpu=1)]
    assert largest_node(nodes) == {"CPU": 32.0, "GPU": 0.0}
    assert largest_node(nodes, gpu=True) == {"CPU": 4.0, "GPU": 1.0}
    check_fits({"CPU": 4, "GPU": 1}, nodes, "x", "y")
    with pytest.raises(ResourceRequestError, match="the combination"):
        check_fits({"CPU": 8, "GPU": 1}, nodes, "x", "y")


def test_trials_at_once_are_counted_node_by_node_on_cpus_and_gpu_shares():
    nodes = [_node(16, gpu=1), _node(2, gpu=2), _node(64), _node(64, gpu=8, alive=False)]
    assert fits_at_once({"CPU": 1, "GPU": 0.25}, nodes) == 4 + 2  # 4 on the 1-GPU node; CPUs cap the 2-GPU one
    assert fits_at_once({"CPU": 1, "GPU": 1}, nodes) == 1 + 2
    assert fits_at_once({"CPU": 4, "GPU": 0.1}, nodes) == 4  # a GPU share is exact: 10 x 0.1 fit one GPU
    assert fits_at_once({"CPU": 4}, nodes) == 4 + 0 + 16  # CPU trials use every node
    assert fits_at_once({"CPU": 1, "GPU": 3}, nodes) == 0


@pytest.mark.parametrize("share, ok", [(0.25, True), (1, True), (2, True), (1.5, False), (0, False), (-1, False)])
def test_gpus_per_trial_is_a_share_of_one_gpu_or_whole_gpus(share, ok):
    from orchestrator.specs.search import SearchSpec

    if ok:
        assert SearchSpec(gpus_per_trial=share).gpus_per_trial == share
    else:
        with pytest.raises(ValueError, match="gpus_per_trial"):
            SearchSpec(gpus_per_trial=share)


def test_search_concurrency_and_a_trial_no_node_can_hold(local_ray):
    from orchestrator.search.driver import trial_concurrency
    from orchestrator.spec import JobSpec
    from tests.orchestrator.conftest import tiny_job_spec

    job = tiny_job_spec().model_dump(mode="json")
    cpu = JobSpec.model_validate({**job, "search": {"enabled": True, "space": "default"}})
    assert trial_concurrency(cpu.search, cpu) == 2  # the tests' local Ray: 2 CPUs
    gpu = JobSpec.model_validate({**job, "ray": {"use_gpu": True}, "search": {"enabled": True, "space": "default"}})
    with pytest.raises(ResourceRequestError, match=r"each search trial.*GPU.*search.gpus_per_trial"):
        trial_concurrency(gpu.search, gpu)  # no GPU here: Tune would wait forever
    nodes = [_node(16, gpu=1)]
    assert trial_concurrency(gpu.search.model_copy(update={"gpus_per_trial": 0.25}), gpu, nodes) == 4


def test_sizing_on_a_real_local_ray(local_ray):
    nodes = local_ray.nodes()
    assert cpus_per_worker(None, 1, False, nodes) == 2  # the test Ray's 2 CPUs on its one node
    with pytest.raises(ResourceRequestError, match="GPU"):
        cpus_per_worker(None, 1, True, nodes)
