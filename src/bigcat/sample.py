"""Random subsets of cells and genes, streamed from disk to disk."""

from __future__ import annotations

import itertools
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bigcat._io.fs import path_of
from bigcat._io.layout import Layout
from bigcat._io.sniff import output_kind
from bigcat._io.source import BLOCK_NNZ, MatrixSource, open_source
from bigcat._io.writers import open_writer
from bigcat._threads import prefetch
from bigcat.errors import BigcatInputError
from bigcat.progress import progress_bar

__all__ = ["choose_cells", "choose_genes", "sample"]

log = logging.getLogger("bigcat")

#: what a sampling task computes, and what to change when a worker dies running one (bigcat.cli)
STEPS = {"_read_subset": ("sample (reading and subsetting a block of rows)", "a smaller fraction of genes per run")}


def _check_fraction(name: str, value: float) -> float:
    if not 0 < value <= 1:
        msg = f"{name} must be in (0, 1], got {value}"
        raise BigcatInputError(msg)
    return float(value)


def _pick(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


def choose_cells(
    obs: pd.DataFrame,
    rng: np.random.Generator,
    *,
    fraction: float | None = None,
    n_cells: int | None = None,
    max_cells_per_cluster: int | None = None,
    by: str = "cluster",
    source: str = "input",
) -> np.ndarray:
    """Sorted indices of the cells to keep (all cells if no option is given).

    ``fraction`` keeps ``round(fraction × n)`` cells, ``n_cells`` exactly that many,
    ``max_cells_per_cluster`` at most N cells of each level of ``obs[by]`` (cells with a
    missing label are dropped), as R's ``get_cl_stats_big`` does with ``max.cl.size``.
    """
    n = len(obs)
    given = [o for o in (fraction, n_cells, max_cells_per_cluster) if o is not None]
    if len(given) > 1:
        msg = "choose one of --cells/--fraction, --n-cells and --max-cells-per-cluster"
        raise BigcatInputError(msg)
    if fraction is not None:
        return _pick(rng, n, round(_check_fraction("the cell fraction", fraction) * n))
    if n_cells is not None:
        if not 0 <= n_cells <= n:
            msg = f"{source}: --n-cells {n_cells} is not between 0 and the {n} cells of the input"
            raise BigcatInputError(msg)
        return _pick(rng, n, n_cells)
    if max_cells_per_cluster is not None:
        if max_cells_per_cluster < 1:
            msg = f"--max-cells-per-cluster must be ≥ 1, got {max_cells_per_cluster}"
            raise BigcatInputError(msg)
        if by not in obs.columns:
            msg = f"{source}: no obs column {by!r}; available: {', '.join(map(str, obs.columns)) or '(none)'}"
            raise BigcatInputError(msg)
        codes, _ = pd.factorize(obs[by], sort=True)
        keep = []
        for code in range(codes.max() + 1 if len(codes) else 0):
            members = np.flatnonzero(codes == code)
            if len(members) > max_cells_per_cluster:
                members = rng.choice(members, size=max_cells_per_cluster, replace=False)
            keep.append(members)
        return np.sort(np.concatenate(keep)).astype(np.int64) if keep else np.zeros(0, dtype=np.int64)
    return np.arange(n, dtype=np.int64)


def choose_genes(n_genes: int, rng: np.random.Generator, *, fraction: float | None = None) -> np.ndarray:
    """Sorted indices of the genes to keep: ``round(fraction × n_genes)`` of them, or all."""
    if fraction is None:
        return np.arange(n_genes, dtype=np.int64)
    return _pick(rng, n_genes, round(_check_fraction("the gene fraction", fraction) * n_genes))


def sample(
    input: str | os.PathLike,  # noqa: A002
    output: str | os.PathLike,
    *,
    fraction: float | None = None,
    cells: float | None = None,
    genes: float | None = None,
    n_cells: int | None = None,
    max_cells_per_cluster: int | None = None,
    by: str = "cluster",
    seed: int = 0,
    layout: Layout = "sparse",
    overwrite: bool = False,
    progress: bool | None = None,
    storage_options: dict | None = None,
    client: Any = None,
) -> Path | str:
    """Write a random subset of the cells and genes of ``input`` to ``output``.

    Parameters
    ----------
    input
        ``.h5ad`` file or bigcat Zarr store; read lazily, block by block.
    output
        ``.h5ad`` or ``.zarr`` (by extension), written atomically.
    fraction
        Keep this fraction of the matrix: ``sqrt(fraction)`` of the cells and
        ``sqrt(fraction)`` of the genes (the lab's convention).
    cells, genes
        Fractions of cells and of genes to keep (instead of ``fraction``).
    n_cells
        Keep exactly this many cells.
    max_cells_per_cluster
        Keep at most this many cells of each level of ``obs[by]`` (stratified).
    by
        obs column for ``max_cells_per_cluster``.
    seed
        The same seed and input give the same subset.
    layout
        Zarr layout of the output.
    overwrite
        Replace an existing output.
    progress
        Progress bar; ``None``: only on a terminal.
    storage_options
        fsspec options for URL inputs/outputs (``s3://…``; see :mod:`bigcat._io.fs`).
    client
        A ``distributed.Client``: row blocks are read and subset by the workers (a few
        blocks in flight per worker thread) and written here, in order. CSC inputs stream
        through this process.

    Returns
    -------
    pathlib.Path
        The output path.

    Notes
    -----
    Cells are drawn first, then genes, from ``numpy.random.default_rng(seed)``; kept cells
    and genes stay in their original order. Only row blocks holding kept cells are read;
    memory is O(one block + cells).
    """
    output_kind(output)
    if fraction is not None:
        if cells is not None or genes is not None:
            msg = "give either --fraction or --cells/--genes, not both"
            raise BigcatInputError(msg)
        cells = genes = math.sqrt(_check_fraction("--fraction", fraction))
    rng = np.random.default_rng(seed)
    from bigcat._io.publish import refuse_input_as_output

    refuse_input_as_output(output, [input])
    with open_source(input, storage_options=storage_options) as source:
        _say_what_stays_out(source)
        cell_index = choose_cells(
            source.obs,
            rng,
            fraction=cells,
            n_cells=n_cells,
            max_cells_per_cluster=max_cells_per_cluster,
            by=by,
            source=str(input),
        )
        gene_index = choose_genes(source.shape[1], rng, fraction=genes)
        obs = source.obs.iloc[cell_index]
        var = source.var.iloc[gene_index]
        with (
            open_writer(
                output,
                storage_options=storage_options,
                obs=obs,
                var=var,
                uns=source.uns,
                dtype=source.dtype,
                layout=layout,
                overwrite=overwrite,
                source={"input": source.fingerprint(), "sample": {"seed": seed}},
                nnz=_nnz_bound(source, cell_index),
            ) as writer,
            progress_bar(total=len(cell_index), unit="cells", desc="sample", enabled=progress) as bar,
        ):
            genes_kept = None if len(gene_index) == source.shape[1] else gene_index
            if client is not None and source.encoding != "csc":
                parts = _parts_on_cluster(source, cell_index, genes_kept, client)
            else:
                parts = (
                    _subset(block, start, cell_index, genes_kept)
                    for start, _, block in prefetch(_blocks_with(source, cell_index))
                )
            for part in parts:
                writer.write_rows(part)
                bar.update(part.shape[0])
    return path_of(output)


def _subset(block: Any, start: int, rows: np.ndarray, genes: np.ndarray | None) -> Any:
    """The kept ``rows`` (sorted, absolute) of a CSR block starting at row ``start``, and kept genes."""
    lo, hi = np.searchsorted(rows, [start, start + block.shape[0]])
    part = block[rows[lo:hi] - start]
    if genes is not None:
        part = part[:, genes]
    part.sort_indices()
    return part


def _read_subset(source: MatrixSource, first: int, last: int, rows: np.ndarray, genes: np.ndarray | None) -> Any:
    """One worker task: read rows ``first:last`` and keep ``rows`` and ``genes``."""
    return _subset(source.read_rows(first, last), first, rows, genes)


def _parts_on_cluster(source: MatrixSource, rows: np.ndarray, genes: np.ndarray | None, client: Any) -> Any:
    """Subset blocks computed by the workers, yielded in row order with a bounded number in flight."""
    from collections import deque

    from bigcat._scheduling import gather
    from bigcat.cluster import capacity, check_visible, use_workers

    bounds = source.row_bounds(BLOCK_NNZ)
    cap = capacity(client)  # what the cluster will have, not only what has joined yet
    with use_workers(client, min(cap.workers, max(len(bounds) - 1, 1)), what="sampling") as joined:
        check_visible(client, [source.path])
        threads = cap.threads * max(joined, 1)
        pending: deque = deque()
        for start, stop in itertools.pairwise(bounds):
            lo, hi = np.searchsorted(rows, [start, stop])
            if hi == lo:
                continue
            first, last = int(rows[lo]), int(rows[hi - 1]) + 1
            pending.append(client.submit(_read_subset, source, first, last, rows[lo:hi], genes, pure=False))
            if len(pending) >= 2 * threads:
                yield from gather(client, [pending.popleft()], what="sampling")
        while pending:
            yield from gather(client, [pending.popleft()], what="sampling")


def _blocks_with(source: MatrixSource, rows: np.ndarray):
    """The row blocks of ``source`` that hold at least one of the sorted ``rows``."""
    if source.encoding == "csc":
        for start, stop, block in source.iter_row_blocks(BLOCK_NNZ):
            if np.searchsorted(rows, stop) > np.searchsorted(rows, start):
                yield start, stop, block
        return
    bounds = source.row_bounds(BLOCK_NNZ)
    for start, stop in itertools.pairwise(bounds):
        lo, hi = np.searchsorted(rows, [start, stop])
        if hi > lo:
            first, last = int(rows[lo]), int(rows[hi - 1]) + 1
            yield first, last, source.read_rows(first, last)


def _say_what_stays_out(source: MatrixSource) -> None:
    """One line naming the elements besides X, obs, var and uns a sample leaves out."""
    elements = source.elements()
    if elements:
        names = ", ".join(e.name for e in elements[:12]) + (" …" if len(elements) > 12 else "")
        log.warning("%s: the sample holds X, obs, var and uns; not copied: %s", source.path, names)


def _nnz_bound(source: Any, cell_index: np.ndarray) -> int:
    """At most this many values are kept: those of the chosen rows (of every value when X is
    not stored by row)."""
    if source.encoding == "csr":
        return int(np.diff(source.indptr)[cell_index].sum())
    return int(source.nnz)
