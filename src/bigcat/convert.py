"""``.h5ad`` (or AnnData Zarr) → bigcat Zarr store, streaming in bounded memory."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from bigcat.fs import is_url, local
from bigcat.progress import progress_bar
from bigcat.readers import BLOCK_NNZ, open_source
from bigcat.store import DENSE_CHUNK_CELLS, SPARSE_SHARD, open_writer, output_kind
from bigcat.util import prefetch

__all__ = ["convert"]

log = logging.getLogger("bigcat")


def convert(
    input: str | os.PathLike,  # noqa: A002 - the natural name
    output: str | os.PathLike,
    *,
    layout: str = "sparse",
    chunk_cells: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    storage_options: dict | None = None,
    block_nnz: int = BLOCK_NNZ,
    client: Any = None,
) -> Path:
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
        Replace an existing output (a directory only if bigcat wrote it).
    progress
        Show a progress bar; ``None``: only on a terminal.
    storage_options
        fsspec options for URL inputs/outputs (``s3://…``; see :mod:`bigcat.fs`).
    block_nnz
        Stored values read per block: memory is about ``block_nnz × 30`` bytes.
    client
        A ``distributed.Client``: a CSR input converted to the sparse layout is then copied
        as parallel tasks, one per output shard (the workers must see the input and the
        output folder). Other inputs and layouts stream through this process.

    Returns
    -------
    pathlib.Path
        The output path.

    Raises
    ------
    InputNotFoundError, BigcatFormatError, CorruptMatrixError
        Unreadable or invalid input (checked while streaming: indptr monotone and ending at
        the number of values, indices within range).
    BigcatOutputExistsError
        The output exists and ``overwrite`` is false.

    Notes
    -----
    Time O(stored values), one read of the input; memory O(block_nnz + cells) whatever the
    size. A CSC X is transposed through row buckets on a temporary disk (two passes over
    the input, temporary space 20 bytes per value) instead of re-reading all columns for
    every row block, which would be quadratic.
    """
    output_kind(output)
    with open_source(input, require_marker=False, storage_options=storage_options) as source:
        obs, var, uns = source.obs, source.var, source.uns
        cells = chunk_cells or DENSE_CHUNK_CELLS
        with (
            open_writer(
                output,
                storage_options=storage_options,
                obs=obs,
                var=var,
                uns=uns,
                dtype=source.dtype,
                layout=layout,
                overwrite=overwrite,
                source={"input": source.fingerprint()},
                chunk_cells=cells,
            ) as writer,
            progress_bar(total=source.shape[0], unit="cells", desc="convert", enabled=progress) as bar,
        ):
            if client is not None and source.encoding == "csr" and hasattr(writer, "copy_csr"):
                from bigcat.cluster import check_visible

                check_visible(client, [source.path] + ([] if is_url(output) else [Path(output).resolve().parent]))
                bar.total, bar.unit = source.nnz, "values"
                writer.copy_csr(source, client, progress=lambda lo: bar.update(min(SPARSE_SHARD, source.nnz - lo)))
            else:
                if client is not None:
                    log.info("%s: %s X streams through this process (no parallel copy)", input, source.encoding)
                # reused buffers when the writer copies each block before the producer, one
                # block ahead, can reach its buffer again (a ring of 3)
                blocks = source.iter_row_blocks(block_nnz, max_rows=chunk_cells, reuse=writer.copies_blocks)
                for start, stop, block in prefetch(blocks, depth=1):
                    writer.write_rows(block)
                    bar.update(stop - start)
        log.info("converted %s (%d × %d, %d values) to %s", input, *source.shape, writer.nnz_written, output)
    return str(output) if is_url(output) else local(output)
