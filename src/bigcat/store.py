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

Resumable conversions
---------------------
A conversion (``open_writer(..., resume=False|True)``) writes its store under a fixed
hidden name beside the output (``.NAME.zarr.bigcat-partial``; for a URL, the output
itself, marked incomplete) and, after every shard of values is safely written, records
its progress in ``bigcat-resume/`` inside it: ``state.json`` (rows and values done, the
input's fingerprint, the settings) and the per-row value counts since the previous
checkpoint (``rows-NNNNNN.npy``). An interrupted run (SIGKILL, Ctrl-C, a lost
connection) leaves that behind; ``resume=True`` refuses it if the input or the settings
changed, else truncates the arrays to the last complete shard, re-reads the values of
the shard in progress from the store itself and continues with the next row. The
``bigcat-resume/`` folder is removed before the completion marker is written, so a
resumed store is byte for byte the store an uninterrupted run writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
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
    "Checkpoints",
    "MatrixWriter",
    "atomic_path",
    "coord_names",
    "open_writer",
    "output_kind",
    "read_marker",
]

log = logging.getLogger("bigcat")

#: the task-key prefix of the parallel copy, and what to change when a worker dies running
#: one (bigcat.cli)
COPY_TASK = "bigcat-copy"
STEPS = {COPY_TASK: ("convert (copying a shard of values)", "a smaller --shard-values")}

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
#: folder inside a partial store holding the progress of a resumable conversion
RESUME_DIR = "bigcat-resume"


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
    _check_writable(final)
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


def _check_writable(final: Path) -> None:
    """Refuse now, with a clear message, an output folder we cannot create files in (a
    permission check alone misses read-only file systems and root's exemptions)."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=f".{final.name}.bigcat-probe-", dir=final.parent)
        os.close(fd)
        Path(probe).unlink()
    except OSError as error:
        msg = f"{final}: cannot write in the output folder {final.parent} ({error.strerror or error})"
        raise BigcatInputError(msg) from error


def _check_replaceable(final: Path, *, overwrite: bool) -> None:
    if not (final.exists() or final.is_symlink()):
        return
    if not overwrite:
        msg = f"{final}: output exists; pass --overwrite (overwrite=True) to replace it"
        raise BigcatOutputExistsError(msg)
    if final.is_dir() and read_marker(final) is None:
        msg = f"{final}: output exists and is not a store bigcat wrote; bigcat will not delete it, remove it yourself"
        raise BigcatOutputExistsError(msg)
    if not final.is_dir() and not written_by_bigcat(final):
        msg = f"{final}: output exists and is not a file bigcat wrote; bigcat will not replace it, remove it yourself"
        raise BigcatOutputExistsError(msg)


#: the columns each long table bigcat writes as CSV starts with (CSV keeps no metadata)
CSV_HEADERS = (
    "cluster,gene,n_cells",  # statistics (long form)
    "gene,",  # statistics (--wide)
    "cell,cluster,score",  # map
    "cluster,rank,gene",  # markers
)


def written_by_bigcat(path: Path) -> bool:
    """Whether the single file ``path`` is one bigcat wrote (so ``--overwrite`` may replace it).

    ``.h5ad``/``.h5``: the root attribute ``bigcat`` (or, from older versions, the
    statistics' ``uns/bigcat_stats`` or MapMyCells ``metadata`` naming bigcat); ``.parquet``:
    the ``bigcat`` key of the file metadata; images: bigcat named as their software; ``.csv``
    (no place for a marker): the header of one of bigcat's tables.
    """
    suffix = path.suffix.lower()
    try:
        if suffix in (".h5ad", ".h5"):
            import h5py

            with h5py.File(path, "r") as f:
                if MARKER_KEY in f.attrs or "uns/bigcat_stats" in f:
                    return True
                return "metadata" in f and b'"written_by": "bigcat"' in bytes(f["metadata"][()])
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return b"bigcat" in (pq.read_metadata(path).metadata or {})
        if suffix == ".csv":
            with path.open("r", errors="replace") as handle:
                first = handle.readline().strip().replace('"', "")
            return any(first.startswith(h) for h in CSV_HEADERS)
        if suffix in (".png", ".svg", ".pdf"):
            with path.open("rb") as handle:
                return b"bigcat" in handle.read(1 << 16)
    except (OSError, ValueError):
        return False
    return False


def refuse_input_as_output(output: str | os.PathLike, inputs: Iterable[Any]) -> None:
    """An output that is one of the inputs (the same file once links are resolved) is refused:
    ``--overwrite`` would replace the input with what is computed from it."""
    from bigcat import fs

    def where(path: Any) -> str:
        return str(path).rstrip("/") if fs.is_url(path) else str(fs.local(path).resolve())

    target = where(output)
    for source in inputs:
        if isinstance(source, (str, os.PathLike)) and where(source) == target:
            msg = f"{output}: the output is an input ({source}); write it elsewhere"
            raise BigcatInputError(msg)


class Checkpoints:
    """The progress of a resumable conversion, kept inside its partial store.

    Parameters
    ----------
    store
        The partial store (a local path or a URL).
    settings
        What must not change between the interrupted and the resumed run (input
        fingerprint, layout, dtype, shape, chunking).
    storage_options
        fsspec options for URLs.
    """

    def __init__(self, store: Any, settings: dict, storage_options: dict | None = None) -> None:
        from bigcat import fs

        self.url = fs.is_url(store)
        self.settings = json.loads(json.dumps(settings, default=str))  # as it reads back from JSON
        if self.url:
            self.fs, root = fs.filesystem(str(store), storage_options)
            self.dir = f"{root.rstrip('/')}/{RESUME_DIR}"
        else:
            self.fs, self.dir = None, fs.local(store) / RESUME_DIR
        self.rows = 0
        self.nnz = 0
        self.n_files = 0

    def _path(self, name: str) -> Any:
        return f"{self.dir}/{name}" if self.url else self.dir / name

    def read(self) -> dict | None:
        """The recorded state, or ``None`` when there is none (or it is unreadable)."""
        path = self._path("state.json")
        try:
            raw = self.fs.cat_file(path) if self.url else path.read_bytes()
            return json.loads(raw)
        except (OSError, ValueError):
            return None

    def adopt(self, state: dict, *, counts: bool = True) -> np.ndarray:
        """Continue from ``state``; returns the value count of each row done (``counts``:
        the layout recorded them)."""
        import io

        self.rows, self.nnz, self.n_files = int(state["rows"]), int(state["nnz"]), int(state["files"])
        parts = []
        for k in range(self.n_files):
            path = self._path(f"rows-{k:06d}.npy")
            raw = self.fs.cat_file(path) if self.url else path.read_bytes()
            parts.append(np.load(io.BytesIO(raw)))
        found = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if counts and (len(found) != self.rows or int(found.sum()) != self.nnz):
            msg = f"{self.dir}: the recorded progress is inconsistent; rerun without --resume to start over"
            raise BigcatInputError(msg)
        return found

    def save(self, rows: int, nnz: int, row_counts: np.ndarray | None) -> None:
        """Record that the first ``rows`` rows (``nnz`` values) are safely in the store.

        ``row_counts``: the value count of each row since the previous checkpoint (sparse
        layout; ``None`` when the layout needs none). Written before the state that
        refers to it, and the state replaced in one step, so a kill at any moment leaves a
        consistent record.
        """
        import io

        if rows <= self.rows:
            return
        files = self.n_files
        if row_counts is not None:
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(row_counts, dtype=np.int64))
            self._write(f"rows-{files:06d}.npy", buffer.getvalue())
            files += 1
        state = {"settings": self.settings, "rows": int(rows), "nnz": int(nnz), "files": files}
        self._write("state.json", json.dumps(state).encode(), atomic=True)
        self.rows, self.nnz, self.n_files = rows, nnz, files

    def _write(self, name: str, data: bytes, *, atomic: bool = False) -> None:
        if self.url:
            self.fs.pipe_file(self._path(name), data)  # one PUT: all or nothing
            return
        self.dir.mkdir(exist_ok=True)
        path = self._path(name)
        tmp = path.with_name(path.name + ".tmp") if atomic else path
        tmp.write_bytes(data)
        if atomic:
            tmp.replace(path)

    def remove(self) -> None:
        """Forget the progress (before the store is completed)."""
        if self.url:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.dir, recursive=True)
        elif self.dir.exists():
            shutil.rmtree(self.dir)


def _describe_state(state: dict) -> str:
    shape = state.get("settings", {}).get("shape") or ["?", "?"]
    return f"{state.get('rows', 0):,} of {shape[0]:,} rows" if isinstance(shape[0], int) else "some rows"


def _settings_differ(recorded: dict, wanted: dict) -> list[str]:
    return [key for key in sorted(set(recorded) | set(wanted)) if recorded.get(key) != wanted.get(key)]


#: the options of ``bigcat convert`` behind each recorded setting a resume must repeat
SETTING_FLAGS = {"shard": "--shard-values", "chunk_cells": "--chunk-cells", "layout": "--layout"}


def _resume_refusal(final: Any, changed: list[str], recorded: dict, wanted: dict) -> str:
    """Why a resume is refused, naming what to pass: the interrupted run's own options, or
    that its input changed (then only starting over helps)."""
    options = [key for key in changed if key in SETTING_FLAGS]
    if options and len(options) == len(changed):
        flags = " ".join(f"{SETTING_FLAGS[key]} {recorded.get(key)}" for key in options)
        used = ", ".join(f"{SETTING_FLAGS[key]} {recorded.get(key)} (this run: {wanted.get(key)})" for key in options)
        return (
            f"{final}: the interrupted conversion used {used}; rerun with --resume {flags} to continue it, "
            "or --overwrite to start over"
        )
    what = "the input changed since" if "source" in changed else f"other {' and '.join(changed)} than"
    return f"{final}: refusing to resume: {what} the interrupted conversion; rerun with --overwrite to start over"


@contextlib.contextmanager
def output_lock(final: str | os.PathLike) -> Iterator[None]:
    """One bigcat process at a time writes a local output: three concurrent conversions to
    one store crashed each other (``FileNotFoundError``) and left temporary files. An
    exclusive ``flock`` on ``.NAME.bigcat-lock`` beside it (released by the kernel if the
    process dies; the file is reused then, and removed on the way out)."""
    import fcntl

    from bigcat import fs

    if fs.is_url(final):  # object stores have no locks: their writes are made atomic instead
        yield
        return
    final = fs.local(final)
    lock = final.parent / f".{final.name}.bigcat-lock"
    try:
        handle = lock.open("a+")
    except OSError:  # the folder's own checks report what is wrong with it
        yield
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            msg = f"{final}: another bigcat process is writing this output; wait for it to end or choose another"
            raise BigcatInputError(msg) from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                lock.unlink()
    finally:
        handle.close()


@contextlib.contextmanager
def partial_store(
    final: str | os.PathLike,
    *,
    settings: dict,
    overwrite: bool = False,
    resume: bool = False,
    storage_options: dict | None = None,
) -> Iterator[tuple[Any, Checkpoints, dict | None]]:
    """Where a resumable conversion writes (under :func:`output_lock`)."""
    with (
        output_lock(final),
        _partial_store(
            final, settings=settings, overwrite=overwrite, resume=resume, storage_options=storage_options
        ) as where,
    ):
        yield where


def _partial_location(final: Any, *, overwrite: bool, storage_options: dict | None) -> tuple[Any, Any, bool]:
    """``(final, partial, whether the partial exists)``: a URL is written in place (a
    complete store bigcat wrote there is removed with ``overwrite``); a local output next to
    its final name, after checking the folder and what the final name holds."""
    from bigcat import fs

    if fs.is_url(final):
        partial = str(final)
        there = fs.exists(partial, storage_options)
        marker = read_marker(partial, storage_options) if there else None
        if there and (marker is None or marker.get("complete")):
            if not overwrite:
                msg = f"{partial}: output exists; pass --overwrite (overwrite=True) to replace it"
                raise BigcatOutputExistsError(msg)
            if marker is None:
                msg = f"{partial}: output exists and is not a store bigcat wrote; bigcat will not delete it"
                raise BigcatOutputExistsError(msg)
            fs.remove(partial, storage_options)
            there = False
        return final, partial, there
    final = fs.local(final)
    if not final.parent.is_dir():
        msg = f"{final}: output folder {final.parent} does not exist"
        raise BigcatInputError(msg)
    _check_replaceable(final, overwrite=overwrite)
    _check_writable(final)
    partial = final.parent / f".{final.name}.bigcat-partial"
    return final, partial, partial.exists()


def _take_up_partial(
    final: Any, partial: Any, checkpoints: Checkpoints, state: dict | None, *, resume: bool, overwrite: bool,
    storage_options: dict | None,
) -> dict | None:  # fmt: skip
    """What to do with an unfinished store found at ``partial``: resume it (same settings
    only), refuse (progress recorded, neither flag given), or remove it; the state to resume."""
    from bigcat import fs

    url = fs.is_url(partial)
    if state is not None and resume:
        recorded = state.get("settings", {})
        changed = _settings_differ(recorded, checkpoints.settings)
        if changed:
            raise BigcatInputError(_resume_refusal(final, changed, recorded, checkpoints.settings))
        log.warning("%s: resuming after %s", final, _describe_state(state))
        if not url:  # writes the kill cut short: zarr's temporary files (KEY.<uuid>.partial)
            for leftover in partial.rglob("*.partial"):
                if re.fullmatch(r".*\.[0-9a-f]{32}\.partial", leftover.name):
                    leftover.unlink()
        return state
    if state is not None and not overwrite:
        msg = (
            f"{final}: an interrupted conversion is there ({_describe_state(state)} done); "
            "pass --resume to continue it or --overwrite to start over"
        )
        raise BigcatOutputExistsError(msg)
    log.info("%s: removing an unfinished store without recorded progress", partial)
    if url:
        fs.remove(partial, storage_options)
    else:
        _remove(partial)
    return None


@contextlib.contextmanager
def _partial_store(
    final: str | os.PathLike,
    *,
    settings: dict,
    overwrite: bool = False,
    resume: bool = False,
    storage_options: dict | None = None,
) -> Iterator[tuple[Any, Checkpoints, dict | None]]:
    """Where a resumable conversion writes: ``(partial store, checkpoints, state to resume)``.

    See the module docstring. On success the partial store is renamed to ``final``
    (locally; a URL is written in place). On failure it is kept when it holds recorded
    progress and the failure is not bad input (so ``resume=True`` can continue), and
    removed otherwise.

    Raises
    ------
    BigcatOutputExistsError
        ``final`` exists (or an interrupted conversion of it does) and neither
        ``overwrite`` nor ``resume`` says what to do.
    BigcatInputError
        ``resume`` and the interrupted conversion was of another input or used other
        settings; or the output folder is missing or not writable.
    """
    from bigcat import fs

    url = fs.is_url(final)
    final, partial, there = _partial_location(final, overwrite=overwrite, storage_options=storage_options)
    checkpoints = Checkpoints(partial, settings, storage_options)
    state = checkpoints.read() if there else None
    if there:
        state = _take_up_partial(final, partial, checkpoints, state, resume=resume, overwrite=overwrite,
                                 storage_options=storage_options)  # fmt: skip
    elif resume:
        log.warning("%s: nothing to resume, starting from the first row", final)
    try:
        yield partial, checkpoints, state
    except BaseException as error:
        recorded = checkpoints.read()
        if recorded is not None and not isinstance(error, BigcatInputError):
            log.warning(
                "%s: stopped after %s; rerun with --resume to continue from there", final, _describe_state(recorded)
            )
        elif url:
            with contextlib.suppress(Exception):
                fs.remove(partial, storage_options)
        else:
            _remove(partial)
        raise
    if url:
        return
    _check_replaceable(final, overwrite=overwrite)  # it may have appeared meanwhile
    if final.exists() or final.is_symlink():
        trash = final.parent / f".{final.name}.bigcat-old-{secrets.token_hex(4)}"
        final.rename(trash)
        partial.rename(final)
        _remove(trash)
    else:
        partial.rename(final)


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
        #: progress records of a resumable conversion (set by :func:`open_writer`)
        self.checkpoints: Checkpoints | None = None
        #: the AnnData group the elements besides X go to (``None``: the layout has none)
        self.group: Any = None

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
            self._checkpoint()

    def _checkpoint(self) -> None:  # noqa: B027 - writers that can resume record their progress here
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


def _blosc_shards(array: Any) -> tuple[int, Any] | None:
    """``(inner chunk length, numcodecs Blosc)`` when ``array`` is a 1-D Zarr v3 array sharded
    exactly as bigcat writes it (inner chunks ``bytes`` (little-endian) + ``blosc``, index
    ``bytes`` + ``crc32c`` at the end of each shard, fill value 0), else ``None``."""
    import sys

    from numcodecs import Blosc
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec

    codecs = array.metadata.codecs if array.metadata.zarr_format == 3 else ()
    if sys.byteorder != "little" or array.ndim != 1 or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    inner, index = sharding.codecs, sharding.index_codecs
    if not (
        sharding.index_location.value == "end"
        and len(inner) == 2
        and isinstance(inner[0], BytesCodec)
        and isinstance(inner[1], BloscCodec)
        and len(index) == 2
        and isinstance(index[0], BytesCodec)
        and isinstance(index[1], Crc32cCodec)
        and all(c.endian is None or c.endian.value == "little" for c in (inner[0], index[0]))
        and array.fill_value == 0
        and array.dtype.isnative
    ):
        return None
    blosc = inner[1]
    shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[blosc.shuffle.value]
    codec = Blosc(
        cname=blosc.cname.value,
        clevel=blosc.clevel,
        shuffle=shuffle,
        blocksize=blosc.blocksize,
        typesize=array.dtype.itemsize,
    )
    return int(sharding.chunk_shape[0]), codec


def _shard_key(array: Any, shard: int) -> str:
    """The store key of shard number ``shard`` of a 1-D array."""
    key = array.metadata.encode_chunk_key((shard,))
    return f"{array.path}/{key}" if array.path else key


class ShardReader:
    """Reads element ranges of a 1-D array sharded as bigcat writes it, decoding straight
    into the caller's array.

    zarr-python decodes every inner chunk into a fresh array, copies it into the output
    and runs a coroutine per chunk; reading a row block this way takes one ranged read per
    shard it touches (the chunks of a range are contiguous in the shard) and one Blosc
    decode per chunk, into the destination itself except for the partial chunks at the
    ends (docs/design.md, "The store").
    Shard indexes are read once (their CRC-32C checked) and cached. Works on any Zarr
    store (local or fsspec). Use :meth:`for_array`, which returns ``None`` for arrays
    encoded otherwise (read those with zarr).
    """

    def __init__(self, array: Any, chunk: int, blosc: Any) -> None:
        import threading

        from zarr.storage import LocalStore

        self.array, self.chunk, self.blosc = array, chunk, blosc
        self.per_shard = int(array.shards[0]) // chunk
        self.indexes: dict[int, np.ndarray | None] = {}
        store = array.store_path.store
        self.root = Path(store.root) if isinstance(store, LocalStore) else None
        self.scratch = threading.local()  # per-thread buffer for compressed bytes (local files)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "scratch": None}

    def __setstate__(self, state: dict) -> None:
        import threading

        self.__dict__.update(state, scratch=threading.local())

    @classmethod
    def for_array(cls, array: Any) -> ShardReader | None:
        found = _blosc_shards(array)
        return None if found is None else cls(array, *found)

    def _get(self, shard: int, byte_range: Any = None) -> memoryview | None:
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        key = _shard_key(self.array, shard)
        buffer = sync(self.array.store_path.store.get(key, default_buffer_prototype(), byte_range))
        return None if buffer is None else memoryview(buffer.as_numpy_array())

    def _get_range(self, shard: int, start: int, stop: int) -> memoryview:
        """Bytes ``start:stop`` of a shard. From a local store they are read with one
        ``pread`` into a reused per-thread buffer: bytes objects of tens of MB are fresh
        memory for every read (glibc maps and unmaps them), whose first touch costs more
        than the read on a VM."""
        if self.root is None:
            from zarr.abc.store import RangeByteRequest

            raw = self._get(shard, RangeByteRequest(start, stop))
            if raw is None or len(raw) != stop - start:
                msg = f"{self.array.store_path}/{_shard_key(self.array, shard)}: shard shorter than its index says"
                raise BigcatInputError(msg)
            return raw
        size = stop - start
        buffer = getattr(self.scratch, "buffer", None)
        if buffer is None or len(buffer) < size:
            buffer = self.scratch.buffer = np.empty(size + size // 8, dtype=np.uint8)
        view = memoryview(buffer)[:size]
        path = self.root / _shard_key(self.array, shard)
        fd = os.open(path, os.O_RDONLY)
        try:
            n = os.preadv(fd, [view], start)
        finally:
            os.close(fd)
        if n != size:
            msg = f"{path}: shard shorter than its index says ({n} of {size} bytes at {start})"
            raise BigcatInputError(msg)
        return view

    def _index(self, shard: int) -> np.ndarray | None:
        if shard not in self.indexes:
            import google_crc32c
            from zarr.abc.store import SuffixByteRequest

            size = 16 * self.per_shard
            raw = self._get(shard, SuffixByteRequest(size + 4))
            raw = None if raw is None else bytes(raw)
            if raw is None:
                self.indexes[shard] = None  # a shard never written: fill values
            else:
                crc = int(np.frombuffer(raw[size:], dtype="<u4")[0])
                if len(raw) != size + 4 or google_crc32c.value(raw[:size]) != crc:
                    where = f"{self.array.store_path}/{_shard_key(self.array, shard)}"
                    msg = f"{where}: damaged shard index (checksum mismatch)"
                    raise BigcatInputError(msg)
                self.indexes[shard] = np.frombuffer(raw[:size], dtype="<u8").reshape(-1, 2)
        return self.indexes[shard]

    def read(self, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
        """Elements ``lo:hi`` into ``out`` (``hi - lo`` elements of the array's dtype)."""
        chunk, per_shard, empty = self.chunk, self.per_shard, np.iinfo(np.uint64).max
        if hi <= lo:
            return out
        first, last = lo // chunk, (hi - 1) // chunk
        for shard in range(first // per_shard, last // per_shard + 1):
            c0, c1 = max(first, shard * per_shard), min(last, (shard + 1) * per_shard - 1)
            index = self._index(shard)
            stored = [] if index is None else [c for c in range(c0, c1 + 1) if index[c - shard * per_shard, 0] != empty]
            view, base = memoryview(b""), 0
            if stored:
                rows = index[[c - shard * per_shard for c in stored]]
                base, end = int(rows[:, 0].min()), int((rows[:, 0] + rows[:, 1]).max())
                view = self._get_range(shard, base, end)
            for c in range(c0, c1 + 1):
                s, e = c * chunk, (c + 1) * chunk
                a, b = max(s, lo), min(e, hi)
                target = out[a - lo : b - lo]
                if c not in stored:
                    target[...] = 0
                    continue
                offset, nbytes = (int(v) for v in index[c - shard * per_shard])
                piece = view[offset - base : offset - base + nbytes]
                if a == s and b == e:
                    self.blosc.decode(piece, out=target)
                else:
                    whole = np.empty(chunk, dtype=out.dtype)
                    self.blosc.decode(piece, out=whole)
                    target[...] = whole[a - s : b - s]
        return out


class _ShardWriter:
    """Encodes whole shards of one of our 1-D sharded arrays and stores them directly.

    Writing through ``array[a:b] = values``, zarr-python copies the values into a chunk
    array, encodes each inner chunk, appends the CRC to a copy of the index and joins the
    shard into a fresh buffer: on a VM, where first-touching fresh memory is slow, those
    copies cost about as much as the compression itself. This writer produces the same
    bytes that zarr writes (the Zarr v3 ``sharding_indexed`` format: the inner chunks
    encoded with ``bytes`` + ``blosc``, then the index of ``(offset, nbytes)`` pairs as
    little-endian uint64 followed by its CRC-32C) from the caller's buffer, through a
    reused output buffer, and hands it to the array's store. It applies only to arrays
    whose codecs are exactly that (:meth:`for_array` returns ``None`` otherwise, and
    zarr writes); a test checks the bytes against zarr's own.
    """

    def __init__(self, array: Any, chunk: int, blosc: Any) -> None:
        self.array, self.chunk, self.blosc = array, chunk, blosc
        self.output = np.empty(0, dtype=np.uint8)

    @classmethod
    def for_array(cls, array: Any) -> _ShardWriter | None:
        found = _blosc_shards(array)
        return None if found is None else cls(array, *found)

    def write(self, shard: int, values: np.ndarray) -> None:
        """Store shard number ``shard`` holding ``values`` (a whole shard, or the last one)."""
        import google_crc32c
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        n_chunks = self.array.shards[0] // self.chunk
        encoded = []
        for lo in range(0, len(values), self.chunk):
            piece = values[lo : lo + self.chunk]
            if len(piece) < self.chunk:  # zarr encodes an edge chunk padded with the fill value
                piece = np.concatenate([piece, np.zeros(self.chunk - len(piece), dtype=piece.dtype)])
            encoded.append(self.blosc.encode(np.ascontiguousarray(piece)))
        index = np.full((n_chunks, 2), np.iinfo(np.uint64).max, dtype="<u8")
        sizes = np.array([len(e) for e in encoded], dtype=np.uint64)
        index[: len(encoded), 0] = np.cumsum(sizes) - sizes
        index[: len(encoded), 1] = sizes
        body = int(sizes.sum())
        total = body + index.nbytes + 4
        if len(self.output) < total:
            self.output = np.empty(max(total, 2 * len(self.output)), dtype=np.uint8)
        out = self.output[:total]
        for start, piece in zip(index[: len(encoded), 0], encoded, strict=True):
            out[start : start + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
        out[body : body + index.nbytes] = index.view(np.uint8).reshape(-1)
        crc = np.array([google_crc32c.value(out[body : body + index.nbytes])], dtype="<u4")
        out[body + index.nbytes :] = crc.view(np.uint8)
        path = _shard_key(self.array, shard)
        buffer = default_buffer_prototype().buffer.from_array_like(out)
        sync(self.array.store_path.store.set(path, buffer))


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
        #: elements safely in the array (every write up to here has completed)
        self.durable = 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="bigcat-write")
        self.writer = _ShardWriter.for_array(array)

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
            if self.writer is not None and start % self.shard == 0:
                self.writer.write(start // self.shard, self.buffers[i][:n])
            else:
                self.array[start : start + n] = self.buffers[i][:n]
            self.durable = start + n  # writes run one at a time, in order

        self.pending[i] = self.pool.submit(write)
        self.n_written += n
        self.fill = 0
        self.current = 1 - i

    def restart(self, n_values: int) -> None:
        """Continue after the first ``n_values`` elements of an interrupted write.

        The array is cut back to the last whole shard; the elements of the shard in
        progress are read back from it into the buffer, so that shard is rewritten whole,
        exactly as an uninterrupted write would have.
        """
        shard_start = n_values // self.shard * self.shard
        head = np.asarray(self.array[shard_start:n_values])
        self.array.resize((shard_start,))
        self.n_written = self.durable = shard_start
        self.append(head)

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


class UnsortedIndicesError(BigcatInputError):
    """A CSR X with unsorted or duplicated entries met by the parallel copy, which keeps
    the input's element ranges and so cannot sum duplicates."""


def _copy_csr_range(source: Any, data: Any, indices: Any, lo: int, hi: int, row_starts: np.ndarray) -> int:
    """One task of :meth:`SparseZarrWriter.copy_csr`: element range ``lo:hi``, whose rows
    begin at ``row_starts`` (relative to ``lo``)."""
    from bigcat.kernels import check_shard

    x = source._root()["X"]  # noqa: SLF001 - same package
    values = _native(np.asarray(x["data"][lo:hi])).astype(data.dtype, copy=False)
    columns = _native(np.asarray(x["indices"][lo:hi]))
    bad, unsorted = check_shard(columns, row_starts, source.shape[1])
    if bad >= 0:
        source._out_of_range(int(bad) + lo, columns[bad], source.shape[1])  # noqa: SLF001
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
        shard: int = SPARSE_SHARD,
        resume: bool = False,
    ) -> None:
        import zarr

        from bigcat.fs import zarr_store

        super().__init__(len(obs), len(var), dtype)
        self.path = path
        self.store = zarr_store(path, storage_options, read_only=False)
        self.shard = shard
        index_dtype = np.int32 if self.n_genes < 2**31 else np.int64
        self.index_dtype = index_dtype
        self.row_nnz = np.zeros(self.n_cells, dtype=np.int64)
        if resume:  # the arrays are there: :meth:`resume` takes over
            self.root = zarr.open_group(self.store, mode="r+", zarr_format=3)
            self.group = self.root
            self.x = self.root["X"]
            self.data = _GrowingArray(self.x["data"], shard, self.dtype)
            self.indices = _GrowingArray(self.x["indices"], shard, index_dtype)
            return
        self.root = zarr.open_group(self.store, mode="w-", zarr_format=3)
        self.group = self.root
        self.root.attrs[MARKER_KEY] = {**marker, "complete": False}
        _write_anndata_elements(self.root, obs, var, uns)
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
            "chunks": (min(SPARSE_CHUNK, shard),),
            "shards": (shard,),
            "compressors": sparse_compressors(),
            "fill_value": 0,
            # zarr's check for all-fill chunks compares every value through a void view (a
            # string comparison loop): it halved write speed, and CSR chunks are never empty
            "config": {"write_empty_chunks": True},
        }
        self.data = _GrowingArray(x.create_array("data", dtype=self.dtype, **kwargs), shard, self.dtype)
        self.indices = _GrowingArray(x.create_array("indices", dtype=index_dtype, **kwargs), shard, index_dtype)

    def resume(self, state: dict, checkpoints: Checkpoints) -> None:
        counts = checkpoints.adopt(state)
        self.rows_written, self.nnz_written = checkpoints.rows, checkpoints.nnz
        self.row_nnz[: len(counts)] = counts
        for array in (self.data, self.indices):
            array.restart(self.nnz_written)

    def _checkpoint(self) -> None:
        """After each whole shard of both arrays: the rows whose values all lie before it."""
        done = min(self.data.durable, self.indices.durable)
        checkpoints = self.checkpoints
        if done <= checkpoints.nnz:
            return
        first = checkpoints.rows
        ends = checkpoints.nnz + np.cumsum(self.row_nnz[first : self.rows_written])
        rows = first + int(np.searchsorted(ends, done, side="right"))
        if rows > first:
            checkpoints.save(rows, int(ends[rows - first - 1]), self.row_nnz[first:rows])

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
        from bigcat.cluster import completed

        indptr = source.indptr
        nnz = int(indptr[-1])
        for array in (self.data, self.indices):
            array.array.resize((nnz,))
            array.n_written = nnz
        ranges = [(lo, min(lo + self.shard, nnz)) for lo in range(0, nnz, self.shard)]
        starts = indptr[1:-1]
        starts = starts[np.r_[True, np.diff(starts) > 0]] if len(starts) else starts  # not empty rows twice

        def row_starts(lo: int, hi: int) -> np.ndarray:
            a, b = np.searchsorted(starts, [lo, hi])
            return (starts[a:b] - lo).astype(np.int64)

        futures = [
            client.submit(
                _copy_csr_range,
                source,
                self.data.array,
                self.indices.array,
                lo,
                hi,
                row_starts(lo, hi),
                pure=False,
                key=f"{COPY_TASK}-{os.getpid()}-{id(self)}-{lo}",
            )
            for lo, hi in ranges
        ]
        for future in completed(client, futures, what="the parallel copy"):
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
        chunk = min(SPARSE_CHUNK, self.shard, max(n, 1))
        self.x.create_array(
            "indptr",
            shape=(n,),
            dtype=np.int64,
            chunks=(chunk,),
            shards=(max(chunk, min(self.shard, n)) // chunk * chunk,),
            compressors=sparse_compressors(),
            fill_value=0,
        )[:] = indptr
        if self.checkpoints is not None:
            self.checkpoints.remove()
        self.root.attrs[MARKER_KEY] = marker
        from zarr.errors import UnstableSpecificationWarning

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            # uns of old files holds structured and fixed-width string arrays: zarr notes that v3
            # has no specification for them, which is nothing for the user to act on
            warnings.filterwarnings("ignore", category=UnstableSpecificationWarning)
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
        resume: bool = False,
    ) -> None:
        import dask.array as da
        import xarray as xr
        import zarr

        from bigcat.fs import zarr_store

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
        obs_names, var_names = coord_names(list(obs.columns), list(var.columns))
        coords = {
            "cell": ("cell", np.asarray(obs.index.astype(str), dtype=object)),
            "gene": ("gene", np.asarray(var.index.astype(str), dtype=object)),
            **_xarray_coords(obs, obs_names, "cell"),
            **_xarray_coords(var, var_names, "gene"),
        }
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

    def resume(self, state: dict, checkpoints: Checkpoints) -> None:
        checkpoints.adopt(state, counts=False)
        self.rows_written = self.next_row = checkpoints.rows
        self.nnz_written = self.nnz_flushed = checkpoints.nnz

    def _checkpoint(self) -> None:
        """After each whole chunk row: the rows flushed so far."""
        self.checkpoints.save(self.next_row, self.nnz_flushed, None)

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
        import zarr

        if self.n_pending:
            self._flush(self.n_pending)
        if self.checkpoints is not None:
            self.checkpoints.remove()
        self.root.attrs[MARKER_KEY] = marker
        from zarr.errors import UnstableSpecificationWarning

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            # uns of old files holds structured and fixed-width string arrays: zarr notes that v3
            # has no specification for them, which is nothing for the user to act on
            warnings.filterwarnings("ignore", category=UnstableSpecificationWarning)
            zarr.consolidate_metadata(self.store)


class H5adWriter(MatrixWriter):
    """An ``.h5ad`` file with a CSR ``X`` (uncompressed, chunked, like anndata's default)."""

    def __init__(self, path: Path, obs: pd.DataFrame, var: pd.DataFrame, uns: Mapping, dtype: np.dtype) -> None:
        import h5py

        super().__init__(len(obs), len(var), dtype)
        self.path = path
        self.file = h5py.File(path, "w-")
        self.group = self.file
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

    def finish(self, marker: dict) -> None:
        indptr = np.zeros(self.n_cells + 1, dtype=np.int64)
        np.cumsum(self.row_nnz, out=indptr[1:])
        self.x.create_dataset("indptr", data=indptr)
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
    layout: str = "sparse",
    overwrite: bool = False,
    source: dict | None = None,
    chunk_cells: int = DENSE_CHUNK_CELLS,
    storage_options: dict | None = None,
    resume: bool | None = None,
    shard: int = SPARSE_SHARD,
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
    resume
        ``None``: a plain output. ``False``/``True``: a resumable ``.zarr`` output (see the
        module docstring); ``True`` continues an interrupted conversion of the same input
        with the same settings. The writer's ``rows_written`` then says where to go on.
    shard
        Values per shard (file) of the sparse layout's ``data`` and ``indices``.

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
    obs = _clean_frame(obs, "cell", path)
    var = _clean_frame(var, "gene", path)
    marker = {
        "format_version": FORMAT_VERSION,
        "layout": layout if kind == "zarr" else "h5ad",
        "bigcat_version": _bigcat_version(),
        "shape": [len(obs), len(var)],
        "source": source or {},
    }
    from bigcat import fs

    final = str(path) if fs.is_url(path) else fs.local(path)
    if resume and kind != "zarr":
        msg = f"{path}: --resume works for .zarr outputs only"
        raise BigcatInputError(msg)
    if resume is None or kind != "zarr":
        where = publish(
            path, overwrite=overwrite, storage_options=storage_options, kind=kind if kind == "zarr" else "file"
        )
    else:
        settings = {
            "source": source or {},
            "layout": layout,
            "dtype": np.dtype(dtype).str,
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
            writer = H5adWriter(tmp, obs, var, uns or {}, np.dtype(dtype))
        elif layout == "sparse":
            writer = SparseZarrWriter(
                tmp, obs, var, uns or {}, np.dtype(dtype), marker, storage_options, shard=shard, resume=bool(state)
            )
        else:
            writer = DenseZarrWriter(
                tmp, obs, var, np.dtype(dtype), marker, chunk_cells=chunk_cells, storage_options=storage_options,
                resume=bool(state),
            )  # fmt: skip
        if state:
            writer.resume(state, checkpoints)
        writer.checkpoints = checkpoints
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


def _clean_frame(frame: pd.DataFrame, what: str = "cell", path: Any = "") -> pd.DataFrame:
    """A copy with string index and column names, as anndata requires; duplicate names
    made unique (``name``, ``name-1``, ``name-2`` … as ``AnnData.obs_names_make_unique``),
    with a warning, since cell names key external label tables and gene names select genes."""
    from anndata.utils import make_index_unique

    frame = frame.copy()
    frame.index = frame.index.astype(str)
    frame.columns = [str(c) for c in frame.columns]
    if frame.index.has_duplicates:
        n = int(frame.index.duplicated().sum())
        example = frame.index[frame.index.duplicated()][0]
        frame.index = make_index_unique(frame.index, join="-")
        log.warning(
            "%s: %d duplicate %s names (e.g. %r) made unique by appending -1, -2, … in the output",
            path,
            n,
            what,
            example,
        )
    return frame
