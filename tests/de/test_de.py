"""Pairwise DE against independent references: scipy's tests, a plain Holm, a direct pandas
re-statement of scrattch.bigcat's de_stats_pair, and R's limma (when installed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bigcat
from bigcat.cli import main
from bigcat.de import de_pairs
from bigcat.de.limma import holm, squeeze_var
from bigcat.errors import BigcatInputError

DEFAULTS = {"padj_th": 0.01, "lfc_th": 1.0, "q1_th": 0.5, "q2_th": None, "q_diff_th": 0.7, "min_cells": 4}


# ------------------------------------------------------------------------------------------
# the reference: scipy's tests, a plain Holm, de_stats_pair restated
# ------------------------------------------------------------------------------------------
def plain_holm(p: np.ndarray) -> np.ndarray:
    """R's p.adjust(p, "holm"), written out: NaN left out of the count and kept NaN."""
    out = np.full(len(p), np.nan)
    idx = [i for i in range(len(p)) if not np.isnan(p[i])]
    idx.sort(key=lambda i: p[i])  # sort is stable: ties stay in gene order, as R's order()
    m, running = len(idx), 0.0
    for rank, i in enumerate(idx):
        running = max(running, (m - rank) * p[i])
        out[i] = min(running, 1.0)
    return out


def limma_prior(sigma2: np.ndarray, df: float) -> tuple[float, float]:
    """limma's fitFDist by moments (no covariate), written out from its documented algorithm."""
    from scipy.special import digamma, polygamma

    x = sigma2[np.isfinite(sigma2)]
    if len(x) < 2:  # one variance: it is its own prior, with no weight
        return float(x[0]) if len(x) else np.nan, 0.0
    m = np.median(x) or 1.0
    x = np.maximum(x, 1e-5 * m)
    e = np.log(x) - digamma(df / 2) + np.log(df / 2)
    evar = e.var(ddof=1) - polygamma(1, df / 2)
    if evar <= 0:
        return float(x.mean()), np.inf
    from scipy.optimize import brentq

    d0 = 2 * brentq(lambda y: polygamma(1, y) - evar, 1e-8, 1e12)
    return float(np.exp(e.mean() + digamma(d0 / 2) - np.log(d0 / 2))), d0


def reference(stats: xr.Dataset, method: str, pairs: list[tuple[str, str]], **th) -> tuple[pd.DataFrame, dict]:
    """Scores per pair and the ordered up/down genes, the obvious way, pair by pair."""
    th = {**DEFAULTS, **th}
    n = stats["n_cells"].values.astype(float)
    clusters = list(stats["cluster"].values.astype(str))
    genes = np.asarray(stats["gene"].values)
    means = stats["sums"].values / n[:, None]
    sqr = stats["sqr_sums"].values / n[:, None]
    counts = stats["present_counts_ge1"].values.astype(float)
    q = counts / n[:, None]
    var = (sqr - means**2) * n[:, None] / (n[:, None] - 1)
    var[np.abs(var) <= 1e-13 * np.abs(sqr)] = 0  # a constant gene's rounding error is no variance
    var = np.maximum(var, 0)
    taking_part = sorted({c for pair in pairs for c in pair})
    rows_part = [clusters.index(c) for c in taking_part]
    if method == "fast_limma":
        df = n[rows_part].sum() - len(rows_part)
        sigma2 = sum(n[r] * (sqr[r] - means[r] ** 2) for r in rows_part) / df
        s0, d0 = limma_prior(sigma2, df)
        post = np.full(len(sigma2), s0) if np.isinf(d0) else (df * sigma2 + d0 * s0) / (df + d0)
    rows, lists = [], {}
    for c1, c2 in pairs:
        a, b = clusters.index(c1), clusters.index(c2)
        lfc = means[a] - means[b]
        with np.errstate(all="ignore"):
            if method == "fast_limma":
                t = lfc / np.sqrt(post) / np.sqrt(1 / n[a] + 1 / n[b])
                p = 2 * scipy.stats.t.sf(np.abs(t), df)
            elif method == "t.test":
                p = scipy.stats.ttest_ind_from_stats(
                    means[a], np.sqrt(var[a]), n[a], means[b], np.sqrt(var[b]), n[b], equal_var=False
                ).pvalue
                # both variances 0: R's Welch df is 0/0, so p is NaN (scipy says 0 or 1)
                p[(var[a] == 0) & (var[b] == 0)] = np.nan
            else:
                p = np.array([yates(counts[a, g], n[a], counts[b, g], n[b]) for g in range(len(genes))])
        padj = plain_holm(p)
        df_ = pd.DataFrame({"padj": padj, "pval": p, "lfc": lfc, "q1": q[a], "q2": q[b]}, index=genes)
        df_ = df_.iloc[np.lexsort((-np.abs(df_["lfc"].to_numpy()), df_["pval"].fillna(np.inf).to_numpy()))]
        sel = df_[(df_["padj"] < th["padj_th"]) & (df_["lfc"].abs() > th["lfc_th"])]
        qd = ((sel["q1"] - sel["q2"]).abs() / np.maximum(sel["q1"], sel["q2"])).fillna(0)
        up = sel[
            (sel["lfc"] > 0)
            & (sel["q1"] > th["q1_th"])
            & (sel["q1"] * n[a] >= th["min_cells"])
            & (qd > th["q_diff_th"])
        ]
        down = sel[
            (sel["lfc"] < 0)
            & (sel["q2"] > th["q1_th"])
            & (sel["q2"] * n[b] >= th["min_cells"])
            & (qd > th["q_diff_th"])
        ]
        if th["q2_th"] is not None:
            up = up[up["q2"] < th["q2_th"]]
            down = down[down["q1"] < th["q2_th"]]

        def score(s: pd.DataFrame) -> float:
            with np.errstate(divide="ignore"):  # padj 0 (p below the smallest float): capped at 20
                return float(np.minimum(-np.log10(s["padj"].to_numpy()), 20).sum())

        rows.append(
            {
                "P1": c1,
                "P2": c2,
                "score": score(up) + score(down),
                "up_score": score(up),
                "down_score": score(down),
                "num": len(up) + len(down),
                "up_num": len(up),
                "down_num": len(down),
            }
        )
        lists[f"{c1}_{c2}"] = (up, down)
    return pd.DataFrame(rows), lists


def yates(x: float, nx: float, y: float, ny: float) -> float:
    """scrattch's vec_chisq_test for one gene, through scipy's own Yates-corrected 2×2 test."""
    table = np.array([[x, nx - x], [y, ny - y]])
    if (table.sum(axis=0) == 0).any():
        return 1.0  # R's NaN p-value, set to 1
    stat = sum(
        max(0.0, abs(o - e) - 0.5) ** 2 / e
        for o, e in zip(table.ravel(), scipy.stats.contingency.expected_freq(table).ravel(), strict=True)
    )
    return float(scipy.stats.chi2.sf(stat, 1))


def check_against_reference(stats, method, result, **th):
    pairs = list(zip(result.pairs["P1"], result.pairs["P2"], strict=True))
    want, lists = reference(stats, method, pairs, **th)
    got = result.pairs
    for column in ("num", "up_num", "down_num"):
        np.testing.assert_array_equal(got[column].to_numpy(), want[column].to_numpy(), err_msg=column)
    for column in ("score", "up_score", "down_score"):
        np.testing.assert_allclose(
            got[column].to_numpy(), want[column].to_numpy(), rtol=1e-7, atol=1e-7, err_msg=column
        )
    top = result.attrs["top"]
    for pair, (up, down) in lists.items():
        for direction, frame in (("up", up), ("down", down)):
            mine = result.genes[(result.genes["pair"] == pair) & (result.genes["direction"] == direction)]
            expected = frame.head(top)
            assert list(mine["gene"]) == list(expected.index), (pair, direction)
            np.testing.assert_allclose(mine["pval"].to_numpy(), expected["pval"].to_numpy(), rtol=1e-9)
            np.testing.assert_allclose(mine["padj"].to_numpy(), expected["padj"].to_numpy(), rtol=1e-9)
            np.testing.assert_allclose(mine["lfc"].to_numpy(), expected["lfc"].to_numpy(), rtol=1e-12)


# ------------------------------------------------------------------------------------------
# statistics for the tests: a small synthetic atlas, and random ones
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> tuple[xr.Dataset, object]:
    from bigcat.synth import make_model

    folder = tmp_path_factory.mktemp("de")
    path = folder / "atlas.h5ad"
    bigcat.synth(path, n_cells=4000, n_genes=400, n_clusters=10, nnz_per_cell=120, seed=3, progress=False)
    stats = bigcat.cluster_stats(path, stats="sums,sqr_sums,means", normalize="log2cpm", present_at="ge1",
                                 client=None, progress=False)  # fmt: skip
    return stats.load(), make_model(4000, 400, 10, nnz_per_cell=120, seed=3)


def random_stats(draw) -> xr.Dataset:
    k = draw(st.integers(2, 7))
    g = draw(st.integers(1, 30))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = rng.integers(0, 40, size=k)
    n[rng.integers(0, k)] = max(n.max(), 5)
    means = rng.gamma(1.0, 1.5, size=(k, g)) * (rng.random((k, g)) < 0.8)
    means[rng.integers(0, k)] = 0  # an all-zero cluster
    spread = rng.gamma(1.0, 0.5, size=(k, g)) * (rng.random((k, g)) < 0.8)  # zero variance genes
    sums = means * n[:, None]
    sqr_sums = (means**2 + spread) * n[:, None]
    counts = np.floor(rng.random((k, g)) * (n[:, None] + 1))
    counts[means == 0] = 0
    return xr.Dataset(
        {
            "n_cells": ("cluster", n),
            "sums": (("cluster", "gene"), sums),
            "sqr_sums": (("cluster", "gene"), sqr_sums),
            "present_counts_ge1": (("cluster", "gene"), counts.astype(np.int64)),
        },
        coords={"cluster": [f"c{i}" for i in range(k)], "gene": [f"g{j}" for j in range(g)]},
        attrs={"normalize": "log2cpm", "present_at": "ge1"},
    )


@st.composite
def problems(draw):
    stats = random_stats(draw)
    method = draw(st.sampled_from(["fast_limma", "t.test", "chisq"]))
    th = {
        "padj_th": draw(st.sampled_from([0.01, 0.5, 1.0])),
        "lfc_th": draw(st.sampled_from([0.0, 0.5, 1.0])),
        "q1_th": draw(st.sampled_from([0.0, 0.3, 0.5])),
        "q2_th": draw(st.sampled_from([None, 0.5, 0.9])),
        "q_diff_th": draw(st.sampled_from([0.0, 0.3, 0.7])),
        "min_cells": draw(st.sampled_from([1, 4, 10])),
    }
    return stats, method, th


# ------------------------------------------------------------------------------------------
# the tests
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fast_limma", "t.test", "chisq"])
def test_every_pair_matches_the_reference(atlas, method) -> None:
    stats, _ = atlas
    result = de_pairs(stats, "all", method, top=15)
    assert len(result.pairs) == 45  # 10 clusters
    assert result.pairs["num"].sum() > 0
    check_against_reference(stats, method, result)
    first = result.pairs.iloc[0]
    assert (first["P1"], first["P2"]) == ("cl0000", "cl0001")  # create_pairs order


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_random_statistics_match_the_reference(problem) -> None:
    stats, method, th = problem
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = de_pairs(stats, "all", method, top=5, **th)
    except BigcatInputError as error:
        assert "no pair of clusters" in str(error)  # noqa: PT017
        n = stats["n_cells"].values
        assert ((n >= th["min_cells"]) & (n > 0)).sum() < 2
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_against_reference(stats, method, result, **th)


def test_holm_against_a_plain_loop_and_by_hand() -> None:
    rng = np.random.default_rng(0)
    p = rng.random((3, 50)) ** 3
    p[0, 5] = np.nan
    p[1, 7] = p[1, 8]  # a tie
    expected = np.array([plain_holm(row) for row in p])
    np.testing.assert_allclose(holm(p), expected, rtol=1e-15, equal_nan=True)
    np.testing.assert_allclose(holm(p[2]), expected[2], rtol=1e-15)  # one row
    assert holm(np.array([0.01, 0.04, 0.03, np.nan]))[:3] == pytest.approx([0.03, 0.06, 0.06])  # by hand


@pytest.mark.parametrize("df", [50.0, 195_000.0, 4_000_000.0])
def test_the_t_bound_inverts_the_p_value_r_computes(df) -> None:
    from bigcat.de.engine import t_bound, t_tail

    p = np.array([0.5, 0.01, 0.01 / 32285, 1e-12])
    np.testing.assert_allclose(t_tail(df, t_bound(df, p)), p, rtol=1e-9)
    if df > 4e5:  # R's normal approximation, written out: pnorm(t (1 - 1/(4 df)) / sqrt(1 + t²/(2 df)))
        t = t_bound(df, p)
        z = t * (1 - 1 / (4 * df)) / np.sqrt(1 + t * t / (2 * df))
        np.testing.assert_allclose(2 * scipy.stats.norm.sf(z), p, rtol=1e-9)


@pytest.mark.parametrize("method", ["fast_limma", "chisq"])
def test_holm_bounds_keep_every_gene_holm_selects_and_those_ranked_before(method) -> None:
    """The candidates tightened to what Holm can still select: against a plain Holm over all
    genes, with statistics crowded around the bounds."""
    from bigcat.de import kernels
    from bigcat.de.engine import METHODS, Prepared, holm_bounds, t_tail

    rng = np.random.default_rng(7)
    n_genes, df, th = 2000, 300.0, 0.01
    prepared = Prepared(METHODS[method], np.zeros((1, 1)), np.zeros((1, 1)), df, None)
    bound = holm_bounds(prepared, n_genes, th)
    cut = 0
    for trial in range(40):
        # statistics at the bounds of random ranks, nudged: Holm's decision sits right there
        j = rng.integers(1, n_genes + 1, size=n_genes)
        stat = bound[j] * (1 + rng.choice([-1e-6, 0.0, 1e-6, 0.05, -0.05], size=n_genes))
        stat[rng.random(n_genes) < trial / 40] = 0.1  # and many genes far from any bound
        p = t_tail(df, stat) if method == "fast_limma" else scipy.stats.chi2.sf(stat, 1)
        keep = stat > bound[1]
        genes = np.flatnonzero(keep).astype(np.int32)[None, :]
        rows = np.ascontiguousarray(stat[keep])[None, :]
        found, m = np.array([genes.shape[1]]), np.array([n_genes])
        kernels.tighten(genes, rows, rows.copy(), found, m, bound)
        kept = set(genes[0, : found[0]].tolist())
        selected = set(np.flatnonzero(plain_holm(p) < th).tolist())
        assert selected <= kept, trial
        if kept:  # a prefix of the genes by p: everything with a smaller p is kept too
            assert set(np.flatnonzero(p < p[list(kept)].max()).tolist()) <= kept, trial
        assert list(genes[0, : found[0]]) == sorted(kept)  # in gene order
        cut += len(kept) < keep.sum()
    assert cut > 20  # the bound does cut the candidates down


def test_squeeze_var_matches_the_written_out_prior() -> None:
    rng = np.random.default_rng(1)
    sigma2 = rng.chisquare(8, 2000) / 8 * rng.gamma(4, 0.25, 2000)
    sigma2[:10] = 0.0
    got = squeeze_var(sigma2, 8.0)
    s0, d0 = limma_prior(sigma2, 8.0)
    assert got.var_prior == pytest.approx(s0, rel=1e-9)
    assert got.df_prior == pytest.approx(d0, rel=1e-6)
    np.testing.assert_allclose(got.var_post, (8 * sigma2 + d0 * s0) / (8 + d0), rtol=1e-6)
    same = squeeze_var(np.full(100, 2.0) + rng.normal(0, 1e-9, 100), 5.0)  # no spread: d0 infinite
    assert np.isinf(same.df_prior)
    np.testing.assert_allclose(same.var_post, 2.0, rtol=1e-6)


def _has_limma() -> bool:
    if shutil.which("Rscript") is None:
        return False
    done = subprocess.run(["Rscript", "-e", "library(limma)"], capture_output=True, check=False)
    return done.returncode == 0


@pytest.mark.skipif(not _has_limma(), reason="R with limma is not installed (.ci/run installs r-bioc-limma)")
def test_squeeze_var_and_fast_limma_match_r(atlas, tmp_path) -> None:
    """limma's own squeezeVar on the pooled variances, and scrattch's simple_ebayes p-values for
    a pair, run by Rscript."""
    stats, _ = atlas
    result = de_pairs(stats, "all", "fast_limma", top=5)
    n = stats["n_cells"].values.astype(float)
    means = stats["sums"].values / n[:, None]
    sqr = stats["sqr_sums"].values / n[:, None]
    df = n.sum() - len(n)
    sigma2 = (n[:, None] * (sqr - means**2)).sum(axis=0) / df
    np.savetxt(tmp_path / "sigma2.txt", sigma2, fmt="%.17g")
    np.savetxt(tmp_path / "pair.txt", np.c_[means[0] - means[1]], fmt="%.17g")
    script = f"""
library(limma)
s2 <- scan("{tmp_path / "sigma2.txt"}", quiet=TRUE)
lfc <- scan("{tmp_path / "pair.txt"}", quiet=TRUE)
out <- suppressWarnings(squeezeVar(s2, {float(df)!r}))
t <- lfc / sqrt(1/{float(n[0])!r} + 1/{float(n[1])!r}) / sqrt(out$var.post)
p <- 2 * pt(-abs(t), df = min({float(df)!r} + out$df.prior, {float(df)!r}))
cat(sprintf("%.17g", c(out$var.prior, out$df.prior)), "\\n")
cat(sprintf("%.17g", out$var.post), "\\n")
cat(sprintf("%.17g", p.adjust(p)), "\\n")
"""
    lines = subprocess.run(["Rscript", "-e", script], capture_output=True, text=True, check=True).stdout.splitlines()
    prior = np.array(lines[0].split(), dtype=float)
    post = np.array(lines[1].split(), dtype=float)
    padj_r = np.array(lines[2].split(), dtype=float)
    got = squeeze_var(sigma2, df)
    assert got.var_prior == pytest.approx(prior[0], rel=1e-9)
    assert got.df_prior == pytest.approx(prior[1], rel=1e-7) or (np.isinf(got.df_prior) and np.isinf(prior[1]))
    np.testing.assert_allclose(got.var_post, post, rtol=1e-9)
    assert result.attrs["df_prior"] == pytest.approx(prior[1], rel=1e-7)
    mine = result.genes[(result.genes["pair"] == "cl0000_cl0001")]
    genes = list(stats["gene"].values)
    for gene, padj in zip(mine["gene"], mine["padj"], strict=True):
        assert padj == pytest.approx(padj_r[genes.index(gene)], rel=1e-6, abs=1e-300)


def test_planted_markers_are_found_up_in_their_cluster(atlas) -> None:
    """Every gene reported up in a cluster against another is one of the markers planted in
    either, and most planted markers are found against every other cluster. (The synthetic
    markers are raised about 10-fold but are not on/off: q_diff_th is relaxed to 0.)"""
    stats, model = atlas
    result = de_pairs(stats, "all", "fast_limma", top=400, q_diff_th=0.0, q1_th=0.3)
    genes = np.asarray(stats["gene"].values)
    clusters = list(stats["cluster"].values.astype(str))
    found, planted = 0, 0
    for k, cluster in enumerate(clusters):
        for j, other in enumerate(clusters):
            if j == k:
                continue
            p1, p2 = sorted([cluster, other])
            side = "up" if p1 == cluster else "down"
            mine = result.genes[
                (result.genes["P1"] == p1) & (result.genes["P2"] == p2) & (result.genes["direction"] == side)
            ]
            markers = set(genes[model.markers[k]])
            assert set(mine["gene"]) <= markers | set(genes[model.markers[j]])
            planted += len(markers)
            found += len(markers & set(mine["gene"]))
    assert found / planted > 0.85, found / planted


def test_pair_sets(atlas, tmp_path) -> None:
    stats, _ = atlas
    table = pd.DataFrame({"P1": ["cl0003", "cl0001"], "P2": ["cl0005", "cl0002"]})
    result = de_pairs(stats, table, "t.test")
    assert list(zip(result.pairs["P1"], result.pairs["P2"], strict=True)) == [
        ("cl0003", "cl0005"),
        ("cl0001", "cl0002"),
    ]
    table.to_csv(tmp_path / "pairs.csv", index=False)
    again = de_pairs(stats, tmp_path / "pairs.csv", "t.test")
    pd.testing.assert_frame_equal(result.pairs, again.pairs)
    near = de_pairs(stats, "neighbors:2", "chisq").pairs
    # each cluster appears with its 2 nearest: at least 10 and at most 20 distinct pairs, P1 < P2
    assert 10 <= len(near) <= 20
    assert (near["P1"] < near["P2"]).all()
    taxonomy = pd.DataFrame({"subclass": ["A"] * 4 + ["B"] * 6, "cluster": [f"cl{i:04d}" for i in range(10)]})
    taxonomy.to_csv(tmp_path / "taxonomy.csv", index=False)
    siblings = de_pairs(stats, f"siblings:{tmp_path / 'taxonomy.csv'}", "chisq").pairs
    assert len(siblings) == 6 + 15
    small = stats.copy()
    small["n_cells"] = small["n_cells"].where(small["cluster"] != "cl0000", 3)
    assert "cl0000" not in set(de_pairs(small, "all", "chisq").pairs["P1"])  # below min_cells


def test_bad_input_is_one_line(atlas, tmp_path, capsys) -> None:
    stats, _ = atlas
    path = tmp_path / "stats.zarr"
    bigcat.write_stats(stats, path)
    no_squares = stats.drop_vars(["sqr_sums"])
    with pytest.raises(BigcatInputError, match="squared sums"):
        de_pairs(no_squares)
    assert len(de_pairs(no_squares, method="chisq").pairs) == 45  # presence alone suffices
    with pytest.raises(BigcatInputError, match=r"x >= 1.*--present-at ge1"):
        de_pairs(stats.drop_vars(["present_counts_ge1", "present_ge1"], errors="ignore"))
    linear = stats.assign_attrs(normalize="none")
    with pytest.raises(BigcatInputError, match="log2"):
        de_pairs(linear)
    assert len(de_pairs(linear, scale="log", method="chisq").pairs) == 45
    with pytest.raises(BigcatInputError, match="not in"):
        de_pairs(stats, pd.DataFrame({"P1": ["cl0001"], "P2": ["nope"]}))
    with pytest.raises(BigcatInputError, match="no pair"):
        de_pairs(stats, pd.DataFrame({"P1": ["cl0001"], "P2": ["cl0001"]}))
    out = tmp_path / "de-out"
    code = main(["de", str(path), "--out", str(out), "--pairs", str(tmp_path / "missing.csv"), "--quiet"])
    assert code == 2
    assert "missing.csv" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".de-out")]


def test_cli_writes_tables_that_match_the_api(atlas, tmp_path) -> None:
    stats, _ = atlas
    path = tmp_path / "stats.zarr"
    bigcat.write_stats(stats, path)
    out = tmp_path / "de"
    assert main(["de", str(path), "--out", str(out), "--method", "t.test", "--top", "7", "--quiet"]) == 0
    expected = de_pairs(path, "all", "t.test", top=7)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "pairs.parquet"), expected.pairs)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "genes.parquet"), expected.genes)
    marker = json.loads((out / "bigcat.json").read_text())["bigcat"]
    assert marker["method"] == "t.test"
    assert marker["complete"]
    assert main(["de", str(path), "--out", str(out), "--quiet"]) == 2  # exists
    assert main(["de", str(path), "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert Path(out / "pairs.parquet").exists()


def test_pairs_with_more_candidates_than_the_first_scan_keeps(atlas, monkeypatch) -> None:
    """The scan keeps at most a budget's share of candidates per pair; pairs with more are
    scanned again, wide enough (forced here: 4 per pair for 400 genes)."""
    import bigcat.de.engine

    stats, _ = atlas
    monkeypatch.setattr(bigcat.de.engine, "CANDIDATE_BUDGET", 1)
    monkeypatch.setattr(bigcat.de.engine, "MIN_ROW", 4)
    real, widths = bigcat.de.engine._scan, []

    def spy(*args):
        widths.append(args[-1].width)
        return real(*args)

    monkeypatch.setattr(bigcat.de.engine, "_scan", spy)
    loose = {"lfc_th": 0.2, "q1_th": 0.1, "q_diff_th": 0.0, "padj_th": 0.5}
    for method in ("fast_limma", "chisq", "t.test"):
        widths.clear()
        result = de_pairs(stats, "all", method, top=15, **loose)
        check_against_reference(stats, method, result, **loose)
        assert widths[0] == 4
        assert max(widths) > 4, method  # some pairs had more candidates and were scanned again


def test_matrix_of_scores_and_its_heatmap(atlas, tmp_path) -> None:
    stats, _ = atlas
    out = tmp_path / "de"
    result = de_pairs(stats, "neighbors:3", "chisq", out=out, matrix="num")
    assert result == out
    pairs = pd.read_parquet(out / "pairs.parquet")
    grid = pd.read_parquet(out / "matrix-num.parquet")
    assert list(grid.index) == list(grid.columns)  # one order for rows and columns (the tree's)
    for p1, p2, num in zip(pairs["P1"], pairs["P2"], pairs["num"], strict=True):
        assert grid.loc[p1, p2] == num == grid.loc[p2, p1]
    tested = len(pairs) * 2
    assert int(np.isfinite(grid.to_numpy()).sum()) == tested  # untested pairs (and the diagonal) are NaN
    assert (out / "matrix-num.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(BigcatInputError, match="needs out"):
        de_pairs(stats, "neighbors:3", "chisq", matrix="num")


def test_a_chunk_with_no_gene_selected_keeps_the_tables_typed(atlas, tmp_path, monkeypatch) -> None:
    """A first chunk whose pairs select no gene must not give the genes table null columns."""
    import bigcat.de.engine

    stats, _ = atlas
    monkeypatch.setattr(bigcat.de.engine, "PAIRS_PER_CHUNK", 1)
    same = stats.sel(cluster=["cl0000", "cl0000", "cl0001"]).assign_coords(cluster=["a", "b", "c"])
    table = pd.DataFrame({"P1": ["a", "a"], "P2": ["b", "c"]})  # a and b are one cluster: nothing differs
    de_pairs(same, table, "t.test", out=tmp_path / "de")
    genes = pd.read_parquet(tmp_path / "de" / "genes.parquet")
    assert set(genes["pair"]) == {"a_c"}
    assert genes["gene"].dtype == object
    assert pd.read_parquet(tmp_path / "de" / "pairs.parquet")["num"].tolist()[0] == 0
