"""Connecting to a Ray cluster for `index --engine ray`: Ray as an optional extra, an address checked before
ray.init (which retries an unreachable address for minutes), and how many encoder actors the cluster holds."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

INSTALL_HINT = "pip install 'spt-embed[ray]'"
CONNECT_TIMEOUT_S = 10.0


def import_ray():
    """The `ray` module with Ray Data, or an ImportError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra's `ray[data]` part)
    except ImportError as exc:
        raise ImportError(f"--engine ray needs Ray Data, which is not installed ({exc}): {INSTALL_HINT}") from None
    return ray


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """ConnectionError within `timeout` seconds unless something listens at a HOST:PORT or ray://HOST:PORT address
    (ray.init itself keeps retrying an unreachable address for minutes)."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or port is None:
        raise ValueError(
            f"Ray address {address!r} is not auto, HOST:PORT (the head's GCS port, 6379 by default) or "
            f"ray://HOST:PORT (Ray Client, 10001 by default)."
        )
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(_unreachable(address, f"{type(exc).__name__}: {exc}")) from None


def _unreachable(address: str | None, reason: str) -> str:
    return (
        f"Cannot reach a Ray cluster at {address!r} ({reason}). Start one with `ray start --head` on the head node "
        f"(and `ray start --address HEAD:6379` on each worker node), then pass --address auto on a node of the "
        f"cluster or --address ray://HEAD:10001 from elsewhere; without --address a local Ray is used or started."
    )


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator:
    """Ray connected to `address` for the duration of the block: "auto" the cluster this machine belongs to (or
    RAY_ADDRESS), None the same or else a new local Ray. A connection this process already has is used as it is
    and left open."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    options = {"address": address, "logging_level": logging.WARNING}
    if address is None:
        options["include_dashboard"] = False
    try:
        ray.init(**options)
    except ConnectionError as exc:
        raise ConnectionError(_unreachable(address, str(exc).strip().splitlines()[0])) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def worker_count(ray, num_workers: int | None, cpus: float, gpus: float) -> int:
    """The number of actors: `num_workers`, or as many as the cluster's CPUs (GPUs) hold; refuses too many."""
    total = ray.cluster_resources()
    have_cpus, have_gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if gpus and have_gpus < gpus:
        raise ValueError(f"--gpus-per-worker {gpus:g} but the Ray cluster has {have_gpus:g} GPU(s).")
    fits = int(min(have_cpus // cpus, have_gpus // gpus if gpus else have_cpus // cpus))
    workers = num_workers or max(1, fits)
    if workers > fits:
        raise ValueError(
            f"{workers} workers of {cpus:g} CPU(s){f' and {gpus:g} GPU(s)' if gpus else ''} do not fit the Ray "
            f"cluster ({have_cpus:g} CPUs, {have_gpus:g} GPUs): at most {fits}; lower --num-workers."
        )
    return workers
