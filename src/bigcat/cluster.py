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
      wait: 2 minutes

Clusters bigcat starts shut down when the ``with`` block ends, and their scheduler
stops by itself after ``idle_timeout`` without work (``distributed.scheduler.idle-timeout``).

Work is sized from what the cluster *will* have, not from the workers present when a
graph is built (with adaptive scaling there are none yet): :func:`capacity` reads the
deploy's worker spec (cores, memory, processes per job) and the adapt maximum, and
:func:`use_workers` asks an adaptive cluster for the workers a run was planned for (its
minimum is raised for the run) and waits up to ``wait`` for them to join before the work is
submitted, so every worker gets a share.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigcat._scheduling import ClusterError, check_visible, worker_info
from bigcat.errors import BigcatInputError

__all__ = ["SPECS", "Capacity", "capacity", "check_visible", "connect", "local_cluster_options", "use_workers"]

log = logging.getLogger("bigcat")

SPECS = ("local", "threads", "sync", "tcp://HOST:PORT", "cluster.yaml")
#: deploy packages and the bigcat extra that installs each
EXTRAS = {"dask_jobqueue": "slurm", "dask_kubernetes": "kubernetes", "coiled": "coiled"}
#: seconds to wait for a remote scheduler before giving up
CONNECT_TIMEOUT = 15
#: seconds a run waits for the workers it was planned for (YAML ``wait:`` overrides it)
WORKER_WAIT = 120.0
#: seconds a dask-jobqueue worker outlives a scheduler it lost (jobqueue's default is 60):
#: when bigcat is killed, its worker jobs end this soon after
DEATH_TIMEOUT = 10
#: the YAML keys of a deploy spec
YAML_KEYS = ("class", "kwargs", "adapt", "idle_timeout", "wait")


def local_cluster_options() -> dict[str, Any]:
    """How bigcat sizes a ``LocalCluster`` on this machine.

    One worker, *in this process* (``processes=False``), using every core as a thread:
    bigcat's hot loops (numba kernels, decompression, h5py/zarr reads) release the GIL, so
    threads lose nothing to processes, while sharing one copy of the inputs and of the
    per-cluster accumulators instead of one per process, and results reach the client by
    reference instead of being pickled — a worker process would hold the result and send a
    second copy. The worker may use 80% of the machine's memory, leaving the rest to the
    page cache. The scheduler, dashboard and diagnostics are distributed's own.
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
    unknown = set(config) - set(YAML_KEYS)
    if unknown:
        msg = f"{path}: unknown keys {sorted(unknown)}; use {', '.join(YAML_KEYS)}"
        raise BigcatInputError(msg)
    for key in ("kwargs", "adapt"):
        if not isinstance(config.get(key) or {}, dict):
            msg = f"{path}: `{key}:` must be a mapping of keyword arguments"
            raise BigcatInputError(msg)
    return config


def _import_keeping_ctrl_c(module_name: str) -> Any:
    """Import a deploy package, keeping this process' Ctrl-C handler: importing
    ``dask_jobqueue`` replaces it with one calling ``sys.exit()``, which turned an
    interrupted run into a silent exit with status 0 instead of 130 ("interrupted")."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        return importlib.import_module(module_name)
    finally:
        if main and signal.getsignal(signal.SIGINT) is not before:
            signal.signal(signal.SIGINT, before)


def _deploy_class(path: Path, dotted: str) -> Any:
    module_name, _, name = dotted.rpartition(".")
    if not module_name:
        msg = f"{path}: class {dotted!r} must be a dotted path such as dask_jobqueue.SLURMCluster"
        raise BigcatInputError(msg)
    try:
        module = _import_keeping_ctrl_c(module_name)
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


@dataclass(frozen=True)
class Capacity:
    """What a cluster has, or will have, to run a computation on.

    ``workers`` counts the workers a run can expect (the adapt maximum of a deploy bigcat
    started, else the workers present); ``threads`` and ``memory`` are *per worker* (the
    smallest present, or the deploy's worker spec when none has joined yet).
    """

    workers: int
    threads: int
    memory: int  # bytes a worker may use
    present: int = 0  # workers connected now

    @property
    def total_threads(self) -> int:
        return self.workers * self.threads


@dataclass
class _Deployment:
    """A cluster bigcat started from a YAML spec: how to ask it for workers."""

    cluster: Any
    adaptive: Any  # distributed's Adaptive, or None
    threads: int | None  # per worker, from the deploy's worker spec
    memory: int | None
    wait: float


#: clusters bigcat started, by client (filled by :func:`connect`, emptied as clients go)
_DEPLOYMENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _this_machine() -> Capacity:
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Capacity(workers=1, threads=cores, memory=int(psutil.virtual_memory().total), present=1)


def capacity(client: Any) -> Capacity:
    """The workers, threads per worker and memory per worker a run on ``client`` can plan for.

    ``None`` (Dask's in-process schedulers): this machine as one worker. For a cluster
    bigcat started with adaptive scaling, the adapt ``maximum`` and the deploy's worker spec
    (a dask-jobqueue job's cores, memory and processes; a ``SpecCluster``'s worker options),
    whatever has joined yet; otherwise the workers connected to the scheduler.
    """
    if client is None:
        return _this_machine()
    workers = worker_info(client)
    present = len(workers)
    threads = min((w.get("nthreads") or 1 for w in workers), default=0)
    memory = min((w.get("memory_limit") or 0 for w in workers), default=0)
    deployment = _DEPLOYMENTS.get(client)
    expected = present
    if deployment is not None:
        threads = deployment.threads or threads
        memory = deployment.memory or memory
        if deployment.adaptive is not None:
            expected = max(present, int(deployment.adaptive.maximum))
        else:
            expected = max(present, len(getattr(deployment.cluster, "worker_spec", {}) or {}))
    if not memory:
        memory = _this_machine().memory
    return Capacity(workers=max(expected, 1), threads=max(threads, 1), memory=int(memory), present=present)


def _worker_spec(cluster: Any) -> tuple[int | None, int | None]:
    """Threads and memory (bytes) of one worker of a deploy, from its worker spec."""
    from dask.utils import parse_bytes

    job = getattr(cluster, "_dummy_job", None)  # dask-jobqueue: the job every worker is cut from
    if job is not None:
        processes = max(int(getattr(job, "worker_processes", 1) or 1), 1)
        cores = getattr(job, "worker_cores", None)
        memory = getattr(job, "worker_memory", None)
        threads = max(int(cores) // processes, 1) if cores else None
        return threads, (int(memory) // processes if memory else None)
    options = (getattr(cluster, "new_spec", None) or {}).get("options", {}) or {}
    threads = options.get("nthreads")
    memory = options.get("memory_limit")
    if isinstance(memory, str):
        try:
            memory = parse_bytes(memory)
        except ValueError:
            memory = None
    if isinstance(memory, float) and memory <= 1:  # a fraction of this machine
        memory = int(memory * _this_machine().memory)
    return (int(threads) if threads else None), (int(memory) if memory else None)


def _parse_seconds(value: Any, path: Path, key: str) -> float:
    from dask.utils import parse_timedelta

    try:
        return float(parse_timedelta(value, default="seconds"))
    except (ValueError, TypeError, KeyError) as error:
        msg = f"{path}: `{key}: {value}` is not a duration (e.g. 2 minutes, 90 s)"
        raise BigcatInputError(msg) from error


@contextlib.contextmanager
def use_workers(client: Any, n: int, *, what: str = "the computation") -> Iterator[int]:
    """Have ``n`` workers for the duration of a ``with`` block; yields how many joined.

    For an adaptive cluster bigcat started, the adapt minimum is raised to ``n`` (at most
    its maximum) for the block, so the deploy submits the jobs the plan counted on instead
    of sizing itself from the first few tasks, and the block starts once they joined or
    after the spec's ``wait`` (default 2 minutes) with those present. Without any worker
    after that long, it fails with one line. ``None`` (in-process schedulers): nothing to do.
    """
    if client is None:
        yield 1
        return
    deployment = _DEPLOYMENTS.get(client)
    wait = deployment.wait if deployment is not None else WORKER_WAIT
    adaptive = deployment.adaptive if deployment is not None else None
    previous = None
    if adaptive is not None:
        previous = adaptive.minimum
        n = max(1, min(n, int(adaptive.maximum)))
        adaptive.minimum = max(previous, n)
    try:
        joined = _wait_for_workers(client, max(n, 1), wait, what)
        yield joined
    finally:
        if adaptive is not None and previous is not None:
            adaptive.minimum = previous


def _wait_for_workers(client: Any, n: int, wait: float, what: str) -> int:
    deadline = time.monotonic() + wait
    present = len(worker_info(client))
    while present < n and time.monotonic() < deadline:
        time.sleep(0.2)
        present = len(worker_info(client))
    if present == 0:
        msg = (
            f"no Dask worker joined the scheduler at {client.scheduler.address} within {wait:g} s for {what}; "
            "check that the deploy can start workers (squeue, the job logs) or raise `wait:` in the cluster spec"
        )
        raise ClusterError(msg)
    if present < n:
        log.warning("%d of %d planned Dask workers joined within %g s; %s runs on those", present, n, wait, what)
    return present


@contextlib.contextmanager
def _quiet_distributed() -> Iterator[None]:
    """distributed's loggers silenced (a client closing after its scheduler stopped logs
    the cancelled reconnection as a traceback)."""
    names = [name for name in logging.root.manager.loggerDict if name.split(".")[0] == "distributed"]
    loggers = [logging.getLogger(name) for name in ["distributed", *names]]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _scheduler_gone(client: Any) -> bool:
    return getattr(client, "status", "running") not in ("running", "newly-created")


def _close(client: Any, cluster: Any = None) -> None:
    """Close a client (and the cluster bigcat started) promptly, also when the scheduler
    already stopped on its idle timeout: distributed would retry connecting to it for 30 s
    (``distributed.comm.timeouts.connect``) and log the cancelled retry as a traceback."""
    import dask

    if not _scheduler_gone(client):
        client.close()
        if cluster is not None:
            cluster.close()
        return
    log.warning("the Dask scheduler has stopped (idle timeout, or it was shut down); closing the client")
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), _quiet_distributed():
        with contextlib.suppress(Exception):
            client.close(timeout=5)
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close(timeout=10)


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

    Notes
    -----
    dask-jobqueue workers get ``death_timeout`` 10 s unless the spec sets it, so their jobs
    end seconds after the bigcat process that ran their scheduler is killed. Leaving the
    block closes the client and the cluster promptly even when the scheduler has already
    stopped on its idle timeout.
    """
    if spec is None:
        spec = os.environ.get("DASK_SCHEDULER_ADDRESS") or "local"
    spec = str(spec)
    config = {"distributed.scheduler.idle-timeout": idle_timeout} if idle_timeout else {}
    if spec == "threads" and "dask" not in sys.modules:
        # nothing configured Dask yet: its default is threads, and bigcat's own passes run
        # on threads without it (importing dask costs 0.1 s of every command)
        yield None
        return
    import dask

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
        try:
            log.info("connected to %s; dashboard: %s", spec, client.dashboard_link)
            yield client
        finally:
            _close(client)
        return
    if spec == "local":
        from distributed import LocalCluster

        with dask.config.set(config):
            cluster = LocalCluster(**{**local_cluster_options(), **options})
        yield from _serve(cluster, "local cluster", adapt=None, wait=WORKER_WAIT)
        return
    path = Path(spec)
    if not path.is_file():
        msg = f"unknown cluster spec {spec!r}: use local, threads, sync, tcp://host:port or a YAML file"
        raise BigcatInputError(msg)
    deploy = _load_yaml(path)
    cls = _deploy_class(path, deploy["class"])
    kwargs = {**(deploy.get("kwargs") or {}), **options}
    if deploy["class"].startswith("dask_jobqueue.") and "death_timeout" not in kwargs:
        kwargs["death_timeout"] = DEATH_TIMEOUT
    timeout = idle_timeout or deploy.get("idle_timeout")
    if timeout:
        _parse_seconds(timeout, path, "idle_timeout")
    wait = _parse_seconds(deploy["wait"], path, "wait") if "wait" in deploy else WORKER_WAIT
    config = {"distributed.scheduler.idle-timeout": timeout} if timeout else {}
    unknown = _unknown_worker_options(cls, kwargs)
    if unknown:
        msg = f"{path}: bad arguments for {deploy['class']}: unknown option(s) {', '.join(map(repr, unknown))}"
        raise BigcatInputError(msg)
    with dask.config.set(config):
        try:
            # a bad worker argument fails in the worker's process: distributed logs pages of
            # tracebacks and raises "Nanny failed to start", the TypeError in its chain
            with _quiet_distributed():
                cluster = cls(**kwargs)
        except Exception as error:
            cause = _argument_error(error)
            if cause is None:
                raise
            msg = f"{path}: bad arguments for {deploy['class']}: {_first_line(cause)}"
            raise BigcatInputError(msg) from error
    yield from _serve(cluster, deploy["class"], adapt=deploy.get("adapt"), wait=wait, path=path)


def _unknown_worker_options(cls: Any, kwargs: dict) -> list[str]:
    """Options a LocalCluster (or subclass) would pass on to its workers that no worker
    takes: they fail in each worker's process, which logs its traceback there."""
    import inspect

    from distributed import LocalCluster, Nanny, Worker
    from distributed.core import Server

    if not (isinstance(cls, type) and issubclass(cls, LocalCluster)):
        return []
    known: set[str] = set()
    for kind in {cls, LocalCluster, Nanny, Worker, Server}:
        known |= set(inspect.signature(kind.__init__).parameters)  # type: ignore[misc]
    return sorted(set(kwargs) - known)


def _argument_error(error: BaseException) -> BaseException | None:
    """The TypeError or ValueError behind ``error`` (itself, its cause or its context)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, (TypeError, ValueError)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _serve(cluster: Any, name: str, *, adapt: dict | None, wait: float, path: Path | None = None) -> Iterator[Any]:
    """The body of :func:`connect` for a cluster bigcat started: adapt, a client, and a
    prompt, quiet shutdown."""
    from distributed import Client

    client = None
    try:
        adaptive = None
        if adapt:
            try:
                adaptive = cluster.adapt(**adapt)
            except TypeError as error:
                msg = f"{path}: bad `adapt:` arguments: {_first_line(error)}"
                raise BigcatInputError(msg) from error
        client = Client(cluster)
        threads, memory = _worker_spec(cluster)
        _DEPLOYMENTS[client] = _Deployment(cluster, adaptive, threads, memory, wait)
        log.info("%s; dashboard: %s", name, client.dashboard_link)
        yield client
    finally:
        if client is not None:
            _DEPLOYMENTS.pop(client, None)
            _close(client, cluster)
        else:
            with contextlib.suppress(Exception):
                cluster.close()
