"""Merging clusters that are not distinct, from their statistics alone (scrattch.bigcat's ``merge_cl``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from bigcat.de.engine import Thresholds, prepare, run_chunks
from bigcat.de.inputs import DEInput, load_de_input
from bigcat.de.pairs import centroid_coordinates
from bigcat.errors import BigcatInputError

__all__ = ["MergeResult", "merge_clusters"]

log = logging.getLogger("bigcat")

#: principal components of the cluster means in which clusters are neighbours
COMPONENTS = 50


@dataclass
class MergeResult:
    """``mapping``: old cluster → new cluster (a table, one row per old cluster); ``stats``: the
    merged statistics (accumulators added: exact); ``scores``: the last DE score of every pair
    that was tested and kept apart."""

    mapping: pd.DataFrame
    stats: Any
    scores: pd.DataFrame


class _Clusters:
    """The clusters as they merge: accumulators added, centroids weighted, neighbours kept."""

    def __init__(self, data: DEInput, n_components: int) -> None:
        self.data = data
        self.alive = np.flatnonzero(data.n_cells > 0)
        coords = centroid_coordinates(data.means, self.alive, n_components)
        self.centroids = np.zeros((len(data.n_cells), coords.shape[1]))
        self.centroids[self.alive] = coords
        names = np.asarray(data.clusters, dtype=str)
        numeric = all(name.lstrip("-").isdigit() for name in names)
        #: scrattch's cluster ids: a merged pair keeps the smaller one
        self.ids = np.array([int(n) for n in names]) if numeric else np.arange(len(names))
        self.owner = np.arange(len(names))  # which surviving cluster each original one is in now

    def merge(self, keep: int, gone: int) -> None:
        """``gone`` into ``keep``: sizes and counts add, means are the weighted means (the tests
        of the next rounds use these; the merged statistics returned are added exactly)."""
        n, data = self.data.n_cells, self.data
        total = n[keep] + n[gone]
        w_keep, w_gone = n[keep] / total, n[gone] / total
        self.centroids[keep] = self.centroids[keep] * w_keep + self.centroids[gone] * w_gone
        data.means[keep] = data.means[keep] * w_keep + data.means[gone] * w_gone
        if data.sqr_means is not None:
            data.sqr_means[keep] = data.sqr_means[keep] * w_keep + data.sqr_means[gone] * w_gone
        data.present_counts[keep] += data.present_counts[gone]
        n[keep] = total
        n[gone] = 0
        self.owner[self.owner == gone] = keep
        self.alive = self.alive[self.alive != gone]

    def nearest_pairs(self, k: int, among: np.ndarray | None = None, to: np.ndarray | None = None) -> list:
        """scrattch's ``get_knn_pairs``: each of ``among`` with its ``k`` nearest of ``to`` (self
        pairs dropped), as (smaller id, larger id), once, most similar first."""
        among = self.alive if among is None else among
        to = self.alive if to is None else to
        a, b = self.centroids[among], self.centroids[to]
        dist = np.sqrt(np.maximum((a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T, 0))
        k = min(k, len(to))
        if k < len(to):  # the k smallest of each row, then in order
            part = np.argpartition(dist, k - 1, axis=1)[:, :k]
            rows = np.arange(len(among))[:, None]
            nearest = part[rows, np.argsort(dist[rows, part], axis=1, kind="stable")]
        else:
            nearest = np.argsort(dist, axis=1, kind="stable")
        found: dict[tuple[int, int], float] = {}
        top = float(dist[np.arange(len(among))[:, None], nearest].max(initial=0)) or 1.0
        for i, row in enumerate(nearest):
            for j in row:
                x, y = int(among[i]), int(to[j])
                if x == y:
                    continue
                pair = (x, y) if self.ids[x] < self.ids[y] else (y, x)
                found.setdefault(pair, 1 - dist[i, j] / top)
        return sorted(found, key=lambda p: -found[p])


def merge_clusters(
    stats: Any,
    *,
    de_score_th: float = 150.0,
    min_genes: int = 5,
    k: int = 4,
    merge_type: Literal["undirectional", "directional"] = "undirectional",
    method: Literal["fast_limma", "t.test", "chisq"] = "fast_limma",
    padj_th: float = 0.01,
    lfc_th: float = 1.0,
    q1_th: float = 0.5,
    q2_th: float | None = None,
    q_diff_th: float = 0.7,
    min_cells: int = 4,
    low_th: float = 1.0,
    scale: Literal["log"] | None = None,
    n_components: int = COMPONENTS,
    storage_options: dict | None = None,
) -> MergeResult:
    """Merge clusters that are not distinct, as scrattch.bigcat's ``merge_cl`` does, from
    statistics alone.

    Clusters with fewer than ``min_cells`` cells first go, one at a time, into their nearest
    cluster. Then, repeatedly: each cluster's ``k`` nearest clusters (by the distance of their
    means in the space of the means' first principal components) are paired, pairs not yet
    scored are tested (:func:`bigcat.de_pairs`, the same thresholds), the lowest-scoring pair
    that fails the test (``score < de_score_th`` or fewer than ``min_genes`` DE genes; with
    ``merge_type="directional"`` either direction alone) merges, and so does every other failing
    pair scoring below ``de_score_th / 2`` that touches no cluster merged in this round. Merged
    statistics are the sums of the accumulators (exact); only pairs touching a merged cluster
    are tested again. It ends when no neighbouring pair fails. A merged cluster keeps the
    name of its smaller member (by number when names are numbers, else by order).

    Returns
    -------
    MergeResult
    """
    th = Thresholds(padj_th, lfc_th, q1_th, q2_th, q_diff_th, int(min_cells))
    if merge_type not in ("undirectional", "directional"):
        msg = f"merge_type must be undirectional or directional, not {merge_type!r}"
        raise BigcatInputError(msg)
    data = load_de_input(stats, low_th=low_th, need_squares=method != "chisq", scale=scale,
                         storage_options=storage_options)  # fmt: skip
    data.n_cells = data.n_cells.copy()
    data.means = data.means.copy()
    if data.sqr_means is not None:
        data.sqr_means = data.sqr_means.copy()
    data.present_counts = data.present_counts.astype(np.int64)
    state = _Clusters(data, n_components)
    _merge_small(state, th.min_cells)
    scores: dict[tuple[int, int], pd.Series] = {}
    rounds = 0
    while len(state.alive) > 1:
        rounds += 1
        pairs = state.nearest_pairs(k)
        new = [p for p in pairs if p not in scores]
        if new:
            scores.update(_score(data, method, new, th))
        failing = [p for p in pairs if _fails(scores[p], de_score_th, min_genes, merge_type)]
        if not failing:
            break
        failing.sort(key=lambda p: scores[p]["score"])  # sort is stable: ties keep the neighbour order
        merged: set[int] = set()
        for i, (x, y) in enumerate(failing):
            if i == 0 or (scores[(x, y)]["score"] < de_score_th / 2 and not ({x, y} & merged)):
                log.info("merge %s and %s (score %.1f)", data.clusters[x], data.clusters[y], scores[(x, y)]["score"])
                state.merge(x, y)
                merged |= {x, y}
        scores = {p: v for p, v in scores.items() if not (set(p) & merged)}
    log.info("merged %d clusters into %d in %d rounds", len(state.owner), len(state.alive), rounds)
    return _result(stats, state, scores, data, storage_options)


def _merge_small(state: _Clusters, min_cells: int) -> None:
    """Clusters below ``min_cells`` into their nearest cluster, the most similar pair first."""
    n = state.data.n_cells
    while len(state.alive) > 1:
        small = state.alive[n[state.alive] < min_cells]
        if len(small) == 0:
            return
        big = state.alive[n[state.alive] >= min_cells]
        if len(big) == 0:
            msg = f"every cluster has fewer than {min_cells} cells: nothing to merge into"
            raise BigcatInputError(msg)
        x, y = state.nearest_pairs(1, among=big, to=small)[0]
        state.merge(x, y)


def _score(data: DEInput, method: str, pairs: list, th: Thresholds) -> dict:
    p1 = np.array([p[0] for p in pairs], dtype=np.int64)
    p2 = np.array([p[1] for p in pairs], dtype=np.int64)
    prepared = prepare(data, method, p1, p2)
    tables = [table for table, _ in run_chunks(data, prepared, p1, p2, th, top=0)]
    table = pd.concat(tables, ignore_index=True)
    return {pair: table.iloc[i] for i, pair in enumerate(pairs)}


def _fails(row: pd.Series, de_score_th: float, min_genes: int, merge_type: str) -> bool:
    """scrattch's ``test_merge``: not distinct enough to stay apart."""
    if merge_type == "undirectional":
        return bool(row["score"] < de_score_th or row["num"] < min_genes)
    return bool(
        row["up_score"] < de_score_th or row["down_score"] < de_score_th
        or row["up_num"] < min_genes or row["down_num"] < min_genes
    )  # fmt: skip


def _result(stats: Any, state: _Clusters, scores: dict, data: DEInput, storage_options: dict | None) -> MergeResult:
    from bigcat.stats import read_stats, rollup

    names = np.asarray(data.clusters, dtype=str)
    mapping = pd.DataFrame({"cluster": names, "merged": names[state.owner]})
    table = pd.DataFrame(
        [{"P1": names[x], "P2": names[y], **{c: float(v[c]) for c in ("score", "up_score", "down_score")},
          **{c: int(v[c]) for c in ("num", "up_num", "down_num")}} for (x, y), v in scores.items()],
        columns=["P1", "P2", "score", "up_score", "down_score", "num", "up_num", "down_num"],
    )  # fmt: skip
    import xarray as xr

    source = stats if isinstance(stats, xr.Dataset) else read_stats(stats, storage_options)
    merged = rollup(source, mapping, "merged")
    return MergeResult(mapping, merged, table)
