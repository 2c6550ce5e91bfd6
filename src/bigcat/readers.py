"""Reading cell-by-gene matrices lazily from ``.h5ad`` files and bigcat/AnnData Zarr stores.

A :class:`MatrixSource` knows the shape, dtype and on-disk encoding of ``X`` (CSR, CSC
or dense), reads its obs/var annotations, and reads row (or column) ranges without ever
loading the whole matrix. It validates the sparse structure as it reads (anndata does
not, and silently returns wrong numbers for corrupt files). Sources pickle: they hold a
path, not an open file, so Dask workers can reopen them.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from bigcat.errors import (
    BigcatFormatError,
    BigcatInputError,
    BigcatStoreIncompleteError,
    CorruptMatrixError,
    InputNotFoundError,
)
from bigcat.store import _native, read_marker
from bigcat.util import PageArena, small_pages

__all__ = ["BufferPool", "MatrixSource", "block_bounds", "open_source"]

log = logging.getLogger("bigcat")

#: default number of stored values read per row block (64 MB of float32 + indices)
BLOCK_NNZ = 8_000_000
#: buffers in the ring of :meth:`MatrixSource.iter_row_blocks` with ``reuse=True``
REUSE_BUFFERS = 3
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def block_bounds(indptr: np.ndarray, max_nnz: int, max_rows: int | None = None) -> np.ndarray:
    """Row-block boundaries so each block holds at most ``max_nnz`` values (and ``max_rows`` rows).

    A single row with more than ``max_nnz`` values forms a block of its own. Returns
    ``[0, b1, …, n_rows]``.
    """
    n_rows = len(indptr) - 1
    if n_rows <= 0:
        return np.array([0, 0], dtype=np.int64) if n_rows == 0 else np.array([0], dtype=np.int64)
    bounds = [0]
    start = 0
    while start < n_rows:
        target = indptr[start] + max_nnz
        stop = int(np.searchsorted(indptr, target, side="right")) - 1
        stop = max(stop, start + 1)
        if max_rows is not None:
            stop = min(stop, start + max_rows)
        stop = min(stop, n_rows)
        bounds.append(stop)
        start = stop
    return np.asarray(bounds, dtype=np.int64)


def _kind_of_path(path: Path) -> str:
    if path.is_dir():
        if (path / "zarr.json").is_file() or (path / ".zgroup").is_file():
            return "zarr"
        msg = f"{path}: is a folder but not a Zarr store (no zarr.json or .zgroup)"
        raise BigcatFormatError(msg)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    with path.open("rb") as handle:
        head = handle.read(8)
    if head == HDF5_SIGNATURE:
        return "h5ad"
    if suffix in (".h5ad", ".h5"):
        msg = f"{path}: not an HDF5 file (bad signature); is it truncated or mislabelled?"
        raise BigcatFormatError(msg)
    msg = f"{path}: unknown file type {suffix or '(no extension)'!r}; bigcat reads .h5ad, .zarr and .parquet"
    raise BigcatFormatError(msg)


def _kind_of_url(url: str, storage_options: dict | None) -> str:
    from bigcat import fs

    suffix = fs.suffix_of(url)
    if suffix == ".parquet":
        return "parquet"
    filesystem, inner = fs.filesystem(url, storage_options)
    if filesystem.isdir(inner):
        for meta in ("zarr.json", ".zgroup"):
            if filesystem.exists(f"{inner.rstrip('/')}/{meta}"):
                return "zarr"
        msg = f"{url}: is a folder but not a Zarr store (no zarr.json or .zgroup)"
        raise BigcatFormatError(msg)
    with filesystem.open(inner, "rb") as handle:
        head = handle.read(8)
    if head == HDF5_SIGNATURE:
        return "h5ad"
    msg = f"{url}: not an HDF5 file or a Zarr store; bigcat reads .h5ad, .zarr and .parquet"
    raise BigcatFormatError(msg)


def open_source(
    path: str | os.PathLike, *, require_marker: bool = True, storage_options: dict | None = None
) -> MatrixSource:
    """Open the matrix stored at ``path`` (``.h5ad`` or a Zarr store) for lazy reading.

    Parameters
    ----------
    path
        An ``.h5ad`` file, a bigcat Zarr store (either layout) or an AnnData Zarr store.
    require_marker
        Refuse Zarr stores without bigcat's completion marker (default). AnnData Zarr
        stores written by other tools carry none; pass ``False`` to read them anyway.

    Raises
    ------
    InputNotFoundError, BigcatFormatError, BigcatStoreIncompleteError, CorruptMatrixError
    """
    from bigcat import fs

    if fs.is_url(path):
        path = str(path)
        if not fs.exists(path, storage_options):
            msg = f"{path}: no such object"
            raise InputNotFoundError(msg)
        kind = _kind_of_url(path, storage_options)
    else:
        path = fs.local(path)
        if not path.exists():
            msg = f"{path}: no such file or directory"
            raise InputNotFoundError(msg)
        kind = _kind_of_path(path)
    if kind == "h5ad":
        return MatrixSource(path, "h5ad", storage_options)
    if kind == "zarr":
        marker = read_marker(path, storage_options)
        if marker is not None and not marker.get("complete"):
            msg = f"{path}: incomplete store (its writer never finished); convert again"
            raise BigcatStoreIncompleteError(msg)
        if marker is None and require_marker:
            msg = (
                f"{path}: not a complete bigcat store (no completion marker); if another tool wrote this "
                "AnnData Zarr store, convert it with `bigcat convert` or pass require_marker=False"
            )
            raise BigcatStoreIncompleteError(msg)
        if marker is not None and marker.get("layout") == "dense":
            return MatrixSource(path, "zarr-dense", storage_options)
        return MatrixSource(path, "zarr", storage_options)
    msg = f"{path}: a {kind} file holds no matrix"
    raise BigcatFormatError(msg)


class BufferPool:
    """Reusable 1-D arrays for blocks read concurrently by several tasks.

    Each block read into fresh memory costs first-touch page faults, which on virtual
    machines cost more than decoding the block (docs/design.md). :meth:`take` hands out a
    view of a pooled array that nothing else references any more (CPython's reference
    count: the block, every view of it and every matrix built on it keep the array busy),
    so a buffer is reused exactly when the block
    it held is gone, whichever task or thread let it go. New arrays are pieces of
    ``arena`` while it has room (see :class:`bigcat.util.PageArena`), else
    :func:`bigcat.util.small_pages`. At most ``limit`` arrays are kept; past that, or for
    a pickled copy (a pool never travels to other processes), plain new arrays are
    returned. Drop the pool to free its memory.
    """

    def __init__(self, limit: int = 16, size: int = 0, arena: PageArena | None = None) -> None:
        import threading

        self.limit = limit
        #: elements of each new array when the largest block is known (else a little more
        #: than the request): no slack to first-touch, and every buffer fits every block
        self.size = size
        self.arena = arena
        self.buffers: list[np.ndarray] = []
        self.lock = threading.Lock()
        probe = [np.empty(0)]
        for buffer in probe:  # the count of an idle buffer, seen from a loop over the buffers
            self._idle = sys.getrefcount(buffer)

    def __getstate__(self) -> dict:
        return {"limit": self.limit, "size": self.size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["limit"], state["size"])

    def take(self, n: int, dtype: Any) -> np.ndarray:
        """An array of ``n`` elements of ``dtype`` (uninitialised), reused when possible."""
        dtype = np.dtype(dtype)
        with self.lock:
            for buffer in self.buffers:
                if buffer.dtype == dtype and len(buffer) >= n and sys.getrefcount(buffer) <= self._idle:
                    return buffer[:n]
            # room for every block, or for blocks a little larger than this one
            size = max(n, self.size) if self.size else n + n // 8 + 1024
            buffer = self.arena.take(size, dtype) if self.arena is not None else None
            if buffer is None:
                buffer = small_pages(size, dtype)
            if len(self.buffers) < self.limit:
                self.buffers.append(buffer)
            return buffer[:n]

    def release(self) -> bool:
        """Forget every buffer; whether none of them was still in use (by a block, a view
        of one or a matrix built on one) — only then may the arena's memory be reused."""
        with self.lock:
            for buffer in self.buffers:
                if sys.getrefcount(buffer) > self._idle:
                    self.buffers.clear()
                    return False
            self.buffers.clear()
            return True


class MatrixSource:
    """Lazy access to ``X`` and the annotations of one file (see :func:`open_source`)."""

    def __init__(
        self, path: Path | str, container: str, storage_options: dict | None = None, element: str = "X"
    ) -> None:
        from bigcat import fs

        self.element = element  # "X", or another matrix of the file ("layers/counts", "raw/X")
        self.path = path if fs.is_url(path) else Path(path)
        self.url = fs.is_url(path)
        self.storage_options = storage_options
        self.container = container  # "h5ad", "zarr" (AnnData encoding) or "zarr-dense" (xarray layout)
        self._handle: Any = None
        self._file: Any = None
        self._describe()

    # -- pickling: a path, never an open file --------------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_file"] = None
        for key in ("indptr", "_shard_readers"):
            state.pop(key, None)
        return state

    def _root(self) -> Any:
        if self._handle is None:
            from bigcat import fs

            if self.container == "h5ad":
                import h5py

                try:
                    if self.url:  # read through fsspec, block by block, never downloading it whole
                        filesystem, inner = fs.filesystem(self.path, self.storage_options)
                        self._file = filesystem.open(inner, "rb", block_size=8 << 20, cache_type="readahead")
                        self._handle = h5py.File(self._file, "r")
                    else:
                        self._handle = h5py.File(self.path, "r")
                except OSError as error:
                    msg = f"{self.path}: cannot be read as HDF5 ({error}); is it truncated?"
                    raise BigcatFormatError(msg) from error
            else:
                import zarr

                self._handle = zarr.open_group(fs.zarr_store(self.path, self.storage_options), mode="r")
        return self._handle

    def close(self) -> None:
        """Close the open file handle, if any."""
        if self._handle is not None and self.container == "h5ad":
            with contextlib.suppress(Exception):
                self._handle.close()
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
        self._handle = None
        self._file = None

    def __enter__(self) -> MatrixSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def matrix(self, element: str) -> MatrixSource:
        """Another matrix of the same file (``"layers/counts"``, ``"raw/X"``, ``"obsm/X_pca"``),
        read the same way as X."""
        return MatrixSource(self.path, self.container, self.storage_options, element=element)

    # -- what X is ------------------------------------------------------------------------
    def _describe(self) -> None:
        root = self._root()
        if self.container == "zarr-dense":
            x = root[self.element]
            self.encoding = "dense"
            self.shape = tuple(int(s) for s in x.shape)
            self.dtype = np.dtype(x.dtype)
            return
        if self.element not in root:
            self._explain_missing_x(root)
        x = root[self.element]
        if _is_array(x):
            if len(x.shape) != 2:
                msg = f"{self.path}: {self.element} has {len(x.shape)} dimensions, expected 2"
                raise BigcatFormatError(msg)
            self.encoding = "dense"
            self.shape = tuple(int(s) for s in x.shape)
            self.dtype = np.dtype(x.dtype).newbyteorder("=")
            return
        attrs = dict(x.attrs)
        kind = attrs.get("encoding-type") or (
            f"{attrs['h5sparse_format']}_matrix" if "h5sparse_format" in attrs else None
        )
        shape = attrs.get("shape", attrs.get("h5sparse_shape"))
        if kind not in ("csr_matrix", "csc_matrix") or shape is None:
            msg = (
                f"{self.path}: {self.element} has unsupported encoding {kind!r}; expected a CSR/CSC matrix or a "
                "dense array"
            )
            raise BigcatFormatError(msg)
        for name in ("data", "indices", "indptr"):
            if name not in x:
                msg = f"{self.path}: {self.element}/{name} is missing"
                raise CorruptMatrixError(msg)
        self.encoding = kind[:3]
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(x["data"].dtype).newbyteorder("=")
        if x["data"].shape != x["indices"].shape:
            msg = (
                f"{self.path}: {self.element}/data has {x['data'].shape[0]} values but {self.element}/indices has "
                f"{x['indices'].shape[0]}"
            )
            raise CorruptMatrixError(msg)

    def _explain_missing_x(self, root: Any) -> None:
        if "obs" in root or "var" in root:
            msg = f"{self.path}: has no X matrix (an AnnData file with annotations only)"
        elif "matrix" in root and "barcodes" in root["matrix"]:
            msg = (
                f"{self.path}: is a 10x Genomics .h5 file, not AnnData; read it with scanpy.read_10x_h5 and "
                "write it with .write_h5ad first"
            )
        else:
            msg = f"{self.path}: is not an AnnData file (no X, obs or var); top-level entries: {sorted(root)[:8]}"
        raise BigcatFormatError(msg)

    @property
    def nnz(self) -> int:
        """Stored values (for dense X: the number of elements)."""
        if self.encoding == "dense":
            return self.shape[0] * self.shape[1]
        return int(self._root()[self.element]["data"].shape[0])

    @property
    def major_length(self) -> int:
        return self.shape[0] if self.encoding == "csr" else self.shape[1]

    @cached_property
    def indptr(self) -> np.ndarray:
        """The validated (int64) pointer array of a CSR/CSC X."""
        raw = self._root()[self.element]["indptr"]
        indptr = np.asarray(raw[...]).astype(np.int64)
        n = self.major_length
        where = f"{self.path}: {self.element}/indptr"
        if len(indptr) != n + 1:
            msg = f"{where} has {len(indptr)} entries, expected {n + 1} for shape {self.shape}"
            raise CorruptMatrixError(msg)
        if n >= 0 and indptr[0] != 0:
            msg = f"{where} starts at {indptr[0]}, not 0"
            raise CorruptMatrixError(msg)
        steps = np.diff(indptr)
        if (steps < 0).any():
            bad = int(np.flatnonzero(steps < 0)[0])
            msg = f"{where} is not monotone (decreases after entry {bad})"
            raise CorruptMatrixError(msg)
        if indptr[-1] != self.nnz:
            msg = f"{where} ends at {indptr[-1]} but {self.element}/data has {self.nnz} values"
            raise CorruptMatrixError(msg)
        return indptr

    # -- annotations ------------------------------------------------------------------------
    @cached_property
    def obs(self) -> pd.DataFrame:
        """Cell annotations (one row per cell, index = cell names)."""
        return self._frame("obs", self.shape[0])

    @cached_property
    def var(self) -> pd.DataFrame:
        """Gene annotations (one row per gene, index = gene names)."""
        return self._frame("var", self.shape[1])

    # -- single annotation columns, without reading (or importing anndata for) the whole frame --
    def _modern_frame(self, key: str) -> Any:
        """The obs/var group when it uses anndata's ≥ 0.7 dataframe encoding, else ``None``."""
        if self.container == "zarr-dense":
            return None
        root = self._root()
        if key not in root or _is_array(root[key]):
            return None
        group = root[key]
        return group if group.attrs.get("encoding-type") == "dataframe" else None

    def obs_columns(self) -> list[str]:
        """Names of the obs columns."""
        group = self._modern_frame("obs")
        if group is None:
            return [str(c) for c in self.obs.columns]
        return [str(c) for c in np.asarray(group.attrs.get("column-order", []), dtype=object)]

    def obs_column(self, name: str) -> Any:
        """One obs column (a ``pandas.Categorical`` or an array), read on its own.

        Plain and categorical columns of anndata's dataframe encoding are read directly;
        anything else (old files, nullable types) through anndata's reader of the whole frame.
        """
        group = self._modern_frame("obs")
        if group is not None and name in group:
            elem = group[name]
            kind = elem.attrs.get("encoding-type")
            if kind == "categorical":
                codes = np.asarray(elem["codes"][...])
                categories = _strings(elem["categories"])
                if len(codes) == self.shape[0]:
                    ordered = bool(elem.attrs.get("ordered", False))
                    return pd.Categorical.from_codes(codes, categories=categories, ordered=ordered)
            elif _is_array(elem) and kind in ("array", "string-array", None):
                values = _strings(elem)
                if len(values) == self.shape[0]:
                    return values
        if name not in self.obs.columns:
            raise KeyError(name)
        column = self.obs[name]
        return column.array if isinstance(column.dtype, pd.CategoricalDtype) else column.to_numpy()

    def obs_names(self) -> pd.Index:
        """Cell names."""
        return self._names("obs", self.shape[0])

    def var_names(self) -> pd.Index:
        """Gene names."""
        return self._names("var", self.shape[1])

    def _names(self, key: str, length: int) -> pd.Index:
        """The index of obs or var, read on its own when the encoding allows."""
        group = self._modern_frame(key)
        index_key = group.attrs.get("_index") if group is not None else None
        if index_key is not None and index_key in group and _is_array(group[index_key]):
            values = _strings(group[index_key])
            if len(values) == length:
                return pd.Index(values, dtype=object)
        return pd.Index(getattr(self, key).index.astype(str))

    def _frame(self, key: str, length: int) -> pd.DataFrame:
        if self.container == "zarr-dense":
            return _frame_from_xarray(self.path, key, self.storage_options)
        root = self._root()
        if key not in root:
            frame = pd.DataFrame(index=pd.RangeIndex(length).astype(str))
        elif _is_array(root[key]):  # anndata < 0.7: a compound dataset, categories in uns
            frame = self._legacy_frame(key)
        else:
            from anndata.io import read_elem

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frame = read_elem(root[key])
        if len(frame) != length:
            msg = f"{self.path}: {key} has {len(frame)} rows but X has {length}"
            raise BigcatFormatError(msg)
        return frame

    def _legacy_frame(self, key: str) -> pd.DataFrame:
        import anndata as ad

        from bigcat.fs import is_url

        if is_url(self.path):  # anndata reads this encoding from a path on a disk only
            msg = (
                f"{self.path}: written by anndata < 0.7 ({key} as a compound dataset), an encoding that is read "
                "from a local file only; download it and run `bigcat convert` on the local copy"
            )
            raise BigcatFormatError(msg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata = ad.read_h5ad(self.path, backed="r")
            try:
                return getattr(adata, key).copy()
            finally:
                adata.file.close()

    @cached_property
    def uns(self) -> dict:
        """Unstructured annotations (read fully; usually small)."""
        root = self._root()
        if self.container == "zarr-dense" or "uns" not in root or _is_array(root["uns"]):
            return {}
        from anndata.io import read_elem

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return dict(read_elem(root["uns"]))
            except Exception as error:  # noqa: BLE001 - old or exotic uns must not stop a conversion
                log.warning("%s: uns not readable (%s); leaving it out", self.path, error)
                return {}

    # -- reading X ----------------------------------------------------------------------------
    def read_rows(
        self,
        start: int,
        stop: int,
        buffers: tuple[np.ndarray, np.ndarray] | None = None,
        pool: BufferPool | None = None,
    ) -> sp.csr_matrix:
        """Rows ``start:stop`` as CSR (CSR or dense X; a CSC X must be read by columns).

        ``buffers``: (data, indices) arrays to read an ``.h5ad``'s values into (the block
        is then a view of them, valid until they are reused). Reusing memory matters: a
        fresh 64 MB array per block costs page faults that, on a VM, cost more than the read.
        ``pool``: take the arrays from this :class:`BufferPool` instead (any container).
        """
        x = self._root()[self.element]
        if self.encoding == "dense":
            block = _native(np.asarray(x[start:stop]))
            return sp.csr_matrix(block)
        if self.encoding != "csr":
            msg = f"{self.path}: {self.element} is CSC; read it by columns or with iter_row_blocks"
            raise BigcatInputError(msg)
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        if pool is not None and hi > lo and x["data"].dtype.isnative and x["indices"].dtype.isnative:
            buffers = (pool.take(hi - lo, x["data"].dtype), pool.take(hi - lo, x["indices"].dtype))
        if buffers is not None and self.container == "h5ad" and hi - lo <= min(len(b) for b in buffers):
            data, indices = buffers[0][: hi - lo], buffers[1][: hi - lo]
            if hi > lo:
                x["data"].read_direct(data, np.s_[lo:hi], np.s_[0 : hi - lo])
                x["indices"].read_direct(indices, np.s_[lo:hi], np.s_[0 : hi - lo])
        elif self.container == "zarr" and (buffers is None or hi - lo <= min(len(b) for b in buffers)):
            if buffers is None:
                buffers = (small_pages(hi - lo, x["data"].dtype), small_pages(hi - lo, x["indices"].dtype))
            data, indices = buffers[0][: hi - lo], buffers[1][: hi - lo]
            self._read_zarr(x, "data", lo, hi, data)
            self._read_zarr(x, "indices", lo, hi, indices)
            data, indices = _native(data), _native(indices)
        else:
            data = _native(np.asarray(x["data"][lo:hi]))
            indices = _native(np.asarray(x["indices"][lo:hi]))
        return self._compressed("csr", data, indices, self.indptr[start : stop + 1] - lo, start, lo)

    def _read_zarr(self, x: Any, name: str, lo: int, hi: int, out: np.ndarray) -> None:
        """Elements ``lo:hi`` of ``X/name`` into ``out``: through bigcat's shard reader when
        the array is encoded as bigcat writes it, else through zarr (both decode into ``out``)."""
        readers = self.__dict__.setdefault("_shard_readers", {})
        if name not in readers:
            from bigcat.store import ShardReader

            readers[name] = ShardReader.for_array(x[name]) if x[name].dtype == out.dtype else None
        if readers[name] is not None:
            readers[name].read(lo, hi, out)
        else:
            from zarr.core.buffer import default_buffer_prototype

            x[name].get_basic_selection(slice(lo, hi), out=default_buffer_prototype().nd_buffer.from_numpy_array(out))

    def read_columns(self, start: int, stop: int) -> sp.csc_matrix:
        """Columns ``start:stop`` as CSC (CSC or dense X)."""
        x = self._root()[self.element]
        if self.encoding == "dense":
            return sp.csc_matrix(_native(np.asarray(x[:, start:stop])))
        if self.encoding != "csc":
            msg = f"{self.path}: {self.element} is CSR; read it by rows"
            raise BigcatInputError(msg)
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        data = _native(np.asarray(x["data"][lo:hi]))
        indices = _native(np.asarray(x["indices"][lo:hi]))
        return self._compressed("csc", data, indices, self.indptr[start : stop + 1] - lo, start, lo)

    def _compressed(
        self, kind: str, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, first: int, offset: int
    ) -> Any:
        """A checked CSR/CSC block of major rows (columns) ``first…`` whose values start at
        element ``offset`` of X: column indices in range (else :class:`CorruptMatrixError`
        naming the element), and in canonical order. A block with unsorted or duplicated
        entries — legal in scipy and anndata, where duplicates add up — is sorted and its
        duplicates summed, as ``scipy.sparse``'s ``sum_duplicates`` does, so every consumer
        (statistics, conversion) sees the matrix scipy and anndata see."""
        from bigcat.kernels import check_compressed

        n_major = len(indptr) - 1
        bound = self.shape[1] if kind == "csr" else self.shape[0]
        bad, unsorted = check_compressed(indices, indptr, bound)
        if bad >= 0:
            self._out_of_range(int(bad) + offset, indices[bad], bound)
        shape = (n_major, self.shape[1]) if kind == "csr" else (self.shape[0], n_major)
        block = (sp.csr_matrix if kind == "csr" else sp.csc_matrix)((data, indices, indptr), shape=shape)
        if unsorted < 0:
            block.has_canonical_format = True
            return block
        if not self.__dict__.get("_warned_unsorted"):
            self.__dict__["_warned_unsorted"] = True
            axis = "row" if kind == "csr" else "column"
            log.warning(
                "%s: %s %s %d has unsorted or duplicated indices; duplicated entries are summed, as scipy and "
                "anndata do",
                self.path,
                self.element,
                axis,
                first + int(unsorted),
            )
        block.has_canonical_format = False
        block.sum_duplicates()
        return block

    def _out_of_range(self, position: int, value: Any, bound: int) -> None:
        msg = f"{self.path}: {self.element}/indices[{position}] = {value} is out of range [0, {bound})"
        raise CorruptMatrixError(msg)

    def _check_indices(self, indices: np.ndarray, bound: int, offset: int) -> None:
        if len(indices) and (indices.min() < 0 or indices.max() >= bound):
            bad = int(np.flatnonzero((indices < 0) | (indices >= bound))[0])
            self._out_of_range(bad + offset, indices[bad], bound)

    def row_bounds(self, max_nnz: int = BLOCK_NNZ, max_rows: int | None = None) -> np.ndarray:
        """Row-block boundaries of about ``max_nnz`` stored values each (CSR or dense X)."""
        if self.encoding == "csr":
            return block_bounds(self.indptr, max_nnz, max_rows)
        rows = max(1, max_nnz // max(self.shape[1], 1))
        if max_rows is not None:
            rows = min(rows, max_rows)
        return np.unique(np.r_[np.arange(0, self.shape[0], rows), self.shape[0]]).astype(np.int64)

    def iter_row_blocks(
        self, max_nnz: int = BLOCK_NNZ, max_rows: int | None = None, *, reuse: bool = False, start: int = 0
    ) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        """Yield ``(start, stop, csr_block)`` covering all rows in order, in bounded memory.

        ``start``: begin at this row (a resumed conversion); earlier rows are not read
        (except through a CSC X's transposition, which needs a whole pass).

        ``reuse``: read an ``.h5ad``'s blocks into a ring of ``REUSE_BUFFERS`` preallocated
        buffers; a block stays valid until ``REUSE_BUFFERS - 1`` more have been produced
        (enough for a consumer one block behind a prefetching producer).

        A CSC X is transposed through row buckets on a temporary disk: one pass counts
        the values per row, a second scatters column batches into per-bucket files, then
        each bucket is assembled; time and temporary disk are O(nnz), memory O(max_nnz).
        """
        if self.encoding == "csc":
            for lo, hi, block in self._csc_row_blocks(max_nnz, max_rows):
                if hi > start:
                    yield max(lo, start), hi, block[max(start - lo, 0) :] if lo < start else block
            return
        bounds = self.row_bounds(max_nnz, max_rows)
        if start:
            bounds = np.r_[start, bounds[bounds > start]].astype(np.int64)
        ring = None
        if reuse and self.encoding == "csr" and self.container == "h5ad" and len(bounds) > 1:
            size = int(np.max(self.indptr[bounds[1:]] - self.indptr[bounds[:-1]]))
            x = self._root()[self.element]
            ring = [
                (small_pages(size, self.dtype), small_pages(size, np.dtype(x["indices"].dtype).newbyteorder("=")))
                for _ in range(REUSE_BUFFERS)
            ]
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            buffers = ring[i % len(ring)] if ring else None
            yield int(lo), int(hi), self.read_rows(int(lo), int(hi), buffers)

    def _csc_row_blocks(self, max_nnz: int, max_rows: int | None) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        n_rows, n_cols = self.shape
        col_bounds = block_bounds(self.indptr, max_nnz)
        indices = self._root()[self.element]["indices"]
        row_counts = np.zeros(n_rows, dtype=np.int64)
        from bigcat.kernels import check_compressed

        for lo, hi in itertools.pairwise(col_bounds):
            chunk = _native(np.asarray(indices[self.indptr[lo] : self.indptr[hi]]))
            bad, unsorted = check_compressed(chunk, self.indptr[lo : hi + 1] - self.indptr[lo], n_rows)
            if bad >= 0:
                self._out_of_range(int(bad + self.indptr[lo]), chunk[bad], n_rows)
            if unsorted >= 0:  # duplicates are summed when the columns are read: count those
                chunk = self.read_columns(int(lo), int(hi)).indices
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
                    piece = self.read_columns(int(lo), int(hi)).tocsr()
                    for b, (r0, r1) in enumerate(itertools.pairwise(bounds)):
                        part = piece[r0:r1].tocoo()
                        files[b]["row"].write(part.row.astype(np.int64).tobytes())
                        files[b]["col"].write((part.col.astype(np.int64) + lo).tobytes())
                        files[b]["data"].write(part.data.astype(self.dtype).tobytes())
            finally:
                for handles in files:
                    for handle in handles.values():
                        handle.close()
            for b, (r0, r1) in enumerate(itertools.pairwise(bounds)):
                row = np.fromfile(Path(tmp, f"{b}.row"), dtype=np.int64)
                col = np.fromfile(Path(tmp, f"{b}.col"), dtype=np.int64)
                data = np.fromfile(Path(tmp, f"{b}.data"), dtype=self.dtype)
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

    # -- identity -------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """What identifies this input: path, size, mtime, shape, and a hash of its first and last MB."""
        digest = hashlib.blake2b(digest_size=16)
        if self.url:
            from bigcat import fs

            filesystem, inner = fs.filesystem(self.path, self.storage_options)
            info = filesystem.info(inner)
            if self.container != "h5ad":
                meta = f"{inner.rstrip('/')}/zarr.json"
                digest.update(filesystem.cat_file(meta) if filesystem.exists(meta) else b"")
            return {
                "path": self.path,
                "size": int(info.get("size") or 0),
                "etag": str(info.get("ETag", "")),
                "mtime": str(info.get("LastModified", info.get("mtime", ""))),
                "shape": list(self.shape),
                "nnz": self.nnz,
                "blake2b": digest.hexdigest(),
            }
        stat = self.path.stat()
        if self.path.is_file():
            with self.path.open("rb") as handle:
                digest.update(handle.read(1 << 20))
                if stat.st_size > 2 << 20:
                    handle.seek(-(1 << 20), os.SEEK_END)
                    digest.update(handle.read(1 << 20))
        else:
            for meta in sorted(self.path.rglob("zarr.json"))[:64]:
                digest.update(meta.read_bytes())
        return {
            "path": str(self.path.resolve()),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "shape": list(self.shape),
            "nnz": self.nnz,
            "blake2b": digest.hexdigest(),
        }


def _strings(node: Any) -> np.ndarray:
    """An HDF5/Zarr array as NumPy; strings (bytes, StringDType) as an object array of str."""
    values = np.asarray(node[...])
    if values.dtype.kind == "O" and len(values) and isinstance(values.flat[0], bytes):
        return np.array([v.decode() for v in values], dtype=object)
    if values.dtype.kind == "S":
        return np.array([v.decode() for v in values], dtype=object)
    if values.dtype.kind in ("T", "U"):
        return values.astype(object)
    return values


def _is_array(node: Any) -> bool:
    return hasattr(node, "shape") and hasattr(node, "dtype")


def _frame_from_xarray(path: Path | str, key: str, storage_options: dict | None = None) -> pd.DataFrame:
    """obs or var of a dense-layout store, with original column names and categoricals restored."""
    import xarray as xr

    from bigcat.fs import zarr_store
    from bigcat.store import COLUMNS_KEY

    ds = xr.open_zarr(zarr_store(path, storage_options), consolidated=True)
    dim = "cell" if key == "obs" else "gene"
    mapping = ds.attrs.get(COLUMNS_KEY, {}).get(key)
    if mapping is None:  # not written by bigcat: every 1-D coordinate on the dimension
        mapping = {name: name for name, coord in ds.coords.items() if name != dim and coord.dims == (dim,)}
    columns = {}
    for original, name in mapping.items():
        coord = ds.coords[name]
        values = coord.values
        if values.dtype.kind in ("T", "U"):
            values = values.astype(object)
        categorical = coord.attrs.get("categorical")
        if categorical is not None:
            values = pd.Categorical(values, categories=categorical["categories"], ordered=categorical["ordered"])
        columns[original] = values
    return pd.DataFrame(columns, index=pd.Index(ds[dim].values.astype(object), dtype=object))
