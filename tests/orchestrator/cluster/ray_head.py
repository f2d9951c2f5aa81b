"""A real Ray head for the submission tests: started on free ports, torn down by its process tree.

The head runs in its own process group with its own temp dir and ports, and is stopped by
killing that tree by pid (never ``ray stop``: other Ray instances may share the machine).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

BIN = Path(sys.executable).parent
UP_TIMEOUT_S = 90


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = root.children(recursive=True) + [root]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=15)


@contextmanager
def ray_head(tmp: Path, env: dict[str, str], cwd: Path, headers: dict[str, str] | None = None,
             what: str = "head") -> Iterator[str]:
    """``ray start --head`` with ``env`` in ``cwd`` (2 CPUs, temp dir under ``tmp``); yields the dashboard URL.

    ``tmp`` must be a short path: Ray's unix sockets live under it. The head's log is
    ``tmp/head.log``, quoted when it fails to come up.
    """
    gcs, dash, node_mgr, obj_mgr, client_srv, agent_http, agent_grpc, metrics, rt_env = free_ports(9)
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
        f"--temp-dir={tmp / 'ray'}", f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        f"--ray-client-server-port={client_srv}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rt_env}", "--disable-usage-stats",
    ]
    log = open(tmp / "head.log", "wb")
    head = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        import requests

        t0 = time.monotonic()
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray head exited early:\n{(tmp / 'head.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/api/version", timeout=2, headers=headers or {}).ok:
                    break
            except requests.exceptions.RequestException:
                pass
            if time.monotonic() - t0 > UP_TIMEOUT_S:
                pytest.fail(f"dashboard not up after {UP_TIMEOUT_S} s:\n{(tmp / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        print(f"\n[timing] {what} up in {time.monotonic() - t0:.1f} s")
        yield url
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)  # the group first, then strays that left it
        except ProcessLookupError:
            pass
        kill_tree(head.pid)
        head.wait(timeout=15)
        log.close()
