"""What a submitted job needs on a stock Ray cluster: loraflock's code, its dependencies, a clear check.

A Ray head started from a plain environment (the ``rayproject/ray`` image of the same Ray
version, a ``pip install ray`` machine) has no ``loraflock`` command. So by default
``submit`` ships the client's own code with Ray's runtime_env ``py_modules`` (the four
packages, uploaded once per content hash and put on ``PYTHONPATH`` of the job's driver and
of every worker), and the entrypoint runs ``python -m orchestrator.cli``. The code that runs
is then the code that validated the spec, whatever the cluster has installed.

The third-party dependencies (torch, transformers, ...) are another matter: installing them
per job is minutes and gigabytes, and needs a registry the cluster can reach. They are added
as the runtime_env's ``pip`` list only on request (``pip_deps``); otherwise the entrypoint first
checks, with the standard library alone, that the cluster's Python can import every one of
them, and stops with a message saying which are missing and the two fixes.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
from pathlib import Path

__all__ = [
    "CODE_PACKAGES", "IMPORT_NAMES", "MISSING_DEPS_EXIT", "MISSING_DEPS_HELP", "code_modules", "deps_check",
    "project_requirements",
]

CODE_PACKAGES = ("orchestrator", "models", "tasks", "tune_spaces")
MISSING_DEPS_EXIT = 3  # the entrypoint's exit status when the cluster's Python lacks a dependency
# distribution name (pyproject's dependencies) -> the module the job imports; a test keeps them in step
IMPORT_NAMES = {
    "torch": "torch", "transformers": "transformers", "datasets": "datasets", "pyro-ppl": "pyro",
    "pyarrow": "pyarrow", "pydantic": "pydantic", "safetensors": "safetensors", "gguf": "gguf", "peft": "peft",
    "matplotlib": "matplotlib", "pyyaml": "yaml", "scipy": "scipy", "numpy": "numpy", "rouge-score": "rouge_score",
}
MISSING_DEPS_HELP = (
    "loraflock: the cluster's Python ({}) cannot import {}: install loraflock's dependencies in the cluster "
    "image (see deploy/Dockerfile), or resubmit with --pip-deps (SDK: pip_deps=True) so that Ray installs them "
    "for the job from a package index the cluster reaches"
)


def code_modules() -> list[str]:
    """The directories of loraflock's packages as this process imports them (checkout or site-packages)."""
    root = Path(__file__).resolve().parents[2]  # <root>/orchestrator/cluster/runtime_env.py
    return [str(root / name) for name in CODE_PACKAGES]


def _dist_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def project_requirements() -> list[str]:
    """loraflock's runtime dependencies (no extras), without Ray: the cluster runs its own Ray.

    Read from the installed distribution's metadata, else from the checkout's pyproject.toml.
    """
    try:
        reqs = [r for r in importlib.metadata.requires("loraflock") or [] if "extra ==" not in r]
    except importlib.metadata.PackageNotFoundError:
        import tomllib  # Python >= 3.11; an installed loraflock has metadata on 3.10

        pyproject = Path(code_modules()[0]).parent / "pyproject.toml"
        reqs = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [r for r in reqs if _dist_name(r) != "ray"]


def deps_check() -> str:
    """A shell command that exits ``MISSING_DEPS_EXIT`` naming every dependency the cluster's Python lacks.

    Standard library only (``importlib.util.find_spec``): it runs before anything of loraflock
    is imported, so a missing torch is one clear line, not a traceback from deep inside.
    """
    modules = sorted(IMPORT_NAMES.values())
    code = (
        "import importlib.util as u, sys\n"
        f"m = [n for n in {modules!r} if u.find_spec(n) is None]\n"
        "if m:\n"
        f"    print({MISSING_DEPS_HELP!r}.format(sys.executable, ', '.join(m)), file=sys.stderr, flush=True)\n"
        f"    sys.exit({MISSING_DEPS_EXIT})\n"
    )
    return f"python -c {shlex.quote(code)}"
