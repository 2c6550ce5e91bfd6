"""Compiled kernels of MapMyCells' reference-marker test on the all-pairs DE engine.

The engine's scan (:func:`bigcat.de.kernels.scan_welch`, method ``MMC_WELCH``) computes
cell_type_mapper's Welch statistic for every gene of a pair and keeps the genes whose p-value can be
below ``p_th``, with their signed t and ν; :func:`bigcat.de.kernels.tighten` cuts them down to those
Holm can still select. Here: their exact p-values (:func:`pvalues`: scipy's own Student t CDF and
cell_type_mapper's clipping of it) and the selection (:func:`select`): Holm, the penetrance test —
exact, or the default approximate one (the genes nearest to the thresholds in (q1, qdiff, fold)
space until ``n_valid`` pass, hard floors, one retry among the p-valid genes when fewer than
``N_VALID_MIN`` pass) — and the up/down split. Every float operation is written in the order
cell_type_mapper's NumPy code performs it, so ties and thresholds fall the same way.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from bigcat.de.kernels import SAFE_STEP, SURE

__all__ = ["N_VALID_MIN", "expressed_lists", "fail_table", "pending", "pvalues", "safe_table", "select"]

#: cell_type_mapper retries the approximate penetrance test among the p-valid genes when fewer
#: than this many genes pass (``score_differential_genes``' ``n_valid_min``)
N_VALID_MIN = 10
#: a pair with a cluster of fewer cells has no markers (its ``n_cells_min``)
N_CELLS_MIN = 2
#: pairs per task of the selection's parallel loop (a task holds the census' scratch)
PAIRS_PER_TASK = 16
#: room for rounding when a gene is known to be below p_th/m from its |t| and ν alone (the
#: table's spacing in log ν is the engine's ``SAFE_STEP``)
T_SLACK = 1.0e-6
#: distance² below which a gene meets the penetrance thresholds exactly
ABSOLUTE = 1.0e-10
#: the CDF is clipped to [smallest normal, 1 - epsneg] before p = 2·min(cdf, 1 - cdf)
CDF_FLOOR = float(np.finfo(np.float64).smallest_normal)
CDF_CEIL = 1.0 - float(np.finfo(np.float64).epsneg)


@numba.njit(parallel=True, cache=True)
def pending(pvals, stats, nus, found, fail, fail_rows):
    """After the engine's scan (signed t in ``stats``, ν in ``nus``, ``SURE`` for the candidates
    certainly below p_th/m): those get p = 0 in ``pvals`` (Holm validates every gene below
    p_th/m whatever its rank, and cell_type_mapper's p is never 0, so 0 marks them). In a row of
    at most ``fail_rows`` candidates, one whose p is certainly above the lowest bound Holm can
    hold it to (|t| below ``fail`` at its ν, see :func:`fail_table`) gets p = +inf: it fails
    whatever its exact p, and ranks after every gene that passes, so no decision changes. The
    others get NaN, and their row, column, t and ν are returned, for :func:`pvalues`."""
    per_row = np.zeros(len(found) + 1, dtype=np.int64)
    last = len(fail) - 1
    for k in numba.prange(len(found)):
        n = 0
        for i in range(found[k]):
            nu = nus[k, i]
            if nu == SURE:
                pvals[k, i] = 0.0
                continue
            if found[k] <= fail_rows and nu >= 1.0:
                at = int(math.log(nu) / SAFE_STEP)
                if at < last and abs(stats[k, i]) < fail[at]:
                    pvals[k, i] = np.inf
                    continue
            pvals[k, i] = np.nan
            n += 1
        per_row[k + 1] = n
    start = np.cumsum(per_row)
    rows, cols = np.empty(start[-1], dtype=np.int64), np.empty(start[-1], dtype=np.int64)
    t, nu = np.empty(start[-1]), np.empty(start[-1])
    for k in numba.prange(len(found)):
        n = start[k]
        for i in range(found[k]):
            if pvals[k, i] != pvals[k, i]:
                rows[n], cols[n], t[n], nu[n] = k, i, stats[k, i], nus[k, i]
                n += 1
    return rows, cols, t, nu


def safe_table(p: float, nu_max: float) -> np.ndarray:
    """``safe[i]``: a |t| beyond which the two-sided p is below ``p`` for every ν ≥ exp(i·SAFE_STEP)
    (p falls as ν grows at a fixed t), with room for rounding; i up to ν = nu_max."""
    from scipy import special

    nu = np.exp(np.arange(0.0, np.log(max(nu_max, 2.0)) + 2 * SAFE_STEP, SAFE_STEP))
    return -special.stdtrit(nu, p / 2) * (1.0 + T_SLACK)


def fail_table(p: float, nu_max: float) -> np.ndarray:
    """``fail[i]``: a |t| below which the two-sided p is above ``p`` for every ν below
    exp((i + 1)·SAFE_STEP) (p grows as ν falls at a fixed t), with room for rounding; i up to
    ν = nu_max (beyond the table's last bucket nothing is decided)."""
    from scipy import special

    nu = np.exp(np.arange(1.0, np.log(max(nu_max, 2.0)) / SAFE_STEP + 3.0) * SAFE_STEP)
    return -special.stdtrit(nu, p / 2) * (1.0 - T_SLACK)


def pvalues(t: np.ndarray, nu: np.ndarray) -> np.ndarray:
    """cell_type_mapper's two-sided p from ``scipy.stats.t.cdf(t, nu)``: the CDF is NaN where
    ν ≤ 0 or t is NaN (scipy's argument check), 1 at t = +inf, 0 at −inf, ``stdtr`` elsewhere;
    a non-finite CDF counts as 0.5; clipped to [smallest normal, 1 − epsneg]; p = 2·cdf below
    0.5, else 2·(1 − cdf)."""
    from scipy import special

    with np.errstate(invalid="ignore"):
        cdf = special.stdtr(nu, t)
        cdf[~(nu > 0)] = np.nan
        cdf[np.isposinf(t) & (nu > 0)] = 1.0
        cdf[np.isneginf(t) & (nu > 0)] = 0.0
    cdf[~np.isfinite(cdf)] = 0.5
    np.clip(cdf, CDF_FLOOR, CDF_CEIL, out=cdf)
    return np.where(cdf < 0.5, 2.0 * cdf, 2.0 * (1.0 - cdf))


@numba.njit(cache=True, inline="always")
def _terms(pa, pb, fold, q1_th, qdiff_th, fold_th):
    """(q1, qdiff, q1_term, qdiff_term, fold_term) as ``q_score_from_pij`` and
    ``penetrance_parameter_distance`` compute them."""
    q1 = pa if pa > pb else pb
    denom = q1 if q1 > 0.0 else 1.0
    qdiff = abs(pa - pb) / denom
    u, v, w = q1 - q1_th, qdiff - qdiff_th, fold - fold_th
    q1_term = 0.0 if q1 > q1_th else u * u
    qdiff_term = 0.0 if qdiff > qdiff_th else v * v
    fold_term = 0.0 if fold > fold_th else w * w
    return q1, qdiff, q1_term, qdiff_term, fold_term


@numba.njit(cache=True)
def _census(a, b, universe, gene_ok, means, frac, th, work, picked, lists_ptr, lists_idx):
    """Over the genes of ``universe`` (gene indices; empty: every gene with ``gene_ok``): how
    many meet the thresholds exactly (distance² < ABSOLUTE), how many are above the floors, and
    ``n``: the three weighted distances of n genes are in ``work[:3, :n]`` (+inf for a gene
    below a floor). ``work`` (6 × genes) and ``picked`` are scratch. The approximate test's
    cut-off is the smallest of the three distances' n_valid-th smallest (+inf when fewer than
    n_valid genes are above the floors): see :func:`_within_cut`."""
    # below both of these a gene is under the fold floor and cannot meet the thresholds
    # exactly (its fold term alone is > ABSOLUTE): it changes neither count nor cut-off
    skip = min(th[5], th[2] - 2.0e-5)
    row_a, row_b, frac_a, frac_b = means[a], means[b], frac[a], frac[b]
    fold, pa, pb = work[3], work[4], work[5]
    n = 0
    if len(universe):
        for g in universe:
            picked[n] = g
            fold[n] = abs(row_a[g] - row_b[g])
            n += (fold[n] >= skip) & gene_ok[g]
    else:
        # every gene — but one that neither leaf has in at least q1_min of its cells (q1 below
        # the floor and below q1_th) changes nothing either: only the genes of either leaf's
        # list (:func:`expressed_lists`) are visited, each once, the fold filter first
        q1_skip = min(th[3], th[0] - 2.0e-5)
        for e in range(lists_ptr[a], lists_ptr[a + 1]):
            g = lists_idx[e]
            picked[n] = g
            fold[n] = abs(row_a[g] - row_b[g])
            n += (fold[n] >= skip) & gene_ok[g]
        for e in range(lists_ptr[b], lists_ptr[b + 1]):
            g = lists_idx[e]
            picked[n] = g
            fold[n] = abs(row_a[g] - row_b[g])
            n += (frac_a[g] < q1_skip) & (fold[n] >= skip) & gene_ok[g]
    for i in range(n):  # gathered first, so that the arithmetic below runs as one vector loop
        g = picked[i]
        pa[i] = frac_a[g]
        pb[i] = frac_b[g]
    q1_th, qdiff_th, fold_th, q1_min, qdiff_min, fold_min = th[0], th[1], th[2], th[3], th[4], th[5]
    d0, d1, d2 = work[0], work[1], work[2]
    absolute, above = 0, 0
    # written out (no ``or``, no calls) so that it compiles to one vector loop: 3–4× faster
    for i in range(n):
        x, y, f = pa[i], pb[i], fold[i]
        q1 = x if x > y else y
        qdiff = abs(x - y) / (q1 if q1 > 0.0 else 1.0)
        u, v, w = q1 - q1_th, qdiff - qdiff_th, f - fold_th
        q1_term = 0.0 if q1 > q1_th else u * u
        qdiff_term = 0.0 if qdiff > qdiff_th else v * v
        fold_term = 0.0 if f > fold_th else w * w
        absolute += qdiff_term + q1_term + fold_term < ABSOLUTE
        below = (q1 < q1_min) | (qdiff < qdiff_min) | (f < fold_min)
        above += not below
        d0[i] = np.inf if below else 1.5 * qdiff_term + q1_term + fold_term
        d1[i] = np.inf if below else qdiff_term + 1.5 * q1_term + fold_term
        d2[i] = np.inf if below else qdiff_term + q1_term + 1.5 * fold_term
    return absolute, above, n


@numba.njit(cache=True)
def expressed_lists(frac, th):
    """Per leaf, the genes (ascending) in at least ``min(q1_min_th, q1_th)`` of its cells (as the
    census compares them): a gene in neither leaf's list has q1 below the floor."""
    q1_skip = min(th[3], th[0] - 2.0e-5)
    n_leaves, n_genes = frac.shape
    ptr = np.zeros(n_leaves + 1, dtype=np.int64)
    for a in range(n_leaves):
        count = 0
        for g in range(n_genes):
            count += frac[a, g] >= q1_skip
        ptr[a + 1] = ptr[a] + count
    idx = np.empty(ptr[n_leaves], dtype=np.int32)
    for a in range(n_leaves):
        at = ptr[a]
        for g in range(n_genes):
            if frac[a, g] >= q1_skip:
                idx[at] = g
                at += 1
    return ptr, idx


@numba.njit(cache=True, inline="always")
def _passes(a, b, g, means, frac, th, exact, absolute_only, cutoff):
    """One gene's penetrance test (the candidate is in the test's universe)."""
    q1_th, qdiff_th, fold_th, q1_min, qdiff_min, fold_min = th[0], th[1], th[2], th[3], th[4], th[5]
    fold = abs(means[a, g] - means[b, g])
    q1, qdiff, q1_term, qdiff_term, fold_term = _terms(frac[a, g], frac[b, g], fold, q1_th, qdiff_th, fold_th)
    if exact:
        return q1 > q1_th and qdiff > qdiff_th and fold > fold_th
    if absolute_only:
        return qdiff_term + q1_term + fold_term < ABSOLUTE
    if q1 < q1_min or qdiff < qdiff_min or fold < fold_min:
        return False
    return (
        1.5 * qdiff_term + q1_term + fold_term <= cutoff
        or qdiff_term + 1.5 * q1_term + fold_term <= cutoff
        or qdiff_term + q1_term + 1.5 * fold_term <= cutoff
    )


@numba.njit(parallel=True, cache=True, error_model="numpy")
def select(found, genes, pvals, m_of, p1, p2, n_cells, means, frac, gene_ok, p_th, th, exact, n_valid, up_count,
           down_count, lists_ptr, lists_idx):  # fmt: skip
    """Per pair ``k``: its markers, written over row ``k`` of ``genes`` (up genes — higher in
    the second cluster, as cell_type_mapper's ``up_mask`` — then down genes, each in gene
    order), with ``up_count[k]`` and ``down_count[k]``.

    ``th`` holds (q1_th, qdiff_th, log2_fold_th, q1_min_th, qdiff_min_th, log2_fold_min_th);
    ``gene_ok`` the genes that may be markers;
    ``frac`` the fraction of cells with x ≥ 1 (``ge1 / max(1, n)``).
    """
    n_tasks = (len(found) + PAIRS_PER_TASK - 1) // PAIRS_PER_TASK
    n_genes = means.shape[1]
    width = genes.shape[1]
    for task in numba.prange(n_tasks):
        # every scratch array once per task: allocations per pair cost more than the pair's work
        dist, picked = np.empty((6, n_genes)), np.empty(n_genes, dtype=np.int64)
        row, universe, sorted_p = np.empty(width, dtype=np.int64), np.empty(width, dtype=np.int64), np.empty(width)
        valid_p, passed = np.empty(width, dtype=np.bool_), np.empty(width, dtype=np.bool_)
        for k in range(task * PAIRS_PER_TASK, min((task + 1) * PAIRS_PER_TASK, len(found))):
            _select_pair(k, found, genes, pvals, m_of, p1, p2, n_cells, means, frac, gene_ok, p_th, th, exact,
                         n_valid, up_count, down_count, dist, picked, lists_ptr, lists_idx, row, universe, sorted_p,
                         valid_p, passed)  # fmt: skip


@numba.njit(cache=True, error_model="numpy")
def _holm_valid(p, count, m, p_th, sorted_p, valid_p):
    """``valid_p[i]``: candidate i passes Holm over m genes (the others, not among the
    candidates, have p ≥ p_th). The genes marked p = 0 (certainly below p_th/m) all pass; the
    others in order of p. Equal p share Holm's running maximum, so the decision is p < p*, p* the
    p of the first that fails: one in-place sort of the p-values, no ranks."""
    n_sure, n_rest = 0, 0
    for i in range(count):
        if p[i] == 0.0:
            n_sure += 1
        else:
            sorted_p[n_rest] = p[i]
            n_rest += 1
    rest = sorted_p[:n_rest]
    rest.sort()
    cut = np.inf
    running = 0.0
    for i in range(n_rest):
        running = max(running, rest[i] * (m - n_sure - i))
        if not min(running, 1.0) < p_th:
            cut = rest[i]
            break
    any_valid = False
    for i in range(count):
        valid_p[i] = p[i] == 0.0 or p[i] < cut
        any_valid |= valid_p[i]
    return any_valid


@numba.njit(cache=True, error_model="numpy")
def _select_pair(k, found, genes, pvals, m_of, p1, p2, n_cells, means, frac, gene_ok, p_th, th, exact, n_valid,
                 up_count, down_count, dist, picked, lists_ptr, lists_idx, row_space, universe_space, sorted_p,
                 valid_space, passed_space):  # fmt: skip
    """:func:`select` for pair ``k`` (the last five: the task's scratch)."""
    a, b = p1[k], p2[k]
    count = found[k]
    up_count[k] = 0
    down_count[k] = 0
    if count == 0 or n_cells[a] < N_CELLS_MIN or n_cells[b] < N_CELLS_MIN:
        return
    row, valid_p, passed = row_space[:count], valid_space[:count], passed_space[:count]
    for i in range(count):
        row[i] = genes[k, i]
    if not _holm_valid(pvals[k], count, m_of[k], p_th, sorted_p, valid_p):
        return
    everything = universe_space[:0]
    n_passed = _penetrance(a, b, row, valid_p, everything, gene_ok, means, frac, th, exact, n_valid, passed,
                           dist, picked, lists_ptr, lists_idx, sorted_p)  # fmt: skip
    if not exact and n_passed < N_VALID_MIN:  # once more, among the genes with a valid p
        n_universe = 0
        for i in range(count):
            if valid_p[i] and gene_ok[row[i]]:
                universe_space[n_universe] = row[i]
                n_universe += 1
        _penetrance(a, b, row, valid_p, universe_space[:n_universe], gene_ok, means, frac, th, exact, n_valid,
                    passed, dist, picked, lists_ptr, lists_idx, sorted_p)  # fmt: skip
    at = 0
    for second in (True, False):
        for i in range(count):
            if passed[i] and (means[b, row[i]] > means[a, row[i]]) == second:
                genes[k, at] = row[i]
                at += 1
        if second:
            up_count[k] = at
    down_count[k] = at - up_count[k]


@numba.njit(cache=True)
def _census_matters(a, b, row, valid_p, gene_ok, means, frac, th):
    """Whether the census can change a decision: only for a candidate with a valid p that is
    above the floors without meeting the thresholds exactly (it passes only within the cut-off,
    and never when n_valid genes meet them), or that meets them below a floor (it passes only
    then). A gene that meets them above the floors passes either way; one that does neither
    fails either way."""
    q1_th, qdiff_th, fold_th, q1_min, qdiff_min, fold_min = th[0], th[1], th[2], th[3], th[4], th[5]
    for i in range(len(row)):
        g = row[i]
        if not (valid_p[i] and gene_ok[g]):
            continue
        fold = abs(means[a, g] - means[b, g])
        q1, qdiff, q1_term, qdiff_term, fold_term = _terms(frac[a, g], frac[b, g], fold, q1_th, qdiff_th, fold_th)
        exactly = qdiff_term + q1_term + fold_term < ABSOLUTE
        floors = not (q1 < q1_min or qdiff < qdiff_min or fold < fold_min)
        if exactly != floors:
            return True
    return False


@numba.njit(cache=True)
def _penetrance(a, b, row, valid_p, universe, gene_ok, means, frac, th, exact, n_valid, passed, dist, picked,
                lists_ptr, lists_idx, nearest):  # fmt: skip
    """``passed[i]``: candidate i has a valid p and passes the penetrance test over ``universe``;
    returns how many pass. ``nearest`` is scratch (as long as ``row``)."""
    absolute_only, cutoff = False, np.inf
    census = not exact and _census_matters(a, b, row, valid_p, gene_ok, means, frac, th)
    if census:
        absolute, above, tallied = _census(a, b, universe, gene_ok, means, frac, th, dist, picked, lists_ptr,
                                           lists_idx)  # fmt: skip
        absolute_only = absolute >= n_valid
        if above < n_valid:  # fewer genes than n_valid above the floors: the cut-off is +inf
            census = False
    if census and not absolute_only:
        # the approximate test: above the floors, and the smallest weighted distance D at most the
        # cut-off. Passing is monotone in D, so the largest passing D among the candidates is
        # found by bisection over their sorted D, each probe one count (:func:`_within_cut`)
        cutoff = _largest_within(a, b, row, valid_p, gene_ok, means, frac, th, dist, tallied, n_valid, nearest)
    n = 0
    for i in range(len(row)):
        g = row[i]
        ok = valid_p[i] and gene_ok[g] and _passes(a, b, g, means, frac, th, exact, absolute_only, cutoff)
        passed[i] = ok
        n += ok
    return n


@numba.njit(cache=True)
def _nearest(a, b, g, means, frac, th):
    """The candidate's smallest weighted distance, or +inf when it is below a floor."""
    q1_th, qdiff_th, fold_th, q1_min, qdiff_min, fold_min = th[0], th[1], th[2], th[3], th[4], th[5]
    fold = abs(means[a, g] - means[b, g])
    q1, qdiff, q1_term, qdiff_term, fold_term = _terms(frac[a, g], frac[b, g], fold, q1_th, qdiff_th, fold_th)
    if q1 < q1_min or qdiff < qdiff_min or fold < fold_min:
        return np.inf
    return min(1.5 * qdiff_term + q1_term + fold_term, qdiff_term + 1.5 * q1_term + fold_term,
               qdiff_term + q1_term + 1.5 * fold_term)  # fmt: skip


@numba.njit(cache=True)
def _largest_within(a, b, row, valid_p, gene_ok, means, frac, th, dist, tallied, n_valid, nearest):
    """The largest D (smallest weighted distance) among the candidates that is within the
    cut-off (-inf when none is): used as the cut-off itself, it passes the same candidates."""
    n = 0
    for i in range(len(row)):
        g = row[i]
        if valid_p[i] and gene_ok[g]:
            d = _nearest(a, b, g, means, frac, th)
            if d < np.inf:
                nearest[n] = d
                n += 1
    values = nearest[:n]
    values.sort()
    lo, hi = 0, n  # values[:lo] are within, values[hi:] are not
    while lo < hi:
        mid = (lo + hi) // 2
        if _within_cut(values[mid], dist, tallied, n_valid):
            lo = mid + 1
        else:
            hi = mid
    return values[lo - 1] if lo > 0 else -np.inf


@numba.njit(cache=True)
def _within_cut(d, dist, tallied, n_valid):
    """Whether D = ``d`` is at most the cut-off — min over the three distances of their
    n_valid-th smallest — that is, for each distance fewer than n_valid genes strictly below
    D (``dist[:3, :tallied]``, +inf below a floor). Counting needs one pass per distance where
    a selection needs several (same decision, same floats)."""
    for w in range(3):
        below = 0
        for j in range(tallied):
            below += dist[w, j] < d
        if below >= n_valid:
            return False
    return True
