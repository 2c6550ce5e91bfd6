"""Compiled (numba) kernels for per-cluster statistics over sparse blocks.

One pass over a block's stored values accumulates every requested statistic at once into
per-cluster × gene accumulators. Rows are visited grouped by cluster (a counting sort of
the block's rows), so one cluster's accumulator rows stay in cache while its cells are
processed, which with thousands of clusters is much faster than visiting rows in storage
order (docs/design.md, "The kernel").

Conventions shared by the kernels
---------------------------------
- ``codes[r]``: the accumulator row (cluster) of block row ``r``; ``-1`` skips the row.
- ``gene_map[c]``: the accumulator column of block column ``c`` (plus ``col_offset``);
  ``-1`` skips it. Gene subsets and gene-range ownership are both expressed this way
  (``fold_csr`` takes ``None`` for the identity).
- ``totals[r]``: the cell's total counts for ``normalize`` (log2 CPM); when ``totals`` is
  empty and ``normalize`` is set, the CSR kernel sums the row itself (a CSR row block holds
  whole rows, so no extra pass over the data is needed).
- Accumulators: ``sums``/``sqr_sums`` float64, ``present_counts``/``nnz`` uint16 or int32 (``fold_csr``:
  ``None`` when not requested; ``fold_csc``: a 0×0 array), holding the clusters ``c_lo …``
  (an accumulator piece owns a cluster range).
  ``present_counts`` counts values passing the threshold test, or — when an implicit zero passes
  too (``count_fails``) — the stored values failing it, so cells without a stored value
  never need visiting. (Interleaving the accumulators in one array was measured too: no
  faster at 5,000 clusters — the kernel is bound by the latency of scattered updates,
  which separate arrays overlap just as well — and it needs float64 counts.)
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["check_compressed", "check_shard", "fold_csc", "fold_csr", "is_identity", "narrow_into", "row_sums_csr"]


@numba.njit(nogil=True, cache=True)
def _value(x, scale, normalize):
    v = np.float64(x)
    if normalize:
        v = np.log2(v * scale + 1.0)
    return v


@numba.njit(nogil=True, cache=True)
def _passes(v, threshold, op_ge):
    return v >= threshold if op_ge else v > threshold


@numba.njit(nogil=True, cache=True)
def _rows_by_cluster(codes, c_lo, c_hi):
    """Rows whose cluster is in ``[c_lo, c_hi)``, grouped by cluster (a counting sort)."""
    n = c_hi - c_lo
    counts = np.zeros(n + 1, dtype=np.int64)
    for r in range(codes.size):
        c = codes[r]
        if c_lo <= c < c_hi:
            counts[c - c_lo + 1] += 1
    for c in range(n):
        counts[c + 1] += counts[c]
    order = np.empty(counts[n], dtype=np.int64)
    for r in range(codes.size):
        c = codes[r]
        if c_lo <= c < c_hi:
            order[counts[c - c_lo]] = r
            counts[c - c_lo] += 1
    return order


@numba.njit(nogil=True, cache=True)
def is_identity(gene_map):
    """Whether ``gene_map`` keeps every column in order."""
    for k in range(gene_map.size):  # noqa: SIM110 - numba compiles loops, not generators
        if gene_map[k] != k:
            return False
    return True


@numba.njit(nogil=True, cache=True)
def _rows(acc, c):
    """Row ``c`` of an accumulator, or ``None`` for one not requested (pruned at compile time)."""
    if acc is None:
        return None
    return acc[c]


@numba.njit(nogil=True, cache=True)
def _n_rows(sums, sqr_sums, present_counts, nnz, extra_counts=None):
    n = 0
    if extra_counts is not None:
        n = max(n, extra_counts.shape[0])
    if sums is not None:
        n = max(n, sums.shape[0])
    if sqr_sums is not None:
        n = max(n, sqr_sums.shape[0])
    if present_counts is not None:
        n = max(n, present_counts.shape[0])
    if nnz is not None:
        n = max(n, nnz.shape[0])
    return n


@numba.njit(nogil=True, cache=True)
def _fold_row(
    data,
    indices,
    lo,
    hi,
    col_offset,
    gene_map,
    totals,
    scale,
    threshold,
    op_ge,
    count_fails,
    sums_row,
    sqr_row,
    present_row,
    nnz_row,
    extra_row,
    tests,
):
    """One row's values into one cluster's accumulator rows.

    Every ``is None`` test here is on an argument, so numba drops it at compile time and
    compiles one loop per combination of requested accumulators, gene map and
    normalization, with no per-value branches on them; column numbers are unsigned (numba
    then skips negative-index wraparound; indices were checked when read) and counts are
    added branch-free (docs/design.md, "The kernel").
    """
    for j in range(lo, hi):
        if gene_map is None:
            g = np.uint32(indices[j] + col_offset)
        else:
            mapped = gene_map[indices[j] + col_offset]
            if mapped < 0:
                continue
            g = np.uint32(mapped)
        v = np.float64(data[j])
        if totals is not None:
            v = np.log2(v * scale + 1.0)
        if sums_row is not None:
            sums_row[g] += v
        if sqr_row is not None:
            sqr_row[g] += v * v
        if present_row is not None:
            present_row[g] += _passes(v, threshold, op_ge) != count_fails
        if nnz_row is not None:
            nnz_row[g] += v != 0.0
        if extra_row is not None:
            for t in range(extra_row.shape[0]):
                extra_row[t, g] += _passes(v, tests[t, 0], tests[t, 1] != 0.0) != (tests[t, 2] != 0.0)


@numba.njit(nogil=True, cache=True)
def fold_csr(
    data,
    indices,
    indptr,
    col_offset,
    codes,
    gene_map,
    totals,
    threshold,
    op_ge,
    count_fails,
    c_lo,
    sums,
    sqr_sums,
    present_counts,
    nnz,
    extra_counts=None,
    tests=None,
):
    """Accumulate the rows of a CSR block whose cluster is in ``[c_lo, c_lo + len(acc))``
    into the accumulators (row ``c - c_lo``; see the module notes).

    ``gene_map`` ``None``: every column kept, in order (the common case). ``totals``
    ``None``: no normalization; empty: log2 CPM with each row's total summed here; else
    log2 CPM with these totals. Accumulators not requested are ``None``. Each row's
    accumulator rows are taken once as 1-D views. ``extra_counts`` (clusters × tests × genes
    counts, or ``None``) counts further presence tests in the same pass, one per row of
    ``tests`` (threshold, 1.0 for ``>=`` else 0.0, 1.0 to count the failures).
    """
    c_hi = c_lo + _n_rows(sums, sqr_sums, present_counts, nnz, extra_counts)
    for r in _rows_by_cluster(codes, c_lo, c_hi):
        c = codes[r] - c_lo
        lo = indptr[r]
        hi = indptr[r + 1]
        scale = 1.0
        if totals is not None:
            if totals.size == 0:
                total = 0.0
                for j in range(lo, hi):
                    total += np.float64(data[j])
            else:
                total = totals[r]
            scale = 1e6 / total if total != 0.0 else 0.0
        _fold_row(
            data,
            indices,
            lo,
            hi,
            col_offset,
            gene_map,
            totals,
            scale,
            threshold,
            op_ge,
            count_fails,
            _rows(sums, c),
            _rows(sqr_sums, c),
            _rows(present_counts, c),
            _rows(nnz, c),
            _rows(extra_counts, c),
            tests,
        )


@numba.njit(nogil=True, cache=True)
def fold_csc(
    data,
    indices,
    indptr,
    col_offset,
    codes,
    gene_map,
    totals,
    normalize,
    threshold,
    op_ge,
    count_fails,
    c_lo,
    sums,
    sqr_sums,
    present_counts,
    nnz,
    extra_counts,
    tests,
):
    """Accumulate a CSC block (columns ``col_offset…``) into the accumulators, for the
    clusters in ``[c_lo, c_lo + len(acc))``.

    ``totals`` must be given when ``normalize`` is set (a column block does not hold whole
    rows). ``extra_counts``/``tests`` as in :func:`fold_csr` (a 0 × 0 × 0 array when none).
    """
    do_sum = sums.shape[0] > 0
    do_sqr = sqr_sums.shape[0] > 0
    do_present = present_counts.shape[0] > 0
    do_nnz = nnz.shape[0] > 0
    do_extra = extra_counts.shape[0] > 0
    c_hi = c_lo + max(sums.shape[0], sqr_sums.shape[0], present_counts.shape[0], nnz.shape[0], extra_counts.shape[0])
    for col in range(indptr.size - 1):
        g = gene_map[col + col_offset]
        if g < 0:
            continue
        for j in range(indptr[col], indptr[col + 1]):
            r = indices[j]
            c = codes[r]
            if c < c_lo or c >= c_hi:
                continue
            c -= c_lo
            scale = 1.0
            if normalize:
                total = totals[r]
                scale = 1e6 / total if total != 0.0 else 0.0
            v = _value(data[j], scale, normalize)
            if do_sum:
                sums[c, g] += v
            if do_sqr:
                sqr_sums[c, g] += v * v
            if do_present and _passes(v, threshold, op_ge) != count_fails:
                present_counts[c, g] += 1
            if do_nnz and v != 0.0:
                nnz[c, g] += 1
            if do_extra:
                for t in range(extra_counts.shape[1]):
                    extra_counts[c, t, g] += _passes(v, tests[t, 0], tests[t, 1] != 0.0) != (tests[t, 2] != 0.0)


@numba.njit(nogil=True, cache=True)
def row_sums_csr(data, indptr):
    """Per-row sums of a CSR block, in float64."""
    out = np.zeros(indptr.size - 1, dtype=np.float64)
    for r in range(indptr.size - 1):
        total = 0.0
        for j in range(indptr[r], indptr[r + 1]):
            total += np.float64(data[j])
        out[r] = total
    return out


@numba.njit(nogil=True, cache=True)
def check_compressed(indices, indptr, bound):
    """Structure of a compressed (CSR/CSC) block in one pass over ``indices``.

    Returns ``(bad, unsorted)``: the position of the first index outside ``[0, bound)``
    and the first major row (column for CSC) whose indices are not strictly increasing
    (unsorted, or a duplicated entry), each ``-1`` when there is none. The block is
    canonical when the only descents of ``indices`` are where a row starts: one
    branch-free count over the whole block (which the compiler vectorizes) against an
    O(rows) count at the row starts; then only each row's first and last index can be
    out of range. Other blocks are checked row by row.
    """
    base = indptr[0]
    n = indices.size
    descents = 0
    for k in range(1, n):
        descents += indices[k] <= indices[k - 1]
    at_starts = 0
    for r in range(1, indptr.size - 1):
        s = indptr[r] - base
        if 0 < s < n and indptr[r + 1] - base > s:  # a non-empty row after earlier values
            at_starts += indices[s] <= indices[s - 1]
    unsorted = -1
    for r in range(indptr.size - 1):
        lo = indptr[r] - base
        hi = indptr[r + 1] - base
        if hi <= lo:
            continue
        if descents == at_starts:  # canonical rows: their extremes are their ends
            if indices[lo] >= 0 and indices[hi - 1] < bound:
                continue
        else:
            ordered = True
            for k in range(lo + 1, hi):
                if indices[k] <= indices[k - 1]:
                    ordered = False
                    break
            if not ordered and unsorted < 0:
                unsorted = r
        for k in range(lo, hi):
            if indices[k] < 0 or indices[k] >= bound:
                return k, unsorted
    return -1, unsorted


@numba.njit(nogil=True, cache=True)
def check_shard(indices, row_starts, bound):
    """:func:`check_compressed` for an element range not aligned with rows: ``row_starts``
    are the positions (ascending, relative to the range) where a new row begins. Returns
    ``(bad, unsorted)``: positions of the first out-of-range index and of the first value
    whose index does not exceed its predecessor's in the same row, ``-1`` when none."""
    unsorted = -1
    s = 0
    for k in range(indices.size):
        j = indices[k]
        if j < 0 or j >= bound:
            return k, unsorted
        while s < row_starts.size and row_starts[s] < k:
            s += 1
        if k > 0 and unsorted < 0 and j <= indices[k - 1] and not (s < row_starts.size and row_starts[s] == k):
            unsorted = k
    return -1, unsorted


@numba.njit(nogil=True, cache=True)
def narrow_into(src, dst, lo, hi):
    """Copy the integers ``src`` into ``dst`` (a narrower integer dtype whose range is
    ``[lo, hi]``). Returns the position of the first value outside that range (``dst`` then
    holds truncated values), ``-1`` when every value fits: one branch-free pass the compiler
    vectorizes, a second only when a value does not fit."""
    bad = False
    for k in range(src.size):
        v = src[k]
        bad |= (v < lo) | (v > hi)
        dst[k] = v
    if not bad:
        return -1
    for k in range(src.size):
        if src[k] < lo or src[k] > hi:
            return k
    return -1
