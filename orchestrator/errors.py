"""User-facing errors: the CLI prints their message (no traceback) and exits with status 2.

Lower layers raise ``ValueError`` subclasses that name the setting or file at fault
(``tasks.errors.TaskDataError``, ``models.base.BaseModelError``, ...); the CLI treats those
the same way through :data:`USER_ERRORS`.
"""

from __future__ import annotations

__all__ = ["LoraflockError", "SpecError", "OutputDirError", "ClusterAddressError", "StageError", "user_errors"]


class LoraflockError(Exception):
    """Base of errors caused by the user's input or environment, with a message saying what to do."""


class SpecError(LoraflockError):
    """A job spec that cannot be read or does not validate; the message lists every problem."""


class OutputDirError(LoraflockError):
    """The output directory belongs to another job or cannot be written."""


class ClusterAddressError(LoraflockError):
    """A Ray cluster address that is malformed or does not answer."""


class StageError(LoraflockError):
    """A pipeline stage failed for a reason the user can act on."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Every exception class whose message is meant for the user (imported lazily)."""
    from models.base import BaseModelError
    from models.lora import LoraTargetError
    from models.peft_io import AdapterFormatError

    found: list[type[BaseException]] = [LoraflockError, BaseModelError, LoraTargetError, AdapterFormatError]
    try:
        from tasks.errors import TaskDataError

        found.append(TaskDataError)
    except ImportError:
        pass
    return tuple(found)
