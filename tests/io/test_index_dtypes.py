"""Every CSR bigcat writes (.h5ad and .zarr: synth, sample, convert) stores ``indptr`` and
``indices`` in one dtype, as scipy does: anndata reads them back as they are, and the numba
kernels scanpy 1.12 runs (fast-array-utils' sparse plugin) refuse mixed ones."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import zarr

import bigcat
import bigcat._io.writers as writers

fau_stats = pytest.importorskip("fast_array_utils.stats")
sc = pytest.importorskip("scanpy")


def stored_dtypes(path: Path) -> tuple[np.dtype, np.dtype]:
    if path.suffix == ".h5ad":
        with h5py.File(path) as f:
            return f["X/indptr"].dtype, f["X/indices"].dtype
    group = zarr.open_group(path, mode="r")
    return group["X/indptr"].dtype, group["X/indices"].dtype


def read(path: Path) -> ad.AnnData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ad.read_h5ad(path) if path.suffix == ".h5ad" else ad.read_zarr(path)


def check_like_scanpy(adata: ad.AnnData, dense: np.ndarray) -> None:
    """What current scanpy runs on X: fast-array-utils' numba mean/variance, and the per-cluster
    aggregate (scanpy's own), against NumPy on the dense matrix."""
    assert adata.X.indptr.dtype == adata.X.indices.dtype
    dense = dense.astype(np.float64)
    mean, var = fau_stats.mean_var(adata.X, axis=0, correction=1)
    np.testing.assert_allclose(mean, dense.mean(axis=0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(var, dense.var(axis=0, ddof=1), rtol=1e-4, atol=1e-9)  # float32 sums
    row_mean, _ = fau_stats.mean_var(adata.X, axis=1)
    np.testing.assert_allclose(row_mean, dense.mean(axis=1), rtol=1e-6, atol=1e-9)
    agg = sc.get.aggregate(adata, by="cluster", func=["sum", "mean"])
    for cluster in agg.obs_names:
        rows = (adata.obs["cluster"].astype(str) == cluster).to_numpy()
        np.testing.assert_allclose(agg[cluster].layers["sum"].ravel(), dense[rows].sum(axis=0), rtol=1e-5)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("index-dtypes")
    path = bigcat.synth(folder / "atlas.h5ad", n_cells=1500, n_genes=400, n_clusters=6, seed=2, progress=False)
    adata = read(Path(path))
    return {"folder": folder, "path": Path(path), "dense": adata.X.toarray(), "obs": adata.obs}


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_synth_sample_and_convert_write_one_index_dtype(source: dict, suffix: str) -> None:
    folder = source["folder"]
    made = {
        "synth": bigcat.synth(folder / f"s{suffix}", n_cells=1500, n_genes=400, n_clusters=6, seed=2,
                              progress=False),
        "sample": bigcat.sample(source["path"], folder / f"sample{suffix}", cells=0.5, seed=1, progress=False),
    }  # fmt: skip
    if suffix == ".zarr":
        made["convert"] = bigcat.convert(source["path"], folder / "converted.zarr", progress=False)
    for kind, path in made.items():
        path = Path(path)
        assert stored_dtypes(path) == (np.int32, np.int32), kind
        adata = read(path)
        if kind == "sample":
            rows = source["obs"].index.get_indexer(adata.obs_names)
            dense = source["dense"][rows]
        else:
            dense = source["dense"]
        np.testing.assert_array_equal(adata.X.toarray(), dense)
        check_like_scanpy(adata, dense)


def test_values_beyond_int32_make_both_int64(source: dict, tmp_path: Path, monkeypatch) -> None:
    """With the int32 limit lowered to 10,000 values: an .h5ad widens its indices when the
    values outgrow it (copying those written so far); a .zarr whose bound is over it starts
    with int64. Same values either way, and both arrays always alike."""
    monkeypatch.setattr(writers, "INT32_MAX", 10_000)
    nnz = int(np.count_nonzero(source["dense"]))
    assert nnz > 3 * 10_000
    for suffix in (".h5ad", ".zarr"):
        out = Path(bigcat.convert(source["path"], tmp_path / f"wide{suffix}", progress=False))
        assert stored_dtypes(out) == (np.int64, np.int64), suffix
        adata = read(out)
        np.testing.assert_array_equal(adata.X.toarray(), source["dense"])
        check_like_scanpy(adata, source["dense"])
    # a bound under the limit keeps int32 (a sample of few cells)
    small = Path(bigcat.sample(source["path"], tmp_path / "few.zarr", n_cells=20, seed=0, progress=False))
    assert stored_dtypes(small) == (np.int32, np.int32)


def test_old_anndata_files_convert_to_one_index_dtype(tmp_path: Path) -> None:
    from conftest import ARCHIVES

    archive = ARCHIVES / "v0.7.8"
    out = Path(bigcat.convert(archive / "adata.h5ad", tmp_path / "old.zarr", progress=False))
    assert stored_dtypes(out) == (np.int32, np.int32)
    adata = read(out)
    original = read(archive / "adata.h5ad")
    np.testing.assert_array_equal(adata.X.toarray(), original.X.toarray())
    dense = original.X.toarray()
    mean, _ = fau_stats.mean_var(adata.X, axis=0)
    np.testing.assert_allclose(mean, dense.mean(axis=0), rtol=1e-6, atol=1e-9)
