"""Worker-side logging setup for the embedded local Ray.

The embedded Ray runs without the dashboard (less memory, nothing listening), so the State
API is absent. Ray Train's ``PlacementGroupCleaner`` asks that API whether the Train
controller is alive every few seconds and logs a warning each time it cannot, which buries
the job's progress lines under hundreds of identical warnings. Its only duty (removing a
dead controller's placement group) is done anyway when the embedded Ray shuts down with the
job, so its logger is raised to ERROR in every worker process through Ray's
``worker_process_setup_hook``.
"""

from __future__ import annotations

import logging

__all__ = ["SETUP_HOOK", "quiet_worker_logs"]

SETUP_HOOK = "orchestrator.cluster.ray_logging.quiet_worker_logs"
_NOISY = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_logs() -> None:
    """Raise the State-API-polling loggers to ERROR (runs once in every Ray worker process)."""
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
