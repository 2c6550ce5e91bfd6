"""The blocks engine's pass in this process, on threads of its own, without a task graph.

A Dask graph of read and fold tasks costs little to schedule, but a read task decodes a
whole block on one thread while the others wait for it or decode their own, and blocks cut
at row boundaries decode the storage chunks at their edges twice. Here the ``T`` threads
form ``R`` groups of ``C`` (the decomposition of :mod:`bigcat.stats.blocks`: ``R`` row
partitions, each with its own accumulator, × ``C`` cluster ranges); a group walks its
blocks in step:

- every thread of the group folds the current block into its own cluster range; the group
  meets at a barrier;
- every thread decodes a ``1/C`` piece of the next block (data and indices, cut at
  storage-chunk boundaries) into the same buffers and checks its indices; the group meets again.

So decoding and folding both run on every core, each storage chunk is decoded exactly once,
and one block per group is in memory: a group of several threads reads blocks of twice
``block_nnz`` values (the memory of the two blocks a decode overlapped with the folds would
hold), so that the accumulators — swept once per block at thousands of clusters — are swept
half as often: dataset M at 5,000 clusters 17.5 → 15.1–15.6 s (docs/design.md). Blocks are element ranges
of X (``aligned`` mode): a row may continue into the next block, which the statistics do not
mind — every accumulator adds value by value — except log2 CPM, which needs each row's
total, and unsorted rows, whose duplicates must be summed first; those run with blocks cut
at rows (``rows`` mode), the latter found by the checks (a pass that finds one starts again
in ``rows`` mode).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bigcat._memory import prefault, small_pages
from bigcat.stats.inputs import _Part
from bigcat.stats.statistics import _Settings
from bigcat.stats.tasks import _finalize_task, _fold_task, _init_task

__all__ = ["local_pass", "supports", "supports_sources"]

log = logging.getLogger("bigcat")


def supports(parts: list[_Part]) -> bool:
    """Whether every input is a CSR file whose arrays read in native byte order, all with the
    same dtypes (the read buffers are shared)."""
    return supports_sources([part.source for part in parts])


def supports_sources(sources: list[Any]) -> bool:
    """:func:`supports` for the inputs' :class:`~bigcat._io.source.MatrixSource` (``None``:
    an input read through Dask)."""
    dtypes = set()
    for source in sources:
        if source is None or source.encoding != "csr":
            return False
        x = source.root()[source.element]
        if not (x["data"].dtype.isnative and x["indices"].dtype.isnative):
            return False
        dtypes.add((x["data"].dtype, x["indices"].dtype))
    return len(dtypes) == 1


class _Unsorted(Exception):
    """An ``aligned`` pass met a row with unsorted or duplicated indices."""


@dataclass
class _Block:
    """Elements ``lo:hi`` of one input's X, in ``pieces`` (one per thread of a group)."""

    part: int
    lo: int
    hi: int
    rows: tuple[int, int]  # the rows holding those elements
    indptr: np.ndarray  # the rows' extents relative to ``lo``, clipped to the block
    codes: np.ndarray
    pieces: np.ndarray  # element edges of the pieces (absolute), len C + 1
    whole_rows: bool
    # per piece: its first and last index (for the checks across piece edges)
    ends: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.ends = np.full((len(self.pieces) - 1, 2), -1, dtype=np.int64)


def _chunk(source: Any) -> int | None:
    """The storage chunk of X's data and indices when bigcat's shard reader decodes them
    (then aligned blocks decode every chunk once), else ``None``."""
    from bigcat._io.backends import AnnDataZarr
    from bigcat._io.shards import ShardReader

    if not isinstance(source.backend, AnnDataZarr):  # HDF5 reads any range without decoding twice
        return None
    x = source.root()[source.element]
    data, indices = (ShardReader.for_array(x[name]) for name in ("data", "indices"))
    if data is None or indices is None or data.shards.chunk != indices.shards.chunk:
        return None
    return int(data.shards.chunk)


def _plan(parts: list[_Part], block_nnz: int, n_pieces: int, mode: str) -> list[_Block]:
    """The blocks of every input holding a selected cell, in storage order."""
    blocks = []
    for p, part in enumerate(parts):
        source = part.source
        assert source is not None
        indptr = np.asarray(source.indptr, dtype=np.int64)
        nnz = int(indptr[-1])
        chunk = _chunk(source) if mode == "aligned" else None
        if chunk is not None:
            step = max(chunk, round(block_nnz / chunk) * chunk)
            edges = np.r_[np.arange(0, nnz, step, dtype=np.int64), nnz]
        else:
            chunk = 1
            edges = indptr[source.row_bounds(block_nnz)]
        for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
            if hi <= lo:
                continue
            r0 = int(np.searchsorted(indptr, lo, side="right")) - 1
            r1 = int(np.searchsorted(indptr, hi, side="left"))
            codes = part.codes[r0:r1]
            if not (codes >= 0).any():
                continue
            n_chunks = -(-(hi - lo) // chunk)
            cuts = [lo + chunk * (n_chunks * i // n_pieces) for i in range(n_pieces)] + [hi]
            local = np.clip(indptr[r0 : r1 + 1], lo, hi) - lo
            whole = bool(indptr[r0] == lo and indptr[r1] == hi)
            blocks.append(_Block(p, lo, hi, (r0, r1), local, codes, np.minimum(cuts, hi), whole))
    return blocks


@dataclass
class _Group:
    """The ``C`` threads sharing one row partition: its blocks, accumulator, read buffers."""

    blocks: list[_Block]
    acc: dict
    slot: tuple[np.ndarray, np.ndarray]  # the read buffers (data, indices)
    barrier: threading.Barrier
    stop: threading.Event  # shared by every group: a thread failed, or the caller was interrupted
    canonical: dict = field(default_factory=dict)  # block position → its canonicalized arrays


def local_pass(
    parts: list[_Part],
    out: dict,
    edges: np.ndarray,
    n_row_parts: int,
    n_cells: np.ndarray,
    gene_map: np.ndarray,
    settings: _Settings,
    block_nnz: int,
    pool: Any,
    progress: Any = None,
) -> int:
    """Accumulate every input into ``out`` (the results, cluster ranges ``edges``), on
    ``n_row_parts`` groups of ``len(edges) - 1`` threads; returns the number of blocks.

    ``pool``: a :class:`bigcat._memory.BufferPool` the read buffers come from; ``progress``:
    a tqdm bar, given the number of blocks and advanced by one per block.
    """
    mode = "rows" if settings.normalize else "aligned"
    try:
        return _pass(parts, out, edges, n_row_parts, n_cells, gene_map, settings, block_nnz, pool, mode, progress)
    except _Unsorted:  # rows with unsorted indices: again (below, once the first pass' buffers are
        pass  # free), with blocks of whole rows, where they are summed
    for values in out.values():
        values.fill(0)
    return _pass(parts, out, edges, n_row_parts, n_cells, gene_map, settings, block_nnz, pool, "rows", progress)


def _pass(
    parts: list[_Part], out: dict, edges: np.ndarray, n_row_parts: int, n_cells: np.ndarray, gene_map: np.ndarray,
    settings: _Settings, block_nnz: int, pool: Any, mode: str, progress: Any,
) -> int:  # fmt: skip
    n_ranges = len(edges) - 1
    blocks = _plan(parts, block_nnz * (2 if n_ranges > 1 else 1), n_ranges, mode)
    if progress is not None:
        progress.reset(total=len(blocks))
    n_row_parts = max(1, min(n_row_parts, len(blocks)))
    largest = max((b.hi - b.lo for b in blocks), default=0)
    x = [part.source.root()[part.source.element] for part in parts]  # type: ignore[union-attr]
    dtypes = (x[0]["data"].dtype, _index_dtype(parts, x))
    groups = []
    stop = threading.Event()
    for r in range(n_row_parts):
        # untouched pages: each thread zeroes its own cluster range (see bigcat.stats.tasks.zeros)
        acc = out if r == 0 else {name: small_pages(a.shape, a.dtype) for name, a in out.items()}
        slot = (pool.take(largest, dtypes[0]), pool.take(largest, dtypes[1]))
        groups.append(_Group(blocks[r::n_row_parts], acc, slot, threading.Barrier(n_ranges), stop))
    failed: list[BaseException] = []

    running = [n_row_parts * n_ranges]
    lock, finished = threading.Lock(), threading.Event()

    def run(group: _Group, c: int) -> None:
        try:
            _walk(group, c, parts, x, edges, gene_map, settings, mode, progress)
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            failed.append(error)
            stop.set()
            for g in groups:
                g.barrier.abort()
        finally:
            with lock:
                running[0] -= 1
                if not running[0]:
                    finished.set()

    threads = [
        threading.Thread(target=run, args=(group, c), name=f"bigcat-stats-{r}-{c}", daemon=True)
        for r, group in enumerate(groups)
        for c in range(n_ranges)
    ]
    for thread in threads:
        thread.start()
    try:  # an event, not Thread.join: Ctrl-C during a join can leave a running thread marked stopped
        while not finished.wait(0.2):
            pass
    except BaseException:  # Ctrl-C: every thread stops after its current block
        stop.set()
        for g in groups:
            g.barrier.abort()
        finished.wait()
        raise
    finally:
        for thread in threads:
            thread.join()
    if failed:
        first = next((e for e in failed if not isinstance(e, threading.BrokenBarrierError)), failed[0])
        raise first
    if mode == "aligned" and not _edges_sorted(blocks, parts):
        raise _Unsorted
    for group in groups[1:]:
        for name, values in group.acc.items():
            out[name] += values
    for c in range(n_ranges):
        lo, hi = int(edges[c]), int(edges[c + 1])
        _finalize_task({name: a[lo:hi] for name, a in out.items()}, n_cells[lo:hi], settings)
    return len(blocks)


def _walk(
    group: _Group, c: int, parts: list[_Part], x: list[Any], edges: np.ndarray, gene_map: np.ndarray,
    settings: _Settings, mode: str, progress: Any,
) -> None:  # fmt: skip
    """Thread ``c`` of a group: zero its cluster range, then per block fold its range of the
    current block and decode its piece of the next."""
    lo_c, hi_c = int(edges[c]), int(edges[c + 1])
    views = _init_task(settings, hi_c - lo_c, 0, {name: a[lo_c:hi_c] for name, a in group.acc.items()})
    blocks, slot = group.blocks, group.slot
    # this thread's share of the read buffers' fresh pages, in one system call each: faulted
    # in one by one by the decoder they cost several times more on a VM (0.85 s of a 5.4 s
    # run at 5,000 clusters, whose buffers are 2 GB; docs/design.md)
    n_threads = group.barrier.parties
    for buffer in slot:
        prefault(buffer[len(buffer) * c // n_threads : len(buffer) * (c + 1) // n_threads])
    if blocks:
        _decode(blocks[0], c, parts, x, slot, mode)
    group.barrier.wait()
    for j, block in enumerate(blocks):
        if group.stop.is_set():
            return
        n = block.hi - block.lo
        arrays = (slot[0][:n], slot[1][:n], block.indptr)
        if mode == "rows" and not _block_sorted(block):
            if c == 0:
                group.canonical[j] = _canonical(parts[block.part], block, arrays)
            group.barrier.wait()
            arrays = group.canonical[j]
        _fold(views, block, arrays, gene_map, settings, lo_c, hi_c)
        if j + 1 < len(blocks):
            if n_threads > 1:  # every fold is done with the buffers before they are overwritten
                group.barrier.wait()
            _decode(blocks[j + 1], c, parts, x, slot, mode)
            if n_threads > 1:  # and the next block is whole before anyone folds it
                group.barrier.wait()
        if c == 0:
            group.canonical.pop(j, None)
        if progress is not None and c == 0:
            progress.update(1)


def _index_dtype(parts: list[_Part], x: list[Any]) -> np.dtype:
    """The column indices' dtype in the read buffers: the narrowest that holds every input's
    columns (uint16 below 65,537 genes) when every input's indices can be narrowed as they
    are decoded (:meth:`~bigcat._io.backends.Backend.narrows`), else the stored one. The
    blocks then take 6 bytes per value instead of 8 (12 with the int64 indices of more than
    2³¹ values) — memory, and bandwidth the decode and the fold share (docs/design.md)."""
    stored = np.dtype(x[0]["indices"].dtype)
    if not all(part.source.backend.narrows(xi["indices"]) for part, xi in zip(parts, x, strict=True)):  # type: ignore[union-attr]
        return stored
    columns = max(part.source.shape[1] for part in parts)  # type: ignore[union-attr]
    for dtype in (np.dtype(np.uint16), np.dtype(np.int32)):
        if columns - 1 <= np.iinfo(dtype).max and dtype.itemsize < stored.itemsize:
            return dtype
    return stored


def _decode(block: _Block, c: int, parts: list[_Part], x: list[Any], slot: tuple, mode: str) -> None:
    """Piece ``c`` of ``block``: its data and indices into ``slot``, its indices checked."""
    from bigcat._io.shards import DoesNotFit
    from bigcat.kernels import check_compressed

    a, b = int(block.pieces[c]), int(block.pieces[c + 1])
    if b <= a:
        return
    source = parts[block.part].source
    assert source is not None
    source.backend.read_into(x[block.part]["data"], a, b, slot[0][a - block.lo : b - block.lo])
    try:
        indices = source.backend.read_into(x[block.part]["indices"], a, b, slot[1][a - block.lo : b - block.lo])
    except DoesNotFit as error:  # narrowed as decoded: beyond every input's columns
        source.out_of_range(error.position, error.value, source.shape[1])
    local = np.clip(block.indptr, a - block.lo, b - block.lo) - (a - block.lo)
    bad, unsorted = check_compressed(indices, local, source.shape[1])
    if bad >= 0:
        source.out_of_range(a + int(bad), indices[bad], source.shape[1])
    if unsorted >= 0 and mode == "aligned":
        raise _Unsorted
    block.ends[c] = (indices[0], indices[-1]) if unsorted < 0 else (np.iinfo(np.int64).max, -1)


def _row_starts(indptr: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Whether each element position begins a row (``indptr``: a whole input's)."""
    row = np.searchsorted(indptr, positions, side="right") - 1
    return indptr[row] == positions


def _descends_across(starts: np.ndarray, stops: np.ndarray, ends: np.ndarray, indptr: np.ndarray) -> bool:
    """Whether a row continues from one piece (elements ``starts:stops``, in ``indptr``'s
    coordinates) into the next without its index increasing there (``ends``: each piece's
    first and last index); empty pieces and gaps between pieces (skipped blocks) are passed over."""
    keep = stops > starts
    starts, stops, ends = starts[keep], stops[keep], ends[keep]
    if len(starts) < 2:
        return False
    joined = starts[1:] == stops[:-1]
    inside = ~_row_starts(indptr, starts[1:])  # a row continues across the edge
    return bool((joined & inside & (ends[:-1, 1] >= ends[1:, 0])).any())


def _block_sorted(block: _Block) -> bool:
    """In ``rows`` mode, after the decodes: every piece sorted and no row descending across
    the pieces' edges (a piece that found a descent records first > last)."""
    if (block.ends[:, 0] == np.iinfo(np.int64).max).any():
        return False
    pieces = block.pieces - block.lo
    return not _descends_across(pieces[:-1], pieces[1:], block.ends, block.indptr)


def _edges_sorted(blocks: list[_Block], parts: list[_Part]) -> bool:
    """In ``aligned`` mode, after the pass: no row descends across any piece edge."""
    for p, part in enumerate(parts):
        mine = [b for b in blocks if b.part == p]
        if not mine:
            continue
        starts = np.concatenate([b.pieces[:-1] for b in mine])
        stops = np.concatenate([b.pieces[1:] for b in mine])
        ends = np.concatenate([b.ends for b in mine])
        indptr = np.asarray(part.source.indptr, dtype=np.int64)  # type: ignore[union-attr]
        if _descends_across(starts, stops, ends, indptr):
            return False
    return True


def _canonical(part: _Part, block: _Block, arrays: tuple) -> tuple:
    """A block of whole rows with unsorted or duplicated indices, sorted and summed as scipy does."""
    source = part.source
    assert source is not None
    data, indices, indptr = arrays
    matrix = source.compressed("csr", data.copy(), indices.copy(), indptr.copy(), block.rows[0], block.lo)
    return matrix.data, matrix.indices, matrix.indptr


def _fold(
    views: dict, block: _Block, arrays: tuple, gene_map: np.ndarray, settings: _Settings, lo_c: int, hi_c: int
) -> None:
    data, indices, indptr = arrays
    codes = block.codes
    if hi_c - lo_c == 0 or not ((codes >= lo_c) & (codes < hi_c)).any():
        return
    _fold_task(views, ("csr", data, indices, indptr, 0), codes, gene_map, None, settings, lo_c)
