"""What a path holds: ``.h5ad`` (HDF5), a Zarr store or Parquet, from its content, not its name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from bigcat._io import fs
from bigcat.errors import BigcatFormatError, BigcatInputError

__all__ = ["kind_of", "output_kind"]

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

Kind = Literal["h5ad", "zarr", "parquet"]


def kind_of(path: Path | str, storage_options: dict | None = None) -> Kind:
    """``"h5ad"``, ``"zarr"`` or ``"parquet"``: what the existing ``path`` holds.

    Raises
    ------
    BigcatFormatError
        Anything else (a folder that is not a Zarr store, a truncated HDF5 file…).
    """
    return _kind_of_url(str(path), storage_options) if fs.is_url(path) else _kind_of_path(Path(path))


def _kind_of_path(path: Path) -> Kind:
    """What a local path holds, from its signature (a Zarr folder's metadata, HDF5's magic bytes)."""
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


def _kind_of_url(url: str, storage_options: dict | None) -> Kind:
    """What an object holds, from its metadata or first bytes (a name may lie)."""
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


def output_kind(path: str | os.PathLike) -> Literal["h5ad", "zarr"]:
    """``"h5ad"`` or ``"zarr"``, from the output's extension.

    Raises
    ------
    BigcatInputError
        For any other extension.
    """
    suffix = fs.suffix_of(path)
    if suffix == ".h5ad":
        return "h5ad"
    if suffix == ".zarr":
        return "zarr"
    msg = f"{path}: unknown output format {suffix or '(no extension)'!r}; use .h5ad or .zarr"
    raise BigcatInputError(msg)
