"""Roll-ups of statistics to a taxonomy's coarser levels, against the cells' own statistics."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import bigcat
from bigcat.errors import BigcatInputError
from bigcat.stats import STATISTICS
from oracles import check, oracle


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    path = tmp_path_factory.mktemp("rollup") / "atlas.h5ad"
    bigcat.synth(path, n_cells=1500, n_genes=60, n_clusters=8, seed=5, progress=False)
    stats = bigcat.cluster_stats(path, stats=",".join(STATISTICS), normalize="log2cpm", present_at="ge1",
                                 client=None, progress=False)  # fmt: skip
    return path, stats


def test_every_level_equals_the_statistics_of_its_cells(atlas, tmp_path) -> None:
    path, stats = atlas
    clusters = list(stats["cluster"].values.astype(str))
    taxonomy = pd.DataFrame(
        {
            "class": ["A"] * 5 + ["B"] * 3,
            "subclass": ["a1", "a1", "a2", "a2", "a2", "b1", "b2", "b2"],
            "cluster": clusters,
        }
    )
    taxonomy.to_csv(tmp_path / "taxonomy.csv", index=False)
    levels = bigcat.rollup(stats, tmp_path / "taxonomy.csv")
    assert set(levels) == {"class", "subclass"}
    adata = ad.read_h5ad(path)
    x = adata.X.toarray()
    cell_cluster = adata.obs["cluster"].astype(str).to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        logx = np.nan_to_num(np.log2(x / x.sum(1, keepdims=True) * 1e6 + 1))
    for level, ds in levels.items():
        group = dict(zip(taxonomy["cluster"], taxonomy[level], strict=True))
        expected = oracle(x, np.array([group[c] for c in cell_cluster], dtype=object), normalize=True)
        check(ds, expected, STATISTICS)
        assert ds.attrs["rollup_level"] == level
        members = np.array([group[c] for c in cell_cluster])
        counts = np.array([(logx[members == g] >= 1).sum(0) for g in ds["cluster"].values])
        np.testing.assert_array_equal(ds["present_counts_ge1"].values, counts)
    # DE accepts a roll-up (its sums add exactly)
    de = bigcat.de_pairs(levels["subclass"], "all", "chisq")
    assert len(de.pairs) == 6  # four subclasses


def test_bad_taxonomies_are_one_line(atlas) -> None:
    _, stats = atlas
    clusters = list(stats["cluster"].values.astype(str))
    with pytest.raises(BigcatInputError, match="no 'cluster' column"):
        bigcat.rollup(stats, pd.DataFrame({"c": clusters, "class": "A"}))
    with pytest.raises(BigcatInputError, match="have no class"):
        bigcat.rollup(stats, pd.DataFrame({"cluster": clusters[:-1], "class": "A"}))
    with pytest.raises(BigcatInputError, match="more than one class"):
        bigcat.rollup(stats, pd.DataFrame({"cluster": [*clusters, clusters[0]], "class": ["A"] * 8 + ["B"]}))
    with pytest.raises(BigcatInputError, match="no level 'nope'"):
        bigcat.rollup(stats, pd.DataFrame({"cluster": clusters, "class": "A"}), "nope")
