"""Compiled (numba) kernels of the all-pairs DE engine.

For a chunk of cluster pairs, :func:`scan` computes each pair's test statistic for every gene
(fused, in parallel over pairs) and keeps only the genes whose p-value can be below ``padj_th``
and that Holm's adjustment can still select given how many genes are that low (a cut found from
counts at a ladder of candidate counts) — every gene Holm can select, and every gene ranked
before one — with the number ``m`` of genes whose p-value is defined (Holm's count);
:func:`tighten` cuts them down further, to a fixed point. :func:`select` then ranks a
pair's candidates by p, adjusts them, applies scrattch.bigcat's ``de_stats_pair`` rules and
keeps the scores and the top genes of each direction. Exact p-values are computed in between,
for the candidates only (:mod:`bigcat.de.engine`).

Methods: ``FAST_LIMMA`` (moderated t with a pooled variance, one df for every gene), ``T_TEST``
(Welch), ``CHISQ`` (Yates-corrected 2×2 test of the presence counts), ``MMC_WELCH``
(cell_type_mapper's Welch test for MapMyCells' reference markers, :mod:`bigcat.mapmycells`).
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = [
    "CHISQ", "FAST_LIMMA", "MMC_WELCH", "T_TEST", "chisq_pvalues", "count_above", "keep_above", "mmc_nu",
    "scan", "scan_welch", "select", "table_pvalues", "tighten",
]  # fmt: skip

FAST_LIMMA, T_TEST, CHISQ, MMC_WELCH = 0, 1, 2, 3
#: a gene's score is min(-log10 padj, SCORE_CAP)
SCORE_CAP = 20.0


@numba.njit(cache=True, inline="always", error_model="numpy")
def mmc_nu(v1, v2, n1, n2, se2):
    """cell_type_mapper's Welch–Satterthwaite ν: se2² / (v1²/(n1³ − n1²) + v2²/(n2³ − n2²)), the
    cell counts cubed in integers, a denominator ≤ 0 (or NaN) replaced by 1."""
    i1, i2 = np.int64(n1), np.int64(n2)
    denom = v1 * v1 / float(i1 * i1 * i1 - i1 * i1) + v2 * v2 / float(i2 * i2 * i2 - i2 * i2)
    if not denom > 0:
        denom = 1.0
    return se2 * se2 / denom


@numba.njit(cache=True, inline="always", error_model="numpy")
def _statistic(method, a, b, g, means, spread, counts, n1, n2, scale):
    """(statistic, df, defined) of gene ``g`` for pair (a, b): |t| and its df, or the χ² value."""
    if method == CHISQ:
        x, y = float(counts[a, g]), float(counts[b, g])
        total = n1 + n2
        present, absent = x + y, total - x - y
        stat = 0.0
        for o, e in (
            (x, present * n1 / total),
            (n1 - x, absent * n1 / total),
            (y, present * n2 / total),
            (n2 - y, absent * n2 / total),
        ):
            d = max(0.0, abs(o - e) - 0.5)
            stat += d * d / e
        return stat, 1.0, True  # R sets an undefined χ² p-value to 1: it still counts
    lfc = means[a, g] - means[b, g]
    if method == FAST_LIMMA:
        t = abs(lfc) * spread[0, g] / scale  # spread holds 1 / posterior sd; scale sqrt(1/n1 + 1/n2)
        return t, 0.0, not math.isnan(t)
    v1, v2 = spread[a, g] / n1, spread[b, g] / n2
    se2 = v1 + v2
    t = abs(lfc) / math.sqrt(se2)
    df = se2 * se2 / (v1 * v1 / (n1 - 1) + v2 * v2 / (n2 - 1))
    return t, df, not (math.isnan(t) or math.isnan(df))


#: genes per block of the scan: a block's statistics are computed in one simple loop (which
#: the compiler can vectorize), and its candidates gathered only when there is one
BLOCK = 512


#: pairs per task of the scan's parallel loop (a task holds one statistic per gene)
PAIRS_PER_TASK = 16
#: the candidate counts C at which the scan tries Holm's cut (see :func:`_holm_cut`)
LADDER = (63, 255, 1023, 4095, 16383, 65535, 262143)


@numba.njit(parallel=True, cache=True, error_model="numpy")
def scan(method, means, spread, counts, n_cells, p1, p2, crit, holm, genes, stats, dfs, found, m_out):
    """One pass per pair: the candidates (statistic > ``crit[k]`` and, with a ``holm`` table, above
    the cut :func:`_holm_cut` finds) into row ``k`` of ``genes``, ``stats`` and ``dfs`` (at most
    their width; ``found[k]`` counts them all, so a pair with more must be scanned again, wider),
    and ``m_out[k]``, the genes with a defined p."""
    n_genes = means.shape[1]
    n_tasks = (len(p1) + PAIRS_PER_TASK - 1) // PAIRS_PER_TASK
    rungs = 0  # the rungs below n_genes
    if len(holm):
        for c in LADDER:
            rungs += c < n_genes
    ladder = np.array(LADDER)[:rungs]
    edges = np.empty(rungs)  # Holm's cut at each rung, for m = n_genes (falling from rung to rung)
    for level in range(rungs):
        edges[level] = holm[n_genes - ladder[level]]
    for task in numba.prange(n_tasks):
        _scan_task(method, means, spread, counts, n_cells, p1, p2, crit, holm, genes, stats, dfs, found, m_out,
                   ladder, edges, task * PAIRS_PER_TASK, min((task + 1) * PAIRS_PER_TASK, len(p1)))  # fmt: skip


@numba.njit(cache=True, error_model="numpy")
def _scan_task(method, means, spread, counts, n_cells, p1, p2, crit, holm, genes, stats, dfs, found, m_out, ladder,
               edges, first, last):  # fmt: skip
    """:func:`scan` for pairs first … last − 1, with their own scratch (kept out of the parallel
    loop's body, where numba's parfor passes mishandled it)."""
    n_genes = means.shape[1]
    values = np.empty(n_genes)
    values_df = np.empty(n_genes if method == T_TEST else 1)
    above = np.zeros(len(ladder), dtype=np.int64)
    for k in range(first, last):
        above[:] = 0
        m = _pair_statistics(method, p1[k], p2[k], means, spread, counts, n_cells, values, values_df, edges, above)
        bound = crit[k]
        if len(holm):
            if m != n_genes:  # genes without a p-value: the rungs move, counted again
                _count_above(values, holm, m, ladder, above)
            bound = max(bound, _holm_cut(holm, m, ladder, above))
        found[k] = _gather(values, values_df, bound, genes[k], stats[k], dfs[k], method == T_TEST)
        m_out[k] = m


@numba.njit(cache=True, error_model="numpy")
def _pair_statistics(method, a, b, means, spread, counts, n_cells, values, values_df, edges, above):
    """Every gene's statistic for pair (a, b) into ``values`` (NaN where undefined), Welch's df
    into ``values_df``, how many exceed each of ``edges`` into ``above``; returns m, the genes
    with a defined p. (``MMC_WELCH`` has its own scan, :func:`scan_welch`.)"""
    n_genes = means.shape[1]
    n1, n2 = float(n_cells[a]), float(n_cells[b])
    scale = math.sqrt(1.0 / n1 + 1.0 / n2)
    m = 0
    for g0 in range(0, n_genes, BLOCK):
        g1 = min(g0 + BLOCK, n_genes)
        block = values[g0:g1]
        if method == FAST_LIMMA:
            row_a, row_b, weight = means[a, g0:g1], means[b, g0:g1], spread[0, g0:g1]
            for i in range(g1 - g0):  # arithmetic alone: vectorized
                block[i] = abs(row_a[i] - row_b[i]) * weight[i] / scale
            for i in range(g1 - g0):
                m += block[i] == block[i]  # not NaN, in a form the compiler vectorizes
        else:
            for g in range(g0, g1):
                stat, df, defined = _statistic(method, a, b, g, means, spread, counts, n1, n2, scale)
                values[g] = stat if defined else np.nan
                if method == T_TEST:
                    values_df[g] = df
                m += defined
        # the rungs' counts: one comparison for most genes (those below the lowest rung)
        lowest = edges[-1] if len(edges) else np.inf
        for i in range(g1 - g0):
            v = block[i]
            if v > lowest:
                for level in range(len(edges)):
                    above[level] += v > edges[level]
    return m


#: ``scan_welch``'s ν for a candidate whose p is certainly below p_th/m, and the spacing in log ν
#: of its table of safe |t| (``bigcat.mapmycells._kernels.safe_table``)
SURE = -np.inf
SAFE_STEP = 0.01
#: the float32 pre-filter of :func:`scan_welch`: |diff| may be off by this much relative to
#: |mean₁| + |mean₂| (two roundings to float32 and a subtraction, with room), and the bound is
#: loosened by ``PREFILTER_SLACK`` for the float32 products
PREFILTER_REL = 4.0 * 2.0**-24
PREFILTER_SLACK = 1.0e-5


@numba.njit(parallel=True, cache=True, error_model="numpy")
def scan_welch(means, var, n_cells, safe, means32, spread32, p1, p2, crit, holm, genes, stats, dfs, found,
               m_out):  # fmt: skip
    """:func:`scan` for ``MMC_WELCH`` (``spread32``: var / n in float32; in float64 var / n is
    computed where needed, as cell_type_mapper divides, so no float64 copy is held), in two steps per pair: a float32
    pass over every gene (half the bytes of float64, twice the vector width) keeps the genes whose
    |t| may exceed the lowest bound — a superset, its margins covering float32's rounding — and
    only those are tested in float64, exactly as before: the same counts at the rungs, the same
    Holm cut, the same candidates and |t|.

    Each row is then cut as :func:`tighten` cuts it (a row that overflows is left for a wider
    scan). A candidate's ``stats`` is its t signed as mean₁ − mean₂ (−|t| where that is ≤ 0), its
    ``dfs`` Welch's ν (:func:`mmc_nu`) — or ``SURE`` when its p is certainly below p_th/m: ν ≥ 1
    and |t| above ``safe`` at ν (``safe[i]`` holds for ν ≥ exp(i·SAFE_STEP)). Both are computed
    here, while the pair's rows are in cache."""
    n_genes = means.shape[1]
    n_tasks = (len(p1) + PAIRS_PER_TASK - 1) // PAIRS_PER_TASK
    rungs = 0
    if len(holm):
        for c in LADDER:
            rungs += c < n_genes
    ladder = np.array(LADDER)[:rungs]
    edges = np.empty(rungs)
    for level in range(rungs):
        edges[level] = holm[n_genes - ladder[level]]
    for task in numba.prange(n_tasks):
        first, last = task * PAIRS_PER_TASK, min((task + 1) * PAIRS_PER_TASK, len(p1))
        _scan_welch_task(means, var, n_cells, safe, means32, spread32, p1, p2, crit, holm, genes, stats, dfs, found,
                         m_out, ladder, edges, first, last)  # fmt: skip


@numba.njit(cache=True, error_model="numpy")
def _scan_welch_task(means, var, n_cells, safe, means32, spread32, p1, p2, crit, holm, genes, stats, dfs, found,
                     m_out, ladder, edges, first, last):  # fmt: skip
    n_genes = means.shape[1]
    hits = np.empty(n_genes, dtype=np.int64)
    diff2, se2 = np.empty(n_genes), np.empty(n_genes)
    flags = np.zeros((n_genes + 7) // 8 * 8, dtype=np.uint8)
    above = np.zeros(len(ladder), dtype=np.int64)
    rel = np.float32(PREFILTER_REL)
    lowest_edge = edges[-1] if len(edges) else np.inf
    for k in range(first, last):
        a, b = p1[k], p2[k]
        n1, n2 = float(n_cells[a]), float(n_cells[b])
        # the rungs count genes above the lowest edge, and a cut found there is above it: the
        # pre-filter keeps only those (a quarter of the genes above crit, typically)
        lowest = lowest_edge if len(edges) else crit[k]
        n_hits = _welch_hits(means32[a], means32[b], spread32[a], spread32[b], rel,
                             np.float32(lowest * lowest * (1.0 - PREFILTER_SLACK)), hits, flags)  # fmt: skip
        # the hits in float64, as the one-pass scan computed every gene: diff², se², the rungs
        above[:] = 0
        lowest2 = lowest_edge * lowest_edge * (1.0 - 1.0e-12)
        _welch_exact(means, var, a, b, n1, n2, hits, n_hits, diff2, se2)
        for j in range(n_hits):
            d2, s2 = diff2[j], se2[j]
            # "not ≤": NaN counts (a conservative count); se² ≤ 0 gives t = |diff|/1e-10
            if not d2 <= lowest2 * s2:
                for level in range(len(edges)):
                    above[level] += not d2 <= edges[level] * edges[level] * (1.0 - 1.0e-12) * s2
        bound = crit[k]
        if len(holm):
            bound = max(bound, _holm_cut(holm, n_genes, ladder, above))
        if bound < lowest:  # no rung held (most genes are that far apart): filtered again at the bound
            n_hits = _welch_hits(means32[a], means32[b], spread32[a], spread32[b], rel,
                                 np.float32(bound * bound * (1.0 - PREFILTER_SLACK)), hits, flags)  # fmt: skip
            _welch_exact(means, var, a, b, n1, n2, hits, n_hits, diff2, se2)
        loose = bound * bound * (1.0 - 1.0e-12)
        row_genes, row_stats, row_dfs = genes[k], stats[k], dfs[k]
        cap = len(row_genes)
        count = 0
        for j in range(n_hits):
            if diff2[j] <= loose * se2[j]:
                continue
            g = hits[j]
            se = math.sqrt(se2[j])  # NaN below 0, as NumPy's sqrt
            diff = means[a, g] - means[b, g]
            t = abs(diff) / (se if se > 0 else 1.0e-10)
            if t > bound:
                if count < cap:
                    nu = mmc_nu(var[a, g], var[b, g], n1, n2, se2[j])
                    sure = nu >= 1.0 and t > safe[min(int(math.log(nu) / SAFE_STEP), len(safe) - 1)]
                    row_genes[count] = g
                    row_stats[count] = -t if diff <= 0 else t
                    row_dfs[count] = SURE if sure else nu
                count += 1
        if count <= cap and len(holm):  # cut down to those Holm can still select (:func:`tighten`)
            count = _tighten_row(row_genes, row_stats, row_dfs, count, n_genes, holm)
        found[k] = count
        m_out[k] = n_genes  # p is defined for every gene (NaN counts as 1)


@numba.njit(cache=True, inline="always", error_model="numpy")
def _welch_exact(means, var, a, b, n1, n2, hits, n_hits, diff2, se2):
    """diff² and se² = var₁/n₁ + var₂/n₂ in float64 for the hits."""
    for j in range(n_hits):
        g = hits[j]
        diff = means[a, g] - means[b, g]
        diff2[j] = diff * diff
        se2[j] = var[a, g] / n1 + var[b, g] / n2


@numba.njit(cache=True, error_model="numpy")
def _welch_hits(mean_a, mean_b, spread_a, spread_b, rel, lowest2, hits, flags):
    """The genes whose |t| may exceed √``lowest2`` (float32 rows; NaN counts), into ``hits``:
    (|d| + rel·(|m₁| + |m₂|))² against lowest2·se². One loop over the whole row the compiler
    vectorizes writes a byte per gene (``flags``: a multiple of 8 long, zero past the genes);
    the rare hits are then found eight bytes at a time. (A branch per gene, or the same loop
    block by block, ran 3–4× slower.)"""
    for i in range(len(mean_a)):
        x, y = mean_a[i], mean_b[i]
        d = abs(x - y) + rel * (abs(x) + abs(y))
        flags[i] = not (d * d - lowest2 * (spread_a[i] + spread_b[i]) <= 0)
    words = flags.view(np.uint64)
    count = 0
    for w in range(len(words)):
        if words[w] != 0:
            for i in range(8 * w, 8 * w + 8):
                if flags[i]:
                    hits[count] = i
                    count += 1
    return count


@numba.njit(cache=True)
def _count_above(values, holm, m, ladder, above):
    """``above[level]``: the statistics above Holm's cut at each rung, for this m."""
    for level in range(len(ladder)):
        edge = holm[m - ladder[level]] if ladder[level] < m else np.inf
        n = 0
        for v in values:
            n += v > edge
        above[level] = n


@numba.njit(cache=True)
def _holm_cut(holm, m, ladder, above):
    """A statistic every gene Holm can select exceeds, from the counts at the rungs C of ``ladder``.

    Holm selects the first R genes by p only if the (C+1)-th has p < padj_th/(m − C) for every
    C < R; so if at most C genes have p below padj_th/(m − C) (``above`` at the rung), R ≤ C
    and every selected gene has p < padj_th/(m − C + 1): its statistic exceeds
    ``holm[m − C + 1]``. The first rung that holds gives the cut (0: none holds).
    """
    for level in range(len(ladder)):
        c = ladder[level]
        if c >= m:
            break
        if above[level] <= c:
            return holm[m - c + 1]
    return 0.0


@numba.njit(cache=True)
def _gather(values, values_df, bound, genes, stats, dfs, with_df):
    """The genes whose statistic exceeds ``bound``, in gene order, into the row (at most its
    width); returns how many there are."""
    cap = len(genes)
    count = 0
    for g in range(len(values)):
        if values[g] > bound:
            if count < cap:
                genes[count] = g
                stats[count] = values[g]
                dfs[count] = values_df[g] if with_df else 0.0
            count += 1
    return count


@numba.njit(parallel=True, cache=True, error_model="numpy")
def tighten(genes, stats, dfs, found, m_of, bound):
    """Each row's candidates cut down, in place and in gene order, to those whose statistic
    exceeds ``bound[m - C + 1]`` in absolute value (a marker run's are signed), C the count still
    kept (repeated until C holds still: it only shrinks). ``found`` is updated. For methods with
    one df for every gene."""
    for k in numba.prange(len(found)):
        found[k] = _tighten_row(genes[k], stats[k], dfs[k], found[k], m_of[k], bound)


@numba.njit(cache=True, error_model="numpy")
def _tighten_row(genes, stats, dfs, found, m, bound):
    """:func:`tighten` for one row of ``found`` candidates; returns how many are kept."""
    count = found
    while True:
        limit = bound[min(max(m - count + 1, 1), len(bound) - 1)]
        fewer = 0
        for i in range(found):
            fewer += abs(stats[i]) > limit
        if fewer == count:
            break
        count = fewer
    _keep(genes, stats, dfs, found, limit)
    return count


@numba.njit(cache=True, inline="always")
def _keep(genes, stats, dfs, count, limit):
    at = 0
    for i in range(count):
        if abs(stats[i]) > limit:
            genes[at], stats[at], dfs[at] = genes[i], stats[i], dfs[i]
            at += 1
    return at


@numba.njit(parallel=True, cache=True, error_model="numpy")
def count_above(stats, found, bounds):
    """Per row, how many of its ``found[k]`` candidates exceed ``bounds[k]``."""
    out = np.zeros(len(found), dtype=np.int64)
    for k in numba.prange(len(found)):
        for i in range(found[k]):
            out[k] += stats[k, i] > bounds[k]
    return out


@numba.njit(parallel=True, cache=True, error_model="numpy")
def keep_above(genes, stats, dfs, found, bounds):
    """Each row's candidates above ``bounds[k]``, in place and in gene order; ``found`` updated."""
    for k in numba.prange(len(found)):
        found[k] = _keep(genes[k], stats[k], dfs[k], found[k], bounds[k])


@numba.njit(cache=True, error_model="numpy")
def table_p(stat, step, logp, slope):
    """p at ``stat`` from a table of log p on u = log1p(stat), every ``step``, with slopes d(log p)/du
    (cubic Hermite); -1 beyond the table (the caller computes those exactly)."""
    if math.isnan(stat):
        return np.nan
    x = math.log1p(stat) / step
    i = int(x)
    if i >= len(logp) - 1:
        return -1.0
    s = x - i
    s2, s3 = s * s, s * s * s
    value = (
        (2 * s3 - 3 * s2 + 1) * logp[i]
        + (s3 - 2 * s2 + s) * step * slope[i]
        + (-2 * s3 + 3 * s2) * logp[i + 1]
        + (s3 - s2) * step * slope[i + 1]
    )
    return math.exp(value)


@numba.njit(parallel=True, cache=True, error_model="numpy")
def table_pvalues(stats, found, step, logp, slope, out):
    """:func:`table_p` for the ``found[k]`` candidates of each row ``k`` (in parallel)."""
    for k in numba.prange(len(found)):
        for i in range(found[k]):
            out[k, i] = table_p(stats[k, i], step, logp, slope)


@numba.njit(parallel=True, cache=True, error_model="numpy")
def chisq_pvalues(stats, found, out):
    """P(χ²₁ > x) = erfc(√(x/2)) for the candidates of each row; R's undefined statistic gives 1."""
    for k in numba.prange(len(found)):
        for i in range(found[k]):
            x = stats[k, i]
            out[k, i] = 1.0 if math.isnan(x) else math.erfc(math.sqrt(x / 2.0))


@numba.njit(cache=True)
def _rank(p, stat, lfc, monotone):
    """(Holm's order: by p, ties in gene order; de_stats_pair's order: by p, then larger |lfc|).
    With ``monotone`` (p falls as the statistic grows: one df for every gene) one sort of the
    statistic gives both, ties of p resolved run by run."""
    n = len(p)
    if not monotone:
        holm_order = np.argsort(p, kind="mergesort")
        report = np.argsort(-np.abs(lfc), kind="mergesort")
        return holm_order, report[np.argsort(p[report], kind="mergesort")]
    holm_order = np.argsort(-stat)  # equal statistics give equal p: their runs are put in gene order below
    report = holm_order.copy()
    i = 0
    while i < n:
        j = i + 1
        while j < n and p[holm_order[j]] == p[holm_order[i]]:
            j += 1
        if j - i > 1:  # a run of equal p (p underflowed to 0, or equal statistics): gene order, then |lfc|
            run = np.sort(holm_order[i:j])
            holm_order[i:j] = run
            report[i:j] = run[np.argsort(-np.abs(lfc[run]), kind="mergesort")]
        i = j
    return holm_order, report


@numba.njit(parallel=True, cache=True, error_model="numpy")
def select(
    found,
    genes,
    stats,
    pvals,
    monotone,
    m_of,
    p1,
    p2,
    means,
    present_counts,
    n_cells,
    padj_th,
    lfc_th,
    q1_th,
    q2_th,
    q_diff_th,
    min_cells,
    top,
    summary,
    top_genes,
    top_padj,
    top_pval,
):
    """Per pair ``k`` (its ``found[k]`` candidates in row ``k`` of ``genes``, ``stats`` and
    ``pvals``): Holm over the candidates ranked by p (ties in gene order), the genes passing
    ``de_stats_pair``'s rules, scores (``summary[k]``: score, up_score, down_score, num, up_num,
    down_num) and the first ``top`` up and down genes by (p, -|lfc|) with their padj and p
    (``top_genes[k, 0|1, r]``, -1 where fewer). ``q2_th < 0`` means no q2 test."""
    for k in numba.prange(len(p1)):
        count = found[k]
        a, b = p1[k], p2[k]
        n1, n2 = float(n_cells[a]), float(n_cells[b])
        m = m_of[k]
        gene = genes[k, :count]
        p = pvals[k, :count]
        lfc = np.empty(count)
        for j in range(count):
            lfc[j] = means[a, gene[j]] - means[b, gene[j]]
        order, report = _rank(p, stats[k, :count], lfc, monotone)
        padj = np.empty(count)
        running = 0.0
        for i in range(count):
            j = order[i]
            running = max(running, (m - i) * p[j])
            padj[j] = min(running, 1.0)
        up_score = down_score = 0.0
        up_num = down_num = 0
        for j in report:
            if not (padj[j] < padj_th and abs(lfc[j]) > lfc_th):
                continue
            g = gene[j]
            q1, q2 = present_counts[a, g] / n1, present_counts[b, g] / n2
            q_max = max(q1, q2)
            q_diff = abs(q1 - q2) / q_max if q_max > 0 else 0.0
            if math.isnan(q_diff):
                q_diff = 0.0
            if lfc[j] > 0:
                ok = q1 > q1_th and q1 * n1 >= min_cells and (q2_th < 0 or q2 < q2_th) and q_diff > q_diff_th
                side = 0
            else:
                ok = q2 > q1_th and q2 * n2 >= min_cells and (q2_th < 0 or q1 < q2_th) and q_diff > q_diff_th
                side = 1
            if not ok:
                continue
            score = SCORE_CAP if padj[j] <= 0 else min(-math.log10(padj[j]), SCORE_CAP)
            rank = up_num if side == 0 else down_num
            if rank < top:
                top_genes[k, side, rank] = g
                top_padj[k, side, rank] = padj[j]
                top_pval[k, side, rank] = p[j]
            if side == 0:
                up_score += score
                up_num += 1
            else:
                down_score += score
                down_num += 1
        summary[k, 0] = up_score + down_score
        summary[k, 1] = up_score
        summary[k, 2] = down_score
        summary[k, 3] = up_num + down_num
        summary[k, 4] = up_num
        summary[k, 5] = down_num
