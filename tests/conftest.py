"""Shared fixtures: tiny random-init models (fast, offline) and thread limits for 2-core CI."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

TINY_LLAMA = dict(
    model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, vocab_size=300, max_position_embeddings=128,
)
TINY_GPT2 = dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=128)


@pytest.fixture
def tiny_llama():
    from models.base import load_base

    return load_base(random_init=TINY_LLAMA, seed=0)


@pytest.fixture
def tiny_gpt2():
    from models.base import load_base

    return load_base(random_init=TINY_GPT2, seed=0)


def start_local_ray():
    """Start the tests' embedded local Ray (see :func:`local_ray`); returns the ``ray`` module.

    Also called by the multi-node tests to bring the session's Ray back after their own cluster.
    """
    import ray

    from orchestrator.cluster.ray_logging import SETUP_HOOK

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
        object_store_memory=256 * 2**20,  # tiny models: a small store keeps the run's memory down
        runtime_env={"worker_process_setup_hook": SETUP_HOOK},
    )
    return ray


@pytest.fixture(scope="session")
def local_ray():
    """One embedded local Ray for the whole test run (started by the first test that asks for it).

    Like ``orchestrator.pipeline.init_ray``'s local Ray: no dashboard (so the workers get the
    setup hook that quiets Ray Train's State-API polling) and Train V2. ``address="local"``
    always starts a new instance, never joining a cluster a killed test head left behind. Product
    code that calls ``init_ray`` in this process uses this instance (``init_ray`` returns when Ray
    is initialised); tests that need a head of their own (the Jobs API tests) start it in a
    separate process, and the multi-node tests (``tests/orchestrator/cluster/test_multinode.py``)
    stop it, run their own cluster, then start it again (:func:`start_local_ray`). Yields the
    ``ray`` module; ``local_ray.get_runtime_context().gcs_address`` is the address a subprocess
    driver joins.
    """
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized(), "a test started Ray itself: use the local_ray fixture"
    start_local_ray()
    yield ray
    ray.shutdown()
