"""Running work on a Dask cluster and noticing when it cannot finish.

:func:`spread_graph` starts each chain of a pass on its own worker; :func:`completed` and
:func:`gather` wait for futures like distributed does, but end a run with one line
(:class:`ClusterError`) when no worker is left, every worker stays paused at its memory
limit, or Dask cancels the work; :func:`check_visible` refuses local paths the workers
cannot see.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bigcat.errors import BigcatError, BigcatInputError

__all__ = [
    "STALL_TIMEOUT",
    "ClusterError",
    "check_visible",
    "completed",
    "gather",
    "spread_graph",
    "stall_error",
    "worker_info",
    "workers_by_address",
]

log = logging.getLogger("bigcat")


class ClusterError(BigcatError):
    """The cluster could not be started or reached, or cannot finish the work."""


def workers_by_address(client: Any) -> dict[str, dict]:
    """Every connected worker's information, by address (newer distributed's
    ``scheduler_info`` lists 5 unless asked for all)."""
    import inspect

    every = {"n_workers": -1} if "n_workers" in inspect.signature(client.scheduler_info).parameters else {}
    return client.scheduler_info(**every).get("workers", {})


def worker_info(client: Any) -> list[dict]:
    """Every connected worker's information."""
    return list(workers_by_address(client).values())


def spread_graph(client: Any, shared: dict, groups: list[dict], tail: dict, pin: Any) -> Any:
    """One graph of ``shared`` tasks, ``groups`` of tasks that use them and ``tail`` tasks
    that use the groups' results, each group started on one of the connected workers: its
    tasks whose key ``pin(key)`` accepts prefer the ``i % n``-th worker (loosely: another
    takes them if that one leaves), and the rest follow their data.

    The scheduler alone places a group's first task wherever a thread is free at that moment,
    and the rest follow its data: on a cluster whose workers join a second apart, every chain
    of a statistics pass could end up on the first worker. Restricted tasks that must run
    again after every worker was lost wait for the worker they were restricted to (loose or
    not): a run with one worker is not restricted, and :func:`completed` ends a run in
    which no worker has had anything to do for :data:`STALL_TIMEOUT` seconds.
    """
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    addresses = sorted(workers_by_address(client))
    if len(addresses) < 2:  # nothing to spread; and restricted tasks outlive their worker
        addresses = []
    layers = {"bigcat-shared": MaterializedLayer(shared)}
    dependencies: dict[str, set[str]] = {"bigcat-shared": set()}
    for i, group in enumerate(groups):
        annotations = {"workers": [addresses[i % len(addresses)]], "allow_other_workers": True} if addresses else None
        heads = {key: task for key, task in group.items() if pin(key)}
        layers[f"bigcat-head-{i}"] = MaterializedLayer(heads, annotations=annotations)
        dependencies[f"bigcat-head-{i}"] = {"bigcat-shared"}
        layers[f"bigcat-group-{i}"] = MaterializedLayer({k: t for k, t in group.items() if k not in heads})
        dependencies[f"bigcat-group-{i}"] = {"bigcat-shared", f"bigcat-head-{i}"}
    layers["bigcat-tail"] = MaterializedLayer(tail)
    dependencies["bigcat-tail"] = set(dependencies)
    return HighLevelGraph(layers, dependencies)


#: seconds a run waits with no worker left, or every worker paused at its memory limit,
#: before it gives up (a killed last worker used to hang a run forever)
STALL_TIMEOUT = 120.0


def completed(client: Any, futures: list, *, what: str = "the computation") -> Iterator[Any]:
    """The futures in the order they finish, like ``distributed.as_completed``, but ending
    with one line (:class:`ClusterError`) when no worker is left, or every worker stays
    paused at its memory limit, for :data:`STALL_TIMEOUT` seconds, or when Dask cancels
    them (a worker died holding data it cannot recompute, such as a scattered input)."""
    from concurrent.futures import CancelledError

    from distributed import wait

    pending = set(futures)
    stalled_since: float | None = None
    while pending:
        try:
            done, pending = wait(list(pending), timeout=2, return_when="FIRST_COMPLETED")
        except TimeoutError:  # nothing finished in these 2 s
            done = set()
        except CancelledError as error:
            raise stall_error(client, what, cancelled=True) from error
        if any(future.status == "cancelled" for future in done):
            raise stall_error(client, what, cancelled=True)
        if done:
            stalled_since = None
            yield from done
            continue
        workers = worker_info(client)
        paused = bool(workers) and all(str(w.get("status", "")).endswith("paused") for w in workers)
        if workers and not paused and any(client.processing().values()):
            stalled_since = None
            continue
        stalled_since = stalled_since or time.monotonic()
        if time.monotonic() - stalled_since >= STALL_TIMEOUT:
            raise stall_error(client, what, idle=bool(workers) and not paused)


def stall_error(client: Any, what: str, *, cancelled: bool = False, idle: bool = False) -> ClusterError:
    """The one line that ends a run the cluster cannot finish: no worker left, every worker
    paused at its memory limit, (``cancelled``) work Dask gave up on, or (``idle``) work no
    worker is given."""
    workers = client.nthreads() if cancelled else worker_info(client)  # fresh after a worker's death
    if idle and workers:
        return ClusterError(
            f"no Dask worker has had work for {what} for {STALL_TIMEOUT:g} s although some is left (tasks "
            "waiting for workers that are gone); run it again"
        )
    if not workers:
        return ClusterError(
            f"no Dask worker left for {what} (all died or were stopped); restart workers (dask worker, or the "
            "deploy's jobs) with more memory, or use a smaller --block-values"
        )
    if cancelled:
        return ClusterError(
            f"Dask cancelled {what}: a worker died holding data that cannot be computed again (what was sent "
            "to the workers); run it again, with more memory per worker"
        )
    return ClusterError(
        f"every Dask worker has been paused at its memory limit for {STALL_TIMEOUT:g} s during {what}; give the "
        "workers more memory (--memory-limit, memory in cluster.yaml) or use smaller --block-values"
    )


def gather(client: Any, futures: list, *, what: str = "the computation", done: Any = None) -> list:
    """The futures' results in their order, waited for as :func:`completed` waits;
    ``done(i)`` is called as the ``i``-th arrives."""
    position = {future.key: i for i, future in enumerate(futures)}
    results: list = [None] * len(futures)
    for future in completed(client, futures, what=what):
        results[position[future.key]] = future.result()
        if done is not None:
            done(position[future.key])
    return results


def check_visible(client: Any, paths: list[str | os.PathLike]) -> None:
    """Fail early, clearly, when a worker cannot see one of ``paths`` (local files given to a
    remote cluster). Object-storage URLs are not checked here."""
    if client is None:
        return
    local = [str(Path(p).resolve()) for p in paths if "://" not in str(p)]
    if not local:
        return
    here = _identities(local)
    try:
        answers = client.run(_identities, local)
    except Exception as error:  # noqa: BLE001 - a dead worker must not hide the real problem
        log.debug("could not check paths on the workers: %s", error)
        return
    for worker, seen in answers.items():
        for path, mine, theirs in zip(local, here, seen, strict=True):
            if theirs is None:
                msg = (
                    f"{path}: not visible to Dask worker {worker}; put the data on a file system every worker "
                    "mounts, or in object storage (s3://…)"
                )
                raise BigcatInputError(msg)
            if theirs != mine:
                msg = (
                    f"{path}: Dask worker {worker} sees another file or folder at this path (size or modification "
                    "time differ from this machine's); the workers must mount the same file system"
                )
                raise BigcatInputError(msg)


def _identities(paths: list[str]) -> list[tuple | None]:
    """What identifies each path where this runs: kind, size (files) and modification time,
    ``None`` when absent (run on the client and on every worker, compared)."""
    out: list[tuple | None] = []
    for path in map(Path, paths):
        if not path.exists():
            out.append(None)
        elif path.is_dir():  # a folder's own mtime moves with its entries: a Zarr store's root metadata
            meta = path / "zarr.json"
            stat = meta.stat() if meta.is_file() else None
            out.append(("dir", *((stat.st_size, stat.st_mtime_ns) if stat else ())))
        else:
            stat = path.stat()
            out.append(("file", stat.st_size, stat.st_mtime_ns))
    return out
