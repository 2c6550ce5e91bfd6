"""Connecting to Dask: a local cluster by default (remote schedulers come with issue #4)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from bigcat.errors import BigcatInputError

__all__ = ["SPECS", "connect", "local_cluster_options"]

log = logging.getLogger("bigcat")

SPECS = ("local", "threads", "sync")


def local_cluster_options() -> dict[str, Any]:
    """How bigcat sizes a ``LocalCluster`` on this machine.

    One worker process using every core as a thread: bigcat's hot loops (numba kernels,
    decompression, h5py/zarr reads) release the GIL, so threads share one copy of the
    inputs and of the per-cluster accumulators instead of one per process, and nothing is
    pickled between workers. The worker may use 80% of the machine's memory, leaving the
    rest to the client process and the page cache.
    """
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {
        "n_workers": 1,
        "threads_per_worker": cores,
        "processes": True,
        "memory_limit": int(psutil.virtual_memory().total * 0.8),
        "dashboard_address": ":8787",
        "silence_logs": logging.ERROR,
    }


@contextlib.contextmanager
def connect(spec: str | None = "local", **options: Any) -> Iterator[Any]:
    """Start (or connect to) a Dask cluster for the duration of a ``with`` block.

    Parameters
    ----------
    spec
        ``"local"`` (a ``distributed.LocalCluster`` sized by :func:`local_cluster_options`),
        ``"threads"`` (Dask's threaded scheduler, no client) or ``"sync"`` (single-threaded,
        for debugging; no client).
    **options
        Overrides of the ``LocalCluster`` keyword arguments.

    Yields
    ------
    distributed.Client or None
        The client (``None`` for ``threads``/``sync``, where Dask's local schedulers run).
    """
    import dask

    spec = spec or "local"
    if spec == "local":
        from distributed import Client, LocalCluster

        with LocalCluster(**{**local_cluster_options(), **options}) as cluster, Client(cluster) as client:
            log.info("Dask dashboard: %s", client.dashboard_link)
            yield client
    elif spec in ("threads", "sync"):
        with dask.config.set(scheduler="threads" if spec == "threads" else "synchronous"):
            yield None
    else:
        msg = f"unknown cluster spec {spec!r}; choose one of {', '.join(SPECS)}"
        raise BigcatInputError(msg)
