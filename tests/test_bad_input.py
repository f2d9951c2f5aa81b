"""Bad input through the real CLI: a clear message naming the field or file and the fix,
exit status 2, no traceback, and nothing half-written (no report.json, no adapters).

Complements tests/orchestrator/test_spec.py (spec errors through ``load_job``/``parse_job``)
and tests/orchestrator/test_pipeline.py (bad target modules, an unreachable ``--address``, a
foreign output directory after a finished run): here every case goes through a subprocess of
``python -m orchestrator.cli`` as a user would run it; a module fixture runs them all once
(85-105 s on a shared 2-core CPU, most of it each process's interpreter and torch start-up).

Every case fails before Ray starts: ``pipeline.run_job`` builds the tasks' data (and checks
the output directory) before ``init_ray``. Data-file errors (missing, empty, no text column,
not UTF-8) exit 2 with the file named and leave only the ``job.json`` ownership marker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"
CLI = [sys.executable, "-m", "orchestrator.cli"]
RAY_STARTED = "starting an embedded local Ray"

pytestmark = pytest.mark.integration  # every case is a CLI subprocess (the module fixture runs them all)


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
    assert "loraflock: error: " in r.stderr, r.stderr[-2000:]
    for n in needles:
        assert n in r.stderr, (n, r.stderr[-2000:])


def _assert_nothing_written(out: Path) -> None:
    """A failed job leaves no report and no adapters (at most the job.json ownership marker)."""
    if not out.exists():
        return
    names = {p.name for p in out.iterdir()}
    assert not names & {"report.json", "report.md", "adapters", "prior", "pesc", "recycle", "search"}, names
    assert names <= {"job.json"}, names


# ------------------------------------------------------------------ the cases
@dataclass
class Case:
    """One CLI call: its arguments, its output directory and what stderr must say."""

    args: list[str]
    out: Path | None
    needles: tuple[str, ...]
    before_ray: bool = True  # must fail before the embedded Ray starts
    check: Callable[[Path], None] | None = None  # extra checks on the case's directory


_BAD_SPECS = {
    "malformed": ("name: tiny\ntasks: [unclosed\n", ("malformed YAML at line", "job.yaml")),
    "empty": ("   \n# only a comment\n", ("the job spec is empty", "examples/tiny.yaml")),
    "unknown-field": (_tiny(trian={"steps": 3}), ("trian: unknown field", "loraflock schema")),
    "wrong-type": ({**_tiny(), "train": {"steps": "twelve"}}, ("train.steps", "integer")),
}


def _foreign_marker_dir(d: Path) -> Path:
    out = d / "out"
    out.mkdir()
    (out / "job.json").write_text(json.dumps({"name": "someone-else", "fingerprint": "0123456789abcdef", "spec": {}}))
    (out / "report.json").write_text('{"theirs": true}')
    return out


def _check_foreign_untouched(d: Path) -> None:
    out = d / "out"
    assert json.loads((out / "job.json").read_text())["fingerprint"] == "0123456789abcdef"
    assert json.loads((out / "report.json").read_text()) == {"theirs": True}
    assert sorted(p.name for p in out.iterdir()) == ["job.json", "report.json"]


def _files_job(d: Path, path: Path) -> Path:
    job = _tiny()
    job["tasks"][0] = {"name": "mine", "source": {"kind": "files", "path": str(path)},
                       "max_train_sequences": 4, "max_eval_sequences": 2}
    return _write(d, job)


def _data_case(d: Path, kind: str) -> Case:
    f = d / "docs.jsonl"
    if kind == "missing":
        f, needles = d / "nope.jsonl", ("task 'mine'", "nope.jsonl", "does not exist", "fix source.path")
    elif kind == "empty":
        f.write_bytes(b"")
        needles = ("task 'mine'", "docs.jsonl", "is empty")
    elif kind == "no-text-column":
        f.write_text("".join(json.dumps({"body": f"document {i} " * 20}) + "\n" for i in range(8)))
        needles = ("task 'mine'", "docs.jsonl", "has no column 'text'", "['body']", "source.text_field")
    else:  # not UTF-8 (latin-1 bytes)
        f.write_bytes(b"".join(b'{"text": "caf\xe9 \xff document %d"}\n' % i for i in range(8)))
        needles = ("task 'mine'", "docs.jsonl", "not UTF-8")
    # Data is read before the local Ray starts (pipeline.run_job: build_job_data, then init_ray).
    return Case(["run", str(_files_job(d, f)), "--out", str(d / "out")], d / "out", needles)


def _build_cases(d: Path) -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for name, (text, needles) in _BAD_SPECS.items():
        for cmd in ("validate", "run"):
            cd = d / f"spec-{name}-{cmd}"
            cd.mkdir()
            job = _write(cd, text)
            args = [cmd, str(job)] + (["--out", str(cd / "out")] if cmd == "run" else [])
            cases[f"spec-{name}-{cmd}"] = Case(args, cd / "out", needles)
    for label, bad in (("slash", "a/b"), ("dotdot", "../escape")):
        cd = d / f"name-{label}"
        cd.mkdir()
        job = _tiny()
        job["tasks"][0]["name"] = bad
        cases[f"task-name-{label}"] = Case(["run", str(_write(cd, job)), "--out", str(cd / "out")], cd / "out",
                                         ("tasks.0.name", "no path separators"))
    cd = d / "rank"
    cd.mkdir()
    job = _tiny()
    job["lora"]["ranks"] = {"http": 65}  # hidden size 64: no 64->64 projection has rank 65
    cases["rank-too-large"] = Case(["run", str(_write(cd, job)), "--out", str(cd / "out")], cd / "out",
                                   ("lora:", "rank 65 does not fit", "use a rank between 1 and 64"))
    cd = d / "prefix-budget"
    cd.mkdir()
    job = _tiny()
    job["flock"]["prefix_cache"] = {"budget_gb": 0.0001}  # one batch: 8 rows x 64 tokens x 64 x 4 bytes = 0.000122
    cases["prefix-budget"] = Case(["run", str(_write(cd, job)), "--out", str(cd / "out")], cd / "out",
                                  ("flock.prefix_cache.budget_gb", "set budget_gb to at least 0.000122"))
    cd = d / "foreign"
    cd.mkdir()
    cases["out-of-another-job"] = Case(
        ["run", str(_write(cd, _tiny())), "--out", str(_foreign_marker_dir(cd))], None,
        ("holds the results of another job", "'someone-else'", "choose a new --out"), check=_check_foreign_untouched)
    cd = d / "corrupt"
    (cd / "out").mkdir(parents=True)
    (cd / "out" / "job.json").write_text("{not json")
    cases["out-corrupt-marker"] = Case(
        ["run", str(_write(cd, _tiny())), "--out", str(cd / "out")], None, ("holds the results of another job",),
        check=lambda c: assert_equal((c / "out" / "job.json").read_text(), "{not json"))
    cd = d / "notours"
    (cd / "out").mkdir(parents=True)
    (cd / "out" / "notes.txt").write_text("mine")
    cases["out-not-ours"] = Case(
        ["run", str(_write(cd, _tiny())), "--out", str(cd / "out")], None,
        ("is not empty and was not written by loraflock",),
        check=lambda c: assert_equal(sorted(p.name for p in (c / "out").iterdir()), ["notes.txt"]))
    for kind in ("missing", "empty", "no-text-column", "not-utf8"):
        cd = d / f"data-{kind}"
        cd.mkdir()
        cases[f"data-{kind}"] = _data_case(cd, kind)
    return cases


def assert_equal(a, b) -> None:
    assert a == b, (a, b)


CASE_IDS = sorted([
    *(f"spec-{n}-{c}" for n in _BAD_SPECS for c in ("validate", "run")),
    "task-name-slash", "task-name-dotdot", "rank-too-large", "prefix-budget", "out-of-another-job",
    "out-corrupt-marker", "out-not-ours", "data-missing", "data-empty", "data-no-text-column", "data-not-utf8",
])


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> dict[str, tuple[Case, subprocess.CompletedProcess]]:
    """Every case, one CLI process after another (on a shared 2-core machine running them in
    parallel was slower: 136 s against 83 s, the local Ray starts thrash)."""
    cases = _build_cases(tmp_path_factory.mktemp("bad"))
    assert sorted(cases) == CASE_IDS
    return {k: (c, _cli(c.args, timeout=240)) for k, c in cases.items()}


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(ran, case_id):
    case, r = ran[case_id]
    _assert_user_error(r, *case.needles)
    if case.before_ray:
        assert RAY_STARTED not in r.stdout, r.stdout[-2000:]
    if case.out is not None:
        _assert_nothing_written(case.out)
        if case.before_ray and case_id.startswith(("spec-", "task-name-", "rank-", "prefix-")):
            assert not case.out.exists()  # refused before the output directory is claimed
    if case.check is not None:
        case.check(Path(case.args[case.args.index("--out") + 1]).parent)
    if case_id == "task-name-dotdot":
        assert not (case.out.parent / "escape").exists()
