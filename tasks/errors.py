"""The error every data problem raises: its message names the task, the file and what to do.

Its own module so that every loader (``tasks.sources``, the builtin suites) can raise it
without importing another loader.
"""

from __future__ import annotations

__all__ = ["TaskDataError"]


class TaskDataError(ValueError):
    """A task's data cannot be used; the message names the task, the file and what to do."""
