"""Compiled kernels of MapMyCells' reference-marker test on the all-pairs DE engine.

The engine's scan (:func:`bigcat.de.kernels.scan` with ``MMC_WELCH``) computes cell_type_mapper's
Welch statistic for every gene of a pair and keeps the genes whose p-value can be below
``p_th``; :func:`bigcat.de.kernels.tighten` cuts them down to those Holm can still select. Here:
their exact p-values (:func:`pvalues`, scipy's own ``stdtr`` and cell_type_mapper's clipping of
the CDF) and the selection (:func:`select`): Holm, the penetrance test — exact, or the default
approximate one (the genes nearest to the thresholds in (q1, qdiff, fold) space until
``n_valid`` pass, hard floors, one retry among the p-valid genes when fewer than
``N_VALID_MIN`` pass) — and the up/down split. Every float operation is written in the order
cell_type_mapper's NumPy code performs it, so ties and thresholds fall the same way.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import numba
import numpy as np
from numba.extending import get_cython_function_address

__all__ = ["N_VALID_MIN", "pvalues", "select"]

#: cell_type_mapper retries the approximate penetrance test among the p-valid genes when fewer
#: than this many genes pass (``score_differential_genes``' ``n_valid_min``)
N_VALID_MIN = 10
#: a pair with a cluster of fewer cells has no markers (its ``n_cells_min``)
N_CELLS_MIN = 2
#: distance² below which a gene meets the penetrance thresholds exactly
ABSOLUTE = 1.0e-10
#: the CDF is clipped to [smallest normal, 1 - epsneg] before p = 2·min(cdf, 1 - cdf)
CDF_FLOOR = float(np.finfo(np.float64).smallest_normal)
CDF_CEIL = 1.0 - float(np.finfo(np.float64).epsneg)


def _scipy_stdtr() -> Any:
    """scipy's own Student t CDF (``scipy.special.stdtr``, float64), callable from numba."""
    for name in ("__pyx_fuse_0stdtr", "stdtr"):
        try:
            address = get_cython_function_address("scipy.special.cython_special", name)
        except ValueError:
            continue
        return ctypes.CFUNCTYPE(ctypes.c_double, ctypes.c_double, ctypes.c_double)(address)
    msg = "scipy.special.cython_special exports no float64 stdtr"
    raise ImportError(msg)


_stdtr = _scipy_stdtr()


# not cached: numba cannot cache a function holding a ctypes pointer (compiled once per process)
@numba.njit(error_model="numpy")
def _p_value(diff, stat, nu):
    """cell_type_mapper's two-sided p: cdf = stdtr(nu, t) with t signed as ``diff``, NaN → 0.5,
    clipped, then 2·cdf or 2·(1 − cdf)."""
    t = stat if diff > 0 else -stat
    cdf = _stdtr(nu, t)
    if not math.isfinite(cdf):
        cdf = 0.5
    cdf = min(max(cdf, CDF_FLOOR), CDF_CEIL)
    return 2.0 * cdf if cdf < 0.5 else 2.0 * (1.0 - cdf)


@numba.njit(parallel=True, error_model="numpy")
def pvalues(stats, dfs, genes, found, p1, p2, means, out):
    """The p-value of each row's ``found[k]`` candidates (|t| in ``stats``, ν in ``dfs``)."""
    for k in numba.prange(len(found)):
        a, b = p1[k], p2[k]
        for i in range(found[k]):
            g = genes[k, i]
            out[k, i] = _p_value(means[a, g] - means[b, g], stats[k, i], dfs[k, i])


@numba.njit(cache=True, inline="always")
def _terms(pa, pb, fold, q1_th, qdiff_th, fold_th):
    """(q1, qdiff, q1_term, qdiff_term, fold_term) as ``q_score_from_pij`` and
    ``penetrance_parameter_distance`` compute them."""
    q1 = pa if pa > pb else pb
    denom = q1 if q1 > 0.0 else 1.0
    qdiff = abs(pa - pb) / denom
    q1_term = 0.0 if q1 > q1_th else (q1 - q1_th) ** 2
    qdiff_term = 0.0 if qdiff > qdiff_th else (qdiff - qdiff_th) ** 2
    fold_term = 0.0 if fold > fold_th else (fold - fold_th) ** 2
    return q1, qdiff, q1_term, qdiff_term, fold_term


@numba.njit(cache=True, inline="always")
def _insert(best, value):
    """Keep the len(best) smallest values seen in ``best`` (ascending, +inf where unfilled)."""
    n = len(best)
    if value >= best[n - 1]:
        return
    i = n - 1
    while i > 0 and best[i - 1] > value:
        best[i] = best[i - 1]
        i -= 1
    best[i] = value


@numba.njit(cache=True)
def _census(a, b, universe, means, frac, th, n_valid, best):
    """Over the genes of ``universe`` (gene indices): how many meet the thresholds exactly
    (distance² < ABSOLUTE), and the cut-off distance of the approximate test (the smallest of
    the three weighted distances' n_valid-th smallest among genes above the floors; +inf when
    fewer than n_valid genes are above the floors)."""
    q1_th, qdiff_th, fold_th, q1_min, qdiff_min, fold_min = th[0], th[1], th[2], th[3], th[4], th[5]
    best[:] = np.inf
    absolute = 0
    above_floors = 0
    # below both of these a gene is under the fold floor and cannot meet the thresholds
    # exactly (its fold term alone is > ABSOLUTE): it changes neither count nor cut-off
    skip = min(fold_min, fold_th - 2.0e-5)
    for g in universe:
        fold = abs(means[a, g] - means[b, g])
        if fold < skip:
            continue
        q1, qdiff, q1_term, qdiff_term, fold_term = _terms(frac[a, g], frac[b, g], fold, q1_th, qdiff_th, fold_th)
        if qdiff_term + q1_term + fold_term < ABSOLUTE:
            absolute += 1
        if q1 < q1_min or qdiff < qdiff_min or fold < fold_min:
            continue
        above_floors += 1
        _insert(best[0], 1.5 * qdiff_term + q1_term + fold_term)
        _insert(best[1], qdiff_term + 1.5 * q1_term + fold_term)
        _insert(best[2], qdiff_term + q1_term + 1.5 * fold_term)
    if above_floors < n_valid:
        return absolute, np.inf
    return absolute, min(best[0, n_valid - 1], best[1, n_valid - 1], best[2, n_valid - 1])


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
def select(found, genes, pvals, m_of, p1, p2, n_cells, means, frac, gene_ok, all_ok, p_th, th, exact, n_valid,
           up_count, down_count):  # fmt: skip
    """Per pair ``k``: its markers, written over row ``k`` of ``genes`` (up genes — higher in
    the second cluster, as cell_type_mapper's ``up_mask`` — then down genes, each in gene
    order), with ``up_count[k]`` and ``down_count[k]``.

    ``th`` holds (q1_th, qdiff_th, log2_fold_th, q1_min_th, qdiff_min_th, log2_fold_min_th);
    ``gene_ok`` the genes that may be markers (``all_ok``: the indices of those genes);
    ``frac`` the fraction of cells with x ≥ 1 (``ge1 / max(1, n)``).
    """
    for k in numba.prange(len(found)):
        a, b = p1[k], p2[k]
        count = found[k]
        up_count[k] = 0
        down_count[k] = 0
        if count == 0 or n_cells[a] < N_CELLS_MIN or n_cells[b] < N_CELLS_MIN:
            continue
        row = genes[k, :count].copy()
        p = pvals[k, :count]
        # Holm over the candidates (every gene with p < p_th; the rest are padding in m)
        order = np.argsort(p)
        valid_p = np.zeros(count, dtype=np.bool_)
        running = 0.0
        m = m_of[k]
        for i in range(count):
            j = order[i]
            running = max(running, p[j] * (m - i))
            valid_p[j] = min(running, 1.0) < p_th
        passed = np.zeros(count, dtype=np.bool_)
        n_passed = _penetrance(a, b, row, valid_p, all_ok, gene_ok, means, frac, th, exact, n_valid, passed)
        if not exact and n_passed < N_VALID_MIN:  # once more, among the genes with a valid p
            universe = np.empty(count, dtype=np.int64)
            n_universe = 0
            for i in range(count):
                if valid_p[i] and gene_ok[row[i]]:
                    universe[n_universe] = row[i]
                    n_universe += 1
            _penetrance(a, b, row, valid_p, universe[:n_universe], gene_ok, means, frac, th, exact, n_valid, passed)
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
def _penetrance(a, b, row, valid_p, universe, gene_ok, means, frac, th, exact, n_valid, passed):
    """``passed[i]``: candidate i has a valid p and passes the penetrance test over ``universe``;
    returns how many pass."""
    absolute_only, cutoff = False, np.inf
    if not exact:
        best = np.empty((3, max(n_valid, 1)))
        absolute, cutoff = _census(a, b, universe, means, frac, th, n_valid, best)
        absolute_only = absolute >= n_valid
    n = 0
    for i in range(len(row)):
        g = row[i]
        ok = valid_p[i] and gene_ok[g] and _passes(a, b, g, means, frac, th, exact, absolute_only, cutoff)
        passed[i] = ok
        n += ok
    return n
