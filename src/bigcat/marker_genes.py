"""Marker genes from cluster statistics: which genes tell each cluster apart.

The score follows the idea behind scrattch.hicat's marker selection (``de_score``: a gene
is a good marker when it is present in many of the cluster's cells, rarely elsewhere, and
its expression is clearly higher), computed one cluster against the strongest competitor
for each gene:

- ``present`` = :math:`q_{in}`, the fraction of the cluster's cells where the gene is
  present; ``present_other`` = :math:`q_{out}`, the highest such fraction in any *other*
  cluster;
- ``q_diff`` = :math:`(q_{in} - q_{out}) / \\max(q_{in}, q_{out})` (scrattch's ``q.diff``;
  1 when the gene is present in no other cluster, 0 when both are 0);
- ``lfc`` = log-scale mean in the cluster minus the highest log-scale mean of any other
  cluster (the ``runner_up``); a log fold change against the closest cluster;
- ``score`` = :math:`\\max(q_{diff}, 0) \\times \\max(lfc, 0)`.

Genes are ranked by ``score`` (ties: larger ``lfc``, then gene order); genes with a score
of 0 are not markers, so a cluster may have fewer than ``top``. Clusters without cells
are skipped and are nobody's competitor.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bigcat.errors import BigcatInputError

__all__ = ["load_stats", "lookup", "markers"]

#: genes per slab when finding each gene's two highest clusters (bounds temporary memory)
GENE_SLAB = 4096


def load_stats(stats: Any, storage_options: dict | None = None) -> tuple[Any, str]:
    """``(Dataset, name for messages)`` from a statistics Dataset or the path of one.

    Only ``n_cells``, ``means`` and ``present`` are kept, loaded in memory once (a lazy
    ``.zarr`` result would otherwise be read again by every step).
    """
    import xarray as xr

    from bigcat.stats import read_stats

    if isinstance(stats, xr.Dataset):
        ds, source = stats, "the statistics"
    else:
        ds, source = read_stats(stats, storage_options), str(stats)
    keep = [name for name in ("n_cells", "means", "present") if name in ds]
    return ds[keep].load(), source


def lookup(available: Sequence[Any], wanted: Sequence[Any], kind: str, source: str) -> np.ndarray:
    """Positions of ``wanted`` in ``available`` (compared as strings).

    Raises a :class:`~bigcat.errors.BigcatInputError` naming every unknown name with its
    closest matches.
    """
    index = pd.Index([str(v) for v in available])
    if index.has_duplicates:
        index = index.drop_duplicates()  # first occurrence wins, as get_indexer needs unique
    names = [str(w) for w in wanted]
    positions = index.get_indexer(names)
    missing = [n for n, p in zip(names, positions, strict=True) if p < 0]
    if missing:
        parts = []
        folded = pd.Series(index.tolist(), index=index.str.casefold())
        for name in missing[:5]:
            same = folded.get(name.casefold())  # most often just the case: Sst for SST
            close = [same] if isinstance(same, str) else list(same) if same is not None else []
            close += [c for c in difflib.get_close_matches(name, index.tolist(), n=3, cutoff=0.6) if c not in close]
            close = close[:3]
            parts.append(f"{name!r}" + (f" (close matches: {', '.join(close)})" if close else " (no close match)"))
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        msg = f"{source}: unknown {kind} {'; '.join(parts)}{more}"
        raise BigcatInputError(msg)
    return positions


def log_means(ds: Any, scale: str | None) -> tuple[np.ndarray, str]:
    """Cluster means on a log scale, and which scale ``scale=None`` chose.

    ``"log"``: the statistics were computed on log data (``normalize="log2cpm"``, or data
    stored as log2(CPM+1)); used as they are. ``"linear"``: means of counts or linear
    values; ``log2(mean + 1)`` is taken. ``None``: ``"log"`` when the statistics record
    ``normalize="log2cpm"``, ``"linear"`` otherwise.
    """
    if scale is None:
        scale = "log" if ds.attrs.get("normalize") == "log2cpm" else "linear"
    if scale not in ("log", "linear"):
        msg = f"scale must be 'log', 'linear' or None, not {scale!r}"
        raise BigcatInputError(msg)
    means = np.asarray(ds["means"].values, dtype=np.float64)
    return (means if scale == "log" else np.log2(np.maximum(means, 0) + 1)), scale


def _two_highest(values: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per gene (column): the highest value, its row, and the second highest (-inf if none)."""
    n_genes = values.shape[1]
    best = np.full(n_genes, -np.inf)
    where = np.zeros(n_genes, dtype=np.int64)
    second = np.full(n_genes, -np.inf)
    rows = np.flatnonzero(valid)
    if len(rows) == 0:
        return best, where, second
    for lo in range(0, n_genes, GENE_SLAB):
        slab = values[rows, lo : lo + GENE_SLAB]
        slab = np.where(np.isnan(slab), -np.inf, slab)
        order = np.argmax(slab, axis=0)
        cols = np.arange(slab.shape[1])
        best[lo : lo + GENE_SLAB] = slab[order, cols]
        where[lo : lo + GENE_SLAB] = rows[order]
        if len(rows) > 1:
            slab[order, cols] = -np.inf
            second[lo : lo + GENE_SLAB] = slab.max(axis=0)
    return best, where, second


def markers(
    stats: Any,
    top: int = 10,
    *,
    clusters: Sequence[Any] | None = None,
    min_present: float = 0.0,
    scale: str | None = None,
    storage_options: dict | None = None,
) -> pd.DataFrame:
    """The top marker genes of each cluster, ranked by a specificity score.

    Parameters
    ----------
    stats
        A result of :func:`bigcat.cluster_stats` or the path/URL of one written by
        :func:`bigcat.write_stats` (``.zarr``, ``.h5ad``, long ``.parquet``/``.csv``). Needs
        ``means`` and ``present``.
    top
        Markers per cluster (at most).
    clusters
        Report these clusters only (names; compared as strings). Every cluster still
        counts as a competitor.
    min_present
        Only genes present in at least this fraction of the cluster's cells (scrattch's
        ``q1.th``; e.g. 0.5).
    scale
        How to put means on a log scale: see :func:`log_means` (default: from the
        statistics' ``normalize`` attribute).
    storage_options
        fsspec options when ``stats`` is a URL.

    Returns
    -------
    pandas.DataFrame
        One row per (cluster, rank): ``cluster``, ``rank`` (1 = best), ``gene``, ``score``,
        ``lfc``, ``q_diff``, ``present``, ``present_other``, ``mean``, ``mean_other`` (log
        scale) and ``runner_up`` (the other cluster with the highest mean). Clusters in
        the statistics' order (or as given).

    Notes
    -----
    The definitions are in this module's docstring. Cost: two passes over the clusters ×
    genes ``means`` and ``present`` matrices, in slabs of genes.
    """
    ds, source = load_stats(stats, storage_options)
    for name in ("means", "present"):
        if name not in ds:
            msg = f"{source}: markers need the '{name}' statistic (compute it with --stats means,present)"
            raise BigcatInputError(msg)
    if top < 1:
        msg = f"top must be at least 1, not {top}"
        raise BigcatInputError(msg)
    labels = ds["cluster"].values
    genes = ds["gene"].values
    lm, _ = log_means(ds, scale)
    present = np.asarray(ds["present"].values, dtype=np.float64)
    valid = np.asarray(ds["n_cells"].values) > 0
    best_m, where_m, second_m = _two_highest(lm, valid)
    best_p, where_p, second_p = _two_highest(present, valid)
    rows = np.flatnonzero(valid) if clusters is None else lookup(labels, clusters, "cluster", source)
    frames = []
    for c in rows:
        if not valid[c]:
            continue
        m_in, q_in = lm[c], present[c]
        m_out = np.where(where_m == c, second_m, best_m)
        q_out = np.where(where_p == c, second_p, best_p)
        m_out = np.where(np.isfinite(m_out), m_out, 0.0)  # no competitor: compare with nothing
        q_out = np.where(np.isfinite(q_out), q_out, 0.0)
        lfc = m_in - m_out
        denominator = np.maximum(q_in, q_out)
        with np.errstate(invalid="ignore", divide="ignore"):
            q_diff = np.where(denominator > 0, (q_in - q_out) / denominator, 0.0)
        score = np.maximum(q_diff, 0) * np.maximum(lfc, 0)
        score = np.where(np.isfinite(score), score, 0.0)
        keep = np.flatnonzero((score > 0) & (q_in >= min_present))
        if len(keep) > top:
            # the top scores, then ties resolved exactly by lexsort below
            cut = np.partition(score[keep], len(keep) - top)[len(keep) - top]
            keep = keep[score[keep] >= cut]
        order = keep[np.lexsort((keep, -lfc[keep], -score[keep]))][:top]
        runner_up = np.full(len(order), None, dtype=object)
        if valid.sum() > 1:  # the other cluster with the highest mean, for each marker
            others = lm[:, order].copy()
            others[~valid] = -np.inf
            others[c] = -np.inf
            runner_up = labels[np.argmax(others, axis=0)].astype(object)
        frames.append(
            pd.DataFrame(
                {
                    "cluster": np.repeat(np.asarray([labels[c]], dtype=object), len(order)),
                    "rank": np.arange(1, len(order) + 1),
                    "gene": genes[order].astype(object),
                    "score": score[order],
                    "lfc": lfc[order],
                    "q_diff": q_diff[order],
                    "present": q_in[order],
                    "present_other": q_out[order],
                    "mean": m_in[order],
                    "mean_other": m_out[order],
                    "runner_up": runner_up,
                }
            )
        )
    columns = ["cluster", "rank", "gene", "score", "lfc", "q_diff", "present", "present_other", "mean"]
    columns += ["mean_other", "runner_up"]
    if not frames:
        return pd.DataFrame({c: [] for c in columns})
    return pd.concat(frames, ignore_index=True)[columns]


def write_table(
    table: pd.DataFrame, path: str | os.PathLike, *, overwrite: bool = False, storage_options: dict | None = None
) -> Path | str:
    """Write a table to ``.csv`` or ``.parquet``, atomically."""
    from bigcat._io import fs
    from bigcat._io.publish import publish

    suffix = fs.suffix_of(path)
    if suffix not in (".csv", ".parquet"):
        msg = f"{path}: unknown table type {suffix or '(none)'!r}; use .csv or .parquet"
        raise BigcatInputError(msg)
    target = fs.path_of(path)
    frame = table.copy()
    for column in ("cluster", "runner_up"):
        if column in frame:
            frame[column] = frame[column].map(lambda v: None if v is None else str(v))
    with publish(target, overwrite=overwrite, storage_options=storage_options, kind="file") as tmp:
        if suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:  # the file metadata names bigcat (``--overwrite`` replaces only files bigcat wrote)
            import pyarrow as pa
            import pyarrow.parquet as pq

            arrow = pa.Table.from_pandas(frame, preserve_index=False)
            pq.write_table(arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), b"bigcat": b"{}"}), tmp)
    return target
