"""Checks that run on the driver before `fit`, so that bad input fails in seconds.

Without them Ray waits: `ray.init` retries an unreachable address for a minute, a
placement group that cannot fit waits forever for an autoscaler, and an unwritable
storage path only fails once the first checkpoint is uploaded.
"""

from __future__ import annotations

import math
import socket

from seminar import storage
from seminar.config import TrainConfig


class PreflightError(RuntimeError):
    """The run cannot start: the message says what is wrong and what to change."""


class ClusterUnreachable(PreflightError):
    pass


class StorageNotWritable(PreflightError):
    pass


class InsufficientResources(PreflightError):
    pass


def unreachable(host: str, port: int, timeout_s: float) -> str | None:
    """Why nothing answers a TCP connection to host:port within timeout_s (None: something does)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as e:
        return e.strerror or f"{type(e).__name__}: {e}"


def check_address(address: str | None, timeout_s: float = 3.0) -> None:
    """Fail fast when nothing listens at a cluster address (`host:port` or `ray://host:port`)."""
    if address in (None, "", "auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        default_port = 10001 if address.startswith("ray://") else 6379
        host, port = hostport, str(default_port)
    why_not = unreachable(host, int(port), timeout_s)
    if why_not:
        raise ClusterUnreachable(
            f"cannot reach a Ray cluster at {address!r} ({why_not}); check --address "
            "(the head's GCS address, e.g. 10.0.0.5:6379) and that the cluster is up")


def check_storage(uri: str, run_name: str) -> None:
    """Write and delete a probe object where the run's checkpoints will go."""
    try:
        storage.check_writable(uri, run_name)
    except storage.NotWritable as e:
        raise StorageNotWritable(str(e)) from None


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """What one training worker reserves (the resource dict of `ScalingConfig`)."""
    res = {"CPU": float(cfg.resources.cpus_per_worker)}
    if cfg.resources.gpus_per_worker > 0:
        res["GPU"] = float(cfg.resources.gpus_per_worker)
    return res


def check_resources(cfg: TrainConfig, per_worker: dict[str, float], placement_strategy: str = "PACK") -> int:
    """Fail when the cluster's nodes, even idle, cannot host all K×R workers at once;
    return how many workers they can host.

    Counts how many workers fit on each alive node (identical workers, so this is exact)
    instead of comparing totals only: 2 nodes of 1.5 CPUs hold one 1-CPU worker each.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    per_worker = {k: v for k, v in per_worker.items() if v > 0}
    fits = [min((math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in per_worker.items()), default=0)
            for node in nodes]
    needed = cfg.num_workers
    if placement_strategy == "STRICT_SPREAD":
        capacity = sum(1 for f in fits if f >= 1)
    else:
        capacity = sum(fits)
    if capacity < needed:
        totals = {k: sum(node.get(k, 0.0) for node in nodes) for k in per_worker}
        ask = ", ".join(f"{k}={v:g}" for k, v in per_worker.items())
        have = ", ".join(f"{k}={v:g}" for k, v in totals.items())
        spread = " on separate nodes (STRICT_SPREAD)" if placement_strategy == "STRICT_SPREAD" else ""
        raise InsufficientResources(
            f"the spec needs {needed} workers ({cfg.num_students} students x "
            f"{cfg.resources.replicas_per_student} replicas) with {ask} each{spread}, but the cluster "
            f"({len(nodes)} node(s), {have} in all) can host only {capacity}. Lower "
            "resources.replicas_per_student, resources.cpus_per_worker or resources.gpus_per_worker, "
            "or add nodes")
    return capacity
