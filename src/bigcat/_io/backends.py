"""The containers a matrix is read from, chosen once when a source is opened.

Each backend knows how to open its container (an ``.h5ad`` through h5py, locally or through
fsspec; a Zarr store through zarr), how to read a range of a compressed matrix's values
into a caller's buffer, where the annotations live (AnnData encodings, or the dense
layout's xarray coordinates) and what identifies the container's metadata. A backend
pickles as its path and options: Dask workers reopen it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from bigcat._io import annotations as anno
from bigcat._io.fs import filesystem, is_url, zarr_store
from bigcat.errors import BigcatFormatError

__all__ = ["AnnDataZarr", "Backend", "DenseZarr", "H5ad", "native"]


def native(array: np.ndarray) -> np.ndarray:
    """The same values in native byte order (HDF5 files may be big-endian)."""
    if array.dtype.byteorder not in ("=", "|") and array.dtype.byteorder != ("<" if np.little_endian else ">"):
        return array.astype(array.dtype.newbyteorder("="))
    return array


class Backend:
    """One container (file or store) holding AnnData elements."""

    #: the name of the kind of container, in messages
    name: ClassVar[str]
    #: read every block of a pass into a ring of reused buffers (see ``iter_row_blocks``)
    reuse_ring: ClassVar[bool] = False
    #: read values into fresh buffers of small pages when the caller gives none
    fresh_buffers: ClassVar[bool] = False
    #: a bigcat dense-layout store: X alone, annotations as coordinates
    dense_layout: ClassVar[bool] = False

    def __init__(self, path: Path | str, storage_options: dict | None = None) -> None:
        self.path = path
        self.storage_options = storage_options
        self._closed()

    def __getstate__(self) -> dict:
        return {"path": self.path, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.path, self.storage_options = state["path"], state["storage_options"]
        self._closed()

    def _closed(self) -> None:
        """Forget what is open and cached (a new or unpickled backend opens on first use)."""
        self._root: Any = None

    def root(self) -> Any:
        """The open root group (opened on first use)."""
        if self._root is None:
            self._root = self._open()
        return self._root

    def _open(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Close what is open (reopened on the next use)."""
        self._root = None

    def read_into(self, array: Any, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
        """Elements ``lo:hi`` of a 1-D ``array`` into ``out``, in native byte order."""
        raise NotImplementedError

    def narrows(self, array: Any) -> bool:  # noqa: ARG002 - none here
        """Whether :meth:`read_into` reads the integers of ``array`` into a narrower integer
        dtype, checking that each fits."""
        return False

    def frame(self, key: str, length: int) -> pd.DataFrame:
        """obs (``key="obs"``) or var with ``length`` rows."""
        return anno.anndata_frame(self.root(), key, length, self.path)

    def dataframe_group(self, key: str) -> Any:
        """The group of obs/var in anndata's ≥ 0.7 encoding, to read columns on their own."""
        return anno.modern_frame(self.root(), key)

    def uns(self) -> dict:
        return anno.read_uns(self.root(), self.path)

    def metadata(self, fs: Any, inner: str) -> bytes:  # noqa: ARG002 - the base has none
        """Bytes that identify a remote container's content besides its size and date."""
        return b""


class H5ad(Backend):
    """An ``.h5ad`` (HDF5) file, read through fsspec block by block when it is a URL."""

    name = "h5ad"
    reuse_ring = True

    def _open(self) -> Any:
        import h5py

        try:
            if is_url(self.path):  # never downloaded whole
                fs, inner = filesystem(str(self.path), self.storage_options)
                self._file = fs.open(inner, "rb", block_size=8 << 20, cache_type="readahead")
                return h5py.File(self._file, "r")
            return h5py.File(self.path, "r")
        except OSError as error:
            msg = f"{self.path}: cannot be read as HDF5 ({error}); is it truncated?"
            raise BigcatFormatError(msg) from error

    def close(self) -> None:
        for handle in (self._root, getattr(self, "_file", None)):
            if handle is not None:
                with contextlib.suppress(Exception):
                    handle.close()
        self._root = self._file = None

    def read_into(self, array: Any, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
        if hi > lo:
            array.read_direct(out, np.s_[lo:hi], np.s_[0 : hi - lo])
        return out


class AnnDataZarr(Backend):
    """A Zarr store in the AnnData encoding (bigcat's sparse layout, or anndata's own)."""

    name = "zarr"
    fresh_buffers = True

    def _closed(self) -> None:
        super()._closed()
        self._shard_readers: dict[str, Any] = {}

    def _open(self) -> Any:
        import zarr

        return zarr.open_group(zarr_store(self.path, self.storage_options), mode="r")

    def read_into(self, array: Any, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
        """Through bigcat's shard reader when the array is encoded as bigcat writes it, else
        through zarr (both decode into ``out``). Integers may be read into a narrower integer
        ``out`` through the shard reader only (see :meth:`narrows`)."""
        reader = self.shard_reader(array)
        narrowed = array.dtype.kind in "iu" and out.dtype.kind in "iu" and out.dtype.itemsize < array.dtype.itemsize
        if reader is not None and (out.dtype == array.dtype or narrowed):
            reader.read(lo, hi, out)
        else:
            from zarr.core.buffer import default_buffer_prototype

            array.get_basic_selection(slice(lo, hi), out=default_buffer_prototype().nd_buffer.from_numpy_array(out))
        return native(out)

    def shard_reader(self, array: Any) -> Any:
        """bigcat's reader of ``array`` (a :class:`~bigcat._io.shards.ShardReader`), ``None``
        when zarr must read it."""
        key = array.path
        if key not in self._shard_readers:
            from bigcat._io.shards import ShardReader

            self._shard_readers[key] = ShardReader.for_array(array)
        return self._shard_readers[key]

    def narrows(self, array: Any) -> bool:
        """Whether the integers of ``array`` can be read into a narrower integer dtype."""
        return array.dtype.kind in "iu" and self.shard_reader(array) is not None

    def metadata(self, fs: Any, inner: str) -> bytes:
        meta = f"{inner.rstrip('/')}/zarr.json"
        return fs.cat_file(meta) if fs.exists(meta) else b""


class DenseZarr(AnnDataZarr):
    """bigcat's dense layout: an xarray Dataset ``X(cell, gene)``, annotations as coordinates."""

    name = "zarr-dense"
    dense_layout = True

    def frame(self, key: str, length: int) -> pd.DataFrame:  # noqa: ARG002 - the store knows its length
        return anno.xarray_frame(self.path, key, self.storage_options)

    def dataframe_group(self, key: str) -> Any:  # noqa: ARG002 - coordinates, not groups
        return None

    def uns(self) -> dict:
        return {}
