from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import bigcat
from bigcat.errors import (
    BigcatFormatError,
    BigcatOutputExistsError,
    BigcatStoreIncompleteError,
    CorruptMatrixError,
    InputNotFoundError,
)
from bigcat.extras import SLOTS
from conftest import ARCHIVES, dense


def read_back(path: Path) -> ad.AnnData:
    """Read a converted store independently of bigcat where possible."""
    ds = bigcat.open_dataset(path)
    if bigcat._io.publish.read_marker(path)["layout"] == "sparse":
        return ad.read_zarr(path)  # anndata's own reader
    return bigcat.to_anndata(ds)


@pytest.mark.parametrize("encoding", ["csr", "csc", "dense", "int64", "bigendian"])
@pytest.mark.parametrize("layout", ["sparse", "dense"])
def test_round_trip_exact(encoding, layout, encodings, atlas, tmp_path):
    out = tmp_path / "out.zarr"
    # small blocks so that many blocks (and for CSC many buckets) are exercised
    bigcat.convert(encodings[encoding], out, layout=layout, block_nnz=20_000, chunk_cells=700, progress=False)
    back = read_back(out)
    expected = dense(atlas.X)
    np.testing.assert_array_equal(dense(back.X), expected)
    assert list(back.obs_names) == list(atlas.obs_names)
    assert list(back.var_names) == list(atlas.var_names)
    pd.testing.assert_series_equal(back.obs["cluster"], atlas.obs["cluster"], check_names=False)
    if encoding == "int64":
        assert dense(back.X).dtype == np.int64
    if layout == "sparse":
        z = ad.read_zarr(out)
        assert sp.issparse(z.X)
        assert z.X.format == "csr"


def test_sparse_store_layout(atlas_h5ad, tmp_path):
    import zarr

    out = bigcat.convert(atlas_h5ad, tmp_path / "a.zarr", progress=False)
    root = zarr.open_group(str(out), mode="r")
    assert root.metadata.zarr_format == 3
    assert root["X"].attrs["encoding-type"] == "csr_matrix"
    # one index dtype, scipy's (int32 while the values fit): see tests/io/test_index_dtypes.py
    assert root["X"]["indptr"].dtype == root["X"]["indices"].dtype == np.int32
    assert root["X"]["data"].shards is not None  # sharded: few files
    marker = json.loads((out / "zarr.json").read_text())["attributes"]["bigcat"]
    assert marker["complete"] is True
    assert marker["source"]["input"]["shape"] == [3000, 1500]
    assert json.loads((out / "zarr.json").read_text())["consolidated_metadata"] is not None
    assert sum(1 for p in (out / "X").rglob("*") if p.is_file()) <= 8  # data, indices, indptr: 1 shard + metadata
    assert sum(1 for p in out.rglob("*") if p.is_file()) < 60


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.float64, np.int64, np.uint16])
def test_shard_writer_writes_what_zarr_writes(dtype, tmp_path):
    """Convert stores shards through its own encoder: the files must be byte for byte
    those zarr-python writes for the same values (whole shards and a partial last one)."""
    import zarr

    from bigcat._io.layout import sparse_compressors
    from bigcat._io.shards import ShardWriter

    rng = np.random.default_rng(0)
    values = (rng.poisson(2, 10_500) * (rng.random(10_500) < 0.5)).astype(dtype)
    group = zarr.open_group(tmp_path / "x.zarr", mode="w", zarr_format=3)
    kwargs = {
        "shape": (0,),
        "dtype": dtype,
        "chunks": (1000,),
        "shards": (4000,),
        "compressors": sparse_compressors(),
        "fill_value": 0,
        "config": {"write_empty_chunks": True},
    }
    by_zarr, ours = group.create_array("zarr", **kwargs), group.create_array("ours", **kwargs)
    writer = ShardWriter.for_array(ours)
    assert writer is not None
    for k, start in enumerate(range(0, len(values), 4000)):
        piece = values[start : start + 4000]
        by_zarr.resize((start + len(piece),))
        by_zarr[start : start + len(piece)] = piece
        ours.resize((start + len(piece),))
        writer.write(k, piece)
    for k in range(3):
        assert (tmp_path / f"x.zarr/ours/c/{k}").read_bytes() == (tmp_path / f"x.zarr/zarr/c/{k}").read_bytes()
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "x.zarr", path="ours")[:], values)
    # arrays with other codecs are left to zarr
    other = group.create_array("other", **{**kwargs, "compressors": [zarr.codecs.ZstdCodec()]})
    assert ShardWriter.for_array(other) is None
    assert ShardWriter.for_array(group.create_array("plain", shape=(10,), dtype=dtype)) is None


def test_shard_reader_reads_what_zarr_reads(tmp_path):
    """bigcat's shard reader decodes ranges straight into the caller's array: every range
    (inside one chunk, across chunks and shards, the partial last shard, never-written
    shards) equals zarr-python's reading, and a damaged shard index is refused."""
    import pickle

    import zarr

    from bigcat._io.layout import sparse_compressors
    from bigcat._io.shards import ShardReader
    from bigcat.errors import BigcatInputError

    rng = np.random.default_rng(1)
    values = (rng.poisson(3, 10_500) * (rng.random(10_500) < 0.6)).astype(np.float32)
    group = zarr.open_group(tmp_path / "x.zarr", mode="w", zarr_format=3)
    kwargs = {"dtype": np.float32, "chunks": (1000,), "shards": (4000,), "compressors": sparse_compressors()}
    array = group.create_array("a", shape=values.shape, fill_value=0, config={"write_empty_chunks": True}, **kwargs)
    array[:] = values
    sparse_array = group.create_array("b", shape=(20_000,), fill_value=0, **kwargs)  # never-written shards
    sparse_array[12_345:12_400] = 7.0
    reader, other = ShardReader.for_array(array), ShardReader.for_array(sparse_array)
    assert reader is not None
    assert other is not None
    ranges = [(0, 1), (0, 1000), (999, 1001), (3999, 4001), (0, 10_500), (8000, 10_500), (10_499, 10_500), (5, 5)]
    ranges += [tuple(sorted(rng.integers(0, 10_501, 2))) for _ in range(40)]
    for lo, hi in ranges:
        out = np.full(hi - lo, -1, dtype=np.float32)
        reader.read(lo, hi, out)
        np.testing.assert_array_equal(out, values[lo:hi])
    out = np.full(20_000, -1, dtype=np.float32)
    np.testing.assert_array_equal(other.read(0, 20_000, out), sparse_array[:])
    # local shards are read into a per-thread buffer that readers share, not one of their own:
    # Dask workers keep every task's reader until the graph is done (hundreds per worker)
    from bigcat._io import shards

    assert reader.shards.root is not None
    assert len(shards._SCRATCH.buffer) > 0
    assert set(vars(reader)) == {"shards", "indexes"}
    copy = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(copy.read(0, 10_500, np.empty(10_500, np.float32)), values)
    # through the store's own API (as for fsspec/S3 stores) the same values come back
    reader.shards.root = None
    for lo, hi in ranges[:10]:
        np.testing.assert_array_equal(reader.read(lo, hi, np.empty(hi - lo, np.float32)), values[lo:hi])
    assert ShardReader.for_array(group.create_array("z", shape=(10,), dtype=np.int32)) is None
    shard = tmp_path / "x.zarr/a/c/1"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(BigcatInputError, match="damaged shard index"):
        ShardReader.for_array(array).read(4000, 4001, np.empty(1, np.float32))
    # a shard cut short (its index, moved to the new end, now points past it)
    shard = tmp_path / "x.zarr/a/c/0"
    raw = shard.read_bytes()
    index = raw[-(16 * 4 + 4) :]
    shard.write_bytes(raw[: len(raw) // 3] + index)
    with pytest.raises(BigcatInputError, match="shorter than its index says"):
        ShardReader.for_array(array).read(0, 4000, np.empty(4000, np.float32))


@pytest.mark.parametrize(("stored", "narrow"), [(np.int64, np.uint16), (np.int32, np.uint16), (np.int64, np.int32)])
def test_shard_reader_narrows_integers_as_it_decodes(tmp_path, stored, narrow):
    """Column indices are read into a narrower dtype chunk by chunk (each decoded into a
    buffer reused within the read): every range equals zarr's values; a value that does not fit is named."""
    import zarr

    from bigcat._io.layout import sparse_compressors
    from bigcat._io.shards import DoesNotFit, ShardReader

    rng = np.random.default_rng(2)
    values = rng.integers(0, 32_285, 10_500).astype(stored)
    group = zarr.open_group(tmp_path / "x.zarr", mode="w", zarr_format=3)
    kwargs = {"dtype": stored, "chunks": (1000,), "shards": (4000,), "compressors": sparse_compressors()}
    array = group.create_array("a", shape=values.shape, fill_value=0, **kwargs)
    array[:] = values
    reader = ShardReader.for_array(array)
    assert reader is not None
    ranges = [(0, 1), (0, 1000), (999, 1001), (3999, 4001), (0, 10_500), (8000, 10_500), (10_499, 10_500), (5, 5)]
    ranges += [tuple(sorted(rng.integers(0, 10_501, 2))) for _ in range(20)]
    for lo, hi in ranges:
        out = np.full(hi - lo, 7, dtype=narrow)
        reader.read(lo, hi, out)
        np.testing.assert_array_equal(out, values[lo:hi])
    # between reads a reader keeps no buffer (a decoded chunk kept by each of the hundreds a
    # Dask worker holds paused 2 GB workers in tests/test_slurm.py)
    assert set(vars(reader)) == {"shards", "indexes"}
    big = np.iinfo(narrow).max + 1
    array[2500] = big  # (a shard rewritten: a new reader, which reads its new index)
    with pytest.raises(DoesNotFit) as caught:
        ShardReader.for_array(array).read(2000, 4000, np.empty(2000, dtype=narrow))
    assert (caught.value.position, caught.value.value) == (2500, big)
    if np.dtype(narrow).kind == "i":
        return
    array[2500] = -3  # below an unsigned dtype's range
    with pytest.raises(DoesNotFit, match="element 2500 = -3"):
        ShardReader.for_array(array).read(2000, 4000, np.empty(2000, dtype=narrow))


@pytest.mark.parametrize("version", ["v0.5.0", "v0.7.0", "v0.7.8"])
@pytest.mark.parametrize("layout", ["sparse", "dense"])
def test_old_anndata_files_convert(version, layout, tmp_path):
    source = ARCHIVES / version / "adata.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ad.read_h5ad(source)
    # the dense layout holds X alone: the archives' obsm, raw … must be left out by name
    skip = SLOTS if layout == "dense" else ()
    out = bigcat.convert(source, tmp_path / "old.zarr", layout=layout, progress=False, skip=skip)
    back = read_back(out)
    np.testing.assert_array_equal(dense(back.X), dense(expected.X))
    assert list(back.obs_names) == list(expected.obs_names)
    for column in expected.obs.columns:
        left, right = back.obs[column], expected.obs[column]
        if isinstance(right.dtype, pd.CategoricalDtype):
            assert list(left.cat.categories) == list(right.cat.categories)
            assert left.cat.ordered == right.cat.ordered
        np.testing.assert_array_equal(np.asarray(left), np.asarray(right))


def test_pbmc_clusters_survive(tmp_path):
    out = bigcat.convert(ARCHIVES / "v0.5.0" / "adata.h5ad", tmp_path / "pbmc.zarr", progress=False)
    ds = bigcat.open_dataset(out)
    assert (ds.sizes["cell"], ds.sizes["gene"]) == (700, 765)
    assert ds["obsm.X_umap"].shape == (700, 2)
    assert "CD14+ Monocyte" in set(ds["bulk_labels"].values)


def test_file_without_x_fails_clearly(tmp_path):
    with pytest.raises(BigcatFormatError, match="has no X matrix"):
        bigcat.convert(ARCHIVES / "v0.11.4" / "adata.h5ad", tmp_path / "x.zarr")
    assert not (tmp_path / "x.zarr").exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_and_non_hdf5_inputs(tmp_path):
    with pytest.raises(InputNotFoundError, match="no such file"):
        bigcat.convert(tmp_path / "nope.h5ad", tmp_path / "x.zarr")
    fake = tmp_path / "fake.h5ad"
    fake.write_text("not hdf5")
    with pytest.raises(BigcatFormatError, match="not an HDF5 file"):
        bigcat.convert(fake, tmp_path / "x.zarr")


def test_existing_output_is_refused(atlas_h5ad, tmp_path):
    out = bigcat.convert(atlas_h5ad, tmp_path / "a.zarr", progress=False)
    with pytest.raises(BigcatOutputExistsError, match="output exists"):
        bigcat.convert(atlas_h5ad, out, progress=False)
    bigcat.convert(atlas_h5ad, out, layout="dense", overwrite=True, progress=False)
    assert bigcat._io.publish.read_marker(out)["layout"] == "dense"
    foreign = tmp_path / "mine.zarr"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(BigcatOutputExistsError, match="not a store bigcat wrote"):
        bigcat.convert(atlas_h5ad, foreign, overwrite=True, progress=False)
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_missing_output_folder(atlas_h5ad, tmp_path):
    with pytest.raises(bigcat.BigcatInputError, match="does not exist"):
        bigcat.convert(atlas_h5ad, tmp_path / "no" / "a.zarr")


def _corrupt_copy(source: Path, target: Path, element: str, values: np.ndarray) -> Path:
    import shutil

    shutil.copy(source, target)
    with h5py.File(target, "a") as f:
        del f["X"][element]
        f["X"].create_dataset(element, data=values)
    return target


def test_corrupt_sparse_structure_is_refused(encodings, tmp_path):
    with h5py.File(encodings["csr"]) as f:
        indptr, indices = f["X"]["indptr"][:], f["X"]["indices"][:]
    bad = indptr.copy()
    bad[5], bad[6] = bad[6], bad[5] - 1
    path = _corrupt_copy(encodings["csr"], tmp_path / "a.h5ad", "indptr", bad)
    with pytest.raises(CorruptMatrixError, match=r"X/indptr is not monotone"):
        bigcat.convert(path, tmp_path / "a.zarr")
    path = _corrupt_copy(encodings["csr"], tmp_path / "b.h5ad", "indptr", [*indptr[:-1].tolist(), indptr[-1] - 3])
    with pytest.raises(CorruptMatrixError, match=r"ends at .* but X/data has"):
        bigcat.convert(path, tmp_path / "b.zarr")
    wild = indices.copy()
    wild[len(wild) // 2] = 10**6
    path = _corrupt_copy(encodings["csr"], tmp_path / "c.h5ad", "indices", wild)
    with pytest.raises(CorruptMatrixError, match=r"X/indices\[\d+\] = 1000000 is out of range"):
        bigcat.convert(path, tmp_path / "c.zarr")
    assert not any(p.suffix == ".zarr" for p in tmp_path.iterdir())
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left behind


def test_killed_conversion_leaves_no_store(encodings, tmp_path):
    out = tmp_path / "killed.zarr"
    script = (
        "import bigcat, time\n"
        "import bigcat._io.writers as s\n"
        "orig = s.SparseZarrWriter._write\n"
        "def slow(self, block):\n"
        "    orig(self, block); time.sleep(0.05)\n"
        "s.SparseZarrWriter._write = slow\n"
        f"bigcat.convert({str(encodings['csr'])!r}, {str(out)!r}, block_nnz=2000, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".killed.zarr.bigcat-partial/X/data")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "conversion finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = list(tmp_path.glob(".killed.zarr.bigcat-partial"))
    assert len(leftovers) == 1
    with pytest.raises(BigcatStoreIncompleteError, match="incomplete store"):
        bigcat.open_dataset(leftovers[0])


def test_store_without_marker_is_refused(atlas, tmp_path):
    path = tmp_path / "plain.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atlas.write_zarr(path)
    with pytest.raises(BigcatStoreIncompleteError, match="no completion marker"):
        bigcat.open_dataset(path)
    ds = bigcat.open_dataset(path, require_marker=False)
    np.testing.assert_array_equal(dense(ds.X.data.blocks[0].compute()), dense(atlas.X[: ds.X.data.chunks[0][0]]))
    # and anndata-written Zarr converts to a bigcat store
    out = bigcat.convert(path, tmp_path / "marked.zarr", progress=False)
    np.testing.assert_array_equal(dense(ad.read_zarr(out).X), dense(atlas.X))
