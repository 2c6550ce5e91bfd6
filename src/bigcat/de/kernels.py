"""Compiled (numba) kernels of the all-pairs DE engine.

For a chunk of cluster pairs, :func:`candidates` computes each pair's test statistic for every
gene (fused, in parallel over pairs) and keeps only the genes whose p-value can be below
``padj_th`` — every gene Holm's adjustment can select, and every gene ranked before one — with
the number ``m`` of genes whose p-value is defined (Holm's count). :func:`select` then ranks a
pair's candidates by p, adjusts them, applies scrattch.bigcat's ``de_stats_pair`` rules and
keeps the scores and the top genes of each direction. Exact p-values are computed in between,
for the candidates only (:mod:`bigcat.de.engine`).

Methods: ``FAST_LIMMA`` (moderated t with a pooled variance, one df for every gene), ``T_TEST``
(Welch), ``CHISQ`` (Yates-corrected 2×2 test of the presence counts).
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["CHISQ", "FAST_LIMMA", "T_TEST", "candidates", "select"]

FAST_LIMMA, T_TEST, CHISQ = 0, 1, 2
#: a gene's score is min(-log10 padj, SCORE_CAP)
SCORE_CAP = 20.0


@numba.njit(cache=True, inline="always", error_model="numpy")
def _statistic(method, a, b, g, means, spread, counts, n1, n2, scale):
    """(statistic, df, defined) of gene ``g`` for pair (a, b): |t| and its df, or the χ² value."""
    if method == CHISQ:
        x, y = counts[a, g], counts[b, g]
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


@numba.njit(parallel=True, cache=True, error_model="numpy")
def candidates(method, means, spread, counts, n_cells, p1, p2, crit, offsets, genes, stats, dfs, found, m_out):
    """The candidate genes of each pair: statistic > ``crit[k]``, a bound below which p ≥ padj_th.

    Called twice: with empty ``genes`` it only counts (``found[k]``) and records ``m_out[k]``,
    the genes whose p-value is defined; then, with ``offsets`` the running sum of the counts,
    it writes pair ``k``'s candidates (in gene order) from ``offsets[k]``.
    """
    n_genes = means.shape[1]
    fill = len(genes) > 0
    for k in numba.prange(len(p1)):
        a, b = p1[k], p2[k]
        n1, n2 = float(n_cells[a]), float(n_cells[b])
        scale = math.sqrt(1.0 / n1 + 1.0 / n2)
        at = offsets[k] if fill else 0
        m = 0
        for g in range(n_genes):
            stat, df, defined = _statistic(method, a, b, g, means, spread, counts, n1, n2, scale)
            if not defined:
                continue
            m += 1
            if stat > crit[k]:
                if fill:
                    genes[at] = g
                    stats[at] = stat
                    dfs[at] = df
                at += 1
        if not fill:
            found[k] = at
            m_out[k] = m


@numba.njit(parallel=True, cache=True, error_model="numpy")
def select(
    offsets,
    genes,
    pvals,
    m_of,
    p1,
    p2,
    means,
    present,
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
    """Per pair: Holm over the candidates ranked by p (ties in gene order), the genes passing
    ``de_stats_pair``'s rules, scores (``summary[k]``: score, up_score, down_score, num, up_num,
    down_num) and the first ``top`` up and down genes by (p, -|lfc|) with their padj and p
    (``top_genes[k, 0|1, r]``, -1 where fewer). ``q2_th < 0`` means no q2 test."""
    for k in numba.prange(len(p1)):
        lo, hi = offsets[k], offsets[k + 1]
        a, b = p1[k], p2[k]
        n1, n2 = float(n_cells[a]), float(n_cells[b])
        m = m_of[k]
        gene = genes[lo:hi]
        p = pvals[lo:hi]
        order = np.argsort(p, kind="mergesort")  # candidates are in gene order: ties stay so
        padj = np.empty(hi - lo)
        running = 0.0
        for i in range(hi - lo):
            j = order[i]
            running = max(running, (m - i) * p[j])
            padj[j] = min(running, 1.0)
        # de_stats_pair's order: p, then larger |lfc| first
        lfc = np.empty(hi - lo)
        for j in range(hi - lo):
            lfc[j] = means[a, gene[j]] - means[b, gene[j]]
        report = np.argsort(-np.abs(lfc), kind="mergesort")
        report = report[np.argsort(p[report], kind="mergesort")]
        up_score = down_score = 0.0
        up_num = down_num = 0
        for j in report:
            if not (padj[j] < padj_th and abs(lfc[j]) > lfc_th):
                continue
            g = gene[j]
            q1, q2 = present[a, g], present[b, g]
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
