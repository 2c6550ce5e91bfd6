"""`--overwrite` replaces only what bigcat wrote, and never an input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import bigcat
from bigcat._io.publish import written_by_bigcat
from bigcat.errors import BigcatError


def _bigcat(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bigcat", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("outputs") / "x.h5ad"
    bigcat.synth(path, n_cells=400, n_genes=120, n_clusters=3, nnz_per_cell=20, seed=2, progress=False)
    return path


def test_an_output_that_is_an_input_is_refused(small, tmp_path):
    before = small.read_bytes()
    done = _bigcat("sample", str(small), str(small), "--n-cells", "10", "--overwrite", "--quiet")
    assert done.returncode == 2
    assert "the output is an input" in done.stderr
    assert done.stderr.count("\n") == 1
    link = tmp_path / "link.h5ad"  # the same file under another name
    link.symlink_to(small)
    with pytest.raises(BigcatError, match="the output is an input"):
        bigcat.convert(small, link, overwrite=True, progress=False)
    stats = bigcat.cluster_stats(small, stats="sums")
    with pytest.raises(BigcatError, match="the output is an input"):
        bigcat.write_stats(stats, small, overwrite=True)
    assert small.read_bytes() == before


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".h5ad"])
def test_overwrite_replaces_only_files_bigcat_wrote(small, tmp_path, suffix):
    precious = tmp_path / f"precious{suffix}"
    if suffix == ".csv":
        pd.DataFrame({"a": [1, 2]}).to_csv(precious, index=False)
    elif suffix == ".parquet":
        pd.DataFrame({"a": [1, 2]}).to_parquet(precious)
    else:
        ad.AnnData(np.ones((2, 2), dtype=np.float32)).write_h5ad(precious)
    before = precious.read_bytes()
    done = _bigcat("stats", str(small), "--out", str(precious), "--overwrite", "--quiet", "--cluster", "threads")
    assert done.returncode == 2, done.stderr
    assert "is not a file bigcat wrote" in done.stderr
    assert precious.read_bytes() == before
    # what bigcat wrote, it may replace
    ours = tmp_path / f"ours{suffix}"
    for _ in range(2):
        done = _bigcat("stats", str(small), "--out", str(ours), "--overwrite", "--quiet", "--cluster", "threads")
        assert done.returncode == 0, done.stderr
    assert written_by_bigcat(ours)


def test_every_single_file_bigcat_writes_carries_its_mark(small, tmp_path):
    stats = bigcat.cluster_stats(small, stats="means,present")
    paths = [bigcat.sample(small, tmp_path / "s.h5ad", n_cells=50, progress=False)]
    paths += bigcat.write_stats(stats, tmp_path / "w.parquet", wide=True)
    from bigcat.marker_genes import write_table
    from bigcat.plot import save

    markers = bigcat.markers(stats, top=2)
    paths += [write_table(markers, tmp_path / "m.csv"), write_table(markers, tmp_path / "m.parquet")]
    paths += [save(bigcat.dotplot(stats, markers=1), tmp_path / f"d{s}") for s in (".png", ".svg", ".pdf")]
    from bigcat.mapmycells import write_mapmycells

    paths.append(write_mapmycells(stats, tmp_path / "p.h5"))
    for path in paths:
        assert written_by_bigcat(Path(path)), path


@pytest.mark.parametrize("option", [["--chunk-cells", "0"], ["--chunk-cells", "-5"], ["--shard-values", "0"]])
def test_non_positive_sizes_are_refused_at_once(small, tmp_path, option):
    """`convert --chunk-cells 0 --layout dense` looped forever with growing memory."""
    done = _bigcat("convert", str(small), str(tmp_path / "o.zarr"), "--layout", "dense", *option, "--quiet")
    assert done.returncode == 2, done.stderr
    assert "must be" in done.stderr
    assert not (tmp_path / "o.zarr").exists()


def test_cells_given_twice_or_merged_twice_are_refused(small, tmp_path, caplog):
    """The same cells through two inputs, or a result merged with itself, were counted twice."""
    sparse = bigcat.convert(small, tmp_path / "a.zarr", progress=False)
    dense_store = bigcat.convert(small, tmp_path / "a-dense.zarr", layout="dense", progress=False)
    with pytest.raises(BigcatError, match=r"are also in .*a\.zarr; they would be counted twice"):
        bigcat.cluster_stats([sparse, dense_store], stats="sums")
    twice = bigcat.cluster_stats([sparse, dense_store], stats="sums", allow_duplicate_cells=True)
    once = bigcat.cluster_stats(sparse, stats="sums")
    np.testing.assert_array_equal(twice["sums"].values, 2 * once["sums"].values)
    bigcat.write_stats(once, tmp_path / "s.zarr")
    done = _bigcat("stats", "--merge", str(tmp_path / "s.zarr"), str(tmp_path / "s.zarr"), "--out",
                   str(tmp_path / "m.zarr"), "--quiet")  # fmt: skip
    assert done.returncode == 2
    assert "merged twice" in done.stderr
    merged = bigcat.merge_stats([tmp_path / "s.zarr", tmp_path / "s.zarr"], allow_repeats=True)
    np.testing.assert_array_equal(merged["sums"].values, 2 * once["sums"].values)
    # a merge remembers its runs: merging it with one of its parts is refused too
    other = bigcat.cluster_stats(sparse, stats="sums")
    both = bigcat.merge_stats([once, other])
    with pytest.raises(BigcatError, match="merged twice"):
        bigcat.merge_stats([both, other])


def test_cells_without_a_label_are_reported_in_one_line(small, tmp_path, caplog):
    names = ad.read_h5ad(small).obs_names
    table = pd.DataFrame({"cell": names[100:], "label": ["a"] * (len(names) - 100)})
    table.to_csv(tmp_path / "labels.csv", index=False)
    caplog.set_level("WARNING", logger="bigcat")
    result = bigcat.cluster_stats(small, labels=tmp_path / "labels.csv", label_column="label", cell_column="cell")
    assert int(result["n_cells"].sum()) == len(names) - 100
    lines = [r.getMessage() for r in caplog.records if "have no label" in r.getMessage()]
    assert len(lines) == 1
    assert f"100 of {len(names)} cells have no label" in lines[0]


def test_wide_is_refused_where_it_cannot_apply(small, tmp_path):
    stats = bigcat.cluster_stats(small, stats="sums")
    for suffix in (".zarr", ".h5ad"):
        with pytest.raises(BigcatError, match="--wide"):
            bigcat.write_stats(stats, tmp_path / f"w{suffix}", wide=True)


def test_concurrent_conversions_to_one_output_take_turns(tmp_path):
    """Three at once crashed each other with FileNotFoundError and left temporary files."""
    source = tmp_path / "big.h5ad"
    bigcat.synth(source, n_cells=20_000, n_genes=2000, n_clusters=5, nnz_per_cell=300, seed=4, progress=False)
    out = tmp_path / "out.zarr"
    command = [sys.executable, "-m", "bigcat", "convert", str(source), str(out), "--quiet"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0, results  # one wins ...
    for code, err in results:  # ... the others say why, in one line
        if code:
            assert code == 2, err
            assert "another bigcat process is writing" in err or "output exists" in err, err
    assert (ad.read_zarr(out).X != ad.read_h5ad(source).X).nnz == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.h5ad", "out.zarr"]  # nothing left behind


def test_a_lazily_read_result_is_written_whole(small, tmp_path):
    """write_stats of a result read back from Zarr (dask-backed) and sliced wrote n_cells as
    zeros: xarray leaves dask-backed variables to compute=False."""
    stats = bigcat.cluster_stats(small, stats="sums,means", client=None, progress=False)
    bigcat.write_stats(stats, tmp_path / "all.zarr")
    lazy = bigcat.read_stats(tmp_path / "all.zarr").isel(cluster=slice(1, 4))
    bigcat.write_stats(lazy, tmp_path / "part.zarr")
    back = bigcat.read_stats(tmp_path / "part.zarr")
    np.testing.assert_array_equal(back["n_cells"].values, stats["n_cells"].values[1:4])
    np.testing.assert_allclose(back["sums"].values, stats["sums"].values[1:4])
    assert (back["n_cells"].values > 0).all()


def test_a_statistics_store_is_declared_as_xarray_declares_it(small, tmp_path):
    """The matrices are declared without xarray (no Dask array each); their metadata must be
    what xarray itself writes for the same Dataset and encoding, and xarray must read them."""
    import json

    import xarray as xr
    from zarr.codecs import BloscCodec

    from bigcat.stats.formats import STATS_CODEC

    stats = bigcat.cluster_stats(small, stats="means,present,vars", progress=False)
    bigcat.write_stats(stats, tmp_path / "ours.zarr")
    reference = stats.load().copy()
    for name in ("cluster", "gene"):
        reference = reference.assign_coords({name: reference[name].values.astype(str)})
    matrices = [n for n, v in reference.data_vars.items() if v.dims == ("cluster", "gene")]
    assert {"means", "present", "vars", "sums", "sqr_sums", "present_counts"} <= set(matrices)
    chunks = (stats.sizes["cluster"], stats.sizes["gene"])
    codec = BloscCodec(shuffle="bitshuffle", **STATS_CODEC)
    encoding = {n: {"chunks": chunks, "compressors": [codec]} for n in matrices}
    reference.to_zarr(tmp_path / "xarray.zarr", encoding=encoding, consolidated=True)
    for name in reference.variables:
        ours = json.loads((tmp_path / "ours.zarr" / name / "zarr.json").read_text())
        theirs = json.loads((tmp_path / "xarray.zarr" / name / "zarr.json").read_text())
        assert ours == theirs, name
    back = xr.open_zarr(tmp_path / "ours.zarr")
    xr.testing.assert_identical(back.drop_attrs().load(), xr.open_zarr(tmp_path / "xarray.zarr").drop_attrs().load())
    np.testing.assert_array_equal(back["means"].values, stats["means"].values)
