"""deploy/: manifests parse and carry what KubeRay / the cluster launcher need; versions agree."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from orchestrator.cluster.kuberay import RAY_VERSION, rayjob_documents, render_rayjob
from orchestrator.spec import load_job

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"


def _ray_pin() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', text)
    assert match, "pyproject.toml must pin ray exactly (ray[...]==X.Y.Z)"
    return match.group(1)


def _check_pod_group(group: dict, *, worker: bool) -> None:
    assert isinstance(group["rayStartParams"], dict)
    containers = group["template"]["spec"]["containers"]
    assert containers and all(c["image"] for c in containers)
    if worker:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == _ray_pin()
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    _check_pod_group(spec["headGroupSpec"], worker=False)
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        _check_pod_group(group, worker=True)


def test_ray_version_is_the_same_everywhere():
    pin = _ray_pin()
    assert RAY_VERSION == pin
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    tags = re.findall(r"rayproject/ray:([0-9.]+)-py", dockerfile)
    assert tags and set(tags) == {pin}, f"Dockerfile Ray images {tags} != pyproject pin {pin}"
    assert re.search(r"^ARG BASE_IMAGE=rayproject/ray:[0-9.]+-py311$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.M)


def test_raycluster_manifest():
    doc = yaml.safe_load((DEPLOY / "kuberay" / "raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    _check_cluster_spec(doc["spec"])
    worker = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    pvc = yaml.safe_load((DEPLOY / "kuberay" / "outputs-pvc.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_rayjob_file_is_the_rendered_tiny_job():
    """deploy/kuberay/rayjob.yaml == `loraflock deploy kuberay examples/tiny.yaml` (kept in sync)."""
    from orchestrator.spec import parse_job

    spec = load_job(ROOT / "examples" / "tiny.yaml")
    on_disk = list(yaml.safe_load_all((DEPLOY / "kuberay" / "rayjob.yaml").read_text()))
    rendered = rayjob_documents(spec)
    # the embedded spec must validate to the same job (new spec fields with defaults are fine)
    regenerate = "regenerate: loraflock deploy kuberay examples/tiny.yaml > deploy/kuberay/rayjob.yaml"
    assert parse_job(yaml.safe_load(on_disk[0]["data"].pop("job.yaml"))) == spec, regenerate
    rendered[0]["data"].pop("job.yaml")
    assert on_disk == rendered, regenerate


def test_rendered_rayjob_has_what_kuberay_needs():
    spec = load_job(ROOT / "examples" / "tiny.yaml")
    spec.ray.use_gpu = True
    spec.ray.num_workers = 3
    config_map, job = yaml.safe_load_all(render_rayjob(spec, image="reg/lf:1", out="/outputs/x"))
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["entrypoint"] == "loraflock run /config/job.yaml --out /outputs/x"
    cluster = job["spec"]["rayClusterSpec"]
    _check_cluster_spec(cluster)
    worker = cluster["workerGroupSpecs"][0]
    assert worker["maxReplicas"] == 3
    container = worker["template"]["spec"]["containers"][0]
    assert container["image"] == "reg/lf:1" and container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # the ConfigMap mounted at /config holds a spec that validates to the same job
    head_pod = cluster["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head_pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head_pod["volumes"]}
    assert mounts["job-config"] == "/config" and mounts["outputs"] == "/outputs"
    assert volumes["job-config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert volumes["outputs"]["persistentVolumeClaim"]["claimName"]
    from orchestrator.spec import parse_job

    assert parse_job(yaml.safe_load(config_map["data"]["job.yaml"])) == spec


def test_cluster_launcher_config():
    cfg = yaml.safe_load((DEPLOY / "cluster-launcher" / "aws.yaml").read_text())
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers and all(0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"] for t in workers)
    assert all(
        "RAY_AUTH_MODE=token" in " ".join(cfg[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands")
    )
    assert "~/.ray/auth_token" in cfg["file_mounts"]


def test_readme_commands_name_real_files():
    readme = (DEPLOY / "README.md").read_text()
    for path in re.findall(r"\b(deploy/[\w./-]+\.(?:ya?ml|md)|deploy/Dockerfile|examples/[\w.-]+\.yaml)\b", readme):
        assert (ROOT / path).exists(), f"deploy/README.md names {path}, which does not exist"


def test_the_image_pins_torch_and_its_cuda_build_and_the_readme_names_the_driver():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    version = re.search(r"^ARG TORCH_VERSION=(\d+\.\d+\.\d+)$", dockerfile, re.M)
    cuda = re.search(r"^ARG TORCH_CUDA=(cu\d+)$", dockerfile, re.M)
    assert version and cuda, "deploy/Dockerfile must pin TORCH_VERSION and TORCH_CUDA"
    assert '"torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"' in dockerfile
    readme = (DEPLOY / "README.md").read_text()
    assert f"torch {version.group(1)}" in readme and f"`{cuda.group(1)}`" in readme
    assert re.search(r"NVIDIA driver[\s\S]{0,60}\b\d{3} or newer", readme), "name the driver minimum"
