"""Merging clusters from statistics: planted truth (clusters split at random come back together)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import bigcat
from bigcat.errors import BigcatInputError

RELAXED = {"q_diff_th": 0.0, "q1_th": 0.3, "de_score_th": 40.0, "min_genes": 3}


@pytest.fixture(scope="module")
def split_atlas(tmp_path_factory):
    """Six clusters, each split in two at random halves named by numbers (1 and 2 are cluster 0…)."""
    folder = tmp_path_factory.mktemp("merge")
    path = folder / "atlas.h5ad"
    bigcat.synth(path, n_cells=3000, n_genes=400, n_clusters=6, nnz_per_cell=120, seed=11, progress=False)
    ds = bigcat.open_dataset(path)
    cells = ds["cell"].values
    truth = ds["cluster"].values.astype(str)
    rng = np.random.default_rng(0)
    codes = {name: i for i, name in enumerate(sorted(set(truth)))}
    split = np.array([str(2 * codes[t] + 1 + (rng.random() < 0.5)) for t in truth])
    labels = folder / "labels.csv"
    pd.DataFrame({"cell": cells, "part": split}).to_csv(labels, index=False)
    stats = bigcat.cluster_stats(path, labels=labels, label_column="part", cell_column="cell",
                                 stats="sums,sqr_sums,means", normalize="log2cpm", present_at="ge1", client=None,
                                 progress=False)  # fmt: skip
    stats = stats.assign_coords(cluster=stats["cluster"].values.astype(str))  # the CSV's numbers, as names
    return stats.load(), dict(zip(split, truth, strict=True))


@pytest.mark.parametrize("method", ["fast_limma", "chisq"])
def test_random_halves_merge_back_and_distinct_clusters_stay(split_atlas, method) -> None:
    stats, truth = split_atlas
    result = bigcat.merge_clusters(stats, method=method, **RELAXED)
    merged = dict(zip(result.mapping["cluster"], result.mapping["merged"], strict=True))
    for k in range(6):  # the halves 2k+1 and 2k+2 are one cluster again, named by the smaller number
        assert merged[str(2 * k + 1)] == merged[str(2 * k + 2)] == str(2 * k + 1)
    assert len(set(merged.values())) == 6
    # the merged statistics are the sums of the halves' (exact), for every statistic
    for k in range(6):
        halves = [str(2 * k + 1), str(2 * k + 2)]
        row = result.stats.sel(cluster=str(2 * k + 1))
        np.testing.assert_array_equal(row["n_cells"].values, stats["n_cells"].sel(cluster=halves).values.sum())
        np.testing.assert_allclose(row["sums"].values, stats["sums"].sel(cluster=halves).values.sum(0), rtol=1e-12)
        expected_means = (
            stats["sums"].sel(cluster=halves).values.sum(0) / stats["n_cells"].sel(cluster=halves).values.sum()
        )
        np.testing.assert_allclose(row["means"].values, expected_means, rtol=1e-6)
    assert (result.scores["score"] >= RELAXED["de_score_th"]).all() or (result.scores["num"] >= 3).all()
    assert {truth[c] for c in merged.values()} == set(truth.values())


def test_small_clusters_go_to_their_nearest_first(split_atlas) -> None:
    stats, _ = split_atlas
    tiny = stats.copy(deep=True)
    # cluster "3" shrinks to 2 cells (its sums scaled): below min_cells, it joins its nearest cluster,
    # its own other half "4" (its means are unchanged)
    n = int(tiny["n_cells"].sel(cluster="3"))
    for name in ("sums", "sqr_sums", "present_counts_ge1"):
        values = tiny[name].sel(cluster="3").values * 2 / n
        tiny[name].loc[{"cluster": "3"}] = np.rint(values) if name.startswith("present") else values
    tiny["n_cells"].loc[{"cluster": "3"}] = 2
    result = bigcat.merge_clusters(tiny, **{**RELAXED, "de_score_th": 0.0, "min_genes": 0})  # nothing else merges
    merged = dict(zip(result.mapping["cluster"], result.mapping["merged"], strict=True))
    assert merged["3"] == merged["4"] == "3"  # the pair keeps the smaller number
    assert len(set(merged.values())) == 11


def test_merge_refuses_statistics_it_cannot_use(split_atlas) -> None:
    stats, _ = split_atlas
    with pytest.raises(BigcatInputError, match="squared sums"):
        bigcat.merge_clusters(stats.drop_vars("sqr_sums"))
    with pytest.raises(BigcatInputError, match="merge_type"):
        bigcat.merge_clusters(stats, merge_type="sideways")


def test_cli_writes_the_merged_statistics_and_the_mapping(split_atlas, tmp_path) -> None:
    from bigcat.cli import main

    stats, _ = split_atlas
    path = tmp_path / "stats.zarr"
    bigcat.write_stats(stats, path)
    options = ["--q-diff-th", "0", "--q1-th", "0.3", "--de-score-th", "40", "--min-genes", "3", "--quiet"]
    out, mapping = tmp_path / "merged.zarr", tmp_path / "merged.csv"
    assert main(["merge", str(path), "--out", str(out), "--mapping", str(mapping), *options]) == 0
    table = pd.read_csv(mapping, dtype=str)
    assert table["merged"].nunique() == 6
    merged = bigcat.read_stats(out)
    assert sorted(merged["cluster"].values.astype(str)) == sorted(table["merged"].unique())
    assert int(merged["n_cells"].sum()) == int(stats["n_cells"].sum())
    assert main(["merge", str(path), "--out", str(out), "--mapping", str(mapping), *options]) == 2  # exists
    assert main(["merge", str(path), "--out", str(out), "--mapping", str(mapping), "--overwrite", *options]) == 0
