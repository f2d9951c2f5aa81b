"""TaskSpec / DataSource validation: safe names, the discriminated union, strictness."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.spec import BuiltinSource, DataSettings, FilesSource, HubSource, TaskSpec

SRC = {"kind": "files", "path": "a.jsonl"}


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".", "", "a\\b", "/abs", "x" * 65, "a b", "tâche"])
def test_task_name_rejects_unsafe(bad):
    with pytest.raises(ValidationError, match="task name"):
        TaskSpec(name=bad, source=SRC)


@pytest.mark.parametrize("good", ["json", "support-tickets", "a.b_c-1", "x" * 64, "..x"])
def test_task_name_accepts_safe(good):
    assert TaskSpec(name=good, source=SRC).name == good


def test_source_union_by_kind():
    t = TaskSpec(
        name="t",
        source={"kind": "hub", "name": "wikitext", "config": "wikitext-2-raw-v1"},
        eval_source={"kind": "builtin", "package": "json"},
    )
    assert isinstance(t.source, HubSource) and t.source.split == "train" and t.source.text_field == "text"
    assert isinstance(t.eval_source, BuiltinSource) and t.eval_source.suite == "stdlib-code"
    f = TaskSpec(name="t", source={"kind": "files", "path": ["a.csv", "b.csv"], "format": "csv"}).source
    assert isinstance(f, FilesSource) and f.paths() == ["a.csv", "b.csv"]


@pytest.mark.parametrize(
    "source, message",
    [
        ({"kind": "ftp", "path": "x"}, "kind"),
        ({"kind": "files", "path": "a.jsonl", "colour": "red"}, "Extra inputs"),
        ({"kind": "files", "path": "a.txt", "format": "txt"}, "format"),
        ({"kind": "files", "path": []}, "at least one file"),
        ({"kind": "builtin", "package": "numpy"}, "no package 'numpy'"),
        ({"kind": "builtin", "suite": "other", "package": "json"}, "suite"),
    ],
)
def test_bad_sources_are_rejected(source, message):
    with pytest.raises(ValidationError, match=message):
        TaskSpec(name="t", source=source)


@pytest.mark.parametrize(
    "field, value",
    [("eval_fraction", 0.0), ("eval_fraction", 1.0), ("max_train_sequences", 0), ("max_eval_sequences", -1)],
)
def test_bad_numbers_are_rejected(field, value):
    with pytest.raises(ValidationError, match=field):
        TaskSpec(name="t", source=SRC, **{field: value})


def test_unknown_task_field_is_rejected():
    with pytest.raises(ValidationError, match="Extra inputs"):
        TaskSpec(name="t", source=SRC, max_sequences=3)


def test_resolve_paths(tmp_path):
    t = TaskSpec(
        name="t",
        source={"kind": "files", "path": ["a.jsonl", "/abs/b.jsonl"]},
        eval_source={"kind": "files", "path": "e.csv"},
    )
    r = t.resolve_paths(tmp_path)
    assert r.source.path == [str(tmp_path / "a.jsonl"), "/abs/b.jsonl"]
    assert r.eval_source.path == str(tmp_path / "e.csv")
    assert t.source.path == ["a.jsonl", "/abs/b.jsonl"]  # the original is unchanged


def test_schema_and_round_trip():
    schema = TaskSpec.model_json_schema()
    assert "source" in schema["properties"]
    t = TaskSpec(name="t", source=SRC, max_train_sequences=5)
    assert TaskSpec.model_validate(t.model_dump()) == t
    assert DataSettings().seq_len == 128
    with pytest.raises(ValidationError):
        DataSettings(seq_len=1)


def test_spec_import_is_light():
    """Validating a job must not pull in datasets / torch / transformers / ray."""
    code = (
        "import sys, tasks, tasks.spec; "
        "print(sorted(m for m in ('datasets', 'torch', 'transformers', 'ray') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2]
    )
    assert out.stdout.strip() == "[]"


def test_example_formats_and_their_field_settings():
    t = TaskSpec(name="t", source={**SRC, "example_format": "alpaca", "instruction_field": "q"}, train_on_prompt=True)
    assert t.source.field_names() == {"instruction": "q", "input": "input", "output": "output"}
    assert t.truncation == "left" and t.train_on_prompt
    with pytest.raises(ValidationError, match=r"\['prompt_field'\] do not apply to example_format 'alpaca'"):
        TaskSpec(name="t", source={**SRC, "example_format": "alpaca", "prompt_field": "q"})
    with pytest.raises(ValidationError, match="example_format"):
        TaskSpec(name="t", source={**SRC, "example_format": "sharegpt"})
    with pytest.raises(ValidationError, match="truncation"):
        TaskSpec(name="t", source=SRC, truncation="right")
    with pytest.raises(ValidationError, match="give both the same example_format"):
        TaskSpec(name="t", source={**SRC, "example_format": "messages"}, eval_source=SRC)
    m = TaskSpec(
        name="t", source={"kind": "hub", "name": "x", "example_format": "messages", "role_map": {"gpt": "assistant"}}
    )
    assert m.source.role_map == {"gpt": "assistant"}
    with pytest.raises(ValidationError, match="role_map"):
        TaskSpec(
            name="t", source={"kind": "hub", "name": "x", "example_format": "messages", "role_map": {"gpt": "bot"}}
        )


def test_builtin_suites():
    s = TaskSpec(name="t", source={"kind": "builtin", "suite": "stdlib-instruct", "subset": "signature"}).source
    assert s.format_name == "prompt_completion" and s.package is None
    assert BuiltinSource(package="json").format_name == "text"
    for bad, msg in [
        ({"suite": "stdlib-instruct"}, "needs a subset"),
        ({"suite": "stdlib-code"}, "needs a package"),
        ({"package": "json", "subset": "signature"}, "stdlib-instruct only"),
        ({"suite": "stdlib-instruct", "subset": "submodule", "example_format": "text"}, "instruction examples"),
    ]:
        with pytest.raises(ValidationError, match=msg):
            BuiltinSource(**bad)
