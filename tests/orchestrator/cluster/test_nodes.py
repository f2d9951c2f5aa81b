"""Resource requests sized per node: a worker's share never exceeds one node; impossible asks raise."""

from __future__ import annotations

import pytest

from orchestrator.cluster.nodes import ResourceRequestError, check_fits, cpus_per_worker, largest_node


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


def test_sizing_on_a_real_local_ray(local_ray):
    nodes = local_ray.nodes()
    assert cpus_per_worker(None, 1, False, nodes) == 2  # the test Ray's 2 CPUs on its one node
    with pytest.raises(ResourceRequestError, match="GPU"):
        cpus_per_worker(None, 1, True, nodes)
