"""The strict pydantic base of every spec model in loraflock (tasks' and the job's sections).

Its own module, the lowest of the spec modules, so that ``tasks.spec``, ``tasks.metric_spec``
and ``orchestrator``'s sections all derive from one class without importing each other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["Strict"]


class Strict(BaseModel):
    """The base of every spec model, the job's sections too: unknown fields are errors.

    Assignments are re-validated, so a spec changed in code stays as valid as one read from
    YAML. It lives here because ``tasks`` is the lowest layer that holds specs:
    ``orchestrator``'s sections import it, never the other way round.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
