from __future__ import annotations

import itertools
import sys

import numpy as np
import pandas as pd
import pytest
import sparse

import bigcat
from bigcat.errors import BigcatFormatError, InputNotFoundError
from conftest import dense, raise_if_dask_computes


@pytest.fixture(scope="module")
def stores(atlas_h5ad, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stores")
    return {
        "h5ad": atlas_h5ad,
        "sparse": bigcat.convert(atlas_h5ad, folder / "s.zarr", progress=False),
        "dense": bigcat.convert(atlas_h5ad, folder / "d.zarr", layout="dense", progress=False),
    }


@pytest.mark.parametrize("kind", ["h5ad", "sparse", "dense"])
def test_same_dataset_whatever_the_layout(kind, stores, atlas):
    ds = bigcat.open_dataset(stores[kind])
    assert ds.X.dims == ("cell", "gene")
    assert ds.sizes == {"cell": 3000, "gene": 1500}
    assert set(ds.coords) == {"cell", "gene", "cluster", "donor", "baseline"}
    assert ds["cluster"].dims == ("cell",)
    assert ds["baseline"].dims == ("gene",)
    assert ds["cluster"].dtype == object
    assert ds["cell"].dtype == object
    np.testing.assert_array_equal(ds["cluster"].values, atlas.obs["cluster"].astype(str).to_numpy())
    np.testing.assert_array_equal(ds["gene"].values, atlas.var_names.to_numpy())
    assert ds["cluster"].attrs["categorical"]["categories"] == list(atlas.obs["cluster"].cat.categories)
    # values: column sums through Dask equal the reference
    column_sums = ds.X.sum("cell").compute().data
    np.testing.assert_allclose(dense(column_sums), np.asarray(atlas.X.sum(axis=0)).ravel(), rtol=1e-5)
    # xarray's own groupby works on the cluster coordinate
    assert set(ds.groupby("cluster").groups) == set(atlas.obs["cluster"].astype(str))


@pytest.mark.parametrize("kind", ["h5ad", "sparse"])
def test_sparse_sources_give_sparse_chunks(kind, stores, atlas):
    ds = bigcat.open_dataset(stores[kind], chunk_nnz=50_000)
    x = ds.X.data
    assert isinstance(x._meta, sparse.COO)
    assert x.numblocks[0] > 3
    assert x.numblocks[1] == 1
    block = x.blocks[1].compute()
    assert isinstance(block, sparse.COO)
    start = x.chunks[0][0]
    np.testing.assert_array_equal(block.todense(), dense(atlas.X[start : start + x.chunks[0][1]]))
    # rows are never split: each chunk stays within the requested number of values
    assert block.nnz <= 50_000


def test_csc_source_is_chunked_by_genes(encodings, atlas):
    ds = bigcat.open_dataset(encodings["csc"], chunk_nnz=50_000)
    assert ds.X.data.numblocks[0] == 1
    assert ds.X.data.numblocks[1] > 3
    np.testing.assert_array_equal(
        dense(ds.X.data.blocks[0, 2].compute()),
        dense(atlas.X[:, sum(ds.X.data.chunks[1][:2]) :][:, : ds.X.data.chunks[1][2]]),
    )


@pytest.mark.parametrize("kind", ["h5ad", "sparse", "dense"])
def test_open_select_and_reduce_are_lazy(kind, stores, atlas):
    """open_dataset promises laziness: opening, selecting, building reductions and groupby
    compute nothing (nothing is read from X until asked)."""
    with raise_if_dask_computes():
        ds = bigcat.open_dataset(stores[kind])
        sums = ds.X.sum("cell")
        subset = ds.isel(cell=slice(0, 10), gene=[1, 5])
        grouped = ds.X.groupby("cluster")
    assert sums.shape == (atlas.n_vars,)
    assert subset.X.shape == (10, 2)
    assert len(grouped.groups) == atlas.obs["cluster"].nunique()
    values = sums.data.compute()
    values = values.todense() if hasattr(values, "todense") else values
    expected = np.asarray(dense(atlas.X).sum(axis=0), dtype=np.float64)
    np.testing.assert_allclose(np.asarray(values, dtype=np.float64), expected, rtol=1e-6)


def test_dense_layout_opens_with_plain_xarray(stores, atlas):
    import xarray as xr

    ds = xr.open_zarr(stores["dense"])
    assert ds.X.data.chunksize == (3000, 1500) or ds.X.encoding["chunks"] == (3000, 1500)
    np.testing.assert_array_equal(ds.X[:10].values, dense(atlas.X[:10]))
    # xarray ≥ 2025 refuses to group by a lazy (Dask) coordinate: load the labels first
    ds = ds.assign_coords(cluster=ds["cluster"].compute())
    means = ds.X.groupby("cluster").mean().compute()
    first = atlas.obs["cluster"].cat.categories[0]
    expected = np.asarray(atlas.X[(atlas.obs["cluster"] == first).to_numpy()].mean(axis=0)).ravel()
    np.testing.assert_allclose(means.sel(cluster=first).values, expected, rtol=1e-5)


def test_parquet_opens_as_table(tmp_path):
    frame = pd.DataFrame({"cell_label": ["a", "b"], "cluster_alias": [1, 2]})
    frame.to_parquet(tmp_path / "meta.parquet")
    pd.testing.assert_frame_equal(bigcat.open_dataset(tmp_path / "meta.parquet"), frame)


def test_clear_errors(tmp_path):
    with pytest.raises(InputNotFoundError, match="no such file"):
        bigcat.open_dataset(tmp_path / "missing.zarr")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BigcatFormatError, match=r"unknown file type '\.txt'"):
        bigcat.open_dataset(tmp_path / "notes.txt")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(BigcatFormatError, match="not a Zarr store"):
        bigcat.open_dataset(tmp_path / "empty.zarr")
    (tmp_path / "bad.parquet").write_text("nope")
    with pytest.raises(BigcatFormatError, match="not a readable Parquet"):
        bigcat.open_dataset(tmp_path / "bad.parquet")
    truncated = tmp_path / "cut.h5ad"
    truncated.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(BigcatFormatError, match="cannot be read as HDF5"):
        bigcat.open_dataset(truncated)


def test_buffer_pool_reuses_only_released_arrays():
    import pickle

    from bigcat._memory import BufferPool

    pool = BufferPool(limit=2)
    a = pool.take(1000, np.float32)
    b = pool.take(1000, np.float32)
    assert not np.shares_memory(a, b)  # a is still referenced: never handed out twice
    view = a[10:20]
    del a
    c = pool.take(900, np.float32)
    assert not np.shares_memory(c, view)  # a view keeps the array busy
    del view, c
    d = pool.take(900, np.float32)
    assert len(pool.buffers) == 2
    assert any(np.shares_memory(d, buf) for buf in pool.buffers)
    assert pool.take(900, np.int32).dtype == np.int32  # past the limit: a plain new array
    assert len(pool.buffers) == 2
    assert pickle.loads(pickle.dumps(pool)).buffers == []  # buffers never travel
    # with the largest block known, every new array has exactly that size (no slack)
    sized = BufferPool(limit=2, size=5000)
    assert len(sized.take(1000, np.float32).base) == 5000
    assert len(sized.take(6000, np.float32).base) == 6000  # a larger request still fits
    assert pickle.loads(pickle.dumps(sized)).size == 5000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on anonymous mappings")
def test_small_pages_and_arena(monkeypatch):
    """Arrays on their own small-page mappings are zero, writable and the base of their
    views (the pool counts views through them); an arena hands out aligned,
    non-overlapping pieces until it is full, and again from the start after a reset."""
    import mmap
    import pickle

    from bigcat import _memory as util

    small = util.small_pages((3, 4), np.float64)  # below the threshold: plain NumPy
    assert small.flags.owndata
    assert not small.any()
    monkeypatch.setattr(util, "SMALL_PAGES_ABOVE", 0)
    a = util.small_pages((300, 7), np.int32)
    assert isinstance(a.base, mmap.mmap)
    assert a.shape == (300, 7)
    assert a.dtype == np.int32
    assert not a.any()
    before = sys.getrefcount(a)
    view = a[10:20, 3]
    assert view.base is a
    assert sys.getrefcount(a) == before + 1
    a[5, 6] = 9
    assert pickle.loads(pickle.dumps(a))[5, 6] == 9

    arena = util.PageArena(3 * 4096)
    first = arena.take(1000, np.float32)
    second = arena.take((10, 10), np.uint16)
    assert second.ctypes.data - first.ctypes.data == 4096  # aligned pieces
    assert not np.shares_memory(first, second)
    assert first[3:].base is first
    assert arena.take(4097, np.uint8) is None  # does not fit in what is left
    first[:] = 1.5
    second[:] = 7
    arena.reset()
    again = arena.take(1024, np.float32)
    assert np.shares_memory(again, first)
    assert again[0] == 1.5
    arena.trim()  # the pages past `again` read as zeros
    assert not second.any()
    assert again[999] == 1.5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on anonymous mappings")
def test_prefault_touches_without_writing(monkeypatch):
    import mmap
    from pathlib import Path

    from bigcat import _memory as util

    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * mmap.PAGESIZE

    monkeypatch.setattr(util, "SMALL_PAGES_ABOVE", 0)
    a = util.small_pages((256, 4096), np.float64)  # 8 MB of untouched zero pages
    a[3, 5] = 2.5
    before = resident()
    assert util.prefault(a[1:-1])  # rows 1…254: whole pages, reaching into rows 0 and 255
    assert resident() - before >= 7 * 2**20  # now resident
    assert a[3, 5] == 2.5
    assert np.count_nonzero(a) == 1
    assert not util.prefault(a[:, ::2])  # not contiguous: the caller fills it instead
    assert not util.prefault(a[:0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on anonymous mappings")
def test_buffer_pool_on_small_pages_and_an_arena(monkeypatch):
    """Pooled arrays on mappings are reused only once no view of them is left; new ones
    come from the arena while it has room; release tells whether any is still in use."""
    from bigcat import _memory as util
    from bigcat._memory import BufferPool

    monkeypatch.setattr(util, "SMALL_PAGES_ABOVE", 0)
    arena = util.PageArena(2 * 4096)
    pool = BufferPool(limit=4, size=1024, arena=arena)
    a = pool.take(1000, np.float32)
    b = pool.take(1000, np.int32)
    c = pool.take(1000, np.float32)  # the arena is full: a mapping of its own
    assert pool.buffers[0].base is arena.memory
    assert pool.buffers[1].base is arena.memory
    assert pool.buffers[2].base is not arena.memory
    assert len(pool.buffers[2]) == 1024
    assert len({id(x.base) for x in (a, b, c)}) == 3
    assert not np.shares_memory(a, c)
    view = a[5:10]
    del a
    d = pool.take(1000, np.float32)
    assert not np.shares_memory(d, view)  # a view of a keeps it busy
    assert pool.release() is False  # view, b, c and d are alive
    assert pool.buffers == []
    pool = BufferPool(limit=4, size=1024, arena=arena)
    e = pool.take(1000, np.float32)
    del e
    assert pool.release() is True


@pytest.mark.parametrize("kind", ["h5ad", "sparse"])
def test_rows_read_into_pooled_buffers(kind, stores, atlas):
    """Blocks read through a pool equal plain reads, also when the pool's arrays are
    reused for later blocks."""
    from bigcat._io.source import open_source
    from bigcat._memory import BufferPool

    pool = BufferPool(limit=4)
    full = dense(atlas.X)
    with open_source(stores[kind]) as source:
        bounds = source.row_bounds(20_000)
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            block = source.read_rows(int(lo), int(hi), pool=pool)
            np.testing.assert_array_equal(block.toarray(), full[lo:hi])
            if i < len(bounds) - 2:  # scipy copies a view of less than half its array (the short last block)
                assert any(np.shares_memory(block.data, buf) for buf in pool.buffers)
            del block
    assert len(pool.buffers) <= 4
