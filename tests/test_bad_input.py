"""Bad input through the real CLI: a clear message naming the field or file and the fix,
exit status 2, no traceback, and nothing half-written (no report.json, no adapters).

Complements tests/orchestrator/test_spec.py (spec errors through ``load_job``/``parse_job``)
and tests/orchestrator/test_pipeline.py (bad target modules, unreachable address, a foreign
output directory after a finished run): here every case goes through a subprocess of
``python -m orchestrator.cli`` as a user would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"
CLI = [sys.executable, "-m", "orchestrator.cli"]
RAY_STARTED = "starting an embedded local Ray"


def _cli(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(CLI + args, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)


def _tiny(**changes) -> dict:
    """examples/tiny.yaml cut to a flock-only job (no later stages), with ``changes`` applied."""
    d = yaml.safe_load(TINY.read_text())
    for stage in ("pesc", "recycle", "search"):
        d[stage]["enabled"] = False
    d.update(changes)
    return d


def _write(tmp_path: Path, d: dict | str, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(d if isinstance(d, str) else yaml.safe_dump(d), encoding="utf-8")
    return p


def _assert_user_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    assert r.stderr.startswith("loraflock: error: "), r.stderr[:500]
    for n in needles:
        assert n in r.stderr, (n, r.stderr[-2000:])


def _assert_nothing_written(out: Path) -> None:
    """A failed job leaves no report and no adapters (at most the job.json ownership marker)."""
    if not out.exists():
        return
    names = {p.name for p in out.iterdir()}
    assert not names & {"report.json", "report.md", "adapters", "prior", "pesc", "recycle", "search"}, names
    assert names <= {"job.json", "state.json", "ray"}, names


# ------------------------------------------------------------------ the job file itself
_BAD_SPECS = {
    "malformed": ("name: tiny\ntasks: [unclosed\n", ["malformed YAML at line", "job.yaml"]),
    "empty": ("   \n# only a comment\n", ["the job spec is empty", "examples/tiny.yaml"]),
    "unknown-field": (_tiny(trian={"steps": 3}), ["trian: unknown field", "loraflock schema"]),
    "nested-unknown": ({**_tiny(), "lora": {"rank": 4, "alhpa": 8}}, ["lora.alhpa: unknown field"]),
    "wrong-type": ({**_tiny(), "train": {"steps": "twelve"}}, ["train.steps", "integer"]),
    "wrong-type-list": ({**_tiny(), "lora": {"target_modules": "q_proj"}}, ["lora.target_modules", "list"]),
    "not-a-mapping": ("- tiny\n- job\n", ["must be a YAML mapping"]),
}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", sorted(_BAD_SPECS))
def test_bad_job_file_is_refused_before_anything_is_written(tmp_path, command, case):
    text, needles = _BAD_SPECS[case]
    job = _write(tmp_path, text)
    out = tmp_path / "out"
    r = _cli([command, str(job)] + (["--out", str(out)] if command == "run" else []))
    _assert_user_error(r, *needles)
    assert RAY_STARTED not in r.stdout
    assert not out.exists()  # the spec is checked before the output directory is claimed


@pytest.mark.parametrize("bad_name", ["a/b", "..", "../escape", "/abs"])
def test_task_name_that_is_a_path_is_refused(tmp_path, bad_name):
    d = _tiny()
    d["tasks"][0]["name"] = bad_name
    out = tmp_path / "out"
    r = _cli(["run", str(_write(tmp_path, d)), "--out", str(out)])
    _assert_user_error(r, "tasks.0.name", "no path separators")
    assert not out.exists() and not (tmp_path / "escape").exists()


def test_rank_larger_than_the_layer_fails_before_ray(tmp_path):
    d = _tiny()
    d["lora"]["rank"] = 65  # hidden size 64: no 64->64 projection has rank 65
    out = tmp_path / "out"
    r = _cli(["run", str(_write(tmp_path, d)), "--out", str(out)])
    _assert_user_error(r, "lora:", "rank 65 does not fit", "use a rank between 1 and")
    assert RAY_STARTED not in r.stdout and not out.exists()


def test_per_task_rank_larger_than_the_layer_fails_before_ray(tmp_path):
    d = _tiny()
    d["lora"]["ranks"] = {"http": 500}
    r = _cli(["run", str(_write(tmp_path, d)), "--out", str(tmp_path / "out")])
    _assert_user_error(r, "rank 500 does not fit")
    assert RAY_STARTED not in r.stdout


# ------------------------------------------------------------------ the output directory
def test_output_dir_of_another_job_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    marker = {"name": "someone-else", "fingerprint": "0123456789abcdef", "spec": {}}
    (out / "job.json").write_text(json.dumps(marker))
    (out / "report.json").write_text('{"theirs": true}')
    r = _cli(["run", str(_write(tmp_path, _tiny())), "--out", str(out)])
    _assert_user_error(r, "holds the results of another job", "'someone-else'", "choose a new --out")
    assert RAY_STARTED not in r.stdout
    assert json.loads((out / "job.json").read_text()) == marker
    assert json.loads((out / "report.json").read_text()) == {"theirs": True}
    assert sorted(p.name for p in out.iterdir()) == ["job.json", "report.json"]


def test_corrupt_job_marker_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "job.json").write_text("{not json")
    r = _cli(["run", str(_write(tmp_path, _tiny())), "--out", str(out)])
    _assert_user_error(r, "holds the results of another job")
    assert (out / "job.json").read_text() == "{not json"


def test_non_empty_foreign_directory_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = _cli(["run", str(_write(tmp_path, _tiny())), "--out", str(out)])
    _assert_user_error(r, "is not empty and was not written by loraflock")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_unreachable_address_writes_no_results(tmp_path):
    out = tmp_path / "out"
    r = _cli(["run", str(_write(tmp_path, _tiny())), "--out", str(out), "--address", "127.0.0.1:1"])
    _assert_user_error(r, "cannot reach a Ray cluster at 127.0.0.1:1", "leave --address out")
    _assert_nothing_written(out)


# ------------------------------------------------------------------ task data files
def _files_job(tmp_path: Path, path: Path, **source) -> Path:
    d = _tiny()
    d["tasks"][0] = {"name": "mine", "source": {"kind": "files", "path": str(path), **source},
                     "max_train_sequences": 4, "max_eval_sequences": 2}
    return _write(tmp_path, d)


def _bad_data(tmp_path: Path, case: str) -> tuple[Path, dict, list[str]]:
    f = tmp_path / "docs.jsonl"
    if case == "missing":
        return tmp_path / "nope.jsonl", {}, ["task 'mine'", "no file matches", "nope.jsonl"]
    if case == "empty":
        f.write_bytes(b"")
        return f, {}, ["task 'mine'", "docs.jsonl", "is empty"]
    if case == "no-text-column":
        f.write_text("".join(json.dumps({"body": f"document {i} " * 20}) + "\n" for i in range(8)))
        return f, {}, ["task 'mine'", "'text'"]
    if case == "not-utf8":
        f.write_bytes(b"".join(b'{"text": "caf\xe9 \xff\xfe document %d"}\n' % i for i in range(8)))
        return f, {}, ["task 'mine'", "UTF-8"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "empty", "no-text-column", "not-utf8"])
def test_bad_data_files_fail_with_a_clear_message(tmp_path, case):
    """Data is read after the local Ray starts (pipeline.run_job: init_ray, then _build_data),
    so each case costs a Ray start; it must still exit 2, name the file, and write nothing."""
    path, source, needles = _bad_data(tmp_path, case)
    out = tmp_path / "out"
    r = _cli(["run", str(_files_job(tmp_path, path, **source)), "--out", str(out)], timeout=180)
    _assert_user_error(r, *needles)
    _assert_nothing_written(out)
