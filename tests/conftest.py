"""Shared fixtures: small synthetic atlases in every X encoding, and the old-anndata archives."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import bigcat

DATA = Path(__file__).parent / "data"
ARCHIVES = DATA / "anndata-archives"


@pytest.fixture(scope="session")
def atlas_h5ad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic atlas written by bigcat synth (CSR counts)."""
    path = tmp_path_factory.mktemp("atlas") / "atlas.h5ad"
    bigcat.synth(path, n_cells=3000, n_genes=1500, n_clusters=12, nnz_per_cell=150, seed=7, progress=False)
    return path


@pytest.fixture(scope="session")
def atlas(atlas_h5ad: Path) -> ad.AnnData:
    """The same atlas, read into memory by anndata (the independent reference)."""
    return ad.read_h5ad(atlas_h5ad)


@pytest.fixture(scope="session")
def encodings(atlas: ad.AnnData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The atlas written by anndata with X as CSR, CSC, dense, int64 and big-endian float64."""
    folder = tmp_path_factory.mktemp("encodings")
    out = {}
    variants = {
        "csr": atlas.X.tocsr(),
        "csc": atlas.X.tocsc(),
        "dense": atlas.X.toarray(),
        "int64": atlas.X.astype(np.int64),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, x in variants.items():
            path = folder / f"{name}.h5ad"
            ad.AnnData(X=x, obs=atlas.obs, var=atlas.var).write_h5ad(path)
            out[name] = path
    # big-endian float64 written by hand (anndata always writes native order)
    import h5py

    path = folder / "bigendian.h5ad"
    ad.AnnData(obs=atlas.obs, var=atlas.var).write_h5ad(path)
    csr = sp.csr_matrix(atlas.X, dtype=np.float64)
    with h5py.File(path, "a") as f:
        g = f.create_group("X")
        g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": np.array(csr.shape)})
        g.create_dataset("data", data=csr.data.astype(">f8"))
        g.create_dataset("indices", data=csr.indices.astype(">i4"))
        g.create_dataset("indptr", data=csr.indptr.astype(">i8"))
    out["bigendian"] = path
    return out


def dense(x) -> np.ndarray:
    """Any matrix (SciPy, pydata-sparse, NumPy) as a dense NumPy array."""
    if hasattr(x, "toarray"):
        return np.asarray(x.toarray())
    if hasattr(x, "todense"):
        return np.asarray(x.todense())
    return np.asarray(x)


class DaskProcesses:
    """A real ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1 (free ports)."""

    def __init__(
        self,
        folder: Path,
        n_workers: int = 2,
        threads: int = 1,
        *,
        memory_limit: str = "3GB",
        nanny: bool = False,
        env: dict | None = None,
        cwd: Path | None = None,
    ) -> None:
        import json
        import os
        import subprocess
        import sys
        import time

        self.folder = folder
        self.procs: list = []
        self.workers: list = []
        info = folder / "scheduler.json"
        dask = str(Path(sys.executable).parent / "dask")
        self.logs = [(folder / "scheduler.log").open("w")]
        scheduler = subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
             "--scheduler-file", str(info)],
            stdout=self.logs[0], stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )  # fmt: skip
        self.procs.append(scheduler)
        deadline = time.monotonic() + 60
        while not info.exists() or not info.read_text().strip():
            if time.monotonic() > deadline or scheduler.poll() is not None:
                self.close()
                pytest.fail(f"dask scheduler did not start: {(folder / 'scheduler.log').read_text()}")
            time.sleep(0.1)
        self.address = json.loads(info.read_text())["address"]
        for i in range(n_workers):
            log = (folder / f"worker{i}.log").open("w")
            self.logs.append(log)
            worker = subprocess.Popen(
                [dask, "worker", self.address, "--nthreads", str(threads), "--nworkers", "1", "--memory-limit",
                 memory_limit, "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0",
                 "--nanny" if nanny else "--no-nanny"],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd,
            )  # fmt: skip
            self.procs.append(worker)
            self.workers.append(worker)
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(n_workers, timeout=60)

    def close(self) -> None:
        import subprocess

        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in self.logs:
            log.close()


@pytest.fixture(scope="session")
def dask_scheduler(tmp_path_factory: pytest.TempPathFactory):
    """Address of a session-wide scheduler with two single-threaded worker processes."""
    processes = DaskProcesses(tmp_path_factory.mktemp("dask"), n_workers=2, threads=1)
    try:
        yield processes.address
    finally:
        processes.close()


class S3Server:
    """moto's S3-compatible server in its own process on 127.0.0.1 (a free port)."""

    def __init__(self, folder: Path, **env: str) -> None:
        import os
        import socket
        import subprocess
        import sys
        import time
        import urllib.error
        import urllib.request

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = (folder / f"moto-{self.port}.log").open("w")
        server = str(Path(sys.executable).parent / "moto_server")
        self.proc = subprocess.Popen(
            [server, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                break
            except urllib.error.HTTPError:  # it answers (with authentication on, with an error)
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    pytest.fail("moto_server did not start")
                time.sleep(0.1)

    def options(self, **extra: object) -> dict:
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing", **extra}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A running S3 server and a bucket ``bigcat-test``; yields the server (``.options()``)."""
    import s3fs

    server = S3Server(tmp_path_factory.mktemp("s3"))
    try:
        fs = s3fs.S3FileSystem(**server.options(), skip_instance_cache=True)
        fs.mkdir("bigcat-test")
        yield server
    finally:
        server.close()


class _RaisingScheduler:
    """A Dask scheduler that fails the test when anything is computed (flox's guard)."""

    def __call__(self, dsk, keys, **kwargs):
        pytest.fail("Dask computed something where nothing should be computed")


def raise_if_dask_computes():
    """Context: any Dask computation inside it fails the test."""
    import dask

    return dask.config.set(scheduler=_RaisingScheduler())
