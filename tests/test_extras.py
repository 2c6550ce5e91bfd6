"""layers, raw, obsm, varm, obsp and varp: copied by convert (they were dropped without a word),
exposed by open_dataset, refused for the dense layout unless skipped by name."""

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
from bigcat.extras import copy_elements, find_elements
from conftest import ARCHIVES

SLOTS = ("layers", "obsm", "varm", "obsp", "varp")


def read(path: Path) -> ad.AnnData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ad.read_zarr(path) if path.suffix == ".zarr" else ad.read_h5ad(path)


def as_numpy(value) -> np.ndarray:
    return value.toarray() if sp.issparse(value) else np.asarray(value)


def assert_same_elements(got: ad.AnnData, expected: ad.AnnData) -> None:
    """Every element of ``expected`` (read by anndata from the original) is in ``got``, equal."""
    for slot in SLOTS:
        want, have = getattr(expected, slot), getattr(got, slot)
        assert set(have) == set(want), slot
        for key, value in want.items():
            if isinstance(value, pd.DataFrame):
                pd.testing.assert_frame_equal(have[key], value)
            else:
                assert sp.issparse(have[key]) == sp.issparse(value), (slot, key)
                np.testing.assert_array_equal(as_numpy(have[key]), as_numpy(value), err_msg=f"{slot}/{key}")
    assert (got.raw is None) == (expected.raw is None)
    if expected.raw is not None:
        np.testing.assert_array_equal(as_numpy(got.raw.X), as_numpy(expected.raw.X))
        pd.testing.assert_frame_equal(got.raw.var, expected.raw.var)
        assert set(got.raw.varm) == set(expected.raw.varm)


@pytest.mark.parametrize("version", ["v0.5.0", "v0.7.0", "v0.7.8"])
@pytest.mark.parametrize("suffix", [".zarr", ".h5ad"])
def test_old_files_keep_every_element(version, suffix, tmp_path):
    """scanpy's pbmc68k_reduced (v0.5.0: X_pca, X_umap, PCs, raw in the pre-0.7 encoding) and the
    anndata archives with every slot, sparse and dense, and data frames in obsm/varm."""
    source = ARCHIVES / version / "adata.h5ad"
    out = bigcat.convert(source, tmp_path / f"out{suffix}", progress=False)
    assert_same_elements(read(Path(out)), read(source))


@pytest.fixture(scope="module")
def big_elements(tmp_path_factory):
    """Elements many copy slices long: a CSR and a CSC layer, a dense layer, obsm, raw."""
    rng = np.random.default_rng(3)
    n_cells, n_genes = 2000, 300
    x = sp.random(n_cells, n_genes, density=0.05, format="csr", random_state=rng, dtype=np.float32)
    adata = ad.AnnData(
        X=x,
        layers={
            "counts": sp.random(n_cells, n_genes, density=0.1, format="csr", random_state=rng, dtype=np.float64),
            "by_gene": sp.random(n_cells, n_genes, density=0.1, format="csc", random_state=rng, dtype=np.float32),
            "dense": rng.integers(0, 9, (n_cells, n_genes)).astype(np.int16),
        },
        obsm={"X_pca": rng.normal(size=(n_cells, 30)).astype(np.float32), "X_umap": rng.normal(size=(n_cells, 2))},
        varm={"PCs": rng.normal(size=(n_genes, 30))},
        obsp={"distances": sp.random(n_cells, n_cells, density=0.002, format="csr", random_state=rng)},
    )
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    adata.var_names = [f"g{i}" for i in range(n_genes)]
    adata.raw = ad.AnnData(
        X=sp.random(n_cells, 400, density=0.05, format="csr", random_state=rng),
        var=pd.DataFrame(index=[f"r{i}" for i in range(400)]),
    )
    path = tmp_path_factory.mktemp("elements") / "elements.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_h5ad(path)
    return path


@pytest.mark.parametrize("suffix", [".zarr", ".h5ad"])
def test_big_elements_stream_in_slices(big_elements, suffix, tmp_path):
    # 5,000 values a slice: every element takes many slices, none is read whole
    out = bigcat.convert(big_elements, tmp_path / f"out{suffix}", progress=False, block_nnz=5000)
    assert_same_elements(read(Path(out)), read(big_elements))


def test_anndata_zarr_input_keeps_elements(big_elements, tmp_path):
    expected = read(big_elements)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected.write_zarr(tmp_path / "in.zarr")
    out = bigcat.convert(tmp_path / "in.zarr", tmp_path / "out.zarr", progress=False)
    assert_same_elements(read(Path(out)), expected)


def test_open_dataset_exposes_the_matrices(big_elements, tmp_path):
    expected = read(big_elements)
    out = bigcat.convert(big_elements, tmp_path / "out.zarr", progress=False)
    for path in (big_elements, out):
        ds = bigcat.open_dataset(path, chunk_nnz=10_000)
        assert ds["layers.counts"].dims == ("cell", "gene")
        assert ds["obsm.X_pca"].dims == ("cell", "obsm.X_pca_dim")
        assert ds["varm.PCs"].dims == ("gene", "varm.PCs_dim")
        assert ds["raw.X"].dims == ("cell", "raw_gene")
        assert list(ds["raw_gene"].values[:2]) == ["r0", "r1"]
        assert ds["layers.counts"].data.numblocks[0] > 1  # row blocks, like X
        for name in ("counts", "by_gene"):
            got = ds[f"layers.{name}"].data.compute().todense()
            np.testing.assert_array_equal(got, as_numpy(expected.layers[name]))
        np.testing.assert_array_equal(ds["layers.dense"].values, expected.layers["dense"])
        np.testing.assert_array_equal(ds["obsm.X_pca"].values, expected.obsm["X_pca"])
        np.testing.assert_array_equal(ds["varm.PCs"].values, expected.varm["PCs"])
        np.testing.assert_array_equal(ds["raw.X"].data.compute().todense(), as_numpy(expected.raw.X))
        # a layer reduces like X: the sum over cells, against anndata's
        np.testing.assert_allclose(
            ds["layers.counts"].sum("cell").data.compute().todense(),
            np.asarray(expected.layers["counts"].sum(0)).ravel(),
        )


def test_dense_layout_refuses_unless_skipped(big_elements, tmp_path):
    with pytest.raises(BigcatInputError, match=r"dense layout holds X alone .*layers/counts.*--skip layers,obsm"):
        bigcat.convert(big_elements, tmp_path / "d.zarr", layout="dense", progress=False)
    assert not (tmp_path / "d.zarr").exists()
    skip = ["layers", "obsm", "varm", "obsp", "raw"]
    out = bigcat.convert(big_elements, tmp_path / "d.zarr", layout="dense", progress=False, skip=skip)
    assert list(bigcat.open_dataset(out).data_vars) == ["X"]


def test_skip_by_slot_and_by_element(big_elements, tmp_path):
    out = bigcat.convert(big_elements, tmp_path / "s.zarr", progress=False, skip=["layers", "obsm/X_umap", "raw"])
    got = read(Path(out))
    assert set(got.layers) == set()
    assert set(got.obsm) == {"X_pca"}
    assert set(got.varm) == {"PCs"}
    assert set(got.obsp) == {"distances"}
    assert got.raw is None
    with pytest.raises(BigcatInputError, match=r"--skip layerz: no such slot or element .*layers/counts"):
        bigcat.convert(big_elements, tmp_path / "t.zarr", progress=False, skip=["layerz"])


def test_copy_replaces_a_partial_copy(big_elements, tmp_path):
    """A resumed conversion copies the elements again over what an interrupted one left."""
    with h5py.File(big_elements) as source, h5py.File(tmp_path / "d.h5", "w") as dest:
        elements = find_elements(source)
        assert [e.name for e in elements] == [
            "layers/by_gene", "layers/counts", "layers/dense", "obsm/X_pca", "obsm/X_umap", "varm/PCs",
            "obsp/distances", "raw",
        ]  # fmt: skip
        dest.create_group("layers").create_dataset("counts", data=np.zeros(3))  # what a killed copy left
        copy_elements(source, dest, elements, block_values=7000)
        copy_elements(source, dest, elements, block_values=7000)
        assert dest["layers/counts"].attrs["encoding-type"] == "csr_matrix"
        np.testing.assert_array_equal(dest["layers/counts/data"][:], source["layers/counts/data"][:])


def test_sample_says_what_it_leaves_out(big_elements, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="bigcat"):
        bigcat.sample(big_elements, tmp_path / "s.h5ad", n_cells=100, progress=False)
    assert "not copied: layers/by_gene, layers/counts" in caplog.text
