"""Writing a matrix given as consecutive CSR row blocks: the two Zarr layouts (see
:mod:`bigcat._io.layout`) and ``.h5ad``, published atomically (:mod:`bigcat._io.publish`),
resumable for Zarr (:mod:`bigcat._io.checkpoints`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from bigcat._io import fs
from bigcat._io.annotations import COLUMNS_KEY, annotation_coords, clean_frame, write_anndata_elements
from bigcat._io.checkpoints import Checkpoints, partial_store
from bigcat._io.layout import (
    DENSE_CHUNK_CELLS,
    DENSE_CHUNK_GENES,
    FORMAT_VERSION,
    H5AD_CHUNK,
    LAYOUTS,
    MARKER_KEY,
    SPARSE_CHUNK,
    SPARSE_SHARD,
    Layout,
    bigcat_version,
    sparse_compressors,
)
from bigcat._io.publish import publish
from bigcat._io.shards import GrowingArray
from bigcat._io.sniff import output_kind
from bigcat.errors import BigcatInputError

#: the largest index (and number of stored values) an int32 CSR holds
INT32_MAX = int(np.iinfo(np.int32).max)


def csr_index_dtype(n_genes: int, nnz: int | None) -> np.dtype:
    """The one dtype of a CSR's ``indptr`` and ``indices``, as scipy chooses it: int32 when
    the column count and the number of stored values fit (``nnz`` an upper bound; ``None``:
    unknown), int64 for both otherwise. Mixed dtypes (int64 indptr beside int32 indices) are
    what anndata reads back as they are and numba kernels refuse (scanpy 1.12's
    ``sc.get.aggregate`` through fast-array-utils: "indptr and indices must have the same dtype")."""
    fits = n_genes <= INT32_MAX and nnz is not None and nnz <= INT32_MAX
    return np.dtype(np.int32 if fits else np.int64)


__all__ = ["MatrixWriter", "open_writer"]

log = logging.getLogger("bigcat")


def _complete(root: Any, store: Any, marker: dict) -> None:
    """Write the completion marker and consolidate the metadata: the store is now whole."""
    import zarr
    from zarr.errors import UnstableSpecificationWarning

    root.attrs[MARKER_KEY] = marker
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        # uns of old files holds structured and fixed-width string arrays: zarr notes that v3
        # has no specification for them, which is nothing for the user to act on
        warnings.filterwarnings("ignore", category=UnstableSpecificationWarning)
        zarr.consolidate_metadata(store)


class MatrixWriter(ABC):
    """Receives a matrix as consecutive CSR row blocks and writes it to one output."""

    #: whether ``write_rows`` is done with the block when it returns (so its memory may be reused)
    copies_blocks: bool = False

    def __init__(self, n_cells: int, n_genes: int, dtype: np.dtype) -> None:
        self.n_cells = n_cells
        self.n_genes = n_genes
        self.dtype = np.dtype(dtype)
        self.rows_written = 0
        self.nnz_written = 0
        #: progress records of a resumable conversion (set by :func:`open_writer`)
        self.checkpoints: Checkpoints | None = None
        #: the AnnData group the elements besides X go to (``None``: the layout has none)
        self.group: Any = None
        #: where the output is written (the final path, or the temporary one while finishing)
        self.path: Any = None

    def write_rows(self, block: sp.csr_matrix | sp.csr_array) -> None:
        """Append the next rows (a CSR block with all genes)."""
        if block.shape[1] != self.n_genes:
            msg = f"block has {block.shape[1]} genes, expected {self.n_genes}"
            raise ValueError(msg)
        if self.rows_written + block.shape[0] > self.n_cells:
            msg = f"more rows than the {self.n_cells} announced"
            raise ValueError(msg)
        self._write(block)
        self.rows_written += block.shape[0]
        self.nnz_written += block.nnz
        if self.checkpoints is not None:
            self._checkpoint(self.checkpoints)

    def _checkpoint(self, checkpoints: Checkpoints) -> None:  # noqa: B027 - resumable writers record progress here
        """Record the rows that are safely written (resumable writers only)."""

    def resume(self, state: dict, checkpoints: Checkpoints) -> None:
        """Continue an interrupted write from ``state`` (see :class:`Checkpoints`)."""
        msg = f"{type(self).__name__} cannot resume"
        raise NotImplementedError(msg)

    @abstractmethod
    def _write(self, block: sp.csr_matrix) -> None: ...

    @abstractmethod
    def finish(self, marker: dict) -> None:
        """Write what remains and the completion marker."""

    def abort(self) -> None:  # noqa: B027 - optional hook
        """Release resources after a failure (the temporary output is removed by the caller)."""


class SparseZarrWriter(MatrixWriter):
    """The ``sparse`` layout: AnnData Zarr v3 with sharded CSR arrays."""

    x: Any  # the X group

    copies_blocks = True

    def __init__(
        self,
        path: Path | str,
        obs: pd.DataFrame,
        var: pd.DataFrame,
        uns: Mapping,
        dtype: np.dtype,
        marker: dict,
        storage_options: dict | None = None,
        shard: int = SPARSE_SHARD,
        resume: bool = False,
        nnz: int | None = None,
    ) -> None:
        import zarr

        from bigcat._io.fs import zarr_store

        super().__init__(len(obs), len(var), dtype)
        self.path = path
        self.store = zarr_store(path, storage_options, read_only=False)
        self.shard = shard
        # an object store cannot rename an array, so the index dtype is fixed up front from the
        # bound on the values (every cell × gene when the caller knows none)
        index_dtype = csr_index_dtype(self.n_genes, self.n_cells * self.n_genes if nnz is None else nnz)
        self.row_nnz = np.zeros(self.n_cells, dtype=np.int64)
        if resume:  # the arrays are there: :meth:`resume` takes over
            self.root = zarr.open_group(self.store, mode="r+", zarr_format=3)
            self.group = self.root
            self.x = self.root["X"]
            index_dtype = np.dtype(self.x["indices"].dtype)
            if nnz is not None and csr_index_dtype(self.n_genes, nnz) == np.int64 and index_dtype != np.int64:
                # an interrupted conversion by a version that wrote int32 indices beside int64 indptr
                msg = (f"{path}: the interrupted conversion stores int32 indices, but its {nnz:,} values need "
                       "int64 ones (indptr and indices share one dtype); convert again without --resume")  # fmt: skip
                raise BigcatInputError(msg)
            self.index_dtype = index_dtype
            self.data = GrowingArray(self.x["data"], shard, self.dtype)
            self.indices = GrowingArray(self.x["indices"], shard, index_dtype)
            return
        self.index_dtype = index_dtype
        self.root = zarr.open_group(self.store, mode="w-", zarr_format=3)
        self.group = self.root
        self.root.attrs[MARKER_KEY] = {**marker, "complete": False}
        write_anndata_elements(self.root, obs, var, uns)
        x = self.root.create_group(
            "X",
            attributes={
                "encoding-type": "csr_matrix",
                "encoding-version": "0.1.0",
                "shape": [self.n_cells, self.n_genes],
            },
        )
        self.x = x
        kwargs: dict[str, Any] = {
            "shape": (0,),
            "chunks": (min(SPARSE_CHUNK, shard),),
            "shards": (shard,),
            "compressors": sparse_compressors(),
            "fill_value": 0,
            # zarr's check for all-fill chunks compares every value through a void view (a
            # string comparison loop): it halved write speed, and CSR chunks are never empty
            "config": {"write_empty_chunks": True},
        }
        self.data = GrowingArray(x.create_array("data", dtype=self.dtype, **kwargs), shard, self.dtype)
        self.indices = GrowingArray(x.create_array("indices", dtype=index_dtype, **kwargs), shard, index_dtype)

    def resume(self, state: dict, checkpoints: Checkpoints) -> None:
        counts = checkpoints.adopt(state)
        self.rows_written, self.nnz_written = checkpoints.rows, checkpoints.nnz
        self.row_nnz[: len(counts)] = counts
        for array in (self.data, self.indices):
            array.restart(self.nnz_written)

    def _checkpoint(self, checkpoints: Checkpoints) -> None:
        """After each whole shard of both arrays: the rows whose values all lie before it."""
        done = min(self.data.durable, self.indices.durable)
        if done <= checkpoints.nnz:
            return
        first = checkpoints.rows
        ends = checkpoints.nnz + np.cumsum(self.row_nnz[first : self.rows_written])
        rows = first + int(np.searchsorted(ends, done, side="right"))
        if rows > first:
            checkpoints.save(rows, int(ends[rows - first - 1]), self.row_nnz[first:rows])

    def _write(self, block: sp.csr_matrix) -> None:
        if self.index_dtype == np.int32 and self.nnz_written + block.nnz > INT32_MAX:
            msg = f"{self.path}: more stored values than the bound the int32 indices were chosen for"
            raise RuntimeError(msg)
        start = self.rows_written
        self.row_nnz[start : start + block.shape[0]] = np.diff(block.indptr)
        self.data.append(np.asarray(block.data, dtype=self.dtype))
        self.indices.append(np.asarray(block.indices, dtype=self.index_dtype))

    def copy_csr(self, source: Any, client: Any, progress: Any = None) -> None:
        """Copy a whole CSR source shard by shard as parallel tasks on a Dask ``client``
        (instead of :meth:`write_rows`; see :func:`bigcat._io.copy.copy_csr`)."""
        from bigcat._io.copy import copy_csr

        copy_csr(self, source, client, progress)
        self.row_nnz[:] = np.diff(source.indptr)
        self.rows_written = self.n_cells
        self.nnz_written = int(source.indptr[-1])

    def abort(self) -> None:
        """Wait for the background writes (so none races the removal of the output)."""
        for array in (self.data, self.indices):
            with contextlib.suppress(Exception):
                array.close()

    def finish(self, marker: dict) -> None:

        self.data.close()
        self.indices.close()
        indptr = np.zeros(self.n_cells + 1, dtype=np.int64)
        np.cumsum(self.row_nnz, out=indptr[1:])
        indptr = indptr.astype(self.index_dtype, copy=False)  # the indices' dtype (the copy wrote no more)
        n = len(indptr)
        chunk = min(SPARSE_CHUNK, self.shard, max(n, 1))
        self.x.create_array(
            "indptr",
            shape=(n,),
            dtype=self.index_dtype,
            chunks=(chunk,),
            shards=(max(chunk, min(self.shard, n)) // chunk * chunk,),
            compressors=sparse_compressors(),
            fill_value=0,
        )[:] = indptr
        if self.checkpoints is not None:
            self.checkpoints.remove()
        _complete(self.root, self.store, marker)


class DenseZarrWriter(MatrixWriter):
    """The ``dense`` layout: an xarray Dataset ``X(cell, gene)`` in Zarr v3."""

    array: Any  # X

    def __init__(
        self,
        path: Path,
        obs: pd.DataFrame,
        var: pd.DataFrame,
        dtype: np.dtype,
        marker: dict,
        chunk_cells: int = DENSE_CHUNK_CELLS,
        chunk_genes: int = DENSE_CHUNK_GENES,
        storage_options: dict | None = None,
        resume: bool = False,
    ) -> None:
        import dask.array as da
        import xarray as xr
        import zarr

        from bigcat._io.fs import zarr_store

        super().__init__(len(obs), len(var), dtype)
        self.path = path
        self.store = zarr_store(path, storage_options, read_only=False)
        self.pending: list[sp.csr_matrix] = []
        self.n_pending = 0
        self.next_row = 0
        self.nnz_flushed = 0
        self.chunk_cells = max(1, min(chunk_cells, self.n_cells or 1))
        self.chunk_genes = max(1, min(chunk_genes, self.n_genes))
        if resume:  # the store is there: :meth:`resume` takes over
            self.root = zarr.open_group(self.store, mode="r+")
            self.array = self.root["X"]
            return
        coords, names = annotation_coords(obs, var)
        chunks = (self.chunk_cells, self.chunk_genes)
        template = da.zeros((self.n_cells, self.n_genes), dtype=self.dtype, chunks=chunks)
        ds = xr.Dataset(
            {"X": (("cell", "gene"), template)},
            coords=coords,
            attrs={MARKER_KEY: {**marker, "complete": False}, COLUMNS_KEY: names},
        )
        encoding = {
            "X": {
                "chunks": chunks,
                "compressors": sparse_compressors(),
                "fill_value": 0,
            }
        }
        for name in coords:
            encoding.setdefault(name, {})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            ds.to_zarr(self.store, mode="w-", compute=False, zarr_format=3, consolidated=False, encoding=encoding)
        self.root = zarr.open_group(self.store, mode="r+")
        self.array = self.root["X"]

    def resume(self, state: dict, checkpoints: Checkpoints) -> None:
        checkpoints.adopt(state, counts=False)
        self.rows_written = self.next_row = checkpoints.rows
        self.nnz_written = self.nnz_flushed = checkpoints.nnz

    def _checkpoint(self, checkpoints: Checkpoints) -> None:
        """After each whole chunk row: the rows flushed so far."""
        checkpoints.save(self.next_row, self.nnz_flushed, None)

    def _write(self, block: sp.csr_matrix) -> None:
        self.pending.append(block)
        self.n_pending += block.shape[0]
        while self.n_pending >= self.chunk_cells:
            self._flush(self.chunk_cells)

    def _flush(self, n_rows: int) -> None:
        rows = sp.vstack(self.pending, format="csr") if len(self.pending) > 1 else self.pending[0]
        head, tail = rows[:n_rows], rows[n_rows:]
        for start in range(0, self.n_genes, self.chunk_genes):
            stop = min(start + self.chunk_genes, self.n_genes)
            self.array[self.next_row : self.next_row + n_rows, start:stop] = head[:, start:stop].toarray()
        self.next_row += n_rows
        self.nnz_flushed += head.nnz
        self.pending = [tail] if tail.shape[0] else []
        self.n_pending = tail.shape[0]

    def finish(self, marker: dict) -> None:

        if self.n_pending:
            self._flush(self.n_pending)
        if self.checkpoints is not None:
            self.checkpoints.remove()
        _complete(self.root, self.store, marker)


class H5adWriter(MatrixWriter):
    """An ``.h5ad`` file with a CSR ``X`` (uncompressed, chunked, like anndata's default)."""

    def __init__(self, path: Path, obs: pd.DataFrame, var: pd.DataFrame, uns: Mapping, dtype: np.dtype) -> None:
        import h5py

        super().__init__(len(obs), len(var), dtype)
        self.path = path
        # free-space tracking: the int32 indices given up when the values outgrow them (see
        # :meth:`_widen`) are reused by what is written after
        self.file = h5py.File(path, "w-", fs_strategy="fsm", fs_persist=False)
        self.group = self.file
        write_anndata_elements(self.file, obs, var, uns)
        x = self.file.create_group("X")
        x.attrs.update(
            {
                "encoding-type": "csr_matrix",
                "encoding-version": "0.1.0",
                "shape": np.array([self.n_cells, self.n_genes]),
            }
        )
        # int32 (scipy's choice) until the values outgrow it; then indices become int64
        index_dtype = csr_index_dtype(self.n_genes, 0)
        self.data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype=self.dtype, chunks=(H5AD_CHUNK,))
        self.indices = x.create_dataset(
            "indices", shape=(0,), maxshape=(None,), dtype=index_dtype, chunks=(H5AD_CHUNK,)
        )
        self.x = x
        self.row_nnz = np.zeros(self.n_cells, dtype=np.int64)

    def _write(self, block: sp.csr_matrix) -> None:
        start, n = self.nnz_written, block.nnz
        if self.indices.dtype == np.int32 and start + n > INT32_MAX:
            self._widen()
        self.row_nnz[self.rows_written : self.rows_written + block.shape[0]] = np.diff(block.indptr)
        for dataset, values in ((self.data, block.data), (self.indices, block.indices)):
            dataset.resize((start + n,))
            dataset[start : start + n] = values

    def _widen(self) -> None:
        """The values outgrow int32: copy the indices written so far into int64 ones."""
        n = self.nnz_written
        wide = self.x.create_dataset("indices.int64", shape=(n,), maxshape=(None,), dtype=np.int64,
                                     chunks=(H5AD_CHUNK,))  # fmt: skip
        step = 64 * H5AD_CHUNK
        for lo in range(0, n, step):
            wide[lo : min(lo + step, n)] = self.indices[lo : min(lo + step, n)]
        del self.x["indices"]
        self.x.move("indices.int64", "indices")
        self.indices = self.x["indices"]

    def finish(self, marker: dict) -> None:
        indptr = np.zeros(self.n_cells + 1, dtype=np.int64)
        np.cumsum(self.row_nnz, out=indptr[1:])
        self.x.create_dataset("indptr", data=indptr.astype(self.indices.dtype, copy=False))
        # the mark of a file bigcat wrote (``--overwrite`` replaces only those); published by rename
        self.file.attrs[MARKER_KEY] = json.dumps({**marker, "complete": True}, default=str)
        self.file.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.file.close()


@contextlib.contextmanager
def open_writer(
    path: str | os.PathLike,
    *,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    dtype: np.dtype | type,
    uns: Mapping | None = None,
    layout: Layout = "sparse",
    overwrite: bool = False,
    source: dict | None = None,
    chunk_cells: int = DENSE_CHUNK_CELLS,
    storage_options: dict | None = None,
    resume: bool | None = None,
    shard: int = SPARSE_SHARD,
    nnz: int | None = None,
) -> Iterator[MatrixWriter]:
    """Open an output for a matrix written as row blocks; publish it atomically on success.

    Parameters
    ----------
    path
        ``.h5ad`` or ``.zarr`` output.
    obs, var
        Cell and gene annotations (their lengths give the shape).
    dtype
        dtype of the stored values.
    uns
        Unstructured annotations (h5ad and sparse layout only).
    layout
        ``"sparse"`` or ``"dense"`` for ``.zarr`` outputs.
    overwrite
        Replace an existing output (a directory only if bigcat wrote it).
    source
        Description of the input, recorded in the completion marker.
    chunk_cells
        Rows per chunk of the dense layout.
    storage_options
        fsspec options when ``path`` is a URL (see :mod:`bigcat._io.fs`).
    resume
        ``None``: a plain output. ``False``/``True``: a resumable ``.zarr`` output (see
        :mod:`bigcat._io.checkpoints`); ``True`` continues an interrupted conversion of the same input
        with the same settings. The writer's ``rows_written`` then says where to go on.
    shard
        Values per shard (file) of the sparse layout's ``data`` and ``indices``.
    nnz
        An upper bound on the values to be stored, if known: the sparse layout's ``indptr``
        and ``indices`` are int32 when it (and the gene count) fit, int64 otherwise (unknown:
        cells × genes). An ``.h5ad`` starts with int32 and widens both when the values
        outgrow it. Either way ``indptr`` and ``indices`` share one dtype, as in scipy.

    Yields
    ------
    MatrixWriter
        Call ``write_rows`` with consecutive CSR blocks covering all cells (from row
        ``rows_written`` on).
    """
    kind = output_kind(path)
    if layout not in LAYOUTS:
        msg = f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}"
        raise BigcatInputError(msg)
    if resume and kind != "zarr":
        msg = f"{path}: --resume works for .zarr outputs only"
        raise BigcatInputError(msg)
    obs = clean_frame(obs, "cell", path)
    var = clean_frame(var, "gene", path)
    dtype = np.dtype(dtype)
    marker = {
        "format_version": FORMAT_VERSION,
        "layout": layout if kind == "zarr" else "h5ad",
        "bigcat_version": bigcat_version(),
        "shape": [len(obs), len(var)],
        "source": source or {},
    }
    if resume is None or kind != "zarr":
        where = publish(
            path, overwrite=overwrite, storage_options=storage_options, kind="zarr" if kind == "zarr" else "file"
        )
    else:
        settings = {
            "source": source or {},
            "layout": layout,
            "dtype": dtype.str,
            "shape": [len(obs), len(var)],
            "format_version": FORMAT_VERSION,
            **({"shard": shard} if layout == "sparse" else {"chunk_cells": chunk_cells}),
        }
        where = partial_store(
            path, settings=settings, overwrite=overwrite, resume=bool(resume), storage_options=storage_options
        )
    with where as target:
        tmp, checkpoints, state = target if isinstance(target, tuple) else (target, None, None)
        writer: MatrixWriter
        if kind == "h5ad":
            writer = H5adWriter(tmp, obs, var, uns or {}, dtype)
        elif layout == "sparse":
            writer = SparseZarrWriter(
                tmp, obs, var, uns or {}, dtype, marker, storage_options, shard=shard, resume=bool(state), nnz=nnz
            )
        else:
            writer = DenseZarrWriter(
                tmp,
                obs,
                var,
                dtype,
                marker,
                chunk_cells=chunk_cells,
                storage_options=storage_options,
                resume=bool(state),
            )
        with _finishing(writer, fs.path_of(path), tmp, marker):
            if state:
                writer.resume(state, checkpoints)
            writer.checkpoints = checkpoints
            yield writer


@contextlib.contextmanager
def _finishing(writer: MatrixWriter, final: Any, tmp: Any, marker: dict) -> Iterator[None]:
    """Finish ``writer`` (writing into ``tmp``) when the block succeeded with every row
    written, abort it otherwise; ``writer.path`` says ``final`` to the caller."""
    writer.path = final
    try:
        yield
        if writer.rows_written != writer.n_cells:
            msg = f"{final}: wrote {writer.rows_written} of {writer.n_cells} rows"
            raise RuntimeError(msg)
        writer.path = tmp
        writer.finish({**marker, "complete": True, "nnz": writer.nnz_written})
        writer.path = final
    except BaseException:
        writer.abort()
        raise
