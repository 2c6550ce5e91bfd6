"""Statistics of the coarser levels of a taxonomy, by adding the clusters' accumulators."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bigcat.errors import BigcatInputError
from bigcat.stats.formats import read_stats
from bigcat.stats.statistics import ACCUMULATORS, NEEDS, count_dtype, extra_present_names

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["rollup"]


def rollup(
    stats: Any,
    taxonomy: Any,
    level: str | None = None,
    *,
    cluster_column: str = "cluster",
    storage_options: dict | None = None,
) -> xr.Dataset | dict[str, xr.Dataset]:
    """Statistics of a taxonomy's coarser levels (supertype, subclass, class…), exactly.

    Sums, squared sums and presence counts add over the clusters of a group, so every
    statistic of a group is what :func:`bigcat.cluster_stats` gives for its cells, with no
    pass over the cells.

    Parameters
    ----------
    stats
        A result of :func:`bigcat.cluster_stats` (or a path :func:`bigcat.read_stats` reads)
        holding the accumulators (``sums``, ``sqr_sums``, presence counts, ``nnz``) of the
        statistics wanted at the coarser levels.
    taxonomy
        A table (DataFrame, CSV or Parquet) with a ``cluster_column`` and a column per level.
    level
        One level (a column of the table): its Dataset. ``None``: a Dataset for every level.

    Returns
    -------
    xarray.Dataset, or a dict of them by level
        Dims ``(cluster, gene)`` where ``cluster`` holds the level's groups (in order of
        first appearance in the table), with the statistics recomputed from the summed
        accumulators and the attributes of ``stats`` (``attrs["rollup_level"]`` names the level).

    Raises
    ------
    BigcatInputError
        A cluster of ``stats`` with cells missing from the table, a cluster in two groups of
        a level, or no accumulators to add.
    """
    import xarray as xr

    ds = stats if isinstance(stats, xr.Dataset) else read_stats(stats, storage_options)
    table = _table(taxonomy, storage_options)
    where = "the taxonomy" if isinstance(taxonomy, pd.DataFrame) else str(taxonomy)
    if cluster_column not in table.columns:
        msg = f"{where}: no {cluster_column!r} column (columns: {', '.join(map(str, table.columns))})"
        raise BigcatInputError(msg)
    levels = [c for c in table.columns if c != cluster_column] if level is None else [level]
    for name in levels:
        if name not in table.columns:
            msg = f"{where}: no level {name!r} (columns: {', '.join(map(str, table.columns))})"
            raise BigcatInputError(msg)
    out = {name: _rollup_level(ds, table, cluster_column, name, where) for name in levels}
    return out[level] if level is not None else out


def _table(taxonomy: Any, storage_options: dict | None) -> pd.DataFrame:
    from bigcat._io.tables import read_table

    return read_table(taxonomy, storage_options, what="taxonomy table")


def _rollup_level(ds: xr.Dataset, table: pd.DataFrame, cluster_column: str, level: str, where: str) -> xr.Dataset:
    from bigcat.stats.api import _result

    pairs = table[[cluster_column, level]].astype(str).drop_duplicates()
    twice = pairs[cluster_column][pairs[cluster_column].duplicated()]
    if len(twice):
        msg = f"{where}: cluster {twice.iloc[0]!r} is in more than one {level}"
        raise BigcatInputError(msg)
    parent = pd.Series(pairs[level].to_numpy(), index=pairs[cluster_column].to_numpy())
    clusters = np.asarray(ds["cluster"].values).astype(str)
    n_cells = np.asarray(ds["n_cells"].values, dtype=np.int64)
    missing = [c for c, n in zip(clusters, n_cells, strict=True) if n > 0 and c not in parent.index]
    if missing:
        msg = f"{where}: {len(missing)} cluster(s) with cells have no {level} (e.g. {missing[0]!r})"
        raise BigcatInputError(msg)
    groups = pd.Index(pd.unique(pairs[level].to_numpy()))
    of = np.full(len(clusters), -1, dtype=np.int64)
    known = np.isin(clusters, parent.index)
    of[known] = groups.get_indexer(parent[clusters[known]].to_numpy())
    extra = [f"present_counts_{t}" for t in extra_present_names(ds)]
    names = [a for a in (*ACCUMULATORS, *extra) if a in ds]
    if not names:
        msg = "rollup needs the accumulators (sums, sqr_sums, presence counts or nnz) of the statistics"
        raise BigcatInputError(msg)
    totals = np.zeros(len(groups), dtype=np.int64)
    np.add.at(totals, of[of >= 0], n_cells[of >= 0])
    counts = count_dtype(int(totals.max(initial=0)))
    acc = {}
    for name in names:
        values = np.asarray(ds[name].values)
        dtype = np.float64 if values.dtype.kind == "f" else counts
        summed = np.zeros((len(groups), values.shape[1]), dtype=dtype)
        for row in np.flatnonzero(of >= 0):  # one cluster row at a time: no clusters × genes temporary
            summed[of[row]] += values[row].astype(dtype, copy=False)
        acc[name] = summed
    stats = [s for s in str(ds.attrs.get("stats", "")).split(",") if s and all(a in acc for a in NEEDS[s])]
    attrs = {**ds.attrs, "stats": ",".join(stats), "rollup_level": level}
    return _result(acc, totals, groups, pd.Index(ds["gene"].values), stats, attrs)
