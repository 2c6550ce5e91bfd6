"""How a pass is laid out: block sizes, the R × C decomposition, the client and its capacity."""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from bigcat._io.source import BLOCK_NNZ
from bigcat.stats.statistics import _accumulator_bytes, _Settings

if TYPE_CHECKING:
    from bigcat.cluster import Capacity


__all__ = ["BIG_ACCUMULATORS"]

#: accumulators larger than this (bytes) get larger row blocks: accumulator bytes /
#: ``BIG_BLOCK_DIVISOR`` values (two blocks in flight, ~9 bytes per value: ~3/4 of the
#: accumulators' size), from 4 × ``BLOCK_NNZ`` up to ``MAX_BLOCK_NNZ``
BIG_ACCUMULATORS = 512e6
BIG_BLOCK_DIVISOR = 24
MAX_BLOCK_NNZ = 1 << 27


def _default_block_nnz(n_clusters: int, n_genes: int, settings: _Settings, in_process: bool = True) -> int:
    """Row-block size for the blocks engine (see ``block_nnz`` in :func:`cluster_stats`).

    Blocks that travel between worker processes (``in_process`` false) stay at most
    4 × ``BLOCK_NNZ``: each is sent to every worker folding one of its cluster ranges.
    """
    acc_bytes = _accumulator_bytes(n_clusters, n_genes, settings)
    if acc_bytes <= BIG_ACCUMULATORS:
        return BLOCK_NNZ
    largest = MAX_BLOCK_NNZ if in_process else BLOCK_NNZ * 4
    return int(np.clip(acc_bytes // BIG_BLOCK_DIVISOR, BLOCK_NNZ * 4, largest))


def _default_client(client: Any) -> Any:
    """The client to use: the one given, else a default distributed client unless Dask is
    configured for a local scheduler."""
    if client is not None:
        return client
    if "dask" not in sys.modules:  # nothing can have configured a scheduler or made a client
        return None
    import dask

    if dask.config.get("scheduler", None) not in (None, "dask.distributed", "distributed"):
        return None
    if "distributed" not in sys.modules:  # no client can exist; skip importing distributed
        return None
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _capacity(client: Any) -> Capacity:
    """What the run can plan for (see :func:`bigcat.cluster.capacity`)."""
    from bigcat.cluster import capacity

    return capacity(client)


def _decompose(cap: Capacity, acc_bytes: int, n_blocks: int, n_clusters: int, in_process: bool) -> tuple[int, int]:
    """R row partitions × C cluster ranges for accumulators of ``acc_bytes``.

    In this process the threads share memory: R copies, plus the result, within a quarter
    of it, and with large accumulators R = 1 (threads split the clusters instead, so the
    accumulators exist once). On a cluster, every piece (its clusters × all genes) must fit
    a quarter of *one worker's* memory, the R copies a quarter of all workers' memory, and
    R × C gives every thread the cluster will have a chain of its own.
    """
    n_blocks = max(n_blocks, 1)
    if in_process:
        budget = 0.25 * cap.memory
        rows = int(max(1, min(cap.threads, budget // acc_bytes - 1, n_blocks)))
        if acc_bytes > BIG_ACCUMULATORS:
            rows = 1
        return rows, int(max(1, min(cap.threads // rows, n_clusters)))
    budget = 0.25 * cap.memory
    slots = cap.total_threads
    ranges_needed = max(1, math.ceil(acc_bytes / budget))
    rows = int(max(1, min(slots // ranges_needed, (budget * cap.workers) // acc_bytes, n_blocks)))
    ranges = max(ranges_needed, slots // rows)
    return rows, int(max(1, min(ranges, n_clusters)))


def _inproc(client: Any) -> bool:
    """Whether the client's workers run in this process (results arrive by reference)."""
    try:
        return str(client.scheduler.address).startswith("inproc://")
    except AttributeError:
        return False
