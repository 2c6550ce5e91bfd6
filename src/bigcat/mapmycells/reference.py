"""MapMyCells reference markers (cell_type_mapper's ``reference_markers.h5``) on bigcat's
all-pairs DE engine: every pair of leaves, cell_type_mapper's test, its file layout."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigcat.errors import BigcatInputError

__all__ = ["MarkerInput", "reference_markers"]

log = logging.getLogger("bigcat")

#: cell_type_mapper marks genes that are duplicates in the reference with this prefix: never markers
INVALID_PREFIX = "INVALID_MARKER"
#: leaves read per block when the statistics are loaded (bounds the temporaries: blocks of a few
#: MB stay in cache, where 256 rows of 5,000 genes took 2.6× as long)
ROWS_PER_BLOCK = 64


@dataclass
class MarkerInput:
    """What the reference-marker test reads, per leaf (rows, in sorted leaf order) and gene,
    computed as cell_type_mapper's ``aggregate_stats`` does: mean = sum / max(1, n), var =
    (sumsq − sum²/max(1, n)) / max(1, n − 1), frac = ge1 / max(1, n). (Welch's var / n is
    computed where it is used: a fourth leaves × genes array would cost 1.3 GB at 5,000 × 32,285.)"""

    source: str
    level: str
    leaves: list[str]
    genes: list[str]
    n_cells: np.ndarray
    means: np.ndarray
    var: np.ndarray
    frac: np.ndarray


def open_h5(handle: Any, source: str, expected: str = "precomputed_stats.h5") -> Any:
    """An HDF5 file opened for reading, or one line saying ``source`` is not one."""
    import h5py

    try:
        return h5py.File(handle, "r")
    except OSError:
        msg = f"{source}: not an HDF5 file (a {expected} is expected)"
        raise BigcatInputError(msg) from None


def read_marker_input(path: str | os.PathLike, storage_options: dict | None = None) -> MarkerInput:
    """The leaves' statistics from a ``precomputed_stats.h5`` (cell_type_mapper's or bigcat's)."""
    from bigcat._io import fs

    source = str(path)
    if not fs.is_url(path) and not Path(path).is_file():
        msg = f"{source}: no such file"
        raise BigcatInputError(msg)
    with fs.open_file(path, storage_options) as handle, open_h5(handle, source) as f:
        missing = [k for k in ("n_cells", "sum", "sumsq", "ge1", "col_names", "cluster_to_row", "taxonomy_tree")
                   if k not in f]  # fmt: skip
        if missing:
            msg = (f"{source}: not a precomputed_stats.h5 for marker selection (it lacks {', '.join(missing)}); "
                   "write one with `bigcat stats DATA --format mapmycells --out precomputed_stats.h5`")  # fmt: skip
            raise BigcatInputError(msg)
        genes = json.loads(f["col_names"][()].decode())
        rows_of = json.loads(f["cluster_to_row"][()].decode())
        tree = json.loads(f["taxonomy_tree"][()].decode())
        level = tree["hierarchy"][-1]
        leaves = sorted(tree[level].keys())
        unknown = [leaf for leaf in leaves if leaf not in rows_of]
        if unknown:
            msg = f"{source}: leaves of the taxonomy tree without statistics: {', '.join(map(str, unknown[:5]))}"
            raise BigcatInputError(msg)
        rows = np.array([rows_of[leaf] for leaf in leaves], dtype=np.int64)
        n_all = np.asarray(f["n_cells"][()], dtype=np.int64)
        n_cells = n_all[rows]
        shape = (len(leaves), len(genes))
        means, var, frac = np.empty(shape), np.empty(shape), np.empty(shape)
        order = np.argsort(rows, kind="stable")  # read in file order, place in leaf order
        for lo in range(0, len(rows), ROWS_PER_BLOCK):
            pick = order[lo : lo + ROWS_PER_BLOCK]
            file_rows = rows[pick]
            n = np.maximum(1, n_cells[pick]).astype(np.float64)[:, None]
            n_minus = np.maximum(1, n_cells[pick] - 1).astype(np.float64)[:, None]
            s = np.asarray(f["sum"][np.sort(file_rows)], dtype=np.float64)
            back = np.argsort(np.argsort(file_rows))  # h5py reads sorted rows; undo
            s = s[back]
            sq = np.asarray(f["sumsq"][np.sort(file_rows)], dtype=np.float64)[back]
            ge1 = np.asarray(f["ge1"][np.sort(file_rows)], dtype=np.int64)[back]
            means[pick] = s / n
            var[pick] = (sq - s**2 / n) / n_minus
            frac[pick] = ge1 / n
    return MarkerInput(source, level, [str(x) for x in leaves], [str(g) for g in genes], n_cells, means, var, frac)


@dataclass(frozen=True)
class MarkerThresholds:
    """cell_type_mapper's ``reference_markers`` options that change the result, with its defaults."""

    p_th: float = 0.01
    q1_th: float = 0.5
    q1_min_th: float = 0.1
    qdiff_th: float = 0.7
    qdiff_min_th: float = 0.1
    log2_fold_th: float = 1.0
    log2_fold_min_th: float = 0.8
    n_valid: int = 30
    exact_penetrance: bool = False

    def check(self) -> None:
        """One line per bad option, as cell_type_mapper refuses them."""
        if not 1e-11 <= self.p_th <= 1:
            msg = f"p_th must be in [1e-11, 1] (cell_type_mapper's range), not {self.p_th}"
            raise BigcatInputError(msg)
        for name, high, low in (("q1", self.q1_th, self.q1_min_th), ("qdiff", self.qdiff_th, self.qdiff_min_th),
                                ("log2_fold", self.log2_fold_th, self.log2_fold_min_th)):  # fmt: skip
            if not self.exact_penetrance and high <= low:
                msg = f"{name}_th must be > {name}_min_th; you have {name}_th={high}, {name}_min_th={low}"
                raise BigcatInputError(msg)
        if self.n_valid < 1:
            msg = f"n_valid must be at least 1, not {self.n_valid}"
            raise BigcatInputError(msg)

    @property
    def array(self) -> np.ndarray:
        return np.array([self.q1_th, self.qdiff_th, self.log2_fold_th, self.q1_min_th, self.qdiff_min_th,
                         self.log2_fold_min_th])  # fmt: skip


def boring_t(p_th: float) -> float | None:
    """cell_type_mapper's ``boring_t_from_p_value``: |t| at or below it gets p = 1 (a normal
    quantile found by interpolation on a grid — reproduced, not improved, so the same genes
    count as tested)."""
    from scipy.special import ndtr  # what scipy.stats.norm.cdf computes, without importing scipy.stats

    if p_th >= 1.0:
        return None
    gross_t = np.arange(-7, 0, 1)
    gross_cdf = ndtr(gross_t)
    idx = int(np.searchsorted(gross_cdf, 0.5 * p_th))
    if idx >= len(gross_t) - 1:
        return None
    fine_t = np.linspace(gross_t[idx - 1], gross_t[idx + 1], 1000)
    return float(-np.interp(0.5 * p_th, ndtr(fine_t), fine_t))


def leaf_pairs(n_leaves: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) of leaves in ``itertools.combinations`` order (cell_type_mapper's pair index)."""
    p1, p2 = np.triu_indices(n_leaves, 1)
    return p1.astype(np.int32), p2.astype(np.int32)


def reference_markers(
    stats: str | os.PathLike,
    out: str | os.PathLike,
    *,
    p_th: float = 0.01,
    q1_th: float = 0.5,
    q1_min_th: float = 0.1,
    qdiff_th: float = 0.7,
    qdiff_min_th: float = 0.1,
    log2_fold_th: float = 1.0,
    log2_fold_min_th: float = 0.8,
    n_valid: int = 30,
    exact_penetrance: bool = False,
    genes: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    storage_options: dict | None = None,
) -> Path | str:
    """MapMyCells' reference markers for every pair of leaves, as cell_type_mapper's
    ``reference_markers`` finds them, written as its ``reference_markers.h5``.

    Parameters
    ----------
    stats
        A ``precomputed_stats.h5`` (``bigcat stats DATA --format mapmycells --out …`` or
        cell_type_mapper's own): per leaf ``n_cells``, ``sum``, ``sumsq`` and ``ge1`` of
        log2(CPM + 1), the genes and the taxonomy tree.
    out
        The ``reference_markers.h5`` to write (atomically; a path or a URL).
    p_th, q1_th, q1_min_th, qdiff_th, qdiff_min_th, log2_fold_th, log2_fold_min_th, n_valid, exact_penetrance
        cell_type_mapper's options, with its defaults: a marker of a pair has a Holm-adjusted
        Welch p < ``p_th`` and passes the penetrance test on q1 = max(P₁, P₂), qdiff =
        |P₁ − P₂|/q1 (P the fraction of cells with x ≥ 1) and |Δmean| — exactly
        (``exact_penetrance``: q1 > q1_th, qdiff > qdiff_th, fold > log2_fold_th) or, by
        default, approximately: the genes nearest to those thresholds until ``n_valid`` pass,
        never below the ``*_min_th`` floors.
    genes
        Genes that may be markers (cell_type_mapper's ``query_path``: the query's genes);
        default every gene whose name does not start with ``INVALID_MARKER``.
    overwrite, progress, storage_options
        As elsewhere in bigcat.

    Returns
    -------
    The path written.

    Notes
    -----
    The pairs run through bigcat's pairwise-DE engine (:mod:`bigcat.de.engine`) tile by tile:
    one float32 pass per pair over the genes finds those whose p can pass Holm (exact in float64
    from there); exact p-values (scipy's Student t CDF, clipped as cell_type_mapper clips it)
    only for those; the penetrance test in one compiled pass. Memory: the leaves' means,
    variances and fractions (3 × leaves × genes × 8 bytes) and float32 means and var / n
    (2 × leaves × genes × 4 bytes) plus bounded buffers; the markers stream to disk.
    """
    th = MarkerThresholds(p_th, q1_th, q1_min_th, qdiff_th, qdiff_min_th, log2_fold_th, log2_fold_min_th,
                          int(n_valid), bool(exact_penetrance))  # fmt: skip
    th.check()
    started = time.time()
    data = read_marker_input(stats, storage_options)
    if len(data.leaves) < 2:
        msg = f"{data.source}: {len(data.leaves)} leaf in the taxonomy; reference markers need at least two"
        raise BigcatInputError(msg)
    gene_ok = _allowed_genes(data, genes)
    from bigcat.mapmycells._writer import write_reference_markers

    config = {
        "precomputed_path": absolute(stats), "p_th": p_th, "q1_th": q1_th, "q1_min_th": q1_min_th,
        "qdiff_th": qdiff_th, "qdiff_min_th": qdiff_min_th, "log2_fold_th": log2_fold_th,
        "log2_fold_min_th": log2_fold_min_th, "n_valid": int(n_valid), "exact_penetrance": bool(exact_penetrance),
        "query_genes": None if genes is None else len(gene_ok.nonzero()[0]),
    }  # fmt: skip
    chunks = _marker_chunks(data, gene_ok, th, progress)
    return write_reference_markers(out, data, chunks, config=config, started=started, overwrite=overwrite,
                                   storage_options=storage_options)  # fmt: skip


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute (what cell_type_mapper records); a URL as it is."""
    from bigcat._io import fs

    return str(path) if fs.is_url(path) else str(Path(path).resolve())


def _allowed_genes(data: MarkerInput, genes: Sequence[str] | None) -> np.ndarray:
    ok = np.array([not g.startswith(INVALID_PREFIX) for g in data.genes], dtype=bool)
    if genes is not None:
        wanted = set(map(str, genes))
        ok &= np.array([g in wanted for g in data.genes], dtype=bool)
        if not ok.any():
            msg = (f"{data.source}: none of the {len(wanted):,} genes given is a gene of the reference "
                   f"(e.g. {', '.join(list(map(str, genes))[:3])} vs {', '.join(data.genes[:3])})")  # fmt: skip
            raise BigcatInputError(msg)
    return ok


def _marker_chunks(data: MarkerInput, gene_ok: np.ndarray, th: MarkerThresholds, progress: bool | None) -> Any:
    """``(up_counts, up_genes, down_counts, down_genes)`` chunk by chunk of pairs, in pair order
    (the engine runs a chunk's pairs tile by tile and puts them back in order)."""
    from bigcat.de import engine
    from bigcat.mapmycells import _kernels
    from bigcat.progress import progress_bar

    p1, p2 = leaf_pairs(len(data.leaves))
    # ν ≤ n₁ + n₂ − 2: the table reaches the two largest leaves
    safe = _kernels.safe_table(th.p_th / len(data.genes), float(2 * data.n_cells.max(initial=2)))
    runner = engine.MarkerRun(data, th.p_th, boring_t(th.p_th), safe)
    # in a row of at most fail_rows candidates, Holm holds a pending gene to p_th/(m − fail_rows + 1)
    # at the least: one certainly above it fails, and needs no exact p
    fail_rows = runner.width
    fail = _kernels.fail_table(th.p_th / max(1, len(data.genes) - fail_rows + 1),
                               float(2 * data.n_cells.max(initial=2)))  # fmt: skip
    n_valid = min(th.n_valid, len(data.genes))
    lists = _kernels.expressed_lists(data.frac, th.array)

    def select(c1: np.ndarray, c2: np.ndarray, rows: Any, found: np.ndarray, m: np.ndarray) -> tuple:
        # p = 0 for the genes certainly below p_th/m; the others' p from their signed t (in stats)
        # and ν (in dfs) in one vectorized call
        at_row, at_col, t, nu = _kernels.pending(rows.pvals, rows.stats, rows.dfs, found, fail, fail_rows)
        rows.pvals[at_row, at_col] = _kernels.pvalues(t, nu)
        up, down = np.zeros(len(c1), dtype=np.int64), np.zeros(len(c1), dtype=np.int64)
        _kernels.select(found, rows.genes, rows.pvals, m, c1, c2, data.n_cells, data.means, data.frac, gene_ok,
                        th.p_th, th.array, th.exact_penetrance, n_valid, up, down, *lists)  # fmt: skip
        # (pairs × markers): up genes, then down genes, then padding
        return up, down, rows.genes[:, : int((up + down).max(initial=0))]

    with progress_bar(total=len(p1), unit="pairs", desc="reference markers", enabled=progress) as bar:
        for up, down, block in runner.chunks(p1, p2, select):
            bar.update(len(up))
            cols = np.arange(block.shape[1])[None, :]
            yield up, block[cols < up[:, None]], down, block[(cols >= up[:, None]) & (cols < (up + down)[:, None])]
