"""Load a task's :class:`~tasks.spec.DataSource` into a ``datasets.Dataset``.

:func:`load_table` gives the source's rows with their own columns (instruction formats read
them in :mod:`tasks.examples`); :func:`load_documents` turns a ``text`` source into the
documents shape: a ``text`` column (one document per row, empty rows dropped) and, for the
builtin suite, a ``doc_key`` column (the file's path) that the eval hold-out hashes. Parsing
and caching are ``datasets.load_dataset``'s own; this module only checks the inputs and turns
failures into a :class:`TaskDataError` that names the task, the file and the fix.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

from tasks.errors import TaskDataError
from tasks.spec import BuiltinSource, DataSource, FilesSource, HubSource

__all__ = [
    "infer_format",
    "load_table",
    "load_documents",
    "source_where",
    "require_columns",
    "text_documents",
    "expand_paths",
]

# spec format -> datasets builder
_BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "arrow": "arrow"}
_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst"}
_TEXT_FORMATS = {"jsonl", "json", "csv"}


def infer_format(path: str, task: str = "?") -> str:
    """The spec format of ``path`` from its suffix (``a.jsonl.gz`` -> ``jsonl``)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION:
        suffixes.pop()
    fmt = _SUFFIXES.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise TaskDataError(
            f"task {task!r}: cannot tell the format of {path!r} from its suffix; name files "
            f"{sorted(_SUFFIXES)} or set source.format to one of {sorted(_BUILDERS)}"
        )
    return fmt


def expand_paths(paths: list[str], task: str) -> list[str]:
    """Each path or glob -> existing files (sorted within a glob); missing ones are an error."""
    files: list[str] = []
    for p in paths:
        p = os.path.expanduser(p)
        if glob.has_magic(p):
            found = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
            if not found:
                raise TaskDataError(f"task {task!r}: no file matches {p!r} (working directory {os.getcwd()})")
            files.extend(found)
        elif os.path.isfile(p):
            files.append(p)
        else:
            what = "is a directory, not a file" if os.path.isdir(p) else "does not exist"
            raise TaskDataError(
                f"task {task!r}: data file {p!r} {what} (working directory {os.getcwd()}); fix source.path"
            )
    return files


def _first_non_utf8(path: str) -> int | None:
    """Byte offset of the first invalid UTF-8 sequence (compressed files are not checked)."""
    if Path(path).suffix.lower() in _COMPRESSION:
        return None
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                return offset + e.start
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return offset
    return None


def _load_files(src: FilesSource, task: str) -> Dataset:
    files = expand_paths(src.paths(), task)
    formats = {src.format or infer_format(f, task) for f in files}
    if len(formats) > 1:
        raise TaskDataError(f"task {task!r}: source.path mixes formats {sorted(formats)}; use one format per source")
    fmt = formats.pop()
    for f in files:
        if os.path.getsize(f) == 0:
            raise TaskDataError(f"task {task!r}: data file {f!r} is empty; remove it from source.path or fill it")
    try:
        ds = datasets.load_dataset(_BUILDERS[fmt], data_files=[os.path.abspath(f) for f in files], split="train")
    except Exception as e:  # diagnose below: the builders' own errors rarely name the file
        if fmt in _TEXT_FORMATS:
            _require_utf8(files, task)
        cause = e.__cause__ or e
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if isinstance(e, ValueError) and "corresponds to no data" in str(e):
            detail = "it holds no rows"
        raise TaskDataError(
            f"task {task!r}: cannot read {files if len(files) > 1 else files[0]!r} as {fmt} ({detail}); "
            "check the file or set source.format"
        ) from None
    strings = [c for c in ds.column_names if _is_string(ds.features[c])]
    if fmt in _TEXT_FORMATS and strings:
        table = ds.with_format("arrow")[:]
        for col in strings:
            try:  # pyarrow's JSON reader can let invalid UTF-8 into a string column
                table[col].validate(full=True)
            except pa.ArrowInvalid:
                _require_utf8(files, task)
                raise TaskDataError(
                    f"task {task!r}: column {col!r} of {files} is not valid UTF-8; re-encode the data"
                ) from None
    return ds


def _require_utf8(files: list[str], task: str) -> None:
    for f in files:
        at = _first_non_utf8(f)
        if at is not None:
            raise TaskDataError(
                f"task {task!r}: data file {f!r} is not UTF-8 (invalid byte at offset {at}); "
                "re-encode it, e.g. `iconv -f latin1 -t utf-8`"
            )


def _is_string(feature: object) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _load_hub(src: HubSource, task: str) -> Dataset:
    try:
        return datasets.load_dataset(src.name, src.config, split=src.split)
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TaskDataError(
            f"task {task!r}: dataset {src.name!r} (config {src.config!r}, split {src.split!r}) could not be "
            f"loaded ({detail}); check the name, or download it and use a `kind: files` source"
        ) from None


def source_where(source: DataSource) -> str:
    """How errors name a source: its path(s), hub name or builtin suite."""
    if isinstance(source, FilesSource):
        return source.path if isinstance(source.path, str) else ", ".join(source.path)
    if isinstance(source, HubSource):
        return source.name
    return (
        f"builtin {source.suite}"
        + (f" {source.subset}" if source.subset else "")
        + (f" {source.package}" if source.package else "")
    )


def require_columns(ds: Dataset, wanted: dict[str, str], task: str, where: str, strings: bool = True) -> None:
    """Every ``{setting: column}`` exists (and holds text): else an error listing the columns found."""
    for setting, col in wanted.items():
        if col not in ds.column_names:
            raise TaskDataError(
                f"task {task!r}: {where!r} has no column {col!r} (source.{setting}); its columns are "
                f"{ds.column_names}: set source.{setting} to one of them"
            )
        feature = ds.features[col]
        if strings and not _is_string(feature) and getattr(feature, "dtype", None) != "null":
            raise TaskDataError(
                f"task {task!r}: column {col!r} of {where!r} holds {feature}, not text; "
                f"point source.{setting} at a string column"
            )


def load_table(source: DataSource, task: str) -> Dataset:
    """The rows of ``source`` with their own columns (no format checks yet).

    Raises:
        TaskDataError: missing or empty file, zero rows, not UTF-8, unknown file format, or an
            unreachable hub dataset.
    """
    if isinstance(source, BuiltinSource):
        if source.suite == "stdlib-code":
            from tasks.builtin.stdlib import package_documents

            return package_documents(source.package)
        from tasks.builtin.instruct import instruct_table

        return instruct_table(source.subset, source.package)
    return _load_files(source, task) if isinstance(source, FilesSource) else _load_hub(source, task)


def load_documents(source: DataSource, task: str) -> Dataset:
    """The documents of ``source``: columns ``text`` (+ ``doc_key`` for builtin files).

    Args:
        source: a files / hub / builtin source.
        task: the task's name (for error messages).

    Raises:
        TaskDataError: missing or empty file, zero rows, no such text column, a non-text
            column, not UTF-8, unknown format, or an unreachable hub dataset.

    Example:
        >>> docs = load_documents(FilesSource(path="notes.jsonl"), task="notes")
        >>> docs.column_names
        ['text']
    """
    ds = load_table(source, task)
    if isinstance(source, BuiltinSource):
        return ds
    return text_documents(ds, source.text_field, task, source_where(source))


def text_documents(ds: Dataset, text_field: str, task: str, where: str) -> Dataset:
    """The non-empty ``text_field`` rows of a loaded table, as a ``text`` column."""
    if text_field not in ds.column_names:
        raise TaskDataError(
            f"task {task!r}: {where!r} has no column {text_field!r}; its columns are "
            f"{ds.column_names}: set source.text_field to one of them"
        )
    feature = ds.features[text_field]
    if not _is_string(feature):
        raise TaskDataError(
            f"task {task!r}: column {text_field!r} of {where!r} holds {feature}, not text; "
            "point source.text_field at a string column"
        )
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    lengths = pc.fill_null(pc.utf8_length(ds.with_format("arrow")[:]["text"]), 0).to_numpy(zero_copy_only=False)
    if (lengths == 0).any():
        ds = ds.select(np.flatnonzero(lengths > 0))
    if len(ds) == 0:
        raise TaskDataError(f"task {task!r}: {where!r} holds no non-empty {text_field!r} rows; give it some text")
    return ds
