"""``.h5ad`` (or AnnData Zarr) → bigcat Zarr store, streaming in bounded memory."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bigcat._io.fs import is_url, path_of
from bigcat._io.layout import DENSE_CHUNK_CELLS, SPARSE_CHUNK, SPARSE_SHARD, Layout
from bigcat._io.sniff import output_kind
from bigcat._io.source import BLOCK_NNZ, open_source
from bigcat._io.writers import open_writer
from bigcat._threads import prefetch
from bigcat.errors import BigcatInputError
from bigcat.progress import progress_bar

__all__ = ["convert"]

log = logging.getLogger("bigcat")


def convert(
    input: str | os.PathLike,  # noqa: A002 - the natural name
    output: str | os.PathLike,
    *,
    layout: Layout = "sparse",
    chunk_cells: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    storage_options: dict | None = None,
    block_nnz: int = BLOCK_NNZ,
    client: Any = None,
    resume: bool = False,
    shard_values: int = SPARSE_SHARD,
    skip: Iterable[str] = (),
) -> Path | str:
    """Convert an AnnData file to a bigcat store (or another ``.h5ad``), row block by row block.

    Parameters
    ----------
    input
        ``.h5ad`` file (any anndata version; X CSR, CSC or dense, any numeric dtype or
        byte order) or an AnnData Zarr store.
    output
        ``.zarr`` store (or ``.h5ad``). Written under a temporary name and renamed when
        complete; the store's completion marker is written last.
    layout
        ``"sparse"`` (AnnData encoding, default) or ``"dense"`` (xarray ``X(cell, gene)``).
    chunk_cells
        Rows per chunk of the dense layout (default 8,000); also caps the rows per block read.
    overwrite
        Replace an existing output (a directory only if bigcat wrote it), or an interrupted
        conversion of it.
    progress
        Show a progress bar; ``None``: only on a terminal.
    storage_options
        fsspec options for URL inputs/outputs (``s3://…``; see :mod:`bigcat._io.fs`).
    block_nnz
        Stored values read per block: memory is about ``block_nnz × 30`` bytes.
    client
        A ``distributed.Client``: a CSR input converted to the sparse layout is then copied
        as parallel tasks, one per output shard (the workers must see the input and the
        output folder). Other inputs and layouts stream through this process.
    resume
        Continue an interrupted conversion to a ``.zarr`` output from its last recorded row
        (see :mod:`bigcat._io.checkpoints`); refused if the input or the settings changed. The
        result is byte for byte what an uninterrupted run writes. A conversion streamed
        through this process records its progress after every shard of values (or chunk
        row of the dense layout); a parallel copy on a ``client`` records none, so it
        starts over.
    shard_values
        Values per file of the sparse layout's ``data`` and ``indices`` (default 32 Mi).
    skip
        AnnData elements besides X, obs, var and uns to leave out: slots (``"layers"``,
        ``"obsm"``, ``"varm"``, ``"obsp"``, ``"varp"``, ``"raw"``) or single elements
        (``"obsm/X_pca"``). All others are copied (see :mod:`bigcat.extras`) to the sparse
        layout and ``.h5ad`` outputs, in AnnData's encoding, streamed in bounded memory; the
        dense layout holds X alone, so a file with such elements is refused there unless
        they are skipped.

    Returns
    -------
    pathlib.Path
        The output path.

    Raises
    ------
    BigcatInputError
        Elements besides X for the dense layout, or a ``skip`` naming none of the file's.
    InputNotFoundError, BigcatFormatError, CorruptMatrixError
        Unreadable or invalid input (checked while streaming: indptr monotone and ending at
        the number of values, indices within range).
    BigcatOutputExistsError
        The output exists (or an interrupted conversion of it) and neither ``overwrite``
        nor ``resume`` is given.

    Notes
    -----
    Time O(stored values), one read of the input; memory O(block_nnz + cells) whatever the
    size. A CSC X is transposed through row buckets on a temporary disk (two passes over
    the input, temporary space 20 bytes per value) instead of re-reading all columns for
    every row block, which would be quadratic.
    """
    output_kind(output)
    _check_sizes(chunk_cells, block_nnz, shard_values)
    from bigcat._io.publish import refuse_input_as_output

    refuse_input_as_output(output, [input])
    non_finite = 0
    with open_source(input, require_marker=False, storage_options=storage_options) as source:
        elements = _elements_to_copy(source, skip, layout, output)
        with (
            open_writer(
                output, storage_options=storage_options, obs=source.obs, var=source.var, uns=source.uns,
                dtype=source.dtype, layout=layout, overwrite=overwrite, source={"input": source.fingerprint()},
                chunk_cells=chunk_cells or DENSE_CHUNK_CELLS,
                resume=resume if (resume or output_kind(output) == "zarr") else None, shard=shard_values,
                nnz=source.nnz,
            ) as writer,
            progress_bar(total=source.shape[0], unit="cells", desc="convert", enabled=progress) as bar,
        ):  # fmt: skip
            first = writer.rows_written
            bar.update(first)
            if client is not None and source.encoding == "csr" and hasattr(writer, "copy_csr") and not first:
                _copy_in_parallel(source, writer, client, output, bar)
            else:
                if client is not None:
                    log.info("%s: %s X streams through this process (no parallel copy)", input, source.encoding)
                non_finite = _stream(source, writer, block_nnz, chunk_cells, first, bar)
            if elements:
                from bigcat.extras import copy_elements

                copy_elements(source.root(), writer.group, elements, block_values=block_nnz, path=input)
        log.info("converted %s (%d × %d, %d values) to %s", input, *source.shape, writer.nnz_written, output)
    if non_finite:
        log.warning(
            "%s: X holds %d non-finite values (NaN or ±inf), copied as they are; statistics over them follow "
            "IEEE rules (NaN propagates)",
            input,
            non_finite,
        )
    return path_of(output)


def _check_sizes(chunk_cells: int | None, block_nnz: int, shard_values: int) -> None:
    for name, value in (("--chunk-cells (chunk_cells)", chunk_cells), ("block_nnz", block_nnz)):
        if value is not None and int(value) < 1:  # 0 cells per chunk looped forever
            msg = f"{name} must be a positive number, not {value}"
            raise BigcatInputError(msg)
    if shard_values < 1 or (shard_values > SPARSE_CHUNK and shard_values % SPARSE_CHUNK):
        msg = f"shard_values must be at most {SPARSE_CHUNK} or a multiple of it, not {shard_values}"
        raise BigcatInputError(msg)


def _copy_in_parallel(source: Any, writer: Any, client: Any, output: Any, bar: Any) -> None:
    """A CSR X copied shard by shard as tasks on ``client`` (see :mod:`bigcat._io.copy`)."""
    from bigcat.cluster import capacity, check_visible, use_workers

    n_tasks = -(-source.nnz // writer.shard) if source.nnz else 1
    with use_workers(client, min(n_tasks, capacity(client).workers), what="the parallel copy"):
        check_visible(client, [source.path] + ([] if is_url(output) else [Path(output).resolve().parent]))
        bar.total, bar.unit = source.nnz, "values"
        writer.copy_csr(source, client, progress=lambda lo: bar.update(min(writer.shard, source.nnz - lo)))


def _stream(source: Any, writer: Any, block_nnz: int, chunk_cells: int | None, first: int, bar: Any) -> int:
    """X streamed through this process from row ``first``, the next block read while one is
    written; returns the number of non-finite values met."""
    # reused buffers when the writer copies each block before the producer, one block
    # ahead, can reach its buffer again (a ring of 3)
    blocks = source.iter_row_blocks(block_nnz, max_rows=chunk_cells, reuse=writer.copies_blocks, start=first)
    check_finite = source.dtype.kind == "f"
    non_finite = 0
    for start, stop, block in prefetch(blocks, depth=1):
        if check_finite:
            non_finite += int(block.nnz - np.count_nonzero(np.isfinite(block.data)))
        writer.write_rows(block)
        bar.update(stop - start)
    return non_finite


def _elements_to_copy(source: Any, skip: Iterable[str], layout: str, output: Any) -> list:
    """What besides X, obs, var and uns goes to the output; refused for the dense layout."""
    from bigcat.extras import select_elements

    elements = select_elements(source.elements(), skip, path=source.path)
    if elements and layout == "dense" and output_kind(output) == "zarr":
        names = ", ".join(e.name for e in elements)
        slots = ",".join(dict.fromkeys(e.name.split("/")[0] for e in elements))
        msg = (
            f"{source.path}: the dense layout holds X alone and would drop {names}; convert to the sparse layout "
            f"to keep them, or leave them out with --skip {slots}"
        )
        raise BigcatInputError(msg)
    return elements
