"""Connecting to Dask: one ``spec`` string from a laptop to an HPC or cloud cluster.

``spec`` values (see :func:`connect`):

- ``local`` — a ``distributed.LocalCluster`` sized for this machine (the default);
- ``threads`` / ``sync`` — Dask's in-process threaded or single-threaded scheduler;
- ``tcp://host:port`` (or ``tls://``, ``ws://``…) — an existing scheduler;
  ``DASK_SCHEDULER_ADDRESS`` is used when no spec is given;
- a path to a YAML file naming a deploy class (``dask_jobqueue.SLURMCluster``,
  ``dask_kubernetes.operator.KubeCluster``, ``coiled.Cluster``, ``distributed.LocalCluster``…)
  with its keyword arguments and, optionally, adaptive scaling::

      class: dask_jobqueue.SLURMCluster
      kwargs: {cores: 32, memory: 128GB, walltime: "04:00:00", queue: normal}
      adapt: {minimum: 0, maximum: 20}
      idle_timeout: 30 minutes

Clusters bigcat starts shut down when the ``with`` block ends, and their scheduler
stops by itself after ``idle_timeout`` without work (``distributed.scheduler.idle-timeout``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bigcat.errors import BigcatError, BigcatInputError

__all__ = ["SPECS", "check_visible", "connect", "local_cluster_options"]

log = logging.getLogger("bigcat")

SPECS = ("local", "threads", "sync", "tcp://HOST:PORT", "cluster.yaml")
#: deploy packages and the bigcat extra that installs each
EXTRAS = {"dask_jobqueue": "slurm", "dask_kubernetes": "kubernetes", "coiled": "coiled"}
#: seconds to wait for a remote scheduler before giving up
CONNECT_TIMEOUT = 15


class ClusterError(BigcatError):
    """The cluster could not be started or reached."""


def local_cluster_options() -> dict[str, Any]:
    """How bigcat sizes a ``LocalCluster`` on this machine.

    One worker, *in this process* (``processes=False``), using every core as a thread:
    bigcat's hot loops (numba kernels, decompression, h5py/zarr reads) release the GIL, so
    threads lose nothing to processes, while sharing one copy of the inputs and of the
    per-cluster accumulators (at 5,000 clusters × 32,285 genes, 3.2 GB) instead of one per
    process, and results reach the client by reference instead of being pickled — a
    worker process would hold the result and send a second copy. The worker may use 80%
    of the machine's memory, leaving the rest to the page cache. The scheduler, dashboard
    and diagnostics are distributed's own.
    """
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {
        "n_workers": 1,
        "threads_per_worker": cores,
        "processes": False,
        "memory_limit": int(psutil.virtual_memory().total * 0.8),
        "dashboard_address": "127.0.0.1:8787",  # loopback: reach it from elsewhere by SSH forwarding
        "silence_logs": logging.ERROR,
    }


def _is_address(spec: str) -> bool:
    return "://" in spec and not spec.startswith("file://")


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        msg = f"{path}: not a readable YAML cluster spec ({str(error).splitlines()[0]})"
        raise BigcatInputError(msg) from error
    if not isinstance(config, dict) or not isinstance(config.get("class"), str):
        msg = f"{path}: a cluster spec needs `class: package.ClusterClass` (e.g. dask_jobqueue.SLURMCluster)"
        raise BigcatInputError(msg)
    unknown = set(config) - {"class", "kwargs", "adapt", "idle_timeout"}
    if unknown:
        msg = f"{path}: unknown keys {sorted(unknown)}; use class, kwargs, adapt, idle_timeout"
        raise BigcatInputError(msg)
    return config


def _deploy_class(path: Path, dotted: str) -> Any:
    module_name, _, name = dotted.rpartition(".")
    if not module_name:
        msg = f"{path}: class {dotted!r} must be a dotted path such as dask_jobqueue.SLURMCluster"
        raise BigcatInputError(msg)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        top = module_name.split(".")[0]
        extra = EXTRAS.get(top)
        hint = f"pip install 'bigcat[{extra}]'" if extra else f"install the package providing {module_name}"
        msg = f"{path}: {dotted} needs {top}, which is not installed; {hint}"
        raise ClusterError(msg) from error
    try:
        return getattr(module, name)
    except AttributeError as error:
        msg = f"{path}: {module_name} has no {name}"
        raise BigcatInputError(msg) from error


@contextlib.contextmanager
def connect(spec: str | os.PathLike | None = None, *, idle_timeout: str | None = None, **options: Any) -> Iterator[Any]:
    """Start or connect to a Dask cluster for the duration of a ``with`` block.

    Parameters
    ----------
    spec
        ``"local"``, ``"threads"``, ``"sync"``, a scheduler address (``tcp://host:8786``) or a
        YAML deploy spec (see the module documentation). ``None``: ``DASK_SCHEDULER_ADDRESS``
        if set, else ``"local"``.
    idle_timeout
        For clusters bigcat starts: the scheduler shuts down after this long without work
        (e.g. ``"30 minutes"``), so a forgotten cluster stops costing money.
    **options
        Keyword arguments for ``LocalCluster`` (``local``) or overrides of the YAML ``kwargs``.

    Yields
    ------
    distributed.Client or None
        The client; ``None`` for ``threads``/``sync`` (Dask's in-process schedulers, made
        the default for the block).

    Raises
    ------
    ClusterError
        The scheduler cannot be reached within 15 s, or a deploy class is not installed.
    """
    import dask

    if spec is None:
        spec = os.environ.get("DASK_SCHEDULER_ADDRESS") or "local"
    spec = str(spec)
    config = {"distributed.scheduler.idle-timeout": idle_timeout} if idle_timeout else {}
    if spec in ("threads", "sync"):
        with dask.config.set(scheduler="threads" if spec == "threads" else "synchronous"):
            yield None
        return
    from distributed import Client

    if _is_address(spec):
        try:
            client = Client(spec, timeout=CONNECT_TIMEOUT, set_as_default=True)
        except (OSError, TimeoutError) as error:
            msg = f"cannot reach the Dask scheduler at {spec} within {CONNECT_TIMEOUT} s ({type(error).__name__})"
            raise ClusterError(msg) from error
        with client:
            log.info("connected to %s; dashboard: %s", spec, client.dashboard_link)
            yield client
        return
    if spec == "local":
        from distributed import LocalCluster

        with (
            dask.config.set(config),
            LocalCluster(**{**local_cluster_options(), **options}) as cluster,
            Client(cluster) as client,
        ):
            log.info("local cluster; dashboard: %s", client.dashboard_link)
            yield client
        return
    path = Path(spec)
    if not path.is_file():
        msg = f"unknown cluster spec {spec!r}: use local, threads, sync, tcp://host:port or a YAML file"
        raise BigcatInputError(msg)
    deploy = _load_yaml(path)
    cls = _deploy_class(path, deploy["class"])
    kwargs = {**(deploy.get("kwargs") or {}), **options}
    timeout = idle_timeout or deploy.get("idle_timeout")
    config = {"distributed.scheduler.idle-timeout": timeout} if timeout else {}
    with dask.config.set(config):
        try:
            cluster = cls(**kwargs)
        except TypeError as error:
            msg = f"{path}: bad arguments for {deploy['class']}: {error}"
            raise BigcatInputError(msg) from error
    with cluster:
        adapt = deploy.get("adapt")
        if adapt:
            cluster.adapt(**adapt)
        with Client(cluster) as client:
            log.info("%s; dashboard: %s", deploy["class"], client.dashboard_link)
            yield client


def check_visible(client: Any, paths: list[str | os.PathLike]) -> None:
    """Fail early, clearly, when a worker cannot see one of ``paths`` (local files given to a
    remote cluster). Object-storage URLs are not checked here."""
    if client is None:
        return
    local = [str(Path(p).resolve()) for p in paths if "://" not in str(p)]
    if not local:
        return

    def missing(candidates: list[str]) -> list[str]:
        return [p for p in candidates if not Path(p).exists()]

    try:
        answers = client.run(missing, local)
    except Exception as error:  # noqa: BLE001 - a dead worker must not hide the real problem
        log.debug("could not check paths on the workers: %s", error)
        return
    for worker, lost in answers.items():
        if lost:
            msg = (
                f"{lost[0]}: not visible to Dask worker {worker}; put the data on a file system every worker "
                "mounts, or in object storage (s3://…)"
            )
            raise BigcatInputError(msg)
