"""The job spec: examples validate, errors name the field, the CLI never shows a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.demo import DEMO_JOB
from orchestrator.errors import SpecError
from orchestrator.spec import JobSpec, load_job, parse_job

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 2 and (ROOT / "examples" / "tiny.yaml") in EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates_and_opens_with_its_command(path):
    load_job(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# loraflock ") and path.name in first


def test_demo_yaml_is_the_builtin_demo():
    assert load_job(ROOT / "examples" / "demo.yaml") == JobSpec.model_validate(DEMO_JOB)


def _tiny() -> dict:
    return yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda d: d["lora"].update(rank=0), "lora.rank"),
        (lambda d: d["train"].update(steps="many"), "train.steps"),
        (lambda d: d["train"].update(stepz=3), "train.stepz"),
        (lambda d: d["flock"].update(tau=-1), "flock.tau"),
        (lambda d: d["flock"].update(sync_every=0), "flock.sync_every"),
        (lambda d: d["tasks"][0].update(name="../evil"), "tasks.0.name"),
        (lambda d: d["tasks"].append(dict(d["tasks"][0])), "task names must be unique"),
        (lambda d: d["lora"].update(ranks={"nope": 4}), "unknown tasks"),
        (lambda d: d.pop("base"), "base"),
    ],
)
def test_errors_name_the_field(mutate, field):
    d = _tiny()
    mutate(d)
    with pytest.raises(SpecError) as e:
        parse_job(d, "job.yaml")
    assert field in str(e.value)


def test_unknown_field_message_says_what_to_do():
    d = _tiny()
    d["flok"] = {}
    with pytest.raises(SpecError, match="flok: unknown field"):
        parse_job(d)


@pytest.mark.parametrize(
    "text,needle",
    [("", "empty"), ("name: [unclosed", "malformed YAML at line"), ("- a\n- b\n", "must be a YAML mapping")],
)
def test_bad_yaml_files(tmp_path, text, needle):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    with pytest.raises(SpecError, match=needle):
        load_job(p)


def test_non_utf8_file(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_job(p)


def test_cli_validate_prints_every_problem_and_exits_2(tmp_path, capsys):
    d = _tiny()
    d["lora"]["rank"] = -1
    d["train"]["lr"] = 0
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err
    assert "lora.rank" in err and "train.lr" in err and "Traceback" not in err
    assert main(["validate", str(ROOT / "examples" / "tiny.yaml")]) == 0


def test_cli_schema_is_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "base" in schema["required"] and {"tasks", "task_sets"} <= set(schema["properties"])


def test_cli_main_stays_callable_after_the_cli_has_run(capsys):
    """``orchestrator.cli.main`` is the entry function, also once a run has imported the CLI's
    submodules (a submodule named ``main`` once rebound the package's name to the module)."""
    import orchestrator.cli

    assert orchestrator.cli.main(["schema"]) == 0
    from orchestrator.cli import main as again

    assert callable(again) and again(["schema"]) == 0


def test_cli_missing_file_no_traceback():
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "validate", "/nonexistent.yaml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "no such job file" in r.stderr and "Traceback" not in r.stderr


def test_align_with_global_allocation_is_refused_in_the_job():
    from pydantic import ValidationError

    from orchestrator.specs.gates import GatesSpec

    assert GatesSpec(enabled=True, align=64).align == 64
    with pytest.raises(ValidationError, match="gates.align"):
        GatesSpec(enabled=True, align=64, allocation="global")


def test_cli_validate_prints_what_each_task_set_expands_to(capsys):
    assert main(["validate", str(ROOT / "examples" / "instruct.yaml")]) == 0
    out = capsys.readouterr().out
    assert "(0 tasks, 2 task sets" in out
    assert "task set 'submodule': 9 tasks from 9 values of package" in out
    assert "rows per task min 20, median 186, max 280" in out
