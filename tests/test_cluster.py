"""Running on Dask clusters: real `dask scheduler`/`dask worker` processes on 127.0.0.1."""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import bigcat
from bigcat.cluster import check_visible, connect
from bigcat.errors import BigcatError, BigcatInputError
from conftest import DaskProcesses, dense


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    """A CSR atlas of raw counts (sums of integers are exact in float64 in any order)."""
    path = tmp_path_factory.mktemp("counts") / "atlas.h5ad"
    bigcat.synth(path, n_cells=6000, n_genes=800, n_clusters=9, nnz_per_cell=60, seed=3, progress=False)
    return path


def test_convert_and_stats_through_a_remote_scheduler_match_the_local_run(dask_scheduler, counts, tmp_path):
    from distributed import Client

    local_store = bigcat.convert(counts, tmp_path / "local.zarr", progress=False)
    with Client(dask_scheduler) as client:
        remote_store = bigcat.convert(counts, tmp_path / "remote.zarr", progress=False, client=client)
        remote = bigcat.cluster_stats(remote_store, stats="sums,present,nnz,means", block_nnz=20_000, client=client)
    src = dense(ad.read_h5ad(counts).X)
    np.testing.assert_array_equal(dense(ad.read_zarr(remote_store).X), src)
    np.testing.assert_array_equal(dense(ad.read_zarr(local_store).X), src)
    local = bigcat.cluster_stats(local_store, stats="sums,present,nnz,means", block_nnz=20_000)
    for name in ("n_cells", "sums", "present_counts", "nnz"):
        np.testing.assert_array_equal(remote[name].values, local[name].values, err_msg=name)
    np.testing.assert_array_equal(remote["means"].values, local["means"].values)


def test_each_row_partition_runs_on_one_worker(dask_scheduler, counts, tmp_path):
    """The pass's plan: a row partition's init, reads and folds on one worker, each partition
    on its own. Were only the inits placed, the first reads (tasks without inputs) ran on
    whichever worker was free and each fold went where the larger of its inputs was: blocks
    were shipped between workers and chains migrated (measured: 67 + 22 and 11 + 78 folds of
    the two partitions on the two workers), and on a loaded SLURM node every fold once ended
    up on one worker."""
    from collections import Counter, defaultdict

    from distributed import Client, get_task_stream

    store = bigcat.convert(counts, tmp_path / "atlas.zarr", progress=False)
    expected = bigcat.cluster_stats(store, stats="sums,nnz")
    with Client(dask_scheduler) as client:
        for _ in range(3):
            with get_task_stream(client) as stream:
                result = bigcat.cluster_stats(store, stats="sums,nnz", block_nnz=2_000, client=client)
            for name in ("n_cells", "sums", "nnz"):
                np.testing.assert_array_equal(result[name].values, expected[name].values, err_msg=name)
            where = {str(t["key"]): t["worker"] for t in stream.data}
            folds: dict = defaultdict(Counter)
            shipped = 0
            for key, worker in where.items():
                if key.startswith("bigcat-fold-"):  # bigcat-fold-TOKEN-PARTITION-RANGE-BLOCK
                    _, _, token, partition, _, block = key.split("-")
                    folds[partition][worker] += 1
                    shipped += where[f"bigcat-read-{token}-{partition}-{block}"] != worker
            assert len(folds) == 2, folds
            assert all(len(workers) == 1 for workers in folds.values()), folds
            assert len({next(iter(workers)) for workers in folds.values()}) == 2, folds
            assert shipped == 0


def test_stats_survive_a_killed_worker(counts, tmp_path):
    """SIGKILL one of two workers mid-run: Dask recomputes what was lost; results stay exact."""
    from distributed import Client

    store = bigcat.convert(counts, tmp_path / "atlas.zarr", progress=False)
    expected = bigcat.cluster_stats(store, stats="sums,nnz")
    processes = DaskProcesses(tmp_path, n_workers=2, threads=1)
    try:
        with Client(processes.address) as client:
            outcome: dict = {}

            def run() -> None:
                try:
                    outcome["result"] = bigcat.cluster_stats(store, stats="sums,nnz", block_nnz=2_000, client=client)
                except BaseException as error:  # noqa: BLE001 - reported below
                    outcome["error"] = error

            thread = threading.Thread(target=run)
            thread.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # wait until work is under way
                processing = client.processing()
                if any(processing.values()):
                    break
                time.sleep(0.02)
            time.sleep(0.2)
            assert thread.is_alive(), "the run ended before the worker could be killed"
            victim = processes.workers[0]
            os.kill(victim.pid, signal.SIGKILL)
            thread.join(timeout=120)
            assert not thread.is_alive()
            assert victim.wait(timeout=10) == -signal.SIGKILL
        assert "error" not in outcome, outcome.get("error")
        for name in ("n_cells", "sums", "nnz"):
            np.testing.assert_array_equal(outcome["result"][name].values, expected[name].values, err_msg=name)
    finally:
        processes.close()


def test_unreachable_scheduler_fails_fast_and_clearly(counts, tmp_path):
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bigcat", "stats", str(counts), "--cluster", "tcp://127.0.0.1:9", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 1
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert time.monotonic() - start < 60


def test_scheduler_address_from_the_environment(dask_scheduler, monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", dask_scheduler)
    with connect() as client:
        assert client.scheduler.address == dask_scheduler
        assert len(client.scheduler_info()["workers"]) == 2


def test_yaml_deploy_class_with_adapt_and_idle_timeout(counts, tmp_path):
    spec = tmp_path / "cluster.yaml"
    spec.write_text(
        "class: distributed.LocalCluster\n"
        "kwargs: {n_workers: 0, threads_per_worker: 1, processes: false, dashboard_address: '127.0.0.1:0'}\n"
        "adapt: {minimum: 1, maximum: 2}\n"
        "idle_timeout: 1 hour\n"
    )
    with connect(spec) as client:
        result = bigcat.cluster_stats(counts, stats="nnz", client=client)
        timeout = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.idle_timeout)
        assert client.cluster._adaptive is not None
    assert timeout == 3600
    x = dense(ad.read_h5ad(counts).X)
    assert int(result["nnz"].values.sum()) == int((x != 0).sum())


def test_missing_deploy_package_names_the_extra(tmp_path):
    spec = tmp_path / "slurm.yaml"
    spec.write_text("class: dask_jobqueue_not_installed_here.SLURMCluster\nkwargs: {cores: 4}\n")
    with pytest.raises(BigcatError, match="not installed"), connect(spec):
        pass
    spec.write_text("class: dask_jobqueue.SLURMCluster\nkwargs: {cores: 4}\n")
    if importlib.util.find_spec("dask_jobqueue") is None:  # (importing it here would replace Ctrl-C's handler)
        with pytest.raises(BigcatError, match=r"pip install 'bigcat\[slurm\]'"), connect(spec):
            pass
    spec.write_text("kwargs: {cores: 4}\n")
    with pytest.raises(BigcatInputError, match="needs `class:"), connect(spec):
        pass


def test_ctrl_c_with_a_jobqueue_deploy_still_exits_interrupted(counts, tmp_path):
    """Importing dask_jobqueue replaces Python's Ctrl-C handler with ``sys.exit()``: a run on
    a jobqueue deploy (here its LocalCluster, jobs as local processes) interrupted by Ctrl-C
    must still unwind as interrupted (status 130), not exit silently with status 0."""
    if importlib.util.find_spec("dask_jobqueue") is None:
        pytest.skip("dask-jobqueue is not installed")
    spec = tmp_path / "jobs.yaml"
    spec.write_text("class: dask_jobqueue.local.LocalCluster\nkwargs: {cores: 1, memory: 1GB, processes: 1}\n")
    wait = "import sys, time; print('ready', flush=True); time.sleep(120)"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bigcat", "open", str(counts), "--cluster", str(spec), "-c", wait],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert "ready" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "bigcat: interrupted" in err


@pytest.mark.parametrize(
    ("deploy", "expected"),
    [
        ("distributed.LocalCluster", "bad arguments for distributed.LocalCluster: unknown option(s) 'bogus_option'"),
        ("dask_jobqueue.SLURMCluster", "bad arguments for dask_jobqueue.SLURMCluster: Got unexpected keyword argument "
                                       "'bogus_option'"),
    ],
)  # fmt: skip
def test_a_bogus_yaml_option_is_one_line(counts, tmp_path, deploy, expected):
    """A LocalCluster passes unknown options to its workers, which failed in their own
    processes with pages of tracebacks and "Nanny failed to start"."""
    pytest.importorskip(deploy.split(".")[0])
    spec = tmp_path / "bad.yaml"
    spec.write_text(f"class: {deploy}\nkwargs: {{n_workers: 1, cores: 1, memory: 1GB, bogus_option: 3}}\n")
    if deploy.startswith("distributed"):
        spec.write_text(f"class: {deploy}\nkwargs: {{n_workers: 1, bogus_option: 3}}\n")
    command = ["stats", str(counts), "--cluster", str(spec), "--out", str(tmp_path / "s.csv"), "--quiet"]
    done = subprocess.run([sys.executable, "-m", "bigcat", *command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"bigcat: error: {spec}: {expected}"), line
    assert not (tmp_path / "s.csv").exists()


def test_unknown_spec_is_a_usage_error():
    with pytest.raises(BigcatInputError, match="unknown cluster spec"), connect("nonsense"):
        pass


def test_paths_invisible_to_workers_are_refused_early(dask_scheduler):
    from distributed import Client

    with Client(dask_scheduler) as client, pytest.raises(BigcatInputError, match="not visible to Dask worker"):
        check_visible(client, ["/no/such/place/atlas.zarr"])


def test_local_cluster_idle_timeout_and_in_process_results(counts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with connect("local", idle_timeout="2 hours", dashboard_address="127.0.0.1:0") as client:
            assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.idle_timeout) == 7200
            result = bigcat.cluster_stats(counts, stats="sums", client=client)
    x = dense(ad.read_h5ad(counts).X).astype(np.float64)
    np.testing.assert_array_equal(result["sums"].values.sum(axis=0), x.sum(axis=0))


def test_sample_through_a_remote_scheduler_matches_the_local_run(dask_scheduler, counts, tmp_path):
    store = bigcat.convert(counts, tmp_path / "atlas.zarr", progress=False)
    local = bigcat.sample(store, tmp_path / "local.zarr", cells=0.3, genes=0.5, seed=4, progress=False)
    done = subprocess.run(
        [sys.executable, "-m", "bigcat", "sample", str(store), str(tmp_path / "remote.zarr"), "--cells", "0.3",
         "--genes", "0.5", "--seed", "4", "--cluster", dask_scheduler, "--quiet"],
        capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Dask dashboard" in done.stderr
    a, b = bigcat.open_dataset(tmp_path / "remote.zarr"), bigcat.open_dataset(local)
    np.testing.assert_array_equal(dense(a.X.data.compute()), dense(b.X.data.compute()))
    assert list(a.cell.values) == list(b.cell.values)
    assert list(a.gene.values) == list(b.gene.values)
    assert a.sizes["cell"] == round(0.3 * 6000)


def test_in_process_local_cluster_gets_the_result_memory_by_reference(tmp_path):
    """distributed pickles every graph, also for a worker in this process: the preallocated
    result views (2.7 GB at 5,000 clusters) were copied into it, which made the default
    `--cluster local` 2.4× slower than threads. Now they travel as references."""
    path = tmp_path / "wide.h5ad"
    bigcat.synth(path, n_cells=3000, n_genes=6000, n_clusters=300, nnz_per_cell=200, seed=1, progress=False)
    expected = bigcat.cluster_stats(path, stats="sums,sqr_sums,present")  # 300 × 6000 × 18 bytes = 32 MB
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with connect("local", dashboard_address="127.0.0.1:0") as client:
            result = bigcat.cluster_stats(path, stats="sums,sqr_sums,present", client=client)
    large = [w for w in caught if "large graph" in str(w.message)]
    assert not large, large[0].message
    for name in ("sums", "sqr_sums", "present_counts"):
        np.testing.assert_array_equal(result[name].values, expected[name].values, err_msg=name)


def test_relative_paths_mean_the_clients_files_on_a_remote_cluster(tmp_path):
    """Workers started in another folder holding a different file of the same name: a
    relative input was read there (wrong numbers) and a relative output written there (a
    "complete" store of zeros), both with exit code 0."""
    mine, theirs = tmp_path / "client", tmp_path / "workers"
    mine.mkdir()
    theirs.mkdir()
    bigcat.synth(mine / "g.h5ad", n_cells=2000, n_genes=300, n_clusters=4, nnz_per_cell=40, seed=1, progress=False)
    bigcat.synth(theirs / "g.h5ad", n_cells=2000, n_genes=300, n_clusters=4, nnz_per_cell=40, seed=2, progress=False)
    expected = bigcat.cluster_stats(mine / "g.h5ad", stats="sums")
    processes = DaskProcesses(tmp_path, n_workers=1, threads=1, cwd=theirs)
    try:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        run = {"capture_output": True, "text": True, "timeout": 180, "env": env, "cwd": mine}
        stats = subprocess.run([sys.executable, "-m", "bigcat", "stats", "g.h5ad", "--stats", "sums", "--out",
                                "s.zarr", "--cluster", processes.address, "--quiet"], **run)  # fmt: skip
        assert stats.returncode == 0, stats.stderr
        np.testing.assert_array_equal(bigcat.read_stats(mine / "s.zarr")["sums"].values, expected["sums"].values)
        copy = subprocess.run([sys.executable, "-m", "bigcat", "convert", "g.h5ad", "rel-out.zarr", "--cluster",
                               processes.address, "--quiet"], **run)  # fmt: skip
        assert copy.returncode == 0, copy.stderr
        assert not (theirs / "rel-out.zarr").exists()
        np.testing.assert_array_equal(
            dense(ad.read_zarr(mine / "rel-out.zarr").X), dense(ad.read_h5ad(mine / "g.h5ad").X)
        )
    finally:
        processes.close()


def test_a_worker_seeing_another_file_at_the_same_path_is_refused(dask_scheduler, tmp_path):
    """Existence is not enough: what the workers see (kind, size, modification time) must be
    the client's file."""
    from distributed import Client

    path = tmp_path / "x.bin"
    path.write_bytes(b"0" * 100)
    with Client(dask_scheduler) as client:
        check_visible(client, [path])  # real workers, the same file: fine

    class OtherMachine:  # answers as workers whose file system holds another x.bin
        def run(self, function, paths):
            return {"tcp://other-machine:1234": [("file", 100, 0) for _ in paths]}

    with pytest.raises(BigcatInputError, match=r"x\.bin: Dask worker tcp://other-machine:1234 sees another file"):
        check_visible(OtherMachine(), [path])


@pytest.fixture(scope="module")
def watched(counts, tmp_path_factory):
    """A store of the counts and statistics of them, for the runs below."""
    folder = tmp_path_factory.mktemp("watched")
    store = bigcat.convert(counts, folder / "atlas.zarr", progress=False)
    return {"h5ad": counts, "store": store, "stats": bigcat.cluster_stats(store, normalize="log2cpm")}


def _operation(name: str, data: dict, out: Path, client) -> None:
    """One of the distributed paths, in many small tasks."""
    if name == "stats":
        bigcat.cluster_stats(data["store"], stats="sums,nnz", block_nnz=2_000, client=client)
    elif name == "convert":
        bigcat.convert(data["h5ad"], out / "copy.zarr", shard_values=2_000, client=client, progress=False)
    elif name == "sample":
        bigcat.sample(data["store"], out / "sample.zarr", cells=0.5, seed=1, client=client, progress=False)
    else:
        bigcat.map_cells(data["store"], data["stats"], client=client)


WHAT = {"stats": "cluster statistics", "convert": "the parallel copy", "sample": "sampling", "map": "mapping"}


@pytest.mark.parametrize("how", ["killed", "paused"])
@pytest.mark.parametrize("name", list(WHAT))
def test_a_run_with_no_working_worker_ends_with_one_line(watched, tmp_path, monkeypatch, name, how):
    """Killing the last worker hung `stats` forever, and a worker paused at its memory limit
    (250 MB workers) hung every distributed path: each ends with one line now."""
    # imported here when no earlier test has (bigcat's modules load lazily)
    monkeypatch.setattr(importlib.import_module("bigcat._scheduling"), "STALL_TIMEOUT", 3.0)
    monkeypatch.setattr(importlib.import_module("bigcat.sample"), "BLOCK_NNZ", 2_000)  # many small tasks
    monkeypatch.setattr(importlib.import_module("bigcat.mapping"), "QUERY_BLOCK_NNZ", 2_000)
    # paused at once: the pause threshold is below what a worker process takes to start
    env = {"DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE": "0.01"} if how == "paused" else None
    processes = DaskProcesses(tmp_path, n_workers=1, threads=1, memory_limit="2GB", env=env)
    try:
        from distributed import Client

        with Client(processes.address) as client:
            outcome: dict = {}

            def run() -> None:
                try:
                    _operation(name, watched, tmp_path, client)
                except BaseException as error:  # noqa: BLE001 - reported below
                    outcome["error"] = error

            thread = threading.Thread(target=run)
            thread.start()
            if how == "killed":
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not any(client.processing().values()):
                    time.sleep(0.02)
                os.kill(processes.workers[0].pid, signal.SIGKILL)
            start = time.monotonic()
            thread.join(timeout=120)
            assert not thread.is_alive(), "the run still hangs"
            assert time.monotonic() - start < 60
        error = outcome.get("error")
        assert isinstance(error, BigcatError), error
        expected = "no Dask worker left for" if how == "killed" else "every Dask worker has been paused at its memory"
        assert expected in str(error)
        assert WHAT[name] in str(error)
        assert "\n" not in str(error)
        assert not (tmp_path / "copy.zarr").exists()
        assert not (tmp_path / "sample.zarr").exists()
    finally:
        processes.close()
