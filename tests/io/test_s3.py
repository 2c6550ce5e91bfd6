"""Object storage against a real S3-protocol server (moto's server mode) on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import s3fs

import bigcat
from bigcat.errors import BigcatError
from bigcat.stats import write_stats
from conftest import ARCHIVES, S3Server, dense


def run_cli(*args: str, env: dict | None = None, timeout: float = 180):
    return subprocess.run(
        [sys.executable, "-m", "bigcat", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )


def cli_options(server: S3Server) -> list[str]:
    return [f"--storage-option=endpoint_url={server.endpoint}", "--storage-option=key=testing",
            "--storage-option=secret=testing"]  # fmt: skip


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("s3src") / "atlas.h5ad"
    bigcat.synth(path, n_cells=1500, n_genes=400, n_clusters=6, nnz_per_cell=40, seed=5, progress=False)
    return path


def test_pipeline_on_the_bucket_equals_the_local_run(s3, small, tmp_path):
    opts = s3.options()
    url = "s3://bigcat-test/pipeline"
    import s3fs

    fs = s3fs.S3FileSystem(**opts)
    fs.put_file(str(small), "bigcat-test/pipeline/atlas.h5ad")
    # h5ad read from the bucket through fsspec, converted to a store on the bucket
    store = bigcat.convert(f"{url}/atlas.h5ad", f"{url}/atlas.zarr", progress=False, storage_options=opts)
    assert store == f"{url}/atlas.zarr"
    local = bigcat.convert(small, tmp_path / "atlas.zarr", progress=False)
    src = dense(ad.read_h5ad(small).X)
    ds = bigcat.open_dataset(store, storage_options=opts)
    np.testing.assert_array_equal(dense(ds.X.data.compute()), src)
    # sample on the bucket
    sampled = bigcat.sample(store, f"{url}/sample.zarr", n_cells=300, seed=2, progress=False, storage_options=opts)
    local_sample = bigcat.sample(local, tmp_path / "sample.zarr", n_cells=300, seed=2, progress=False)
    a = bigcat.open_dataset(sampled, storage_options=opts)
    b = bigcat.open_dataset(local_sample)
    np.testing.assert_array_equal(dense(a.X.data.compute()), dense(b.X.data.compute()))
    assert list(a.cell.values) == list(b.cell.values)
    # stats from the bucket, written to the bucket
    remote = bigcat.cluster_stats(store, stats="sums,means,nnz", storage_options=opts)
    expected = bigcat.cluster_stats(local, stats="sums,means,nnz")
    for name in ("sums", "nnz", "n_cells"):
        np.testing.assert_array_equal(remote[name].values, expected[name].values)
    write_stats(remote, f"{url}/stats.zarr", storage_options=opts)
    write_stats(remote, f"{url}/stats.parquet", storage_options=opts)
    back = bigcat.read_stats(f"{url}/stats.zarr", storage_options=opts)
    np.testing.assert_array_equal(back["sums"].values, expected["sums"].values)
    table = pd.read_parquet(f"{url}/stats.parquet", storage_options=opts)
    assert len(table) == expected.sizes["cluster"] * expected.sizes["gene"]
    # a store whose completion marker says incomplete does not open
    import zarr

    root = zarr.open_group(bigcat._io.fs.zarr_store(store, opts, read_only=False), mode="r+", use_consolidated=False)
    root.attrs["bigcat"] = {**root.attrs["bigcat"], "complete": False}
    with pytest.raises(BigcatError, match="incomplete"):
        bigcat.open_dataset(store, storage_options=opts)


def test_cli_with_storage_options(s3, small, tmp_path):
    url = "s3://bigcat-test/cli"
    done = run_cli("convert", small, f"{url}/a.zarr", "--quiet", *cli_options(s3))
    assert done.returncode == 0, done.stderr
    done = run_cli("stats", f"{url}/a.zarr", "--stats", "means", "--cluster", "threads", "--out",
                   f"{url}/s.csv", *cli_options(s3))  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(f"{url}/s.csv", storage_options=s3.options())
    x = dense(ad.read_h5ad(small).X).astype(np.float64)
    labels = ad.read_h5ad(small).obs["cluster"].to_numpy()
    first = table[table["cluster"] == "cl0000"]["means"].to_numpy()
    np.testing.assert_allclose(first, x[labels == "cl0000"].mean(0), rtol=1e-5)
    # existing output without --overwrite: refused, one line, exit 2
    done = run_cli("convert", small, f"{url}/a.zarr", "--quiet", *cli_options(s3))
    assert done.returncode == 2
    assert "output exists" in done.stderr


def test_endpoint_down_fails_fast(small, tmp_path):
    start = time.monotonic()
    done = run_cli("convert", small, "s3://bucket/x.zarr", "--quiet", "--storage-option=endpoint_url=http://127.0.0.1:9",
                   "--storage-option=key=a", "--storage-option=secret=b")  # fmt: skip
    assert done.returncode == 1
    assert "bigcat: error:" in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert time.monotonic() - start < 90


def test_wrong_credentials_are_reported(tmp_path_factory, small):
    server = S3Server(tmp_path_factory.mktemp("auth"), INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        done = run_cli("convert", small, "s3://nope/x.zarr", "--quiet", *cli_options(server))
        assert done.returncode == 1
        assert "bigcat: error:" in done.stderr
        assert "credential" in done.stderr.lower() or "access" in done.stderr.lower() or "denied" in done.stderr.lower()
        assert done.stderr.strip().count("\n") == 0, done.stderr
    finally:
        server.close()


def test_conversion_killed_midway_leaves_no_valid_store(s3, tmp_path):
    big = tmp_path / "big.h5ad"
    bigcat.synth(big, n_cells=60_000, n_genes=2000, n_clusters=5, nnz_per_cell=300, seed=1, progress=False)
    url = "s3://bigcat-test/killed/x.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bigcat", "convert", str(big), url, "--quiet", *cli_options(s3)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    import s3fs

    fs = s3fs.S3FileSystem(**s3.options(), skip_instance_cache=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        fs.invalidate_cache()
        if fs.exists("bigcat-test/killed/x.zarr/X/data/zarr.json"):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the conversion ended before it could be killed"
    proc.kill()
    proc.wait()
    with pytest.raises(BigcatError):
        bigcat.open_dataset(url, storage_options=s3.options())


def test_server_errors_are_retried_then_reported(small):
    """A loopback endpoint that answers every request with HTTP 500: botocore retries, then bigcat
    reports one line and exits 1."""
    import http.server
    import threading

    hits = []

    class Failing(http.server.BaseHTTPRequestHandler):
        def _fail(self) -> None:
            hits.append(self.command)
            body = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
            self.send_response(500)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _fail

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        done = run_cli("convert", small, "s3://bucket/x.zarr", "--quiet", f"--storage-option=endpoint_url={endpoint}",
                       "--storage-option=key=a", "--storage-option=secret=b")  # fmt: skip
        assert done.returncode == 1
        assert done.stderr.startswith("bigcat: error:")
        assert done.stderr.strip().count("\n") == 0, done.stderr
        assert time.monotonic() - start < 120
        assert len(hits) >= 2  # retried
    finally:
        server.shutdown()


def test_a_server_that_stops_answering_ends_the_run(tmp_path_factory, small):
    """SIGSTOP on the S3 server: connections are accepted and never answered; the run hung
    6 min 38 s. Every wait is bounded (read timeouts, botocore's and s3fs's retries)."""
    import signal

    server = S3Server(tmp_path_factory.mktemp("stopped"))
    try:
        s3fs.S3FileSystem(**server.options(), skip_instance_cache=True).mkdir("stopped")
        os.kill(server.proc.pid, signal.SIGSTOP)
        start = time.monotonic()
        options = server.options(config_kwargs={"read_timeout": 2})  # the defaults (20 s) bound it at ~3 min
        with pytest.raises(Exception, match=r"[Tt]imeout") as error:
            bigcat.convert(small, "s3://stopped/x.zarr", storage_options=options, progress=False)
        elapsed = time.monotonic() - start
        assert elapsed < 60, elapsed
        assert "\n" not in str(error.value).strip()
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.close()


def test_an_unknown_storage_option_is_one_line(small):
    """`--storage-option bogus=1` printed aiobotocore's traceback at the first request."""
    done = run_cli("convert", small, "s3://bucket/x.zarr", "--quiet", "--storage-option=bogus=1")
    assert done.returncode == 2
    assert "unknown storage option 'bogus'" in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr


def test_an_anndata_0_5_file_on_the_bucket_is_one_line(s3, tmp_path):
    """anndata < 0.7's obs/var (compound datasets) are read by anndata from a local path
    only: it said "No such file or directory" for a file that exists."""
    archive = ARCHIVES / "v0.5.0" / "adata.h5ad"
    s3fs.S3FileSystem(**s3.options(), skip_instance_cache=True).put_file(str(archive), "bigcat-test/old/v0.5.h5ad")
    url = "s3://bigcat-test/old/v0.5.h5ad"
    for command in (["stats", url, "--by", "bulk_labels", "--out", tmp_path / "stats.csv"],
                    ["convert", url, tmp_path / "old.zarr"]):  # fmt: skip
        done = run_cli(*command, "--quiet", *cli_options(s3))
        assert done.returncode == 2, done.stderr
        assert [line for line in done.stderr.splitlines() if "dashboard" not in line] == [
            f"bigcat: error: {url}: written by anndata < 0.7 (obs as a compound dataset), an encoding that is read "
            "from a local file only; download it and run `bigcat convert` on the local copy"
        ]
    assert not list(tmp_path.iterdir())
