"""Per-cluster statistics (sums, means, present, squared means, variances, non-zeros), out of core.

:func:`cluster_stats` is the heart of bigcat. The default ``blocks`` engine runs a
compiled kernel (:mod:`bigcat.kernels`) over row blocks of the sparse matrix as Dask
tasks — or, for files read in this process without a client, on threads of its own
(:mod:`bigcat.stats.local`, the same decomposition without a graph): a single pass over
each block's stored values accumulates every requested statistic; nothing is densified.

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
return the same :class:`xarray.Dataset`."""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bigcat._io.source import block_bounds
from bigcat._memory import BufferPool, PageArena, release_free_memory, small_pages
from bigcat._threads import ByReference
from bigcat.stats import local, plan
from bigcat.stats.inputs import _Part
from bigcat.stats.plan import _capacity, _decompose, _inproc
from bigcat.stats.statistics import _accumulator_bytes, _Settings
from bigcat.stats.tasks import (
    _add_task,
    _chunk_block,
    _chunk_row_totals,
    _column_totals,
    _finalize_task,
    _fold_task,
    _init_task,
    _read_columns,
    _read_rows,
    _sum_arrays,
    _token_task,
)

__all__ = ["STEPS"]

log = logging.getLogger("bigcat")


#: the task-key prefixes of a pass: a chain's init, its reads and folds, the per-block
#: token the progress bar counts, the tree adding row partitions, each range's final task,
#: and the per-cell totals of a CSC input or a Dataset's chunks (for log2 CPM)
INIT, READ, FOLD, TOKEN, ADD, FINAL = (f"bigcat-{step}" for step in ("init", "read", "fold", "token", "add", "final"))
COLUMN_TOTALS, TOTALS, CHUNK_TOTALS = "bigcat-coltotals", "bigcat-totals", "bigcat-chunktotals"
FEWER_CLUSTERS = "fewer clusters per run (label subsets, then bigcat stats --merge)"
#: what each task computes, and what to change when a worker dies running it (bigcat.cli)
STEPS = {
    FOLD: ("cluster statistics (folding a block into an accumulator)", "a smaller --block-values"),
    INIT: ("cluster statistics (allocating the accumulators)", FEWER_CLUSTERS),
    ADD: ("cluster statistics (adding partial results)", FEWER_CLUSTERS),
    FINAL: ("cluster statistics (finishing the result)", FEWER_CLUSTERS),
    READ: ("cluster statistics (reading a block)", "a smaller --block-values"),
}
#: fan-in of the tree that sums row-partition accumulators
FAN_IN = 8
#: blocks a chain may read ahead of its fold
LOOKAHEAD = 2
#: in this process without a client, run the pass on threads of its own rather than as a graph
#: (:mod:`bigcat.stats.local`); tests switch it off to check the graph against it
LOCAL = True


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
    as ``task_pool``: the pool itself, or a :class:`bigcat._threads.ByReference` to it)."""
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
                    key = f"{COLUMN_TOTALS}-{token}-{p}-{i}"
                    graph[key] = (_column_totals, source, int(lo), int(hi))
                    keys.append(key)
                totals_key = f"{TOTALS}-{token}-{p}"
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
                read: Any = (_read_rows, source, int(lo), int(hi), task_pool)
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
                totals_key = f"{CHUNK_TOTALS}-{token}-{p}"
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
    n_out = len(gene_index)
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

    local_run = client is None and LOCAL and local.supports(parts)
    if local_run:
        token = ""
    else:
        from dask.base import tokenize

        names, codes = [p.name for p in parts], [p.codes for p in parts]
        token = tokenize(names, codes, gene_index, settings, block_nnz, os.getpid())
    blocks = _plan_blocks(parts, settings, block_nnz, graph, token, pool, shared(pool))
    arena = _read_arena(pool, acc_bytes, n_derived * n_clusters * n_out * 4)
    # -- the decomposition: R row partitions × C cluster ranges --------------------------------
    cap = _capacity(client)
    n_row_parts, n_ranges = _decompose(cap, acc_bytes, len(blocks), n_clusters, in_process)
    n_cells, edges = _cluster_ranges(parts, n_clusters, n_ranges)
    n_ranges = len(edges) - 1
    _log_plan(len(blocks), n_clusters, n_out, acc_bytes, n_row_parts, n_ranges, cap, distributed=not in_process)
    gene_map = np.full(n_genes_total, -1, dtype=np.int32)
    gene_map[gene_index] = np.arange(n_out, dtype=np.int32)

    # -- preallocated results (in-process, chain 0 of each range accumulates into them) -----------
    # untouched pages: in-process, each range's init task touches its own rows (see zeros);
    # with a client, every range's result is copied in
    out = {
        name: small_pages(settings.shape(name, n_clusters, n_out), settings.dtype(name))
        for name in settings.accumulators
    }

    if local_run:
        _run_local(parts, out, edges, n_row_parts, n_cells, gene_map, settings, block_nnz, pool, progress)
        handles.clear()
        del graph, blocks
        return out, _spare(arena, pool)

    # each row partition's tasks (init, reads, folds) as a group that one worker runs;
    # in-process, chain 0 of each range accumulates straight into the preallocated results
    partitions, chains = [], []
    for r in range(n_row_parts):
        mine = blocks[len(blocks) * r // n_row_parts : len(blocks) * (r + 1) // n_row_parts]
        partition, ends = _partition_graph(
            f"{token}-{r}", mine, edges, settings, gene_map, n_out, out if in_process and r == 0 else None, shared
        )
        partitions.append(partition)
        chains.append(ends)
    combine, final_keys = _combine_graph(token, chains, edges, n_cells, settings)
    workers = min(cap.workers, math.ceil(n_row_parts * n_ranges / cap.threads))
    inputs = [p.source.path for p in parts if p.source is not None]
    try:
        _run((graph, partitions, combine), final_keys, client, progress, out, edges, workers=workers, inputs=inputs)
    finally:
        for handle in handles:
            handle.release()
    handles.clear()
    del graph, partitions, combine, blocks
    return out, _spare(arena, pool)


def _dask_scheduler() -> Any:
    import dask

    return dask.config.get("scheduler", None)


def _spare(arena: PageArena | None, pool: BufferPool | None) -> PageArena | None:
    """The arena, once no block is left in its pages (they are the statistics' then)."""
    spare = arena if arena is not None and pool is not None and pool.release() else None
    if spare is not None:
        spare.reset()
    if pool is not None:
        pool.buffers.clear()
    release_free_memory()  # the read buffers kept by the allocator, before the statistics are built
    return spare


def _run_local(
    parts: list[_Part], out: dict, edges: np.ndarray, n_row_parts: int, n_cells: np.ndarray, gene_map: np.ndarray,
    settings: _Settings, block_nnz: int, pool: BufferPool | None, progress: bool | None,
) -> None:  # fmt: skip
    """The pass on this process' threads, without a graph (:mod:`bigcat.stats.local`)."""
    from bigcat.progress import progress_bar

    sync = "dask" in sys.modules and _dask_scheduler() in ("sync", "synchronous", "single-threaded")
    if sync:  # one thread: one row partition, one cluster range
        n_row_parts, edges = 1, np.array([0, edges[-1]], dtype=np.int64)
    with progress_bar(total=None, unit="blocks", desc="stats", enabled=progress) as bar:
        local.local_pass(parts, out, edges, n_row_parts, n_cells, gene_map, settings, block_nnz,
                         pool if pool is not None else BufferPool(), progress=bar)  # fmt: skip


def _read_arena(pool: BufferPool | None, acc_bytes: int, derived_bytes: int) -> PageArena | None:
    """With large accumulators, blocks are read into the memory the float32 statistics
    (``derived_bytes``) take after the pass: room for either; what neither uses is never
    touched. ``None`` when there is no pool or no need."""
    if pool is None or acc_bytes <= plan.BIG_ACCUMULATORS or not derived_bytes:
        return None
    in_flight = LOOKAHEAD * pool.size * 16  # data and indices of at most 8 bytes each
    pool.arena = PageArena(max(derived_bytes, in_flight) + 8 * PageArena.ALIGN)
    return pool.arena


def _log_plan(
    n_blocks: int, n_clusters: int, n_out: int, acc_bytes: int, n_row_parts: int, n_ranges: int, cap: Any,
    *, distributed: bool,
) -> None:  # fmt: skip
    log.info(
        "blocks engine: %d blocks; %d clusters × %d genes (%.2f GB of accumulators) as %d row partitions × %d "
        "cluster ranges",
        n_blocks, n_clusters, n_out, acc_bytes / 1e9, n_row_parts, n_ranges,
    )  # fmt: skip
    if distributed:
        log.info(
            "planned for %d workers × %d threads, %.2f GB each (%d connected now)",
            cap.workers, cap.threads, cap.memory / 1e9, cap.present,
        )  # fmt: skip


def _cluster_ranges(parts: list[_Part], n_clusters: int, n_ranges: int) -> tuple[np.ndarray, np.ndarray]:
    """Cells per cluster, and the edges of at most ``n_ranges`` cluster ranges holding about
    the same number of cells (cluster sizes are very skewed)."""
    all_codes = np.concatenate([p.codes for p in parts])
    n_cells = np.bincount(all_codes[all_codes >= 0], minlength=n_clusters).astype(np.int64)
    cum = np.cumsum(n_cells)
    edges = np.searchsorted(cum, np.linspace(0, cum[-1] if len(cum) else 0, n_ranges + 1)[1:-1], side="left") + 1
    return n_cells, np.unique(np.r_[0, np.minimum(edges, n_clusters), n_clusters]).astype(np.int64)


def _partition_graph(
    prefix: str, blocks: list[_Block], edges: np.ndarray, settings: _Settings, gene_map: np.ndarray, n_out: int,
    out: dict | None, shared: Any,
) -> tuple[dict, list[str]]:  # fmt: skip
    """One row partition's tasks: per cluster range an init and a chain of folds, one per
    block holding cells of that range; reads at most ``LOOKAHEAD`` blocks ahead; a token per
    block for the progress bar. Returns the tasks and each range's chain end. ``out``: the
    results to accumulate into (views of them as the inits' pieces)."""
    graph: dict = {}
    n_ranges = len(edges) - 1
    last = []
    for c in range(n_ranges):
        lo, hi = int(edges[c]), int(edges[c + 1])
        key = f"{INIT}-{prefix}-{c}"
        views = {name: a[lo:hi] for name, a in out.items()} if out is not None else None
        graph[key] = (_init_task, settings, hi - lo, n_out, shared(views))
        last.append(key)
    tokens: list[str] = []
    for k, block in enumerate(blocks):
        read_key = f"{READ}-{prefix}-{k}"
        graph[read_key] = (*block.read, tokens[k - LOOKAHEAD]) if block.lookahead and k >= LOOKAHEAD else block.read
        folds = []
        for c in range(n_ranges):
            lo, hi = int(edges[c]), int(edges[c + 1])
            if n_ranges > 1 and not ((block.codes >= lo) & (block.codes < hi)).any():
                continue
            key = f"{FOLD}-{prefix}-{c}-{k}"
            graph[key] = (_fold_task, last[c], read_key, block.codes, gene_map, block.totals, settings, lo)
            last[c] = key
            folds.append(key)
        tokens.append(f"{TOKEN}-{prefix}-{k}")
        graph[tokens[-1]] = (_token_task, *folds)
    return graph, last


def _combine_graph(
    token: str, chains: list[list[str]], edges: np.ndarray, n_cells: np.ndarray, settings: _Settings
) -> tuple[dict, list[str]]:
    """Per cluster range, the row partitions' chain ends added by a tree of fan-in
    ``FAN_IN`` and finalized; returns the tasks and the final keys, in range order."""
    graph: dict = {}
    final_keys = []
    for c in range(len(edges) - 1):
        level = [ends[c] for ends in chains]
        depth = 0
        while len(level) > 1:
            nxt = []
            for i in range(0, len(level), FAN_IN):
                key = f"{ADD}-{token}-{c}-{depth}-{i}"
                graph[key] = (_add_task, *level[i : i + FAN_IN])
                nxt.append(key)
            level, depth = nxt, depth + 1
        key = f"{FINAL}-{token}-{c}"
        graph[key] = (_finalize_task, level[0], n_cells[int(edges[c]) : int(edges[c + 1])], settings)
        final_keys.append(key)
    return graph, final_keys


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
    tokens = [k for p in partitions for k in p if isinstance(k, str) and k.startswith(f"{TOKEN}-")]
    with progress_bar(total=len(tokens), unit="blocks", desc="stats", enabled=progress) as bar:
        if client is None:
            import dask
            from dask.callbacks import Callback

            def posttask(key: Any, *_: Any) -> None:
                if isinstance(key, str) and key.startswith(f"{TOKEN}-"):
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
        from bigcat._scheduling import completed, spread_graph
        from bigcat.cluster import check_visible, use_workers

        with use_workers(client, workers, what="cluster statistics"):
            check_visible(client, list(inputs))
            # futures on the (tiny) per-block tokens drive the progress bar
            # a partition's init and its reads prefer its worker, so the partition runs there as
            # planned: with only the inits placed, the first reads (tasks without inputs) ran on
            # whichever worker was free, blocks were shipped to the folds and chains migrated
            # between workers (67 + 22 and 11 + 78 folds of two partitions on two workers), and
            # on a loaded SLURM node every fold once ended up on one worker
            pinned = (f"{INIT}-", f"{READ}-")
            graph = spread_graph(client, shared, partitions, combine, pin=lambda key: key.startswith(pinned))
            futures = client.get(graph, [*final_keys, *tokens], sync=False)
            position = {f.key: c for c, f in enumerate(futures[: len(final_keys)])}
            for future in completed(client, futures, what="cluster statistics"):
                if future.key in position:
                    place(position[future.key], future.result())
                else:
                    bar.update(1)
                future.release()
