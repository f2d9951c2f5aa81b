"""CLI commands for cluster jobs: ``submit``, ``status``, ``logs``, ``stop``, ``list``, ``deploy``.

They only parse arguments and call :class:`orchestrator.cluster.client.LoraflockClient` (or
:mod:`orchestrator.cluster.kuberay`); ``orchestrator.cli`` mounts them with
:func:`add_submit_commands`. Each command returns its exit code.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_submit_commands", "DEFAULT_ADDRESS"]

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def _client(a: argparse.Namespace):
    from orchestrator.cluster.client import LoraflockClient

    return LoraflockClient(a.address, token=a.token)


def _cmd_submit(a: argparse.Namespace) -> int:
    from orchestrator.spec import load_job

    spec = load_job(a.job)  # validated here, before any connection
    out = a.out or f"/tmp/loraflock-runs/{spec.name}"
    client = _client(a)
    job_id = client.submit(spec, out, working_dir=a.working_dir, ship_code=a.ship_code, pip_deps=a.pip_deps)
    print(job_id, flush=True)
    if not a.wait:
        print(f"follow it: loraflock logs {job_id} --follow --address {client.address}", file=sys.stderr)
        return 0
    for chunk in client.tail(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    status = client.wait(job_id)
    print(f"job {job_id}: {status} (outputs in {out})", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _cmd_status(a: argparse.Namespace) -> int:
    info = _client(a).info(a.job_id)
    print(f"{info['status']}\t{info['message'] or ''}".rstrip())
    return 0


def _cmd_logs(a: argparse.Namespace) -> int:
    client = _client(a)
    if a.follow:
        for chunk in client.tail(a.job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    else:
        sys.stdout.write(client.logs(a.job_id))
    return 0


def _cmd_stop(a: argparse.Namespace) -> int:
    stopped = _client(a).stop(a.job_id)
    print(f"{a.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def _cmd_list(a: argparse.Namespace) -> int:
    for job in _client(a).list():
        out = job["metadata"].get("loraflock_out", "")
        print(f"{job['job_id']}\t{job['status']}\t{out}".rstrip())
    return 0


def _cmd_deploy_kuberay(a: argparse.Namespace) -> int:
    from orchestrator.cluster.kuberay import render_rayjob
    from orchestrator.spec import load_job

    sys.stdout.write(render_rayjob(load_job(a.job), image=a.image, out=a.out, max_workers=a.max_workers))
    return 0


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS,
        help=f"Ray dashboard URL (Jobs API); default $RAY_ADDRESS or {DEFAULT_ADDRESS}",
    )
    p.add_argument(
        "--token",
        help="Ray auth token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); "
        "prefer the env var: arguments are visible in `ps`",
    )


def add_submit_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the cluster-job commands to ``loraflock``'s sub-command parsers."""
    from orchestrator.cluster.kuberay import DEFAULT_IMAGE

    s = subparsers.add_parser("submit", help="validate a job locally, then submit it to a Ray cluster")
    s.add_argument("job", help="job YAML file")
    s.add_argument(
        "--out", help="output directory on the cluster: a shared path or URI (default /tmp/loraflock-runs/<name>)"
    )
    s.add_argument("--wait", action="store_true", help="stream the logs; exit 0 only if the job SUCCEEDED")
    s.add_argument("--working-dir", help="ship this local directory as the job's code (default: loraflock's packages)")
    s.add_argument(
        "--no-ship-code", dest="ship_code", action="store_false",
        help="run the loraflock installed in the cluster's image instead of sending this install's code with the job",
    )
    s.add_argument(
        "--pip-deps", action="store_true",
        help="have Ray pip-install loraflock's dependencies (not Ray) for the job: for a cluster whose Python lacks "
        "torch, transformers, ... and that reaches a package index",
    )
    _cluster_args(s)
    s.set_defaults(func=_cmd_submit)

    st = subparsers.add_parser("status", help="status of a submitted job")
    st.add_argument("job_id")
    _cluster_args(st)
    st.set_defaults(func=_cmd_status)

    lg = subparsers.add_parser("logs", help="logs of a submitted job")
    lg.add_argument("job_id")
    lg.add_argument("--follow", "-f", action="store_true", help="keep streaming until the job ends")
    _cluster_args(lg)
    lg.set_defaults(func=_cmd_logs)

    sp = subparsers.add_parser("stop", help="stop a submitted job")
    sp.add_argument("job_id")
    _cluster_args(sp)
    sp.set_defaults(func=_cmd_stop)

    ls = subparsers.add_parser("list", help="jobs on the cluster")
    _cluster_args(ls)
    ls.set_defaults(func=_cmd_list)

    dp = subparsers.add_parser("deploy", help="print cluster manifests for a job")
    targets = dp.add_subparsers(dest="target", required=True, metavar="TARGET")
    kr = targets.add_parser("kuberay", help="a KubeRay RayJob (+ ConfigMap) for kubectl apply -f -")
    kr.add_argument("job", help="job YAML file")
    kr.add_argument(
        "--image", default=DEFAULT_IMAGE, help=f"image built from deploy/Dockerfile (default {DEFAULT_IMAGE})"
    )
    kr.add_argument("--out", help="output directory in the pods (default /outputs/<job name>, on the PVC)")
    kr.add_argument("--max-workers", type=int, help="autoscaling ceiling (default ray.num_workers of the job)")
    kr.set_defaults(func=_cmd_deploy_kuberay)
