"""The GPU proof's CPU side (issue 21): its wheel-set plan, and a clean refusal without CUDA."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.gpu_check import (
    EXIT_NO_CUDA,
    EXIT_SETUP,
    bench_report,
    check_plan,
    job_spec,
    main,
    missing_distributions,
)
from orchestrator.spec import JobSpec

ROOT = Path(__file__).resolve().parents[2]


def _plan(tmp_path, *extra) -> dict:
    assert main(["prepare", "--python-version", "3.12", "--wheels", str(tmp_path), "--dry-run", *extra]) == 0
    return json.loads((tmp_path / "plan.json").read_text())


def test_plan_pins_loraflocks_dependencies_but_never_the_torch_stack(tmp_path):
    plan = _plan(tmp_path)
    pkgs = plan["packages"]
    assert plan["python_version"] == "3.12"
    for name in ("ray", "pydantic", "pyro-ppl", "transformers", "peft", "datasets", "safetensors", "pytest"):
        assert pkgs[name] == md.version(name)  # pinned as installed here, where the suite passes
    assert not [n for n in pkgs if n in ("torch", "triton") or n.startswith("nvidia-")]


def test_have_file_leaves_out_what_the_gpu_machine_has(tmp_path):
    have = tmp_path / "have.txt"
    have.write_text("# pip list of the GPU machine\nnumpy 2.5.2\nscipy==1.17\nPyYAML\n")
    plan = _plan(tmp_path / "w", "--have", str(have))
    assert "ray" in plan["packages"]
    assert not {"numpy", "scipy", "pyyaml"} & set(plan["packages"])
    assert "ray" not in _plan(tmp_path / "x", "--exclude", "ray")["packages"]


def test_modules_a_python_cannot_import_are_named():
    from benchmarks.gpu_check import _missing_modules

    assert _missing_modules(["json", "surely_not_a_module_x", "ray.train"], dict(os.environ)) == [
        "surely_not_a_module_x"]


def test_a_bad_python_version_is_refused(tmp_path, capsys):
    assert main(["prepare", "--python-version", "312", "--wheels", str(tmp_path)]) == EXIT_SETUP
    assert "major.minor" in capsys.readouterr().err


def test_refuses_cleanly_without_cuda(tmp_path):
    """Here torch has no CUDA: exit 3, a message naming the cause, and still one JSON object on stdout."""
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == EXIT_NO_CUDA
    assert "no CUDA" in r.stderr and "Traceback" not in r.stderr
    [line] = r.stdout.strip().splitlines()
    out = json.loads(line)
    assert out["ok"] is False and out["stage"] == "cuda" and out["torch"]


def test_wheel_set_for_another_python_and_missing_distributions():
    assert check_plan({"python_version": "3.12"}, "3.12") is None
    why = check_plan({"python_version": "3.12"}, "3.11")
    assert "3.12" in why and "--python-version 3.11" in why
    plan = {"wheels": {"pytest": "pytest-9-py3-none-any.whl", "surely-not-installed-x": "x.whl"}}
    assert missing_distributions(plan) == ["surely-not-installed-x"]


def test_the_job_it_runs_is_a_valid_gpu_job(tmp_path):
    spec = JobSpec.model_validate(yaml.safe_load(job_spec(tmp_path).read_text()))
    assert spec.ray.use_gpu and spec.ray.num_workers == 1


def test_the_benchmarks_json_is_read_from_its_log():
    text = 'repeat 0: flock 3.1s\n{\n "benchmark": "multitask_throughput",\n "arms": {}\n}\nsome warning\n'
    assert bench_report(text) == {"benchmark": "multitask_throughput", "arms": {}}
    assert bench_report("Traceback ...") is None


@pytest.mark.integration
def test_prepare_downloads_wheels_for_the_target_python(tmp_path):
    """A real download (needs the package registry): PyYAML's compiled wheel for CPython 3.12."""
    assert main(["prepare", "--python-version", "3.12", "--wheels", str(tmp_path), "--packages", "pyyaml"]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    wheel = plan["wheels"]["pyyaml"]
    assert "cp312" in wheel and "manylinux" in wheel and (tmp_path / wheel).is_file()
    assert plan["bytes"] == (tmp_path / wheel).stat().st_size and not plan["failed"]
