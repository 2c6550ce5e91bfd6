"""The ``groupby`` engine: xarray groupby with flox over densified blocks (the reference)."""

from __future__ import annotations

from typing import Any

import numpy as np

from bigcat.stats.inputs import _Part
from bigcat.stats.statistics import ACCUMULATOR_TABLE, EXTRA, _Settings, passes
from bigcat.stats.tasks import _check_counts

__all__ = []


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
        x = part.array if part.array is not None else open_dataset(part.source.path)["X"].data  # type: ignore[union-attr]
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
    for name in settings.accumulators:
        if name != EXTRA:
            lazy[name] = ACCUMULATOR_TABLE[name].term(values, settings).groupby(group).sum()
    for name, test_threshold, test_ge in settings.extra:
        lazy[f"present_counts_{name}"] = passes(values, test_threshold, test_ge).groupby(group).sum()
    computed = dict(zip(lazy, _compute_with_progress(list(lazy.values()), client, progress), strict=True))
    acc = {}
    for name, result in computed.items():
        result = result.reindex(cluster_code=np.arange(n_clusters, dtype=float), fill_value=0)
        dtype = settings.dtype("present_counts" if name.startswith("present_counts_") else name)
        acc[name] = np.ascontiguousarray(result.transpose("cluster_code", "gene").values, dtype=dtype)
    return acc


def _compute_with_progress(collections: list, client: Any, progress: bool | None) -> list:
    """``dask.compute`` of ``collections`` with a bar of tasks done (in this process) or of
    results done (on a cluster, waited for as :func:`bigcat._scheduling.completed` waits)."""
    import dask
    from dask.callbacks import Callback

    from bigcat.progress import progress_bar

    if client is not None:
        from bigcat._scheduling import gather

        futures = client.compute(collections)
        with progress_bar(total=len(futures), unit="statistics", desc="stats", enabled=progress) as bar:
            return gather(client, futures, what="cluster statistics (groupby engine)", done=lambda _: bar.update(1))
    with progress_bar(total=0, unit="tasks", desc="stats", enabled=progress) as bar:  # total: when it starts

        def start_state(graph: Any, state: dict) -> None:
            bar.reset(total=len(graph) - len(state["cache"]))  # literals are not run

        with Callback(start_state=start_state, posttask=lambda *_: bar.update(1)):
            return list(dask.compute(*collections))
