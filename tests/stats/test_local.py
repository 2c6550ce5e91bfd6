"""The blocks engine's pass on threads of its own (bigcat.stats.local), against the dense oracle
and against the same pass run as a Dask graph.

The store is written with 4,096-value chunks, so blocks of ~10,000 values cut rows (at chunk
boundaries) and the pieces each thread decodes cut them again; rows with unsorted or
duplicated indices are planted in the store's own arrays, also across those cuts.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

import bigcat
from bigcat.cluster import Capacity
from bigcat.errors import InputNotFoundError
from bigcat.stats import STATISTICS, cluster_stats
from bigcat.stats import blocks as blocks_module
from bigcat.stats import local as local_module
from conftest import dense
from oracles import check, oracle

ALL = ",".join(STATISTICS)
CHUNK = 4096


@pytest.fixture(scope="module")
def small_chunks(atlas_h5ad, tmp_path_factory):
    """The atlas as a sparse store of 4,096-value chunks (and shards)."""
    path = tmp_path_factory.mktemp("local") / "atlas.zarr"
    bigcat.convert(atlas_h5ad, path, shard_values=CHUNK, progress=False)
    assert zarr.open_array(path / "X" / "data", mode="r").metadata.codecs[0].chunk_shape == (CHUNK,)
    return path


def _spy_plans(monkeypatch) -> list:
    plans = []
    real = local_module._plan

    def spy(*args):
        blocks = real(*args)
        plans.append((args[-1], blocks))
        return blocks

    monkeypatch.setattr(local_module, "_plan", spy)
    return plans


@pytest.mark.parametrize(
    ("capacity", "shape"),
    [
        (Capacity(1, 1, 1 << 40), (1, 1)),  # one thread
        (Capacity(1, 3, 1 << 40), (3, 1)),  # few clusters: a partition (accumulator) per thread
        (Capacity(1, 3, 1), (1, 3)),  # a tiny budget: one accumulator, the threads split the clusters
        (Capacity(1, 4, 200_000), (2, 2)),  # room for two copies: 2 partitions × 2 cluster ranges
    ],
)
def test_blocks_cut_rows_and_match_the_oracle_and_the_graph(small_chunks, atlas, monkeypatch, caplog, capacity, shape):
    expected = oracle(dense(atlas.X), atlas.obs["cluster"].to_numpy())
    monkeypatch.setattr(blocks_module, "_capacity", lambda client: capacity)
    monkeypatch.setattr(blocks_module, "_decompose", lambda *_: shape)
    plans = _spy_plans(monkeypatch)
    caplog.set_level("INFO", logger="bigcat")
    result = cluster_stats(small_chunks, stats=ALL, block_nnz=10_000)
    check(result, expected)
    ((mode, blocks),) = plans
    assert mode == "aligned"
    assert len(blocks) > 20
    assert sum(not b.whole_rows for b in blocks) > len(blocks) // 2  # rows continue into the next block
    assert all((b.hi - b.lo) % CHUNK == 0 for b in blocks[:-1])  # cut at storage chunks
    assert all(len(b.pieces) == shape[1] + 1 for b in blocks)
    # the same pass as a Dask graph (row blocks, read and fold tasks): the same accumulators exactly
    monkeypatch.setattr(blocks_module, "LOCAL", False)
    graph = cluster_stats(small_chunks, stats=ALL, block_nnz=10_000)
    for name in ("sums", "sqr_sums", "present_counts", "nnz"):
        np.testing.assert_array_equal(result[name].values, graph[name].values, err_msg=name)
    assert len(plans) == 1  # the graph did not use the local pass


def test_normalize_runs_on_blocks_of_whole_rows(small_chunks, atlas, monkeypatch):
    """log2 CPM needs each cell's total: blocks cut at rows, pieces still cut anywhere."""
    monkeypatch.setattr(blocks_module, "_decompose", lambda *_: (1, 2))
    plans = _spy_plans(monkeypatch)
    result = cluster_stats(small_chunks, stats=ALL, block_nnz=10_000, normalize="log2cpm")
    check(result, oracle(dense(atlas.X), atlas.obs["cluster"].to_numpy(), normalize=True))
    ((mode, blocks),) = plans
    assert mode == "rows"
    assert all(b.whole_rows for b in blocks)
    assert len(blocks) > 20


def _plant(store, edit) -> sp.csr_matrix:
    """Rewrite X's data and indices in the store (same length) with ``edit(data, indices,
    indptr)``; returns the matrix scipy makes of the new arrays, duplicates summed."""
    x = zarr.open_group(store / "X", mode="r+")
    data, indices, indptr = x["data"][:], x["indices"][:], x["indptr"][:]
    edit(data, indices, indptr)
    x["data"][:] = data
    x["indices"][:] = indices
    matrix = sp.csr_matrix((data, indices, indptr), shape=tuple(x.attrs["shape"]))
    matrix.sum_duplicates()
    return matrix


def _long_row_across(indptr: np.ndarray, position: int) -> int:
    """The row holding ``position`` and ``position - 1``."""
    row = int(np.searchsorted(indptr, position, side="right")) - 1
    assert indptr[row] < position < indptr[row + 1] - 1
    return row


@pytest.mark.parametrize("where", ["inside", "block edge", "piece edge"])
def test_unsorted_rows_start_the_pass_again_on_whole_rows(small_chunks, atlas, tmp_path, monkeypatch, caplog, where):
    """A duplicated column index planted inside a block, at a block (chunk) boundary, or at
    the boundary of two threads' pieces: the pass starts again with blocks of whole rows,
    where duplicates are summed as scipy sums them."""
    store = tmp_path / "planted.zarr"
    shutil.copytree(small_chunks, store)

    def edit(data, indices, indptr):
        position = {"inside": 3 * CHUNK + 1001, "block edge": 8 * CHUNK, "piece edge": 6 * CHUNK}[where]
        _long_row_across(indptr, position)
        indices[position] = indices[position - 1]  # a duplicate of its left neighbour's column
        data[position] = 5.0

    matrix = _plant(store, edit)
    monkeypatch.setattr(blocks_module, "_decompose", lambda *_: (1, 2))
    plans = _spy_plans(monkeypatch)
    caplog.set_level(logging.WARNING, logger="bigcat")
    # blocks of 4 chunks (a group of two threads reads blocks of twice block_nnz): 8 × 4,096 is
    # a block edge, 6 × 4,096 the edge of a block's two pieces
    result = cluster_stats(store, stats=ALL, block_nnz=2 * CHUNK)
    assert all(b.hi - b.lo == 4 * CHUNK for b in plans[0][1][:-1])
    check(result, oracle(matrix.toarray(), atlas.obs["cluster"].to_numpy()))
    assert [mode for mode, _ in plans] == ["aligned", "rows"]
    if where == "piece edge":
        assert any(6 * CHUNK in b.pieces[1:-1] for b in plans[0][1])
    assert any("unsorted or duplicated indices" in r.getMessage() for r in caplog.records)
    # the graph of row blocks agrees
    monkeypatch.setattr(blocks_module, "LOCAL", False)
    graph = cluster_stats(store, stats=ALL, block_nnz=4 * CHUNK)
    for name in ("sums", "sqr_sums", "present_counts", "nnz"):
        np.testing.assert_array_equal(result[name].values, graph[name].values, err_msg=name)


@pytest.mark.parametrize("value", [1_000_000, 60_000, -1])  # beyond uint16, beyond the genes, negative
def test_out_of_range_index_names_the_element(small_chunks, tmp_path, monkeypatch, value):
    """The read buffers hold the indices as uint16 (1,500 genes): a value that does not fit is
    found as it is narrowed, one that fits but exceeds the genes by the check after it."""
    store = tmp_path / "bad.zarr"
    shutil.copytree(small_chunks, store)

    def edit(data, indices, indptr):
        indices[5 * CHUNK + 17] = value

    _plant(store, edit)
    monkeypatch.setattr(blocks_module, "_decompose", lambda *_: (1, 2))
    dtypes = []
    real = local_module._index_dtype
    monkeypatch.setattr(local_module, "_index_dtype", lambda *args: dtypes.append(real(*args)) or dtypes[-1])
    with pytest.raises(
        bigcat.errors.CorruptMatrixError, match=rf"X/indices\[{5 * CHUNK + 17}\] = {value} is out of range \[0, 1500\)"
    ):
        cluster_stats(store, stats=ALL, block_nnz=4 * CHUNK)
    assert dtypes == [np.uint16]


def test_an_error_in_one_thread_stops_the_others(small_chunks, monkeypatch):
    """A thread that fails (here: its fold) aborts its group's barrier: the pass raises the
    error itself, not a broken barrier, and no thread is left waiting."""
    monkeypatch.setattr(blocks_module, "_decompose", lambda *_: (1, 2))
    calls = []

    def fail(views, block, arrays, gene_map, settings, lo_c, hi_c):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            msg = "planted"
            raise RuntimeError(msg)

    monkeypatch.setattr(local_module, "_fold", fail)
    with pytest.raises(RuntimeError, match="planted"):
        cluster_stats(small_chunks, stats=ALL, block_nnz=4 * CHUNK)
    assert not [t for t in threading.enumerate() if t.name.startswith("bigcat-stats")]


def test_rows_mode_sums_a_duplicate_across_two_threads_pieces(small_chunks, atlas, tmp_path, monkeypatch):
    """With log2 CPM the pass runs on whole rows from the start; a duplicate planted where two
    threads' pieces of a block meet inside a row is found there, and that block summed."""
    monkeypatch.setattr(blocks_module, "_decompose", lambda *_: (1, 2))
    plans = _spy_plans(monkeypatch)
    cluster_stats(small_chunks, stats="sums", block_nnz=4 * CHUNK, normalize="log2cpm")
    ((_, blocks),) = plans
    indptr = zarr.open_array(small_chunks / "X" / "indptr", mode="r")[:]
    inside = [int(b.pieces[1]) for b in blocks if int(b.pieces[1]) not in set(indptr.tolist())]
    position = inside[len(inside) // 2]  # a piece edge inside a row
    store = tmp_path / "planted.zarr"
    shutil.copytree(small_chunks, store)

    def edit(data, indices, indptr):
        _long_row_across(indptr, position)
        indices[position] = indices[position - 1]
        data[position] = 5.0

    matrix = _plant(store, edit)
    plans.clear()
    result = cluster_stats(store, stats=ALL, block_nnz=4 * CHUNK, normalize="log2cpm")
    check(result, oracle(matrix.toarray(), atlas.obs["cluster"].to_numpy(), normalize=True))
    assert [m for m, _ in plans] == ["rows"]
    assert position in [int(b.pieces[1]) for b in plans[0][1]]


@pytest.mark.parametrize("shape", [(2, 1), (1, 2)])
def test_ctrl_c_stops_every_thread_after_its_block(small_chunks, monkeypatch, shape):
    """Ctrl-C reaches the caller's thread while it waits: the threads stop at their next block
    (with one thread per group there is no barrier to break), and the interrupt propagates."""
    monkeypatch.setattr(blocks_module, "_decompose", lambda *_: shape)
    calls = []
    real = local_module._fold

    def fold(*args):
        calls.append(1)
        if len(calls) == 2:  # what Ctrl-C does: SIGINT to the main thread, waiting for the others
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        time.sleep(0.02)  # the pass lasts seconds: the caller's thread wakes every 0.2 s
        real(*args)

    monkeypatch.setattr(local_module, "_fold", fold)
    plans = _spy_plans(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        cluster_stats(small_chunks, stats=ALL, block_nnz=CHUNK)
    assert not [t for t in threading.enumerate() if t.name.startswith("bigcat-stats")]
    ((_, blocks),) = plans
    assert len(blocks) > 40
    assert len(calls) <= 2 + 2 * shape[1]  # each thread finished at most the block it was folding


@pytest.mark.parametrize("shape", [(1, 3), (2, 2)])
def test_h5ad_pieces_read_on_several_threads(atlas_h5ad, atlas, monkeypatch, shape):
    """An .h5ad (h5py serializes its reads) in blocks of whole rows (no storage chunks to cut
    at), pieces read by several threads: the oracle's statistics."""
    monkeypatch.setattr(blocks_module, "_decompose", lambda *_: shape)
    plans = _spy_plans(monkeypatch)
    result = cluster_stats(atlas_h5ad, stats=ALL, block_nnz=20_000)
    check(result, oracle(dense(atlas.X), atlas.obs["cluster"].to_numpy()))
    ((mode, blocks),) = plans
    assert mode == "aligned"
    assert all(b.whole_rows for b in blocks)
    assert len(blocks) > 10


def test_runs_in_process_says_which_inputs_need_no_graph(small_chunks, atlas_h5ad, encodings, tmp_path, monkeypatch):
    assert bigcat.stats.runs_in_process(small_chunks)
    assert bigcat.stats.runs_in_process([str(small_chunks), atlas_h5ad])  # a store and a file of one dtype
    assert not bigcat.stats.runs_in_process(small_chunks, engine="groupby")
    assert not bigcat.stats.runs_in_process(bigcat.open_dataset(small_chunks))  # Datasets: cluster_stats decides
    assert not bigcat.stats.runs_in_process(encodings["csc"])  # transposed through the graph
    assert not bigcat.stats.runs_in_process(encodings["bigendian"])
    assert not bigcat.stats.runs_in_process([atlas_h5ad, encodings["int64"]])  # read buffers of one dtype
    with pytest.raises(InputNotFoundError, match=r"missing\.zarr"):  # said before any cluster is started
        bigcat.stats.runs_in_process(tmp_path / "missing.zarr")
    monkeypatch.setattr(blocks_module, "LOCAL", False)
    assert not bigcat.stats.runs_in_process(small_chunks)
