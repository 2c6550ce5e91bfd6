"""MapMyCells reference markers against an independent restatement of cell_type_mapper's steps
in NumPy/scipy (Welch from n, sum, sumsq; Holm written out; the penetrance rules written out),
on small taxonomies whose genes sit on every threshold."""

from __future__ import annotations

import itertools
import json

import h5py
import numpy as np
import pytest
import scipy.stats

from bigcat.cli import main
from bigcat.errors import BigcatInputError
from bigcat.mapmycells import reference_markers

TH = {"p_th": 0.01, "q1_th": 0.5, "q1_min_th": 0.1, "qdiff_th": 0.7, "qdiff_min_th": 0.1, "log2_fold_th": 1.0,
      "log2_fold_min_th": 0.8, "n_valid": 30, "exact_penetrance": False}  # fmt: skip


# ------------------------------------------------------------------------------------------
# the restatement
# ------------------------------------------------------------------------------------------
def boring_t(p_th: float) -> float | None:
    """The |t| at or below which cell_type_mapper gives p = 1: the normal quantile of p_th/2,
    interpolated on a 1000-point grid between the integers around it (its own recipe)."""
    if p_th >= 1:
        return None
    grid = np.arange(-7, 0)
    i = int(np.searchsorted(scipy.stats.norm.cdf(grid), p_th / 2))
    if i >= len(grid) - 1:
        return None
    fine = np.linspace(grid[i - 1], grid[i + 1], 1000)
    return float(-np.interp(p_th / 2, scipy.stats.norm.cdf(fine), fine))


def holm_below(p: np.ndarray, p_th: float) -> np.ndarray:
    """Holm over the genes with p < p_th, the others counted in m: which adjusted p are < p_th."""
    m = len(p)
    idx = sorted((i for i in range(m) if p[i] < p_th), key=lambda i: p[i])
    out = np.zeros(m, dtype=bool)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, p[i] * (m - rank))
        out[i] = min(running, 1.0) < p_th
    return out


def penetrance(pa, pb, fold, ok, th) -> np.ndarray:
    pa, pb, fold = np.where(ok, pa, -1.0), np.where(ok, pb, -1.0), np.where(ok, fold, -1.0)
    q1 = np.maximum(pa, pb)
    qdiff = np.abs(pa - pb) / np.where(q1 > 0, q1, 1.0)
    if th["exact_penetrance"]:
        return (q1 > th["q1_th"]) & (qdiff > th["qdiff_th"]) & (fold > th["log2_fold_th"])
    t1 = np.where(q1 > th["q1_th"], 0.0, (q1 - th["q1_th"]) ** 2)
    t2 = np.where(qdiff > th["qdiff_th"], 0.0, (qdiff - th["qdiff_th"]) ** 2)
    t3 = np.where(fold > th["log2_fold_th"], 0.0, (fold - th["log2_fold_th"]) ** 2)
    exact = (t2 + t1 + t3) < 1e-10
    n_valid = min(th["n_valid"], len(pa))
    if exact.sum() >= n_valid:
        return exact
    floors = (q1 >= th["q1_min_th"]) & (qdiff >= th["qdiff_min_th"]) & (fold >= th["log2_fold_min_th"])
    weighted = [1.5 * t2 + t1 + t3, t2 + 1.5 * t1 + t3, t2 + t1 + 1.5 * t3]
    if floors.sum() < n_valid:
        return floors
    cut = min(np.sort(w[floors])[n_valid - 1] for w in weighted)
    return floors & np.any([w <= cut for w in weighted], axis=0)


def restated(n, sums, sumsq, ge1, ok, th) -> list[tuple[set, set]]:
    """(up, down) gene sets of every pair of leaves (rows already in sorted leaf order)."""
    n = np.asarray(n)
    n1 = np.maximum(1, n)[:, None].astype(float)
    mean = sums / n1
    var = (sumsq - sums**2 / n1) / np.maximum(1, n - 1)[:, None]
    frac = ge1 / n1
    boring = boring_t(th["p_th"])
    out = []
    for a, b in itertools.combinations(range(len(n)), 2):
        if n[a] < 2 or n[b] < 2:
            out.append((set(), set()))
            continue
        with np.errstate(all="ignore"):
            se2 = var[a] / n[a] + var[b] / n[b]
            se = np.sqrt(se2)
            t = (mean[a] - mean[b]) / np.where(se > 0, se, 1e-10)
            nu_den = var[a] ** 2 / float(n[a] ** 3 - n[a] ** 2) + var[b] ** 2 / float(n[b] ** 3 - n[b] ** 2)
            nu = se2 * se2 / np.where(nu_den > 0, nu_den, 1.0)
            cdf = scipy.stats.t.cdf(t, nu)
        if boring is not None:
            cdf = np.where(np.abs(t) > boring, cdf, 0.5)
        cdf = np.clip(np.where(np.isfinite(cdf), cdf, 0.5), np.finfo(float).smallest_normal, 1 - np.finfo(float).epsneg)
        p = np.where(cdf < 0.5, 2 * cdf, 2 * (1 - cdf))
        valid_p = holm_below(p, th["p_th"])
        fold = np.abs(mean[a] - mean[b])
        valid = valid_p & penetrance(frac[a], frac[b], fold, ok, th)
        if not th["exact_penetrance"] and valid.sum() < 10:
            valid = valid_p & penetrance(frac[a], frac[b], fold, ok & valid_p, th)
        higher_in_b = mean[b] > mean[a]
        out.append((set(np.flatnonzero(valid & higher_in_b)), set(np.flatnonzero(valid & ~higher_in_b))))
    return out


# ------------------------------------------------------------------------------------------
# statistics on the thresholds
# ------------------------------------------------------------------------------------------
def threshold_stats(seed: int, k: int = 6, g: int = 90) -> dict:
    """Leaves × genes statistics whose fractions, folds and p-values crowd the thresholds."""
    rng = np.random.default_rng(seed)
    n = rng.choice([1, 2, 10, 20, 40, 200], size=k)
    n[:2] = [20, 40]
    # fractions on a grid that holds 0.1, 0.3, 0.5, 1.0 exactly (qdiff = 0.7 for 1.0 vs 0.3)
    frac = rng.choice([0.0, 0.1, 0.2, 0.3, 0.5, 0.6, 0.8, 1.0], size=(k, g))
    ge1 = np.round(frac * n[:, None]).astype(np.int64)
    # means on a grid of quarters, so folds of exactly 0.75, 0.8 (0.2 + 0.6), 1.0 occur
    mean = rng.choice([0.0, 0.2, 0.25, 0.5, 0.8, 1.0, 1.25, 2.0, 3.0], size=(k, g))
    spread = rng.choice([0.0, 0.05, 0.5, 2.0, 8.0], size=(k, g))
    sums = mean * n[:, None]
    sumsq = (mean**2 + spread) * n[:, None]
    sumsq[:, :3] = sums[:, :3] ** 2 / np.maximum(n[:, None], 1)  # zero variance genes
    return {"n": n, "sums": sums, "sumsq": sumsq, "ge1": ge1}


def write_precomputed(path, st: dict, leaves: list[str] | None = None, genes: list[str] | None = None) -> list[str]:
    k, g = st["sums"].shape
    leaves = leaves or [f"cl{i:02d}" for i in range(k)]
    genes = genes or [f"g{j}" for j in range(g)]
    with h5py.File(path, "w") as f:
        f["n_cells"] = st["n"]
        f["sum"] = st["sums"]
        f["sumsq"] = st["sumsq"]
        f["ge1"] = st["ge1"]
        f["gt0"] = st["ge1"]
        f["gt1"] = st["ge1"]
        f["col_names"] = json.dumps(genes).encode()
        f["cluster_to_row"] = json.dumps({leaf: i for i, leaf in enumerate(leaves)}).encode()
        tree = {"hierarchy": ["class", "cluster"], "class": {"A": leaves[: k // 2], "B": leaves[k // 2 :]},
                "cluster": {leaf: [] for leaf in leaves}}  # fmt: skip
        f["taxonomy_tree"] = json.dumps(tree).encode()
        f["metadata"] = json.dumps({}).encode()
    return leaves


def read_markers(path) -> tuple[list[tuple[set, set]], dict]:
    with h5py.File(path, "r") as f:
        n_pairs = int(f["n_pairs"][()])
        pairs = []
        by_pair = {
            d: (f[f"sparse_by_pair/{d}_pair_idx"][()], f[f"sparse_by_pair/{d}_gene_idx"][()]) for d in ("up", "down")
        }
        by_gene = {
            d: (f[f"sparse_by_gene/{d}_gene_idx"][()], f[f"sparse_by_gene/{d}_pair_idx"][()]) for d in ("up", "down")
        }
        for i in range(n_pairs):
            pairs.append(
                tuple(set(by_pair[d][1][by_pair[d][0][i] : by_pair[d][0][i + 1]].tolist()) for d in ("up", "down"))
            )
        # the by-gene arrays are the transpose of the by-pair ones, pairs ascending within a gene
        for j, d in enumerate(("up", "down")):
            ptr, pair_idx = by_gene[d]
            for gene in range(len(ptr) - 1):
                listed = pair_idx[ptr[gene] : ptr[gene + 1]]
                assert list(listed) == sorted(listed)
                assert {int(p) for p in listed} == {p for p in range(n_pairs) if gene in pairs[p][j]}
        meta = {
            "pair_to_idx": json.loads(f["pair_to_idx"][()].decode()),
            "gene_names": json.loads(f["gene_names"][()].decode()),
            "metadata": json.loads(f["metadata"][()].decode()),
        }
    return pairs, meta


# ------------------------------------------------------------------------------------------
# the tests
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [{}, {"n_valid": 5}, {"exact_penetrance": True}, {"p_th": 0.2, "q1_th": 0.3, "qdiff_th": 0.5},
     {"log2_fold_th": 0.8, "log2_fold_min_th": 0.75, "n_valid": 200}],
)  # fmt: skip
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_markers_match_the_restatement_on_the_thresholds(tmp_path, seed, options) -> None:
    st = threshold_stats(seed)
    leaves = write_precomputed(tmp_path / "stats.h5", st)
    out = reference_markers(tmp_path / "stats.h5", tmp_path / "ref.h5", **options)
    got, meta = read_markers(out)
    ok = np.ones(st["sums"].shape[1], dtype=bool)
    want = restated(st["n"], st["sums"], st["sumsq"], st["ge1"], ok, {**TH, **options})
    assert got == want
    assert sum(len(u) + len(d) for u, d in want) > 0  # markers were found, on both sides
    assert any(u for u, _ in want)
    assert any(d for _, d in want)
    pairs = list(itertools.combinations(sorted(leaves), 2))
    assert all(meta["pair_to_idx"]["cluster"][a][b] == i for i, (a, b) in enumerate(pairs))
    assert meta["metadata"]["precomputed_path"] == str((tmp_path / "stats.h5").resolve())


def test_genes_outside_the_query_and_invalid_markers_are_never_markers(tmp_path) -> None:
    st = threshold_stats(5)
    g = st["sums"].shape[1]
    names = [f"g{j}" for j in range(g)]
    names[4] = "INVALID_MARKER_g4"
    write_precomputed(tmp_path / "stats.h5", st, genes=names)
    query = names[::2]
    got, _ = read_markers(reference_markers(tmp_path / "stats.h5", tmp_path / "ref.h5", genes=query))
    ok = np.array([n in set(query) and not n.startswith("INVALID_MARKER") for n in names])
    assert got == restated(st["n"], st["sums"], st["sumsq"], st["ge1"], ok, TH)
    assert all(j % 2 == 0 and j != 4 for u, d in got for j in u | d)


def test_leaves_are_paired_in_sorted_order_whatever_the_rows(tmp_path) -> None:
    st = threshold_stats(3, k=5)
    order = [3, 0, 4, 1, 2]  # rows of the file in another order than the sorted names
    shuffled = {key: v[order] for key, v in st.items()}
    leaves = ["e", "a", "d", "b", "c"]
    write_precomputed(tmp_path / "stats.h5", shuffled, leaves=[leaves[i] for i in range(5)])
    got, _ = read_markers(reference_markers(tmp_path / "stats.h5", tmp_path / "ref.h5"))
    by_name = {leaf: i for i, leaf in enumerate(leaves)}
    rows = [by_name[x] for x in sorted(leaves)]
    want = restated(shuffled["n"][rows], shuffled["sums"][rows], shuffled["sumsq"][rows], shuffled["ge1"][rows],
                    np.ones(st["sums"].shape[1], bool), TH)  # fmt: skip
    assert got == want


def test_cli_and_bad_input(tmp_path, capsys) -> None:
    st = threshold_stats(0)
    write_precomputed(tmp_path / "stats.h5", st)
    assert main(["mapmycells", "reference-markers", str(tmp_path / "stats.h5"), "--out", str(tmp_path / "r.h5"),
                 "--n-valid", "5", "--quiet"]) == 0  # fmt: skip
    got, _ = read_markers(tmp_path / "r.h5")
    assert got == restated(st["n"], st["sums"], st["sumsq"], st["ge1"], np.ones(90, bool), {**TH, "n_valid": 5})
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["n_cells"] = st["n"]
    assert main(["mapmycells", "reference-markers", str(tmp_path / "bad.h5"), "--out", str(tmp_path / "x.h5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "bad.h5" in err[0]
    assert "sumsq" in err[0]
    assert not (tmp_path / "x.h5").exists()
    with pytest.raises(BigcatInputError, match="q1_th must be > q1_min_th"):
        reference_markers(tmp_path / "stats.h5", tmp_path / "y.h5", q1_th=0.1, q1_min_th=0.2)
    assert not (tmp_path / "y.h5").exists()


@pytest.mark.parametrize("seed", [2, 3])
def test_pairs_run_tile_by_tile_and_come_back_in_order(tmp_path, monkeypatch, seed) -> None:
    """A chunk's pairs run in tile order (tiles of 2 leaves here, so the order changes) and the
    file holds them in pair order."""
    import bigcat.de.engine

    monkeypatch.setattr(bigcat.de.engine, "TILE", 2)
    orders = []
    real = np.lexsort
    monkeypatch.setattr(bigcat.de.engine.np, "lexsort", lambda keys: orders.append(real(keys)) or orders[-1])
    st = threshold_stats(seed)
    write_precomputed(tmp_path / "stats.h5", st)
    got, _ = read_markers(reference_markers(tmp_path / "stats.h5", tmp_path / "ref.h5"))
    assert got == restated(st["n"], st["sums"], st["sumsq"], st["ge1"], np.ones(90, bool), TH)
    assert any(not np.array_equal(o, np.arange(len(o))) for o in orders)


def test_pairs_with_more_candidates_than_a_row_holds(tmp_path, monkeypatch) -> None:
    """Pairs whose candidates overflow the rows are scanned again in parts that fit (forced),
    and put back among the others in pair order."""
    import bigcat.de.engine

    monkeypatch.setattr(bigcat.de.engine, "CANDIDATE_BUDGET", 100)
    monkeypatch.setattr(bigcat.de.engine, "MARKER_ROW", 40)
    monkeypatch.setattr(bigcat.de.engine, "TILE", 2)
    ranges = []
    real = bigcat.de.engine._fitting_ranges
    monkeypatch.setattr(bigcat.de.engine, "_fitting_ranges", lambda *a: ranges.append(real(*a)) or ranges[-1])
    st = threshold_stats(1)
    write_precomputed(tmp_path / "stats.h5", st)
    got, _ = read_markers(reference_markers(tmp_path / "stats.h5", tmp_path / "ref.h5", p_th=0.5))
    assert got == restated(st["n"], st["sums"], st["sumsq"], st["ge1"], np.ones(90, bool), {**TH, "p_th": 0.5})
    assert ranges
    assert max(len(r) for r in ranges) > 1  # a chunk went through in several parts
