from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import bigcat
from bigcat.errors import BigcatInputError
from conftest import dense


@pytest.fixture(scope="module")
def store(atlas_h5ad, tmp_path_factory):
    return bigcat.convert(atlas_h5ad, tmp_path_factory.mktemp("sample") / "a.zarr", progress=False)


def read(path):
    return ad.read_zarr(path) if path.suffix == ".zarr" else ad.read_h5ad(path)


def check_subset(sub: ad.AnnData, atlas: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
    """The subset's values equal the reference at the rows/columns named by its obs/var names."""
    rows = atlas.obs_names.get_indexer(sub.obs_names)
    cols = atlas.var_names.get_indexer(sub.var_names)
    assert (rows >= 0).all()
    assert (cols >= 0).all()
    assert np.all(np.diff(rows) > 0)
    assert np.all(np.diff(cols) > 0)
    np.testing.assert_array_equal(dense(sub.X), dense(atlas.X)[np.ix_(rows, cols)])
    np.testing.assert_array_equal(sub.obs["cluster"].to_numpy(), atlas.obs["cluster"].to_numpy()[rows])
    return rows, cols


@pytest.mark.parametrize("source", ["h5ad", "zarr"])
@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_fraction_keeps_sqrt_of_cells_and_genes(source, suffix, atlas_h5ad, store, atlas, tmp_path):
    src = atlas_h5ad if source == "h5ad" else store
    out = bigcat.sample(src, tmp_path / f"s{suffix}", fraction=0.25, seed=3, progress=False)
    sub = read(out)
    assert sub.shape == (1500, 750)  # sqrt(0.25) = 0.5 of 3000 cells and 1500 genes
    check_subset(sub, atlas)


def test_same_seed_same_subset_and_matches_numpy(atlas_h5ad, atlas, tmp_path):
    a = read(bigcat.sample(atlas_h5ad, tmp_path / "a.h5ad", cells=0.1, genes=0.2, seed=5, progress=False))
    b = read(bigcat.sample(atlas_h5ad, tmp_path / "b.h5ad", cells=0.1, genes=0.2, seed=5, progress=False))
    c = read(bigcat.sample(atlas_h5ad, tmp_path / "c.h5ad", cells=0.1, genes=0.2, seed=6, progress=False))
    assert list(a.obs_names) == list(b.obs_names)
    assert list(a.var_names) == list(b.var_names)
    assert list(a.obs_names) != list(c.obs_names)
    rows, cols = check_subset(a, atlas)
    # the documented draw: cells first, then genes, from default_rng(seed)
    rng = np.random.default_rng(5)
    np.testing.assert_array_equal(rows, np.sort(rng.choice(3000, 300, replace=False)))
    np.testing.assert_array_equal(cols, np.sort(rng.choice(1500, 300, replace=False)))


def test_n_cells(store, atlas, tmp_path):
    sub = read(bigcat.sample(store, tmp_path / "n.zarr", n_cells=123, seed=1, progress=False))
    assert sub.shape == (123, 1500)
    check_subset(sub, atlas)


def test_max_cells_per_cluster_is_stratified(store, atlas, tmp_path):
    sub = read(
        bigcat.sample(store, tmp_path / "m.h5ad", max_cells_per_cluster=50, by="cluster", seed=2, progress=False)
    )
    check_subset(sub, atlas)
    sizes = atlas.obs["cluster"].value_counts()
    got = sub.obs["cluster"].value_counts()
    for cluster, size in sizes.items():
        assert got.get(cluster, 0) == min(50, size)


def test_sample_of_csc_input(encodings, atlas, tmp_path):
    sub = read(bigcat.sample(encodings["csc"], tmp_path / "c.zarr", cells=0.3, seed=9, progress=False))
    check_subset(sub, atlas)


def test_bad_options(store, tmp_path):
    with pytest.raises(BigcatInputError, match="no obs column 'celltype'; available: cluster, donor"):
        bigcat.sample(store, tmp_path / "x.zarr", max_cells_per_cluster=5, by="celltype")
    with pytest.raises(BigcatInputError, match=r"must be in \(0, 1\]"):
        bigcat.sample(store, tmp_path / "x.zarr", fraction=1.5)
    with pytest.raises(BigcatInputError, match="either --fraction or --cells"):
        bigcat.sample(store, tmp_path / "x.zarr", fraction=0.5, cells=0.5)
    with pytest.raises(BigcatInputError, match="unknown output format"):
        bigcat.sample(store, tmp_path / "x.csv", fraction=0.5)
    assert not (tmp_path / "x.zarr").exists()
