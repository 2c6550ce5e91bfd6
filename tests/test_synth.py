from __future__ import annotations

import subprocess
import sys

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import bigcat
from bigcat.errors import BigcatInputError
from bigcat.synth import BATCH_CELLS, make_model, synth_batches


def test_same_seed_same_contents(tmp_path, atlas_h5ad):
    again = tmp_path / "again.h5ad"
    bigcat.synth(again, n_cells=3000, n_genes=1500, n_clusters=12, nnz_per_cell=150, seed=7, progress=False)
    with h5py.File(atlas_h5ad) as a, h5py.File(again) as b:
        for name in ("data", "indices", "indptr"):
            np.testing.assert_array_equal(a["X"][name][:], b["X"][name][:])
    pd.testing.assert_frame_equal(ad.read_h5ad(again).obs, ad.read_h5ad(atlas_h5ad).obs)


def test_other_seed_other_contents():
    a = next(synth_batches(make_model(500, 800, 5, nnz_per_cell=80, seed=1)))
    b = next(synth_batches(make_model(500, 800, 5, nnz_per_cell=80, seed=2)))
    assert (a != b).nnz > 0


def test_thread_count_does_not_change_output():
    model = make_model(2 * BATCH_CELLS + 100, 600, 4, nnz_per_cell=40, seed=3)
    one = sp.vstack(list(synth_batches(model, n_threads=1)))
    two = sp.vstack(list(synth_batches(model, n_threads=2)))
    assert (one != two).nnz == 0


def test_atlas_looks_like_counts(atlas):
    x = atlas.X
    assert sp.issparse(x)
    assert x.format == "csr"
    assert x.shape == (3000, 1500)
    assert np.all(x.data > 0)
    assert np.all(x.data == np.round(x.data))
    assert x.has_sorted_indices
    nnz_per_cell = np.diff(x.indptr)
    assert 150 * 0.85 < nnz_per_cell.mean() < 150 * 1.15
    # library sizes vary like a log-normal (sd of log ≈ 0.6) rather than being constant
    assert 0.3 < np.log(np.asarray(x.sum(axis=1)).ravel()).std() < 1.0
    sizes = atlas.obs["cluster"].value_counts()
    assert (sizes > 0).all()
    assert len(sizes) == 12
    assert sizes.max() / sizes.min() > 3  # skewed: a few big clusters, many small ones
    assert isinstance(atlas.obs["cluster"].dtype, pd.CategoricalDtype)
    assert isinstance(atlas.obs["donor"].dtype, pd.CategoricalDtype)
    assert atlas.var_names[0] == "gene00000"
    assert atlas.obs_names.dtype == object


def test_default_density_is_2500_per_cell():
    model = make_model(BATCH_CELLS, 32_285, 20, seed=0)
    batch = next(synth_batches(model))
    assert 2500 * 0.9 < batch.nnz / batch.shape[0] < 2500 * 1.1


def test_marker_genes_are_enriched_in_their_cluster(atlas):
    markers = atlas.uns["bigcat_synth"]["markers"]
    x = atlas.X.tocsr()
    labels = atlas.obs["cluster"].cat.codes.to_numpy()
    cpm = sp.diags(1e4 / np.asarray(x.sum(axis=1)).ravel()) @ x
    for k in range(3):
        inside = np.asarray(cpm[labels == k][:, markers[k]].mean(axis=0)).ravel()
        outside = np.asarray(cpm[labels != k][:, markers[k]].mean(axis=0)).ravel()
        assert np.median(inside / np.maximum(outside, 1e-9)) > 3


def test_counts_are_overdispersed():
    """Gamma-Poisson: within a cluster and at fixed library size, variance exceeds the mean."""
    model = make_model(BATCH_CELLS, 2000, 1, nnz_per_cell=300, seed=5)
    x = next(synth_batches(model)).toarray()
    lib = x.sum(axis=1)
    scaled = x / lib[:, None] * np.median(lib)
    top = np.argsort(x.mean(axis=0))[-20:]
    ratio = scaled[:, top].var(axis=0) / scaled[:, top].mean(axis=0)
    assert np.median(ratio) > 1.5


def test_synth_zarr_matches_h5ad(tmp_path):
    kw = {"n_cells": 700, "n_genes": 400, "n_clusters": 6, "nnz_per_cell": 50, "seed": 11, "progress": False}
    bigcat.synth(tmp_path / "s.h5ad", **kw)
    bigcat.synth(tmp_path / "s.zarr", **kw)
    a = ad.read_h5ad(tmp_path / "s.h5ad")
    b = ad.read_zarr(tmp_path / "s.zarr")
    assert (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)


def test_bad_sizes_are_refused():
    with pytest.raises(BigcatInputError, match="nnz-per-cell"):
        make_model(10, 100, 2, nnz_per_cell=100)
    with pytest.raises(BigcatInputError, match="clusters"):
        make_model(10, 100, 0)


@pytest.mark.parametrize("genes", [1, 7, 1500, 32_285])
def test_default_options_work_for_any_gene_count(tmp_path, genes):
    """`bigcat synth out.h5ad --genes 1500` failed: the 2,500 non-zeros default exceeded the genes."""
    out = tmp_path / "a.h5ad"
    cells = 300 if genes < 32_285 else 40
    done = subprocess.run(
        [sys.executable, "-m", "bigcat", "synth", str(out), "--genes", str(genes), "--cells", str(cells),
         "--clusters", "3", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    x = ad.read_h5ad(out).X
    assert x.shape == (cells, genes)
    target = min(2500, genes * 2500 / 32_285)
    # the mean non-zeros per cell is calibrated to the default target (within sampling noise)
    assert x.nnz / cells == pytest.approx(target, rel=0.25, abs=0.2)
