"""The embedded Ray's worker setup hook silences Ray Train's State API polling warnings."""

from __future__ import annotations

import importlib
import logging

from orchestrator.cluster.ray_logging import SETUP_HOOK, quiet_worker_logs


def test_setup_hook_names_an_importable_function_that_raises_the_cleaner_logger() -> None:
    module, _, name = SETUP_HOOK.rpartition(".")
    assert getattr(importlib.import_module(module), name) is quiet_worker_logs  # Ray imports it by this path
    logger = logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner")
    old = logger.level
    try:
        logger.setLevel(logging.NOTSET)
        quiet_worker_logs()
        assert logger.getEffectiveLevel() == logging.ERROR
        assert not logger.isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(old)
