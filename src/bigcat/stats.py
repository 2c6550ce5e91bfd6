"""Per-cluster statistics (sums, means, present, squared means, variances, non-zeros), out of core.

:func:`cluster_stats` is the heart of bigcat. The default ``blocks`` engine runs a
compiled kernel (:mod:`bigcat.kernels`) over row blocks of the sparse matrix as Dask
tasks: a single pass over each block's stored values accumulates every requested
statistic; nothing is densified.

Memory is bounded by a 2-D decomposition of the accumulator instead of one partial per
block (which at 5,000 clusters × 32,285 genes would be 1.3 GB *per statistic per block*):

- the accumulator (clusters × genes) is split into ``C`` cluster ranges, and the row
  blocks into ``R`` row partitions; each of the ``R × C`` pieces has exactly one owner, a
  chain of tasks that folds its blocks one after the other into it (no per-block partials);
- ``R`` is as large as the memory budget allows (with few clusters: one piece per
  thread, summed by a tree of fan-in ≤ 8 at the end); with many clusters ``R = 1`` and
  the threads split the clusters instead (ranges balanced by cells; a thread visits only
  its clusters' rows of each block), so there is exactly one accumulator in memory;
- reads run at most two blocks ahead of each chain, so blocks never pile up in memory.

The ``groupby`` engine is the "native xarray" reference: ``xarray`` ``groupby`` with
flox over the Dask array (blocks densified, float64), on either layout. Both engines
return the same :class:`xarray.Dataset`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import sys
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from bigcat.errors import BigcatFormatError, BigcatInputError, InputNotFoundError
from bigcat.readers import BLOCK_NNZ, BufferPool, MatrixSource, block_bounds, open_source
from bigcat.util import ByReference, PageArena, prefault, release_free_memory, small_pages

if TYPE_CHECKING:
    from bigcat.cluster import Capacity

__all__ = [
    "DEFAULT_STATS",
    "STATISTICS",
    "cluster_stats",
    "merge_stats",
]

log = logging.getLogger("bigcat")

#: every statistic :func:`cluster_stats` computes, named as R's scrattch tools name them
STATISTICS = ("sums", "means", "present", "sqr_sums", "sqr_means", "vars", "nnz")
DEFAULT_STATS = ("means", "present", "sqr_means")
ENGINES = ("blocks", "groupby")
NORMALIZATIONS = (None, "log2cpm")
PRESENT_OPS = ("gt", "ge")
#: the additive accumulators each statistic is derived from (kept in results for merging)
NEEDS = {
    "sums": ("sums",),
    "means": ("sums",),
    "present": ("present_counts",),
    "sqr_sums": ("sqr_sums",),
    "sqr_means": ("sqr_sums",),
    "vars": ("sums", "sqr_sums"),
    "nnz": ("nnz",),
}
ACCUMULATORS = ("sums", "sqr_sums", "present_counts", "nnz")
#: the accumulator of the ``present_at`` tests inside a pass (split into
#: ``present_counts_<test>`` variables in results)
EXTRA = "present_extra"
#: the float32 statistics derived from the accumulators (the others are accumulators themselves)
DERIVED = ("means", "present", "sqr_means", "vars")
#: float accumulators; the counts (``present_counts``, ``nnz``) take :func:`count_dtype`
FLOAT_ACCUMULATORS = ("sums", "sqr_sums")
#: fan-in of the tree that sums row-partition accumulators
FAN_IN = 8
#: blocks a chain may read ahead of its fold
LOOKAHEAD = 2
#: accumulators larger than this (bytes) get larger row blocks: accumulator bytes /
#: ``BIG_BLOCK_DIVISOR`` values (two blocks in flight, ~9 bytes per value: ~3/4 of the
#: accumulators' size), from 4 × ``BLOCK_NNZ`` up to ``MAX_BLOCK_NNZ``
BIG_ACCUMULATORS = 512e6
BIG_BLOCK_DIVISOR = 24
MAX_BLOCK_NNZ = 1 << 27


# --------------------------------------------------------------------------------------------
# Settings and inputs
# --------------------------------------------------------------------------------------------
def _acc_dtype(accumulator: str, counts: Any) -> np.dtype:
    """float64 for sums, else the count dtype ``counts``."""
    return np.dtype(np.float64 if accumulator in FLOAT_ACCUMULATORS else counts)


def _zero_passes(threshold: float, op_ge: bool) -> bool:
    """Whether an implicit zero passes a presence test (then failures are counted instead)."""
    return (threshold <= 0.0) if op_ge else (threshold < 0.0)


def present_test_name(spec: str) -> tuple[str, float, bool]:
    """``"ge1"``, ``"gt0"``, ``"ge0.5"`` → (canonical name, threshold, op is ``>=``).

    The names of :func:`cluster_stats`'s ``present_at`` tests (cell_type_mapper's
    ``gt0``/``gt1``/``ge1``): the statistic is ``present_<name>``, its counts
    ``present_counts_<name>``.
    """
    match = re.fullmatch(r"(gt|ge)(-?\d+(?:\.\d+)?(?:e-?\d+)?)", str(spec).strip())
    if match is None:
        msg = f"unknown presence test {spec!r}: use gt<threshold> or ge<threshold>, e.g. gt0, gt1, ge1"
        raise BigcatInputError(msg)
    threshold = float(match.group(2))
    return f"{match.group(1)}{threshold:g}", threshold, match.group(1) == "ge"


@dataclass(frozen=True)
class _Settings:
    """What every kernel call needs besides the block (an opaque literal in the task graph)."""

    accumulators: tuple[str, ...]
    threshold: float
    op_ge: bool
    normalize: bool
    counts: str = "int32"  # dtype of the count accumulators (see :func:`count_dtype`)
    #: further presence tests counted in the same pass: (name, threshold, op is ``>=``)
    extra: tuple[tuple[str, float, bool], ...] = ()

    def dtype(self, accumulator: str) -> np.dtype:
        """The dtype of one accumulator."""
        return _acc_dtype(accumulator, self.counts)

    def shape(self, accumulator: str, n_clusters: int, n_genes: int) -> tuple[int, ...]:
        """One accumulator's shape: clusters × genes, or clusters × tests × genes for the
        extra presence counts (so a cluster's counts for every test lie together)."""
        if accumulator == EXTRA:
            return (n_clusters, len(self.extra), n_genes)
        return (n_clusters, n_genes)

    @property
    def count_fails(self) -> bool:
        """An implicit zero passes the present test: count stored values failing it instead."""
        return _zero_passes(self.threshold, self.op_ge)

    @property
    def tests(self) -> np.ndarray:
        """The extra tests as the kernels take them: rows of (threshold, >=, count failures)."""
        rows = [(t, float(ge), float(_zero_passes(t, ge))) for _, t, ge in self.extra]
        return np.array(rows, dtype=np.float64).reshape(len(rows), 3)


@dataclass
class _Part:
    """One input: a file (read by row or column blocks) or a Dask array (read by chunks)."""

    name: str
    n_cells: int
    gene_names: pd.Index
    labels: Any = None  # per-cell labels from the file's obs (when ``by`` is a column)
    source: MatrixSource | None = None
    array: Any = None  # dask array for Datasets that are not a plain view of a file
    codes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    names: pd.Index | None = None  # cell names, read when first needed

    @property
    def cell_names(self) -> pd.Index:
        if self.names is None:
            self.names = self.source.obs_names()
            self.source.close()
        return self.names


def _as_list(data: Any) -> list[Any]:
    if isinstance(data, (str, os.PathLike)):
        return [data]
    if isinstance(data, Sequence):
        return list(data)
    return [data]


def _open_parts(data: Any, by: Any, storage_options: dict | None = None) -> list[_Part]:
    import xarray as xr

    items = _as_list(data)
    if not items:
        msg = "no input given"
        raise BigcatInputError(msg)
    parts = []
    for item in items:
        if isinstance(item, xr.Dataset):
            parts.append(_dataset_part(item, by, storage_options))
            continue
        source = open_source(item, storage_options=storage_options)
        labels = None
        if isinstance(by, str):
            try:
                labels = source.obs_column(by)
            except KeyError:
                available = ", ".join(source.obs_columns()) or "(none)"
                msg = f"{source.path}: no obs column {by!r}; available: {available}"
                raise BigcatInputError(msg) from None
        parts.append(
            _Part(
                name=str(source.path),
                n_cells=source.shape[0],
                gene_names=source.var_names(),
                labels=labels,
                source=source,
            )
        )
        source.close()
    return parts


def _dataset_part(ds: Any, by: Any, storage_options: dict | None = None) -> _Part:
    """A Dataset from :func:`open_dataset`: read its file directly when it is an untouched view."""
    if "X" not in ds:
        msg = "the Dataset has no variable X"
        raise BigcatInputError(msg)
    labels = None
    if isinstance(by, str):
        if by not in ds.coords and by not in ds:
            msg = f"the Dataset has no coordinate {by!r}"
            raise BigcatInputError(msg)
        coord = ds[by]
        values = coord.values
        categorical = coord.attrs.get("categorical")
        labels = (
            pd.Categorical(values, categories=categorical["categories"], ordered=categorical.get("ordered", False))
            if categorical
            else values
        )
    x = ds["X"].transpose("cell", "gene").data
    name = ds.attrs.get("source", "dataset")
    part = _Part(name=str(name), n_cells=ds.sizes["cell"], gene_names=pd.Index(ds["gene"].values.astype(str)))
    part.labels = labels
    part.names = pd.Index(ds["cell"].values.astype(str))
    untouched = str(getattr(x, "name", "")).startswith("bigcat-X-") and "source" in ds.attrs
    if untouched:
        part.source = open_source(ds.attrs["source"], storage_options=storage_options)
        part.source.close()
        if part.source.shape != tuple(x.shape):
            part.source = None
    if part.source is None:
        import dask.array as da

        part.array = x if isinstance(x, da.Array) else da.from_array(x, chunks=(8192, -1))
    return part


def _read_labels_table(
    path: str | os.PathLike, label_column: str | None, cell_column: str | None, storage_options: dict | None = None
) -> pd.Series:
    from bigcat import fs

    url = fs.is_url(path)
    path = str(path) if url else fs.local(path)
    if not fs.exists(path, storage_options):
        msg = f"{path}: no such file or directory"
        raise InputNotFoundError(msg)
    pandas_options = storage_options if url else None
    parquet = fs.suffix_of(path) == ".parquet"
    try:
        if parquet:
            available = list(pd.read_parquet(path, storage_options=pandas_options).columns) if url else None
            if available is None:
                import pyarrow.parquet as pq

                available = list(pq.read_schema(path).names)
        else:
            available = list(pd.read_csv(path, nrows=0, storage_options=pandas_options).columns)
    except Exception as error:
        msg = f"{path}: not a readable CSV/Parquet table ({str(error).splitlines()[0]})"
        raise BigcatFormatError(msg) from error
    for kind, column in (("label", label_column), ("cell", cell_column)):
        if (column is None and kind == "label") or (column is not None and column not in available):
            msg = f"{path}: {kind} column {column!r} not found; columns: {', '.join(map(str, available))}"
            raise BigcatInputError(msg)
    wanted = [c for c in (cell_column, label_column) if c]
    table = (
        pd.read_parquet(path, columns=wanted, storage_options=pandas_options)
        if parquet
        else pd.read_csv(path, usecols=wanted, storage_options=pandas_options)
    )
    index = table[cell_column].astype(str) if cell_column is not None else table.index.astype(str)
    labels = pd.Series(table[label_column].to_numpy(), index=pd.Index(index))
    if labels.index.has_duplicates:
        dup = labels.index[labels.index.duplicated()][0]
        msg = f"{path}: cell {dup!r} appears more than once in column {cell_column!r}"
        raise BigcatInputError(msg)
    return labels


def _factorize(values: list[Any]) -> tuple[np.ndarray, pd.Index]:
    """Global int32 codes (-1 = no label) and the cluster labels, in category order if categorical."""
    if all(isinstance(v, (pd.Categorical, pd.Series)) and isinstance(v.dtype, pd.CategoricalDtype) for v in values):
        cats = pd.api.types.union_categoricals([pd.Categorical(v) for v in values], sort_categories=False)
        return np.asarray(cats.codes, dtype=np.int32), pd.Index(cats.categories)
    flat = np.concatenate([np.asarray(v, dtype=object) for v in values]) if values else np.zeros(0, object)
    cat = pd.Categorical(flat)
    return np.asarray(cat.codes, dtype=np.int32), pd.Index(cat.categories)


def _select(what: Any, names: pd.Index, kind: str) -> np.ndarray:
    """Indices (in the given order) selected by names, a boolean mask or integer positions."""
    arr = np.asarray(what)
    if arr.dtype == bool:
        if arr.shape != (len(names),):
            msg = f"the {kind} mask has {arr.shape[0] if arr.ndim else 0} entries, expected {len(names)}"
            raise BigcatInputError(msg)
        return np.flatnonzero(arr)
    if arr.dtype.kind in "iu":
        if len(arr) and (arr.min() < -len(names) or arr.max() >= len(names)):
            msg = f"{kind} index out of range [0, {len(names)})"
            raise BigcatInputError(msg)
        return np.asarray(arr, dtype=np.int64) % max(len(names), 1)
    positions = names.get_indexer(pd.Index(np.asarray(arr).astype(str)))
    if (positions < 0).any():
        missing = np.asarray(arr)[positions < 0]
        msg = f"{int((positions < 0).sum())} {kind} name(s) not found, e.g. {missing[0]!r}"
        raise BigcatInputError(msg)
    return positions.astype(np.int64)


def _subsample(codes: np.ndarray, n_max: int, seed: int) -> np.ndarray:
    """Keep at most ``n_max`` cells of each cluster (uniformly at random, reproducibly)."""
    if n_max < 1:
        msg = f"max_cells_per_cluster must be ≥ 1, got {n_max}"
        raise BigcatInputError(msg)
    rng = np.random.default_rng(seed)
    labelled = np.flatnonzero(codes >= 0)
    order = labelled[np.lexsort((rng.random(len(labelled)), codes[labelled]))]
    sorted_codes = codes[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_codes)) + 1]
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    out = np.full_like(codes, -1)
    keep = order[rank < n_max]
    out[keep] = codes[keep]
    return out


# --------------------------------------------------------------------------------------------
# The public API
# --------------------------------------------------------------------------------------------
def cluster_stats(
    data: Any,
    by: str | Sequence[Any] | np.ndarray = "cluster",
    stats: str | Iterable[str] = DEFAULT_STATS,
    *,
    cells: Any = None,
    genes: Any = None,
    threshold: float = 0.0,
    present_op: str = "gt",
    present_at: str | Iterable[str] = (),
    normalize: str | None = None,
    max_cells_per_cluster: int | None = None,
    seed: int = 0,
    engine: str = "blocks",
    client: Any = None,
    labels: str | os.PathLike | None = None,
    label_column: str | None = None,
    cell_column: str | None = None,
    block_nnz: int | None = None,
    progress: bool | None = False,
    storage_options: dict | None = None,
    allow_duplicate_cells: bool = False,
    _membership: dict | None = None,
) -> Any:
    """Per-cluster × gene statistics of a cell-by-gene matrix, out of core.

    Parameters
    ----------
    data
        A path (``.h5ad`` or bigcat Zarr store, either layout), a list of paths (one atlas
        split over many files: statistics accumulate over all of them in one run; the files
        must share the same genes in the same order), or a Dataset from
        :func:`bigcat.open_dataset` (possibly subset with ``isel``/``sel``).
    by
        The obs column (Dataset coordinate) holding cluster labels, or an array of labels
        with one entry per cell (over all inputs, in order). Ignored when ``labels`` is given.
        Cells without a label (NaN/None) are excluded.
    stats
        Statistics to compute (a sequence or a comma-separated string), any of
        ``sums``, ``means``, ``present`` (fraction of the cluster's cells passing the
        threshold test), ``sqr_sums``, ``sqr_means`` (mean of x²), ``vars`` (population
        variance, from float64 accumulators) and ``nnz`` (number of non-zero values).
    cells, genes
        Subsets: names, a boolean mask or integer positions. Results keep the order of
        ``genes`` when it is given as names or positions.
    threshold, present_op
        ``present`` counts ``x > threshold`` (``present_op="gt"``, R's scrattch.bigcat
        ``get_cl_present``) or ``x >= threshold`` (``"ge"``, scrattch.hicat's ``low.th``).
    present_at
        Further presence tests counted in the same pass, e.g. ``("gt1", "ge1")``
        (a sequence or a comma-separated string of ``gt<threshold>``/``ge<threshold>``):
        each adds ``present_<test>`` (the fraction) and its counts
        ``present_counts_<test>``, so one pass over the cells serves the statistics,
        pairwise DE (x ≥ 1) and MapMyCells (``gt0``, ``gt1``, ``ge1``).
    normalize
        ``"log2cpm"``: compute on ``log2(x / cell_total × 1e6 + 1)`` from raw counts, on the
        fly (cell totals over all genes of the input, also when ``genes`` subsets them; a
        Dataset input holds only its own genes, so subset it with ``genes=`` rather than
        ``isel(gene=…)`` to keep whole-transcriptome totals).
    max_cells_per_cluster, seed
        Use at most N randomly chosen cells per cluster (R's ``max.cl.size``), reproducibly.
    engine
        ``"blocks"`` (compiled single-pass kernel over sparse row blocks; default) or
        ``"groupby"`` (xarray groupby with flox over densified blocks; the reference).
    client
        A ``distributed.Client``. ``None``: the current default client if there is one,
        else Dask's configured local scheduler (threads by default; ``"sync"`` works too).
    labels, label_column, cell_column
        Labels from an external CSV/Parquet table: ``label_column`` holds the cluster,
        ``cell_column`` the cell names matching obs names (default: the table's index).
        Table rows for cells not in the data are counted (``attrs["labels_unmatched"]``).
    block_nnz
        Stored values per row block (task). Memory per block in flight ≈ 9 bytes × this.
        ``None``: 8 million, or, when the accumulators exceed 512 MB (about 800 clusters of
        32,000 genes), their size in bytes / 24 (at least 32 million, at most 2²⁷): the
        kernel visits a block's rows grouped by cluster, and each block's visit sweeps most
        of the accumulators' memory, so with thousands of clusters fewer, larger blocks
        mean fewer sweeps (measured at 5,000 clusters, user CPU time of the pass, reading
        included: 32M-value blocks 7.3 s, 64M 6.1–6.6 s, 128M 5.4–5.7 s). The two blocks
        in flight then take about 3/4 of the accumulators' memory — about the size of the
        float32 statistics, which are then built in the very memory the blocks were read
        into (one mapping: :class:`bigcat.util.PageArena`). At 50 clusters 8 million is
        fastest.
    progress
        Show a progress bar (``None``: only on a terminal).
    storage_options
        fsspec options for URL inputs and label tables (``s3://…``; see :mod:`bigcat.fs`).
    allow_duplicate_cells
        Several inputs sharing cell names are refused (the same cells given twice would be
        counted twice) unless this is true.

    Returns
    -------
    xarray.Dataset
        Dims ``(cluster, gene)``; ``n_cells(cluster)``; the additive accumulators, in
        memory (``sums``/``sqr_sums`` float64, ``present_counts``/``nnz`` uint16 when every
        cluster has at most 65,535 cells, else int32; see :func:`count_dtype`), so results
        over disjoint cells merge exactly (:func:`merge_stats`); and a float32 variable per
        requested statistic, computed from the accumulators when read (xarray lazily
        indexed arrays: a slice computes only that slice) — ``.load()`` materializes them.
        When the accumulators exceed 512 MB and the pass ran in this process, the
        statistics are computed at the end of the pass instead, into the memory its blocks
        were read into (already touched, so faster than fresh memory; the peak is the
        same). Only clusters with at least one selected cell appear. ``attrs`` record the
        inputs and options.

    Raises
    ------
    BigcatInputError
        Unknown statistic, engine, column, cell or gene; inputs with different genes.

    Examples
    --------
    >>> ds = bigcat.cluster_stats("atlas.zarr", by="cluster")  # doctest: +SKIP
    >>> ds.means.sel(cluster="L2/3 IT").to_series().nlargest(5)  # doctest: +SKIP
    """
    stats = _check_stats(stats)
    extra = _check_present_at(present_at)
    if engine not in ENGINES:
        msg = f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}"
        raise BigcatInputError(msg)
    if normalize not in NORMALIZATIONS:
        msg = f"unknown normalize {normalize!r}; choose log2cpm or None"
        raise BigcatInputError(msg)
    if present_op not in PRESENT_OPS:
        msg = f"unknown present_op {present_op!r}; choose gt (x > threshold) or ge (x >= threshold)"
        raise BigcatInputError(msg)
    by_column = by if isinstance(by, str) and labels is None else None
    parts = _open_parts(data, by_column, storage_options)
    gene_names = parts[0].gene_names
    for part in parts[1:]:
        if not part.gene_names.equals(gene_names):
            msg = f"{part.name}: its genes differ from those of {parts[0].name}; statistics need the same genes"
            raise BigcatInputError(msg)
    n_total = sum(p.n_cells for p in parts)
    if n_total == 0 or len(gene_names) == 0:
        what = "cells" if n_total == 0 else "genes"
        msg = f"{', '.join(p.name for p in parts)}: X has no {what} ({n_total} × {len(gene_names)}): nothing to compute"
        raise BigcatInputError(msg)
    attrs: dict[str, Any] = {}
    if len(parts) > 1 and not allow_duplicate_cells:
        _refuse_shared_cells(parts)

    # -- labels → global codes --------------------------------------------------------------
    if labels is not None:
        table = _read_labels_table(labels, label_column, cell_column, storage_options)
        names = pd.Index(np.concatenate([np.asarray(p.cell_names) for p in parts]))
        attrs["labels_unmatched"] = int(len(table) - table.index.isin(names).sum())
        if attrs["labels_unmatched"]:
            log.warning("%s: %d labelled cells are not in the data; ignored", labels, attrs["labels_unmatched"])
        table_codes, clusters = _factorize([table.to_numpy()])
        positions = pd.Index(table.index).get_indexer(names)
        codes = np.where(positions >= 0, table_codes[positions], -1).astype(np.int32)
        by_desc = f"{labels}:{label_column}"
    elif by_column is not None:
        codes, clusters = _factorize([p.labels for p in parts])
        by_desc = by_column
    else:
        values = np.asarray(by, dtype=object) if not isinstance(by, pd.Categorical) else by
        if len(values) != n_total:
            msg = f"by has {len(values)} labels but the data has {n_total} cells"
            raise BigcatInputError(msg)
        codes, clusters = _factorize([values])
        by_desc = "array"
    unlabelled = int(np.count_nonzero(codes < 0))
    if cells is not None:
        names = pd.Index(np.concatenate([np.asarray(p.cell_names) for p in parts]))
        keep = np.zeros(n_total, dtype=bool)
        keep[_select(cells, names, "cell")] = True
        codes = np.where(keep, codes, -1).astype(np.int32)
    if max_cells_per_cluster is not None:
        codes = _subsample(codes, int(max_cells_per_cluster), seed)
    # keep clusters with at least one cell, in label order
    n_cells = np.bincount(codes[codes >= 0], minlength=len(clusters))
    present_clusters = np.flatnonzero(n_cells > 0)
    remap = np.full(len(clusters) + 1, -1, dtype=np.int32)
    remap[present_clusters] = np.arange(len(present_clusters), dtype=np.int32)
    codes = remap[codes]  # -1 indexes the last entry, which is -1
    clusters = clusters[present_clusters]
    n_cells = n_cells[present_clusters].astype(np.int64)
    if len(clusters) == 0:
        where = ", ".join(p.name for p in parts)
        if cells is not None:
            msg = f"{where}: none of the selected cells has a cluster label in {by_desc!r}"
        else:
            msg = f"{where}: no cell has a cluster label in {by_desc!r} (all {n_total} are missing)"
        raise BigcatInputError(msg)
    if unlabelled:  # one line (after the error for none at all, which says it alone)
        log.warning(
            "%s: %d of %d cells have no label in %s and are left out",
            ", ".join(p.name for p in parts),
            unlabelled,
            n_total,
            by_desc,
        )
    offset = 0
    for part in parts:
        part.codes = codes[offset : offset + part.n_cells]
        offset += part.n_cells
    if _membership is not None:  # for writers that list each cluster's cells (MapMyCells)
        _membership.update(codes=codes, clusters=clusters, parts=parts)

    gene_index = np.arange(len(gene_names)) if genes is None else _select(genes, gene_names, "gene")
    settings = _Settings(
        accumulators=tuple(a for a in ACCUMULATORS if any(a in NEEDS[s] for s in stats)) + ((EXTRA,) if extra else ()),
        threshold=float(threshold),
        op_ge=present_op == "ge",
        normalize=normalize == "log2cpm",
        counts=count_dtype(int(n_cells.max())).name,
        extra=extra,
    )
    client = _default_client(client)
    spare = None
    if block_nnz is None:
        in_process = client is None or _inproc(client)
        block_nnz = _default_block_nnz(len(clusters), len(gene_index), settings, in_process)
    try:
        if engine == "blocks":
            n_derived = sum(s in DERIVED for s in stats) + len(extra)
            acc, spare = _blocks(
                parts, len(clusters), len(gene_names), gene_index, settings, client, block_nnz, progress, n_derived
            )
        else:
            acc = _groupby(parts, len(clusters), gene_index, settings, client, progress)
    except _NegativeValuesError as error:
        msg = f"{', '.join(p.name for p in parts)}: {error}"
        raise BigcatInputError(msg) from None
    attrs.update(
        {
            "source": json.dumps([p.name for p in parts]),
            "by": by_desc,
            "stats": ",".join(stats),
            "threshold": float(threshold),
            "present_op": present_op,
            "present_at": ",".join(name for name, _, _ in extra),
            "normalize": normalize or "none",
            "engine": engine,
            "max_cells_per_cluster": -1 if max_cells_per_cluster is None else int(max_cells_per_cluster),
            "seed": int(seed),
            "n_cells_excluded": int(n_total - n_cells.sum()),
            "n_cells_unlabelled": unlabelled,
            "runs": json.dumps([uuid.uuid4().hex]),  # provenance: merging a result with itself is refused
            "bigcat_version": _version(),
        }
    )
    if "sums" in acc:
        bad = _count_nonfinite(acc["sums"])
        if bad:
            attrs["non_finite_entries"] = bad
            log.warning(
                "%s: X holds non-finite values (NaN or ±inf): %d cluster × gene sums are not finite "
                "(IEEE rules: NaN propagates, inf − inf is NaN)",
                ", ".join(p.name for p in parts),
                bad,
            )
    return _result(acc, n_cells, clusters, gene_names[gene_index], stats, attrs, spare)


def _count_nonfinite(values: np.ndarray, slab: int = 1 << 18) -> int:
    """Entries of ``values`` that are NaN or ±inf, counted slab by slab: at 5,000 clusters
    the whole-array ``~np.isfinite`` made two 161 MB temporaries of fresh memory
    (0.13–0.5 s against 0.08 s)."""
    flat = values.reshape(-1)
    finite = sum(int(np.count_nonzero(np.isfinite(flat[i : i + slab]))) for i in range(0, flat.size, slab))
    return flat.size - finite


def count_dtype(max_cells: int) -> np.dtype:
    """The dtype of the count accumulators for clusters of at most ``max_cells`` cells.

    ``uint16`` when every count fits (clusters of up to 65,535 cells, as in every atlas
    with thousands of clusters), else ``int32``: at 5,000 clusters × 32,285 genes the two
    count arrays are then 0.32 GB each instead of 0.65 GB — less memory, and less memory
    traffic for the kernel, whose scattered updates are bound by it.
    """
    return np.dtype(np.uint16) if max_cells <= np.iinfo(np.uint16).max else np.dtype(np.int32)


def _accumulator_bytes(n_clusters: int, n_genes: int, settings: _Settings) -> int:
    """Memory of one full set of accumulators (clusters × genes)."""
    return sum(
        int(np.prod(settings.shape(a, n_clusters, n_genes))) * settings.dtype(a).itemsize for a in settings.accumulators
    )


def _default_block_nnz(n_clusters: int, n_genes: int, settings: _Settings, in_process: bool = True) -> int:
    """Row-block size for the blocks engine (see ``block_nnz`` in :func:`cluster_stats`).

    Blocks that travel between worker processes (``in_process`` false) stay at most
    4 × ``BLOCK_NNZ``: each is sent to every worker folding one of its cluster ranges.
    """
    acc_bytes = _accumulator_bytes(n_clusters, n_genes, settings)
    if acc_bytes <= BIG_ACCUMULATORS:
        return BLOCK_NNZ
    largest = MAX_BLOCK_NNZ if in_process else BLOCK_NNZ * 4
    return int(np.clip(acc_bytes // BIG_BLOCK_DIVISOR, BLOCK_NNZ * 4, largest))


def _refuse_shared_cells(parts: list[_Part]) -> None:
    """Inputs sharing cell names would count those cells twice (``a.zarr a-dense.zarr``)."""
    names = [pd.Index(np.asarray(p.cell_names).astype(str)).unique() for p in parts]
    owner = np.repeat(np.arange(len(parts)), [len(n) for n in names])
    every = pd.Index(np.concatenate([np.asarray(n) for n in names])) if names else pd.Index([])
    twice = every.duplicated(keep=False)
    if not twice.any():
        return
    where = sorted(set(owner[twice].tolist()))
    first, second = parts[where[0]], parts[where[1]]
    example = every[twice][0]
    msg = (
        f"{second.name}: {int(twice.sum()) // 2} of its cells (e.g. {example!r}) are also in {first.name}; they "
        "would be counted twice (pass allow_duplicate_cells=True / --allow-duplicates if they are different cells)"
    )
    raise BigcatInputError(msg)


def _check_present_at(specs: str | Iterable[str]) -> tuple[tuple[str, float, bool], ...]:
    if isinstance(specs, str):
        specs = [t for t in specs.split(",") if t.strip()]
    tests = [present_test_name(t) for t in specs]
    return tuple({name: (name, t, ge) for name, t, ge in tests}.values())


def extra_present_names(ds_or_attrs: Any) -> list[str]:
    """The ``present_at`` tests recorded in a result (or its attrs)."""
    attrs = getattr(ds_or_attrs, "attrs", ds_or_attrs)
    return [t for t in str(attrs.get("present_at", "") or "").split(",") if t]


def _check_stats(stats: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(stats, str):
        stats = [s.strip() for s in stats.split(",") if s.strip()]
    stats = tuple(dict.fromkeys(stats))
    unknown = [s for s in stats if s not in STATISTICS]
    if unknown or not stats:
        msg = f"unknown statistic(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(STATISTICS)}"
        raise BigcatInputError(msg)
    return stats


def _version() -> str:
    from bigcat import __version__

    return __version__


def _default_client(client: Any) -> Any:
    """The client to use: the one given, else a default distributed client unless Dask is
    configured for a local scheduler."""
    if client is not None:
        return client
    import dask

    if dask.config.get("scheduler", None) not in (None, "dask.distributed", "distributed"):
        return None
    if "distributed" not in sys.modules:  # no client can exist; skip importing distributed
        return None
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Finishing: accumulators → statistics
# --------------------------------------------------------------------------------------------
def _derive(
    acc: dict[str, np.ndarray], n_cells: np.ndarray, stats: Sequence[str], spare: PageArena | None = None
) -> dict:
    """The float32 statistics over the in-memory accumulators.

    They are elementwise and cheap, so by default they are lazily computed arrays,
    computed when read (``.values``, ``.load()``, ``write_stats``, or any slice of them,
    which computes only that slice); the result of :func:`cluster_stats` then costs only
    its accumulators' memory. With ``spare`` memory (the blocks engine's read buffers,
    free once the pass is over) they are computed now into pieces of it: those pages are
    already touched, whereas the statistics' own fresh memory cost 0.4–2 s more at 5,000
    clusters on this machine.
    """
    from xarray.core import indexing

    from bigcat.derived import DerivedArray

    if not acc:
        return {}
    derived: dict = {}
    for name in stats:
        if name in DERIVED or name.startswith("present_"):
            array = DerivedArray(name, acc, n_cells)
            out = spare.take(array.shape, np.float32) if spare is not None else None
            derived[name] = array.compute(out) if out is not None else indexing.LazilyIndexedArray(array)
    if spare is not None:
        spare.trim()  # pages the blocks touched beyond the statistics go back to the system
    return derived


def _result(
    acc: dict[str, np.ndarray],
    n_cells: np.ndarray,
    clusters: pd.Index,
    genes: pd.Index,
    stats: Sequence[str],
    attrs: dict,
    spare: PageArena | None = None,
) -> Any:
    import xarray as xr

    acc = dict(acc)
    tests = extra_present_names(attrs)
    if EXTRA in acc:  # one clusters × tests × genes array in the pass: a variable per test
        extra = acc.pop(EXTRA)
        for t, name in enumerate(tests):
            acc[f"present_counts_{name}"] = extra[:, t, :]
    extra_stats = tuple(f"present_{name}" for name in tests if f"present_counts_{name}" in acc)
    derived = _derive(acc, n_cells, (*stats, *extra_stats), spare)
    variables = {"n_cells": (("cluster",), np.asarray(n_cells, dtype=np.int64))}
    for name in (*stats, *extra_stats):
        if name in derived:
            variables[name] = (("cluster", "gene"), derived[name])
    for name in (*ACCUMULATORS, *(f"present_counts_{t}" for t in tests)):
        if name in acc:
            variables[name] = (("cluster", "gene"), acc[name])
    cluster_values = np.asarray(clusters)
    if cluster_values.dtype.kind in "OTU":
        cluster_values = cluster_values.astype(object)
    coords = {"cluster": cluster_values, "gene": np.asarray(genes, dtype=object)}
    return xr.Dataset(variables, coords=coords, attrs=attrs)


# --------------------------------------------------------------------------------------------
# The blocks engine
# --------------------------------------------------------------------------------------------
def zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A zero-filled accumulator on :func:`bigcat.util.small_pages`, touched now, in order.

    Left to be first touched where the kernel accumulates (scattered, on two threads at
    once), the 5,000-cluster pass spent 14–17 s of system time instead of 4–5 s.
    """
    out = small_pages(shape, dtype)
    if not prefault(out):
        out.fill(0)
    return out


def _init_task(settings: _Settings, n_clusters: int, n_genes: int, views: dict | None) -> dict:
    """A zeroed accumulator piece (its clusters × all output genes): views into the final
    result when running in-process, else new arrays."""
    if views is not None:
        for view in views.values():
            if not prefault(view):  # fresh zero pages (small_pages): touched, not written
                view.fill(0)
        return views
    return {
        name: zeros(settings.shape(name, n_clusters, n_genes), settings.dtype(name)) for name in settings.accumulators
    }


_EMPTY_F = np.zeros((0, 0), dtype=np.float64)


def _fold_task(
    acc: dict,
    block: tuple,
    codes: np.ndarray,
    gene_map: np.ndarray,
    totals: np.ndarray | None,
    settings: _Settings,
    c_lo: int,
) -> dict:
    """Fold one block into one accumulator piece, in place (the piece has a single owner:
    this chain of tasks), and hand it on."""
    from bigcat import kernels

    kind, data, indices, indptr, col_offset = block
    if settings.normalize:
        _check_counts(data)
    if kind == "csr":
        identity = kernels.is_identity(gene_map)  # every gene, in order: no map to look up
        kernels.fold_csr(
            data,
            indices,
            indptr,
            col_offset,
            codes,
            None if identity else gene_map,
            (np.zeros(0, dtype=np.float64) if totals is None else totals) if settings.normalize else None,
            settings.threshold,
            settings.op_ge,
            settings.count_fails,
            c_lo,
            acc.get("sums"),
            acc.get("sqr_sums"),
            acc.get("present_counts"),
            acc.get("nnz"),
            acc.get(EXTRA),
            settings.tests if EXTRA in acc else None,
        )
        return acc
    kernels.fold_csc(
        data,
        indices,
        indptr,
        col_offset,
        codes,
        gene_map,
        np.zeros(0, dtype=np.float64) if totals is None else totals,
        settings.normalize,
        settings.threshold,
        settings.op_ge,
        settings.count_fails,
        c_lo,
        acc.get("sums", _EMPTY_F),
        acc.get("sqr_sums", _EMPTY_F),
        acc.get("present_counts", np.zeros((0, 0), settings.counts)),
        acc.get("nnz", np.zeros((0, 0), settings.counts)),
        acc.get(EXTRA, np.zeros((0, 0, 0), settings.counts)),
        settings.tests,
    )
    return acc


class _NegativeValuesError(BigcatInputError):
    """Raised inside a task; :func:`cluster_stats` adds the input's name."""


def _check_counts(data: np.ndarray) -> None:
    """log2 CPM needs counts: refuse negative values (NaN passes; it propagates)."""
    if data.size and data.dtype.kind in "fi" and np.nanmin(data, initial=0) < 0:
        n = int(np.count_nonzero(data < 0))
        msg = (
            f"X has negative values ({n} in one block, e.g. {data[data < 0][0]:g}): normalize='log2cpm' needs "
            "raw counts; compute on the values as they are (no normalize) if X is already normalized"
        )
        raise _NegativeValuesError(msg)


def _read_rows(source: MatrixSource, start: int, stop: int, pool: BufferPool | None = None, *_after: Any) -> tuple:
    block = source.read_rows(start, stop, pool=pool)
    return ("csr", block.data, block.indices, block.indptr, 0)


def _read_columns(source: MatrixSource, start: int, stop: int, *_after: Any) -> tuple:
    block = source.read_columns(start, stop)
    return ("csc", block.data, block.indices, block.indptr, start)


def _chunk_block(chunk: Any, col_offset: int) -> tuple:
    """A Dask chunk (pydata sparse, scipy sparse or NumPy) as a CSR block."""
    if hasattr(chunk, "tocsr"):
        block = chunk.tocsr()
    elif hasattr(chunk, "to_scipy_sparse"):
        block = chunk.to_scipy_sparse().tocsr()
    else:
        block = sp.csr_matrix(np.asarray(chunk))
    block = sp.csr_matrix(block)
    return ("csr", block.data, block.indices, block.indptr.astype(np.int64), col_offset)


def _column_totals(source: MatrixSource, start: int, stop: int) -> np.ndarray:
    block = source.read_columns(start, stop)
    return np.bincount(block.indices, weights=block.data.astype(np.float64), minlength=source.shape[0])


def _chunk_row_totals(chunk: Any) -> np.ndarray:
    _, data, _, indptr, _ = _chunk_block(chunk, 0)
    from bigcat.kernels import row_sums_csr

    return row_sums_csr(data, indptr)[:, None]


def _sum_arrays(*arrays: np.ndarray) -> np.ndarray:
    out = arrays[0].copy()
    for a in arrays[1:]:
        out += a
    return out


def _add_task(first: dict, *others: dict) -> dict:
    for other in others:
        for name, values in other.items():
            first[name] += values
    return first


def _token_task(*_folds: Any) -> None:
    return None


def _finalize_task(acc: dict, n_cells: np.ndarray, settings: _Settings) -> dict:
    if settings.count_fails and "present_counts" in acc:
        present = acc["present_counts"]
        np.subtract(n_cells[:, None].astype(present.dtype), present, out=present)
    if EXTRA in acc:
        for t, (_, threshold, op_ge) in enumerate(settings.extra):
            if _zero_passes(threshold, op_ge):
                counts = acc[EXTRA][:, t, :]
                np.subtract(n_cells[:, None].astype(counts.dtype), counts, out=counts)
    return acc


@dataclass
class _Block:
    read: Any  # a task tuple (or a Dask key for chunk inputs)
    codes: np.ndarray
    totals: Any  # None, or a key of the per-row totals
    col_lo: int  # first and last+1 columns (absolute) the block covers
    col_hi: int
    lookahead: bool  # whether reads may be delayed behind folds


def _plan_blocks(
    parts: list[_Part],
    settings: _Settings,
    block_nnz: int,
    graph: dict,
    token: str,
    pool: BufferPool | None = None,
    task_pool: Any = None,
) -> list[_Block]:
    """One entry per block over all inputs, skipping blocks with no selected cell (row
    blocks are read into arrays from ``pool`` when one is given, which the read tasks get
    as ``task_pool``: the pool itself, or a :class:`bigcat.util.ByReference` to it)."""
    task_pool = pool if task_pool is None else task_pool
    blocks: list[_Block] = []
    for p, part in enumerate(parts):
        if not (part.codes >= 0).any():
            continue
        source = part.source
        n_genes = len(part.gene_names)
        if source is not None and source.encoding == "csc":
            totals_key = None
            bounds = block_bounds(source.indptr, block_nnz)
            if settings.normalize:
                keys = []
                for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
                    key = f"bigcat-coltotals-{token}-{p}-{i}"
                    graph[key] = (_column_totals, source, int(lo), int(hi))
                    keys.append(key)
                totals_key = f"bigcat-totals-{token}-{p}"
                graph[totals_key] = (_sum_arrays, *keys) if keys else (np.zeros, part.n_cells)
            for lo, hi in itertools.pairwise(bounds):
                blocks.append(
                    _Block(
                        (_read_columns, source, int(lo), int(hi)),
                        part.codes,
                        totals_key,
                        int(lo),
                        int(hi),
                        lookahead=True,
                    )
                )
        elif source is not None:
            bounds = source.row_bounds(block_nnz)
            if pool is not None and source.encoding == "csr" and len(bounds) > 1:
                pool.size = max(pool.size, int(np.max(np.diff(source.indptr[bounds]))))
            for lo, hi in itertools.pairwise(bounds):
                codes = part.codes[lo:hi]
                if not (codes >= 0).any():
                    continue
                read = (_read_rows, source, int(lo), int(hi), task_pool)
                blocks.append(_Block(read, codes, None, 0, n_genes, lookahead=True))
        else:
            x = part.array
            graph.update(dict(x.__dask_graph__()))
            row_edges = np.r_[0, np.cumsum(x.chunks[0])]
            col_edges = np.r_[0, np.cumsum(x.chunks[1])]
            totals_key = None
            if settings.normalize and len(x.chunks[1]) > 1:
                import dask.array as da

                totals = da.map_blocks(
                    _chunk_row_totals, x, chunks=(x.chunks[0], (1,) * len(x.chunks[1])), dtype=np.float64
                ).sum(axis=1)
                graph.update(dict(totals.__dask_graph__()))
                totals_key = f"bigcat-chunktotals-{token}-{p}"
                graph[totals_key] = (np.concatenate, list(totals.__dask_keys__()))
            for i, j in itertools.product(range(len(x.chunks[0])), range(len(x.chunks[1]))):
                lo, hi = int(row_edges[i]), int(row_edges[i + 1])
                codes = part.codes[lo:hi]
                if not (codes >= 0).any():
                    continue
                read = (_chunk_block, (x.name, i, j), int(col_edges[j]))
                block = _Block(read, codes, totals_key, int(col_edges[j]), int(col_edges[j + 1]), lookahead=False)
                blocks.append(block)
    return blocks


def _capacity(client: Any) -> Capacity:
    """What the run can plan for (see :func:`bigcat.cluster.capacity`)."""
    from bigcat.cluster import capacity

    return capacity(client)


def _decompose(cap: Capacity, acc_bytes: int, n_blocks: int, n_clusters: int, in_process: bool) -> tuple[int, int]:
    """R row partitions × C cluster ranges for accumulators of ``acc_bytes``.

    In this process the threads share memory: R copies, plus the result, within a quarter
    of it, and with large accumulators R = 1 (threads split the clusters instead, so the
    accumulators exist once). On a cluster, every piece (its clusters × all genes) must fit
    a quarter of *one worker's* memory, the R copies a quarter of all workers' memory, and
    R × C gives every thread the cluster will have a chain of its own.
    """
    n_blocks = max(n_blocks, 1)
    if in_process:
        budget = 0.25 * cap.memory
        rows = int(max(1, min(cap.threads, budget // acc_bytes - 1, n_blocks)))
        if acc_bytes > BIG_ACCUMULATORS:
            rows = 1
        return rows, int(max(1, min(cap.threads // rows, n_clusters)))
    budget = 0.25 * cap.memory
    slots = cap.total_threads
    ranges_needed = max(1, math.ceil(acc_bytes / budget))
    rows = int(max(1, min(slots // ranges_needed, (budget * cap.workers) // acc_bytes, n_blocks)))
    ranges = max(ranges_needed, slots // rows)
    return rows, int(max(1, min(ranges, n_clusters)))


def _blocks(
    parts: list[_Part],
    n_clusters: int,
    n_genes_total: int,
    gene_index: np.ndarray,
    settings: _Settings,
    client: Any,
    block_nnz: int,
    progress: bool | None,
    n_derived: int = 0,
) -> tuple[dict, PageArena | None]:
    """The accumulators, and memory the ``n_derived`` float32 statistics may be built in
    (``None``: none to spare)."""
    from dask.base import tokenize

    n_out = len(gene_index)
    token = tokenize([p.name for p in parts], [p.codes for p in parts], gene_index, settings, block_nnz, os.getpid())
    graph: dict = {}
    in_process = client is None or _inproc(client)
    acc_bytes = max(_accumulator_bytes(n_clusters, n_out, settings), 1)
    # in this process, blocks are read into reused arrays (a pool never travels to workers)
    pool = BufferPool() if in_process else None
    # an in-process distributed worker gets the pool and the result views by reference
    # (distributed pickles graphs, which would copy them)
    handles: list[ByReference] = []

    def shared(value: Any) -> Any:
        if client is None or not in_process or value is None:
            return value
        handles.append(ByReference(value))
        return handles[-1]

    blocks = _plan_blocks(parts, settings, block_nnz, graph, token, pool, shared(pool))
    arena = None
    if pool is not None and acc_bytes > BIG_ACCUMULATORS and n_derived:
        # with large accumulators, the blocks are read into the memory the float32
        # statistics take after the pass (room for either; what neither uses is never touched)
        in_flight = LOOKAHEAD * pool.size * 16  # data and indices of at most 8 bytes each
        arena = pool.arena = PageArena(max(n_derived * n_clusters * n_out * 4, in_flight) + 8 * PageArena.ALIGN)
    # -- the decomposition: R row partitions × C cluster ranges --------------------------------
    cap = _capacity(client)
    n_row_parts, n_ranges = _decompose(cap, acc_bytes, len(blocks), n_clusters, in_process)
    all_codes = np.concatenate([p.codes for p in parts])
    n_cells = np.bincount(all_codes[all_codes >= 0], minlength=n_clusters).astype(np.int64)
    # cluster ranges holding about the same number of cells (cluster sizes are very skewed)
    cum = np.cumsum(n_cells)
    edges = np.searchsorted(cum, np.linspace(0, cum[-1] if len(cum) else 0, n_ranges + 1)[1:-1], side="left") + 1
    edges = np.unique(np.r_[0, np.minimum(edges, n_clusters), n_clusters]).astype(np.int64)
    n_ranges = len(edges) - 1
    log.info(
        "blocks engine: %d blocks; %d clusters × %d genes (%.2f GB of accumulators) as %d row partitions × %d "
        "cluster ranges",
        len(blocks),
        n_clusters,
        n_out,
        acc_bytes / 1e9,
        n_row_parts,
        n_ranges,
    )
    if client is not None and not in_process:
        log.info(
            "planned for %d workers × %d threads, %.2f GB each (%d connected now)",
            cap.workers,
            cap.threads,
            cap.memory / 1e9,
            cap.present,
        )
    gene_map = np.full(n_genes_total, -1, dtype=np.int32)
    gene_map[gene_index] = np.arange(n_out, dtype=np.int32)

    # -- preallocated results (in-process, chain 0 of each range accumulates into them) -----------
    # untouched pages: in-process, each range's init task touches its own rows (see zeros);
    # with a client, every range's result is copied in
    out = {
        name: small_pages(settings.shape(name, n_clusters, n_out), settings.dtype(name))
        for name in settings.accumulators
    }

    final_keys = []
    chains: dict[tuple[int, int], str] = {}
    # each row partition's tasks (init, reads, folds) as a group that one worker runs
    partitions: list[dict] = [{} for _ in range(n_row_parts)]
    for r, partition in enumerate(partitions):
        mine = blocks[len(blocks) * r // n_row_parts : len(blocks) * (r + 1) // n_row_parts]
        last = {}
        for c in range(n_ranges):
            lo, hi = int(edges[c]), int(edges[c + 1])
            key = f"bigcat-init-{token}-{r}-{c}"
            views = {name: a[lo:hi] for name, a in out.items()} if in_process and r == 0 else None
            partition[key] = (_init_task, settings, hi - lo, n_out, shared(views))
            last[c] = key
        tokens: list[str] = []
        for k, block in enumerate(mine):
            read_key = f"bigcat-read-{token}-{r}-{k}"
            read = block.read
            if block.lookahead and k >= LOOKAHEAD:
                read = (*read, tokens[k - LOOKAHEAD])
            partition[read_key] = read
            folds = []
            for c in range(n_ranges):
                lo, hi = int(edges[c]), int(edges[c + 1])
                if n_ranges > 1 and not ((block.codes >= lo) & (block.codes < hi)).any():
                    continue
                key = f"bigcat-fold-{token}-{r}-{c}-{k}"
                partition[key] = (_fold_task, last[c], read_key, block.codes, gene_map, block.totals, settings, lo)
                last[c] = key
                folds.append(key)
            tok = f"bigcat-token-{token}-{r}-{k}"
            partition[tok] = (_token_task, *folds)
            tokens.append(tok)
        for c in range(n_ranges):
            chains[(r, c)] = last[c]
    combine: dict = {}  # the partitions' pieces added, each range finalized
    for c in range(n_ranges):
        lo, hi = int(edges[c]), int(edges[c + 1])
        level = [chains[(r, c)] for r in range(n_row_parts)]
        depth = 0
        while len(level) > 1:
            nxt = []
            for i in range(0, len(level), FAN_IN):
                key = f"bigcat-add-{token}-{c}-{depth}-{i}"
                combine[key] = (_add_task, *level[i : i + FAN_IN])
                nxt.append(key)
            level, depth = nxt, depth + 1
        key = f"bigcat-final-{token}-{c}"
        combine[key] = (_finalize_task, level[0], n_cells[lo:hi], settings)
        final_keys.append(key)
    workers = min(cap.workers, math.ceil(n_row_parts * n_ranges / cap.threads))
    inputs = [p.source.path for p in parts if p.source is not None]
    try:
        _run((graph, partitions, combine), final_keys, client, progress, out, edges, workers=workers, inputs=inputs)
    finally:
        for handle in handles:
            handle.release()
    handles.clear()
    del graph, partitions, combine, blocks
    # the arena's pages are the statistics' once no block is left in them
    spare = arena if arena is not None and pool is not None and pool.release() else None
    if spare is not None:
        spare.reset()
    del pool
    release_free_memory()  # the read buffers kept by the allocator, before the statistics are built
    return out, spare


def _run(
    graphs: tuple[dict, list[dict], dict],
    final_keys: list[str],
    client: Any,
    progress: bool | None,
    out: dict,
    edges: np.ndarray,
    *,
    workers: int = 1,
    inputs: Sequence[Any] = (),
) -> None:
    """Execute the graph on the configured scheduler; place each cluster range's result.

    ``graphs``: the tasks every partition uses, each row partition's tasks, and the tasks
    that combine the partitions. On a cluster, the ``workers`` the plan counted on are asked
    for and waited for first (:func:`bigcat.cluster.use_workers`), the ``inputs`` checked
    from them, and each row partition goes to one of them."""
    from bigcat.progress import progress_bar

    def place(c: int, piece: dict) -> None:
        lo, hi = int(edges[c]), int(edges[c + 1])
        for name, array in piece.items():
            view = out[name][lo:hi]
            if not np.shares_memory(view, array):
                view[...] = array

    shared, partitions, combine = graphs
    tokens = [k for p in partitions for k in p if isinstance(k, str) and k.startswith("bigcat-token-")]
    with progress_bar(total=len(tokens), unit="blocks", desc="stats", enabled=progress) as bar:
        if client is None:
            import dask
            from dask.callbacks import Callback

            def posttask(key: Any, *_: Any) -> None:
                if isinstance(key, str) and key.startswith("bigcat-token-"):
                    bar.update(1)

            graph = shared | combine
            for partition in partitions:
                graph |= partition
            scheduler = dask.config.get("scheduler", None) or "threads"
            with Callback(posttask=posttask):
                if scheduler in ("sync", "synchronous", "single-threaded"):
                    from dask.local import get_sync

                    results = get_sync(graph, final_keys)
                else:
                    from dask.threaded import get

                    results = get(graph, final_keys, num_workers=_capacity(None).threads)
            for c, acc in enumerate(results):
                place(c, acc)
            return
        from bigcat.cluster import check_visible, completed, spread_graph, use_workers

        with use_workers(client, workers, what="cluster statistics"):
            check_visible(client, list(inputs))
            # futures on the (tiny) per-block tokens drive the progress bar
            graph = spread_graph(client, shared, partitions, combine)
            futures = client.get(graph, [*final_keys, *tokens], sync=False)
            position = {f.key: c for c, f in enumerate(futures[: len(final_keys)])}
            for future in completed(client, futures, what="cluster statistics"):
                if future.key in position:
                    place(position[future.key], future.result())
                else:
                    bar.update(1)
                future.release()


def _inproc(client: Any) -> bool:
    """Whether the client's workers run in this process (results arrive by reference)."""
    try:
        return str(client.scheduler.address).startswith("inproc://")
    except AttributeError:
        return False


# --------------------------------------------------------------------------------------------
# The groupby engine (the reference: xarray + flox)
# --------------------------------------------------------------------------------------------
def _checked_counts(chunk: np.ndarray) -> np.ndarray:
    _check_counts(np.asarray(chunk).reshape(-1))
    return chunk


def _densify(chunk: Any) -> np.ndarray:
    if hasattr(chunk, "todense"):
        return np.asarray(chunk.todense())
    if hasattr(chunk, "toarray"):
        return chunk.toarray()
    return np.asarray(chunk)


def _groupby(
    parts: list[_Part],
    n_clusters: int,
    gene_index: np.ndarray,
    settings: _Settings,
    client: Any,
    progress: bool | None = None,
) -> dict:
    import dask.array as da
    import xarray as xr

    from bigcat.dataset import open_dataset

    arrays = []
    for part in parts:
        x = part.array if part.array is not None else open_dataset(part.source.path)["X"].data
        if not isinstance(x._meta, np.ndarray):  # noqa: SLF001 - dask's documented meta
            x = x.map_blocks(_densify, dtype=x.dtype, meta=np.empty((0, 0), dtype=x.dtype))
        arrays.append(x.astype(np.float64))
    x = da.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0]
    if settings.normalize:
        x = x.map_blocks(_checked_counts, dtype=x.dtype)
        totals = x.sum(axis=1)
        scale = da.where(totals != 0, 1e6 / da.where(totals != 0, totals, 1.0), 0.0)
        x = da.log2(x * scale[:, None] + 1.0)
    x = x[:, gene_index]
    codes = np.concatenate([p.codes for p in parts])
    values = xr.DataArray(x, dims=("cell", "gene"))
    group = xr.DataArray(np.where(codes >= 0, codes, np.nan), dims="cell", name="cluster_code")
    lazy = {}
    if "sums" in settings.accumulators:
        lazy["sums"] = values.groupby(group).sum()
    if "sqr_sums" in settings.accumulators:
        lazy["sqr_sums"] = (values * values).groupby(group).sum()
    if "present_counts" in settings.accumulators:
        passes = values >= settings.threshold if settings.op_ge else values > settings.threshold
        lazy["present_counts"] = passes.groupby(group).sum()
    if "nnz" in settings.accumulators:
        lazy["nnz"] = (values != 0).groupby(group).sum()
    for name, test_threshold, test_ge in settings.extra:
        passes = values >= test_threshold if test_ge else values > test_threshold
        lazy[f"present_counts_{name}"] = passes.groupby(group).sum()
    computed = dict(zip(lazy, _compute_with_progress(list(lazy.values()), client, progress), strict=True))
    acc = {}
    for name, result in computed.items():
        result = result.reindex(cluster_code=np.arange(n_clusters, dtype=float), fill_value=0)
        dtype = settings.dtype("present_counts" if name.startswith("present_counts_") else name)
        acc[name] = np.ascontiguousarray(result.transpose("cluster_code", "gene").values, dtype=dtype)
    return acc


def _compute_with_progress(collections: list, client: Any, progress: bool | None) -> list:
    """``dask.compute`` of ``collections`` with a bar of tasks done (in this process) or of
    results done (on a cluster, waited for as :func:`bigcat.cluster.completed` waits)."""
    import dask
    from dask.callbacks import Callback

    from bigcat.progress import progress_bar

    if client is not None:
        from bigcat.cluster import gather

        futures = client.compute(collections)
        with progress_bar(total=len(futures), unit="statistics", desc="stats", enabled=progress) as bar:
            return gather(client, futures, what="cluster statistics (groupby engine)", done=lambda _: bar.update(1))
    with progress_bar(total=0, unit="tasks", desc="stats", enabled=progress) as bar:  # total: when it starts

        def start_state(graph: Any, state: dict) -> None:
            bar.reset(total=len(graph) - len(state["cache"]))  # literals are not run

        with Callback(start_state=start_state, posttask=lambda *_: bar.update(1)):
            return list(dask.compute(*collections))


# --------------------------------------------------------------------------------------------
# Merging, reading and writing results
# --------------------------------------------------------------------------------------------
def read_stats(path: str | os.PathLike, storage_options: dict | None = None) -> Any:
    """Open a statistics result written by :func:`write_stats`.

    Parameters
    ----------
    path
        ``.zarr`` (opened lazily), ``.h5ad`` (a layer per statistic), or the long
        ``.parquet``/``.csv`` table (one row per cluster × gene); a path or a URL.
    storage_options
        fsspec options when ``path`` is a URL.

    Returns
    -------
    xarray.Dataset
        Dims ``(cluster, gene)``, a variable per statistic found, ``n_cells(cluster)``, and
        the attributes recorded when it was computed (where the format keeps them).
    """
    from bigcat import fs

    url = fs.is_url(path)
    path = str(path) if url else fs.local(path)
    if not fs.exists(path, storage_options):
        msg = f"{path}: no such file or directory"
        raise InputNotFoundError(msg)
    suffix = fs.suffix_of(path)
    if suffix == ".h5ad":
        return _read_stats_h5ad(path, storage_options)
    if suffix in (".parquet", ".csv"):
        return _read_stats_table(path, storage_options)
    return _read_stats_zarr(path, storage_options)


def _read_stats_zarr(path: str, storage_options: dict | None) -> Any:
    import xarray as xr

    from bigcat import fs
    from bigcat.store import read_marker

    marker = read_marker(path, storage_options)
    if marker is None or marker.get("layout") != "stats" or not marker.get("complete"):
        msg = f"{path}: not a complete bigcat statistics store (written by `bigcat stats --out X.zarr`)"
        raise BigcatFormatError(msg)
    ds = xr.open_zarr(fs.zarr_store(path, storage_options))
    ds.attrs.pop("bigcat", None)
    for name in ("cluster", "gene"):
        if ds[name].dtype.kind in "TU":
            ds = ds.assign_coords({name: ds[name].values.astype(object)})
    return ds


def _read_stats_h5ad(path: str, storage_options: dict | None) -> Any:
    import anndata as ad
    import h5py
    import xarray as xr

    from bigcat import fs

    try:
        with fs.open_file(path, storage_options) as handle, h5py.File(handle, "r") as f:
            if "layers" not in f or "obs" not in f:
                msg = f"{path}: not a statistics .h5ad (no layers; written by `bigcat stats --out X.h5ad`)"
                raise BigcatFormatError(msg)
            adata = ad.io.read_elem(f["obs"]), ad.io.read_elem(f["var"]), ad.io.read_elem(f["layers"])
            uns = ad.io.read_elem(f["uns"]) if "uns" in f else {}
    except OSError as error:
        msg = f"{path}: not a readable HDF5 file ({error})"
        raise BigcatFormatError(msg) from error
    obs, var, layers = adata
    if "n_cells" not in obs:
        msg = f"{path}: not a statistics .h5ad (obs has no n_cells column)"
        raise BigcatFormatError(msg)
    variables: dict[str, Any] = {"n_cells": (("cluster",), obs["n_cells"].to_numpy(np.int64))}
    for name, values in layers.items():
        variables[name] = (("cluster", "gene"), np.asarray(values))
    coords = {"cluster": obs.index.to_numpy(object), "gene": var.index.to_numpy(object)}
    attrs = dict(uns.get("bigcat_stats", {}))
    return xr.Dataset(variables, coords=coords, attrs=attrs)


def _read_stats_table(path: str, storage_options: dict | None) -> Any:
    """The long table (cluster, gene, n_cells, one column per statistic) back as a Dataset."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    import xarray as xr

    from bigcat import fs

    try:
        with fs.open_file(path, storage_options) as handle:
            if fs.suffix_of(path) == ".parquet":
                table = pq.read_table(handle, read_dictionary=["cluster", "gene"])
            else:
                options = pacsv.ConvertOptions(
                    column_types={"cluster": pa.string(), "gene": pa.string()},
                    auto_dict_encode=True,
                    auto_dict_max_cardinality=1 << 30,
                )
                table = pacsv.read_csv(handle, convert_options=options)
    except (pa.ArrowInvalid, OSError) as error:
        msg = f"{path}: not a readable statistics table ({' '.join(str(error).split())[:200]})"
        raise BigcatFormatError(msg) from error
    missing = [c for c in ("cluster", "gene", "n_cells") if c not in table.column_names]
    if missing:
        msg = (
            f"{path}: not a long statistics table (no column {', '.join(missing)}; "
            "written by `bigcat stats --out X.parquet` without --wide)"
        )
        raise BigcatFormatError(msg)

    def codes(name: str) -> tuple[np.ndarray, np.ndarray]:
        column = table.column(name)
        if not pa.types.is_dictionary(column.type):
            column = column.dictionary_encode()
        column = column.unify_dictionaries().combine_chunks() if column.num_chunks > 1 else column.combine_chunks()
        values, order = pd.factorize(np.asarray(column.indices), sort=False)
        return values, np.asarray(column.dictionary.to_pylist(), dtype=object)[order]

    rows, clusters = codes("cluster")
    cols, genes = codes("gene")
    shape = (len(clusters), len(genes))
    if len(rows) != shape[0] * shape[1]:
        msg = f"{path}: the table does not have one row per cluster × gene ({len(rows)} rows for {shape})"
        raise BigcatFormatError(msg)
    variables: dict[str, Any] = {}
    n_cells = np.zeros(shape[0], dtype=np.int64)
    n_cells[rows] = np.asarray(table.column("n_cells"))
    variables["n_cells"] = (("cluster",), n_cells)
    for name in table.column_names:
        if name in ("cluster", "gene", "n_cells"):
            continue
        values = np.asarray(table.column(name))
        # CSV has no types: the derived statistics are float32 (as written), the rest as parsed
        derived = name in DERIVED or (name.startswith("present_") and not name.startswith("present_counts"))
        dtype = np.float32 if derived else values.dtype
        out = np.empty(shape, dtype=dtype)
        out[rows, cols] = values
        variables[name] = (("cluster", "gene"), out)
    attrs = {}
    if table.schema.metadata and b"bigcat" in table.schema.metadata:
        attrs = json.loads(table.schema.metadata[b"bigcat"])
    return xr.Dataset(variables, coords={"cluster": clusters, "gene": genes}, attrs=attrs)


def merge_stats(results: Sequence[Any], storage_options: dict | None = None, *, allow_repeats: bool = False) -> Any:
    """Merge statistics computed over disjoint sets of cells, exactly.

    Parameters
    ----------
    results
        Datasets from :func:`cluster_stats` or paths of ``.zarr`` statistics stores. They
        must share genes and options (threshold, present_op, normalize); clusters are the
        union, in order of first appearance.
    allow_repeats
        A result merged with itself (or with a merge that already holds it: every result
        records the runs it comes from in ``attrs["runs"]``) is refused unless this is true.

    Returns
    -------
    xarray.Dataset
        As from :func:`cluster_stats` over all cells: the additive accumulators are summed
        and the statistics derived again.
    """
    import xarray as xr

    loaded = [read_stats(r, storage_options) if not isinstance(r, xr.Dataset) else r for r in results]
    if not loaded:
        msg = "merge_stats needs at least one result"
        raise BigcatInputError(msg)
    first = loaded[0]
    genes = pd.Index(first["gene"].values)
    for ds in loaded[1:]:
        if not pd.Index(ds["gene"].values).equals(genes):
            msg = "cannot merge statistics over different genes"
            raise BigcatInputError(msg)
        for key in ("threshold", "present_op", "present_at", "normalize"):
            if (ds.attrs.get(key) or "") != (first.attrs.get(key) or ""):
                msg = (
                    f"cannot merge statistics computed with different {key}: "
                    f"{first.attrs.get(key)!r} vs {ds.attrs.get(key)!r}"
                )
                raise BigcatInputError(msg)
    runs: list[str] = []
    for ds, given in zip(loaded, results, strict=True):
        mine = _runs(ds)
        repeated = set(mine) & set(runs)
        if repeated and not allow_repeats:
            name = given if isinstance(given, (str, os.PathLike)) else "a result"
            msg = (
                f"{name}: merged twice (its cells come from a run already merged here); "
                "pass allow_repeats=True / --allow-duplicates to merge it anyway"
            )
            raise BigcatInputError(msg)
        runs += mine
    stats = [s for s in str(first.attrs.get("stats", "")).split(",") if s]
    stats = [s for s in stats if all(all(a in ds for a in NEEDS[s]) for ds in loaded)]
    clusters = pd.Index(first["cluster"].values)
    for ds in loaded[1:]:
        clusters = clusters.append(pd.Index(ds["cluster"].values).difference(clusters, sort=False))
    n_cells = np.zeros(len(clusters), dtype=np.int64)
    rows = [clusters.get_indexer(pd.Index(ds["cluster"].values)) for ds in loaded]
    for ds, where in zip(loaded, rows, strict=True):
        n_cells[where] += ds["n_cells"].values
    extra = [f"present_counts_{t}" for t in extra_present_names(first)]
    names = [a for a in (*ACCUMULATORS, *extra) if all(a in ds for ds in loaded)]
    counts = count_dtype(int(n_cells.max()))  # merged counts may need a wider type than any input's
    dtypes = {a: _acc_dtype(a, counts) for a in names}
    acc = {a: zeros((len(clusters), len(genes)), dtypes[a]) for a in names}
    for ds, where in zip(loaded, rows, strict=True):
        for a in names:
            acc[a][where] += ds[a].values.astype(dtypes[a], copy=False)
    sources = []
    for ds in loaded:
        try:
            sources += json.loads(ds.attrs.get("source", "[]"))
        except (TypeError, ValueError):
            sources.append(str(ds.attrs.get("source")))
    attrs = {
        **first.attrs,
        "source": json.dumps(sources),
        "merged_from": len(loaded),
        "stats": ",".join(stats),
        "runs": json.dumps(runs),
    }
    return _result(acc, n_cells, clusters, genes, stats, attrs)


#: uncompressed bytes of one chunk of a statistics store's float64 matrices (rows of clusters × all genes)
STATS_CHUNK_BYTES = 8 << 20
#: Blosc settings of a statistics store's matrices (with bit shuffle): float32 statistics
#: barely compress (1.7×) and LZ4 level 1 with bit shuffle encodes them fastest of the
#: settings measured (BENCHMARKS.md); float64 sums compress 7×
STATS_CODEC = {"cname": "lz4", "clevel": 1}


def _write_stats_zarr(ds: Any, store: Any) -> None:
    """The Dataset as a Zarr store; its clusters × genes matrices encoded on every core.

    xarray writes the coordinates and every array's metadata (chunks of rows of clusters
    × all genes, Blosc LZ4 with bit shuffle); the matrices' chunks are
    then computed (a slab of a lazy statistic at a time, never a float64 temporary of
    full size), encoded and stored by a thread pool (NumPy, Blosc and file writes release
    the GIL). xarray handing whole NumPy arrays to zarr encoded them on one thread, with
    zarr's default Zstandard and small chunks: 17 s for the 4.8 GB of 5,000 clusters.
    """
    import dask.array as da
    from zarr.codecs import BloscCodec

    matrices = [n for n, v in ds.data_vars.items() if v.dims == ("cluster", "gene")]
    n_clusters, n_genes = ds.sizes["cluster"], ds.sizes["gene"]
    rows = int(max(1, min(n_clusters, STATS_CHUNK_BYTES // max(8 * n_genes, 1))))
    skeleton = ds.copy()
    encoding = {}
    for name in matrices:
        dtype = ds[name].dtype
        skeleton[name] = (("cluster", "gene"), da.zeros((n_clusters, n_genes), dtype=dtype, chunks=(rows, n_genes)))
        skeleton[name].attrs = ds[name].attrs
        encoding[name] = {
            "chunks": (rows, n_genes),
            "compressors": [BloscCodec(shuffle="bitshuffle", **STATS_CODEC)],
        }
    skeleton.to_zarr(store, mode="w-", consolidated=True, encoding=encoding, compute=False)
    _store_chunks(ds, store, matrices, rows)


def _store_chunks(ds: Any, store: Any, names: list[str], rows: int) -> None:
    """Every (rows × all genes) chunk of the matrices ``names`` of ``ds``, encoded as the
    arrays the skeleton declared (``bytes`` little-endian + Blosc) and stored, in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    import zarr
    from numcodecs import Blosc
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from bigcat.cluster import capacity

    root = zarr.open_group(store, mode="r+")
    blosc = Blosc(cname=STATS_CODEC["cname"], clevel=STATS_CODEC["clevel"], shuffle=Blosc.BITSHUFFLE)
    local = Path(store) if isinstance(store, str) else None  # a local store: plain file writes
    jobs = []
    for name in names:
        array = root[name]
        for i, lo in enumerate(range(0, ds.sizes["cluster"], rows)):
            key = array.metadata.encode_chunk_key((i, 0))
            jobs.append((name, lo, f"{array.path}/{key}" if array.path else key, array.dtype))
    prototype = default_buffer_prototype()

    def write(job: tuple) -> None:
        name, lo, key, dtype = job
        values = np.ascontiguousarray(np.asarray(ds[name][lo : lo + rows].values, dtype=dtype))
        if values.dtype.byteorder == ">":
            values = values.astype(values.dtype.newbyteorder("<"))
        if len(values) < rows:  # an edge chunk is encoded padded to the full chunk, as zarr does
            values = np.concatenate([values, np.zeros((rows - len(values), values.shape[1]), dtype=values.dtype)])
        encoded = blosc.encode(values)
        if local is not None:
            target = local / key
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(encoded)
        else:
            sync(root.store_path.store.set(key, prototype.buffer.from_bytes(encoded)))

    with ThreadPoolExecutor(capacity(None).threads, thread_name_prefix="bigcat-write") as threads:
        list(threads.map(write, jobs))


def _runs(ds: Any) -> list[str]:
    """The runs a result's cells come from (none recorded by older versions)."""
    try:
        return [str(r) for r in json.loads(ds.attrs.get("runs", "[]") or "[]")]
    except (TypeError, ValueError):
        return []


def _long_arrow(ds: Any, clusters: slice, names: dict) -> Any:
    """Rows ``clusters`` of the long table as an Arrow table: cluster and gene names as
    dictionary columns over ``names`` (no string per row is ever built), the statistics as
    flat views of their matrices. Building the rows as pandas strings made writing 5,000
    clusters' table cost 80 s."""
    import pyarrow as pa

    lo, hi, _ = clusters.indices(ds.sizes["cluster"])
    n_c, n_g = hi - lo, ds.sizes["gene"]
    columns = {
        "cluster": pa.DictionaryArray.from_arrays(np.repeat(np.arange(lo, hi, dtype=np.int32), n_g), names["cluster"]),
        "gene": pa.DictionaryArray.from_arrays(np.tile(np.arange(n_g, dtype=np.int32), n_c), names["gene"]),
        "n_cells": np.repeat(np.asarray(ds["n_cells"].values[lo:hi]), n_g),
    }
    for name, var in ds.data_vars.items():
        if var.dims == ("cluster", "gene"):
            columns[name] = np.ascontiguousarray(np.asarray(var[lo:hi].values)).reshape(-1)
    return pa.table(columns)


def write_stats(
    ds: Any,
    path: str | os.PathLike,
    *,
    wide: bool = False,
    overwrite: bool = False,
    storage_options: dict | None = None,
) -> list[Path | str]:
    """Write a statistics Dataset, atomically, in the format its extension names.

    Parameters
    ----------
    ds
        A result of :func:`cluster_stats` or :func:`merge_stats`.
    path
        ``.zarr`` (the Dataset), ``.parquet``/``.csv`` (long form: one row per cluster ×
        gene with a column per statistic and ``n_cells``, like R's ``cl.stats`` table),
        ``.h5ad`` (clusters as obs with ``n_cells``, genes as var, each statistic a layer,
        like ``scanpy.get.aggregate``).
    wide
        For ``.parquet``/``.csv``: one genes × clusters table per statistic instead, written
        to ``NAME.<statistic>.parquet`` (what ``get_cl_stats_parquet`` users get).
    overwrite
        Replace existing outputs.
    storage_options
        fsspec options when ``path`` is a URL (``s3://…``; see :mod:`bigcat.fs`).

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    from bigcat import fs
    from bigcat.store import publish

    url = fs.is_url(path)
    path = str(path) if url else fs.local(path)
    suffix = fs.suffix_of(path)
    try:
        sources = json.loads(ds.attrs.get("source", "[]"))
    except (TypeError, ValueError):
        sources = []
    from bigcat.store import refuse_input_as_output

    refuse_input_as_output(path, [s for s in sources if isinstance(s, str)])

    def atomic_path(target: Any, *, overwrite: bool) -> Any:
        kind = "zarr" if fs.suffix_of(target) == ".zarr" else "file"
        return publish(target, overwrite=overwrite, storage_options=storage_options, kind=kind)

    if suffix not in (".zarr", ".parquet", ".csv", ".h5ad"):
        msg = f"{path}: unknown output type {suffix or '(none)'!r}; use .zarr, .parquet, .csv or .h5ad"
        raise BigcatInputError(msg)
    if wide and suffix not in (".parquet", ".csv"):
        msg = f"{path}: --wide (wide=True) is for .parquet and .csv tables; a {suffix} output is always whole"
        raise BigcatInputError(msg)
    matrices = [n for n, v in ds.data_vars.items() if v.dims == ("cluster", "gene")]
    if suffix == ".zarr":
        with atomic_path(path, overwrite=overwrite) as tmp:
            out = ds.copy()
            for name in ("cluster", "gene"):
                if out[name].dtype == object:
                    out = out.assign_coords({name: out[name].values.astype(str)})
            out.attrs["bigcat"] = {"complete": False, "layout": "stats", "format_version": 1}
            store = fs.zarr_store(tmp, storage_options, read_only=False)
            import zarr
            from zarr.errors import UnstableSpecificationWarning

            with warnings.catch_warnings():
                # zarr's notes on consolidated metadata and on the names' fixed-length strings
                # (read back by zarr-python and xarray): once here, not a page per array
                warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
                warnings.filterwarnings("ignore", category=UnstableSpecificationWarning)
                _write_stats_zarr(out, store)
                root = zarr.open_group(store, mode="r+")
                root.attrs["bigcat"] = {"complete": True, "layout": "stats", "format_version": 1}
                zarr.consolidate_metadata(store)
        return [path]
    if suffix == ".h5ad":
        import anndata as ad

        obs = pd.DataFrame({"n_cells": ds["n_cells"].values}, index=pd.Index(ds["cluster"].values.astype(str)))
        var = pd.DataFrame(index=pd.Index(ds["gene"].values.astype(str)))
        layers = {name: np.asarray(ds[name].values) for name in matrices}
        uns = {"bigcat_stats": {k: v for k, v in ds.attrs.items() if isinstance(v, (str, int, float))}}
        adata = ad.AnnData(obs=obs, var=var, layers=layers, uns=uns)
        with atomic_path(path, overwrite=overwrite) as tmp:
            adata.write_h5ad(tmp)
            if not url:  # the mark of a file bigcat wrote (--overwrite replaces only those)
                import h5py

                with h5py.File(tmp, "a") as f:
                    f.attrs["bigcat"] = json.dumps({"layout": "stats", "complete": True})
        return [path]
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    def open_writer(target: Path, schema: pa.Schema) -> Any:
        return pq.ParquetWriter(target, schema) if suffix == ".parquet" else pacsv.CSVWriter(target, schema)

    written = []
    if wide:
        for name in matrices:
            stem = str(path)[: -len(suffix)] if suffix else str(path)
            final = f"{stem}.{name}{suffix}" if url else Path(f"{stem}.{name}{suffix}")
            values = np.asarray(ds[name].values)
            columns = {"gene": pa.array(ds["gene"].values.astype(str))}
            for i, label in enumerate(ds["cluster"].values):
                columns[str(label)] = pa.array(values[i])
            table = pa.table(columns)
            if suffix == ".parquet":  # the mark of a file bigcat wrote (--overwrite replaces only those)
                table = table.replace_schema_metadata({b"bigcat": json.dumps({"statistic": name}).encode()})
            with atomic_path(final, overwrite=overwrite) as tmp:
                writer = open_writer(tmp, table.schema)
                writer.write_table(table)
                writer.close()
            written.append(final)
        return written
    attrs_json = json.dumps({k: v for k, v in ds.attrs.items() if isinstance(v, (str, int, float))})
    step = max(1, (1 << 22) // max(ds.sizes["gene"], 1))
    names = {axis: pa.array(np.asarray(ds[axis].values).astype(str)) for axis in ("cluster", "gene")}
    with atomic_path(path, overwrite=overwrite) as tmp:
        writer = None
        for lo in [*range(0, ds.sizes["cluster"], step)] or [0]:
            table = _long_arrow(ds, slice(lo, lo + step), names)
            if writer is None:
                if suffix == ".parquet":  # strings as before for readers (no Arrow schema: no categoricals)
                    # dictionary pages and min/max statistics only where they help (the names):
                    # on the float columns they cost half the writing time and buy nothing
                    writer = pq.ParquetWriter(
                        tmp, table.schema, store_schema=False, use_dictionary=["cluster", "gene"],
                        write_statistics=["cluster", "gene", "n_cells"],
                    )  # fmt: skip
                else:
                    writer = open_writer(tmp, table.schema)
            writer.write_table(table)
        if suffix == ".parquet":  # the attributes travel in the file's metadata (CSV has nowhere to keep them)
            writer.add_key_value_metadata({"bigcat": attrs_json})
        writer.close()
    return [path]


__all__ += ["read_stats", "write_stats"]
