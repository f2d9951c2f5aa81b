"""Task specs: what a task is called, where its examples come from and how they are read.

These models are the ``tasks:`` and ``task_sets:`` parts of a job YAML
(``orchestrator.spec.JobSpec`` embeds :class:`TaskSpec` and :class:`TaskSetSpec`). They hold
no data and import nothing heavy, so validating a job (or printing its JSON schema) never
loads ``datasets`` or ``transformers``.

Every source reads its rows in one **example format** (``example_format``; ``format`` stays
the *file* format: jsonl, csv, parquet ...):

* ``text`` (default): one document per row, joined with EOS and packed into full rows;
  every token is scored.
* ``prompt_completion``: ``prompt`` + ``completion`` (+ EOS), as TRL names them.
* ``alpaca``: ``instruction``, optional ``input``, ``output`` (+ EOS), rendered with the
  Stanford Alpaca prompt (as Axolotl's ``type: alpaca`` does).
* ``messages``: a list of ``{role, content}`` turns rendered with the tokenizer's own chat
  template (``apply_chat_template``), or the job's ``chat_template:`` override.

Instruction formats put one example per row (right-padded) and score the completion only
(every assistant turn for ``messages``) unless ``train_on_prompt: true`` (LLaMA-Factory's
name; Axolotl calls it ``train_on_inputs``).

Example (YAML)::

    tasks:
      - name: support-tickets
        source: {kind: files, path: data/tickets.jsonl, text_field: body}
        max_train_sequences: 512
      - name: faq
        source: {kind: files, path: data/faq.csv, example_format: prompt_completion,
                 prompt_field: question, completion_field: answer}
      - name: json
        source: {kind: builtin, suite: stdlib-code, package: json}
    task_sets:
      - name: customers
        source: {kind: files, path: data/chats.parquet, example_format: messages}
        task_field: customer_id
        min_examples: 20
        max_tasks: 500
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from tasks.metric_spec import Metric, MetricSettings, check_labels
from tasks.strict import Strict

__all__ = [
    "STDLIB_PACKAGES",
    "EXAMPLE_FORMATS",
    "INSTRUCT_SUBSETS",
    "example_format_of",
    "ExampleFields",
    "FilesSource",
    "HubSource",
    "BuiltinSource",
    "DataSource",
    "TaskOptions",
    "TaskSpec",
    "EvalSplit",
    "TaskSetSpec",
    "DataSettings",
]

# Packages of the builtin ``stdlib-code`` suite (the first six form the demo).
STDLIB_PACKAGES: tuple[str, ...] = (
    "json", "concurrent", "logging", "http", "email", "asyncio", "xml", "unittest", "importlib",
)
EXAMPLE_FORMATS: tuple[str, ...] = ("text", "prompt_completion", "alpaca", "messages")
# subsets of the builtin ``stdlib-instruct`` suite (see tasks/builtin/instruct.py)
INSTRUCT_SUBSETS: tuple[str, ...] = ("submodule", "signature")

_TASK_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ExampleFormat = Literal["text", "prompt_completion", "alpaca", "messages"]

# which field-name settings belong to which example format
_FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text_field",),
    "prompt_completion": ("prompt_field", "completion_field"),
    "alpaca": ("instruction_field", "input_field", "output_field"),
    "messages": ("messages_field", "role_field", "content_field", "role_map"),
}


def _safe_task_name(v: str, what: str = "task name") -> str:
    if v in (".", "..") or not _TASK_NAME.match(v):
        raise ValueError(
            f"{what} {v!r} is not allowed: use 1-64 letters, digits, '-', '_' or '.' "
            "(no path separators, not '.' or '..'), e.g. 'support-tickets'"
        )
    return v


class ExampleFields(Strict):
    """How a table's columns make examples (shared by file and hub sources).

    Args:
        example_format: ``text`` | ``prompt_completion`` | ``alpaca`` | ``messages``.
        text_field: ``text``: the column holding each document.
        prompt_field, completion_field: ``prompt_completion``: the two string columns.
        instruction_field, input_field, output_field: ``alpaca``: the columns; the input
            column may be absent or null (the prompt then has no "### Input:" part).
        messages_field: ``messages``: the column holding a list of turns.
        role_field, content_field: ``messages``: the keys of each turn (ShareGPT data: ``from``
            and ``value``).
        role_map: ``messages``: the data's role names -> ``system``/``user``/``assistant``/
            ``tool`` (ShareGPT data: ``{human: user, gpt: assistant}``).

    A field setting of another format, changed from its default, is an error (it would be ignored).
    """

    example_format: ExampleFormat = "text"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"
    role_field: str = "role"
    content_field: str = "content"
    role_map: dict[str, Literal["system", "user", "assistant", "tool"]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fields_match_format(self) -> ExampleFields:
        own = set(_FORMAT_FIELDS[self.example_format])
        stray = sorted(
            f
            for fmt, names in _FORMAT_FIELDS.items()
            if fmt != self.example_format
            for f in names
            if f not in own and getattr(self, f) != type(self).model_fields[f].get_default(call_default_factory=True)
        )
        if stray:
            raise ValueError(
                f"{stray} do not apply to example_format {self.example_format!r} (its field settings are "
                f"{sorted(own)}): set example_format to the format they belong to, or remove them"
            )
        return self

    def field_names(self) -> dict[str, str]:
        """Role of each column of this format -> the column name, e.g. ``{"prompt": "question"}``."""
        return {
            f.removesuffix("_field"): getattr(self, f)
            for f in _FORMAT_FIELDS[self.example_format]
            if f.endswith("_field")
        }


class FilesSource(ExampleFields):
    """Local files, one example (or document) per row.

    Args:
        path: a file, a glob, or a list of them; relative paths are taken from the working
            directory (``TaskSpec.resolve_paths`` makes them relative to the job file).
        format: the *file* format ``jsonl``/``json``/``csv``/``parquet``/``arrow``; ``None``
            infers it from the suffix (``.gz``/``.bz2``/``.xz``/``.zst`` are looked through).
        example_format and the ``*_field`` settings: see :class:`ExampleFields`.
    """

    kind: Literal["files"] = "files"
    path: str | list[str]
    format: Literal["jsonl", "json", "csv", "parquet", "arrow"] | None = None

    @field_validator("path")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        paths = [v] if isinstance(v, str) else v
        if not paths or any(not p.strip() for p in paths):
            raise ValueError("source.path must name at least one file (empty path given)")
        return v

    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


class HubSource(ExampleFields):
    """A dataset by ``datasets`` name (needs the hub, or a local dataset-script directory).

    Args:
        name: e.g. ``"wikitext"``.
        config: the dataset's configuration, e.g. ``"wikitext-2-raw-v1"``.
        split: which split to read.
        example_format and the ``*_field`` settings: see :class:`ExampleFields`.
    """

    kind: Literal["hub"] = "hub"
    name: str = Field(min_length=1)
    config: str | None = None
    split: str = "train"


class BuiltinSource(Strict):
    """A bundled suite built offline from the Python standard library (no download).

    Args:
        suite: ``stdlib-code`` (one package's source files, raw text) or ``stdlib-instruct``
            (instruction examples mined from the stdlib's docstrings; see
            :mod:`tasks.builtin.instruct`).
        package: one of :data:`STDLIB_PACKAGES`; required for ``stdlib-code``. For
            ``stdlib-instruct`` it keeps one package's examples; without it the table holds
            every package, with a ``package`` column to split a task set by.
        subset: ``stdlib-instruct`` only: ``submodule`` (classification: docstring -> the
            submodule it comes from) or ``signature`` (generation: docstring -> ``def`` line).
        example_format: ``stdlib-code``: ``text``; ``stdlib-instruct``: ``prompt_completion``
            (default), ``alpaca`` or ``messages`` (its table has the columns of all three).
    """

    kind: Literal["builtin"] = "builtin"
    suite: Literal["stdlib-code", "stdlib-instruct"] = "stdlib-code"
    package: str | None = None
    subset: Literal["submodule", "signature"] | None = None
    example_format: ExampleFormat | None = None

    @field_validator("package")
    @classmethod
    def _known_package(cls, v: str | None) -> str | None:
        if v is not None and v not in STDLIB_PACKAGES:
            raise ValueError(f"the builtin suites have no package {v!r}; choose one of {list(STDLIB_PACKAGES)}")
        return v

    @model_validator(mode="after")
    def _suite_fields(self) -> BuiltinSource:
        if self.suite == "stdlib-code":
            if self.package is None:
                raise ValueError(f"stdlib-code needs a package: one of {list(STDLIB_PACKAGES)}")
            if self.subset is not None:
                raise ValueError("subset applies to suite stdlib-instruct only; remove it")
            if self.example_format not in (None, "text"):
                raise ValueError("stdlib-code is raw source text: example_format must be text")
        elif self.subset is None:
            raise ValueError(f"stdlib-instruct needs a subset: one of {list(INSTRUCT_SUBSETS)}")
        elif self.example_format == "text":
            raise ValueError("stdlib-instruct holds instruction examples: use prompt_completion, alpaca or messages")
        return self

    @property
    def format_name(self) -> str:
        """The example format in use (the suite's default when none is set)."""
        if self.example_format is not None:
            return self.example_format
        return "text" if self.suite == "stdlib-code" else "prompt_completion"


DataSource = Annotated[FilesSource | HubSource | BuiltinSource, Field(discriminator="kind")]


def example_format_of(source: DataSource) -> str:
    """The example format a source is read in."""
    return source.format_name if isinstance(source, BuiltinSource) else source.example_format


class TaskOptions(Strict):
    """Settings shared by a task and a task set.

    Args:
        max_train_sequences: cap on training rows (a seeded random subset); for instruction
            formats a row is one example.
        max_eval_sequences: cap on eval rows, likewise.
        eval_fraction: share held out for evaluation when there is no separate eval data:
            of the characters for ``text`` (whole documents), of the examples otherwise.
        train_on_prompt: instruction formats: also score prompt, system and user tokens
            (default: completions / assistant turns only). LLaMA-Factory's name; Axolotl's
            ``train_on_inputs``.
        truncation: an instruction example longer than ``seq_len``: ``left`` cuts its prompt
            from the left and keeps the completion (the final assistant turn) whole; ``drop``
            leaves it out. Both are counted in the report (``stats.truncated``/``dropped``).
            With ``left``, an example whose completion alone fills the row (no prompt token
            would be left) is an error that names the row; ``drop`` drops it.
        metrics, max_new_tokens, stop: override the job's ``eval:`` defaults for this task (or
            every task of this set); see :class:`MetricSettings`.
        labels: ``choice_accuracy``'s label set (2 to 64 strings); without it the distinct
            training completions are the labels.
    """

    max_train_sequences: int | None = Field(None, ge=1)
    max_eval_sequences: int | None = Field(None, ge=1)
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    train_on_prompt: bool = False
    truncation: Literal["left", "drop"] = "left"
    metrics: list[Metric] | None = Field(None, min_length=1)
    max_new_tokens: int | None = Field(None, ge=1, le=4096)
    stop: list[str] | None = None
    labels: list[str] | None = None

    @field_validator("metrics")
    @classmethod
    def _unique_metrics(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else list(dict.fromkeys(v))

    @field_validator("labels")
    @classmethod
    def _label_count(cls, v: list[str] | None) -> list[str] | None:
        return v if v is None else check_labels(v)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not s for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    def metric_settings(self, metrics: list[str], max_new_tokens: int, stop: list[str]) -> MetricSettings:
        """This task's :class:`MetricSettings`: its own settings where given, else the job's (the arguments)."""
        return MetricSettings(
            metrics=self.metrics if self.metrics is not None else metrics,
            max_new_tokens=self.max_new_tokens if self.max_new_tokens is not None else max_new_tokens,
            stop=self.stop if self.stop is not None else stop,
            labels=self.labels,
        )


class TaskSpec(TaskOptions):
    """One task: its name, its training examples and (optionally) its own eval examples.

    Without ``eval_source`` part of the data is held out for evaluation (``eval_fraction``,
    chosen by a seeded hash), so eval examples are never trained on.

    Args:
        name: letters, digits and ``-_.``, at most 64 characters (it names a directory).
        source: where the training examples come from (and in which example format).
        eval_source: separate eval examples; ``eval_fraction`` is then unused.
        (the rest: :class:`TaskOptions`)

    Example:
        >>> TaskSpec(name="json", source={"kind": "builtin", "package": "json"})
    """

    name: str
    source: DataSource
    eval_source: DataSource | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return _safe_task_name(v)

    @model_validator(mode="after")
    def _same_format(self) -> TaskSpec:
        if self.eval_source is not None and example_format_of(self.eval_source) != example_format_of(self.source):
            raise ValueError(
                f"eval_source reads example_format {example_format_of(self.eval_source)!r} but source reads "
                f"{example_format_of(self.source)!r}: give both the same example_format"
            )
        return self

    def resolve_paths(self, base_dir: str | Path) -> TaskSpec:
        """A copy whose relative local-file paths are taken from ``base_dir`` (the job file's folder)."""
        return self.model_copy(update={f: _resolved(getattr(self, f), base_dir) for f in ("source", "eval_source")})


def _resolved(src: DataSource | None, base_dir: str | Path) -> DataSource | None:
    if not isinstance(src, FilesSource):
        return src
    fixed = [p if Path(p).expanduser().is_absolute() else str(Path(base_dir) / p) for p in src.paths()]
    return src.model_copy(update={"path": fixed[0] if isinstance(src.path, str) else fixed})


class EvalSplit(Strict):
    """Rows whose column ``field`` equals ``value`` are eval examples, the rest training ones.

    Example (YAML): ``eval_split: {field: split, value: test}``
    """

    field: str = Field(min_length=1)
    value: str | int | bool


class TaskSetSpec(TaskOptions):
    """Many tasks from one source: a table split by a column, or one task per file of a glob.

    Each distinct value of ``task_field`` (or each file) becomes a task named after it:
    characters outside ``[A-Za-z0-9_.-]`` become ``_``, a value longer than 64 characters is
    cut and given a hash suffix, and ``name_prefix`` goes in front. Two values that give the
    same name (also ignoring case: the names are directories) are an error. The mapping from
    original value to task name goes into the report (``tasks.task_set_mapping``).

    Args:
        name: names the set in the report and in errors.
        source: the table (one pass: loaded, grouped and tokenised once).
        task_field: the column naming each row's task, e.g. ``customer_id``.
        task_per_file: one task per file of ``source.path`` (a glob), named after the file's stem.
        name_prefix: put in front of every task name, e.g. ``cust-``.
        min_examples: tasks with fewer rows are skipped (listed in the report).
        max_tasks: keep at most this many tasks, chosen by ``pick``.
        pick: ``largest`` (most rows first, ties by name) or ``sample`` (seeded by the job's seed).
        eval_split: rows with this column value are eval examples; a task with none falls back
            to ``eval_fraction``. Without it each task holds out ``eval_fraction``.
        (the rest: :class:`TaskOptions`, applied to every task of the set)

    Example (YAML)::

        task_sets:
          - name: customers
            source: {kind: files, path: chats.parquet, example_format: messages}
            task_field: customer_id
            min_examples: 20
            max_tasks: 1000
            eval_split: {field: split, value: test}
    """

    name: str
    source: DataSource
    task_field: str | None = None
    task_per_file: bool = False
    name_prefix: str = Field("", pattern=r"^[A-Za-z0-9_.-]{0,32}$")
    min_examples: int = Field(2, ge=1)
    max_tasks: int | None = Field(None, ge=1)
    pick: Literal["largest", "sample"] = "largest"
    eval_split: EvalSplit | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return _safe_task_name(v, "task set name")

    @model_validator(mode="after")
    def _one_split(self) -> TaskSetSpec:
        if (self.task_field is None) == (not self.task_per_file):
            raise ValueError(
                f"task set {self.name!r}: give either task_field (split one table by a column) "
                "or task_per_file: true (one task per file of a glob), not both or neither"
            )
        if self.task_per_file and not isinstance(self.source, FilesSource):
            raise ValueError(f"task set {self.name!r}: task_per_file needs a `kind: files` source with a glob")
        return self

    def resolve_paths(self, base_dir: str | Path) -> TaskSetSpec:
        """A copy whose relative local-file paths are taken from ``base_dir`` (the job file's folder)."""
        return self.model_copy(update={"source": _resolved(self.source, base_dir)})


class DataSettings(Strict):
    """How every task's text is cut into training rows.

    Args:
        seq_len: tokens per packed row (documents are joined with EOS, then cut).
        seed: seeds the eval hold-out and the row caps.
    """

    seq_len: int = Field(128, ge=2)
    seed: int = 0
