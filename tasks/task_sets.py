"""Task sets: one table split by a column (or one task per file of a glob) -> many tasks.

One pass over the table: it is loaded once, grouped by the task column (pyarrow
``dictionary_encode``, no per-task filter), the kept tasks are chosen (``min_examples``,
``max_tasks`` by ``pick``), all their rows are tokenised in one batched call, and each task's
rows are then sliced out of the result.

Task names: the original value with every character outside ``[A-Za-z0-9_.-]`` replaced by
``_`` (a value longer than the 64-character limit is cut and given an 8-hex hash of the
value), after ``name_prefix``. Null and empty values name no task (counted as
``null_rows``). Two kept values that give the same name, compared ignoring case (the names
are directories), are an error, as is a name already taken by another task.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.errors import TaskDataError
from tasks.spec import TaskSetSpec, example_format_of

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from tasks.build import BuildContext
    from tasks.task_data import TaskData

__all__ = ["TaskSetPlan", "plan_task_set", "describe_task_sets", "expand_task_sets", "expand_with", "task_name_of"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


_DATA_SUFFIXES = {".gz", ".bz2", ".xz", ".zst", ".jsonl", ".json", ".csv", ".parquet", ".arrow"}


def _file_stem(path: str) -> str:
    """``data/acme.jsonl.gz`` -> ``acme``: the name without its data and compression suffixes."""
    p = Path(Path(path).name)
    while p.suffix.lower() in _DATA_SUFFIXES and p.stem:
        p = p.with_suffix("")
    return p.name


def task_name_of(value: object, prefix: str = "") -> str:
    """A safe task name for an original value (see the module docstring).

    Example:
        >>> task_name_of("ACME Corp./EU", "cust-")
        'cust-ACME_Corp._EU'
    """
    s = _UNSAFE.sub("_", str(value))
    name = prefix + s
    if s in (".", "..") or name in (".", ".."):
        name = prefix + s.replace(".", "_")
    if len(name) > 64:
        name = name[:55] + "-" + hashlib.sha256(str(value).encode()).hexdigest()[:8]
    return name


@dataclass
class TaskSetPlan:
    """The grouping of one task set's table, before tokenising.

    Attributes:
        ds: the whole table (per-file sets: the files concatenated).
        codes: (rows,) the task group of each row; -1 for null / empty values.
        values: original value of each group.
        counts: (groups,) rows per group.
        chosen: kept groups, in task order (largest first, or the seeded sample).
        names: task name of each kept group.
        skipped: ``{original value: reason}`` for groups not kept.
        field: the task column, or ``"file"``.
    """

    spec: TaskSetSpec
    ds: Dataset
    codes: np.ndarray
    values: list
    counts: np.ndarray
    chosen: list[int]
    names: dict[int, str]
    skipped: dict[str, str]
    field: str
    where: str
    null_rows: int = 0
    eval_rows: np.ndarray | None = None  # (rows,) True where eval_split selects the row

    def mapping(self) -> dict:
        """What the report shows: ``{"field", "tasks": {value: name}, "skipped", "null_rows"}``."""
        return {"field": self.field, "tasks": {str(self.values[g]): self.names[g] for g in self.chosen},
                "skipped": dict(self.skipped), "null_rows": int(self.null_rows)}


def _label(ts: TaskSetSpec) -> str:
    return f"{ts.name} (task set)"


def _load(ts: TaskSetSpec) -> tuple[Dataset, np.ndarray, list, str, str, int]:
    """The table, each row's group code (-1: none), the groups' values, the field, where, null rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from tasks.sources import expand_paths, load_table, source_where

    where, label = source_where(ts.source), _label(ts)
    if ts.task_per_file:
        from datasets import concatenate_datasets

        files = expand_paths(ts.source.paths(), label)
        parts = [load_table(ts.source.model_copy(update={"path": f}), label) for f in files]
        try:
            ds = concatenate_datasets(parts)
        except ValueError as e:
            raise TaskDataError(
                f"task set {ts.name!r}: the files of {where!r} do not share their columns ({str(e).splitlines()[0]}); "
                "give every file the same columns"
            ) from None
        codes = np.repeat(np.arange(len(files)), [len(p) for p in parts])
        return ds, codes, list(files), "file", where, 0
    ds = load_table(ts.source, label)
    if ts.task_field not in ds.column_names:
        raise TaskDataError(
            f"task set {ts.name!r}: {where!r} has no column {ts.task_field!r} (task_field); its columns are "
            f"{ds.column_names}: set task_field to one of them"
        )
    col = ds.with_format("arrow")[:][ts.task_field]
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        col = pc.if_else(pc.equal(col, ""), pa.scalar(None, col.type), col)  # empty names no task
    elif not (pa.types.is_integer(col.type) or pa.types.is_boolean(col.type) or pa.types.is_null(col.type)):
        raise TaskDataError(
            f"task set {ts.name!r}: column {ts.task_field!r} (task_field) of {where!r} holds {col.type}; it must hold "
            "strings or integers naming each row's task"
        )
    enc = col.dictionary_encode()
    codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    values = enc.dictionary.to_pylist()
    null_rows = int((codes < 0).sum())
    if len(values) < 2:
        what = f"a single value {values[0]!r}" if values else f"no value (all {len(codes)} rows are null or empty)"
        raise TaskDataError(
            f"task set {ts.name!r}: column {ts.task_field!r} (task_field) of {where!r} has {what}, "
            "so it splits nothing; use a plain `tasks:` entry, or set task_field to the column naming each row's task "
            f"(columns: {ds.column_names})"
        )
    return ds, codes, values, ts.task_field, where, null_rows


def plan_task_set(ts: TaskSetSpec, seed: int = 0, taken: set[str] = frozenset()) -> TaskSetPlan:
    """Load and group one task set's table and choose its tasks (no tokenising).

    Raises:
        TaskDataError: no such column, a task_field with a single value or none, two kept
            values with the same task name, a name already taken, or no value with
            ``min_examples`` rows.
    """
    ds, codes, values, fld, where, null_rows = _load(ts)
    counts = np.bincount(codes[codes >= 0], minlength=len(values))
    groups = [g for g in range(len(values)) if counts[g] >= ts.min_examples]
    skipped = {
        str(values[g]): f"{int(counts[g])} rows < min_examples {ts.min_examples}"
        for g in range(len(values))
        if counts[g] < ts.min_examples
    }
    if not groups:
        raise TaskDataError(
            f"task set {ts.name!r}: no {fld} of {where!r} has min_examples {ts.min_examples} rows (the largest has "
            f"{int(counts.max())}); lower min_examples"
        )
    if ts.pick == "largest":
        groups.sort(key=lambda g: (-int(counts[g]), str(values[g])))
    else:
        salt = int.from_bytes(hashlib.sha256(ts.name.encode()).digest()[:8], "little")
        groups = list(np.random.default_rng([seed, salt]).permutation(groups))
    if ts.max_tasks is not None and len(groups) > ts.max_tasks:
        for g in groups[ts.max_tasks:]:
            skipped[str(values[g])] = f"beyond max_tasks {ts.max_tasks} (pick: {ts.pick})"
        groups = groups[: ts.max_tasks]
    names, seen = {}, {}
    for g in groups:
        value = values[g]
        stem = _file_stem(value) if ts.task_per_file else value
        name = task_name_of(stem, ts.name_prefix)
        other = seen.get(name.lower())
        if other is not None:
            raise TaskDataError(
                f"task set {ts.name!r}: {fld} values {values[other]!r} and {value!r} of {where!r} both give task name "
                f"{name!r} (names are directories, compared ignoring case); rename one of them in the data"
            )
        if name in taken:
            raise TaskDataError(
                f"task set {ts.name!r}: {fld} value {value!r} gives task name {name!r}, "
                "which another task already has; "
                "set name_prefix on the set (e.g. name_prefix: cust-) or rename that task"
            )
        seen[name.lower()], names[g] = g, name
    eval_rows = None
    if ts.eval_split is not None:
        if ts.eval_split.field not in ds.column_names:
            raise TaskDataError(
                f"task set {ts.name!r}: {where!r} has no column {ts.eval_split.field!r} (eval_split.field); "
                "its columns "
                f"are {ds.column_names}: set eval_split.field to one of them"
            )
        want = str(ts.eval_split.value)
        eval_rows = np.array(
            [str(v) == want for v in ds.with_format("arrow")[:][ts.eval_split.field].to_pylist()], dtype=bool
        )
    return TaskSetPlan(
        ts, ds, codes, values, counts, [int(g) for g in groups], names, skipped, fld, where, null_rows, eval_rows
    )


def describe_task_sets(task_sets: Sequence[TaskSetSpec], seed: int = 0, taken: set[str] = frozenset()) -> list[dict]:
    """How many tasks each set expands to and their sizes (rows), without tokenising.

    Returns:
        Per set ``{"name", "field", "values", "tasks", "skipped", "min", "median", "max"}``.

    Example:
        >>> describe_task_sets(spec.task_sets)[0]["tasks"]
        1000
    """
    out, taken = [], set(taken)
    for ts in task_sets:
        plan = plan_task_set(ts, seed, taken)
        taken.update(plan.names.values())
        sizes = np.array([plan.counts[g] for g in plan.chosen])
        out.append({"name": ts.name, "field": plan.field, "values": len(plan.values), "tasks": len(plan.chosen),
                    "skipped": len(plan.skipped), "min": int(sizes.min()), "median": float(np.median(sizes)),
                    "max": int(sizes.max())})
    return out


def _split(plan: TaskSetPlan, rows: np.ndarray, hold_out_fraction) -> tuple:
    """(train positions, eval positions, how) of a task's examples at table ``rows``, or (None, reason)."""
    if plan.eval_rows is not None:
        is_eval = plan.eval_rows[rows]
        if is_eval.all():
            return None, "every row is an eval_split row: nothing to train on"
        if is_eval.any():
            return np.flatnonzero(~is_eval), np.flatnonzero(is_eval), "eval_split"
    if len(rows) < 2:
        return None, f"{len(rows)} usable example: none can be held out for evaluation"
    tr, ev = hold_out_fraction()
    return tr, ev, "fraction"


def _expand_one(plan: TaskSetPlan, ctx: BuildContext) -> list[TaskData]:
    from tasks.build import encode_source, instruct_task_data, text_task_data
    from tasks.packing import hold_out
    from tasks.rows import hold_out_examples

    ts = plan.spec
    union = np.flatnonzero(np.isin(plan.codes, plan.chosen))  # rows of the kept tasks, in table order
    sub = plan.ds.select(union) if len(union) < len(plan.ds) else plan.ds
    text = example_format_of(ts.source) == "text"
    if text:
        from datasets import Dataset

        from tasks.sources import require_columns

        fld = getattr(ts.source, "text_field", "text")
        require_columns(sub, {"text_field": fld}, _label(ts), plan.where)
        texts = ["" if t is None else t for t in sub.with_format("arrow")[:][fld].to_pylist()]
        docs = Dataset.from_dict({"text": texts})
        tokens = ctx.tokens_of(docs)
        ex_rows = np.flatnonzero(np.array([bool(t) for t in texts], dtype=bool))  # positions in sub
    else:
        ex = encode_source(ts.source, _label(ts), ts, ctx, ds=sub, row_ids=union)
        ex_rows = ex.rows
    group = plan.codes[union[ex_rows]]  # each example's task group
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(len(plan.values) + 1))
    out = []
    for g in plan.chosen:
        name = plan.names[g]
        pos = order[bounds[g] : bounds[g + 1]]  # this task's examples (positions into ex / ex_rows)
        table_rows = union[ex_rows[pos]]
        extra = {"task_set": {"set": ts.name, "field": plan.field, "value": plan.values[g]}}
        if text:  # whole documents, by characters, as for a text task
            frac = lambda p=pos: hold_out(docs.select(ex_rows[p]), ts.eval_fraction, ctx.seed)  # noqa: E731
        else:
            frac = partial(hold_out_examples, len(pos), ts.eval_fraction, ctx.seed, name)
        split = _split(plan, table_rows, frac)
        if split[0] is None:
            plan.skipped[str(plan.values[g])] = split[1]
            del plan.names[g]
            continue
        tr, ev, how = split
        extra["task_set"]["eval"] = how
        if text:
            built = text_task_data(name, tokens, ex_rows[pos[tr]], tokens, ex_rows[pos[ev]], ts, ctx, extra)
        else:
            built = instruct_task_data(name, ex, pos[tr], ex, pos[ev], ts, ctx, plan.where, extra)
        out.append(ctx.keep(built))  # written out now (a row store), not held for the whole set
    plan.chosen = [g for g in plan.chosen if g in plan.names]
    if not out:
        raise TaskDataError(f"task set {ts.name!r}: no task of {plan.where!r} has a usable example; check the data")
    return out


def expand_with(
    ctx: BuildContext, task_sets: Sequence[TaskSetSpec], taken: set[str] = frozenset()
) -> tuple[list[TaskData], dict]:
    """:func:`expand_task_sets` with a prepared :class:`tasks.build.BuildContext`."""
    out, report, taken = [], {}, set(taken)
    for ts in task_sets:
        plan = plan_task_set(ts, ctx.seed, taken)
        out.extend(_expand_one(plan, ctx))
        taken.update(plan.names.values())
        report[ts.name] = plan.mapping()
    return out, report


def expand_task_sets(
    task_sets: Sequence[TaskSetSpec],
    tokenizer: PreTrainedTokenizerBase | str,
    seq_len: int,
    seed: int = 0,
    *,
    chat_template: str | None = None,
    taken: set[str] = frozenset(),
) -> tuple[list[TaskData], dict]:
    """Expand task sets into tasks' data, one pass over each table.

    Args:
        task_sets: the sets.
        tokenizer, seq_len, seed, chat_template: as :func:`tasks.build_task_data`.
        taken: task names already used (explicit tasks): a set's name that repeats one is an error.

    Returns:
        (the tasks' data in set order, ``{set name: mapping}`` where a mapping is
        ``{"field", "tasks": {original value: task name}, "skipped": {value: reason}, "null_rows"}``).

    Example:
        >>> sets = [TaskSetSpec(name="c", source={...}, task_field="customer_id")]
        >>> data, report = expand_task_sets(sets, "bytes", 64)
        >>> report["c"]["tasks"]
        {'ACME Corp.': 'ACME_Corp.', ...}
    """
    from tasks.build import BuildContext

    return expand_with(BuildContext.make(tokenizer, seq_len, seed, chat_template), task_sets, taken)
