"""Security promises of SECURITY.md, checked: safe loaders only, a private local Ray, no tokens on disk.

- A source scan (AST, so comments and docstrings do not count) of our packages for unsafe
  deserialisation and dynamic code: ``pickle``/``marshal``/``shelve``/``dill`` loads,
  ``torch.load`` without ``weights_only=True``, ``yaml.load`` without a safe loader,
  ``yaml.unsafe_load``/``full_load``, ``numpy.load(allow_pickle=True)``, ``pandas.read_pickle``,
  and builtin ``eval(``/``exec(``/``compile(``. The scanner itself is tested on bad snippets.
- ``orchestrator.pipeline.init_ray`` starts the local Ray with the dashboard off and bound to
  127.0.0.1 unless asked (``ray.init`` is monkeypatched: no real Ray starts).
- An auth token resolved by ``orchestrator.cluster.client`` never reaches a repr, the submitted job
  spec, or the ``job.json`` that ``pipeline._claim_output`` saves.
"""

from __future__ import annotations

import ast
import json
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "tasks", "orchestrator", "tune_spaces")
SECRET = "tok-5ecret-DO-NOT-LEAK-0123456789"

# (module, attribute) calls that deserialise arbitrary objects: never allowed.
_NEVER = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"),
    ("cPickle", "load"), ("cPickle", "loads"), ("dill", "load"), ("dill", "loads"),
    ("cloudpickle", "load"), ("cloudpickle", "loads"), ("marshal", "load"), ("marshal", "loads"),
    ("shelve", "open"), ("joblib", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
    ("yaml", "unsafe_load_all"), ("yaml", "full_load_all"), ("pandas", "read_pickle"), ("pd", "read_pickle"),
}
_SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Every unsafe load or dynamic-code call in ``source``, as ``file:line: what``."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> "module.attr" for `from pickle import loads as x`
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module.split('.')[0]}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name.split(".")[0]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        full = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
        mod, _, attr = full.rpartition(".")
        where = f"{filename}:{node.lineno}"
        if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec", "compile", "__import__") \
                and node.func.id not in aliases:
            found.append(f"{where}: builtin {node.func.id}()")
        elif (mod.split(".")[-1], attr) in _NEVER or (mod, attr) in _NEVER:
            found.append(f"{where}: {full}()")
        elif full == "torch.load":
            wo = _kw(node, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(f"{where}: torch.load() without weights_only=True")
        elif full in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader).split(".")[-1] not in _SAFE_YAML_LOADERS:
                found.append(f"{where}: {full}() without a SafeLoader")
        elif full in ("numpy.load", "np.load"):
            ap = _kw(node, "allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                found.append(f"{where}: {full}(allow_pickle=...)")
    return found


def _our_sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if "__pycache__" not in p.parts]
    return files


def test_the_scan_covers_every_package():
    files = _our_sources()
    for pkg in PACKAGES:
        assert any(p.relative_to(ROOT).parts[0] == pkg for p in files), pkg
    assert len(files) >= 30


def test_no_unsafe_loaders_or_dynamic_code_in_our_packages():
    bad = [hit for p in _our_sources() for hit in unsafe_calls(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert not bad, "unsafe calls:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle\npickle.load(open('f', 'rb'))",
        "import pickle as pk\npk.loads(b'')",
        "from pickle import loads\nloads(b'')",
        "import torch\ntorch.load('f')",
        "import torch\ntorch.load('f', weights_only=False)",
        "import yaml\nyaml.load(s)",
        "import yaml\nyaml.load(s, Loader=yaml.Loader)",
        "import yaml\nyaml.unsafe_load(s)",
        "import numpy as np\nnp.load('f', allow_pickle=True)",
        "eval('1+1')",
        "exec('x = 1')",
        "import marshal\nmarshal.loads(b'')",
    ],
)
def test_the_scanner_catches_unsafe_calls(snippet):
    assert unsafe_calls(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load('f', weights_only=True)",
        "import yaml\nyaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)",
        "model.eval()\n# pickle.load(f) in a comment\n'''eval(x) in a docstring'''",
        "from safetensors.torch import load_file\nload_file('f')",
        "import numpy as np\nnp.load('f')",
    ],
)
def test_the_scanner_accepts_safe_calls(snippet):
    assert unsafe_calls(snippet) == [], snippet


# ------------------------------------------------------------------ the local Ray
@pytest.fixture
def fake_ray(monkeypatch):
    """A stand-in ``ray`` module recording ``ray.init`` kwargs (no cluster is started)."""
    calls: list[dict] = []
    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: False  # type: ignore[attr-defined]
    fake.init = lambda **kw: calls.append(kw)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_local_ray_has_the_dashboard_off_by_default(fake_ray):
    from orchestrator.pipeline import init_ray
    from orchestrator.spec import RaySpec

    init_ray(None, RaySpec().include_dashboard)
    (kw,) = fake_ray
    assert kw["include_dashboard"] is False
    assert kw.get("dashboard_host") in ("127.0.0.1", "localhost")
    assert kw["address"] == "local"  # a new, private instance, never a cluster named by a stale file


def test_dashboard_only_when_asked_and_still_on_localhost(fake_ray):
    from orchestrator.pipeline import init_ray

    init_ray(None, include_dashboard=True)
    (kw,) = fake_ray
    assert kw["include_dashboard"] is True and kw["dashboard_host"] == "127.0.0.1"


# ------------------------------------------------------------------ tokens
@pytest.fixture
def secret_token(monkeypatch, tmp_path):
    """The token comes from the environment, as on a real submitting machine."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", SECRET)
    return SECRET


def test_resolved_token_never_shows_in_repr_or_str(secret_token):
    from orchestrator.cluster.client import LoraflockClient, resolve_token

    assert resolve_token() == secret_token  # resolution really found it ...
    client = LoraflockClient("http://127.0.0.1:8265")
    assert client._headers() == {"Authorization": f"Bearer {secret_token}"}  # ... and would send it
    for text in (repr(client), str(client), repr(vars(client).keys())):
        assert secret_token not in text, text


def test_submitted_spec_and_metadata_carry_no_token(secret_token):
    from orchestrator.cluster.client import LoraflockClient

    sent: dict = {}

    class FakeJobs:
        def submit_job(self, **kw):
            sent.update(kw)
            return kw["submission_id"]

    client = LoraflockClient("http://127.0.0.1:8265")
    client._jobs_client = FakeJobs()
    client._probe = lambda: None  # no cluster: the submission is captured, not sent
    client.submit(ROOT / "examples" / "tiny.yaml", out="/tmp/loraflock-tiny")
    assert sent, "submit did not reach the Jobs API client"
    assert secret_token not in json.dumps(sent, default=str)


def test_job_json_holds_the_spec_but_no_env_tokens(secret_token, monkeypatch, tmp_path):
    from orchestrator.pipeline import _claim_output
    from orchestrator.spec import load_job

    monkeypatch.setenv("HF_TOKEN", "hf_" + SECRET)
    monkeypatch.setenv("WANDB_API_KEY", "wb_" + SECRET)
    spec = load_job(ROOT / "examples" / "tiny.yaml")
    out = tmp_path / "out"
    assert _claim_output(out, spec) == {}
    text = (out / "job.json").read_text()
    saved = json.loads(text)
    assert saved["name"] == "tiny" and saved["spec"]["tasks"]  # the spec really is saved ...
    assert SECRET not in text  # ... without any token from the environment
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET not in f.read_text(errors="replace"), f


# ------------------------------------------------------------------ atomic writes
def test_a_failed_write_leaves_the_old_file_whole_and_no_temporaries(monkeypatch, tmp_path):
    """A crash between writing and renaming (simulated) keeps the previous complete file."""
    import os

    from models.files import atomic_dir, atomic_write_json

    target = tmp_path / "report.json"
    atomic_write_json(target, {"v": 1})

    def crash(*a, **k):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_json(target, {"v": 2, "big": list(range(10_000))})
    with pytest.raises(OSError, match="simulated"):
        with atomic_dir(tmp_path / "adapter") as d:
            (d / "adapter_model.safetensors").write_bytes(b"partial")
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no .tmp files, no half adapter
