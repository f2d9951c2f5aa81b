"""The ``loraflock`` command line: ``main`` parses arguments and calls the SDK, nothing more.

``main.py`` holds the job commands (run, demo, validate, schema, adapt), ``submit.py`` the
cluster commands (submit, status, logs, stop, list, deploy) and ``adapt.py`` the new-task
command's glue. ``python -m orchestrator.cli`` runs the same entry point as ``loraflock``.
"""

from __future__ import annotations

# Imported, not wrapped: a wrapper that imported orchestrator.cli.main on its first call would
# see that import rebind the package's ``main`` to the submodule (``main`` then not callable).
from orchestrator.cli.main import main

__all__ = ["main"]
