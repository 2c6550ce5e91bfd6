"""Cell-type mapping, nearest neighbours and MapMyCells' statistics layout."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.spatial.distance import cdist

import bigcat
from bigcat.cli import main
from bigcat.errors import BigcatInputError
from bigcat.mapping import knn, map_cells


def log2cpm(x) -> np.ndarray:
    x = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
    totals = x.sum(axis=1, keepdims=True)
    return np.log2(np.divide(x, totals, out=np.zeros_like(x), where=totals > 0) * 1e6 + 1)


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A synthetic atlas split 90% reference / 10% held-out query."""
    folder = tmp_path_factory.mktemp("mapping")
    bigcat.synth(folder / "atlas.h5ad", n_cells=8000, n_genes=3000, n_clusters=20, nnz_per_cell=600, seed=11,
                 progress=False)  # fmt: skip
    atlas = ad.read_h5ad(folder / "atlas.h5ad")
    held = np.random.default_rng(0).random(atlas.n_obs) < 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atlas[~held].write_h5ad(folder / "reference.h5ad")
        atlas[held].write_h5ad(folder / "query.h5ad")
    stats = bigcat.cluster_stats(folder / "reference.h5ad", normalize="log2cpm")
    bigcat.write_stats(stats, folder / "reference-stats.zarr")
    return {
        "folder": folder,
        "stats": stats,
        "query": atlas[held].copy(),
        "reference": atlas[~held].copy(),
        "truth": atlas[held].obs["cluster"].astype(str).to_numpy(),
    }


def test_correlation_mapping_recovers_held_out_clusters(split: dict) -> None:
    mapped = map_cells(split["folder"] / "query.h5ad", split["stats"])  # default settings
    accuracy = float(np.mean(mapped["cluster"].astype(str).to_numpy() == split["truth"]))
    print(f"held-out 10%: {accuracy:.1%} of {len(mapped)} cells mapped to their true cluster")
    assert accuracy >= 0.95
    assert list(mapped.index) == list(split["query"].obs_names)
    assert (mapped["score"] >= mapped["runner_up_score"]).all()
    assert (mapped["runner_up"].astype(str) != mapped["cluster"].astype(str)).all()


def test_correlation_scores_equal_numpy(split: dict) -> None:
    stats = split["stats"]
    table = bigcat.markers(stats, top=5)
    genes = table["gene"].drop_duplicates().tolist()
    mapped = map_cells(split["folder"] / "query.h5ad", stats, genes=genes)
    query = split["query"]
    x = log2cpm(query.X)[:, query.var_names.get_indexer(genes)]
    profiles = stats["means"].sel(gene=genes).values.astype(np.float64)
    r = np.corrcoef(np.vstack([x, profiles]))[: len(x), len(x) :]
    clusters = stats["cluster"].values
    np.testing.assert_array_equal(mapped["cluster"].to_numpy(), clusters[np.argmax(r, axis=1)])
    np.testing.assert_allclose(mapped["score"].to_numpy(), r.max(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mapped["runner_up_score"].to_numpy(), np.sort(r, axis=1)[:, -2], rtol=1e-5, atol=1e-6)


def test_bootstrap_confidence_is_reproducible(split: dict) -> None:
    a = map_cells(split["folder"] / "query.h5ad", split["stats"], bootstrap=10, seed=3)
    b = map_cells(split["folder"] / "query.h5ad", split["stats"], bootstrap=10, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert a["confidence"].between(0, 1).all()
    right = a["cluster"].astype(str).to_numpy() == split["truth"]
    assert a["confidence"][right].mean() > a["confidence"][~right].mean()


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "correlation"])
def test_exact_knn_equals_brute_force(split: dict, metric: str) -> None:
    genes = split["reference"].var_names[:200].tolist()
    result = knn(split["folder"] / "query.h5ad", split["folder"] / "reference.h5ad", k=7, genes=genes, metric=metric,
                 normalize="log2cpm")  # fmt: skip
    q = log2cpm(split["query"].X)[:, :200]
    r = log2cpm(split["reference"].X)[:, :200]
    d = cdist(q, r, metric=metric)
    expected = np.argsort(d, axis=1, kind="stable")[:, :7]
    got = result["indices"].values
    assert got.shape == (len(q), 7)
    np.testing.assert_allclose(result["distances"].values, np.take_along_axis(d, expected, axis=1), atol=2e-5)
    # the same neighbours (a tie in float32 may swap two at equal distance)
    assert np.mean([set(a) == set(b) for a, b in zip(got, expected, strict=True)]) > 0.99


def test_pca_space_and_pynndescent_recall(split: dict, tmp_path: Path) -> None:
    pytest.importorskip("pynndescent")
    query, reference = split["folder"] / "query.h5ad", split["folder"] / "reference.h5ad"
    exact = knn(query, reference, k=10, space="pca", n_components=20)
    approx = knn(query, reference, k=10, space="pca", n_components=20, method="pynndescent")
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.indices.values, approx.indices.values,
                                                                 strict=True)])  # fmt: skip
    print(f"pynndescent recall@10 against exact: {recall:.3f}")
    assert recall >= 0.9
    exact.to_zarr(tmp_path / "neighbours.zarr")
    import xarray as xr

    back = xr.open_zarr(tmp_path / "neighbours.zarr")
    np.testing.assert_array_equal(back["indices"].values, exact["indices"].values)


def test_missing_optional_package_is_a_clear_error(split: dict) -> None:
    try:
        import hnswlib  # noqa: F401
    except ImportError:
        with pytest.raises(BigcatInputError, match=r"needs the optional package hnswlib: pip install 'bigcat\[knn\]'"):
            knn(split["folder"] / "query.h5ad", split["folder"] / "reference.h5ad", method="hnswlib")
    else:
        pytest.skip("hnswlib is installed here")


def test_knn_on_a_remote_scheduler_equals_local(split: dict, dask_scheduler: str) -> None:
    from distributed import Client

    genes = split["reference"].var_names[:100].tolist()
    args = (split["folder"] / "query.h5ad", split["folder"] / "reference.h5ad")
    local = knn(*args, k=5, genes=genes, normalize="log2cpm")
    with Client(dask_scheduler) as client:
        remote = knn(*args, k=5, genes=genes, normalize="log2cpm", client=client)
        mapped = map_cells(args[0], split["stats"], client=client)
    np.testing.assert_array_equal(remote["indices"].values, local["indices"].values)
    pd.testing.assert_frame_equal(mapped, map_cells(args[0], split["stats"]))


def test_knn_vote_mapping_and_cli(split: dict, tmp_path: Path, capsys) -> None:
    folder = split["folder"]
    mapped = map_cells(folder / "query.h5ad", split["stats"], method="knn", reference_data=folder / "reference.h5ad")
    accuracy = float(np.mean(mapped["cluster"].astype(str).to_numpy() == split["truth"]))
    assert accuracy > 0.6  # a vote of single noisy cells: below the correlation mapper, far above chance (5%)
    assert mapped["score"].between(0, 1).all()
    out = tmp_path / "assignments.parquet"
    code = main(["map", str(folder / "query.h5ad"), "--reference", str(folder / "reference-stats.zarr"),
                 "--bootstrap", "5", "--out", str(out), "--cluster", "sync"])  # fmt: skip
    assert code == 0
    written = pd.read_parquet(out)
    assert list(written.columns) == ["cell", "cluster", "score", "runner_up", "runner_up_score", "confidence"]
    reference = map_cells(folder / "query.h5ad", folder / "reference-stats.zarr", bootstrap=5)
    assert written["cluster"].tolist() == reference["cluster"].astype(str).tolist()
    assert "mapped" in capsys.readouterr().out
    with pytest.raises(BigcatInputError, match="needs the reference cells"):
        map_cells(folder / "query.h5ad", split["stats"], method="knn")


def test_mapmycells_precomputed_stats_layout(split: dict, tmp_path: Path) -> None:
    folder = split["folder"]
    out = tmp_path / "precomputed_stats.h5"
    code = main(["stats", str(folder / "reference.h5ad"), "--normalize", "log2cpm", "--format", "mapmycells",
                 "--out", str(out), "--cluster", "sync", "--quiet"])  # fmt: skip
    assert code == 0
    reference = split["reference"]
    x = log2cpm(reference.X)
    labels = reference.obs["cluster"].astype(str).to_numpy()
    with h5py.File(out) as f:
        clusters = json.loads(f["cluster_to_row"][()].decode())
        genes = json.loads(f["col_names"][()].decode())
        tree = json.loads(f["taxonomy_tree"][()].decode())
        assert json.loads(f["metadata"][()].decode())["normalization"] == "log2CPM"
        assert genes == reference.var_names.tolist()
        assert tree["hierarchy"] == ["cluster"]
        assert set(tree["cluster"]) == set(clusters)
        for name, row in list(clusters.items())[:5]:
            cells = x[labels == name]
            assert f["n_cells"][row] == len(cells)
            np.testing.assert_allclose(f["sum"][row], cells.sum(0), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(f["sumsq"][row], (cells**2).sum(0), rtol=1e-6, atol=1e-5)
            np.testing.assert_array_equal(f["gt0"][row], (cells > 0).sum(0))
            np.testing.assert_array_equal(f["ge1"][row], (cells >= 1).sum(0))
