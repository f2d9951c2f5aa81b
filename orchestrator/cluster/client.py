"""The loraflock SDK: submit jobs to any Ray cluster over Ray's Jobs API and read their results.

Everything goes through :class:`ray.job_submission.JobSubmissionClient` (no hand-written HTTP
to the Jobs API); this module adds what a loraflock user needs on top of it:

- the job spec is validated locally, before anything is sent, so a typo fails in
  milliseconds on the laptop and not minutes later on the cluster;
- the spec travels *inside* the submission (as the env var ``LORAFLOCK_JOB_YAML`` of the job's
  runtime_env), so no shared filesystem is needed for it; the entrypoint writes it to a temp
  file and runs ``loraflock run <file> --out <out>``;
- the code travels with the job by default (runtime_env ``py_modules``: this process's own
  ``orchestrator``, ``models``, ``tasks`` and ``tune_spaces``), so a stock Ray cluster of the same
  Ray version runs it without loraflock installed; ``working_dir=`` ships a whole tree instead,
  and ``ship_code=False`` runs the ``loraflock`` installed in the cluster's image. The
  dependencies are checked on the cluster before anything runs, and installed per job only
  with ``pip_deps=True`` (:mod:`orchestrator.cluster.runtime_env`);
- token auth (Ray >= 2.52): the token comes from the argument, else Ray's own sources
  (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``) and is sent as
  ``Authorization: Bearer <token>``; it never appears in a repr, log line or error message;
- an unreachable address fails within seconds (a short probe runs before Ray's client,
  whose own requests have no timeout), and Ray's HTTP errors become :class:`ClusterError`
  messages that say what to do.

Example:
    >>> from orchestrator.cluster.client import LoraflockClient
    >>> client = LoraflockClient("http://127.0.0.1:8265")            # doctest: +SKIP
    >>> job_id = client.submit("examples/tiny.yaml", out="/tmp/tiny") # doctest: +SKIP
    >>> client.wait(job_id, timeout=600)                              # doctest: +SKIP
    'SUCCEEDED'
    >>> client.result(job_id)["flock"]["macro_ppl"]                   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from orchestrator.errors import LoraflockError
from orchestrator.spec import JobSpec, load_job, parse_job

__all__ = [
    "ClusterError",
    "JobWaitTimeout",
    "LoraflockClient",
    "TERMINAL_STATUSES",
    "build_entrypoint",
    "read_report",
    "resolve_token",
]

JOB_YAML_ENV = "LORAFLOCK_JOB_YAML"
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
TOKEN_HELP = "token missing or wrong: set RAY_AUTH_TOKEN or pass --token"
PROBE_TIMEOUT_S = (3.0, 5.0)  # (connect, read) seconds for the reachability probe


class ClusterError(LoraflockError):
    """The cluster cannot be reached, refuses our token, or does not know the job."""


class JobWaitTimeout(ClusterError):
    """``wait`` ran out of time; the job itself keeps running on the cluster."""


def resolve_token(token: str | None = None) -> str | None:
    """The Ray auth token to send, or ``None`` for a cluster without token auth.

    Precedence (Ray's own order, with an explicit argument first): ``token`` argument >
    ``RAY_AUTH_TOKEN`` > the file named by ``RAY_AUTH_TOKEN_PATH`` > ``~/.ray/auth_token``.
    Empty values are skipped. A ``RAY_AUTH_TOKEN_PATH`` that cannot be read is an error
    (as in Ray), not a silent fall-through to the next source.
    """
    if token and token.strip():
        return token.strip()
    env_token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if env_token:
        return env_token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path:
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ClusterError(
                f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({e.strerror}): fix the path or unset it"
            ) from None
        if not text:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path} is empty: put the token in it or unset it")
        return text
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        text = default.read_text(encoding="utf-8").strip()
        return text or None
    return None


def _dashboard_url(address: str) -> str:
    """``host:port`` or ``http(s)://host:port`` -> ``http(s)://host:port`` (no trailing slash)."""
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = "http://" + address
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ClusterError(
            f"address {address!r} is not a Jobs API address: use the dashboard URL, e.g. http://HEAD_IP:8265"
        )
    return address


def _load_spec(job: JobSpec | dict | str | os.PathLike) -> JobSpec:
    if isinstance(job, JobSpec):
        return JobSpec.model_validate(job.model_dump())  # re-check: fields may have been assigned
    if isinstance(job, dict):
        return parse_job(job, "<job dict>")
    return load_job(job)


NO_CLI_HELP = (
    "loraflock: the cluster has no loraflock command: submit without --no-ship-code (the job then brings "
    "its code), or install loraflock in the cluster image (deploy/Dockerfile)"
)


def build_entrypoint(out: str, shipped_code: bool) -> str:
    """The shell command the cluster runs: check what the job needs, materialise the inlined spec, run it.

    ``shipped_code`` (``py_modules`` or a ``working_dir`` was uploaded) runs the CLI as a module,
    after checking that the cluster's Python has every dependency
    (:func:`orchestrator.cluster.runtime_env.deps_check`); otherwise the image's ``loraflock``
    runs, after checking that there is one (exit 127 with :data:`NO_CLI_HELP`).
    """
    from orchestrator.cluster.runtime_env import deps_check

    if shipped_code:
        check, runner = deps_check(), "python -m orchestrator.cli"
    else:
        check = f"{{ command -v loraflock >/dev/null 2>&1 || {{ echo {shlex.quote(NO_CLI_HELP)} >&2; exit 127; }}; }}"
        runner = "loraflock"
    return (
        f'{check} && job_file=$(mktemp) && printf "%s" "${JOB_YAML_ENV}" > "$job_file" && '
        f'{runner} run "$job_file" --out {shlex.quote(out)}'
    )


def read_report(out: str | os.PathLike) -> dict[str, Any]:
    """``<out>/report.json`` from a local path or any URI pyarrow can open (s3://, gs://, ...)."""
    from pyarrow import fs as pafs

    out_str = str(out).rstrip("/")
    if "://" not in out_str:
        out_str = str(Path(out_str).expanduser().resolve())
    try:
        filesystem, base = pafs.FileSystem.from_uri(out_str)
        with filesystem.open_input_stream(f"{base}/report.json") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ClusterError(
            f"no report.json in {out}: the job may still be running or may have failed "
            "(check `loraflock status JOB_ID` and `loraflock logs JOB_ID`)"
        ) from None
    except (OSError, ValueError) as e:  # pyarrow raises these for unknown schemes / bad URIs
        raise ClusterError(f"cannot read {out_str}/report.json: {e}") from None


class LoraflockClient:
    """Submit and follow loraflock jobs on a Ray cluster through its Jobs API.

    Args:
        address: the Ray dashboard URL (Jobs API), e.g. ``http://HEAD_IP:8265``.
        token: Ray auth token; default: ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``,
            ``~/.ray/auth_token`` (see :func:`resolve_token`).

    The connection is opened on the first call that needs it, so validating a spec needs
    no cluster.

    Example:
        >>> c = LoraflockClient("http://127.0.0.1:8265")          # doctest: +SKIP
        >>> jid = c.submit("examples/tiny.yaml", "/tmp/tiny", wait=True, timeout=600)  # doctest: +SKIP
    """

    def __init__(self, address: str, token: str | None = None) -> None:
        self.address = _dashboard_url(address)
        self._token = resolve_token(token)
        self._jobs_client: Any = None

    def __repr__(self) -> str:
        return f"LoraflockClient(address={self.address!r}, token={'set' if self._token else 'unset'})"

    # ------------------------------------------------------------------ connection
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _probe(self) -> None:
        """Fail within seconds on a wrong or dead address (Ray's own requests have no timeout)."""
        import requests

        try:
            r = requests.get(f"{self.address}/api/version", headers=self._headers(), timeout=PROBE_TIMEOUT_S)
        except requests.exceptions.RequestException as e:
            kind = "timed out" if isinstance(e, requests.exceptions.Timeout) else "refused or unreachable"
            raise ClusterError(
                f"cannot reach the Ray Jobs API at {self.address} ({kind}): check that the cluster is up "
                "and that the address is its dashboard URL (default port 8265)"
            ) from None
        if r.status_code in (401, 403):
            raise ClusterError(f"{self.address}: {TOKEN_HELP}")
        try:
            version = r.json().get("ray_version") if r.ok else None
        except ValueError:
            version = None
        if not version:
            raise ClusterError(
                f"{self.address} answered (HTTP {r.status_code}) but is not a Ray Jobs API: "
                "use the Ray dashboard URL of the head node (default port 8265)"
            )

    @property
    def _jobs(self) -> Any:
        if self._jobs_client is None:
            self._probe()
            from ray.job_submission import JobSubmissionClient

            self._jobs_client = self._call(JobSubmissionClient, self.address, headers=self._headers())
        return self._jobs_client

    def _call(self, fn: Any, *args: Any, job_id: str | None = None, **kwargs: Any) -> Any:
        """Run one Jobs API call; turn Ray's errors into :class:`ClusterError` messages."""
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except AuthenticationError:
            raise ClusterError(f"{self.address}: {TOKEN_HELP}") from None
        except ConnectionError:
            raise ClusterError(f"lost the connection to the Ray Jobs API at {self.address}") from None
        except RuntimeError as e:
            text = str(e)
            if job_id is not None and ("404" in text or "does not exist" in text):
                raise ClusterError(
                    f"no job {job_id!r} on {self.address}: `loraflock list --address {self.address}` shows its jobs"
                ) from None
            raise ClusterError(f"{self.address}: {text}") from None

    # ------------------------------------------------------------------ jobs
    def submit(
        self,
        job: JobSpec | dict | str | os.PathLike,
        out: str,
        runtime_env: dict[str, Any] | None = None,
        working_dir: str | os.PathLike | None = None,
        pip: list[str] | None = None,
        wait: bool = False,
        timeout: float | None = None,
        ship_code: bool = True,
        pip_deps: bool = False,
    ) -> str:
        """Validate ``job`` locally, then submit ``loraflock run`` for it; return the job id.

        Args:
            job: a :class:`JobSpec`, a dict, or a YAML path.
            out: output directory *as seen by the cluster* (a shared path or a URI).
            runtime_env: extra Ray runtime_env (env_vars, container, ...).
            working_dir: local directory (or remote zip URI) to ship as the job's code.
            pip: packages to install for the job (e.g. ``["loraflock==0.1.0"]``).
            wait: block until the job ends (see :meth:`wait`).
            timeout: seconds for ``wait``.
            ship_code: send this process's loraflock packages with the job (runtime_env
                ``py_modules``), so the cluster needs no loraflock install; ``False``: run the
                ``loraflock`` command of the cluster's image.
            pip_deps: add loraflock's dependencies (without Ray) to the runtime_env's ``pip``, for a
                cluster whose Python lacks them and that reaches a package index (Ray then builds
                a virtualenv per job: minutes, and torch's wheel is large).
        """
        spec = _load_spec(job)  # SpecError here: nothing has been sent
        env = dict(runtime_env or {})
        if working_dir is not None:
            wd = str(working_dir)
            if "://" not in wd and not Path(wd).is_dir():
                raise ClusterError(f"working_dir {wd!r} is not a directory: pass the repository root to ship")
            if env.get("working_dir") not in (None, wd):
                raise ClusterError("working_dir given twice (argument and runtime_env) with different values")
            env["working_dir"] = wd
        elif ship_code and "working_dir" not in env:
            from orchestrator.cluster.runtime_env import code_modules

            env["py_modules"] = [*env.get("py_modules", []), *code_modules()]
            env["excludes"] = [*env.get("excludes", []), "__pycache__", "*.pyc"]
        if pip_deps:
            from orchestrator.cluster.runtime_env import project_requirements

            pip = [*project_requirements(), *(pip or [])]
        if pip:
            env["pip"] = list(pip)
        env_vars = dict(env.get("env_vars") or {})
        shipped = spec.model_dump(mode="json")
        shipped["ray"]["address"] = None  # on the cluster the driver attaches to its own Ray (RAY_ADDRESS)
        env_vars[JOB_YAML_ENV] = yaml.safe_dump(shipped, sort_keys=False)
        env["env_vars"] = env_vars
        submission_id = f"loraflock-{spec.name}-{uuid.uuid4().hex[:8]}"
        job_id = self._call(
            self._jobs.submit_job,
            entrypoint=build_entrypoint(out, shipped_code="working_dir" in env or "py_modules" in env),
            submission_id=submission_id,
            runtime_env=env,
            metadata={"loraflock_job": spec.name, "loraflock_out": str(out)},
        )
        if wait:
            self.wait(job_id, timeout)
        return job_id

    def status(self, job_id: str) -> str:
        """``PENDING``, ``RUNNING``, ``STOPPED``, ``SUCCEEDED`` or ``FAILED``."""
        return str(self._call(self._jobs.get_job_status, job_id, job_id=job_id).value)

    def info(self, job_id: str) -> dict[str, Any]:
        """Status, message, entrypoint, times and metadata of one job."""
        details = self._call(self._jobs.get_job_info, job_id, job_id=job_id)
        return _details_dict(details)

    def logs(self, job_id: str) -> str:
        """Everything the job's driver has printed so far."""
        return self._call(self._jobs.get_job_logs, job_id, job_id=job_id)

    def tail(self, job_id: str) -> Iterator[str]:
        """Follow the job's log until it ends: Ray's async tail run on a private event loop."""
        self.status(job_id)  # a clear error for an unknown id before the websocket opens
        loop = asyncio.new_event_loop()
        stream = self._jobs.tail_job_logs(job_id)
        try:
            while True:
                try:
                    chunk = self._call(loop.run_until_complete, stream.__anext__(), job_id=job_id)
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            loop.run_until_complete(stream.aclose())
            loop.close()

    def stop(self, job_id: str) -> bool:
        """Ask the cluster to stop the job; ``False`` if it had already ended."""
        return bool(self._call(self._jobs.stop_job, job_id, job_id=job_id))

    def list(self) -> list[dict[str, Any]]:
        """Every job the cluster knows, oldest first."""
        jobs = [_details_dict(d) for d in self._call(self._jobs.list_jobs)]
        return sorted(jobs, key=lambda j: j["start_time"] or 0)

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 1.0) -> str:
        """Block until the job ends; return its final status.

        Raises:
            JobWaitTimeout: still running after ``timeout`` seconds (the job keeps running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(job_id)
            if status in TERMINAL_STATUSES:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise JobWaitTimeout(
                    f"job {job_id} is still {status} after {timeout:g} s; it keeps running "
                    f"(`loraflock stop {job_id}` ends it)"
                )
            time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))

    def result(self, job_id_or_out: str) -> dict[str, Any]:
        """report.json of a job, by job id (its ``out`` is in the job's metadata) or by ``out``."""
        target = job_id_or_out
        if "://" not in target and not Path(target).exists() and "/" not in target:
            out = self.info(target)["metadata"].get("loraflock_out")
            if not out:
                raise ClusterError(f"job {target} was not submitted by loraflock: pass its output directory")
            target = out
        return read_report(target)


def _details_dict(details: Any) -> dict[str, Any]:
    return {
        "job_id": details.submission_id or details.job_id,
        "status": str(getattr(details.status, "value", details.status)),
        "message": details.message,
        "entrypoint": details.entrypoint,
        "start_time": details.start_time,
        "end_time": details.end_time,
        "metadata": dict(details.metadata or {}),
    }
