"""The strict pydantic base shared by every section of the job spec.

It lives in its own module so that ``orchestrator.spec`` and the section modules it
assembles (``base_spec``, ``gates_spec``, ``search_spec``) can all import it without
importing each other: unknown fields are errors and assignments are re-validated everywhere.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["_Strict"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
