"""The tasks of a statistics pass: allocating accumulators, reading blocks, folding a block
into an accumulator with the compiled kernel, adding partial results and finishing them."""

from __future__ import annotations

from typing import Any

import numpy as np

from bigcat._io.source import MatrixSource
from bigcat._memory import BufferPool, prefault, small_pages
from bigcat.errors import BigcatInputError
from bigcat.stats.statistics import EXTRA, _Settings, _zero_passes

__all__ = ["zeros"]


def zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A zero-filled accumulator on :func:`bigcat._memory.small_pages`, touched now, in order.

    Left to be first touched where the kernel accumulates (scattered, on several threads at
    once), the pages cost several times the system time (``docs/design.md``).
    """
    out = small_pages(shape, dtype)
    if not prefault(out):
        out.fill(0)
    return out


def _init_task(settings: _Settings, n_clusters: int, n_genes: int, views: dict | None) -> dict:
    """A zeroed accumulator piece (its clusters × all output genes): views into the final
    result when running in-process, else new arrays."""
    if views is not None:
        for view in views.values():
            if not prefault(view):  # fresh zero pages (small_pages): touched, not written
                view.fill(0)
        return views
    return {
        name: zeros(settings.shape(name, n_clusters, n_genes), settings.dtype(name)) for name in settings.accumulators
    }


_EMPTY_F = np.zeros((0, 0), dtype=np.float64)


def _fold_task(
    acc: dict,
    block: tuple,
    codes: np.ndarray,
    gene_map: np.ndarray,
    totals: np.ndarray | None,
    settings: _Settings,
    c_lo: int,
) -> dict:
    """Fold one block into one accumulator piece, in place (the piece has a single owner:
    this chain of tasks), and hand it on."""
    from bigcat import kernels

    kind, data, indices, indptr, col_offset = block
    if settings.normalize:
        _check_counts(data)
    if kind == "csr":
        identity = kernels.is_identity(gene_map)  # every gene, in order: no map to look up
        kernels.fold_csr(
            data,
            indices,
            indptr,
            col_offset,
            codes,
            None if identity else gene_map,
            (np.zeros(0, dtype=np.float64) if totals is None else totals) if settings.normalize else None,
            settings.threshold,
            settings.op_ge,
            settings.count_fails,
            c_lo,
            acc.get("sums"),
            acc.get("sqr_sums"),
            acc.get("present_counts"),
            acc.get("nnz"),
            acc.get(EXTRA),
            settings.tests if EXTRA in acc else None,
        )
        return acc
    kernels.fold_csc(
        data,
        indices,
        indptr,
        col_offset,
        codes,
        gene_map,
        np.zeros(0, dtype=np.float64) if totals is None else totals,
        settings.normalize,
        settings.threshold,
        settings.op_ge,
        settings.count_fails,
        c_lo,
        acc.get("sums", _EMPTY_F),
        acc.get("sqr_sums", _EMPTY_F),
        acc.get("present_counts", np.zeros((0, 0), settings.counts)),
        acc.get("nnz", np.zeros((0, 0), settings.counts)),
        acc.get(EXTRA, np.zeros((0, 0, 0), settings.counts)),
        settings.tests,
    )
    return acc


class _NegativeValuesError(BigcatInputError):
    """Raised inside a task; :func:`cluster_stats` adds the input's name."""


def _check_counts(data: np.ndarray) -> None:
    """log2 CPM needs counts: refuse negative values (NaN passes; it propagates)."""
    if data.size and data.dtype.kind in "fi" and np.nanmin(data, initial=0) < 0:
        n = int(np.count_nonzero(data < 0))
        msg = (
            f"X has negative values ({n} in one block, e.g. {data[data < 0][0]:g}): normalize='log2cpm' needs "
            "raw counts; compute on the values as they are (no normalize) if X is already normalized"
        )
        raise _NegativeValuesError(msg)


def _read_rows(source: MatrixSource, start: int, stop: int, pool: BufferPool | None = None, *_after: Any) -> tuple:
    block = source.read_rows(start, stop, pool=pool)
    return ("csr", block.data, block.indices, block.indptr, 0)


def _read_columns(source: MatrixSource, start: int, stop: int, *_after: Any) -> tuple:
    block = source.read_columns(start, stop)
    return ("csc", block.data, block.indices, block.indptr, start)


def _chunk_block(chunk: Any, col_offset: int) -> tuple:
    """A Dask chunk (pydata sparse, scipy sparse or NumPy) as a CSR block."""
    import scipy.sparse as sp

    if hasattr(chunk, "tocsr"):
        block = chunk.tocsr()
    elif hasattr(chunk, "to_scipy_sparse"):
        block = chunk.to_scipy_sparse().tocsr()
    else:
        block = sp.csr_matrix(np.asarray(chunk))
    block = sp.csr_matrix(block)
    return ("csr", block.data, block.indices, block.indptr.astype(np.int64), col_offset)


def _column_totals(source: MatrixSource, start: int, stop: int) -> np.ndarray:
    block = source.read_columns(start, stop)
    return np.bincount(block.indices, weights=block.data.astype(np.float64), minlength=source.shape[0])


def _chunk_row_totals(chunk: Any) -> np.ndarray:
    _, data, _, indptr, _ = _chunk_block(chunk, 0)
    from bigcat.kernels import row_sums_csr

    return row_sums_csr(data, indptr)[:, None]


def _sum_arrays(*arrays: np.ndarray) -> np.ndarray:
    out = arrays[0].copy()
    for a in arrays[1:]:
        out += a
    return out


def _add_task(first: dict, *others: dict) -> dict:
    for other in others:
        for name, values in other.items():
            first[name] += values
    return first


def _token_task(*_folds: Any) -> None:
    return None


def _finalize_task(acc: dict, n_cells: np.ndarray, settings: _Settings) -> dict:
    if settings.count_fails and "present_counts" in acc:
        present = acc["present_counts"]
        np.subtract(n_cells[:, None].astype(present.dtype), present, out=present)
    if EXTRA in acc:
        for t, (_, threshold, op_ge) in enumerate(settings.extra):
            if _zero_passes(threshold, op_ge):
                counts = acc[EXTRA][:, t, :]
                np.subtract(n_cells[:, None].astype(counts.dtype), counts, out=counts)
    return acc
