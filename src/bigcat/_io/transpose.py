"""Transposing a CSC matrix into CSR row blocks through buckets on a temporary disk."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from bigcat._io.backends import native
from bigcat._io.source import MatrixSource, block_bounds
from bigcat.kernels import check_compressed

__all__ = ["csc_row_blocks"]


def csc_row_blocks(
    source: MatrixSource, max_nnz: int, max_rows: int | None
) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    """The rows of a CSC ``source`` as CSR blocks of about ``max_nnz`` values, in order.

    One pass counts the values per row, a second scatters column batches into per-bucket
    files on a temporary disk, then each bucket is assembled: time and temporary disk are
    O(nnz), memory O(max_nnz).
    """
    n_rows, n_cols = source.shape
    col_bounds = block_bounds(source.indptr, max_nnz)
    indices = source.root()[source.element]["indices"]
    row_counts = np.zeros(n_rows, dtype=np.int64)
    for lo, hi in itertools.pairwise(col_bounds):
        chunk = native(np.asarray(indices[source.indptr[lo] : source.indptr[hi]]))
        bad, unsorted = check_compressed(chunk, source.indptr[lo : hi + 1] - source.indptr[lo], n_rows)
        if bad >= 0:
            source.out_of_range(int(bad + source.indptr[lo]), chunk[bad], n_rows)
        if unsorted >= 0:  # duplicates are summed when the columns are read: count those
            chunk = source.read_columns(int(lo), int(hi)).indices
        row_counts += np.bincount(chunk, minlength=n_rows)
    row_ptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(row_counts, out=row_ptr[1:])
    bounds = block_bounds(row_ptr, max_nnz, max_rows)
    with tempfile.TemporaryDirectory(prefix="bigcat-transpose-") as tmp:
        files = [
            {name: Path(tmp, f"{b}.{name}").open("wb") for name in ("row", "col", "data")}  # noqa: SIM115
            for b in range(len(bounds) - 1)
        ]
        try:
            for lo, hi in itertools.pairwise(col_bounds):
                piece = source.read_columns(int(lo), int(hi)).tocsr()
                for b, (r0, r1) in enumerate(itertools.pairwise(bounds)):
                    part = piece[r0:r1].tocoo()
                    files[b]["row"].write(part.row.astype(np.int64).tobytes())
                    files[b]["col"].write((part.col.astype(np.int64) + lo).tobytes())
                    files[b]["data"].write(part.data.astype(source.dtype).tobytes())
        finally:
            for handles in files:
                for handle in handles.values():
                    handle.close()
        for b, (r0, r1) in enumerate(itertools.pairwise(bounds)):
            row = np.fromfile(Path(tmp, f"{b}.row"), dtype=np.int64)
            col = np.fromfile(Path(tmp, f"{b}.col"), dtype=np.int64)
            data = np.fromfile(Path(tmp, f"{b}.data"), dtype=source.dtype)
            order = np.argsort(row, kind="stable")  # columns stay ascending within a row
            block = sp.csr_matrix(
                (
                    data[order],
                    col[order].astype(np.int32 if n_cols < 2**31 else np.int64),
                    row_ptr[r0 : r1 + 1] - row_ptr[r0],
                ),
                shape=(int(r1 - r0), n_cols),
            )
            for name in ("row", "col", "data"):
                Path(tmp, f"{b}.{name}").unlink()
            yield int(r0), int(r1), block
