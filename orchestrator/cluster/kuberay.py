"""``loraflock deploy kuberay JOB.yaml``: a KubeRay RayJob manifest for one job spec.

The output is two YAML documents for ``kubectl apply -f -``:

1. a ConfigMap holding the validated job spec as ``job.yaml`` (mounted at ``/config``);
2. a ``ray.io/v1`` RayJob whose entrypoint is ``loraflock run /config/job.yaml --out
   /outputs/<name>``: KubeRay creates a RayCluster for it (head + an autoscaled worker group,
   GPU when ``ray.use_gpu``), submits the entrypoint, and deletes the cluster when the job
   ends (``shutdownAfterJobFinishes``). Outputs land on the PersistentVolumeClaim mounted at
   ``/outputs`` (ReadWriteMany for multi-node), so they outlive the cluster.

Token auth uses KubeRay's ``authOptions`` (KubeRay >= 1.5.1) with a Secret you create once
(key ``auth_token``); KubeRay then sets ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN`` on every Ray
container. ``deploy/kuberay/rayjob.yaml`` is this module's output for ``examples/tiny.yaml``
(a test keeps the two identical).

Example:
    >>> from orchestrator.spec import load_job
    >>> text = render_rayjob(load_job("examples/tiny.yaml"), image="registry/loraflock:0.1.0")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import yaml

from orchestrator.spec import JobSpec

__all__ = ["RAY_VERSION", "DEFAULT_IMAGE", "rayjob_documents", "render_rayjob"]

RAY_VERSION = "2.60.0"  # must equal the ray pin in pyproject.toml (a test checks)
DEFAULT_IMAGE = "loraflock:0.1.0"  # build with deploy/Dockerfile and push to your registry
TOKEN_SECRET = "loraflock-ray-token"
OUTPUTS_CLAIM = "loraflock-outputs"


class _BlockStrDumper(yaml.SafeDumper):
    """Safe YAML with multi-line strings (the embedded job.yaml) as readable ``|`` blocks."""

    def ignore_aliases(self, data: Any) -> bool:  # kubectl users read these: no &id001 anchors
        return True


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockStrDumper.add_representer(str, _str_representer)


def _container(name: str, image: str, resources: dict[str, Any], mounts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "volumeMounts": mounts,
    }


def rayjob_documents(
    spec: JobSpec,
    image: str = DEFAULT_IMAGE,
    out: str | None = None,
    max_workers: int | None = None,
) -> list[dict[str, Any]]:
    """The ConfigMap and RayJob for ``spec`` as plain dicts (see the module docstring).

    Args:
        spec: the validated job.
        image: container image with loraflock installed (``deploy/Dockerfile``).
        out: output directory inside the pods; default ``/outputs/<job name>`` (on the PVC).
        max_workers: autoscaling ceiling of the worker group; default ``spec.ray.num_workers``.
    """
    name = spec.name.lower().replace("_", "-").replace(".", "-")
    out = out or f"/outputs/{spec.name}"
    config_map = f"loraflock-job-{name}"
    volumes = [
        {"name": "job-config", "configMap": {"name": config_map}},
        {"name": "outputs", "persistentVolumeClaim": {"claimName": OUTPUTS_CLAIM}},
    ]
    mounts = [
        {"name": "job-config", "mountPath": "/config", "readOnly": True},
        {"name": "outputs", "mountPath": "/outputs"},
    ]
    use_gpu = spec.ray.use_gpu
    worker_resources: dict[str, Any] = {"cpu": "8", "memory": "32Gi"}
    if use_gpu:
        worker_resources["nvidia.com/gpu"] = "1"
    ceiling = max(1, max_workers if max_workers is not None else spec.ray.num_workers)
    head = {
        # num-cpus 0: the head runs the driver and the GCS, training goes to the workers
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "template": {
            "spec": {
                "containers": [_container("ray-head", image, {"cpu": "2", "memory": "8Gi"}, mounts)],
                "volumes": volumes,
            }
        },
    }
    worker = {
        "groupName": "gpu-workers" if use_gpu else "cpu-workers",
        "replicas": 0,
        "minReplicas": 0,
        "maxReplicas": ceiling,
        "rayStartParams": {},
        "template": {
            "spec": {
                "containers": [_container("ray-worker", image, worker_resources, mounts)],
                "volumes": volumes,
            }
        },
    }
    config_doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": config_map, "labels": {"app.kubernetes.io/part-of": "loraflock"}},
        "data": {"job.yaml": yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)},
    }
    rayjob_doc = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": f"loraflock-{name}", "labels": {"app.kubernetes.io/part-of": "loraflock"}},
        "spec": {
            "entrypoint": f"loraflock run /config/job.yaml --out {out}",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "backoffLimit": 0,
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "authOptions": {"mode": "token", "secretName": TOKEN_SECRET},
                "headGroupSpec": head,
                "workerGroupSpecs": [worker],
            },
        },
    }
    return [config_doc, rayjob_doc]


def render_rayjob(
    spec: JobSpec,
    image: str = DEFAULT_IMAGE,
    out: str | None = None,
    max_workers: int | None = None,
) -> str:
    """:func:`rayjob_documents` as a multi-document YAML string for ``kubectl apply -f -``."""
    header = (
        f"# ConfigMap + KubeRay RayJob for loraflock job {spec.name!r}.\n"
        f"# Apply: loraflock deploy kuberay JOB.yaml --image IMG | kubectl apply -f -\n"
        f"# Needs: KubeRay >= 1.5.1, Secret {TOKEN_SECRET} (key auth_token), PVC {OUTPUTS_CLAIM}; "
        "see deploy/README.md\n"
    )
    docs = rayjob_documents(spec, image, out, max_workers)
    return header + yaml.dump_all(docs, Dumper=_BlockStrDumper, sort_keys=False)
