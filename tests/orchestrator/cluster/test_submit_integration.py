"""End to end against a real local Ray head with token auth: SDK submit, Ray's CLI, wrong token.

The head runs in its own process group with its own temp dir, HOME and ports, and is torn
down by killing its whole process tree by pid (never ``ray stop``: other Ray instances may
share the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator.cluster.client import TOKEN_HELP, ClusterError, LoraflockClient
from tests.orchestrator.cluster.ray_head import ray_head as start_head

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "examples" / "tiny.yaml"
BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 240

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_head():
    """A token-auth Ray head on free ports; yields (dashboard URL, token, env for clients)."""
    token = secrets.token_hex(16)
    tmp = Path(tempfile.mkdtemp(prefix="lfray", dir="/tmp"))  # short: Ray's unix sockets need it
    (tmp / "home").mkdir()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "HOME": str(tmp / "home"),  # ray may write ~/.ray/auth_token: keep it out of the real home
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `loraflock` for the entrypoint
        "OMP_NUM_THREADS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    try:
        with start_head(tmp, env, tmp, headers={"Authorization": f"Bearer {token}"}) as url:
            yield url, token, {**env, "RAY_ADDRESS": url}, tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_sdk_submit_wait_result_then_ray_cli(ray_head, capsys):
    url, token, client_env, tmp = ray_head
    client = LoraflockClient(url, token=token)
    out = str(tmp / "out" / "tiny")
    t0 = time.monotonic()
    job_id = client.submit(TINY, out=out)
    assert job_id in {j["job_id"] for j in client.list()}
    final = client.wait(job_id, timeout=JOB_TIMEOUT_S, poll_s=2)
    logs = client.logs(job_id)
    assert final == "SUCCEEDED", f"job {final}; last log lines:\n{logs[-4000:]}"
    t_sdk = time.monotonic() - t0
    report = client.result(job_id)
    assert report == client.result(out)
    assert set(report["flock"]["tasks"]) == {"json", "http", "email"}
    assert report["flock"]["macro_ppl"] > 0
    # the async log tail (as a sync generator) replays a finished job's log and ends
    assert "".join(client.tail(job_id)) == logs
    from orchestrator.cli import main

    assert main(["status", job_id, "--address", url, "--token", token]) == 0
    assert capsys.readouterr().out.startswith("SUCCEEDED")

    # Ray's own CLI runs our entrypoint too (same --out: the finished job resumes and exits)
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--no-wait", "--submission-id", f"{job_id}-cli", "--address", url,
         "--", "loraflock", "run", str(TINY), "--out", out],
        env=client_env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert token not in proc.stdout + proc.stderr
    final = client.wait(f"{job_id}-cli", timeout=JOB_TIMEOUT_S, poll_s=1)
    logs = client.logs(f"{job_id}-cli")
    assert final == "SUCCEEDED", logs[-4000:]
    assert f"loraflock run {TINY} --out {out}" in logs and "already finished" in logs
    print(f"\n[timing] sdk job {t_sdk:.1f} s, ray-cli resumed job {time.monotonic() - t0:.1f} s")

    # `loraflock submit --wait` streams the job's logs and exits 0 only on SUCCEEDED
    (Path(out) / "report.json").unlink()
    assert main(["submit", str(TINY), "--address", url, "--token", token, "--out", out, "--wait"]) == 0
    printed = capsys.readouterr().out
    assert "already finished" in printed and token not in printed
    assert json.loads((Path(out) / "report.json").read_text())["flock"]["macro_ppl"] > 0


def test_wrong_token_and_unknown_job(ray_head):
    url, token, _, _ = ray_head
    with pytest.raises(ClusterError, match=TOKEN_HELP):
        LoraflockClient(url, token="not-" + token).list()
    with pytest.raises(ClusterError, match="no job 'no-such-job'"):
        LoraflockClient(url, token=token).status("no-such-job")
