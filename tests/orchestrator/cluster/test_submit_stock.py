"""Submitting to a stock Ray head: one whose Python has the dependencies but no loraflock at all.

The head runs this venv's Ray and Python, with loraflock taken away as completely as a plain
``pip install ray torch ...`` machine lacks it:

* ``PATH`` holds only a ``python`` shim (the venv's interpreter) and the system's
  ``/usr/bin:/bin``: no ``loraflock`` command, no venv ``bin/``;
* ``PYTHONPATH`` holds only a ``sitecustomize.py`` that removes the editable install's import
  hooks for loraflock (``__editable___loraflock_*_finder``), which the venv's ``.pth`` file
  installs at start-up (``site`` imports ``sitecustomize`` after the ``.pth`` files);
* the head's working directory and ``HOME`` are fresh temporary directories, so no checkout
  is on ``sys.path`` either.

A probe job proves it (``import orchestrator`` fails there; so does ``command -v loraflock``).
Then: the default submit (the code travels as ``py_modules``) SUCCEEDS and writes its report;
``ship_code=False`` fails with the missing-command message; a job whose ``python`` has no
site-packages fails with the missing-dependencies message. Installing the dependencies
(``pip_deps=True``) needs a package index, which the tests do not have: its runtime_env is
checked in ``test_client.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator.cluster.client import LoraflockClient
from tests.orchestrator.cluster.ray_head import ray_head

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
JOB_TIMEOUT_S = 240

HIDE_LORAFLOCK = '''"""Test head only: make this venv's Python behave as if loraflock were not installed."""
import sys

sys.meta_path[:] = [f for f in sys.meta_path if "__editable___loraflock" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable___loraflock" not in getattr(h, "__module__", "")]
'''


def _job(tmp: Path) -> Path:
    """examples/tiny.yaml with the flock alone (the code path is the point, not the stages)."""
    import yaml

    job = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    job["flock"]["baselines"] = []
    for stage in ("pesc", "recycle", "search"):
        job[stage]["enabled"] = False
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture(scope="module")
def stock_head():
    """A Ray head (no token) on free ports whose processes cannot find loraflock; yields (URL, tmp)."""
    tmp = Path(tempfile.mkdtemp(prefix="lfstk", dir="/tmp"))  # short: Ray's unix sockets need it
    for d in ("home", "shim", "hide", "cwd"):
        (tmp / d).mkdir()
    shim = tmp / "shim" / "python"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    shim.chmod(0o755)
    (tmp / "hide" / "sitecustomize.py").write_text(HIDE_LORAFLOCK)
    keep = ("LANG", "LC_ALL", "TMPDIR", "TZ")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update({
        "HOME": str(tmp / "home"), "PATH": f"{tmp / 'shim'}:/usr/bin:/bin", "PYTHONPATH": str(tmp / "hide"),
        "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
    })
    try:
        with ray_head(tmp, env, tmp / "cwd", what="stock head") as url:
            yield url, tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def no_token(stock_head, monkeypatch):
    """The head runs without token auth: the clients send none (no ~/.ray/auth_token of this machine)."""
    monkeypatch.setenv("HOME", str(stock_head[1] / "home"))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)


def test_the_head_has_no_loraflock(stock_head, no_token):
    url, _ = stock_head
    client = LoraflockClient(url)
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(url)
    probe = jobs.submit_job(entrypoint="python -c 'import torch, ray; import orchestrator'")
    cli = jobs.submit_job(entrypoint="command -v loraflock")
    assert client.wait(probe, timeout=120, poll_s=1) == "FAILED"
    assert "No module named 'orchestrator'" in jobs.get_job_logs(probe)  # torch and ray import; loraflock does not
    assert client.wait(cli, timeout=60, poll_s=1) == "FAILED"


def test_submit_ships_the_code_to_a_stock_head(stock_head, no_token):
    url, tmp = stock_head
    client = LoraflockClient(url)
    job = _job(tmp)
    out = tmp / "out" / "tiny"
    t0 = time.monotonic()
    job_id = client.submit(job, out=str(out))
    final = client.wait(job_id, timeout=JOB_TIMEOUT_S, poll_s=2)
    assert final == "SUCCEEDED", client.logs(job_id)[-4000:]
    print(f"\n[timing] shipped-code job on the stock head {time.monotonic() - t0:.1f} s")
    report = json.loads((out / "report.json").read_text())
    assert set(report["flock"]["tasks"]) == {"json", "http", "email"} and report["flock"]["macro_ppl"] > 0

    # the image's loraflock asked for where there is none: the job fails at once, saying what to do
    no_cli = client.submit(job, out=str(tmp / "out" / "no-cli"), ship_code=False)
    assert client.wait(no_cli, timeout=60, poll_s=1) == "FAILED"
    assert "the cluster has no loraflock command" in client.logs(no_cli)
    # a cluster Python without the dependencies: the check names them and the fixes, no traceback
    bare = tmp / "bare"
    bare.mkdir()
    (bare / "python").write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')  # -S: no site-packages
    (bare / "python").chmod(0o755)
    no_deps = client.submit(job, out=str(tmp / "out" / "no-deps"),
                            runtime_env={"env_vars": {"PATH": f"{bare}:/usr/bin:/bin"}})
    assert client.wait(no_deps, timeout=60, poll_s=1) == "FAILED"
    logs = client.logs(no_deps)
    assert "cannot import" in logs and "torch" in logs and "--pip-deps" in logs and "Traceback" not in logs
    assert not (tmp / "out" / "no-deps").exists()
