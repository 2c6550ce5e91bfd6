"""Which cluster pairs to test: every pair, each cluster's nearest clusters, a table, or siblings
in a taxonomy. Clusters with fewer than ``min_cells`` cells take no part, as in scrattch.bigcat."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from bigcat._io.tables import read_table
from bigcat.errors import BigcatInputError

__all__ = ["resolve_pairs"]

#: principal components of the cluster means used for nearest-cluster pairs
CENTROID_COMPONENTS = 50


def resolve_pairs(
    pairs: Any, clusters: pd.Index, n_cells: np.ndarray, means: np.ndarray, *, min_cells: int, source: str,
    storage_options: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``(P1, P2)`` as row positions in ``clusters``, in the order the pairs are reported.

    ``pairs``: ``"all"`` (every unordered pair of names, P1 < P2, in scrattch's
    ``create_pairs`` order: by P1 then P2, names sorted as strings); ``"neighbors:K"`` (each
    cluster with its ``K`` nearest clusters by the distance of their means in the space of
    their first principal components; each pair once); ``"siblings:TABLE"`` or
    ``"siblings:TABLE:COLUMN"`` (clusters sharing a parent: ``TABLE`` is a CSV/Parquet
    taxonomy with a ``cluster`` column, the parent the column before it unless named); a
    table (DataFrame or CSV/Parquet path) with columns ``P1`` and ``P2``.
    """
    taking_part = (n_cells >= min_cells) & (n_cells > 0)
    if isinstance(pairs, str) and pairs == "all":
        names = np.asarray(clusters, dtype=str)
        order = np.array(sorted(np.flatnonzero(taking_part), key=lambda i: names[i]), dtype=np.int64)
        first, second = np.triu_indices(len(order), k=1)
        p1, p2 = order[first], order[second]
    elif isinstance(pairs, str) and pairs.startswith("neighbors:"):
        p1, p2 = _neighbor_pairs(pairs, clusters, means, taking_part)
    elif isinstance(pairs, str) and pairs.startswith("siblings:"):
        p1, p2 = _sibling_pairs(pairs, clusters, taking_part, storage_options)
    else:
        p1, p2 = _table_pairs(pairs, clusters, taking_part, source, storage_options)
    if len(p1) == 0:
        msg = f"{source}: no pair of clusters with at least {min_cells} cells each to test"
        raise BigcatInputError(msg)
    return p1, p2


def _neighbor_pairs(spec: str, clusters: pd.Index, means: np.ndarray, taking_part: np.ndarray) -> tuple:
    try:
        k = int(spec.split(":", 1)[1])
    except ValueError:
        k = 0
    if k < 1:
        msg = f"pairs={spec!r}: use neighbors:K with K ≥ 1 (scrattch uses 4)"
        raise BigcatInputError(msg)
    rows = np.flatnonzero(taking_part)
    if len(rows) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    coords = centroid_coordinates(means, rows)
    sq = (coords**2).sum(axis=1)
    dist = sq[:, None] + sq[None, :] - 2 * coords @ coords.T
    np.fill_diagonal(dist, np.inf)
    k = min(k, len(rows) - 1)
    nearest = np.argsort(dist, axis=1, kind="stable")[:, :k]
    names = np.asarray(clusters, dtype=str)[rows]
    found = set()
    for a in range(len(rows)):
        for b in nearest[a]:
            lo, hi = (a, b) if names[a] < names[b] else (b, a)
            found.add((int(lo), int(hi)))
    ordered = sorted(found, key=lambda ab: (names[ab[0]], names[ab[1]]))
    return rows[[a for a, _ in ordered]], rows[[b for _, b in ordered]]


def centroid_coordinates(means: np.ndarray, rows: np.ndarray, n_components: int = CENTROID_COMPONENTS) -> np.ndarray:
    """The clusters ``rows`` in the space of the first principal components of their means
    (randomized SVD with a fixed seed: seconds for thousands of clusters × all genes)."""
    from sklearn.utils.extmath import randomized_svd

    x = means[rows]  # a copy (fancy index): cleaned and centred in place, no second full-size copy
    np.nan_to_num(x, copy=False)
    x -= x.mean(axis=0)
    n = max(1, min(n_components, len(rows) - 1, x.shape[1]))
    u, s, _ = randomized_svd(x, n, n_iter=4, random_state=0)
    return u * s


def _sibling_pairs(spec: str, clusters: pd.Index, taking_part: np.ndarray, storage_options: dict | None) -> tuple:
    body = spec.split(":", 1)[1]
    path, _, column = body.rpartition(":") if body.count(":") and not _exists(body) else (body, "", "")
    table = read_table(path, storage_options, what="taxonomy table")
    if "cluster" not in table.columns:
        msg = f"{path}: a taxonomy table needs a 'cluster' column (and its parent's)"
        raise BigcatInputError(msg)
    columns = list(table.columns)
    parent = column or (columns[columns.index("cluster") - 1] if columns.index("cluster") > 0 else "")
    if parent not in table.columns:
        msg = f"{path}: no parent column {parent or '(none before cluster)'!r}; name it as siblings:TABLE:COLUMN"
        raise BigcatInputError(msg)
    position = pd.Series(np.arange(len(clusters)), index=np.asarray(clusters, dtype=str))
    table = table.assign(cluster=table["cluster"].astype(str))
    table = table[table["cluster"].isin(position.index)]
    p1, p2 = [], []
    names = np.asarray(clusters, dtype=str)
    for _, group in table.groupby(parent, sort=True):
        rows = sorted({int(position[c]) for c in group["cluster"] if taking_part[position[c]]}, key=lambda i: names[i])
        for a in range(len(rows)):
            for b in range(a + 1, len(rows)):
                p1.append(rows[a])
                p2.append(rows[b])
    return np.asarray(p1, dtype=np.int64), np.asarray(p2, dtype=np.int64)


def _table_pairs(
    pairs: Any, clusters: pd.Index, taking_part: np.ndarray, source: str, storage_options: dict | None
) -> tuple:
    where = str(pairs) if isinstance(pairs, (str, os.PathLike)) else "the pairs table"
    named = isinstance(pairs, (str, os.PathLike))
    table = read_table(pairs, storage_options, what="table of pairs") if named else pd.DataFrame(pairs)
    if not {"P1", "P2"} <= set(table.columns):
        msg = f"{where}: a pairs table needs columns P1 and P2"
        raise BigcatInputError(msg)
    position = pd.Series(np.arange(len(clusters)), index=np.asarray(clusters, dtype=str))
    p1_names, p2_names = table["P1"].astype(str).to_numpy(), table["P2"].astype(str).to_numpy()
    unknown = sorted(set(p1_names) - set(position.index) | set(p2_names) - set(position.index))
    if unknown:
        msg = f"{where}: {len(unknown)} cluster(s) not in {source} (e.g. {unknown[0]!r})"
        raise BigcatInputError(msg)
    p1, p2 = position[p1_names].to_numpy(), position[p2_names].to_numpy()
    keep = taking_part[p1] & taking_part[p2] & (p1 != p2)
    return p1[keep].astype(np.int64), p2[keep].astype(np.int64)


def _exists(path: str) -> bool:
    from bigcat._io import fs

    return fs.exists(path)
