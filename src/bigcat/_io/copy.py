"""The parallel copy of a CSR matrix into the sparse layout: a task per shard.

In CSR, ``data`` and ``indices`` are in the same order in the input and the output, so
shard ``k`` of each output array is the input's element range ``k``: no two tasks touch
the same file, and no task needs another's result.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from bigcat._io.backends import native
from bigcat.errors import BigcatInputError

__all__ = ["COPY_TASK", "STEPS", "UnsortedIndicesError", "copy_csr"]

#: the task-key prefix of the parallel copy, and what to change when a worker dies running
#: one (bigcat.cli)
COPY_TASK = "bigcat-copy"
STEPS = {COPY_TASK: ("convert (copying a shard of values)", "a smaller --shard-values")}


class UnsortedIndicesError(BigcatInputError):
    """A CSR X with unsorted or duplicated entries met by the parallel copy, which keeps
    the input's element ranges and so cannot sum duplicates."""


def _copy_csr_range(source: Any, data: Any, indices: Any, lo: int, hi: int, row_starts: np.ndarray) -> int:
    """One task of :func:`copy_csr`: element range ``lo:hi``, whose rows
    begin at ``row_starts`` (relative to ``lo``)."""
    from bigcat.kernels import check_shard

    x = source.root()["X"]
    values = native(np.asarray(x["data"][lo:hi])).astype(data.dtype, copy=False)
    columns = native(np.asarray(x["indices"][lo:hi]))
    bad, unsorted = check_shard(columns, row_starts, source.shape[1])
    if bad >= 0:
        source.out_of_range(int(bad) + lo, columns[bad], source.shape[1])
    if unsorted >= 0:
        row = int(np.searchsorted(source.indptr, lo + unsorted, side="right")) - 1
        msg = (
            f"{source.path}: X row {row} has unsorted or duplicated column indices; the parallel copy keeps "
            "the input's values as stored, so convert without --cluster (client=None), which sorts them and "
            "sums duplicates as scipy does"
        )
        raise UnsortedIndicesError(msg)
    data[lo:hi] = values
    indices[lo:hi] = columns.astype(indices.dtype, copy=False)
    return hi - lo


def copy_csr(writer: Any, source: Any, client: Any, progress: Any = None) -> None:
    """Copy the values of a whole CSR ``source`` into a sparse-layout ``writer``'s arrays,
    a task per shard on a Dask ``client``: every task reads its element range (validating
    column indices) and writes exactly one shard of each array. The workers must see both
    paths. ``progress(first element)`` after each task."""
    from bigcat._scheduling import completed

    indptr = source.indptr
    nnz = int(indptr[-1])
    for array in (writer.data, writer.indices):
        array.array.resize((nnz,))
        array.n_written = nnz
    ranges = [(lo, min(lo + writer.shard, nnz)) for lo in range(0, nnz, writer.shard)]
    starts = indptr[1:-1]
    starts = starts[np.r_[True, np.diff(starts) > 0]] if len(starts) else starts  # not empty rows twice

    def row_starts(lo: int, hi: int) -> np.ndarray:
        a, b = np.searchsorted(starts, [lo, hi])
        return (starts[a:b] - lo).astype(np.int64)

    futures = [
        client.submit(
            _copy_csr_range,
            source,
            writer.data.array,
            writer.indices.array,
            lo,
            hi,
            row_starts(lo, hi),
            pure=False,
            key=f"{COPY_TASK}-{os.getpid()}-{id(writer)}-{lo}",
        )
        for lo, hi in ranges
    ]
    for future in completed(client, futures, what="the parallel copy"):
        future.result()
        if progress is not None:
            progress(int(future.key.rsplit("-", 1)[1]))
