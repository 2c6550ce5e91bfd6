"""The public statistics API: :func:`cluster_stats` and :func:`merge_stats`."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bigcat._memory import PageArena
from bigcat.errors import BigcatInputError
from bigcat.stats.blocks import _blocks
from bigcat.stats.formats import _runs, read_stats
from bigcat.stats.groupby import _groupby
from bigcat.stats.inputs import _open_parts, _Part, _refuse_shared_cells
from bigcat.stats.labels import Labelled, _select, resolve_codes
from bigcat.stats.plan import _default_block_nnz, _default_client, _inproc
from bigcat.stats.statistics import (
    ACCUMULATORS,
    DEFAULT_STATS,
    DERIVED,
    ENGINES,
    EXTRA,
    NEEDS,
    NORMALIZATIONS,
    PRESENT_OPS,
    _acc_dtype,
    _check_present_at,
    _check_stats,
    _Settings,
    count_dtype,
    extra_present_names,
    statistic,
)
from bigcat.stats.tasks import _NegativeValuesError, zeros

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["cluster_stats", "merge_stats", "runs_in_process"]

log = logging.getLogger("bigcat")


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
    _only_written: bool = False,
) -> xr.Dataset:
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
        32,000 genes), their size in bytes / 24 (at least 32 million, at most 2²⁷): each
        block's visit sweeps most of the accumulators' memory, so with thousands of
        clusters fewer, larger blocks mean fewer sweeps; the two blocks in flight then take
        about the memory the float32 statistics are built in afterwards
        (``docs/design.md``, "The decomposition"). The pass in this process reads files in
        blocks of twice this many values when several threads share an accumulator (one
        block in flight per accumulator instead of two).
    progress
        Show a progress bar (``None``: only on a terminal).
    storage_options
        fsspec options for URL inputs and label tables (``s3://…``; see :mod:`bigcat._io.fs`).
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

    Notes
    -----
    Cost: one pass over the stored values (nothing is densified): O(nnz) time for the
    compiled kernel, independent of the number of clusters but for the accumulators'
    memory traffic; memory: one set of accumulators (clusters × genes × 8 bytes per float
    accumulator, 2 or 4 per count) plus about two row blocks per thread in flight
    (``block_nnz`` × ~9 bytes each); the float32 statistics are computed when read. On a
    cluster the accumulators are split so that each piece fits a quarter of a worker's
    memory (``docs/design.md``, "The decomposition"). The ``groupby`` engine densifies
    blocks: O(cells × genes) time, for checking.

    Examples
    --------
    >>> ds = bigcat.cluster_stats("atlas.zarr", by="cluster")  # doctest: +SKIP
    >>> ds.means.sel(cluster="L2/3 IT").to_series().nlargest(5)  # doctest: +SKIP
    """
    stats = _check_stats(stats)
    extra = _check_present_at(present_at)
    _check_options(engine, normalize, present_op)
    by_column = by if isinstance(by, str) and labels is None else None
    parts = _open_parts(data, by_column, storage_options)
    gene_names = _common_genes(parts, allow_duplicate_cells=allow_duplicate_cells)
    labelled = resolve_codes(
        parts, by, labels=labels, label_column=label_column, cell_column=cell_column, cells=cells,
        max_cells_per_cluster=max_cells_per_cluster, seed=seed, storage_options=storage_options,
    )  # fmt: skip
    if _membership is not None:  # for writers that list each cluster's cells (MapMyCells)
        _membership.update(codes=labelled.codes, clusters=labelled.clusters, parts=parts)
    gene_index = np.arange(len(gene_names)) if genes is None else _select(genes, gene_names, "gene")
    settings = _Settings(
        accumulators=tuple(a for a in ACCUMULATORS if any(a in NEEDS[s] for s in stats)) + ((EXTRA,) if extra else ()),
        threshold=float(threshold),
        op_ge=present_op == "ge",
        normalize=normalize == "log2cpm",
        counts=count_dtype(int(labelled.n_cells.max())).name,
        extra=extra,
    )
    client = _default_client(client)
    if block_nnz is None:
        in_process = client is None or _inproc(client)
        block_nnz = _default_block_nnz(len(labelled.clusters), len(gene_index), settings, in_process)
    n_derived = sum(s in DERIVED for s in stats) + len(extra)
    acc, spare = _accumulate(
        parts, labelled, len(gene_names), gene_index, settings, engine, client, block_nnz, progress, n_derived
    )
    attrs = {
        **labelled.attrs,
        "source": json.dumps([p.name for p in parts]),
        "by": labelled.by,
        "stats": ",".join(stats),
        "threshold": float(threshold),
        "present_op": present_op,
        "present_at": ",".join(name for name, _, _ in extra),
        "normalize": normalize or "none",
        "engine": engine,
        "max_cells_per_cluster": -1 if max_cells_per_cluster is None else int(max_cells_per_cluster),
        "seed": int(seed),
        "n_cells_excluded": int(sum(p.n_cells for p in parts) - labelled.n_cells.sum()),
        "n_cells_unlabelled": labelled.unlabelled,
        "runs": json.dumps([uuid.uuid4().hex]),  # provenance: merging a result with itself is refused
        "bigcat_version": _version(),
    }
    _note_nonfinite(acc, parts, attrs)
    clusters, n_cells = labelled.clusters, labelled.n_cells
    if _only_written and spare is not None:
        # the caller only writes the result: each float32 statistic is then computed chunk by
        # chunk as it is encoded, while its accumulators' slab is in cache, instead of whole
        # into the pass' pages and read back (zarr output, 5,000 clusters: 3.3 -> 2.7 s)
        spare.trim()
        spare = None
    return _result(acc, n_cells, clusters, gene_names[gene_index], stats, attrs, spare)


def runs_in_process(data: Any, *, engine: str = "blocks", storage_options: dict | None = None) -> bool:
    """Whether :func:`cluster_stats` over ``data`` without a client runs its pass on this
    process' own threads, with no Dask graph (:mod:`bigcat.stats.local`).

    That is the ``blocks`` engine over files (``.h5ad`` or Zarr, local or URLs) whose X is
    CSR in native byte order, all with the same dtypes. ``bigcat stats`` then starts no Dask
    cluster unless ``--cluster`` asks for one: its scheduler would have nothing to run, and
    starting it and running the pass as a graph cost 0.9 s of a 3 s run (docs/design.md).

    Parameters
    ----------
    data, engine, storage_options
        As for :func:`cluster_stats`.

    Raises
    ------
    InputNotFoundError, BigcatFormatError
        As :func:`cluster_stats` would for an input.
    """
    from bigcat._io.source import open_source
    from bigcat.stats import blocks, local
    from bigcat.stats.inputs import _as_list

    items = _as_list(data)
    if engine != "blocks" or not blocks.LOCAL or not items:
        return False
    if not all(isinstance(item, (str, os.PathLike)) for item in items):
        return False  # Datasets: read as files only when untouched (cluster_stats decides)
    sources = []
    try:
        for item in items:
            sources.append(open_source(item, storage_options=storage_options))
        return local.supports_sources(sources)
    finally:
        for source in sources:
            source.close()


def _check_options(engine: str, normalize: str | None, present_op: str) -> None:
    if engine not in ENGINES:
        msg = f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}"
        raise BigcatInputError(msg)
    if normalize not in NORMALIZATIONS:
        msg = f"unknown normalize {normalize!r}; choose log2cpm or None"
        raise BigcatInputError(msg)
    if present_op not in PRESENT_OPS:
        msg = f"unknown present_op {present_op!r}; choose gt (x > threshold) or ge (x >= threshold)"
        raise BigcatInputError(msg)


def _common_genes(parts: list[_Part], *, allow_duplicate_cells: bool) -> pd.Index:
    """The genes every input shares (refused otherwise), after checking there is something to
    compute and, for several inputs, that no cell is in two of them."""
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
    if len(parts) > 1 and not allow_duplicate_cells:
        _refuse_shared_cells(parts)
    return gene_names


def _accumulate(
    parts: list[_Part], labelled: Labelled, n_genes_total: int, gene_index: np.ndarray, settings: _Settings,
    engine: str, client: Any, block_nnz: int, progress: bool | None, n_derived: int,
) -> tuple[dict, PageArena | None]:  # fmt: skip
    """The pass: the accumulators (and memory to spare for the statistics) from either engine."""
    n_clusters = len(labelled.clusters)
    try:
        if engine == "blocks":
            return _blocks(parts, n_clusters, n_genes_total, gene_index, settings, client, block_nnz, progress,
                           n_derived)  # fmt: skip
        return _groupby(parts, n_clusters, gene_index, settings, client, progress), None
    except _NegativeValuesError as error:
        msg = f"{', '.join(p.name for p in parts)}: {error}"
        raise BigcatInputError(msg) from None


def _note_nonfinite(acc: dict, parts: list[_Part], attrs: dict) -> None:
    """Count the cluster × gene sums that are not finite (kept, IEEE rules), in one line."""
    if "sums" not in acc:
        return
    bad = _count_nonfinite(acc["sums"])
    if bad:
        attrs["non_finite_entries"] = bad
        log.warning(
            "%s: X holds non-finite values (NaN or ±inf): %d cluster × gene sums are not finite "
            "(IEEE rules: NaN propagates, inf − inf is NaN)",
            ", ".join(p.name for p in parts),
            bad,
        )


def _count_nonfinite(values: np.ndarray, slab: int = 1 << 18) -> int:
    """Entries of ``values`` that are NaN or ±inf, counted slab by slab (a whole-array
    ``~np.isfinite`` makes two temporaries of its size in fresh memory)."""
    flat = values.reshape(-1)
    finite = sum(int(np.count_nonzero(np.isfinite(flat[i : i + slab]))) for i in range(0, flat.size, slab))
    return flat.size - finite


def _version() -> str:
    from bigcat import __version__

    return __version__


def _derive(
    acc: dict[str, np.ndarray], n_cells: np.ndarray, stats: Sequence[str], spare: PageArena | None = None
) -> dict:
    """The float32 statistics over the in-memory accumulators.

    They are elementwise and cheap, so by default they are lazily computed arrays,
    computed when read (``.values``, ``.load()``, ``write_stats``, or any slice of them,
    which computes only that slice); the result of :func:`cluster_stats` then costs only
    its accumulators' memory. With ``spare`` memory (the blocks engine's read buffers,
    free once the pass is over) they are computed now into pieces of it: those pages are
    already touched, and first-touching fresh memory is costly on virtual machines
    (``docs/design.md``).
    """
    from xarray.core import indexing

    from bigcat.stats.lazy import DerivedArray

    if not acc:
        return {}
    derived: dict = {}
    for name in stats:
        if statistic(name).finalize is not None:
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
) -> xr.Dataset:
    import xarray as xr

    acc = dict(acc)
    tests = extra_present_names(attrs)
    if EXTRA in acc:  # one clusters × tests × genes array in the pass: a variable per test
        extra = acc.pop(EXTRA)
        for t, name in enumerate(tests):
            acc[f"present_counts_{name}"] = extra[:, t, :]
    extra_stats = tuple(f"present_{name}" for name in tests if f"present_counts_{name}" in acc)
    derived = _derive(acc, n_cells, (*stats, *extra_stats), spare)

    # Variables built on the fast path: arrays we made ourselves need no conversion, and the
    # checks xarray runs otherwise import dask.array (0.2 s of every command)
    def variable(dims: tuple[str, ...], values: Any) -> xr.Variable:
        return xr.Variable(dims, values, fastpath=True)

    variables: dict[str, Any] = {"n_cells": variable(("cluster",), np.asarray(n_cells, dtype=np.int64))}
    for name in (*stats, *extra_stats):
        if name in derived:
            variables[name] = variable(("cluster", "gene"), derived[name])
    for name in (*ACCUMULATORS, *(f"present_counts_{t}" for t in tests)):
        if name in acc:
            variables[name] = variable(("cluster", "gene"), acc[name])
    cluster_values = np.asarray(clusters)
    if cluster_values.dtype.kind in "OTU":
        cluster_values = cluster_values.astype(object)
    gene_values = np.asarray(genes, dtype=object)
    # the indexes as pandas Indexes: from arrays, xarray would ask whether they are Dask
    # collections (importing dask: 0.03-0.05 s)
    coords = {
        "cluster": variable(("cluster",), pd.Index(cluster_values, dtype=cluster_values.dtype, copy=False)),
        "gene": variable(("gene",), pd.Index(gene_values, dtype=object, copy=False)),
    }
    return xr.Dataset(variables, coords=coords, attrs=attrs)


def merge_stats(
    results: Sequence[Any], storage_options: dict | None = None, *, allow_repeats: bool = False
) -> xr.Dataset:
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
