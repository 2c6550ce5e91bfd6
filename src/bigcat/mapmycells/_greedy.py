"""Compiled steps of cell_type_mapper's greedy query-marker selection, for one parent node.

A parent's pairs are local indices ``0..P-1``; its marker lists are one CSR by slot
``2 * pair + sign`` (sign 0 down, 1 up: cell_type_mapper's columns) and its transpose by gene.
Every step touches only the pairs the chosen gene is a marker of: the state of the others
cannot change, so a pass over all pairs per chosen gene (cell_type_mapper's) is not needed.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["desperate", "gather", "refresh", "step", "transpose"]


@numba.njit(cache=True, nogil=True, inline="always")
def _kept(ptr, idx, p, gene_of, out, at, utility):
    """Pair ``p``'s markers of one direction that ``gene_of`` keeps: counted (``out`` empty) or
    copied to ``out[at:]`` with their utility counted. Returns the next free slot."""
    for e in range(ptr[p], ptr[p + 1]):
        g = gene_of[idx[e]]
        if g >= 0:
            if len(out):
                out[at] = g
                utility[g] += 1
            at += 1
    return at


@numba.njit(cache=True, nogil=True)
def gather(pairs, up_ptr, up_idx, dn_ptr, dn_idx, gene_of, n_genes):
    """The parent's marker lists (genes renumbered by ``gene_of``, −1 = dropped), their census
    ``(P, 2)`` (down, up) and each gene's utility (how many (pair, sign) it is a marker of)."""
    n = len(pairs)
    census = np.zeros((n, 2), dtype=np.int64)
    utility = np.zeros(n_genes, dtype=np.int64)
    nothing = np.empty(0, dtype=np.int32)
    for k in range(n):
        census[k, 0] = _kept(dn_ptr, dn_idx, pairs[k], gene_of, nothing, 0, utility)
        census[k, 1] = _kept(up_ptr, up_idx, pairs[k], gene_of, nothing, 0, utility)
    ptr = np.zeros(2 * n + 1, dtype=np.int64)
    for k in range(n):
        ptr[2 * k + 1] = ptr[2 * k] + census[k, 0]
        ptr[2 * k + 2] = ptr[2 * k + 1] + census[k, 1]
    genes = np.empty(ptr[2 * n], dtype=np.int32)
    for k in range(n):
        at = _kept(dn_ptr, dn_idx, pairs[k], gene_of, genes, ptr[2 * k], utility)
        _kept(up_ptr, up_idx, pairs[k], gene_of, genes, at, utility)
    return census, ptr, genes, utility


@numba.njit(cache=True, nogil=True)
def transpose(ptr, genes, n_genes):
    """By gene: for each gene the slots ``2 * pair + sign`` it is a marker of."""
    counts = np.zeros(n_genes + 1, dtype=np.int64)
    for e in range(len(genes)):
        counts[genes[e] + 1] += 1
    for g in range(n_genes):
        counts[g + 1] += counts[g]
    out = np.empty(len(genes), dtype=np.int64)
    cursor = counts[:-1].copy()
    for slot in range(len(ptr) - 1):
        for e in range(ptr[slot], ptr[slot + 1]):
            g = genes[e]
            out[cursor[g]] = slot
            cursor[g] += 1
    return counts, out


@numba.njit(cache=True, nogil=True)
def _add(g, gptr, gslots, counts, agg, dirty, queue, n_queue):
    for e in range(gptr[g], gptr[g + 1]):
        slot = gslots[e]
        k = slot >> 1
        counts[k, slot & 1] += 1
        agg[k] += 1
        if not dirty[k]:
            dirty[k] = True
            queue[n_queue] = k
            n_queue += 1
    return n_queue


@numba.njit(cache=True, nogil=True)
def refresh(queue, n_queue, dirty, counts, agg, census, possible, filled, n_per, utility, ptr, genes):
    """cell_type_mapper's ``_update_been_filled`` on the queued pairs: a (pair, sign) is filled
    once it has ``n_per`` markers (if both signs can), all it can have, or the pair has
    ``2 n_per``; a newly filled one no longer counts toward its genes' utility. Returns how
    many were newly filled."""
    newly = 0
    for q in range(n_queue):
        k = queue[q]
        dirty[k] = False
        for s in range(2):
            if filled[k, s]:
                continue
            if (counts[k, s] >= n_per and possible[k]) or counts[k, s] == census[k, s] or agg[k] >= 2 * n_per:
                filled[k, s] = True
                newly += 1
                slot = 2 * k + s
                for e in range(ptr[slot], ptr[slot + 1]):
                    utility[genes[e]] -= 1
    return newly


@numba.njit(cache=True, nogil=True)
def step(chosen_genes, chosen, utility, gptr, gslots, counts, agg, dirty, queue, census, possible, filled, n_per,
         ptr, genes):  # fmt: skip
    """Take the genes (cell_type_mapper's ``_choose_one_gene`` for each), then refresh the
    pairs they touched. Returns (newly filled, the largest utility left)."""
    n_queue = 0
    for g in chosen_genes:
        chosen[g] = True
        utility[g] = -1
        n_queue = _add(g, gptr, gslots, counts, agg, dirty, queue, n_queue)
    newly = refresh(queue, n_queue, dirty, counts, agg, census, possible, filled, n_per, utility, ptr, genes)
    return newly, utility.max()


@numba.njit(cache=True, nogil=True)
def desperate(n_desperate, chosen, utility, gptr, gslots, counts, agg, dirty, queue, census, ptr, genes, n_genes):
    """cell_type_mapper's ``_choose_desperate_markers``: every marker of each pair with at most
    ``n_desperate`` (and some) markers, pairs in order, genes in index order. Returns the genes
    taken, in order, and how many pairs are queued for the next refresh."""
    taken = np.empty(n_genes, dtype=np.int64)
    n_taken = 0
    n_queue = 0
    for k in range(census.shape[0]):
        total = census[k, 0] + census[k, 1]
        if total == 0 or total > n_desperate:
            continue
        mine = np.sort(genes[ptr[2 * k] : ptr[2 * k + 2]])
        for g in mine:
            if chosen[g]:
                continue
            chosen[g] = True
            utility[g] = -1
            taken[n_taken] = g
            n_taken += 1
            n_queue = _add(g, gptr, gslots, counts, agg, dirty, queue, n_queue)
    return taken[:n_taken], n_queue
