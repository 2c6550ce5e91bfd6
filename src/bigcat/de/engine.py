"""The all-pairs DE engine: chunks of pairs through the compiled kernels, exact p-values for the
candidate genes only, results as tables chunk by chunk (bounded memory)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import special

from bigcat.de import kernels
from bigcat.de.inputs import DEInput
from bigcat.de.limma import Squeezed, squeeze_var

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["METHODS", "MarkerRun", "Thresholds", "prepare", "run_chunks"]

log = logging.getLogger("bigcat")

METHODS = {"fast_limma": kernels.FAST_LIMMA, "t.test": kernels.T_TEST, "chisq": kernels.CHISQ}
#: pairs per chunk: the unit of the tables written, and of the parallel scan
PAIRS_PER_CHUNK = 4096
#: candidate genes held at once (per chunk of pairs): bounds the engine's memory
CANDIDATE_BUDGET = 8_000_000
#: candidates a pair's row holds at least (pairs with more are scanned again, wider)
MIN_ROW = 64
#: above this many degrees of freedom R's ``pt`` uses a normal approximation (nmath/pt.c)
R_PT_NORMAL_DF = 4e5
#: spacing of the p-value table in u = log1p(|t|), and how far it reaches
TABLE_STEP = 2e-4
TABLE_T_MAX = 1e6
#: a variance within this fraction of the mean square is rounding, i.e. 0
ZERO_VARIANCE = 1e-13
#: the bound on a statistic below which p ≥ padj_th is loosened by this much, so rounding in
#: the bound can only let a gene more through (whose exact p then decides)
SLACK = 1e-9


@dataclass(frozen=True)
class Thresholds:
    """scrattch.bigcat's ``de_param`` for one run (``q2_th=None``: no q2 test)."""

    padj_th: float = 0.01
    lfc_th: float = 1.0
    q1_th: float = 0.5
    q2_th: float | None = None
    q_diff_th: float = 0.7
    min_cells: int = 4


@dataclass
class Prepared:
    """What every chunk needs: the method's arrays and, for fast_limma, the moderated variances."""

    method: int
    spread: np.ndarray
    counts: np.ndarray
    df: float  # fast_limma's residual degrees of freedom (N - K)
    squeezed: Squeezed | None
    table: PTable | None = None
    holm: np.ndarray | None = None  # holm_bounds, made by the first chunk
    narrow: tuple[np.ndarray, np.ndarray] | None = None  # MMC_WELCH: means and spread in float32
    safe: np.ndarray | None = None  # MMC_WELCH: |t| certainly below p_th/m, by log ν


def prepare(data: DEInput, method: str, p1: np.ndarray, p2: np.ndarray) -> Prepared:
    """The per-method arrays: fast_limma's pooled variance over the clusters taking part (those
    in some pair), moderated once; Welch's per-cluster variances; χ²'s presence counts."""
    code = METHODS[method]
    empty = np.zeros((1, 1))
    if code == kernels.CHISQ:
        return Prepared(code, empty, data.present_counts, 0.0, None)
    assert data.sqr_means is not None
    n = data.n_cells.astype(np.float64)[:, None]
    if code == kernels.T_TEST:
        with np.errstate(invalid="ignore", divide="ignore"):
            var = (data.sqr_means - data.means**2) * n / (n - 1)
        # a constant gene's variance comes out as ±1e-17 from rounding: below what float64 can
        # tell from 0 it is 0 (else Welch's p was undefined or not by the accident of rounding)
        var[np.abs(var) <= ZERO_VARIANCE * np.abs(data.sqr_means)] = 0.0
        np.maximum(var, 0.0, out=var)
        return Prepared(code, var, empty, 0.0, None)
    rows = np.unique(np.concatenate([p1, p2]))
    n_total, k = float(data.n_cells[rows].sum()), len(rows)
    df = n_total - k
    if df <= 0:
        msg = f"{data.source}: fast_limma needs more cells than clusters in the pairs (N - K = {df:g})"
        raise ValueError(msg)
    sigma2 = np.zeros(data.means.shape[1])
    for r in rows:  # Σ n_k (sqr_mean_k - mean_k²), cluster by cluster (no clusters × genes temporary)
        sigma2 += n[r, 0] * (data.sqr_means[r] - data.means[r] ** 2)
    sigma2 /= df
    squeezed = squeeze_var(sigma2, df)
    with np.errstate(divide="ignore"):
        inv_sd = (1.0 / np.sqrt(squeezed.var_post))[None, :]
    return Prepared(code, inv_sd, empty, df, squeezed, p_table(df))


def _bounds(prepared: Prepared, data: DEInput, p1: np.ndarray, p2: np.ndarray, padj_th: float) -> np.ndarray:
    """Per pair, the statistic a gene must exceed for p < padj_th (loosened by SLACK)."""
    if prepared.method == kernels.CHISQ:
        bound = special.chdtri(1, padj_th)
        return np.full(len(p1), bound * (1 - SLACK))
    if prepared.method == kernels.FAST_LIMMA:
        return np.full(len(p1), t_bound(prepared.df, padj_th) * (1 - SLACK))
    return -special.stdtrit(_welch_df_max(data, p1, p2), padj_th / 2) * (1 - SLACK)


def _welch_df_max(data: DEInput, p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    """Welch's df is at most n1 + n2 - 2, and p grows as df shrinks: the bound at that df is the lowest."""
    return (data.n_cells[p1] + data.n_cells[p2] - 2).astype(np.float64)


def holm_bounds(prepared: Prepared, n_genes: int, padj_th: float) -> np.ndarray:
    """``bound[j]``: the statistic a gene must exceed for p < padj_th / j (j = 1 … n_genes; one
    df for every gene), loosened by SLACK.

    Holm selects a prefix of the genes ordered by p, and the i-th of them (from 1) has
    (m − i + 1)·p < padj_th; so if C genes can be selected at most, a selected gene has
    p < padj_th / (m − C + 1). Starting from the genes with p < padj_th, this bound shrinks the
    candidates (to a tenth, at 5,000 clusters) before any p-value is computed.
    """
    j = np.arange(1, n_genes + 1, dtype=np.float64)
    bound = np.empty(n_genes + 1)
    bound[0] = np.inf
    if prepared.method == kernels.CHISQ:
        bound[1:] = special.chdtri(1, padj_th / j)
    else:
        bound[1:] = t_bound(prepared.df, padj_th / j)
    return bound * (1 - SLACK)


def t_bound(df: float, p: Any) -> Any:
    """The |t| at which :func:`t_tail` equals ``p``: its inverse, R's normal approximation included."""
    p = np.asarray(p, dtype=np.float64)
    if df > R_PT_NORMAL_DF:  # solve z = t (1 - v) / sqrt(1 + 2 v t²) for t
        v = 1.0 / (4.0 * df)
        z = -special.ndtri(p / 2)
        return z / np.sqrt((1.0 - v) ** 2 - 2.0 * v * z * z)
    return -special.stdtrit(df, p / 2)


def _tighten(prepared: Prepared, data: DEInput, c1: np.ndarray, c2: np.ndarray, rows: Any, found: np.ndarray,
             m: np.ndarray, padj_th: float) -> None:  # fmt: skip
    """Each row's candidates cut down to those Holm can still select, in place (see :func:`holm_bounds`)."""
    if prepared.method != kernels.T_TEST:
        assert prepared.holm is not None
        kernels.tighten(rows.genes, rows.stats, rows.dfs, found, m, prepared.holm)
        return
    # Welch: one df per gene; the bound at the pair's largest df is below every gene's
    df_max = _welch_df_max(data, c1, c2)
    count = found.copy()
    while True:
        j = np.maximum(m - count + 1, 1).astype(np.float64)
        bounds = -special.stdtrit(df_max, padj_th / (2 * j)) * (1 - SLACK)
        fewer = kernels.count_above(rows.stats, found, bounds)
        if np.array_equal(fewer, count):
            break
        count = fewer
    kernels.keep_above(rows.genes, rows.stats, rows.dfs, found, bounds)


def _p_values(prepared: Prepared, rows: Any, found: np.ndarray) -> None:
    """Exact p-values of each row's ``found`` candidates into ``rows.pvals``: a table for
    fast_limma's single df (exact beyond it), erfc for χ² with 1 df, scipy for Welch's df."""
    if prepared.method == kernels.CHISQ:
        kernels.chisq_pvalues(rows.stats, found, rows.pvals)
        return
    width = int(found.max(initial=0))  # the columns in use: the masks below stay small
    out, stats = rows.pvals[:, :width], rows.stats[:, :width]
    valid = np.arange(width)[None, :] < found[:, None]
    if prepared.method == kernels.T_TEST:
        out[valid] = 2 * special.stdtr(rows.dfs[:, :width][valid], -stats[valid])
        return
    table = prepared.table
    assert table is not None
    kernels.table_pvalues(rows.stats, found, table.step, table.logp, table.slope, rows.pvals)
    beyond = valid & (out < 0)
    if beyond.any():
        out[beyond] = t_tail(prepared.df, stats[beyond])


def t_tail(df: float, t: np.ndarray) -> np.ndarray:
    """2 P(T > |t|) as R's ``pt`` computes it: for df > 4e5 R uses a normal approximation
    (``pnorm(t (1 - 1/(4 df)) / sqrt(1 + t² / (2 df)))``), which is followed here."""
    t = np.abs(np.asarray(t, dtype=np.float64))
    if df > R_PT_NORMAL_DF:
        v = 1.0 / (4.0 * df)
        return 2 * special.ndtr(-t * (1.0 - v) / np.sqrt(1.0 + t * t * 2.0 * v))
    return 2 * special.stdtr(df, -t)


@dataclass(frozen=True)
class PTable:
    """log p of the two-sided t-test on u = log1p(|t|), every ``step``, with its slope in u."""

    step: float
    logp: np.ndarray
    slope: np.ndarray


def p_table(df: float, step: float = TABLE_STEP, t_max: float = TABLE_T_MAX) -> PTable:
    """The table :func:`bigcat.de.kernels.table_p` interpolates, up to where p underflows (or t_max)."""
    from scipy import stats as scipy_stats

    u = np.arange(0.0, np.log1p(t_max) + step, step)
    t = np.expm1(u)
    p = t_tail(df, t)
    end = int(np.argmax(p <= 0)) if (p <= 0).any() else len(p)
    t, p = t[:end], p[:end]
    with np.errstate(divide="ignore"):
        logp = np.log(p)
    if df > R_PT_NORMAL_DF:  # the slope of R's approximation, by the chain rule
        v = 1.0 / (4.0 * df)
        root = np.sqrt(1.0 + 2.0 * v * t * t)
        z = t * (1.0 - v) / root
        dz = (1.0 - v) / root**3
        log_density = scipy_stats.norm.logpdf(z) + np.log(dz)
    else:
        log_density = scipy_stats.t.logpdf(t, df)
    slope = -np.exp(np.log(2.0) + log_density - logp) * (1.0 + t)  # d log p / du
    return PTable(step, logp, slope)


def run_chunks(
    data: DEInput, prepared: Prepared, p1: np.ndarray, p2: np.ndarray, thresholds: Thresholds, *, top: int,
    pairs_per_chunk: int | None = None, progress: Callable[[int], Any] | None = None,
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:  # fmt: skip
    """``(pairs table, genes table)`` for consecutive chunks of the pairs, in order."""
    pairs_per_chunk = pairs_per_chunk or PAIRS_PER_CHUNK
    if prepared.method != kernels.T_TEST and prepared.holm is None:  # one df: the scan cuts by Holm
        prepared.holm = holm_bounds(prepared, data.means.shape[1], thresholds.padj_th)
    width = int(max(MIN_ROW, min(CANDIDATE_BUDGET // max(pairs_per_chunk, 1), data.means.shape[1])))
    # the candidates' rows, reused by every chunk: fresh arrays of this size cost page faults each time
    space = _Rows(min(pairs_per_chunk, len(p1)), width)
    for start in range(0, len(p1), pairs_per_chunk):
        c1, c2 = p1[start : start + pairs_per_chunk], p2[start : start + pairs_per_chunk]
        yield _chunk(data, prepared, c1, c2, thresholds, top, space)
        if progress is not None:
            progress(len(c1))


class _Rows:
    """Per pair, a row of at most ``width`` candidates: genes, statistics, dfs, p-values."""

    def __init__(self, n_pairs: int, width: int) -> None:
        self.width = width
        self.genes = np.empty((n_pairs, width), dtype=np.int32)
        self.stats = np.empty((n_pairs, width))
        self.dfs = np.empty((n_pairs, width))
        self.pvals = np.empty((n_pairs, width))

    def view(self, n: int) -> _Rows:
        rows = object.__new__(_Rows)
        rows.width = self.width
        rows.genes, rows.stats, rows.dfs, rows.pvals = self.genes[:n], self.stats[:n], self.dfs[:n], self.pvals[:n]
        return rows


def _chunk(
    data: DEInput, prepared: Prepared, c1: np.ndarray, c2: np.ndarray, th: Thresholds, top: int, space: _Rows
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One chunk: a scan keeping at most ``width`` candidates per pair (the pairs with more
    scanned again, wide enough), exact p-values for the candidates, selection."""
    crit = _bounds(prepared, data, c1, c2, th.padj_th)
    rows = space.view(len(c1))
    found, m = _scan(data, prepared, c1, c2, crit, rows)
    keep = max(top, 0)
    summary = np.zeros((len(c1), 6))
    top_genes = np.full((len(c1), 2, keep), -1, dtype=np.int64)
    top_padj, top_pval = np.zeros((len(c1), 2, keep)), np.zeros((len(c1), 2, keep))
    over = np.flatnonzero(found > rows.width)
    if len(over) == 0:
        _select(data, prepared, th, c1, c2, rows, found, m, keep, summary, top_genes, top_padj, top_pval)
    else:  # the pairs with more candidates than their row holds: scanned again, wide enough
        for part, again in ((np.flatnonzero(found <= rows.width), None), (over, int(found[over].max()))):
            if again is None:
                sub = _Rows(0, rows.width)
                sub.genes, sub.stats, sub.dfs, sub.pvals = (
                    rows.genes[part],
                    rows.stats[part],
                    rows.dfs[part],
                    rows.pvals[part],
                )
                found_p, m_p = found[part], m[part]
            else:
                sub = _Rows(len(part), again)
                found_p, m_p = _scan(data, prepared, c1[part], c2[part], crit[part], sub)
            out = (np.zeros((len(part), 6)), np.full((len(part), 2, keep), -1, dtype=np.int64),
                   np.zeros((len(part), 2, keep)), np.zeros((len(part), 2, keep)))  # fmt: skip
            _select(data, prepared, th, c1[part], c2[part], sub, found_p, m_p, keep, *out)
            summary[part], top_genes[part], top_padj[part], top_pval[part] = out
    return _pairs_table(data, c1, c2, summary), _genes_table(data, c1, c2, top_genes, top_padj, top_pval)


def _select(
    data: DEInput, prepared: Prepared, th: Thresholds, c1: np.ndarray, c2: np.ndarray, rows: _Rows,
    found: np.ndarray, m: np.ndarray, keep: int, summary: np.ndarray, top_genes: np.ndarray, top_padj: np.ndarray,
    top_pval: np.ndarray,
) -> None:  # fmt: skip
    _tighten(prepared, data, c1, c2, rows, found, m, th.padj_th)
    _p_values(prepared, rows, found)
    kernels.select(
        found, rows.genes, rows.stats, rows.pvals, prepared.method != kernels.T_TEST, m, c1, c2, data.means,
        data.present_counts, data.n_cells, th.padj_th, th.lfc_th, th.q1_th, -1.0 if th.q2_th is None else th.q2_th,
        th.q_diff_th, th.min_cells, keep, summary, top_genes, top_padj, top_pval,
    )  # fmt: skip


def _scan(
    data: DEInput, prepared: Prepared, c1: np.ndarray, c2: np.ndarray, crit: np.ndarray, rows: _Rows
) -> tuple[np.ndarray, np.ndarray]:
    """(found, m): each pair's candidates into its row (at most the row's width are kept)."""
    found = np.zeros(len(c1), dtype=np.int64)
    m = np.zeros(len(c1), dtype=np.int64)
    holm = prepared.holm if prepared.holm is not None else np.empty(0)
    if prepared.narrow is not None:
        assert prepared.safe is not None
        kernels.scan_welch(data.means, prepared.spread, data.n_cells, prepared.safe, *prepared.narrow, c1, c2, crit,
                           holm, rows.genes, rows.stats, rows.dfs, found, m)  # fmt: skip
        return found, m
    kernels.scan(prepared.method, data.means, prepared.spread, prepared.counts, data.n_cells, c1, c2, crit, holm,
                 rows.genes, rows.stats, rows.dfs, found, m)  # fmt: skip
    return found, m


def _pairs_table(data: DEInput, c1: np.ndarray, c2: np.ndarray, summary: np.ndarray) -> pd.DataFrame:
    import pandas as pd  # here: the marker runs need no tables

    names = np.asarray(data.clusters, dtype=object)
    return pd.DataFrame(
        {
            "P1": names[c1], "P2": names[c2], "n1": data.n_cells[c1], "n2": data.n_cells[c2],
            "score": summary[:, 0], "up_score": summary[:, 1], "down_score": summary[:, 2],
            "num": summary[:, 3].astype(np.int64), "up_num": summary[:, 4].astype(np.int64),
            "down_num": summary[:, 5].astype(np.int64),
        }
    )  # fmt: skip


def _genes_table(
    data: DEInput, c1: np.ndarray, c2: np.ndarray, top_genes: np.ndarray, top_padj: np.ndarray, top_pval: np.ndarray
) -> pd.DataFrame:
    import pandas as pd

    pair, side, rank = np.nonzero(top_genes >= 0)
    gene = top_genes[pair, side, rank]
    a, b = c1[pair], c2[pair]
    names = np.asarray(data.clusters, dtype=object)
    return pd.DataFrame(
        {
            "pair": names[a] + "_" + names[b], "P1": names[a], "P2": names[b],
            "gene": np.asarray(data.genes).astype(str).astype(object)[gene],
            "direction": np.where(side == 0, "up", "down"), "rank": rank + 1,
            "padj": top_padj[pair, side, rank], "pval": top_pval[pair, side, rank],
            "lfc": data.means[a, gene] - data.means[b, gene], "meanA": data.means[a, gene],
            "meanB": data.means[b, gene], "q1": data.present_counts[a, gene] / data.n_cells[a],
            "q2": data.present_counts[b, gene] / data.n_cells[b],
        }
    )  # fmt: skip


#: candidates a pair's row holds in a marker run (pairs with more are scanned again, wider:
#: ~3% at 1,000 leaves × 5,000 genes, ~6% at 5,000 × 32,285); rows of 2 KB touch half as many
#: fresh pages as rows of 4 KB, which costs more on this kind of VM than the rescans
MARKER_ROW = 256
#: pairs per chunk of a marker run
MARKER_PAIRS = 8192
#: leaves per side of a tile: a chunk's pairs run tile by tile, so the rows of 2 × TILE leaves
#: are reused from cache by every pair of the tile instead of one leaf's row per pair
TILE = 16


class MarkerRun:
    """The engine with MapMyCells' reference-marker test (cell_type_mapper's Welch statistic,
    ``kernels.MMC_WELCH``): the same Holm bound and candidate rows as pairwise DE, its own scan
    (:func:`bigcat.de.kernels.scan_welch`); the p-values and the selection are the caller's
    (:mod:`bigcat.mapmycells`).

    Candidates: |t| above ``boring`` (below it cell_type_mapper sets p = 1) and above the normal
    quantile of padj_th / (2j) — a t-test's p is never below the normal p at the same |t|, so
    the normal bound is below every gene's own; j as in :func:`holm_bounds`. ``safe``: the
    table of |t| certainly below p_th/m by log ν (:func:`bigcat.de.kernels.scan_welch`).
    """

    def __init__(self, data: Any, p_th: float, boring: float | None, safe: np.ndarray,
                 pairs_per_chunk: int | None = None) -> None:  # fmt: skip
        self.data = data
        n_genes = data.means.shape[1]
        # float32 means and var / n for the scan's pre-filter (half the size of a float64 array);
        # the scan's float64 arithmetic reads the variances themselves (spread)
        spread32 = np.empty(data.var.shape, dtype=np.float32)
        for lo in range(0, len(spread32), 256):  # block by block: no float64 temporary of the whole
            with np.errstate(divide="ignore", invalid="ignore"):
                spread32[lo : lo + 256] = data.var[lo : lo + 256] / data.n_cells[lo : lo + 256, None]
        narrow = (data.means.astype(np.float32), spread32)
        self.prepared = Prepared(kernels.MMC_WELCH, data.var, np.zeros((1, 1)), 0.0, None, narrow=narrow, safe=safe)
        j = np.arange(1, n_genes + 1, dtype=np.float64)
        bound = np.empty(n_genes + 1)
        bound[0] = np.inf
        bound[1:] = -special.ndtri(np.minimum(p_th / (2 * j), 0.5)) * (1 - SLACK)
        if boring is not None:
            np.maximum(bound, boring, out=bound)  # |t| must exceed boring itself: no slack there
        self.prepared.holm = bound
        self.width = int(min(MARKER_ROW, n_genes))
        self.pairs_per_chunk = pairs_per_chunk or MARKER_PAIRS

    def chunks(self, p1: np.ndarray, p2: np.ndarray, select: Callable[..., tuple]) -> Iterator[tuple]:
        """``select(c1, c2, rows, found, m)``'s result for consecutive chunks of pairs, in order.

        ``select`` returns arrays whose first axis is the pairs (2-D ones padded with -1 where
        parts differ in width). A chunk's pairs run tile by tile (:data:`TILE`) and its results
        are put back in pair order; the pairs with more candidates than a row holds are scanned
        again, in parts with rows wide enough."""
        data, prepared, step = self.data, self.prepared, self.pairs_per_chunk
        assert prepared.holm is not None
        space = _Rows(min(step, len(p1)), self.width)
        for start in range(0, len(p1), step):
            c1, c2 = p1[start : start + step], p2[start : start + step]
            order = np.lexsort((c2, c1, c2 // TILE, c1 // TILE))
            c1, c2 = c1[order], c2[order]
            crit = np.full(len(c1), prepared.holm[1])
            rows = space.view(len(c1))
            found, m = _scan(data, prepared, c1, c2, crit, rows)
            over = found > rows.width  # (the scan cut the others down to what Holm can select)
            if not over.any():
                yield _in_order([(order, select(c1, c2, rows, found, m))], len(c1))
                continue
            # the rows in place (copying them costs more than the work): the pairs that overflow
            # are selected with no candidates here, and replaced by their wider runs below
            wide = np.flatnonzero(over)
            wide_found = found[wide]
            found[wide] = 0
            parts = [(order, select(c1, c2, rows, found, m))]
            for lo, hi in _fitting_ranges(wide_found, CANDIDATE_BUDGET):
                pick = wide[lo:hi]
                sub = _Rows(len(pick), int(wide_found[lo:hi].max()))
                f, mm = _scan(data, prepared, c1[pick], c2[pick], crit[pick], sub)
                parts.append((order[pick], select(c1[pick], c2[pick], sub, f, mm)))
            yield _in_order(parts, len(c1))


def _in_order(parts: list[tuple[np.ndarray, tuple]], n: int) -> tuple:
    """The parts' results (``(positions, arrays by pair)``) as one tuple of arrays in pair order;
    a later part's pairs replace an earlier one's."""
    if len(parts) == 1:
        positions, result = parts[0]
        back = np.empty_like(positions)
        back[positions] = np.arange(n)
        return tuple(column[back] for column in result)
    out = []
    for i, first in enumerate(parts[0][1]):
        shape = (n,) if first.ndim == 1 else (n, max(part[1][i].shape[1] for part in parts))
        column = np.full(shape, -1, dtype=first.dtype)
        for positions, result in parts:
            values = result[i]
            if values.ndim == 1:
                column[positions] = values
            else:
                column[positions, : values.shape[1]] = values
        out.append(column)
    return tuple(out)


def _fitting_ranges(found: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive ranges of pairs whose rows (as wide as the range's largest count) fit ``budget``."""
    ranges, lo, widest = [], 0, 0
    for i, count in enumerate(found.tolist()):
        widest_with = max(widest, count)
        if i > lo and (i - lo + 1) * widest_with > budget:
            ranges.append((lo, i))
            lo, widest_with = i, count
        widest = widest_with
    ranges.append((lo, len(found)))
    return ranges
