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
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench-data"
SCALES = {
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
        "n": n,
    }


def dataset(scale: str) -> Path:
    size = SCALES[scale]
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


def write_report(sections: list[str], path: Path) -> None:
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    body = "\n".join(
        [
            begin,
            f"Run on {dt.date.today().isoformat()} with `make bench` (`python -m benchmarks --scale "
            f"{' '.join(ARGS.scale)} --repeat {ARGS.repeat}`).",
            f"Machine: {machine()}.",
            "",
            *sections,
            end,
        ]
    )
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
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
    ARGS = parser.parse_args()
    DATA.mkdir(exist_ok=True)
    sections = []
    for scale in ARGS.scale:
        text, results = run_scale(scale, ARGS.repeat)
        print(text, flush=True)
        sections.append(text)
        (DATA / f"results-{scale}.json").write_text(json.dumps(results, indent=1, default=str))
    write_report(sections, ARGS.report)
    print(f"wrote {ARGS.report}")


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
