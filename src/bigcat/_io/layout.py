"""What bigcat's outputs look like on disk: layouts, chunking, codecs and the marker's name.

Layouts
-------
``sparse`` (default)
    The AnnData Zarr encoding, Zarr format 3: ``X`` is a ``csr_matrix`` group with
    ``data``/``indices``/``indptr`` arrays, ``obs``/``var``/``uns`` are written by anndata
    itself, metadata is consolidated. ``data`` and ``indices`` are sharded 1-D arrays
    (:data:`SPARSE_CHUNK` elements per chunk, :data:`SPARSE_SHARD` per shard/file), so a
    row block of the Dask array reads a few contiguous chunks.
``dense``
    The plain xarray layout: variable ``X(cell, gene)`` chunked ``chunk_cells × 4000``,
    coordinates ``cell``, ``gene`` and every obs/var column; opens with
    ``xarray.open_zarr``.

Every store carries a completion marker, the root attribute :data:`MARKER_KEY` with
``complete: true`` and a fingerprint of its source, written last (see
:mod:`bigcat._io.publish`).
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = [
    "DENSE_CHUNK_CELLS",
    "DENSE_CHUNK_GENES",
    "FORMAT_VERSION",
    "LAYOUTS",
    "MARKER_KEY",
    "SPARSE_CHUNK",
    "SPARSE_SHARD",
    "Layout",
    "sparse_compressors",
]

Layout = Literal["sparse", "dense"]
LAYOUTS: tuple[Layout, ...] = ("sparse", "dense")
FORMAT_VERSION = 1
MARKER_KEY = "bigcat"
#: elements per chunk of ``X/data`` and ``X/indices`` (4 MB of float32): the unit of decoding
SPARSE_CHUNK = 1 << 20
#: elements per shard (one file): 32 chunks, 128 MB of float32 before compression
SPARSE_SHARD = 32 * SPARSE_CHUNK
DENSE_CHUNK_CELLS = 8000
DENSE_CHUNK_GENES = 4000
#: elements per HDF5 chunk of an ``.h5ad``'s ``X/data`` and ``X/indices``
H5AD_CHUNK = 1 << 18


def bigcat_version() -> str:
    """The installed bigcat's version, recorded in every marker."""
    from bigcat import __version__

    return __version__


def sparse_compressors() -> list[Any]:
    """Codecs of the sparse layout's arrays: Blosc-LZ4 with byte shuffle (see BENCHMARKS.md)."""
    from zarr.codecs import BloscCodec

    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
