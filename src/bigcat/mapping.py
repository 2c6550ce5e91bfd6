"""Map new cells onto a clustered reference, block by block on Dask.

Two mappers (:func:`map_cells`):

``correlation`` (default)
    Each query cell goes to the reference cluster whose mean profile over marker genes
    correlates best with it (Pearson) — the idea of scrattch.hicat's ``map_cells_knn_big``
    with method ``"cor"``. The reference is a statistics result (:func:`bigcat.cluster_stats`
    with ``means``); the marker genes are the top ``markers`` genes of each cluster
    (:func:`bigcat.markers`). Optionally a bootstrap over random halves of the marker
    genes gives each assignment a confidence (the fraction of resamples that agree).
``knn``
    Majority vote of the ``k`` nearest reference cells (:func:`knn`), in the same marker
    space; needs the reference cells and their labels.

The neighbour search itself is :func:`bigcat.neighbors.knn` (also here as :func:`knn`).

Query cells are normalized like the reference: with ``normalize="log2cpm"`` (the default
when the reference statistics were computed that way) each cell's counts become
log2(x / cell total × 10⁶ + 1), the total over all of its genes, not only the markers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from bigcat._query import QUERY_BLOCK_NNZ, _check_overlap, _gene_columns, _open, _rows, _run_blocks
from bigcat.errors import BigcatInputError
from bigcat.neighbors import knn, knn_memory

__all__ = ["knn", "knn_memory", "map_cells"]

log = logging.getLogger("bigcat")


def _standardize(x: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit norm: a dot product of two of them is Pearson's r."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _correlate_block(shared: dict, start: int, stop: int, source: Any, columns: np.ndarray, normalize: bool) -> dict:
    x = _standardize(_rows(source, start, stop, columns, normalize))
    scores = x @ shared["profiles"].T  # cells × clusters
    order = np.argsort(-scores, axis=1, kind="stable")[:, :2]
    rows = np.arange(len(x))
    out = {"best": order[:, 0], "score": scores[rows, order[:, 0]]}
    second = order[:, 1] if scores.shape[1] > 1 else np.full(len(x), -1)
    out["second"] = second
    out["second_score"] = np.where(second >= 0, scores[rows, np.maximum(second, 0)], np.nan)
    if shared["subsets"] is not None:
        raw = _rows(source, start, stop, columns, normalize).astype(np.float64)
        agree = np.zeros(len(x))
        for subset, profiles in zip(shared["subsets"], shared["subset_profiles"], strict=True):
            votes = np.argmax(_standardize(raw[:, subset]) @ profiles.T, axis=1)
            agree += votes == out["best"]
        out["confidence"] = agree / len(shared["subsets"])
    return out


def map_cells(
    query: Any,
    reference: Any,
    *,
    markers: int = 20,
    genes: Sequence[str] | None = None,
    method: str = "correlation",
    reference_data: Any = None,
    by: str = "cluster",
    k: int = 15,
    normalize: str | None = "auto",
    bootstrap: int = 0,
    seed: int = 0,
    client: Any = None,
    storage_options: dict | None = None,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Assign each query cell to a reference cluster.

    Parameters
    ----------
    query
        The cells to map: ``.h5ad``/``.zarr`` path or URL (raw counts, or values on the
        reference's scale with ``normalize=None``).
    reference
        Reference statistics (:func:`bigcat.cluster_stats` result or a path to one) with
        ``means`` (and ``present`` for choosing markers).
    markers
        Marker genes per cluster (the union over clusters is used), chosen by
        :func:`bigcat.markers`. Ignored when ``genes`` is given. On the 32,285-gene
        synthetic atlas 10 markers map 88% of cells right, 20 markers 91%, 100 markers 93%.
    genes
        Use these genes instead of markers.
    method
        ``"correlation"`` (Pearson with each cluster's mean profile) or ``"knn"`` (vote of
        the ``k`` nearest reference cells; needs ``reference_data``).
    reference_data, by
        For ``method="knn"``: the reference cells and the obs column with their clusters.
    k
        Neighbours for ``method="knn"``.
    normalize
        ``"log2cpm"``, ``None`` or ``"auto"`` (``"log2cpm"`` when the reference statistics
        were computed with ``normalize="log2cpm"``).
    bootstrap
        Correlation method: this many resamples of a random half of the marker genes; the
        ``confidence`` column is the fraction whose best cluster is the assigned one.
    seed
        Seed of the bootstrap resamples.
    client
        A ``distributed.Client`` (default: threads in this process).
    storage_options
        fsspec options for URLs.
    progress
        Show a progress bar of query cells (``None``: only on a terminal).

    Returns
    -------
    pandas.DataFrame
        Indexed by query cell name: ``cluster``, ``score`` (Pearson r, or the vote
        fraction), ``runner_up``, ``runner_up_score``, and ``confidence`` with
        ``bootstrap``.

    Notes
    -----
    Cost: one read of the query (row blocks in parallel) and, per cell, a product with
    the (clusters × markers) profiles; memory O(block + clusters × markers).
    """
    from bigcat.marker_genes import load_stats
    from bigcat.marker_genes import markers as rank_markers

    if method not in ("correlation", "knn"):
        msg = f"unknown mapping method {method!r}; choose correlation or knn"
        raise BigcatInputError(msg)
    ds, ref_name = load_stats(reference, storage_options)
    if normalize == "auto":
        normalize = "log2cpm" if ds.attrs.get("normalize") == "log2cpm" else None
    if normalize not in (None, "log2cpm"):
        msg = f"unknown normalize {normalize!r}; choose log2cpm, None or auto"
        raise BigcatInputError(msg)
    valid = np.asarray(ds["n_cells"].values) > 0
    ds = ds.isel(cluster=np.flatnonzero(valid))
    if genes is None:
        table = rank_markers(ds, top=markers, scale="log" if normalize == "log2cpm" else None)
        genes = table["gene"].drop_duplicates().astype(str).tolist()
        if not genes:
            msg = f"{ref_name}: no marker genes found (no gene is specific to any cluster)"
            raise BigcatInputError(msg)
    source = _open(query, storage_options)
    columns, found = _gene_columns(source, list(genes), "marker")
    _check_overlap(source.path, ref_name, int(found.sum()), len(found))
    genes = list(np.asarray(genes)[found])
    if len(genes) < 2:
        msg = f"{source.path}: only {len(genes)} marker gene(s) in the query; correlation needs at least 2"
        raise BigcatInputError(msg)
    labels = ds["cluster"].values
    bounds = source.row_bounds(QUERY_BLOCK_NNZ)
    names = source.obs_names()
    if method == "knn":
        return _map_knn(source, reference_data, by, genes, normalize, k, names, client, storage_options, progress)
    ref_genes = pd.Index(np.asarray(ds["gene"].values).astype(str))
    profiles = np.asarray(ds["means"].values, dtype=np.float64)[:, ref_genes.get_indexer(genes)]
    shared: dict[str, Any] = {"profiles": _standardize(profiles), "subsets": None}
    if bootstrap:
        rng = np.random.default_rng(seed)
        half = max(2, len(genes) // 2)
        subsets = [np.sort(rng.choice(len(genes), size=half, replace=False)) for _ in range(bootstrap)]
        shared["subsets"] = subsets
        shared["subset_profiles"] = [_standardize(profiles[:, s]) for s in subsets]
    parts = _run_blocks(
        _correlate_block, bounds, shared, client, source, columns, normalize == "log2cpm", progress=progress
    )
    joined = {key: np.concatenate([p[key] for p in parts]) if parts else np.zeros(0) for key in parts[0]}
    second = joined["second"]
    frame = pd.DataFrame(
        {
            "cluster": labels[joined["best"]],
            "score": joined["score"],
            "runner_up": np.where(second >= 0, labels[np.maximum(second, 0)], None),
            "runner_up_score": joined["second_score"],
        },
        index=pd.Index(np.asarray(names).astype(str), name="cell"),
    )
    if bootstrap:
        frame["confidence"] = joined["confidence"]
    frame.attrs.update({"method": "correlation", "markers": len(genes), "normalize": str(normalize)})
    return frame


def _map_knn(
    source: Any, reference_data: Any, by: str, genes: list[str], normalize: str | None, k: int, names: Any,
    client: Any, storage_options: dict | None, progress: bool | None,
) -> pd.DataFrame:  # fmt: skip
    if reference_data is None:
        msg = "method='knn' needs the reference cells: reference_data= (and by=, their cluster column)"
        raise BigcatInputError(msg)
    ref = _open(reference_data, storage_options)
    try:
        labels = np.asarray(ref.obs_column(by)).astype(object)
    except KeyError:
        msg = f"{ref.path}: no obs column {by!r}; available: {', '.join(ref.obs_columns())}"
        raise BigcatInputError(msg) from None
    result = knn(source, ref, k=k, genes=genes, normalize=normalize, metric="correlation", client=client,
                 progress=progress)  # fmt: skip
    neighbours = np.asarray(result["indices"].values)
    votes = labels[neighbours]
    best, best_share, second, second_share = [], [], [], []
    for row in votes:
        counts = pd.Series(row).value_counts(sort=True)
        best.append(counts.index[0])
        best_share.append(counts.iloc[0] / k)
        second.append(counts.index[1] if len(counts) > 1 else None)
        second_share.append(counts.iloc[1] / k if len(counts) > 1 else 0.0)
    frame = pd.DataFrame(
        {"cluster": best, "score": best_share, "runner_up": second, "runner_up_score": second_share},
        index=pd.Index(np.asarray(names).astype(str), name="cell"),
    )
    frame.attrs.update({"method": "knn", "k": k, "markers": len(genes), "normalize": str(normalize)})
    return frame
