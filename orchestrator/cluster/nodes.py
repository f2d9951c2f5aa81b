"""Resource requests sized per node: what one alive Ray node can give, never the cluster's sum.

A request no single node can meet (more CPUs than the largest node has, a GPU where no node
has one) pends forever in Ray; these checks turn it into an error that names the resource
and the setting to change. Functions take ``ray.nodes()``'s list, so they test without Ray.
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.errors import StageError

__all__ = ["ResourceRequestError", "alive_nodes", "largest_node", "check_fits", "cpus_per_worker", "fits_at_once"]


class ResourceRequestError(StageError):
    """A resource request that no alive node of the cluster can meet."""


def alive_nodes(nodes: Sequence[dict] | None = None) -> list[dict]:
    """``ray.nodes()`` (or the given list) restricted to alive nodes."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    return [n for n in nodes if n.get("Alive", True)]


def largest_node(nodes: Sequence[dict], gpu: bool = False) -> dict[str, float]:
    """CPUs and GPUs of the node with the most CPUs (among nodes with a GPU when ``gpu``)."""
    pool = [n["Resources"] for n in nodes if not gpu or n["Resources"].get("GPU", 0) >= 1]
    if not pool:
        return {"CPU": 0.0, "GPU": 0.0}
    best = max(pool, key=lambda r: r.get("CPU", 0.0))
    return {"CPU": float(best.get("CPU", 0.0)), "GPU": float(best.get("GPU", 0.0))}


def check_fits(request: dict[str, float], nodes: Sequence[dict], what: str, fix: str) -> None:
    """Raise :class:`ResourceRequestError` unless one alive node holds all of ``request``.

    Args:
        request: e.g. ``{"CPU": 4, "GPU": 1}``.
        what: the thing asking (``"each flock worker"``).
        fix: the setting that changes the request (``"lower ray.cpus_per_worker"``).
    """
    need = {k: float(v) for k, v in request.items() if v}
    if any(all(n["Resources"].get(k, 0.0) >= v for k, v in need.items()) for n in nodes):
        return
    have = [{k: n["Resources"].get(k, 0.0) for k in need} for n in nodes]
    missing = sorted(k for k, v in need.items() if not any(n["Resources"].get(k, 0.0) >= v for n in nodes)) or [
        "the combination"]
    raise ResourceRequestError(
        f"{what} asks for {need}, but no alive node has that much {' and '.join(missing)} (nodes have {have}): "
        f"{fix}; Ray would otherwise wait for such a node forever"
    )


def cpus_per_worker(configured: float | None, workers: int, use_gpu: bool, nodes: Sequence[dict]) -> float:
    """CPUs for each of ``workers`` flock workers: the configured number, else a fair share
    of the cluster capped at what one node gives a worker (its CPUs per GPU with ``use_gpu``).

    Raises:
        ResourceRequestError: no node can host one worker.
    """
    nodes = alive_nodes(nodes)
    if configured is not None:
        cpus = float(configured)
    else:
        pool = [n for n in nodes if not use_gpu or n["Resources"].get("GPU", 0) >= 1]
        total = sum(n["Resources"].get("CPU", 0.0) for n in pool)
        per_node = max((n["Resources"].get("CPU", 0.0) / (n["Resources"].get("GPU", 1.0) if use_gpu else 1.0)
                        for n in pool), default=1.0)
        cpus = max(1.0, float(int(min(total // max(workers, 1), per_node))))
    request = {"CPU": cpus, **({"GPU": 1.0} if use_gpu else {})}
    no_gpu = use_gpu and not any(n["Resources"].get("GPU", 0) >= 1 for n in nodes)
    fix = ("set ray.use_gpu: false or add a node with a GPU" if no_gpu
           else "lower ray.cpus_per_worker (or leave it out: it is then sized per node)")
    check_fits(request, nodes, "each flock worker", fix)
    return cpus


def fits_at_once(request: dict[str, float], nodes: Sequence[dict]) -> int:
    """How many copies of ``request`` the alive nodes hold at once, counted node by node.

    A trial's CPUs and GPU share must come from one node, so a node with 8 CPUs and no GPU
    adds nothing to GPU trials, and 4 GPUs cannot host 0.25-GPU trials beyond their CPUs.

    Example:
        >>> fits_at_once({"CPU": 1, "GPU": 0.25}, [{"Resources": {"CPU": 16, "GPU": 1}}])
        4
    """
    need = {k: float(v) for k, v in request.items() if v}
    total = 0
    for n in alive_nodes(nodes):
        have = n["Resources"]
        total += min((int(have.get(k, 0.0) / v + 1e-9) for k, v in need.items()), default=0)
    return total
