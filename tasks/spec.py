"""Task specs: what a task is called and where its text comes from (pydantic v2, strict).

These models are the ``tasks:`` part of a job YAML (``orchestrator.spec.JobSpec`` embeds
:class:`TaskSpec`). They hold no data and import nothing heavy, so validating a job (or
printing its JSON schema) never loads ``datasets`` or ``transformers``.

Example (YAML)::

    tasks:
      - name: support-tickets
        source: {kind: files, path: data/tickets.jsonl, text_field: body}
        max_train_sequences: 512
      - name: json
        source: {kind: builtin, suite: stdlib-code, package: json}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "Strict",
    "STDLIB_PACKAGES",
    "FilesSource",
    "HubSource",
    "BuiltinSource",
    "DataSource",
    "TaskSpec",
    "DataSettings",
]

# Packages of the builtin ``stdlib-code`` suite (the first six form the demo).
STDLIB_PACKAGES: tuple[str, ...] = (
    "json", "concurrent", "logging", "http", "email", "asyncio", "xml", "unittest", "importlib",
)

_TASK_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class Strict(BaseModel):
    """The base of every spec model, the job's sections too: unknown fields are errors.

    Assignments are re-validated, so a spec changed in code stays as valid as one read from
    YAML. It lives here because ``tasks`` is the lowest layer that holds specs:
    ``orchestrator``'s sections import it, never the other way round.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FilesSource(Strict):
    """Local files, one document per row.

    Args:
        path: a file, a glob, or a list of them; relative paths are taken from the working
            directory (``TaskSpec.resolve_paths`` makes them relative to the job file).
        format: ``jsonl``/``json``/``csv``/``parquet``/``arrow``; ``None`` infers it from the
            suffix (``.gz``/``.bz2``/``.xz``/``.zst`` compression suffixes are looked through).
        text_field: the column holding each document's text.
    """

    kind: Literal["files"] = "files"
    path: Union[str, list[str]]
    format: Literal["jsonl", "json", "csv", "parquet", "arrow"] | None = None
    text_field: str = "text"

    @field_validator("path")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        paths = [v] if isinstance(v, str) else v
        if not paths or any(not p.strip() for p in paths):
            raise ValueError("source.path must name at least one file (empty path given)")
        return v

    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


class HubSource(Strict):
    """A dataset by ``datasets`` name (needs the hub, or a local dataset-script directory).

    Args:
        name: e.g. ``"wikitext"``.
        config: the dataset's configuration, e.g. ``"wikitext-2-raw-v1"``.
        split: which split to read.
        text_field: the column holding each document's text.
    """

    kind: Literal["hub"] = "hub"
    name: str = Field(min_length=1)
    config: str | None = None
    split: str = "train"
    text_field: str = "text"


class BuiltinSource(Strict):
    """A bundled demo task built offline (``stdlib-code``: one stdlib package's sources).

    Args:
        suite: the builtin suite; only ``stdlib-code`` exists.
        package: one of :data:`STDLIB_PACKAGES`.
    """

    kind: Literal["builtin"] = "builtin"
    suite: Literal["stdlib-code"] = "stdlib-code"
    package: str

    @field_validator("package")
    @classmethod
    def _known_package(cls, v: str) -> str:
        if v not in STDLIB_PACKAGES:
            raise ValueError(f"stdlib-code has no package {v!r}; choose one of {list(STDLIB_PACKAGES)}")
        return v


DataSource = Annotated[Union[FilesSource, HubSource, BuiltinSource], Field(discriminator="kind")]


class TaskSpec(Strict):
    """One task: its name, its training text and (optionally) its own eval text.

    Without ``eval_source`` whole documents are held out for evaluation (``eval_fraction``
    of the text, chosen by a seeded hash), so eval text is never trained on.

    Args:
        name: letters, digits and ``-_.``, at most 64 characters (it names a directory).
        source: where the training documents come from.
        eval_source: separate eval documents; ``eval_fraction`` is then unused.
        max_train_sequences: cap on packed training rows (a seeded random subset).
        max_eval_sequences: cap on packed eval rows (a seeded random subset).
        eval_fraction: share of the text (in characters) held out when there is no eval_source.

    Example:
        >>> TaskSpec(name="json", source={"kind": "builtin", "package": "json"})
    """

    name: str
    source: DataSource
    eval_source: DataSource | None = None
    max_train_sequences: int | None = Field(None, ge=1)
    max_eval_sequences: int | None = Field(None, ge=1)
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if v in (".", "..") or not _TASK_NAME.match(v):
            raise ValueError(
                f"task name {v!r} is not allowed: use 1-64 letters, digits, '-', '_' or '.' "
                "(no path separators, not '.' or '..'), e.g. 'support-tickets'"
            )
        return v

    def resolve_paths(self, base_dir: str | Path) -> "TaskSpec":
        """A copy whose relative local-file paths are taken from ``base_dir`` (the job file's folder)."""
        update = {}
        for field in ("source", "eval_source"):
            src = getattr(self, field)
            if isinstance(src, FilesSource):
                fixed = [p if Path(p).expanduser().is_absolute() else str(Path(base_dir) / p) for p in src.paths()]
                update[field] = src.model_copy(update={"path": fixed[0] if isinstance(src.path, str) else fixed})
        return self.model_copy(update=update)


class DataSettings(Strict):
    """How every task's text is cut into training rows.

    Args:
        seq_len: tokens per packed row (documents are joined with EOS, then cut).
        seed: seeds the eval hold-out and the row caps.
    """

    seq_len: int = Field(128, ge=2)
    seed: int = 0
