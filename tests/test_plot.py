"""Marker genes, dot plots and heatmaps: the data behind each figure against the statistics."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import bigcat
from bigcat.cli import main
from bigcat.errors import BigcatInputError
from bigcat.marker_genes import markers
from bigcat.plot import dotplot, dotplot_pages, heatmap, save


def handmade(n_clusters: int = 7, n_genes: int = 40, seed: int = 3, *, empty: int | None = 5) -> xr.Dataset:
    """Statistics on a coarse grid (many exact ties), one cluster without cells."""
    rng = np.random.default_rng(seed)
    means = rng.integers(0, 4, size=(n_clusters, n_genes)) / 2.0
    present = rng.integers(0, 3, size=(n_clusters, n_genes)) / 4.0
    for c in range(n_clusters):  # a few genes on the same grid made specific to each cluster
        genes = (np.arange(4) + 4 * c) % n_genes
        means[c, genes] += rng.integers(1, 5, size=4) / 2.0
        present[c, genes] = np.minimum(present[c, genes] + 0.5, 1.0)
    n_cells = rng.integers(1, 50, size=n_clusters)
    if empty is not None:
        n_cells[empty] = 0
        means[empty] = np.nan
        present[empty] = np.nan
    return xr.Dataset(
        {
            "n_cells": (("cluster",), n_cells),
            "means": (("cluster", "gene"), means.astype(np.float32)),
            "present": (("cluster", "gene"), present.astype(np.float32)),
        },
        coords={
            "cluster": np.array([f"c{i}" for i in range(n_clusters)], dtype=object),
            "gene": np.array([f"g{j:02d}" for j in range(n_genes)], dtype=object),
        },
        attrs={"normalize": "log2cpm"},
    )


def brute_force_markers(ds: xr.Dataset, top: int, min_present: float = 0.0, log: bool = True) -> list[tuple]:
    """The documented score, one cluster and one gene at a time, with plain Python."""
    means = ds["means"].values.astype(np.float64)
    present = ds["present"].values.astype(np.float64)
    n_cells = ds["n_cells"].values
    lm = means if log else np.log2(means + 1)
    out = []
    for c in range(len(n_cells)):
        if n_cells[c] == 0:
            continue
        others = [k for k in range(len(n_cells)) if k != c and n_cells[k] > 0]
        ranked = []
        for g in range(means.shape[1]):
            m_out = max((lm[k, g] for k in others), default=0.0)
            q_out = max((present[k, g] for k in others), default=0.0)
            lfc = lm[c, g] - m_out
            high = max(present[c, g], q_out)
            q_diff = (present[c, g] - q_out) / high if high > 0 else 0.0
            score = max(q_diff, 0.0) * max(lfc, 0.0)
            if score > 0 and present[c, g] >= min_present:
                ranked.append((-score, -lfc, g))
        for rank, (neg_score, _, g) in enumerate(sorted(ranked)[:top], start=1):
            out.append((ds["cluster"].values[c], rank, ds["gene"].values[g], -neg_score))
    return out


@pytest.mark.parametrize(("top", "min_present", "log"), [(3, 0.0, True), (5, 0.5, True), (2, 0.0, False)])
def test_markers_equal_brute_force_ranking(top: int, min_present: float, log: bool) -> None:
    ds = handmade()
    if not log:
        ds.attrs = {}
    table = markers(ds, top=top, min_present=min_present)
    expected = brute_force_markers(ds, top, min_present, log)
    assert len(expected) >= 10
    assert len({c for c, *_ in expected}) >= 5
    got = list(zip(table["cluster"], table["rank"], table["gene"], table["score"], strict=True))
    assert [(c, r, g) for c, r, g, _ in got] == [(c, r, g) for c, r, g, _ in expected]
    np.testing.assert_allclose([s for *_, s in got], [s for *_, s in expected], rtol=1e-12)
    assert "c5" not in set(table["cluster"])  # no cells: no markers
    # the columns explain the score
    np.testing.assert_allclose(table["score"], table["q_diff"].clip(0) * table["lfc"].clip(0))


def test_markers_runner_up_and_cluster_subset() -> None:
    ds = handmade()
    table = markers(ds, top=2, clusters=["c3", "c0"])
    assert list(dict.fromkeys(table["cluster"])) == ["c3", "c0"]
    lm = ds["means"].values.astype(np.float64)
    for _, row in table.iterrows():
        g = list(ds["gene"].values).index(row["gene"])
        c = list(ds["cluster"].values).index(row["cluster"])
        others = [k for k in range(7) if k not in (c, 5)]
        best = max(others, key=lambda k: (lm[k, g], -k))
        assert row["runner_up"] == f"c{best}"
        assert row["mean_other"] == lm[best, g]


def test_markers_find_the_planted_markers(atlas_h5ad: Path, atlas) -> None:
    result = bigcat.cluster_stats(atlas_h5ad, normalize="log2cpm")
    planted = np.asarray(atlas.uns["bigcat_synth"]["markers"])
    table = markers(result, top=1)
    genes = list(result["gene"].values)
    clusters = list(result["cluster"].values)
    hits = [genes.index(g) in set(planted[clusters.index(c)]) for c, g in zip(table.cluster, table.gene, strict=True)]
    assert len(hits) == len(clusters)
    assert np.mean(hits) == 1.0


@pytest.fixture(scope="module")
def stats_files(atlas_h5ad: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    result = bigcat.cluster_stats(atlas_h5ad, normalize="log2cpm")
    folder = tmp_path_factory.mktemp("stats")
    files = {"memory": result}
    for suffix in (".zarr", ".h5ad", ".parquet", ".csv"):
        files[suffix] = folder / f"stats{suffix}"
        bigcat.write_stats(result, files[suffix])
    return files


@pytest.mark.parametrize("suffix", [".zarr", ".h5ad", ".parquet", ".csv"])
def test_read_stats_every_format_gives_the_same_markers(stats_files: dict, suffix: str) -> None:
    reference = markers(stats_files["memory"], top=4)
    back = bigcat.read_stats(stats_files[suffix])
    np.testing.assert_array_equal(back["means"].values, stats_files["memory"]["means"].values)
    np.testing.assert_array_equal(back["n_cells"].values, stats_files["memory"]["n_cells"].values)
    # CSV keeps no attributes: the log scale must then be said
    table = markers(stats_files[suffix], top=4, scale="log" if suffix == ".csv" else None)
    table["cluster"] = table["cluster"].astype(str)
    reference["cluster"] = reference["cluster"].astype(str)
    reference["runner_up"] = reference["runner_up"].astype(str)
    table["runner_up"] = table["runner_up"].astype(str)
    pd.testing.assert_frame_equal(table, reference)


def test_dotplot_dots_are_the_statistics() -> None:
    ds = handmade()
    genes, clusters = ["g07", "g02", "g31"], ["c4", "c0", "c6", "c1"]
    fig = dotplot(ds, genes, clusters=clusters, order="given", max_dot_size=100.0)
    dots = fig.axes[0].collections[0]
    offsets = dots.get_offsets()
    rows = [clusters[int(y)] for y in offsets[:, 1]]
    cols = [genes[int(x)] for x in offsets[:, 0]]
    sub = ds.sel(cluster=rows, gene=cols)
    present = np.array([ds["present"].sel(cluster=r, gene=c).item() for r, c in zip(rows, cols, strict=True)])
    means = np.array([ds["means"].sel(cluster=r, gene=c).item() for r, c in zip(rows, cols, strict=True)])
    assert len(offsets) == 12
    assert sub is not None
    np.testing.assert_allclose(dots.get_sizes(), present * 100.0)
    np.testing.assert_allclose(dots.get_array(), means)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == clusters
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == genes


def test_dotplot_standard_scale_and_hierarchical_order() -> None:
    # two families of clusters with opposite profiles, interleaved in the statistics
    n_genes = 6
    a, b = np.array([5, 5, 5, 0, 0, 0.0]), np.array([0, 0, 0, 5, 5, 5.0])
    means = np.stack([a + 0.1 * i if i % 2 == 0 else b + 0.1 * i for i in range(8)])
    ds = xr.Dataset(
        {
            "n_cells": (("cluster",), np.full(8, 10)),
            "means": (("cluster", "gene"), means),
            "present": (("cluster", "gene"), (means > 0) * 0.9),
        },
        coords={"cluster": [f"k{i}" for i in range(8)], "gene": [f"g{j}" for j in range(n_genes)]},
        attrs={"normalize": "log2cpm"},
    )
    fig = dotplot(ds, [f"g{j}" for j in range(n_genes)], standard_scale="gene")
    order = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    families = [int(name[1:]) % 2 for name in order]
    assert sorted(order) == sorted(ds["cluster"].values)
    assert families in ([0] * 4 + [1] * 4, [1] * 4 + [0] * 4)  # each family contiguous
    colours = np.asarray(fig.axes[0].collections[0].get_array()).reshape(8, n_genes)
    shown = ds["means"].sel(cluster=order).values
    expected = (shown - shown.min(axis=0)) / (shown.max(axis=0) - shown.min(axis=0))
    np.testing.assert_allclose(colours, expected)


def test_heatmap_image_is_the_means_and_zscores() -> None:
    ds = handmade(empty=None)
    genes, clusters = ["g01", "g10", "g20", "g30"], ["c2", "c0", "c1"]
    fig = heatmap(ds, genes, clusters=clusters, order="given")
    image = np.asarray(fig.axes[0].images[0].get_array())
    np.testing.assert_allclose(image, ds["means"].sel(cluster=clusters, gene=genes).values)
    fig = heatmap(ds, genes, clusters=clusters, order="given", standard_scale="zscore")
    shown = ds["means"].sel(cluster=clusters, gene=genes).values.astype(np.float64)
    sd = shown.std(axis=0)
    expected = (shown - shown.mean(axis=0)) / np.where(sd > 0, sd, 1)
    np.testing.assert_allclose(np.asarray(fig.axes[0].images[0].get_array()), expected, rtol=1e-6)


def test_markers_selection_and_pages() -> None:
    ds = handmade(n_clusters=130, n_genes=300, seed=1, empty=None)
    table = markers(ds, top=2)
    pages = list(dotplot_pages(ds, markers=2, per_page=60))
    assert [fig.bigcat_layout.n_pages for fig in pages] == [3, 3, 3]
    shown = [name for fig in pages for name in fig.bigcat_layout.cluster_names]
    assert sorted(shown) == sorted(ds["cluster"].values)  # every cluster once
    for fig in pages:
        layout = fig.bigcat_layout
        wanted = table[table["cluster"].isin(layout.cluster_names)]
        assert set(layout.gene_names) == set(wanted["gene"])
        dots = fig.axes[0].collections[0]
        assert len(dots.get_offsets()) == len(layout.cluster_names) * len(layout.gene_names)


def test_unknown_names_list_close_matches() -> None:
    ds = handmade()
    with pytest.raises(BigcatInputError, match=r"unknown gene 'G07' \(close matches: g07"):
        dotplot(ds, ["G07"])
    with pytest.raises(BigcatInputError, match=r"unknown cluster 'c12' \(close matches: c2, c1\)"):
        heatmap(ds, ["g01"], clusters=["c12"])
    with pytest.raises(BigcatInputError, match="unknown cluster 'zzz' \\(no close match\\)"):
        markers(ds, clusters=["zzz"])
    with pytest.raises(BigcatInputError, match="either genes or a number of markers"):
        dotplot(ds)


def test_cli_markers_and_plots_write_every_format(stats_files: dict, tmp_path: Path, capsys) -> None:
    stats = str(stats_files[".zarr"])
    out = tmp_path / "markers.parquet"
    assert main(["markers", stats, "--top", "3", "--out", str(out)]) == 0
    written = pd.read_parquet(out)
    expected = markers(stats_files["memory"], top=3)
    assert written["gene"].tolist() == expected["gene"].tolist()
    assert main(["markers", stats, "--top", "1", "--out", str(tmp_path / "m.csv")]) == 0
    assert pd.read_csv(tmp_path / "m.csv")["gene"].tolist() == markers(stats_files["memory"], top=1)["gene"].tolist()
    magic = {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml"}
    for kind in ("dotplot", "heatmap"):
        for suffix, start in magic.items():
            figure = tmp_path / f"{kind}{suffix}"
            assert main(["plot", kind, stats, "--markers", "2", "--out", str(figure)]) == 0
            assert figure.read_bytes().startswith(start)
    capsys.readouterr()
    genes = ",".join(stats_files["memory"]["gene"].values[:3])
    assert main(["plot", "dotplot", stats, "--genes", genes + ",nosuchgene", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown gene 'nosuchgene'" in err
    assert stats in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()
    assert main(["plot", "dotplot", stats, "--markers", "2", "--out", str(tmp_path / "dotplot.png")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["plot", "heatmap", stats, "--markers", "2", "--out", str(tmp_path / "x.jpg")]) == 2
    assert "unknown figure type" in capsys.readouterr().err


def test_save_is_atomic_and_refuses_other_types(tmp_path: Path) -> None:
    fig = dotplot(handmade(), ["g01"])
    with pytest.raises(BigcatInputError, match="unknown figure type"):
        save(fig, tmp_path / "f.gif")
    assert save(fig, tmp_path / "f.png") == tmp_path / "f.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png"]  # no temporary left behind


def test_demo_ends_with_a_dot_plot_of_planted_markers(tmp_path: Path, capsys) -> None:
    from bigcat.demo import run_demo

    paths = run_demo(tmp_path / "demo", n_cells=2000, n_genes=3000, n_clusters=8, progress=False)
    out = capsys.readouterr().out
    assert paths["dotplot"].read_bytes().startswith(b"\x89PNG")
    assert f"dot plot written to {paths['dotplot']}" in out
    found = re.search(r"top 2 markers of 8 clusters: (\d+) of 16 are planted markers", out)
    assert found, out
    assert int(found.group(1)) >= 14, out  # dense toy data: most, not always all
