"""The ``loraflock`` command line: ``main`` parses arguments and calls the SDK, nothing more.

``app.py`` holds the parser and the job commands (run, demo, validate, schema, adapt),
``submit.py`` the cluster commands (submit, status, logs, stop, list, deploy) and ``adapt.py`` the new-task
command's glue. ``python -m orchestrator.cli`` runs the same entry point as ``loraflock``.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the ``loraflock`` command line (see :func:`orchestrator.cli.app.main`)."""
    from orchestrator.cli.app import main as _main

    return _main(argv)
