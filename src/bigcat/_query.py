"""Reading query and reference cells: rows of selected genes, normalized, block by block,
as tasks on Dask (shared by :mod:`bigcat.mapping` and :mod:`bigcat.neighbors`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from bigcat.errors import BigcatInputError

__all__ = ["QUERY_BLOCK_NNZ"]

log = logging.getLogger("bigcat")

#: stored values per query block read by one task
QUERY_BLOCK_NNZ = 4_000_000


# --------------------------------------------------------------------------------------------
# reading rows of selected genes, normalized, block by block
# --------------------------------------------------------------------------------------------
#: the fraction of the reference's marker genes a query must hold: below it the mapping is
#: refused (a query of another species or gene-naming scheme), below ``WARN_OVERLAP`` warned
MIN_OVERLAP = 0.5
WARN_OVERLAP = 0.9


def _check_overlap(query: Any, reference: Any, n_found: int, n_markers: int) -> None:
    """Refuse, or warn about, a query that lacks most of the reference's marker genes: a
    mapping over 14 of 1,000 markers reported a median score of 0.73 as if all were well."""
    fraction = n_found / max(n_markers, 1)
    if fraction < MIN_OVERLAP:
        msg = (
            f"{query}: only {n_found} of the reference's {n_markers} marker genes ({fraction:.1%}) are in the query; "
            f"is {reference} a reference for these cells (same species, same gene names)?"
        )
        raise BigcatInputError(msg)
    if fraction < WARN_OVERLAP:
        log.warning(
            "%s: %d of the reference's %d marker genes (%.1f%%) are in the query; the others are left out",
            query,
            n_found,
            n_markers,
            100 * fraction,
        )


def _gene_columns(source: Any, genes: Sequence[str], what: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``genes`` in ``source`` and which of ``genes`` were found."""
    names = pd.Index(np.asarray(source.var_names()).astype(str))
    if names.has_duplicates:
        names = pd.Index(pd.Series(names).where(~names.duplicated(), None))
    positions = names.get_indexer(pd.Index(np.asarray(genes).astype(str)))
    found = positions >= 0
    if not found.any():
        msg = f"{source.path}: none of the {len(genes)} {what} genes is in its var names (e.g. {genes[0]!r})"
        raise BigcatInputError(msg)
    return positions[found], found


def _selected(block: Any, columns: np.ndarray, normalize: bool, path: Any) -> sp.csr_matrix:
    """``block``'s rows on ``columns`` as float32 CSR; log2 CPM from whole-cell totals if asked."""
    block = sp.csr_matrix(block)
    picked = block[:, columns]
    if normalize:
        if block.nnz and block.data.min() < 0:
            msg = f"{path}: X has negative values: log2 CPM needs raw counts"
            raise BigcatInputError(msg)
        totals = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
        scale = np.divide(1e6, totals, out=np.zeros_like(totals), where=totals > 0)
        picked.data = np.log2(picked.data * np.repeat(scale, np.diff(picked.indptr)) + 1.0)
    return picked.astype(np.float32, copy=False)


def _rows(source: Any, start: int, stop: int, columns: np.ndarray, normalize: bool) -> np.ndarray:
    """Rows ``start:stop`` on ``columns`` as a dense float32 block (log2 CPM if asked)."""
    return _selected(source.read_rows(start, stop), columns, normalize, source.path).toarray()


def _open(data: Any, storage_options: dict | None) -> Any:
    from bigcat._io.source import open_source

    if hasattr(data, "read_rows"):
        return data
    return open_source(data, storage_options=storage_options)


def _run_blocks(function: Any, bounds: np.ndarray, shared: Any, client: Any, *args: Any,
                progress: bool | None = None, desc: str = "map") -> list:  # fmt: skip
    """``function(shared, start, stop, *args)`` for every row block, in parallel, in order,
    with a bar of cells done.

    ``shared`` (the reference profiles or index) goes to the workers once: scattered to
    every worker of a ``client``, or one key of the graph otherwise.
    """
    import dask
    from dask.callbacks import Callback

    from bigcat.progress import progress_bar

    pairs = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
    with progress_bar(total=int(bounds[-1] - bounds[0]), unit="cells", desc=desc, enabled=progress) as bar:
        if client is not None:
            from bigcat._scheduling import STALL_TIMEOUT, gather, stall_error
            from bigcat.cluster import capacity, use_workers

            # the workers the cluster will have have joined before the profiles are broadcast
            with use_workers(client, min(capacity(client).workers, max(len(pairs), 1)), what="mapping"):
                try:  # waits for a running worker (not one paused at its memory limit)
                    [handle] = client.scatter([shared], broadcast=True, hash=False, timeout=STALL_TIMEOUT)
                except (TimeoutError, ValueError) as error:  # ValueError: replicating to no running worker
                    raise stall_error(client, "mapping") from error
                futures = [client.submit(function, handle, a, b, *args, pure=False) for a, b in pairs]
                return gather(client, futures, what="mapping", done=lambda i: bar.update(pairs[i][1] - pairs[i][0]))
        handle = dask.delayed(shared, traverse=False)
        tasks = [dask.delayed(function, pure=False)(handle, a, b, *args) for a, b in pairs]
        cells = {task.key: b - a for task, (a, b) in zip(tasks, pairs, strict=True)}
        with Callback(posttask=lambda key, *_: bar.update(cells.get(key, 0))):
            return list(dask.compute(*tasks, scheduler="threads"))


# --------------------------------------------------------------------------------------------
# correlation mapping
# --------------------------------------------------------------------------------------------
