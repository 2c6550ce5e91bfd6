"""Cluster labels: external tables, codes, cell and gene selections, per-cluster subsampling."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bigcat.errors import BigcatFormatError, BigcatInputError, InputNotFoundError

if TYPE_CHECKING:
    pass


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
