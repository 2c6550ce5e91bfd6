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


def test_pca_space_equals_scikit_learn_on_the_dense_matrix(split: dict) -> None:
    """PCA space with every reference cell in the fit: neighbours as found by projecting
    the dense log2 CPM matrices with scikit-learn's own PCA."""
    from sklearn.decomposition import PCA

    query, reference = split["folder"] / "query.h5ad", split["folder"] / "reference.h5ad"
    result = knn(query, reference, k=10, space="pca", n_components=20, pca_sample=10**6, metric="euclidean",
                 normalize="log2cpm")  # fmt: skip
    r = log2cpm(split["reference"].X)
    model = PCA(n_components=20, svd_solver="full").fit(r)
    d = cdist(model.transform(log2cpm(split["query"].X)), model.transform(r))
    expected = np.argsort(d, axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(
        result["distances"].values, np.take_along_axis(d, expected, axis=1), rtol=1e-3, atol=1e-3
    )
    same = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(result["indices"].values, expected, strict=True)])
    assert same > 0.99, same
    assert result.attrs["dims"] == 20


def test_knn_memory_is_bounded_by_its_estimate(split: dict, monkeypatch) -> None:
    """The guard's estimate is what knn holds: the peak of traced allocations stays under it
    and is most of it (the reference in the search space dominates, held once; the old
    code held it four times over, in float32 and float64)."""
    import tracemalloc

    import bigcat.neighbors

    monkeypatch.setattr(bigcat.neighbors, "WORK_BYTES", 1 << 20)
    monkeypatch.setattr(bigcat.neighbors, "QUERY_BLOCK_NNZ", 50_000)
    query, reference = split["folder"] / "query.h5ad", split["folder"] / "reference.h5ad"
    n_ref, n_genes = split["reference"].shape
    knn(query, reference, k=5, genes=split["reference"].var_names[:10].tolist())  # imports done before tracing
    for metric in ("cosine", "euclidean"):
        tracemalloc.start()
        try:
            result = knn(query, reference, k=5, metric=metric)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        estimate = result.attrs["memory_estimate"]
        print(f"{metric}: traced peak {peak / 2**20:.0f} MiB, estimate {estimate / 2**20:.0f} MiB")
        assert n_ref * n_genes * 4 <= estimate
        assert 0.8 * estimate <= peak <= estimate, (metric, peak, estimate)


def test_knn_refuses_what_does_not_fit(split: dict) -> None:
    import re

    query, reference = split["folder"] / "query.h5ad", split["folder"] / "reference.h5ad"
    n_ref = len(split["reference"])
    expected = f"{reference}: nearest neighbours over {n_ref:,} reference cells × 3,000 dimensions need about "
    with pytest.raises(BigcatInputError, match=re.escape(expected) + r"0\.\d GiB in this process, over max_memory "
                       r"\(0\.0 GiB\); select genes \(genes=\) or use space='pca', or raise max_memory$"):  # fmt: skip
        knn(query, reference, max_memory=10 << 20)
    result = knn(query, reference, space="pca", n_components=10, max_memory=10 << 30)
    assert result["indices"].shape == (len(split["query"]), 15)


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
    """One pass writes everything cell_type_mapper's precompute_stats writes: n_cells, sum,
    sumsq, gt0, gt1, ge1, the taxonomy tree with each leaf's cell rows, and metadata."""
    reference = split["reference"].copy()
    labels = reference.obs["cluster"].astype(str).to_numpy()
    reference.obs["subclass"] = pd.Categorical([f"sub{int(c[-2:]) % 4}" for c in labels])
    reference.obs["class"] = pd.Categorical([f"class{int(c[-2:]) % 4 // 2}" for c in labels])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.write_h5ad(tmp_path / "reference.h5ad")
    out = tmp_path / "precomputed_stats.h5"
    code = main(["stats", str(tmp_path / "reference.h5ad"), "--normalize", "log2cpm", "--format", "mapmycells",
                 "--hierarchy", "class,subclass,cluster", "--out", str(out), "--cluster", "sync",
                 "--quiet"])  # fmt: skip
    assert code == 0
    x = log2cpm(reference.X)
    with h5py.File(out) as f:
        clusters = json.loads(f["cluster_to_row"][()].decode())
        genes = json.loads(f["col_names"][()].decode())
        tree = json.loads(f["taxonomy_tree"][()].decode())
        metadata = json.loads(f["metadata"][()].decode())
        assert metadata["normalization"] == "log2CPM"  # the statistics' scale
        assert metadata["config"]["normalization"] == "raw"  # the input's, in cell_type_mapper's words
        assert metadata["config"]["hierarchy"] == ["class", "subclass", "cluster"]
        assert genes == reference.var_names.tolist()
        assert tree["hierarchy"] == ["class", "subclass", "cluster"]
        assert set(tree["cluster"]) == set(clusters) == set(labels)
        for name, rows in tree["cluster"].items():  # each leaf lists its cells' rows
            assert rows == np.flatnonzero(labels == name).tolist()
        subclass = reference.obs["subclass"].astype(str).to_numpy()
        for parent, children in tree["subclass"].items():
            assert children == sorted(set(labels[subclass == parent]))
        assert tree["class"] == {"class0": ["sub0", "sub1"], "class1": ["sub2", "sub3"]}
        assert {k: f[k].dtype for k in ("sum", "sumsq", "gt0", "gt1", "ge1", "n_cells")} == {
            "sum": np.float64, "sumsq": np.float64, "gt0": np.int64, "gt1": np.int64, "ge1": np.int64,
            "n_cells": np.int64,
        }  # fmt: skip
        for name, row in clusters.items():
            cells = x[labels == name]
            assert f["n_cells"][row] == len(cells)
            np.testing.assert_allclose(f["sum"][row], cells.sum(0), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(f["sumsq"][row], (cells**2).sum(0), rtol=1e-6, atol=1e-5)
            np.testing.assert_array_equal(f["gt0"][row], (cells > 0).sum(0))
            np.testing.assert_array_equal(f["gt1"][row], (cells > 1).sum(0))
            np.testing.assert_array_equal(f["ge1"][row], (cells >= 1).sum(0))


def test_mapmycells_taxonomy_table_and_refusals(split: dict, tmp_path: Path) -> None:
    from bigcat.mapmycells import precompute_stats

    folder = split["folder"]
    leaves = sorted(set(split["reference"].obs["cluster"].astype(str)))
    table = pd.DataFrame({"cluster": leaves, "subclass": [f"s{i % 3}" for i in range(len(leaves))]})
    table.to_csv(tmp_path / "taxonomy.csv", index=False)
    out = precompute_stats(folder / "reference.h5ad", tmp_path / "p.h5", hierarchy=["subclass", "cluster"],
                           taxonomy=tmp_path / "taxonomy.csv")  # fmt: skip
    with h5py.File(out) as f:
        tree = json.loads(f["taxonomy_tree"][()].decode())
    assert tree["subclass"] == {f"s{k}": [c for i, c in enumerate(leaves) if i % 3 == k] for k in range(3)}
    table.loc[len(table)] = [leaves[0], "s9"]  # a leaf with two parents
    table.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(BigcatInputError, match="not a tree"):
        precompute_stats(folder / "reference.h5ad", tmp_path / "q.h5", hierarchy=["subclass", "cluster"],
                         taxonomy=tmp_path / "bad.csv")  # fmt: skip
    # raw counts declared as log2(CPM+1): refused, not written with a wrong label
    with pytest.raises(BigcatInputError, match="not log2"):
        precompute_stats(folder / "reference.h5ad", tmp_path / "r.h5", normalize=None)
    assert not (tmp_path / "r.h5").exists()


def test_mapping_onto_an_unrelated_reference_is_refused_or_warned(split: dict, tmp_path: Path, caplog) -> None:
    """14 of 1,000 markers in the query once reported "mapped 5,000 cells (median score 0.726)"."""
    query = split["query"].copy()
    names = np.asarray(query.var_names).astype(object)
    rng = np.random.default_rng(1)
    for fraction, path in ((0.98, tmp_path / "other.h5ad"), (0.25, tmp_path / "partly.h5ad")):
        renamed = names.copy()
        hit = rng.random(len(names)) < fraction
        renamed[hit] = [f"other-{n}" for n in names[hit]]
        q = query.copy()
        q.var_names = renamed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q.write_h5ad(path)
    with pytest.raises(BigcatInputError, match=r"only \d+ of the reference's \d+ marker genes"):
        map_cells(tmp_path / "other.h5ad", split["stats"])
    caplog.set_level("WARNING", logger="bigcat")
    mapped = map_cells(tmp_path / "partly.h5ad", split["stats"])
    assert len(mapped) == query.n_obs
    assert any("marker genes" in r.getMessage() and "are in the query" in r.getMessage() for r in caplog.records)


def test_mapping_and_knn_show_progress_in_cells(split: dict, capsys) -> None:
    n = len(split["query"])
    query = split["folder"] / "query.h5ad"
    map_cells(query, split["stats"], progress=True)
    err = capsys.readouterr().err
    assert "map: 100%" in err, err
    assert f"{n}/{n}" in err, err
    knn(query, split["folder"] / "reference.h5ad", k=3, genes=split["reference"].var_names[:50].tolist(),
        progress=True)  # fmt: skip
    err = capsys.readouterr().err
    assert "knn: 100%" in err, err
    assert f"{n}/{n}" in err, err
    map_cells(query, split["stats"], progress=False)
    assert capsys.readouterr().err == ""
