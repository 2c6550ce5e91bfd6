"""Cluster labels: external tables, codes, cell and gene selections, per-cluster subsampling."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bigcat.errors import BigcatFormatError, BigcatInputError, InputNotFoundError
from bigcat.stats.inputs import _Part

__all__ = ["Labelled", "resolve_codes"]

log = logging.getLogger("bigcat")


def _read_labels_table(
    path: str | os.PathLike, label_column: str | None, cell_column: str | None, storage_options: dict | None = None
) -> pd.Series:
    from bigcat._io import fs

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


@dataclass
class Labelled:
    """Every input cell's cluster, as :func:`resolve_codes` finds it."""

    codes: np.ndarray  # int32 per cell over all inputs, -1 = left out
    clusters: pd.Index  # the clusters with at least one cell, in label order
    n_cells: np.ndarray  # int64 per cluster
    by: str  # what the labels came from (recorded in the result)
    unlabelled: int  # cells without a label
    attrs: dict = field(default_factory=dict)  # labels_unmatched, for a labels table


def resolve_codes(
    parts: list[_Part],
    by: Any,
    *,
    labels: str | os.PathLike | None = None,
    label_column: str | None = None,
    cell_column: str | None = None,
    cells: Any = None,
    max_cells_per_cluster: int | None = None,
    seed: int = 0,
    storage_options: dict | None = None,
) -> Labelled:
    """Each cell's cluster code, from a labels table, an obs column or an array of labels;
    the ``cells`` selection and per-cluster subsampling applied; clusters without a cell
    dropped. Sets each part's ``codes``; warns once about unlabelled cells and table rows
    for cells not in the data; refuses when no cell is left."""
    n_total = sum(p.n_cells for p in parts)
    attrs: dict[str, Any] = {}
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
    elif isinstance(by, str):
        codes, clusters = _factorize([p.labels for p in parts])
        by_desc = by
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
    where = ", ".join(p.name for p in parts)
    if len(clusters) == 0:
        if cells is not None:
            msg = f"{where}: none of the selected cells has a cluster label in {by_desc!r}"
        else:
            msg = f"{where}: no cell has a cluster label in {by_desc!r} (all {n_total} are missing)"
        raise BigcatInputError(msg)
    if unlabelled:  # one line (after the error for none at all, which says it alone)
        log.warning("%s: %d of %d cells have no label in %s and are left out", where, unlabelled, n_total, by_desc)
    offset = 0
    for part in parts:
        part.codes = codes[offset : offset + part.n_cells]
        offset += part.n_cells
    return Labelled(codes, clusters, n_cells, by_desc, unlabelled, attrs)
