"""Writing bigcat outputs: the two Zarr layouts, ``.h5ad``, atomic publication.

Layouts
-------
``sparse`` (default)
    The AnnData Zarr encoding, Zarr format 3: ``X`` is a ``csr_matrix`` group with
    ``data``/``indices``/``indptr`` arrays, ``obs``/``var``/``uns`` are written by anndata
    itself, metadata is consolidated. ``data`` and ``indices`` are sharded 1-D arrays
    (:data:`SPARSE_CHUNK` elements per chunk, :data:`SPARSE_SHARD` per shard/file), so a
    1M-cell atlas is a few hundred files and a row block of the Dask array reads a few
    contiguous chunks.
``dense``
    The plain xarray layout: variable ``X(cell, gene)`` chunked ``chunk_cells × 4000``,
    coordinates ``cell``, ``gene`` and every obs/var column; opens with
    ``xarray.open_zarr``.

Every store carries a completion marker, the root attribute ``bigcat`` with
``complete: true`` and a fingerprint of its source, written last (with the consolidated
metadata). A store without it was never finished and is refused by
:func:`bigcat.open_dataset`. Locally a store is also written under a temporary sibling
name and renamed into place when complete, so an interrupted run never leaves anything
under the final name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from bigcat.errors import BigcatInputError, BigcatOutputExistsError

__all__ = [
    "DENSE_CHUNK_GENES",
    "FORMAT_VERSION",
    "LAYOUTS",
    "MARKER_KEY",
    "MatrixWriter",
    "atomic_path",
    "coord_names",
    "open_writer",
    "output_kind",
    "read_marker",
]

log = logging.getLogger("bigcat")

LAYOUTS = ("sparse", "dense")
FORMAT_VERSION = 1
MARKER_KEY = "bigcat"
#: root attribute of the dense layout mapping original obs/var column names to coordinate names
COLUMNS_KEY = "bigcat_columns"
#: elements per chunk of ``X/data`` and ``X/indices`` (4 MB of float32): the unit of decoding
SPARSE_CHUNK = 1 << 20
#: elements per shard (one file): 32 chunks, 128 MB of float32 before compression
SPARSE_SHARD = 32 * SPARSE_CHUNK
DENSE_CHUNK_CELLS = 8000
DENSE_CHUNK_GENES = 4000
H5AD_CHUNK = 1 << 18


def _bigcat_version() -> str:
    from bigcat import __version__

    return __version__


def sparse_compressors() -> list:
    """Codecs of the sparse layout's arrays: Blosc-LZ4 with byte shuffle (see BENCHMARKS.md)."""
    from zarr.codecs import BloscCodec

    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]


def output_kind(path: str | os.PathLike) -> str:
    """``"h5ad"`` or ``"zarr"``, from the output's extension.

    Raises
    ------
    BigcatInputError
        For any other extension.
    """
    from bigcat.fs import suffix_of

    suffix = suffix_of(path)
    if suffix == ".h5ad":
        return "h5ad"
    if suffix == ".zarr":
        return "zarr"
    msg = f"{path}: unknown output format {suffix or '(no extension)'!r}; use .h5ad or .zarr"
    raise BigcatInputError(msg)


def read_marker(path: str | os.PathLike, storage_options: dict | None = None) -> dict | None:
    """The ``bigcat`` root attribute of a Zarr store (``None`` if it has none)."""
    from bigcat import fs

    if fs.is_url(path):
        import zarr

        try:
            attrs = dict(zarr.open_group(fs.zarr_store(path, storage_options), mode="r").attrs)
        except (FileNotFoundError, KeyError, ValueError):
            return None
        return attrs.get(MARKER_KEY)
    path = fs.local(path)
    zarr_json = Path(path) / "zarr.json"
    if zarr_json.is_file():
        with contextlib.suppress(ValueError, OSError):
            return json.loads(zarr_json.read_text()).get("attributes", {}).get(MARKER_KEY)
    zattrs = Path(path) / ".zattrs"
    if zattrs.is_file():
        with contextlib.suppress(ValueError, OSError):
            return json.loads(zattrs.read_text()).get(MARKER_KEY)
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; move it into place when the block succeeds.

    The temporary path is removed if the block raises (it is ours). An existing
    ``final`` is refused unless ``overwrite``; a directory is only ever replaced if it is
    a store bigcat wrote (it carries the ``bigcat`` marker), never deleted otherwise.

    Raises
    ------
    BigcatInputError
        The parent folder does not exist.
    BigcatOutputExistsError
        ``final`` exists and may not be replaced.
    """
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        msg = f"{final}: output folder {parent} does not exist"
        raise BigcatInputError(msg)
    _check_replaceable(final, overwrite=overwrite)
    if not os.access(parent, os.W_OK):
        msg = f"{final}: output folder {parent} is not writable"
        raise BigcatInputError(msg)
    tmp = parent / f".{final.name}.bigcat-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _check_replaceable(final, overwrite=overwrite)  # it may have appeared meanwhile
    if final.exists() or final.is_symlink():
        trash = parent / f".{final.name}.bigcat-old-{secrets.token_hex(4)}"
        final.rename(trash)
        tmp.rename(final)
        _remove(trash)
    else:
        tmp.rename(final)


@contextlib.contextmanager
def publish(
    final: str | os.PathLike, *, overwrite: bool = False, storage_options: dict | None = None, kind: str = "zarr"
) -> Iterator[Any]:
    """Where to write an output so that it appears atomically at ``final``.

    Local paths: :func:`atomic_path` (temporary sibling, renamed). URLs (see :mod:`bigcat.fs`):
    a Zarr store (``kind="zarr"``) is written in place — its completion marker, written
    last, is what makes it valid — after removing an existing bigcat store when
    ``overwrite``; a single file (``kind="file"``) is written locally and uploaded in one
    PUT. Yields a local ``Path`` or the URL string.
    """
    from bigcat import fs

    if not fs.is_url(final):
        with atomic_path(fs.local(final), overwrite=overwrite) as tmp:
            yield tmp
        return
    url = str(final)
    if fs.exists(url, storage_options):
        if not overwrite:
            msg = f"{url}: output exists; pass --overwrite (overwrite=True) to replace it"
            raise BigcatOutputExistsError(msg)
        if kind == "zarr":
            if read_marker(url, storage_options) is None:
                msg = f"{url}: output exists and is not a store bigcat wrote; bigcat will not delete it"
                raise BigcatOutputExistsError(msg)
            fs.remove(url, storage_options)
    if kind == "file":
        with fs.local_copy_for_upload(url, storage_options) as tmp:
            yield tmp
        return
    try:
        yield url
    except BaseException:
        with contextlib.suppress(Exception):
            fs.remove(url, storage_options)
        raise


def _check_replaceable(final: Path, *, overwrite: bool) -> None:
    if not (final.exists() or final.is_symlink()):
        return
    if not overwrite:
        msg = f"{final}: output exists; pass --overwrite (overwrite=True) to replace it"
        raise BigcatOutputExistsError(msg)
    if final.is_dir() and read_marker(final) is None:
        msg = f"{final}: output exists and is not a store bigcat wrote; bigcat will not delete it, remove it yourself"
        raise BigcatOutputExistsError(msg)


def coord_names(obs_columns: list[str], var_columns: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Names of obs and var columns as xarray coordinates, made unique.

    obs columns keep their names; a var column whose name clashes with an obs column or
    a dimension becomes ``gene_<name>`` (an obs column named like a dimension becomes
    ``cell_<name>``). Both layouts use this, so a Dataset looks the same whichever layout
    it came from.
    """
    reserved = {"cell", "gene", "X"}
    obs_map = {c: (f"cell_{c}" if c in reserved else c) for c in obs_columns}
    taken = reserved | set(obs_map.values())
    var_map = {c: (f"gene_{c}" if c in taken else c) for c in var_columns}
    return obs_map, var_map


def _native(array: np.ndarray) -> np.ndarray:
    """The same values in native byte order (HDF5 files may be big-endian)."""
    if array.dtype.byteorder not in ("=", "|") and array.dtype.byteorder != ("<" if np.little_endian else ">"):
        return array.astype(array.dtype.newbyteorder("="))
    return array


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

    @abstractmethod
    def _write(self, block: sp.csr_matrix) -> None: ...

    @abstractmethod
    def finish(self, marker: dict) -> None:
        """Write what remains and the completion marker."""

    def abort(self) -> None:  # noqa: B027 - optional hook
        """Release resources after a failure (the temporary output is removed by the caller)."""


class _GrowingArray:
    """Appends 1-D data to a Zarr array in whole shards, written in the background.

    Values are copied into one of two reusable shard-sized buffers; a full buffer is
    handed to a writer thread (Zarr encodes and writes it) while the next one fills, so
    reading the input, compressing and writing overlap. Reusing two buffers instead of
    allocating a new one per shard also avoids first-touch page faults, which are costly
    on virtual machines.
    """

    def __init__(self, array: Any, shard: int, dtype: np.dtype) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.array = array
        self.shard = shard
        self.dtype = np.dtype(dtype)
        self.buffers = [np.empty(0, dtype=self.dtype), np.empty(0, dtype=self.dtype)]
        self.pending: list[Any] = [None, None]  # the write of each buffer in flight
        self.current = 0
        self.fill = 0
        self.n_written = 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="bigcat-write")

    def _buffer(self) -> np.ndarray:
        i = self.current
        if self.pending[i] is not None:
            self.pending[i].result()
            self.pending[i] = None
        if len(self.buffers[i]) < self.shard:
            self.buffers[i] = np.empty(self.shard, dtype=self.dtype)
        return self.buffers[i]

    def append(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=self.dtype)
        while len(values):
            buffer = self._buffer()
            n = min(len(values), self.shard - self.fill)
            buffer[self.fill : self.fill + n] = values[:n]
            self.fill += n
            values = values[n:]
            if self.fill == self.shard:
                self._submit()

    def _submit(self) -> None:
        if not self.fill:
            return
        start, n, i = self.n_written, self.fill, self.current

        def write() -> None:
            self.array.resize((start + n,))
            self.array[start : start + n] = self.buffers[i][:n]

        self.pending[i] = self.pool.submit(write)
        self.n_written += n
        self.fill = 0
        self.current = 1 - i

    def close(self) -> None:
        """Write the tail and wait for every write (re-raising its error, if any)."""
        try:
            self._submit()
            for future in self.pending:
                if future is not None:
                    future.result()
        finally:
            self.pool.shutdown(wait=True)
            self.buffers = []


def _copy_csr_range(source: Any, data: Any, indices: Any, lo: int, hi: int) -> int:
    """One task of :meth:`SparseZarrWriter.copy_csr`: element range ``lo:hi``."""
    x = source._root()["X"]  # noqa: SLF001 - same package
    values = _native(np.asarray(x["data"][lo:hi])).astype(data.dtype, copy=False)
    columns = _native(np.asarray(x["indices"][lo:hi]))
    source._check_indices(columns, source.shape[1], lo)  # noqa: SLF001
    data[lo:hi] = values
    indices[lo:hi] = columns.astype(indices.dtype, copy=False)
    return hi - lo


def _write_anndata_elements(group: Any, obs: pd.DataFrame, var: pd.DataFrame, uns: Mapping) -> None:
    """obs, var, uns and the empty AnnData slots, encoded by anndata itself.

    ``uns`` is copied entry by entry, best effort: an entry anndata cannot write (exotic
    objects in very old files) is left out with a warning instead of failing the run.
    """
    import anndata as ad
    from anndata.io import write_elem

    group.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's notes on v3 dtypes/autosharding: nothing for users to act on
        with ad.settings.override(zarr_write_format=3) if _is_zarr(group) else contextlib.nullcontext():
            write_elem(group, "obs", obs)
            write_elem(group, "var", var)
            for slot in ("uns", "obsm", "varm", "obsp", "varp", "layers"):
                write_elem(group, slot, {})
            for key, value in uns.items():
                try:
                    write_elem(group["uns"], str(key), value)
                except Exception as error:  # noqa: BLE001 - uns must not stop a conversion
                    log.warning("uns[%r] not copied: %s", key, error)


def _is_zarr(group: Any) -> bool:
    return type(group).__module__.startswith("zarr")


class SparseZarrWriter(MatrixWriter):
    """The ``sparse`` layout: AnnData Zarr v3 with sharded CSR arrays."""

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
    ) -> None:
        import zarr

        from bigcat.fs import zarr_store

        super().__init__(len(obs), len(var), dtype)
        self.path = path
        self.store = zarr_store(path, storage_options, read_only=False)
        self.root = zarr.open_group(self.store, mode="w-", zarr_format=3)
        self.root.attrs[MARKER_KEY] = {**marker, "complete": False}
        _write_anndata_elements(self.root, obs, var, uns)
        index_dtype = np.int32 if self.n_genes < 2**31 else np.int64
        x = self.root.create_group(
            "X",
            attributes={
                "encoding-type": "csr_matrix",
                "encoding-version": "0.1.0",
                "shape": [self.n_cells, self.n_genes],
            },
        )
        self.x = x
        kwargs = {
            "shape": (0,),
            "chunks": (SPARSE_CHUNK,),
            "shards": (SPARSE_SHARD,),
            "compressors": sparse_compressors(),
            "fill_value": 0,
            # zarr's check for all-fill chunks compares every value through a void view (a
            # string comparison loop): it halved write speed, and CSR chunks are never empty
            "config": {"write_empty_chunks": True},
        }
        self.data = _GrowingArray(x.create_array("data", dtype=self.dtype, **kwargs), SPARSE_SHARD, self.dtype)
        self.indices = _GrowingArray(x.create_array("indices", dtype=index_dtype, **kwargs), SPARSE_SHARD, index_dtype)
        self.index_dtype = index_dtype
        self.row_nnz = np.zeros(self.n_cells, dtype=np.int64)

    def _write(self, block: sp.csr_matrix) -> None:
        start = self.rows_written
        self.row_nnz[start : start + block.shape[0]] = np.diff(block.indptr)
        self.data.append(np.asarray(block.data, dtype=self.dtype))
        self.indices.append(np.asarray(block.indices, dtype=self.index_dtype))

    def copy_csr(self, source: Any, client: Any, progress: Any = None) -> None:
        """Copy a whole CSR source shard by shard as parallel tasks on a Dask ``client``.

        In CSR, ``data`` and ``indices`` are in the same order in the input and the output,
        so shard ``k`` of each output array is the input's element range ``k``: every task
        reads that range (validating column indices), and writes exactly one shard of each
        array — no two tasks touch the same file. ``indptr`` (validated) comes from the
        source. Instead of :meth:`write_rows`; the workers must see both paths.
        """
        from distributed import as_completed

        indptr = source.indptr
        nnz = int(indptr[-1])
        for array in (self.data, self.indices):
            array.array.resize((nnz,))
            array.n_written = nnz
        ranges = [(lo, min(lo + SPARSE_SHARD, nnz)) for lo in range(0, nnz, SPARSE_SHARD)]
        futures = [
            client.submit(
                _copy_csr_range,
                source,
                self.data.array,
                self.indices.array,
                lo,
                hi,
                pure=False,
                key=f"bigcat-copy-{os.getpid()}-{id(self)}-{lo}",
            )
            for lo, hi in ranges
        ]
        for future in as_completed(futures):
            future.result()
            if progress is not None:
                progress(int(future.key.rsplit("-", 1)[1]))
        self.row_nnz[:] = np.diff(indptr)
        self.rows_written = self.n_cells
        self.nnz_written = nnz

    def abort(self) -> None:
        """Wait for the background writes (so none races the removal of the output)."""
        for array in (self.data, self.indices):
            with contextlib.suppress(Exception):
                array.close()

    def finish(self, marker: dict) -> None:
        import zarr

        self.data.close()
        self.indices.close()
        indptr = np.zeros(self.n_cells + 1, dtype=np.int64)
        np.cumsum(self.row_nnz, out=indptr[1:])
        n = len(indptr)
        chunk = min(SPARSE_CHUNK, max(n, 1))
        self.x.create_array(
            "indptr",
            shape=(n,),
            dtype=np.int64,
            chunks=(chunk,),
            shards=(max(chunk, min(SPARSE_SHARD, n)) // chunk * chunk,),
            compressors=sparse_compressors(),
            fill_value=0,
        )[:] = indptr
        self.root.attrs[MARKER_KEY] = marker
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            zarr.consolidate_metadata(self.store)


def _xarray_coords(frame: pd.DataFrame, names: dict[str, str], dim: str) -> dict[str, Any]:
    """obs/var columns as coordinates on ``dim``; categoricals as values plus their categories."""
    import xarray as xr

    coords: dict[str, Any] = {}
    for column, name in names.items():
        values = frame[column]
        attrs = {}
        if isinstance(values.dtype, pd.CategoricalDtype):
            categories = values.cat.categories
            attrs["categorical"] = {"categories": categories.tolist(), "ordered": bool(values.cat.ordered)}
            values = values.astype(categories.dtype)
        array = np.asarray(values)
        if array.dtype == object:
            array = np.array(
                ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in array], dtype=object
            )
        coords[name] = xr.Variable((dim,), array, attrs=attrs)
    return coords


class DenseZarrWriter(MatrixWriter):
    """The ``dense`` layout: an xarray Dataset ``X(cell, gene)`` in Zarr v3."""

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
    ) -> None:
        import dask.array as da
        import xarray as xr
        import zarr

        from bigcat.fs import zarr_store

        super().__init__(len(obs), len(var), dtype)
        self.path = path
        self.store = zarr_store(path, storage_options, read_only=False)
        obs_names, var_names = coord_names(list(obs.columns), list(var.columns))
        coords = {
            "cell": ("cell", np.asarray(obs.index.astype(str), dtype=object)),
            "gene": ("gene", np.asarray(var.index.astype(str), dtype=object)),
            **_xarray_coords(obs, obs_names, "cell"),
            **_xarray_coords(var, var_names, "gene"),
        }
        self.chunk_cells = max(1, min(chunk_cells, self.n_cells or 1))
        self.chunk_genes = max(1, min(chunk_genes, self.n_genes))
        chunks = (self.chunk_cells, self.chunk_genes)
        template = da.zeros((self.n_cells, self.n_genes), dtype=self.dtype, chunks=chunks)
        ds = xr.Dataset(
            {"X": (("cell", "gene"), template)},
            coords=coords,
            attrs={MARKER_KEY: {**marker, "complete": False}, COLUMNS_KEY: {"obs": obs_names, "var": var_names}},
        )
        from zarr.codecs import BloscCodec

        encoding = {
            "X": {
                "chunks": chunks,
                "compressors": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
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
        self.pending: list[sp.csr_matrix] = []
        self.n_pending = 0
        self.next_row = 0

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
        self.pending = [tail] if tail.shape[0] else []
        self.n_pending = tail.shape[0]

    def finish(self, marker: dict) -> None:
        import zarr

        if self.n_pending:
            self._flush(self.n_pending)
        self.root.attrs[MARKER_KEY] = marker
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            zarr.consolidate_metadata(self.store)


class H5adWriter(MatrixWriter):
    """An ``.h5ad`` file with a CSR ``X`` (uncompressed, chunked, like anndata's default)."""

    def __init__(self, path: Path, obs: pd.DataFrame, var: pd.DataFrame, uns: Mapping, dtype: np.dtype) -> None:
        import h5py

        super().__init__(len(obs), len(var), dtype)
        self.path = path
        self.file = h5py.File(path, "w-")
        _write_anndata_elements(self.file, obs, var, uns)
        x = self.file.create_group("X")
        x.attrs.update(
            {
                "encoding-type": "csr_matrix",
                "encoding-version": "0.1.0",
                "shape": np.array([self.n_cells, self.n_genes]),
            }
        )
        index_dtype = np.int32 if self.n_genes < 2**31 else np.int64
        self.data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype=self.dtype, chunks=(H5AD_CHUNK,))
        self.indices = x.create_dataset(
            "indices", shape=(0,), maxshape=(None,), dtype=index_dtype, chunks=(H5AD_CHUNK,)
        )
        self.x = x
        self.row_nnz = np.zeros(self.n_cells, dtype=np.int64)

    def _write(self, block: sp.csr_matrix) -> None:
        start, n = self.nnz_written, block.nnz
        self.row_nnz[self.rows_written : self.rows_written + block.shape[0]] = np.diff(block.indptr)
        for dataset, values in ((self.data, block.data), (self.indices, block.indices)):
            dataset.resize((start + n,))
            dataset[start : start + n] = values

    def finish(self, marker: dict) -> None:  # noqa: ARG002 - h5ad files are published by rename only
        indptr = np.zeros(self.n_cells + 1, dtype=np.int64)
        np.cumsum(self.row_nnz, out=indptr[1:])
        self.x.create_dataset("indptr", data=indptr)
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
    layout: str = "sparse",
    overwrite: bool = False,
    source: dict | None = None,
    chunk_cells: int = DENSE_CHUNK_CELLS,
    storage_options: dict | None = None,
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
        fsspec options when ``path`` is a URL (see :mod:`bigcat.fs`).

    Yields
    ------
    MatrixWriter
        Call ``write_rows`` with consecutive CSR blocks covering all cells.
    """
    kind = output_kind(path)
    if layout not in LAYOUTS:
        msg = f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}"
        raise BigcatInputError(msg)
    obs = _clean_frame(obs)
    var = _clean_frame(var)
    marker = {
        "format_version": FORMAT_VERSION,
        "layout": layout if kind == "zarr" else "h5ad",
        "bigcat_version": _bigcat_version(),
        "shape": [len(obs), len(var)],
        "source": source or {},
    }
    from bigcat import fs

    final = str(path) if fs.is_url(path) else fs.local(path)
    with publish(
        path, overwrite=overwrite, storage_options=storage_options, kind=kind if kind == "zarr" else "file"
    ) as tmp:
        writer: MatrixWriter
        if kind == "h5ad":
            writer = H5adWriter(tmp, obs, var, uns or {}, np.dtype(dtype))
        elif layout == "sparse":
            writer = SparseZarrWriter(tmp, obs, var, uns or {}, np.dtype(dtype), marker, storage_options)
        else:
            writer = DenseZarrWriter(
                tmp, obs, var, np.dtype(dtype), marker, chunk_cells=chunk_cells, storage_options=storage_options
            )
        writer.path = final
        try:
            yield writer
            if writer.rows_written != writer.n_cells:
                msg = f"{path}: wrote {writer.rows_written} of {writer.n_cells} rows"
                raise RuntimeError(msg)
            writer.path = tmp
            writer.finish({**marker, "complete": True, "nnz": writer.nnz_written})
            writer.path = final
        except BaseException:
            writer.abort()
            raise


def _clean_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy with string index and column names, as anndata requires."""
    frame = frame.copy()
    frame.index = frame.index.astype(str)
    frame.columns = [str(c) for c in frame.columns]
    return frame
