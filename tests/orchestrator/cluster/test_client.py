"""SDK and CLI unit tests with no cluster: token resolution, local validation, fast failures."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.cluster.client import (
    JOB_YAML_ENV,
    TOKEN_HELP,
    ClusterError,
    LoraflockClient,
    build_entrypoint,
    read_report,
    resolve_token,
)
from orchestrator.errors import LoraflockError, SpecError
from orchestrator.spec import load_job

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "examples" / "tiny.yaml"


@pytest.fixture
def no_ray_token(monkeypatch, tmp_path):
    """Isolate token sources: no env vars, an empty home."""
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- token resolution
def test_token_precedence_argument_env_path_default(no_ray_token, monkeypatch):
    home = no_ray_token / "home"
    assert resolve_token() is None
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-default\n")
    assert resolve_token() == "from-default"
    path_file = no_ray_token / "tok"
    path_file.write_text("  from-path \n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path_file))
    assert resolve_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert resolve_token() == "from-env"
    assert resolve_token("from-arg") == "from-arg"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "   ")  # empty values fall through
    assert resolve_token() == "from-path"


def test_unreadable_token_path_is_an_error_not_a_fallthrough(no_ray_token, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(no_ray_token / "missing"))
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN_PATH"):
        resolve_token()
    assert issubclass(ClusterError, LoraflockError)  # the CLI prints it without a traceback


def test_token_never_in_repr_logs_or_errors(no_ray_token, caplog):
    secret = "s3cr3t-token-value-123"
    caplog.set_level(logging.DEBUG)
    client = LoraflockClient(f"http://127.0.0.1:{_free_port()}", token=secret)
    assert secret not in repr(client) and "token=set" in repr(client)
    with pytest.raises(ClusterError) as err:
        client.status("some-job")
    assert secret not in str(err.value)
    assert secret not in caplog.text
    assert client._headers() == {"Authorization": f"Bearer {secret}"}  # what Ray's middleware reads


# ---------------------------------------------------------------- submission
def test_bad_spec_fails_before_anything_is_sent(no_ray_token, monkeypatch, tmp_path):
    import requests

    def no_network(*a, **k):
        raise AssertionError("a request was sent for an invalid spec")

    monkeypatch.setattr(requests, "request", no_network)
    monkeypatch.setattr(requests, "get", no_network)
    client = LoraflockClient("http://127.0.0.1:8265")
    bad = yaml.safe_load(TINY.read_text())
    bad["lora"]["rnak"] = 4
    with pytest.raises(SpecError, match="lora.rnak"):
        client.submit(bad, out="/tmp/x")
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="malformed YAML"):
        client.submit(bad_file, out="/tmp/x")
    with pytest.raises(SpecError, match="no such job file"):
        client.submit(tmp_path / "missing.yaml", out="/tmp/x")
    assert client._jobs_client is None


def _recording_client(address: str, **kw) -> tuple[LoraflockClient, dict]:
    """A client whose Jobs API records what ``submit`` would send (the submission id comes back)."""
    sent: dict = {}

    class RecordingJobs:
        def submit_job(self, **kwargs):
            sent.update(kwargs)
            return kwargs["submission_id"]

    client = LoraflockClient(address, **kw)
    client._jobs_client = RecordingJobs()
    return client, sent


def test_submit_sends_validated_spec_inlined_and_entrypoint(no_ray_token, monkeypatch, tmp_path):
    """The inlined spec re-validates to the same JobSpec; the entrypoint writes and runs it."""
    client, sent = _recording_client("http://127.0.0.1:8265", token="t")
    job_id = client.submit(str(TINY), out="/shared/out dir", runtime_env={"env_vars": {"X": "1"}})
    assert job_id.startswith("loraflock-tiny-")
    env = sent["runtime_env"]["env_vars"]
    assert env["X"] == "1"
    assert load_job(TINY) == load_job(_write(tmp_path / "j.yaml", env[JOB_YAML_ENV]))
    assert sent["metadata"] == {"loraflock_job": "tiny", "loraflock_out": "/shared/out dir"}
    assert "working_dir" not in sent["runtime_env"]
    remote = load_job(TINY)
    remote.ray.address = "ray://laptop:10001"  # meaningless on the cluster: the driver uses its own Ray
    client.submit(remote, out="o")
    assert yaml.safe_load(sent["runtime_env"]["env_vars"][JOB_YAML_ENV])["ray"]["address"] is None
    client.submit(str(TINY), out="/shared/out dir", ship_code=False)
    assert sent["entrypoint"] == build_entrypoint("/shared/out dir", shipped_code=False)
    assert "py_modules" not in sent["runtime_env"]

    # the entrypoint really materialises the spec: run it with a stand-in `loraflock`
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "loraflock"
    fake.write_text('#!/bin/sh\nprintf "%s|" "$@" > "$ARGS_OUT"; cp "$2" "$SPEC_OUT"\n')
    fake.chmod(0o755)
    shell_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", JOB_YAML_ENV: env[JOB_YAML_ENV],
                 "ARGS_OUT": str(tmp_path / "args"), "SPEC_OUT": str(tmp_path / "spec.yaml")}
    subprocess.run(["/bin/sh", "-c", sent["entrypoint"]], env=shell_env, check=True)
    args = (tmp_path / "args").read_text().split("|")
    assert args[0] == "run" and args[2:4] == ["--out", "/shared/out dir"]
    assert load_job(tmp_path / "spec.yaml") == load_job(TINY)


def test_submit_ships_working_dir_and_pip(no_ray_token, tmp_path):
    client, sent = _recording_client("127.0.0.1:8265")
    assert client.address == "http://127.0.0.1:8265"
    client.submit(load_job(TINY), out="o", working_dir=ROOT, pip=["loraflock==0.1.0"])
    assert sent["runtime_env"]["working_dir"] == str(ROOT)
    assert sent["runtime_env"]["pip"] == ["loraflock==0.1.0"]
    assert sent["entrypoint"].endswith("python -m orchestrator.cli run \"$job_file\" --out o")
    assert "py_modules" not in sent["runtime_env"]  # the working_dir carries the code
    with pytest.raises(ClusterError, match="not a directory"):
        client.submit(load_job(TINY), out="o", working_dir=tmp_path / "nope")


def test_submit_ships_loraflocks_packages_by_default_and_its_deps_on_request(no_ray_token, tmp_path):
    """A stock Ray cluster gets the code (py_modules of this install's packages) and, with pip_deps,
    pyproject's dependencies without Ray; the entrypoint checks the dependencies first."""
    import tomllib

    from orchestrator.cluster.runtime_env import CODE_PACKAGES, IMPORT_NAMES, MISSING_DEPS_EXIT

    client, sent = _recording_client("127.0.0.1:8265")
    client.submit(load_job(TINY), out="o", runtime_env={"py_modules": ["s3://b/extra.zip"]})
    env = sent["runtime_env"]
    import orchestrator

    here = Path(orchestrator.__file__).resolve().parents[1]
    assert env["py_modules"] == ["s3://b/extra.zip", *(str(here / n) for n in CODE_PACKAGES)]
    assert all((Path(m) / "__init__.py").is_file() for m in env["py_modules"][1:])
    assert "__pycache__" in env["excludes"] and "pip" not in env
    assert "python -m orchestrator.cli run" in sent["entrypoint"]
    client.submit(load_job(TINY), out="o", pip_deps=True, pip=["extra-pkg"])
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = lambda reqs: {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in reqs}  # noqa: E731
    assert names(sent["runtime_env"]["pip"]) == (names(declared) - {"ray"}) | {"extra-pkg"}
    assert set(IMPORT_NAMES) == names(declared) - {"ray"}  # the check knows every dependency

    # the check runs before anything else: a Python without the dependencies stops with the fix
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')  # -S: no site-packages
    (bin_dir / "python").chmod(0o755)
    r = subprocess.run(["/bin/sh", "-c", sent["entrypoint"]], env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
                       capture_output=True, text=True)
    assert r.returncode == MISSING_DEPS_EXIT and "cannot import" in r.stderr and "torch" in r.stderr
    assert "--pip-deps" in r.stderr and "Traceback" not in r.stderr
    # the image's `loraflock` (ship_code=False) missing: exit 127 with the fix, before the spec is read
    client.submit(load_job(TINY), out="o", ship_code=False)
    r = subprocess.run(["/bin/sh", "-c", sent["entrypoint"]], env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
                       capture_output=True, text=True)
    assert r.returncode == 127 and "no loraflock command" in r.stderr and "--no-ship-code" in r.stderr


def test_unreachable_address_fails_fast(no_ray_token):
    for address in (f"http://127.0.0.1:{_free_port()}", "http://10.255.255.1:8265"):
        client = LoraflockClient(address)
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match="cannot reach the Ray Jobs API|is not a Ray Jobs API"):
            client.list()  # (a sandbox proxy may answer for the unroutable address)
        assert time.monotonic() - t0 < 10.0


def test_bad_address_scheme():
    with pytest.raises(ClusterError, match="dashboard URL"):
        LoraflockClient("ray://head:10001")


def test_http_errors_become_clear_messages(no_ray_token):
    from ray.exceptions import AuthenticationError

    client = LoraflockClient("http://127.0.0.1:8265")

    def unauthorized(*a, **k):
        raise AuthenticationError("Authentication required: Unauthorized")

    def not_found(*a, **k):
        raise RuntimeError("Request failed with status code 404: Job nope does not exist.")

    with pytest.raises(ClusterError, match=TOKEN_HELP):
        client._call(unauthorized)
    with pytest.raises(ClusterError, match="no job 'nope'.*loraflock list"):
        client._call(not_found, job_id="nope")


# ---------------------------------------------------------------- results
def test_read_report_local_and_uri(tmp_path):
    report = {"flock": {"macro_ppl": 12.5}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert read_report(tmp_path) == report
    assert read_report(f"file://{tmp_path}") == report
    with pytest.raises(ClusterError, match="no report.json"):
        read_report(tmp_path / "empty")


def test_result_by_job_id_uses_the_out_in_metadata(no_ray_token, tmp_path, monkeypatch):
    (tmp_path / "report.json").write_text('{"ok": 1}')
    client = LoraflockClient("http://127.0.0.1:8265")
    monkeypatch.setattr(client, "info", lambda jid: {"metadata": {"loraflock_out": str(tmp_path)}})
    assert client.result("loraflock-tiny-abcd1234") == {"ok": 1}
    assert client.result(str(tmp_path)) == {"ok": 1}


# ---------------------------------------------------------------- CLI
def test_cli_parses_and_reports_user_errors(no_ray_token, capsys, monkeypatch):
    from orchestrator.cli.app import build_parser, main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    a = build_parser().parse_args(["submit", str(TINY), "--wait", "--working-dir", "."])
    assert a.address == "http://127.0.0.1:8265" and a.wait and a.working_dir == "."
    assert a.ship_code and not a.pip_deps  # the code travels by default; the dependencies only on request
    a = build_parser().parse_args(["submit", str(TINY), "--no-ship-code", "--pip-deps"])
    assert not a.ship_code and a.pip_deps
    a = build_parser().parse_args(["logs", "jid", "-f", "--address", "http://h:8265"])
    assert a.follow and a.address == "http://h:8265"
    port = _free_port()
    assert main(["status", "jid", "--address", f"http://127.0.0.1:{port}"]) == 2
    assert "cannot reach the Ray Jobs API" in capsys.readouterr().err
    assert main(["deploy", "kuberay", str(TINY), "--image", "reg/lf:1"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert (
        docs[1]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "reg/lf:1"
    )


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
