"""Statistics derived from the additive accumulators, computed when read."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from xarray.backends import BackendArray
from xarray.core import indexing

from bigcat.stats.statistics import statistic

__all__ = ["DerivedArray"]

#: outputs larger than this (elements) are computed on several threads
PARALLEL_ABOVE = 1 << 24
#: values per slab (rows of clusters computed at once: a 16 MB float64 temporary)
SLAB_VALUES = 1 << 21


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class DerivedArray(BackendArray):
    """One float32 statistic over the float64 accumulators, computed when read.

    Wrapped as an xarray lazily indexed backend array (the protocol of xarray's file
    backends): a slice of the statistic computes only that slice, and ``.load()`` or
    ``.values`` compute the whole statistic once, in slabs of clusters (no float64
    temporary of full size), straight into its float32 output. (A one-chunk Dask array
    would do the same, but Dask copies a single-chunk result when it is computed: more
    peak memory and a second pass per statistic.)
    """

    def __init__(self, name: str, acc: dict[str, np.ndarray], n_cells: np.ndarray) -> None:
        self.name, self.acc = name, acc
        self.n = np.asarray(n_cells, dtype=np.float64)
        self.shape = next(a for a in acc.values() if a.ndim == 2).shape
        self.dtype = np.dtype(np.float32)

    def compute(self, out: np.ndarray | None = None) -> np.ndarray:
        """The whole statistic, into ``out`` (float32, the full shape) when given."""
        return self._basic((slice(None), slice(None)), out)

    def __getitem__(self, key: Any) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC, self._basic)

    def _basic(self, key: tuple, out: np.ndarray | None = None) -> np.ndarray:
        """Basic indexing: a tuple of slices and integers, one per dimension; computed into
        ``out`` (float32, the selection's 2-D shape) when given."""
        key = tuple(key) + (slice(None),) * (2 - len(key))
        squeeze = tuple(i for i, k in enumerate(key) if not isinstance(k, slice))
        rows, cols = (k if isinstance(k, slice) else slice(int(k), int(k) + 1) for k in key)
        row_ids = np.arange(*rows.indices(self.shape[0]))
        contiguous = rows.step in (None, 1)
        shape = (len(row_ids), len(range(*cols.indices(self.shape[1]))))
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32:
            msg = f"out must be float32 of shape {shape}, not {out.dtype} {out.shape}"
            raise ValueError(msg)
        step = max(1, SLAB_VALUES // max(out.shape[1], 1))

        def fill(i: int) -> None:
            slab = row_ids[i : i + step]
            out[i : i + step] = self._compute(slice(slab[0], slab[-1] + 1) if contiguous else slab, cols)

        starts = range(0, len(row_ids), step)
        if out.size < PARALLEL_ABOVE:
            for i in starts:
                fill(i)
        else:  # NumPy releases the GIL: slabs on every core (first-touching the output is the cost)
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(_cores(), thread_name_prefix="bigcat-derive") as threads:
                list(threads.map(fill, starts))
        return out.squeeze(axis=squeeze) if squeeze else out

    def _compute(self, rows: slice | np.ndarray, cols: slice) -> np.ndarray:
        stat = statistic(self.name)
        assert stat.finalize is not None
        with np.errstate(invalid="ignore", divide="ignore"):
            return stat.finalize({name: self.acc[name][rows, cols] for name in stat.needs}, self.n[rows, None])
