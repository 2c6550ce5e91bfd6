"""Publishing outputs atomically, and the completion marker that says a store is whole.

Locally an output is written under a temporary sibling name and renamed into place when
complete, so an interrupted run never leaves anything under the final name. Object stores
have no rename: a Zarr store is written in place and is valid once its completion marker
(the root attribute ``bigcat``, written last with the consolidated metadata) says so; a
single file is written locally and uploaded in one PUT. ``--overwrite`` replaces only what
bigcat wrote (:func:`written_by_bigcat`); one process at a time writes a local output
(:func:`output_lock`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from bigcat._io import fs
from bigcat._io.layout import MARKER_KEY
from bigcat.errors import BigcatInputError, BigcatOutputExistsError

#: the file that marks a folder of tables (not a Zarr store) as one bigcat wrote, written last
FOLDER_MARKER = "bigcat.json"

__all__ = [
    "atomic_path",
    "output_lock",
    "publish",
    "read_marker",
    "refuse_input_as_output",
    "swap_into",
    "written_by_bigcat",
]


def read_marker(path: str | os.PathLike, storage_options: dict | None = None) -> dict | None:
    """The ``bigcat`` root attribute of a Zarr store, or the ``bigcat`` entry of the
    :data:`FOLDER_MARKER` file of a folder of tables bigcat wrote (``None`` if neither)."""
    folder = _folder_marker(path, storage_options)
    if folder is not None:
        return folder
    if fs.is_url(path):
        import zarr

        try:
            attrs: dict[str, Any] = dict(zarr.open_group(fs.zarr_store(path, storage_options), mode="r").attrs)
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


def _folder_marker(path: str | os.PathLike, storage_options: dict | None) -> dict | None:
    where = f"{str(path).rstrip('/')}/{FOLDER_MARKER}"
    try:
        if fs.is_url(path):
            filesystem, inner = fs.filesystem(where, storage_options)
            raw = filesystem.cat_file(inner) if filesystem.exists(inner) else None
        else:
            marker = fs.local(where)
            raw = marker.read_bytes() if marker.is_file() else None
        return None if raw is None else json.loads(raw).get(MARKER_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def write_folder_marker(folder: Path, marker: dict) -> None:
    """Mark a folder of tables as bigcat's, complete (written last)."""
    (folder / FOLDER_MARKER).write_text(json.dumps({MARKER_KEY: {**marker, "complete": True}}, default=str))


def remove_local(path: Path) -> None:
    """Remove a local file, link or folder (tree)."""
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
    check_replaceable(final, overwrite=overwrite)
    check_writable(final)
    tmp = parent / f".{final.name}.bigcat-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield tmp
    except BaseException:
        remove_local(tmp)
        raise
    swap_into(tmp, final, overwrite=overwrite)


@contextlib.contextmanager
def publish(
    final: str | os.PathLike,
    *,
    overwrite: bool = False,
    storage_options: dict | None = None,
    kind: Literal["zarr", "file", "folder"] = "zarr",
) -> Iterator[Any]:
    """Where to write an output so that it appears atomically at ``final``.

    Local paths: :func:`atomic_path` (temporary sibling, renamed). URLs (see :mod:`bigcat._io.fs`):
    a Zarr store (``kind="zarr"``) is written in place — its completion marker, written
    last, is what makes it valid — after removing an existing bigcat store when
    ``overwrite``; a single file (``kind="file"``) is written locally and uploaded in one
    PUT; a folder of files (``kind="folder"``) is written locally and uploaded file by file,
    its :data:`FOLDER_MARKER` last. Yields a local ``Path`` or the URL string.
    """
    if not fs.is_url(final):
        with atomic_path(fs.local(final), overwrite=overwrite) as tmp:
            yield tmp
        return
    url = str(final)
    if fs.exists(url, storage_options):
        if not overwrite:
            msg = f"{url}: output exists; pass --overwrite (overwrite=True) to replace it"
            raise BigcatOutputExistsError(msg)
        if kind in ("zarr", "folder"):
            if read_marker(url, storage_options) is None:
                msg = f"{url}: output exists and is not a store bigcat wrote; bigcat will not delete it"
                raise BigcatOutputExistsError(msg)
            fs.remove(url, storage_options)
    if kind == "file":
        with fs.local_copy_for_upload(url, storage_options) as tmp:
            yield tmp
        return
    if kind == "folder":
        with fs.local_folder_for_upload(url, storage_options, last=FOLDER_MARKER) as tmp:
            yield tmp
        return
    try:
        yield url
    except BaseException:
        with contextlib.suppress(Exception):
            fs.remove(url, storage_options)
        raise


def swap_into(tmp: Path, final: Path, *, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``final`` (checked again: it may have appeared meanwhile);
    what ``final`` held is renamed aside first and removed only once ``tmp`` is in place."""
    check_replaceable(final, overwrite=overwrite)
    if final.exists() or final.is_symlink():
        trash = final.parent / f".{final.name}.bigcat-old-{secrets.token_hex(4)}"
        final.rename(trash)
        tmp.rename(final)
        remove_local(trash)
    else:
        tmp.rename(final)


def check_writable(final: Path) -> None:
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


def check_replaceable(final: Path, *, overwrite: bool) -> None:
    """Refuse an existing ``final`` unless ``overwrite`` and bigcat wrote it."""
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
    "cluster,merged",  # merge mapping
)


def written_by_bigcat(path: Path) -> bool:
    """Whether the single file ``path`` is one bigcat wrote (so ``--overwrite`` may replace it).

    ``.h5ad``/``.h5``: the root attribute ``bigcat`` (or, from older versions, the
    statistics' ``uns/bigcat_stats`` or MapMyCells ``metadata`` naming bigcat); ``.parquet``:
    the ``bigcat`` key of the file metadata; images: bigcat named as their software; ``.csv``
    (no place for a marker): the header of one of bigcat's tables; ``.json`` (MapMyCells query
    markers): ``"written_by": "bigcat"`` in its closing metadata.
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
        if suffix == ".json":
            with path.open("rb") as handle:
                handle.seek(max(0, path.stat().st_size - (1 << 16)))
                return b'"written_by": "bigcat"' in handle.read()
        if suffix in (".png", ".svg", ".pdf"):
            with path.open("rb") as handle:
                return b"bigcat" in handle.read(1 << 16)
    except (OSError, ValueError):
        return False
    return False


def refuse_input_as_output(output: str | os.PathLike, inputs: Iterable[Any]) -> None:
    """An output that is one of the inputs (the same file once links are resolved) is refused:
    ``--overwrite`` would replace the input with what is computed from it."""

    def where(path: Any) -> str:
        return str(path).rstrip("/") if fs.is_url(path) else str(fs.local(path).resolve())

    target = where(output)
    for source in inputs:
        if isinstance(source, (str, os.PathLike)) and where(source) == target:
            msg = f"{output}: the output is an input ({source}); write it elsewhere"
            raise BigcatInputError(msg)


@contextlib.contextmanager
def output_lock(final: str | os.PathLike) -> Iterator[None]:
    """One bigcat process at a time writes a local output: three concurrent conversions to
    one store crashed each other (``FileNotFoundError``) and left temporary files. An
    exclusive ``flock`` on ``.NAME.bigcat-lock`` beside it (released by the kernel if the
    process dies; the file is reused then, and removed on the way out)."""
    import fcntl

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
