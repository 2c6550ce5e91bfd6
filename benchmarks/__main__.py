"""bigcat's benchmark runner: ``python -m benchmarks --scale S`` (what ``make bench`` runs).

Every measured step runs in its own process; wall time and peak resident memory (the
process and all its children, sampled every 20 ms with psutil) are measured from outside.
Each step is repeated (``--repeat``, default 3) and the median with min–max is reported.
Generated data is cached under ``bench-data/`` (git-ignored) and reused. Results are
written between markers in ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench-data"
SCALES = {
    "XS": {"cells": 50_000, "genes": 32_285, "clusters": 50},
    "S": {"cells": 200_000, "genes": 32_285, "clusters": 50},
    "M": {"cells": 1_000_000, "genes": 32_285, "clusters": 50},
}
BIGCAT = [sys.executable, "-m", "bigcat"]


def measure(command: list[str]) -> dict:
    """Run ``command``; return wall seconds and peak RSS (bytes) of it and its children."""
    start = time.perf_counter()
    proc = psutil.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
        except psutil.Error:
            rss = 0
        peak = max(peak, rss)
        time.sleep(0.02)
    wall = time.perf_counter() - start
    out, err = proc.communicate()
    if proc.returncode != 0:
        msg = f"benchmark step failed ({proc.returncode}): {' '.join(command)}\n{err}"
        raise RuntimeError(msg)
    return {"wall": wall, "rss": peak, "stdout": out}


def repeat(command: list[str], n: int, before=None) -> dict:
    runs = []
    for _ in range(n):
        if before is not None:
            before()
        runs.append(measure(command))
    walls = [r["wall"] for r in runs]
    rss = [r["rss"] for r in runs]
    return {
        "wall": statistics.median(walls),
        "wall_min": min(walls),
        "wall_max": max(walls),
        "rss": statistics.median(rss),
        "rss_max": max(rss),
        "stdout": runs[-1]["stdout"],
        "stdouts": [r["stdout"] for r in runs],
        "n": n,
    }


def parsed(m: dict, field: int) -> float:
    """Median over the runs of the ``field``-th number a step printed (its own in-process timings)."""
    return statistics.median(float(out.split()[field]) for out in m["stdouts"])


def dataset(scale: str, clusters: int | None = None) -> Path:
    size = {**SCALES[scale], **({"clusters": clusters} if clusters else {})}
    path = DATA / f"atlas-{scale}-{size['cells']}x{size['genes']}-{size['clusters']}cl.h5ad"
    if not path.exists():
        print(f"generating {path.name} …", flush=True)
        measure(
            [
                *BIGCAT,
                "synth",
                str(path),
                "--cells",
                str(size["cells"]),
                "--genes",
                str(size["genes"]),
                "--clusters",
                str(size["clusters"]),
                "--seed",
                "0",
                "--quiet",
            ]
        )
    return path


READ_H5AD = """
import h5py, sys, time
t = time.perf_counter()
with h5py.File(sys.argv[1]) as f:
    x = f["X"]
    n = 0
    for name in ("indptr", "data", "indices"):
        n += x[name][...].nbytes
print(n, time.perf_counter() - t)
"""

READ_ZARR = """
import zarr, sys, time
t = time.perf_counter()
x = zarr.open_group(sys.argv[1], mode="r")["X"]
n = 0
for name in ("indptr", "data", "indices"):
    n += x[name][...].nbytes
print(n, time.perf_counter() - t)
"""

# into memory allocated as bigcat allocates its read buffers (small pages: steadier and, in
# the median, faster to first-touch on this VM than NumPy's huge pages; see bigcat._memory)
READ_ZARR_BIGCAT = """
import sys, time, zarr, numpy as np
from bigcat._io.shards import ShardReader
from bigcat._memory import small_pages
t = time.perf_counter()
x = zarr.open_group(sys.argv[1], mode="r")["X"]
n = x["indptr"][...].nbytes
for name in ("data", "indices"):
    a = x[name]
    n += ShardReader.for_array(a).read(0, a.shape[0], small_pages(a.shape[0], a.dtype)).nbytes
print(n, time.perf_counter() - t)
"""

# the streaming-decode limit: every shard of X's data and indices read and decoded into reused
# per-thread buffers, on all cores, no kernel (what a one-pass statistic cannot beat)
READ_STREAMING = """
import os, sys, threading, time, zarr, numpy as np
from concurrent.futures import ThreadPoolExecutor
from bigcat._io.shards import ShardReader
t = time.perf_counter()
x = zarr.open_group(sys.argv[1], mode="r")["X"]
arrays = [x["data"], x["indices"]]
readers = [ShardReader.for_array(a) for a in arrays]
n, step = arrays[0].shape[0], 1 << 24
jobs = [(k, lo, min(lo + step, n)) for lo in range(0, n, step) for k in range(2)]
local = threading.local()
def work(job):
    k, lo, hi = job
    buffers = getattr(local, "buffers", None)
    if buffers is None:
        buffers = local.buffers = [np.empty(step, dtype=a.dtype) for a in arrays]
    readers[k].read(lo, hi, buffers[k][: hi - lo])
    return (hi - lo) * arrays[k].dtype.itemsize
with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
    nbytes = sum(pool.map(work, jobs))
print(nbytes, time.perf_counter() - t)
"""

OPEN_AND_BLOCK = """
import bigcat, sys, time
t = time.perf_counter()
ds = bigcat.open_dataset(sys.argv[1])
t_open = time.perf_counter() - t
t = time.perf_counter()
block = ds.X.data.blocks[ds.X.data.numblocks[0] // 2].compute()
print(t_open, time.perf_counter() - t, block.nnz, block.shape[0])
"""

CODECS = """
import sys, time, json, shutil, numpy as np, zarr, h5py
from zarr.codecs import BloscCodec, ZstdCodec
src, tmp = sys.argv[1], sys.argv[2]
with h5py.File(src) as f:
    n = min(f["X"]["data"].shape[0], 64 << 20)
    arrays = {"data": f["X"]["data"][:n], "indices": f["X"]["indices"][:n]}
codecs = {
    "none": [],
    "blosc-lz4-shuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
    "blosc-lz4-bitshuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
    "blosc-zstd1-shuffle": [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")],
    "blosc-zstd3-bitshuffle": [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")],
    "zstd1": [ZstdCodec(level=1)],
    "zstd3": [ZstdCodec(level=3)],
}
out = {}
for name, compressors in codecs.items():
    shutil.rmtree(tmp, ignore_errors=True)
    g = zarr.open_group(tmp, mode="w", zarr_format=3)
    raw = stored = 0; t_write = t_read = 0.0
    for key, values in arrays.items():
        t = time.perf_counter()
        a = g.create_array(key, shape=values.shape, dtype=values.dtype, chunks=(1 << 20,), shards=(32 << 20,),
                           compressors=compressors)
        a[:] = values
        t_write += time.perf_counter() - t
        t = time.perf_counter()
        back = zarr.open_array(tmp, path=key, mode="r")[:]
        t_read += time.perf_counter() - t
        assert np.array_equal(back, values)
        raw += values.nbytes
    stored = sum(p.stat().st_size for p in __import__("pathlib").Path(tmp).rglob("*") if p.is_file())
    out[name] = {"ratio": raw / stored, "write_MBps": raw / t_write / 1e6, "read_MBps": raw / t_read / 1e6}
shutil.rmtree(tmp, ignore_errors=True)
print(json.dumps({"values": n, "codecs": out}))
"""


def drop_cache_hint() -> None:
    """Nothing: we cannot drop the page cache without root privileges everywhere; runs are warm-cache."""


STATS_BIGCAT = """
import sys, time, contextlib
t = time.perf_counter()
import bigcat
cluster = sys.argv[3] if len(sys.argv) > 3 else "threads"
options = {"dashboard_address": "127.0.0.1:0"} if cluster == "local" else {}
with bigcat.connect(cluster, **options) as client:
    ds = bigcat.cluster_stats(sys.argv[1], by="cluster", stats=("means", "present", "sqr_means"), engine=sys.argv[2],
                              client=client)
    ds = ds.load()
print(time.perf_counter() - t, int(ds.n_cells.sum()), ds.sizes["cluster"])
"""

KERNEL_ONLY = """
import sys, time, threading, numpy as np, pandas as pd
from bigcat._io.source import open_source
from bigcat import kernels
src = open_source(sys.argv[1])
x = src.read_rows(0, src.shape[0])
codes = pd.Categorical(src.obs_column("cluster")).codes.astype(np.int32)
k = int(codes.max()) + 1
halves = [(0, src.shape[0] // 2), (src.shape[0] // 2, src.shape[0])]
accs = [[np.zeros((k, src.shape[1])), np.zeros((k, src.shape[1])), np.zeros((k, src.shape[1]), np.uint16)]
        for _ in halves]
def run(i):
    lo, hi = halves[i]
    p = x.indptr[lo:hi + 1]
    kernels.fold_csr(x.data, x.indices, p, 0, codes[lo:hi], None, None, 0.0, False, False, 0, *accs[i], None)
run(0)  # compile / warm up (numba cache)
for a in accs[0]: a[...] = 0
t = time.perf_counter()
threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
[th.start() for th in threads]; [th.join() for th in threads]
print(time.perf_counter() - t, x.nnz)
"""

DENSE_FLOX = """
import sys, time, warnings
warnings.simplefilter("ignore")
import xarray as xr
t = time.perf_counter()
ds = xr.open_zarr(sys.argv[1])
ds = ds.assign_coords(cluster=ds.cluster.compute())
x = ds.X.astype("float64")
g = x.groupby("cluster")
out = xr.Dataset({"means": g.mean(), "present": (x > 0).groupby("cluster").mean(),
                  "sqr_means": (x * x).groupby("cluster").mean()}).compute()
print(time.perf_counter() - t, ds.sizes["cell"])
"""

#: cells of the dense-layout subset the xarray + flox competitor runs on (the full size would not fit)
DENSE_SUBSET = 20_000

STATS_SCANPY = """
import sys, time, warnings
warnings.simplefilter("ignore")
import anndata as ad, scanpy as sc
t = time.perf_counter()
adata = ad.read_zarr(sys.argv[1])
adata.X = adata.X.tocsr()
if adata.X.indptr.dtype != adata.X.indices.dtype:  # a store written before bigcat kept one index dtype (#23)
    adata.X.indptr = adata.X.indptr.astype(adata.X.indices.dtype)
t_load = time.perf_counter() - t
t = time.perf_counter()
agg = sc.get.aggregate(adata, by="cluster", func=["mean", "count_nonzero"])
present = agg.layers["count_nonzero"] / agg.obs["n_cells"].to_numpy()[:, None] if "n_cells" in agg.obs else None
adata.X = adata.X.power(2)
sqr = sc.get.aggregate(adata, by="cluster", func=["mean"])
t_compute = time.perf_counter() - t
print(t_load, t_compute, agg.n_obs)
"""

R_MATRIX = r"""
suppressMessages({library(Matrix); library(hdf5r)})
args <- commandArgs(trailingOnly = TRUE)
t0 <- Sys.time()
f <- H5File$new(args[1], mode = "r")
shape <- as.integer(h5attr(f[["X"]], "shape"))
# the CSR arrays as they are (Matrix slots are 0-based too): cells x genes
x <- new("dgRMatrix", j = f[["X/indices"]][], p = as.integer(f[["X/indptr"]][]), x = as.numeric(f[["X/data"]][]),
         Dim = shape)
cl <- factor(f[["obs/cluster/codes"]][])
f$close_all()
t1 <- Sys.time()
tx <- t(x)  # genes x cells as a dgCMatrix over the same arrays
rm(x)
ind <- sparse.model.matrix(~ cl - 1)  # cells x clusters indicator
scale <- Diagonal(x = 1 / colSums(ind))
means <- (tx %*% ind) %*% scale  # genes x clusters
present <- ((tx > 0) %*% ind) %*% scale
sqr <- ((tx^2) %*% ind) %*% scale
t2 <- Sys.time()
cat(as.numeric(t1 - t0, units = "secs"), as.numeric(t2 - t1, units = "secs"), nlevels(cl), "\n")
"""


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def run_scale(scale: str, n_repeat: int) -> tuple[str, dict]:
    h5ad = dataset(scale)
    store = DATA / (h5ad.stem + ".zarr")
    n_cells = SCALES[scale]["cells"]
    with __import__("h5py").File(h5ad) as f:
        nnz = int(f["X"]["data"].shape[0])
        h5ad_bytes = h5ad.stat().st_size
    results: dict = {"nnz": nnz, "cells": n_cells}
    print(f"[{scale}] convert ×{n_repeat}", flush=True)
    results["convert"] = repeat([*BIGCAT, "convert", str(h5ad), str(store), "--overwrite", "--quiet"], n_repeat)
    store_bytes = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    store_files = sum(1 for p in store.rglob("*") if p.is_file())
    print(f"[{scale}] read X with h5py ×{n_repeat}", flush=True)
    results["h5py"] = repeat([sys.executable, "-c", READ_H5AD, str(h5ad)], n_repeat)
    print(f"[{scale}] read X from the Zarr store ×{n_repeat}", flush=True)
    results["zarr"] = repeat([sys.executable, "-c", READ_ZARR, str(store)], n_repeat)
    print(f"[{scale}] open_dataset + one row block ×{n_repeat}", flush=True)
    results["open"] = repeat([sys.executable, "-c", OPEN_AND_BLOCK, str(store)], n_repeat)
    t_open, t_block, block_nnz, block_rows = results["open"]["stdout"].split()
    print(f"[{scale}] codecs", flush=True)
    codecs = json.loads(measure([sys.executable, "-c", CODECS, str(h5ad), str(DATA / "codec-tmp.zarr")])["stdout"])

    c, h, z = results["convert"], results["h5py"], results["zarr"]
    lines = [
        f"### Dataset {scale}: {n_cells:,} cells × {SCALES[scale]['genes']:,} genes, {nnz:,} non-zeros "
        f"(`bigcat synth`, seed 0), .h5ad {gib(h5ad_bytes)}",
        "",
        "| step | wall (median, min–max) | peak RSS | non-zeros/s |",
        "|---|---|---|---|",
        f"| `bigcat convert` h5ad → sparse Zarr | {c['wall']:.1f} s ({c['wall_min']:.1f}–{c['wall_max']:.1f}) | "
        f"{gib(c['rss'])} (max {gib(c['rss_max'])}) | {nnz / c['wall']:.3g} |",
        f"| read X's three arrays with h5py (whole, into RAM) | {h['wall']:.1f} s ({h['wall_min']:.1f}–"
        f"{h['wall_max']:.1f}) | {gib(h['rss'])} | {nnz / h['wall']:.3g} |",
        f"| read X's three arrays from the Zarr store | {z['wall']:.1f} s ({z['wall_min']:.1f}–{z['wall_max']:.1f})"
        f" | {gib(z['rss'])} | {nnz / z['wall']:.3g} |",
        f"| `open_dataset` + compute one row block ({int(block_rows):,} cells, {int(block_nnz):,} values) | "
        f"open {float(t_open) * 1e3:.0f} ms, block {float(t_block) * 1e3:.0f} ms "
        f"(process {results['open']['wall']:.1f} s"
        " incl. imports) | | |",
        "",
        f"Convert throughput is **{h['wall'] / c['wall']:.2f}×** the rate of only reading X with h5py "
        f"(target ≥ 0.5×). Store: {gib(store_bytes)} in {store_files} files "
        f"({h5ad_bytes / store_bytes:.1f}× smaller than the .h5ad).",
        "",
        f"Codecs for the sparse layout's `data`/`indices` arrays (first {codecs['values']:,} values of each; 1M-element"
        " chunks in 32M-element shards; warm cache; write and read through zarr-python, one process):",
        "",
        "| codec | compression ratio | write MB/s | read MB/s |",
        "|---|---|---|---|",
    ]
    for name, row in codecs["codecs"].items():
        lines.append(f"| {name} | {row['ratio']:.2f} | {row['write_MBps']:.0f} | {row['read_MBps']:.0f} |")
    return "\n".join(lines), results


def run_stats(scale: str, n_repeat: int, clusters: list[int]) -> tuple[str, dict]:
    results: dict = {}
    lines = [
        f"### Cluster statistics, dataset {scale}: {SCALES[scale]['cells']:,} cells × {SCALES[scale]['genes']:,} genes "
        "(means, present, sqr_means; sparse Zarr store on local disk, warm page cache where it fits)",
        "",
        "| clusters | competitor | wall (median, min–max) | peak RSS | non-zeros/s |",
        "|---|---|---|---|---|",
    ]
    for k in clusters:
        h5ad = dataset(scale, k)
        store = DATA / (h5ad.stem + ".zarr")
        if not store.exists():
            measure([*BIGCAT, "convert", str(h5ad), str(store), "--quiet"])
        with __import__("h5py").File(h5ad) as f:
            nnz = int(f["X"]["data"].shape[0])
        row: dict = {"nnz": nnz}
        print(f"[{scale}/{k}] read-only ×{n_repeat}", flush=True)
        row["read"] = repeat([sys.executable, "-c", READ_ZARR, str(store)], n_repeat)
        print(f"[{scale}/{k}] read-only with bigcat's shard reader ×{n_repeat}", flush=True)
        row["read-bigcat"] = repeat([sys.executable, "-c", READ_ZARR_BIGCAT, str(store)], n_repeat)
        print(f"[{scale}/{k}] streaming decode (no kernel) ×{n_repeat}", flush=True)
        row["stream"] = repeat([sys.executable, "-c", READ_STREAMING, str(store)], n_repeat)
        print(f"[{scale}/{k}] bigcat blocks ×{n_repeat}", flush=True)
        row["blocks"] = repeat([sys.executable, "-c", STATS_BIGCAT, str(store), "blocks"], n_repeat)
        print(f"[{scale}/{k}] bigcat stats --out stats.parquet (the command) ×{n_repeat}", flush=True)
        table = DATA / f"stats-{scale}-{k}.parquet"
        row["cli"] = repeat([*BIGCAT, "stats", str(store), "--by", "cluster", "--cluster", "threads", "--out",
                             str(table), "--overwrite", "--quiet"], n_repeat)  # fmt: skip
        if os.environ.get("SCANPY_PYTHON"):
            print(f"[{scale}/{k}] scanpy (SCANPY_PYTHON) ×{n_repeat}", flush=True)
            row["scanpy-current"] = repeat([os.environ["SCANPY_PYTHON"], "-c", STATS_SCANPY, str(store)], n_repeat)
        print(f"[{scale}/{k}] bigcat blocks on a local cluster ×{n_repeat}", flush=True)
        row["blocks-local"] = repeat([sys.executable, "-c", STATS_BIGCAT, str(store), "blocks", "local"], n_repeat)
        print(f"[{scale}/{k}] kernel alone on in-memory arrays ×{n_repeat}", flush=True)
        row["kernel"] = repeat([sys.executable, "-c", KERNEL_ONLY, str(store)], n_repeat)
        print(f"[{scale}/{k}] scanpy ×{n_repeat}", flush=True)
        row["scanpy"] = repeat([sys.executable, "-c", STATS_SCANPY, str(store)], n_repeat)
        if shutil.which("Rscript"):
            print(f"[{scale}/{k}] R Matrix ×{n_repeat}", flush=True)
            row["R"] = repeat(["Rscript", "-e", R_MATRIX, str(h5ad)], n_repeat)
        else:
            print("R (Rscript) is not installed: skipping the R Matrix competitor", flush=True)
        if k == min(clusters) or ARGS.groupby:
            print(f"[{scale}/{k}] bigcat groupby ×{n_repeat}", flush=True)
            row["groupby"] = repeat([sys.executable, "-c", STATS_BIGCAT, str(store), "groupby"], n_repeat)
            subset = DATA / f"{store.stem}-dense-{DENSE_SUBSET}.zarr"
            if not subset.exists():
                measure([*BIGCAT, "sample", str(store), str(subset), "--n-cells", str(DENSE_SUBSET), "--layout",
                         "dense", "--quiet"])  # fmt: skip
            print(f"[{scale}/{k}] xarray + flox on the dense layout ({DENSE_SUBSET:,} cells) ×{n_repeat}", flush=True)
            row["dense-flox"] = repeat([sys.executable, "-c", DENSE_FLOX, str(subset)], n_repeat)
        results[k] = row
        b, r, sc = row["blocks"], row["read"], row["scanpy"]
        t_load, t_compute = parsed(sc, 0), parsed(sc, 1)
        result_bytes = 3 * 4 * k * SCALES[scale]["genes"]

        def line(name: str, m: dict, note: str = "", nnz: int = nnz, k: int = k) -> str:
            return (
                f"| {k:,} | {name} | {m['wall']:.1f} s ({m['wall_min']:.1f}–{m['wall_max']:.1f}){note} | "
                f"{gib(m['rss'])} | {nnz / m['wall']:.3g} |"
            )

        lines.append(line("read X's arrays from the store with zarr-python (physical-limit proxy)", r))
        lines.append(line("read X's arrays with bigcat's shard reader (physical-limit proxy)", row["read-bigcat"]))
        lines.append(line("read + decode every shard into reused buffers, all cores, no kernel (streaming limit)",
                          row["stream"]))  # fmt: skip
        lines.append(line("**bigcat `blocks`**, end to end (process incl. imports, open, compute)", b))
        lines.append(line("`bigcat stats … --cluster threads --out stats.parquet` (the command, output included)",
                          row["cli"]))  # fmt: skip
        lines.append(line("bigcat `blocks` on a local cluster (`bigcat.connect('local')`)", row["blocks-local"]))
        t_kernel = parsed(row["kernel"], 0)
        lines.append(
            f"| {k:,} | the compiled kernel alone, 2 threads, data in memory (proxy) | {t_kernel:.2f} s "
            f"(process {row['kernel']['wall']:.1f} s incl. loading) | {gib(row['kernel']['rss'])} | "
            f"{nnz / t_kernel:.3g} |"
        )
        lines.append(
            line("scanpy.get.aggregate, load + compute", sc, f"; load {t_load:.1f} s, compute {t_compute:.1f} s")
        )
        if "scanpy-current" in row:
            cur = row["scanpy-current"]
            row["scanpy_current_compute"] = parsed(cur, 1)
            lines.append(line("scanpy.get.aggregate, the current release (`SCANPY_PYTHON`), load + compute", cur,
                              f"; load {parsed(cur, 0):.1f} s, compute {parsed(cur, 1):.1f} s"))  # fmt: skip
        if "R" in row:
            r_load, r_compute = parsed(row["R"], 0), parsed(row["R"], 1)
            lines.append(
                line("R Matrix indicator products", row["R"], f"; load {r_load:.1f} s, compute {r_compute:.1f} s")
            )
        if "groupby" in row:
            lines.append(
                line("bigcat `groupby` (xarray + flox over the sparse store, blocks densified)", row["groupby"])
            )
        if "dense-flox" in row:
            t_dense, cells = parsed(row["dense-flox"], 0), parsed(row["dense-flox"], 1)
            factor = SCALES[scale]["cells"] / cells
            lines.append(
                f"| {k:,} | xarray + flox groupby on the **dense layout**, {int(cells):,} cells — "
                f"**extrapolated** ×{factor:.0f} | {t_dense:.1f} s → ~{t_dense * factor:.0f} s | "
                f"{gib(row['dense-flox']['rss'])} (subset) | {nnz / (t_dense * factor):.3g} |"
            )
        row["scanpy_compute"] = t_compute
        row["result_bytes"] = result_bytes
    lines += ["", "Targets (same run):", ""]
    for k, row in results.items():
        # against the faster of the two read-only proxies (the stricter target)
        b, r = row["blocks"]["wall"], min(row["read"]["wall"], row["read-bigcat"]["wall"])
        speedup, target_speedup = row["scanpy_compute"] / b, 4 if k == min(results) else 3
        rss_limit = 2**31 + 2 * row["result_bytes"] * (k != min(results))
        rss = row["blocks"]["rss_max"]
        lines.append(
            f"- {k:,} clusters: scanpy compute alone / bigcat end to end = **{speedup:.1f}×** "
            f"(target ≥ {target_speedup}×) {_ok(speedup >= target_speedup)}; "
            f"bigcat / fastest read-only = **{b / r:.2f}×** (target ≤ 1.5×) {_ok(b / r <= 1.5)}; "
            f"peak RSS {gib(rss)} (target ≤ {gib(rss_limit)}) {_ok(rss <= rss_limit)}"
        )
        cli, stream = row["cli"]["wall"], row["stream"]["wall"]
        against = row.get("scanpy_current_compute")
        lines.append(
            f"  - the command with its output / streaming-decode limit = **{cli / stream:.2f}×** (issue #22: ≤ 1.3×) "
            f"{_ok(cli / stream <= 1.3)}"
            + (f"; current scanpy compute alone / the command = **{against / cli:.1f}×** (issue #22: ≥ 5×) "
               f"{_ok(against / cli >= 5)}" if against else "")
        )  # fmt: skip
        if "R" in row:
            r_speedup = row["R"]["wall"] / b
            lines.append(f"  - R Matrix / bigcat = {r_speedup:.1f}× (target ≥ 5×) {_ok(r_speedup >= 5)}")
    if len(results) > 1:
        lo, hi = min(results), max(results)
        t_lo, t_hi = results[lo]["blocks"]["wall"], results[hi]["blocks"]["wall"]
        lines.append(
            f"- {hi:,} vs {lo:,} clusters: bigcat time ratio **{t_hi / t_lo:.2f}×** (target ≤ 1.5×) "
            f"{_ok(t_hi / t_lo <= 1.5)}; {t_hi - t_lo:.1f} s more (the target allows {0.5 * t_lo:.1f} s)"
        )
    return "\n".join(lines), results


def command_store(scale: str, k: int) -> tuple[Path, list[str]]:
    """The store the command group reads, and how its labels are given. Dataset M (1M cells)
    is synthesized straight to Zarr with 5,000 clusters (its .h5ad would take 19 GB of disk),
    other cluster counts read as a labels table (cluster code mod ``k``) over the same store."""
    if scale != "M":
        store = DATA / (dataset(scale, k).stem + ".zarr")
        if not store.exists():
            measure([*BIGCAT, "convert", str(dataset(scale, k)), str(store), "--quiet"])
        return store, ["--by", "cluster"]
    size = SCALES[scale]
    store = DATA / f"atlas-{scale}-{size['cells']}x{size['genes']}-5000cl.zarr"
    if not store.exists():
        print(f"generating {store.name} …", flush=True)
        measure([*BIGCAT, "synth", str(store), "--cells", str(size["cells"]), "--genes", str(size["genes"]),
                 "--clusters", "5000", "--seed", "0", "--quiet"])  # fmt: skip
    if k == 5000:
        return store, ["--by", "cluster"]
    table = DATA / f"atlas-{scale}-labels-{k}cl.parquet"
    if not table.exists():
        import anndata as ad
        import pandas as pd
        import zarr

        obs = ad.io.read_elem(zarr.open_group(store, mode="r")["obs"])
        codes = obs["cluster"].cat.codes.to_numpy() % k
        frame = pd.DataFrame({"cluster": pd.Categorical.from_codes(codes, [f"c{i}" for i in range(k)])}, obs.index)
        frame.to_parquet(table)
    return store, ["--labels", str(table), "--label-column", "cluster"]


#: issue #22's baseline: peak RSS of the command on dataset S before the local pass (2026-12-05, Intel Xeon)
COMMAND_RSS_BEFORE = {("S", 50): 0.66 * 2**30, ("S", 5000): 5.07 * 2**30}
#: the whole mouse brain: ~1.2×10¹⁰ stored values (4M cells × 32,285 genes)
WHOLE_BRAIN_VALUES = 1.2e10
#: each scale's command results, for the extrapolation from S and M
COMMAND_RESULTS: dict = {}


def run_command(scale: str, n_repeat: int, clusters: list[int]) -> tuple[str, dict]:
    """Issue #22: the command a user runs (`bigcat stats … --out`), against the streaming-decode
    limit and the current scanpy (``SCANPY_PYTHON``, a Python ≥ 3.12 with scanpy 1.12; its
    figures are quoted from the issue when it is absent), all in this run."""
    results: dict = {}
    for k in clusters:
        store, labels = command_store(scale, k)
        row: dict = {"values": int(__import__("zarr").open_array(store / "X" / "indptr", mode="r")[-1])}
        print(f"[{scale}/{k}] streaming decode ×{n_repeat}", flush=True)
        row["stream"] = repeat([sys.executable, "-c", READ_STREAMING, str(store)], n_repeat)
        for suffix in ("parquet", "zarr"):
            print(f"[{scale}/{k}] bigcat stats --out stats.{suffix} ×{n_repeat}", flush=True)
            out = DATA / f"command-{scale}-{k}.{suffix}"

            def fresh(out: Path = out) -> None:  # as a user's first run: nothing to replace (untimed)
                shutil.rmtree(out) if out.is_dir() else out.unlink(missing_ok=True)
                os.sync()  # nor the last run's output still being written back to disk meanwhile

            # the default cluster: no --cluster (this pass runs on the process' own threads)
            row[suffix] = repeat([*BIGCAT, "stats", str(store), *labels, "--out", str(out), "--quiet"], n_repeat,
                                 before=fresh)  # fmt: skip
            fresh()
        if os.environ.get("SCANPY_PYTHON") and scale != "M":  # 1M cells in memory: beyond this machine
            print(f"[{scale}/{k}] scanpy (SCANPY_PYTHON) ×{n_repeat}", flush=True)
            row["scanpy"] = repeat([os.environ["SCANPY_PYTHON"], "-c", STATS_SCANPY, str(store)], n_repeat)
        results[k] = row
    COMMAND_RESULTS[scale] = results
    return render_command(scale, results), results


def render_command(scale: str, results: dict) -> str:
    """The command group's table and target lines (``results``: :func:`run_command`'s, or
    ``bench-data/results-command-<scale>.json``)."""
    lines = [
        f"### The command a user runs, dataset {scale}: {SCALES[scale]['cells']:,} cells × {SCALES[scale]['genes']:,} "
        "genes (issue #22; means, present, sqr_means; whole processes, warm page cache)",
        "",
        "| clusters | what | wall (median, min–max) | peak RSS |",
        "|---|---|---|---|",
    ]
    for k, row in results.items():

        def line(name: str, m: dict, note: str = "", k: int = int(k)) -> str:
            wall = f"{m['wall']:.2f} s ({m['wall_min']:.2f}–{m['wall_max']:.2f})"
            return f"| {k:,} | {name} | {wall}{note} | {gib(m['rss'])} |"

        lines.append(line("read + decode every shard of X into reused buffers, all cores, no kernel (streaming "
                          "limit proxy)", row["stream"]))  # fmt: skip
        command = "`bigcat stats STORE.zarr --by cluster --out stats.parquet` (a new output)"
        lines.append(line(command, row["parquet"]))
        lines.append(line("the same, `--out stats.zarr`", row["zarr"]))
        if "scanpy" in row:
            sc = row["scanpy"]
            lines.append(line("scanpy.get.aggregate, current release (`SCANPY_PYTHON`), load + compute", sc,
                              f"; load {parsed(sc, 0):.1f} s, **compute {parsed(sc, 1):.1f} s**"))  # fmt: skip
    lines += ["", "Targets (issue #22, same run):", ""]
    for k, row in results.items():
        stream = row["stream"]["wall"]
        against = parsed(row["scanpy"], 1) if "scanpy" in row else None
        for suffix in ("parquet", "zarr"):
            cli, rss = row[suffix]["wall"], row[suffix]["rss_max"]
            text = (
                f"- {int(k):,} clusters, `--out stats.{suffix}`: command / streaming limit = **{cli / stream:.2f}×** "
                f"(≤ 1.3×) {_ok(cli / stream <= 1.3)}; "
            )
            if against:
                ratio = against / cli
                text += f"scanpy compute / command = **{ratio:.1f}×** (≥ 5×) {_ok(ratio >= 5)}; "
            before = COMMAND_RSS_BEFORE.get((scale, int(k)))
            text += f"peak RSS {gib(rss)}" + (f" (before: {gib(before)}) {_ok(rss <= before * 1.02)}" if before else "")
            lines.append(text)
        smaller = {int(c): r for c, r in COMMAND_RESULTS.get("S", {}).items()}.get(int(k))
        if scale == "M" and smaller:  # the whole brain: a line through S and M (fixed cost + cost per value)
            for suffix in ("parquet", "zarr"):
                (v0, t0), (v1, t1) = ((r["values"], r[suffix]["wall"]) for r in (smaller, row))
                per_value = (t1 - t0) / (v1 - v0)
                brain = t0 + per_value * (WHOLE_BRAIN_VALUES - v0)
                lines.append(
                    f"  - the whole mouse brain (1.2×10¹⁰ values), `--out stats.{suffix}`, extrapolated through S "
                    f"and M: {t0 - per_value * v0:.1f} s fixed + {per_value * 1e9:.2f} s per 10⁹ values = "
                    f"**{brain:.0f} s** (≤ 90 s) {_ok(brain <= 90)}"
                )
    return "\n".join(lines)


READ_STORE = """
import sys, time, json, zarr
from bigcat._io.fs import zarr_store
url, options = sys.argv[1], json.loads(sys.argv[2])
zarr.config.set({"async.concurrency": int(sys.argv[3])})
x = zarr.open_group(zarr_store(url, options or None), mode="r")["X"]
t = time.perf_counter()
n = sum(x[name][...].nbytes for name in ("indptr", "data", "indices"))
print(time.perf_counter() - t, n)
"""


def run_s3(scale: str, n_repeat: int) -> tuple[str, dict]:
    """Read X's arrays of the same store from local disk and from an S3 server on loopback."""
    sys.path.insert(0, str(ROOT / "tests"))
    import s3fs

    from conftest import S3Server  # the test suite's moto server, started the same way

    store = DATA / (dataset(scale).stem + ".zarr")
    if not store.exists():
        measure([*BIGCAT, "convert", str(dataset(scale)), str(store), "--quiet"])
    server = S3Server(DATA)
    results: dict = {}
    try:
        options = server.options()
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("bench")
        start = time.perf_counter()
        fs.put(str(store), "bench/atlas.zarr", recursive=True)
        results["upload"] = time.perf_counter() - start
        for concurrency in (10, 64):
            print(f"[{scale}] read from local disk and from S3, concurrency {concurrency} ×{n_repeat}", flush=True)
            results[f"local-{concurrency}"] = repeat(
                [sys.executable, "-c", READ_STORE, str(store), "{}", str(concurrency)], n_repeat
            )
            results[f"s3-{concurrency}"] = repeat(
                [sys.executable, "-c", READ_STORE, "s3://bench/atlas.zarr", json.dumps(options), str(concurrency)],
                n_repeat,
            )
    finally:
        server.close()
    size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    lines = [
        f"### Reading the dataset-{scale} store ({gib(size)}) from S3 on loopback vs local disk",
        "",
        "moto's S3 server (one Python process) on 127.0.0.1; zarr-python's FsspecStore over s3fs; X's three arrays "
        "read whole (the timer runs inside the process, after imports).",
        "",
        "| zarr async.concurrency | local disk (last of the runs; process median) | S3 on loopback | S3 / local |",
        "|---|---|---|---|",
    ]
    for concurrency in (10, 64):
        local, remote = results[f"local-{concurrency}"], results[f"s3-{concurrency}"]
        t_local = parsed(local, 0)
        t_remote = parsed(remote, 0)
        lines.append(
            f"| {concurrency} | {t_local:.2f} s (process {local['wall']:.1f} s) | {t_remote:.2f} s (process "
            f"{remote['wall']:.1f} s) | **{t_remote / t_local:.2f}×** (target ≤ 2×) |"
        )
    lines += ["", f"Upload of the store to the server: {results['upload']:.1f} s."]
    return "\n".join(lines), results


MAP_BIGCAT = """
import sys, time
t = time.perf_counter()
import bigcat
from bigcat.mapping import map_cells
with bigcat.connect("threads") as client:
    table = map_cells(sys.argv[1], sys.argv[2], client=client)
truth = bigcat.open_dataset(sys.argv[1])["cluster"].values.astype(str)
accuracy = float((table["cluster"].astype(str).to_numpy() == truth).mean())
print(time.perf_counter() - t, len(table), accuracy, table.attrs["markers"])
"""

MAP_SKLEARN = """
import sys, time, numpy as np, anndata as ad, scipy.sparse as sp
from sklearn.neighbors import NearestNeighbors
import bigcat
t = time.perf_counter()
stats = bigcat.read_stats(sys.argv[3])
genes = bigcat.markers(stats, top=20)["gene"].drop_duplicates().tolist()
def load(path):
    a = ad.read_h5ad(path)
    x = a.X.tocsr()
    totals = np.asarray(x.sum(axis=1)).ravel()
    x = sp.diags(1e6 / np.maximum(totals, 1)) @ x[:, a.var_names.get_indexer(genes)]
    x.data = np.log2(x.data + 1)
    return x.toarray().astype(np.float32), a.obs["cluster"].astype(str).to_numpy()
query, truth = load(sys.argv[1])
reference, labels = load(sys.argv[2])
t_load = time.perf_counter() - t
t = time.perf_counter()
nn = NearestNeighbors(n_neighbors=15, metric="cosine", algorithm="brute", n_jobs=1).fit(reference)
_, idx = nn.kneighbors(query)
votes = labels[idx]
best = np.array([max(set(r), key=list(r).count) for r in votes])
print(t_load, time.perf_counter() - t, float((best == truth).mean()))
"""


WRITE_OUTPUTS = """
import json, shutil, sys, time, warnings
from pathlib import Path
warnings.simplefilter("ignore")
import bigcat
from bigcat.mapmycells import write_mapmycells
t = time.perf_counter()
ds = bigcat.cluster_stats(sys.argv[1], by="cluster", stats=("means", "present", "sqr_means"))
print(json.dumps({"step": "compute", "seconds": time.perf_counter() - t}), flush=True)
folder = Path(sys.argv[2])
folder.mkdir(exist_ok=True)
for suffix in sys.argv[3].split(","):
    part = ds.isel(cluster=slice(0, int(sys.argv[4]))) if suffix == ".csv" else ds
    target = folder / ("precomputed_stats.h5" if suffix == ".h5" else "stats" + suffix)
    t = time.perf_counter()
    if suffix == ".h5":
        write_mapmycells(part, target, overwrite=True)
    else:
        bigcat.write_stats(part, target, overwrite=True)
    seconds = time.perf_counter() - t
    size = sum(f.stat().st_size for f in target.rglob("*")) if target.is_dir() else target.stat().st_size
    print(json.dumps({"step": suffix, "seconds": seconds, "bytes": size, "clusters": part.sizes["cluster"]}),
          flush=True)
    shutil.rmtree(target) if target.is_dir() else target.unlink()
"""

OUTPUT_FORMATS = (".zarr", ".parquet", ".h5ad", ".h5", ".csv")
#: clusters of the CSV measured (the whole 5,000-cluster long table is 161M lines of text)
CSV_CLUSTERS = 500


def run_outputs(scale: str, n_repeat: int, clusters: int = 5000) -> tuple[str, dict]:
    """Computing the statistics vs writing them, per output format, in one process per run."""
    h5ad = dataset(scale, clusters)
    store = DATA / (h5ad.stem + ".zarr")
    if not store.exists():
        measure([*BIGCAT, "convert", str(h5ad), str(store), "--quiet"])
    runs: dict[str, list] = {}
    out = DATA / "outputs"
    for i in range(n_repeat):
        print(f"[outputs {scale}/{clusters}] run {i + 1}/{n_repeat}", flush=True)
        m = measure([sys.executable, "-c", WRITE_OUTPUTS, str(store), str(out), ",".join(OUTPUT_FORMATS),
                     str(CSV_CLUSTERS)])  # fmt: skip
        for line in m["stdout"].splitlines():
            step = json.loads(line)
            runs.setdefault(step["step"], []).append(step)
    shutil.rmtree(out, ignore_errors=True)
    compute = statistics.median(r["seconds"] for r in runs["compute"])
    raw = 3 * 4 + 2 * 8 + 2  # bytes per cluster × gene: 3 float32 statistics, 2 float64 sums, uint16 counts
    lines = [
        f"### Writing the statistics of {clusters:,} clusters (dataset {scale}), per output format",
        "",
        f"One process per run computes `means, present, sqr_means` once (in memory: {gib(raw * clusters * 32285)} "
        f"of statistics and accumulators), then writes every format in turn; medians of {n_repeat}. Computing took "
        f"**{compute:.1f} s** (median).",
        "",
        "| format | write (median, min–max) | written | write / compute |",
        "|---|---|---|---|",
    ]
    for suffix in OUTPUT_FORMATS:
        seconds = [r["seconds"] for r in runs[suffix]]
        med = statistics.median(seconds)
        size = runs[suffix][-1]["bytes"]
        what = {".h5": "MapMyCells `precomputed_stats.h5`", ".csv": f"`.csv` (first {CSV_CLUSTERS} clusters)"}
        lines.append(
            f"| {what.get(suffix, f'`{suffix}`')} | {med:.1f} s ({min(seconds):.1f}–{max(seconds):.1f}) | "
            f"{gib(size)} | {med / compute:.2f}× |"
        )
    return "\n".join(lines), runs


def run_map(n_repeat: int) -> tuple[str, dict]:
    """Correlation mapping of 50k and 200k query cells onto 50-cluster reference statistics."""
    reference = dataset("XS")
    ref_store = DATA / (reference.stem + ".zarr")
    if not ref_store.exists():
        measure([*BIGCAT, "convert", str(reference), str(ref_store), "--quiet"])
    ref_stats = DATA / (reference.stem + "-stats.zarr")
    if not ref_stats.exists():
        measure([*BIGCAT, "stats", str(ref_store), "--normalize", "log2cpm", "--out", str(ref_stats), "--quiet",
                 "--cluster", "threads"])  # fmt: skip
    results: dict = {}
    for scale in ("XS", "S"):
        query = dataset(scale)
        store = DATA / (query.stem + ".zarr")
        if not store.exists():
            measure([*BIGCAT, "convert", str(query), str(store), "--quiet"])
        print(f"[map] bigcat correlation mapper, {SCALES[scale]['cells']:,} query cells ×{n_repeat}", flush=True)
        results[scale] = {"bigcat": repeat([sys.executable, "-c", MAP_BIGCAT, str(store), str(ref_stats)], n_repeat)}
    print(f"[map] scikit-learn NearestNeighbors (brute, cosine, one process), 200,000 cells ×{n_repeat}", flush=True)
    results["S"]["sklearn"] = repeat(
        [sys.executable, "-c", MAP_SKLEARN, str(dataset("S")), str(reference), str(ref_stats)], n_repeat
    )
    small, big = results["XS"]["bigcat"], results["S"]["bigcat"]
    sk = results["S"]["sklearn"]
    lines = [
        "### Mapping query cells onto 50-cluster reference statistics",
        "",
        f"Reference: statistics (log2 CPM) of dataset XS ({SCALES['XS']['cells']:,} cells, 50 clusters); queries: the "
        "sparse stores of XS and S (same synthetic clusters and markers, seed 0); 20 markers per cluster (the default) "
        f"({int(parsed(big, 3))} genes). Accuracy: fraction of cells assigned their true cluster.",
        "",
        "| query cells | method | wall (median, min–max) | peak RSS | cells/s | accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for scale, m in (("XS", small), ("S", big)):
        n = SCALES[scale]["cells"]
        lines.append(
            f"| {n:,} | **bigcat `map_cells`** (correlation, threads; process incl. imports) | {m['wall']:.1f} s "
            f"({m['wall_min']:.1f}–{m['wall_max']:.1f}) | {gib(m['rss'])} | {n / m['wall']:.3g} | {parsed(m, 2):.1%} |"
        )
    t_load, t_compute = parsed(sk, 0), parsed(sk, 1)
    n = SCALES["S"]["cells"]
    lines.append(
        f"| {n:,} | scikit-learn `NearestNeighbors` (brute, cosine, k=15 vote, one process) on the same markers, "
        f"query and reference dense in memory | {sk['wall']:.1f} s ({sk['wall_min']:.1f}–{sk['wall_max']:.1f}); "
        f"load {t_load:.1f} s, compute {t_compute:.1f} s | {gib(sk['rss'])} | {n / sk['wall']:.3g} | "
        f"{parsed(sk, 2):.1%} |"
    )
    growth = (big["wall"] / small["wall"]) / (SCALES["S"]["cells"] / SCALES["XS"]["cells"])
    lines += [
        "",
        f"- 200,000 query cells in **{big['wall']:.1f} s** (target < 60 s) {_ok(big['wall'] < 60)}; "
        f"scikit-learn baseline / bigcat = {sk['wall'] / big['wall']:.1f}×.",
        f"- Growth with query cells: time ×{big['wall'] / small['wall']:.2f} for ×4 cells (time per cell ratio "
        f"{growth:.2f}; 1.0 = linear, below 1 = fixed costs amortized); peak RSS {gib(small['rss'])} → "
        f"{gib(big['rss'])}.",
    ]
    return "\n".join(lines), results


KNN_BIGCAT = """
import sys, time
t = time.perf_counter()
from bigcat.mapping import knn
result = knn(sys.argv[1], sys.argv[2], k=15, space=sys.argv[3], method=sys.argv[4], normalize="log2cpm")
print(time.perf_counter() - t, result.attrs["memory_estimate"], result.attrs["dims"], result["indices"].shape[0])
"""

KNN_REFUSED = """
import sys
from bigcat.errors import BigcatInputError
from bigcat.mapping import knn
try:
    knn(sys.argv[1], sys.argv[2])
except BigcatInputError as error:
    print(error)
"""


def run_knn(n_repeat: int) -> tuple[str, dict]:
    """``bigcat.knn`` of 10,000 query cells against the 200,000-cell reference (dataset S)."""
    reference = dataset("S")
    query = DATA / "query-10000x32285-seed1.h5ad"
    if not query.exists():
        size = ["--cells", "10000", "--genes", "32285", "--clusters", "50", "--seed", "1"]
        measure([*BIGCAT, "synth", str(query), *size, "--quiet"])
    results: dict = {}
    for space, method in (("pca", "exact"), ("pca", "pynndescent")):
        print(f"[knn] {space}/{method}, 10,000 query × 200,000 reference cells ×{n_repeat}", flush=True)
        results[f"{space}-{method}"] = repeat(
            [sys.executable, "-c", KNN_BIGCAT, str(query), str(reference), space, method], n_repeat
        )
    refusal = measure([sys.executable, "-c", KNN_REFUSED, str(query), str(reference)])
    lines = [
        "### Nearest neighbours against a 200,000-cell reference",
        "",
        '`bigcat.knn(query, reference, k=15, space=…, method=…, normalize="log2cpm")`: 10,000 query cells '
        "(synth seed 1) against dataset S (200,000 × 32,285, `.h5ad`); PCA: 50 components fitted on 20,000 "
        "sampled reference cells (sparse, ARPACK), every cell projected block by block. Peak RSS of the whole "
        'process (imports included, about 0.35 GB); the estimate is `attrs["memory_estimate"]`, what knn '
        "plans to hold besides the interpreter and libraries (the 8 GiB guard compares it).",
        "",
        "| space / method | wall (median, min–max) | peak RSS | estimate |",
        "|---|---|---|---|",
    ]
    for name, m in results.items():
        lines.append(
            f"| {name.replace('-', ' / ')} | {m['wall']:.1f} s ({m['wall_min']:.1f}–{m['wall_max']:.1f}) | "
            f"{gib(m['rss'])} | {gib(parsed(m, 1))} |"
        )
    lines += ["", f"- All 32,285 genes (the default space) is refused before anything is read: "
              f"`{refusal['stdout'].strip()}`"]  # fmt: skip
    return "\n".join(lines), results


DE_SUBSET = """
import sys, bigcat
stats = bigcat.read_stats(sys.argv[1])
bigcat.write_stats(stats.isel(cluster=slice(0, int(sys.argv[3]))), sys.argv[2], overwrite=True)
"""

DE_SCIPY = """
import sys, time, numpy as np, pandas as pd, scipy.stats, bigcat
stats = bigcat.read_stats(sys.argv[1]).load()
pairs = pd.read_parquet(sys.argv[2]).head(int(sys.argv[3]))
n = stats["n_cells"].values.astype(float)
index = {c: i for i, c in enumerate(stats["cluster"].values.astype(str))}
t = time.perf_counter()
means = stats["sums"].values / n[:, None]
var = (stats["sqr_sums"].values / n[:, None] - means**2) * n[:, None] / (n[:, None] - 1)
for p1, p2 in zip(pairs["P1"], pairs["P2"]):
    a, b = index[p1], index[p2]
    p = scipy.stats.ttest_ind_from_stats(means[a], np.sqrt(np.maximum(var[a], 0)), n[a], means[b],
                                         np.sqrt(np.maximum(var[b], 0)), n[b], equal_var=False).pvalue
    ok = ~np.isnan(p)
    order = np.argsort(p[ok], kind="stable")
    padj = np.minimum(np.maximum.accumulate((ok.sum() - np.arange(ok.sum())) * p[ok][order]), 1)
print(time.perf_counter() - t, len(pairs))
"""

DE_R = """
args <- commandArgs(trailingOnly = TRUE)
library(limma)
m <- as.matrix(read.csv(args[1], header = FALSE)); s2 <- scan(args[2], quiet = TRUE)
n <- scan(args[3], quiet = TRUE); df <- sum(n) - length(n); k <- as.integer(args[4])
t0 <- Sys.time()
for (j in 2:(k + 1)) {
  fit <- suppressWarnings(squeezeVar(s2, df))  # simple_ebayes moderates the variances for every pair
  t <- (m[1, ] - m[j, ]) / sqrt(1 / n[1] + 1 / n[j]) / sqrt(fit$var.post)
  padj <- p.adjust(2 * pt(-abs(t), df = min(df + fit$df.prior, df)))
}
cat(as.numeric(difftime(Sys.time(), t0, units = "secs")), k, "\n")
"""

DE_R_INPUTS = """
import sys, numpy as np, bigcat
stats = bigcat.read_stats(sys.argv[1]).load()
n = stats["n_cells"].values.astype(float)
means = stats["sums"].values / n[:, None]
df = n.sum() - len(n)
sigma2 = (stats["sqr_sums"].values - stats["sums"].values ** 2 / n[:, None]).sum(axis=0) / df
np.savetxt(sys.argv[2], means[: int(sys.argv[5]) + 1], delimiter=",", fmt="%.17g")
np.savetxt(sys.argv[3], sigma2, fmt="%.17g")
np.savetxt(sys.argv[4], n, fmt="%.17g")
"""


def run_de(n_repeat: int, full: bool) -> tuple[str, dict]:
    """``bigcat de`` from the statistics of dataset S with 5,000 clusters: nearest-cluster pairs,
    all pairs of 1,000 clusters (and of all 5,000 with ``--scale M``), against scipy and R per pair."""
    import shutil

    stats = DATA / "de-stats-S-5000cl.zarr"
    if not stats.exists():
        print("[de] statistics of S (5,000 clusters) with sums, sqr_sums and presence x >= 1", flush=True)
        measure([*BIGCAT, "stats", str(dataset("S", 5000)), "--stats", "sums,sqr_sums", "--normalize", "log2cpm",
                 "--present-at", "ge1", "--cluster", "threads", "--out", str(stats), "--quiet"])  # fmt: skip
    subset = DATA / "de-stats-S-1000cl.zarr"
    if not subset.exists():
        measure([sys.executable, "-c", DE_SUBSET, str(stats), str(subset), "1000"])
    out = DATA / "de-out"
    results: dict = {}
    runs = [("neighbors:4, 5,000 clusters", stats, "neighbors:4"), ("all pairs, 1,000 clusters", subset, "all")]
    if full:
        runs.append(("all pairs, 5,000 clusters", stats, "all"))
    for name, source, pairs in runs:
        print(f"[de] {name} ×{n_repeat}", flush=True)
        results[name] = repeat([*BIGCAT, "de", str(source), "--pairs", pairs, "--out", str(out), "--overwrite",
                                "--quiet"], n_repeat)  # fmt: skip
        results[name]["pairs"] = len(__import__("pandas").read_parquet(out / "pairs.parquet"))
        if source == subset:  # the baselines below test the subset's pairs
            shutil.copy(out / "pairs.parquet", DATA / "de-pairs.parquet")
    scipy_run = measure([sys.executable, "-c", DE_SCIPY, str(subset), str(DATA / "de-pairs.parquet"), "2000"])
    results["scipy"] = dict(zip(("seconds", "pairs"), map(float, scipy_run["stdout"].split()), strict=True))
    if shutil.which("Rscript"):
        files = [str(DATA / f"de-r-{x}.txt") for x in ("means", "sigma2", "n")]
        measure([sys.executable, "-c", DE_R_INPUTS, str(subset), *files, "200"])
        script = DATA / "de-r.R"
        script.write_text(DE_R)
        r_run = measure(["Rscript", str(script), *files, "200"])
        results["R"] = dict(zip(("seconds", "pairs"), map(float, r_run["stdout"].split()), strict=True))
    lines = [
        "### Pairwise DE from cluster statistics",
        "",
        "`bigcat de STATS --pairs … --out DIR` (fast_limma, de_param defaults, top 50 genes per direction), the "
        "statistics of dataset S with 5,000 clusters (sums, sqr_sums, presence x ≥ 1 of log2 CPM); whole process, "
        "reading the statistics and writing pairs.parquet and genes.parquet included.",
        "",
        "| pairs | count | wall (median, min–max) | pairs/s | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for name, _, _ in runs:
        m = results[name]
        lines.append(f"| {name} | {m['pairs']:,} | {m['wall']:.1f} s ({m['wall_min']:.1f}–{m['wall_max']:.1f}) | "
                     f"{m['pairs'] / m['wall']:,.0f} | {gib(m['rss'])} |")  # fmt: skip
    sci = results["scipy"]
    lines += ["", f"- scipy per pair (`ttest_ind_from_stats` + Holm in NumPy, a Python loop), first "
              f"{sci['pairs']:,.0f} of those pairs: {sci['pairs'] / sci['seconds']:,.0f} pairs/s."]  # fmt: skip
    if "R" in results:
        r = results["R"]
        lines.append(f"- R (limma's squeezeVar + pt + p.adjust per pair, as scrattch's simple_ebayes runs per pair), "
                     f"{r['pairs']:,.0f} pairs: {r['pairs'] / r['seconds']:,.1f} pairs/s.")  # fmt: skip
    return "\n".join(lines), results


MMC_COMPARE = """
import json, sys, h5py, numpy as np
same = total = 0
with h5py.File(sys.argv[1]) as a, h5py.File(sys.argv[2]) as b:
    identical = all(np.array_equal(a[k][()], b[k][()]) for k in ("sparse_by_pair/up_pair_idx",
                    "sparse_by_pair/up_gene_idx", "sparse_by_pair/down_pair_idx", "sparse_by_pair/down_gene_idx",
                    "sparse_by_gene/up_gene_idx", "sparse_by_gene/up_pair_idx", "sparse_by_gene/down_gene_idx",
                    "sparse_by_gene/down_pair_idx"))
    n = len(json.loads(a["gene_names"][()].decode()))
    for d in ("up", "down"):
        sets = []
        for f in (a, b):
            ptr, genes = f[f"sparse_by_pair/{d}_pair_idx"][()].astype(np.int64), f[f"sparse_by_pair/{d}_gene_idx"][()]
            sets.append(set((np.repeat(np.arange(len(ptr) - 1), np.diff(ptr)) * n + genes).tolist()))
        same += len(sets[0] & sets[1])
        total += len(sets[0] | sets[1])
print(int(identical), same, total)
"""

MMC_QCOMPARE = """
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
keys = [k for k in a if k not in ("log", "metadata")]
same_keys = set(keys) == {k for k in b if k not in ("log", "metadata")}
print(int(same_keys), len(keys), sum(a[k] == b.get(k) for k in keys), sum(set(a[k]) == set(b.get(k, [])) for k in keys))
"""


def _mmc_stats(leaves: int, genes: int, cells: int) -> Path:
    """A precomputed_stats.h5 of a synthetic atlas with a four-level taxonomy (made once)."""
    out = DATA / f"mmc-stats-{leaves}x{genes}.h5"
    if out.exists():
        return out
    if (leaves, genes) == (5000, SCALES["S"]["genes"]):
        source = DATA / "atlas-S-200000x32285-5000cl.zarr"
        if not source.exists():
            source = dataset("S", 5000)
    else:
        source = DATA / f"atlas-mmc-{cells}x{genes}-{leaves}cl.h5ad"
        if not source.exists():
            measure([*BIGCAT, "synth", str(source), "--cells", str(cells), "--genes", str(genes), "--clusters",
                     str(leaves), "--seed", "7", "--quiet"])  # fmt: skip
    taxonomy = DATA / f"taxonomy-{leaves}cl.csv"
    measure([sys.executable, "-c", MMC_TAXONOMY, str(source), str(taxonomy)])
    measure([*BIGCAT, "stats", str(source), "--by", "cluster", "--normalize", "log2cpm", "--format", "mapmycells",
             "--hierarchy", "class,subclass,supertype,cluster", "--taxonomy", str(taxonomy), "--out", str(out),
             "--quiet", "--overwrite"])  # fmt: skip
    return out


MMC_TAXONOMY = """
import sys, numpy as np, pandas as pd, bigcat
ds = bigcat.open_dataset(sys.argv[1])
leaves = sorted(pd.unique(np.asarray(ds["cluster"].values).astype(str)))
table = pd.DataFrame({"cluster": leaves})
for level, size in (("supertype", 5), ("subclass", 50), ("class", 250)):
    table[level] = [f"{level}{i // size:04d}" for i in range(len(leaves))]
table.to_csv(sys.argv[2], index=False)
"""


def run_mapmycells(n_repeat: int, full: bool) -> tuple[str, dict]:
    """``bigcat mapmycells reference-markers`` on 1,000 leaves × 5,000 genes (and 5,000 × 32,285 with
    ``--scale M``); beside it cell_type_mapper's own ``reference_markers`` on the same file when
    ``CELL_TYPE_MAPPER_PYTHON`` names a Python that has it (a scratch venv outside the repository),
    and the two files compared entry by entry."""
    import os

    cases = [(1000, 5000, 100_000)] + ([(5000, SCALES["S"]["genes"], 0)] if full else [])
    peer = os.environ.get("CELL_TYPE_MAPPER_PYTHON")
    results: dict = {}
    for leaves, genes, cells in cases:
        name = f"{leaves:,} leaves × {genes:,} genes"
        stats = _mmc_stats(leaves, genes, cells)
        out = DATA / f"mmc-ref-{leaves}x{genes}.h5"
        print(f"[mapmycells] {name} ×{n_repeat}", flush=True)
        results[name] = repeat([*BIGCAT, "mapmycells", "reference-markers", str(stats), "--out", str(out),
                                "--overwrite", "--quiet"], n_repeat)  # fmt: skip
        results[name]["pairs"] = leaves * (leaves - 1) // 2
        if peer and leaves <= 1000:
            folder = DATA / f"mmc-ctm-{leaves}x{genes}"
            folder.mkdir(exist_ok=True)
            print(f"[mapmycells] cell_type_mapper {name}", flush=True)
            run = measure([peer, "-m", "cell_type_mapper.cli.reference_markers", "--precomputed_path_list",
                           json.dumps([str(stats)]), "--output_dir", str(folder), "--n_processors", "2",
                           "--clobber", "True", "--tmp_dir", str(folder)])  # fmt: skip
            check = measure([sys.executable, "-c", MMC_COMPARE, str(out), str(folder / "reference_markers.h5")])
            identical, same, total = map(int, check["stdout"].split())
            results[name]["cell_type_mapper"] = {"wall": run["wall"], "rss": run["rss"], "identical": identical,
                                                 "same": same, "total": total}  # fmt: skip
        queries = DATA / f"mmc-query-{leaves}x{genes}.json"
        print(f"[mapmycells] query markers {name} ×{n_repeat}", flush=True)
        results[name]["query"] = repeat([*BIGCAT, "mapmycells", "query-markers", str(out), "--out", str(queries),
                                         "--overwrite", "--quiet"], n_repeat)  # fmt: skip
        if peer and leaves <= 1000:
            print(f"[mapmycells] cell_type_mapper query markers {name}", flush=True)
            theirs = DATA / f"mmc-ctm-{leaves}x{genes}" / "query_markers.json"
            # one process: with more, cell_type_mapper lists the first (\"desperate\") markers of a
            # parent in another order (its pairs renumbered per process), the same genes
            run = measure([peer, "-m", "cell_type_mapper.cli.query_markers", "--reference_marker_path_list",
                           json.dumps([str(out)]), "--output_path", str(theirs), "--n_processors", "1",
                           "--tmp_dir", str(theirs.parent)])  # fmt: skip
            check = measure([sys.executable, "-c", MMC_QCOMPARE, str(queries), str(theirs)])
            same_keys, parents, same_order, same_set = map(int, check["stdout"].split())
            results[name]["query"]["cell_type_mapper"] = {"wall": run["wall"], "rss": run["rss"], "parents": parents,
                                                          "same_order": same_order if same_keys else 0,
                                                          "same_set": same_set}  # fmt: skip
    lines = [
        "### MapMyCells reference markers",
        "",
        "`bigcat mapmycells reference-markers precomputed_stats.h5 --out reference_markers.h5` (cell_type_mapper's "
        "defaults), every pair of leaves of a synthetic atlas (`bigcat synth`, four-level taxonomy); whole process. "
        "cell_type_mapper 1.7.1 (`python -m cell_type_mapper.cli.reference_markers --n_processors 2`) on the same "
        "file, in a scratch venv outside the repository.",
        "",
        "| leaves × genes | pairs | bigcat wall (median, min–max) | peak RSS | cell_type_mapper | ratio | agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in results.items():
        peer_run = m.get("cell_type_mapper")
        other = (f"{peer_run['wall']:.0f} s, {gib(peer_run['rss'])} | {peer_run['wall'] / m['wall']:.0f}× | "
                 f"{'identical arrays' if peer_run['identical'] else ''} {peer_run['same']:,}/{peer_run['total']:,}"
                 if peer_run else "— | — | —")  # fmt: skip
        lines.append(f"| {name} | {m['pairs']:,} | {m['wall']:.1f} s ({m['wall_min']:.1f}–{m['wall_max']:.1f}) | "
                     f"{gib(m['rss'])} | {other} |")  # fmt: skip
    lines += [
        "",
        "### MapMyCells query markers",
        "",
        "`bigcat mapmycells query-markers reference_markers.h5 --out query_markers.json` (defaults: 30 per pair and "
        "direction) on the reference markers above, every parent node of the four-level taxonomy; whole process. "
        "cell_type_mapper 1.7.1 (`python -m cell_type_mapper.cli.query_markers --n_processors 1`) on the same file.",
        "",
        "| leaves × genes | bigcat wall (median, min–max) | peak RSS | cell_type_mapper | ratio | agreement |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in results.items():
        q = m["query"]
        peer_run = q.get("cell_type_mapper")
        other = (f"{peer_run['wall']:.1f} s, {gib(peer_run['rss'])} | {peer_run['wall'] / q['wall']:.0f}× | "
                 f"{peer_run['same_order']}/{peer_run['parents']} parents the same genes in the same order"
                 if peer_run else "— | — | —")  # fmt: skip
        lines.append(f"| {name} | {q['wall']:.1f} s ({q['wall_min']:.1f}–{q['wall_max']:.1f}) | {gib(q['rss'])} | "
                     f"{other} |")  # fmt: skip
    return "\n".join(lines), results


COMPAT_CHECK = """
import json, sys, warnings, importlib.metadata as md
import numpy as np, anndata as ad, scanpy as sc
warnings.simplefilter("ignore")
rows = []
for path in sys.argv[1:]:
    a = ad.read_h5ad(path) if path.endswith(".h5ad") else ad.read_zarr(path)
    row = {"path": path, "indptr": str(a.X.indptr.dtype), "indices": str(a.X.indices.dtype)}
    try:
        agg = sc.get.aggregate(a, by="cluster", func=["sum", "mean", "count_nonzero", "var"])
        x = a.X.toarray().astype(np.float64)
        labels = a.obs["cluster"].astype(str).to_numpy()
        row["ok"] = bool(all(np.allclose(agg[c].layers["sum"].ravel(), x[labels == c].sum(0), rtol=1e-5)
                             for c in agg.obs_names))
    except Exception as e:  # the failure is the finding
        row["ok"], row["error"] = False, f"{type(e).__name__}: {e}"
    rows.append(row)
versions = {p: md.version(p) for p in ("scanpy", "anndata", "fast-array-utils")}
versions["python"] = sys.version.split()[0]
print(json.dumps({"versions": versions, "rows": rows}))
"""


def run_compat() -> tuple[str, dict] | None:
    """The current scanpy (1.12, Python ≥ 3.12, in a scratch venv named by ``SCANPY_PYTHON``)
    reads every kind of ``.h5ad``/``.zarr`` bigcat writes and runs ``sc.get.aggregate`` on it;
    skipped when ``SCANPY_PYTHON`` is not set."""
    import os

    peer = os.environ.get("SCANPY_PYTHON")
    if not peer:
        print("[compat] SCANPY_PYTHON not set (a Python with scanpy 1.12): skipped", flush=True)
        return None
    folder = DATA / "compat"
    folder.mkdir(exist_ok=True)
    atlas = folder / "synth.h5ad"
    made = [atlas, folder / "synth.zarr", folder / "sample.h5ad", folder / "sample.zarr", folder / "convert.zarr"]
    for out in made[:2]:
        measure([*BIGCAT, "synth", str(out), "--cells", "20000", "--genes", "2000", "--clusters", "50", "--quiet",
                 "--overwrite"])  # fmt: skip
    for out in made[2:4]:
        measure([*BIGCAT, "sample", str(atlas), str(out), "--cells", "0.5", "--quiet", "--overwrite"])
    measure([*BIGCAT, "convert", str(atlas), str(made[4]), "--quiet", "--overwrite"])
    print("[compat] scanpy's aggregate on bigcat's outputs", flush=True)
    found = json.loads(measure([peer, "-c", COMPAT_CHECK, *map(str, made)])["stdout"])
    v = found["versions"]
    lines = [
        "### The current scanpy on the files bigcat writes",
        "",
        f"scanpy {v['scanpy']}, anndata {v['anndata']}, fast-array-utils {v['fast-array-utils']} on Python "
        f"{v['python']} (a scratch venv outside the repository, `SCANPY_PYTHON`): each output read with anndata "
        "(in memory) and `sc.get.aggregate(adata, by='cluster', func=['sum', 'mean', 'count_nonzero', 'var'])`, "
        "its sums checked against NumPy. 20,000 cells × 2,000 genes, 50 clusters (`bigcat synth`).",
        "",
        "| output | indptr | indices | aggregate |",
        "|---|---|---|---|",
    ]
    for row in found["rows"]:
        name = Path(row["path"]).name
        verdict = "runs, sums equal NumPy" if row["ok"] else row.get("error", "sums differ")
        lines.append(f"| `{name}` | {row['indptr']} | {row['indices']} | {verdict} |")
    return "\n".join(lines), found


def run_scaling(n_repeat: int, full: bool) -> tuple[str, dict]:
    """bigcat ``blocks`` end to end vs cells (50k, 200k[, 1M]) and vs clusters (50, 500, 5,000)."""
    import h5py
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict = {"cells": [], "clusters": []}
    cases = [("cells", "XS", 50), ("cells", "S", 50)] + ([("cells", "M", 50)] if full else [])
    cases += [("clusters", "S", 50), ("clusters", "S", 500), ("clusters", "S", 5000)]
    for axis, scale, k in cases:
        h5ad = dataset(scale, k)
        store = DATA / (h5ad.stem + ".zarr")
        if not store.exists():
            measure([*BIGCAT, "convert", str(h5ad), str(store), "--quiet"])
        with h5py.File(h5ad) as f:
            nnz = int(f["X"]["data"].shape[0])
        print(f"[scaling] {scale} {k} clusters ×{n_repeat}", flush=True)
        m = repeat([sys.executable, "-c", STATS_BIGCAT, str(store), "blocks"], n_repeat)
        points[axis].append({"cells": SCALES[scale]["cells"], "clusters": k, "nnz": nnz, **m})
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "### Scaling of bigcat `blocks` (end to end, threads, means/present/sqr_means)",
        "",
        "| cells | clusters | non-zeros | wall (median, min–max) | ns per non-zero | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for axis in ("cells", "clusters"):
        for p in points[axis]:
            lines.append(
                f"| {p['cells']:,} | {p['clusters']:,} | {p['nnz']:.3g} | {p['wall']:.1f} s ({p['wall_min']:.1f}–"
                f"{p['wall_max']:.1f}) | {p['wall'] / p['nnz'] * 1e9:.1f} | {gib(p['rss'])} |"
            )
    cells = points["cells"]
    slope = np.polyfit(np.log([p["nnz"] for p in cells]), np.log([p["wall"] for p in cells]), 1)[0]
    lines += [
        "",
        f"Fitted growth with data size: time ∝ non-zeros^{slope:.2f} (1.00 = linear; fixed costs — imports, "
        "opening — make small inputs look dearer per value). Memory does not grow with cells; it grows with "
        "clusters × genes (the accumulators).",
        "",
    ]
    for axis, xlabel in (("cells", "cells"), ("clusters", "clusters")):
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
        xs = [p[axis] for p in points[axis]]
        left.plot(xs, [p["wall"] / p["nnz"] * 1e9 for p in points[axis]], "o-")
        left.set(xscale="log", xlabel=xlabel, ylabel="ns per non-zero", title="time per stored value")
        left.set_ylim(bottom=0)
        right.plot(xs, [p["rss"] / 2**30 for p in points[axis]], "o-", color="C1")
        right.set(xscale="log", xlabel=xlabel, ylabel="GiB", title="peak memory")
        right.set_ylim(bottom=0)
        fig.tight_layout()
        fig.savefig(out / f"scaling-{axis}.png", dpi=90)
        plt.close(fig)
        lines.append(f"![bigcat time and memory vs {axis}](benchmarks/results/scaling-{axis}.png)")
    return "\n".join(lines), points


def _ok(condition: bool) -> str:
    return "met" if condition else "**missed**"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    libs = ", ".join(
        f"{p} {version(p)}" for p in ("bigcat", "anndata", "zarr", "numcodecs", "h5py", "numpy", "dask", "numba")
    )
    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} cores, {gib(psutil.virtual_memory().total)} RAM, "
        f"Python {platform.python_version()}; {libs}"
    )


def write_report(sections: dict[str, str], path: Path) -> None:
    """Replace each group's block (between its own markers) in ``path``; keep the others."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    for group, section in sections.items():
        begin, end = f"<!-- bench:{group}:begin -->", f"<!-- bench:{group}:end -->"
        body = "\n".join(
            [
                begin,
                f"Run on {dt.date.today().isoformat()} with `make bench` (`python -m benchmarks --scale "
                f"{' '.join(ARGS.scale)} --repeat {ARGS.repeat}{' --only ' + group if ARGS.only else ''}`).",
                f"Machine: {machine()}.",
                "",
                section,
                end,
            ]
        )
        if begin in text and end in text:
            text = text[: text.index(begin)] + body + text[text.index(end) + len(end) :]
        else:
            text = text.rstrip() + "\n\n" + body + "\n"
    path.write_text(text)


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--scale", nargs="+", default=["S"], choices=sorted(SCALES))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--report", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument(
        "--only",
        choices=["convert", "stats", "command", "outputs", "s3", "scaling", "map", "knn", "de", "mapmycells", "compat"],
        help="Run one group of benchmarks.",
    )
    parser.add_argument("--clusters", nargs="+", type=int, default=[50, 5000], help="Cluster counts for stats.")
    parser.add_argument("--groupby", action="store_true", help="Also time the groupby engine (slow).")
    ARGS = parser.parse_args()
    DATA.mkdir(exist_ok=True)
    groups = ("convert", "stats", "command", "outputs", "s3", "scaling", "map", "knn", "de", "mapmycells", "compat")
    sections: dict[str, list[str]] = {g: [] for g in groups}

    def record(group: str, name: str, text: str, results: object) -> None:
        print(text, flush=True)
        sections[group].append(text)
        (DATA / f"results-{name}.json").write_text(json.dumps(results, indent=1, default=str))

    per_scale = {
        "convert": lambda scale: run_scale(scale, ARGS.repeat),
        "stats": lambda scale: run_stats(scale, ARGS.repeat, ARGS.clusters),
        "command": lambda scale: run_command(scale, ARGS.repeat, ARGS.clusters),
        "outputs": lambda scale: run_outputs(scale, ARGS.repeat, max(ARGS.clusters)),
        "s3": lambda scale: run_s3(scale, ARGS.repeat),
    }
    for scale in ARGS.scale:
        for group, run in per_scale.items():
            if ARGS.only in (None, group):
                record(group, f"{group}-{scale}", *run(scale))
    if ARGS.only in (None, "scaling"):
        record("scaling", "scaling", *run_scaling(ARGS.repeat, full="M" in ARGS.scale))
    if ARGS.only in (None, "map"):
        record("map", "map", *run_map(ARGS.repeat))
    if ARGS.only in (None, "knn"):
        record("knn", "knn", *run_knn(ARGS.repeat))
    if ARGS.only in (None, "de"):
        record("de", "de", *run_de(ARGS.repeat, full="M" in ARGS.scale))
    if ARGS.only in (None, "mapmycells"):
        record("mapmycells", "mapmycells", *run_mapmycells(ARGS.repeat, full="M" in ARGS.scale))
    if ARGS.only in (None, "compat") and (compat := run_compat()) is not None:
        record("compat", "compat", *compat)
    write_report({group: "\n\n".join(texts) for group, texts in sections.items() if texts}, ARGS.report)
    print(f"wrote {ARGS.report}")


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
