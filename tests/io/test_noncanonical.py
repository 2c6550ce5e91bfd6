"""Sparse X with unsorted and duplicated entries (legal in scipy, where duplicates add up).

The reference is what anndata reads and scipy computes: ``read_h5ad(...).X.toarray()``
sums duplicated (row, column) entries; statistics and conversions must see that matrix.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import bigcat
from bigcat.errors import BigcatInputError
from oracles import check, oracle

STATS = "sums,means,present,sqr_sums,sqr_means,vars,nnz"


def _noncanonical(n_cells: int = 400, n_genes: int = 60, seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    """A CSR matrix whose rows have shuffled column order and repeated entries (some of
    them cancelling to an explicit zero), and its cluster labels."""
    rng = np.random.default_rng(seed)
    x = sp.random(n_cells, n_genes, density=0.2, format="csr", random_state=seed, dtype=np.float64)
    x.data = np.ceil(x.data * 5)
    coo = x.tocoo()
    dup = rng.random(coo.nnz) < 0.3  # repeat 30% of the entries with other values
    extra = rng.integers(1, 4, dup.sum()).astype(np.float64)
    rows = np.r_[coo.row, coo.row[dup]]
    cols = np.r_[coo.col, coo.col[dup]]
    vals = np.r_[coo.data, extra]
    # one entry cancels to zero: 2 + (-2) is a stored zero scipy keeps after summing
    rows, cols, vals = np.r_[rows, 0, 0], np.r_[cols, 7, 7], np.r_[vals, 2.0, -2.0]
    order = rng.permutation(len(rows))
    order = order[np.argsort(rows[order], kind="stable")]  # rows in order, columns shuffled
    rows, cols, vals = rows[order], cols[order], vals[order]
    indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=n_cells))]
    m = sp.csr_matrix((vals, cols.astype(np.int32), indptr), shape=(n_cells, n_genes))
    assert not m.has_canonical_format
    labels = np.array([f"cl{i}" for i in rng.integers(0, 5, n_cells)])
    return m, labels


def _write(path: Path, m: sp.spmatrix, labels: np.ndarray) -> Path:
    """X written array by array (anndata could canonicalize it on the way)."""
    n, g = m.shape
    obs = pd.DataFrame({"cluster": pd.Categorical(labels)}, index=[f"c{i}" for i in range(n)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(g)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.AnnData(obs=obs, var=var).write_h5ad(path)
    kind = "csr_matrix" if sp.isspmatrix_csr(m) else "csc_matrix"
    with h5py.File(path, "a") as f:
        if "X" in f:
            del f["X"]
        group = f.create_group("X")
        group.attrs.update({"encoding-type": kind, "encoding-version": "0.1.0", "shape": np.array(m.shape)})
        group.create_dataset("data", data=m.data)
        group.create_dataset("indices", data=m.indices)
        group.create_dataset("indptr", data=m.indptr.astype(np.int64))
    return path


def _reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    adata = ad.read_h5ad(path)
    assert not adata.X.has_canonical_format  # anndata hands over the arrays as stored
    return adata.X.toarray(), adata.obs["cluster"].to_numpy()


@pytest.mark.parametrize("layout", ["csr", "csc"])
def test_statistics_straight_from_h5ad_sum_duplicates_like_scipy(tmp_path, layout, caplog):
    m, labels = _noncanonical()
    if layout == "csc":  # the arrays of a non-canonical CSR of the transpose: the same defects by column
        t, _ = _noncanonical(n_cells=m.shape[1], n_genes=m.shape[0])
        m = sp.csc_matrix((t.data, t.indices, t.indptr), shape=m.shape)
        assert not m.has_canonical_format
    path = _write(tmp_path / f"{layout}.h5ad", m, labels)
    x, labels = _reference(path)
    caplog.set_level(logging.WARNING, logger="bigcat")
    result = bigcat.cluster_stats(path, stats=STATS, block_nnz=1_000)
    check(result, oracle(x, labels))
    assert any("unsorted or duplicated indices" in r.getMessage() for r in caplog.records)


def test_present_and_sqr_sums_are_the_ones_of_the_summed_matrix(tmp_path):
    """The two errors of counting stored entries: present counted a duplicate twice and
    squared sums added x₁² + x₂² instead of (x₁ + x₂)²."""
    indptr = np.array([0, 3, 4])
    data, indices = np.array([1.0, 2.0, 3.0, 5.0]), np.array([1, 0, 1, 0], dtype=np.int32)
    m = sp.csr_matrix((data, indices, indptr), shape=(2, 2))  # row 0: (0,1)=1, (0,0)=2, (0,1)=3
    path = _write(tmp_path / "tiny.h5ad", m, np.array(["a", "a"]))
    result = bigcat.cluster_stats(path, stats="present,sqr_sums,sums,nnz")
    # the matrix scipy sees: [[2, 4], [5, 0]]
    np.testing.assert_array_equal(result["sums"].values, [[7.0, 4.0]])
    np.testing.assert_array_equal(result["sqr_sums"].values, [[4.0 + 25.0, 16.0]])
    np.testing.assert_array_equal(result["present"].values, [[1.0, 0.5]])
    np.testing.assert_array_equal(result["nnz"].values, [[2, 1]])


@pytest.mark.parametrize("layout", ["sparse", "dense"])
def test_convert_writes_the_canonical_matrix(tmp_path, layout):
    m, labels = _noncanonical(seed=1)
    path = _write(tmp_path / "x.h5ad", m, labels)
    x, labels = _reference(path)
    store = bigcat.convert(path, tmp_path / "x.zarr", layout=layout, progress=False, block_nnz=2_000)
    if layout == "sparse":
        back = ad.read_zarr(store).X
        assert back.has_canonical_format or _canonical(back)
        np.testing.assert_array_equal(back.toarray(), x)
    check(bigcat.cluster_stats(store, stats=STATS), oracle(x, labels))


def _canonical(m: sp.csr_matrix) -> bool:
    """Rows strictly increasing, checked directly (scipy's flag is only a cache)."""
    d = np.diff(m.indices)
    starts = np.zeros(len(m.indices), dtype=bool)
    starts[m.indptr[1:-1][m.indptr[1:-1] < len(m.indices)]] = True
    return bool(np.all((d > 0) | starts[1:]))


def test_parallel_copy_refuses_unsorted_rows_with_one_line(tmp_path):
    m, labels = _noncanonical(seed=2)
    path = _write(tmp_path / "x.h5ad", m, labels)
    first = next(r for r in range(m.shape[0]) if np.any(np.diff(m.indices[m.indptr[r] : m.indptr[r + 1]]) <= 0))
    with (
        warnings.catch_warnings(),
        bigcat.connect("local", n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0") as client,
    ):
        warnings.simplefilter("ignore")
        with pytest.raises(BigcatInputError, match=rf"x\.h5ad: X row {first} has unsorted or duplicated") as error:
            bigcat.convert(path, tmp_path / "x.zarr", client=client, progress=False, shard_values=500)
    assert "without --cluster" in str(error.value)
    assert "\n" not in str(error.value)


def _first_defects(indices: np.ndarray, indptr: np.ndarray, bound: int) -> tuple[int, int]:
    """The kernel's answer restated row by row in NumPy."""
    bad = np.flatnonzero((indices < 0) | (indices >= bound))
    unsorted = [
        r
        for r in range(len(indptr) - 1)
        if np.any(np.diff(indices[indptr[r] - indptr[0] : indptr[r + 1] - indptr[0]]) <= 0)
    ]
    first_bad = int(bad[0]) if len(bad) else -1
    if first_bad >= 0:  # the kernel stops at the first bad index: unsorted rows before its row only
        row = int(np.searchsorted(indptr - indptr[0], first_bad, side="right")) - 1
        unsorted = [r for r in unsorted if r <= row]
    return first_bad, (unsorted[0] if unsorted else -1)


@pytest.mark.parametrize("seed", range(40))
def test_structure_check_matches_a_row_by_row_restatement(seed):
    from bigcat.kernels import check_compressed

    rng = np.random.default_rng(seed)
    n_rows, bound = int(rng.integers(1, 30)), int(rng.integers(1, 50))
    counts = rng.integers(0, 6, n_rows) * (rng.random(n_rows) < 0.8)  # some empty rows
    rows = [np.sort(rng.choice(bound, min(c, bound), replace=False)) for c in counts]
    for r in rng.choice(n_rows, int(rng.integers(0, 3)), replace=True):  # unsorted or duplicated
        if len(rows[r]) >= 2:
            rows[r] = rows[r][::-1].copy() if rng.random() < 0.5 else np.r_[rows[r], rows[r][-1]]
    indices = np.concatenate([*rows, np.zeros(0, dtype=np.int64)]).astype(np.int32)
    if len(indices) and rng.random() < 0.3:  # an index out of range
        indices[rng.integers(len(indices))] = rng.choice([-1, bound, bound + 7])
    offset = int(rng.integers(0, 100))  # a block's indptr starts where its values do in X
    indptr = offset + np.r_[0, np.cumsum([len(r) for r in rows])].astype(np.int64)
    got = check_compressed(indices, indptr, bound)
    assert (int(got[0]), int(got[1])) == _first_defects(indices, indptr, bound)
