"""MapMyCells (AllenInstitute/cell_type_mapper) files from bigcat's statistics.

:func:`precompute_stats` writes ``precomputed_stats.h5`` as cell_type_mapper's own
``precompute_stats_scrattch`` does, from one pass over the cells: ``n_cells``, ``sum``,
``sumsq``, ``gt0``, ``gt1``, ``ge1`` (clusters × genes, the three presence counts from the
same pass), ``col_names``, ``cluster_to_row``, the taxonomy tree (every level's children,
and each leaf's cells as row positions in the input) and the run's ``metadata``.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bigcat.errors import BigcatInputError

__all__ = ["precompute_stats", "taxonomy_tree", "write_mapmycells"]

#: the presence tests cell_type_mapper's files hold (x > 0, x > 1, x >= 1)
PRESENCE = ("gt0", "gt1", "ge1")


def precompute_stats(
    data: Any,
    out: str | os.PathLike,
    *,
    by: str = "cluster",
    hierarchy: Sequence[str] | None = None,
    taxonomy: str | os.PathLike | pd.DataFrame | None = None,
    normalize: str | None = "log2cpm",
    labels: str | os.PathLike | None = None,
    label_column: str | None = None,
    cell_column: str | None = None,
    cells: Any = None,
    max_cells_per_cluster: int | None = None,
    seed: int = 0,
    engine: str = "blocks",
    client: Any = None,
    block_nnz: int | None = None,
    progress: bool | None = False,
    overwrite: bool = False,
    storage_options: dict | None = None,
) -> Path | str:
    """Write MapMyCells' ``precomputed_stats.h5`` for ``data`` in one pass over the cells.

    Parameters
    ----------
    data, by, labels, label_column, cell_column, cells, max_cells_per_cluster, seed, engine, client, block_nnz
        As for :func:`bigcat.cluster_stats`; ``by`` (or ``label_column``) names the leaves.
    out
        The ``.h5`` file (a path or a URL), written atomically.
    hierarchy
        Levels of the taxonomy from the coarsest to the leaves (e.g. ``["class",
        "subclass", "supertype", "cluster"]``); the last is the leaf level (default: the
        leaf column alone, a flat taxonomy). The parent levels are obs columns of the
        inputs, or columns of ``taxonomy``.
    taxonomy
        A CSV/Parquet table (or DataFrame) with a column per level of ``hierarchy``, one
        row per leaf (or per cell): where the parents come from instead of obs.
    normalize
        ``"log2cpm"`` (default): ``X`` holds raw counts, turned into log2(CPM + 1) on the
        fly; ``None``: ``X`` already holds log2(CPM + 1) values. cell_type_mapper's
        statistics are always on log2(CPM + 1); the metadata records which the input was
        (``"raw"`` or ``"log2CPM"``, cell_type_mapper's names).
    overwrite, storage_options
        Replace an existing output; fsspec options for URLs.

    Returns
    -------
    str
        The path written.

    Notes
    -----
    Cost: one pass of :func:`bigcat.cluster_stats` (sums, squared sums and three presence
    counts fused in one kernel), plus writing 2 float64 and 3 int64 arrays of clusters ×
    genes (at 5,000 clusters × 32,285 genes, 6.5 GB uncompressed, written in cluster slabs).
    """
    from bigcat.stats import cluster_stats

    if normalize not in (None, "log2cpm"):
        msg = f"unknown normalize {normalize!r}: log2cpm (X holds counts) or None (X holds log2(CPM+1))"
        raise BigcatInputError(msg)
    leaf = label_column if labels is not None else by
    levels = list(hierarchy) if hierarchy else [str(leaf)]
    if levels[-1] != leaf:
        levels.append(str(leaf))
    membership: dict = {}
    start = time.time()
    result = cluster_stats(
        data,
        by=by,
        stats="sums,sqr_sums,present",
        present_at=PRESENCE[1:],
        threshold=0.0,
        present_op="gt",
        normalize=normalize,
        labels=labels,
        label_column=label_column,
        cell_column=cell_column,
        cells=cells,
        max_cells_per_cluster=max_cells_per_cluster,
        seed=seed,
        engine=engine,
        client=client,
        block_nnz=block_nnz,
        progress=progress,
        storage_options=storage_options,
        _membership=membership,
    )
    if normalize is None:
        _check_log_scale(result, membership)
    parents = _parents(levels, membership, taxonomy, storage_options)
    tree = taxonomy_tree(levels, [str(c) for c in membership["clusters"]], parents, membership["codes"])
    metadata = {
        "config": {
            "h5ad_path": [p.name for p in membership["parts"]],
            "hierarchy": levels,
            "normalization": "raw" if normalize == "log2cpm" else "log2CPM",
            "output_path": str(out),
            "labels": None if labels is None else str(labels),
            "max_cells_per_cluster": max_cells_per_cluster,
        },
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "duration": time.time() - start,
        "module": __name__,
        "version": _version(),
        "codebase": "bigcat",
    }
    return write_mapmycells(
        result, out, tree=tree, metadata=metadata, overwrite=overwrite, storage_options=storage_options
    )


#: the largest log2(CPM + 1) value there is: log2(10⁶ + 1)
MAX_LOG2CPM = float(np.log2(1e6 + 1))


def _version() -> str:
    from bigcat import __version__

    return __version__


def _check_log_scale(result: Any, membership: Mapping) -> None:
    """Refuse statistics that cannot be on log2(CPM + 1): a cluster mean above log2(10⁶ + 1)."""
    sums = np.asarray(result["sums"].values)
    n = np.asarray(result["n_cells"].values, dtype=np.float64)[:, None]
    top = float(np.nanmax(sums / n, initial=0.0)) if sums.size else 0.0
    if top > MAX_LOG2CPM:
        where = ", ".join(p.name for p in membership["parts"])
        msg = (
            f"{where}: X is not log2(CPM+1) (a cluster mean is {top:.3g}, above log2(10^6+1) = 19.93); "
            "MapMyCells statistics are on log2(CPM+1): pass normalize='log2cpm' (--normalize log2cpm) for counts"
        )
        raise BigcatInputError(msg)


def _parents(
    levels: list[str], membership: Mapping, taxonomy: Any, storage_options: dict | None
) -> dict[str, np.ndarray]:
    """For each parent level, the parent of every leaf (in the result's cluster order)."""
    clusters = pd.Index([str(c) for c in membership["clusters"]])
    out: dict[str, np.ndarray] = {}
    if len(levels) == 1:
        return out
    if taxonomy is not None:
        table = _read_taxonomy(taxonomy, levels, storage_options)
        leaf_of = table[levels[-1]].astype(str)
        for level in levels[:-1]:
            pairs = pd.DataFrame({"leaf": leaf_of, "parent": table[level].astype(str)}).drop_duplicates()
            _check_tree(pairs, level, str(taxonomy))
            mapping = pd.Series(pairs["parent"].to_numpy(), index=pairs["leaf"].to_numpy())
            missing = clusters.difference(mapping.index)
            if len(missing):
                msg = f"{taxonomy}: {len(missing)} clusters have no row (e.g. {missing[0]!r}) in the taxonomy table"
                raise BigcatInputError(msg)
            out[level] = mapping.reindex(clusters).to_numpy(dtype=object)
        return out
    codes = membership["codes"]
    for level in levels[:-1]:
        values = []
        for part in membership["parts"]:
            if part.source is None:
                msg = f"{part.name}: parent level {level!r} needs an input file (or pass taxonomy=)"
                raise BigcatInputError(msg)
            values.append(np.asarray(part.source.obs_column(level), dtype=object).astype(str))
        column = np.concatenate(values)
        keep = codes >= 0
        pairs = pd.DataFrame({"leaf": clusters[codes[keep]], "parent": column[keep]}).drop_duplicates()
        _check_tree(pairs, level, ", ".join(p.name for p in membership["parts"]))
        out[level] = pd.Series(pairs["parent"].to_numpy(), index=pairs["leaf"].to_numpy()).reindex(clusters).to_numpy()
    return out


def _check_tree(pairs: pd.DataFrame, level: str, where: str) -> None:
    twice = pairs["leaf"].duplicated(keep=False)
    if twice.any():
        leaf = pairs["leaf"][twice].iloc[0]
        seen = sorted(pairs["parent"][pairs["leaf"] == leaf].astype(str))[:3]
        msg = f"{where}: the taxonomy is not a tree: cluster {leaf!r} has several {level!r} parents ({', '.join(seen)})"
        raise BigcatInputError(msg)


def _read_taxonomy(taxonomy: Any, levels: list[str], storage_options: dict | None) -> pd.DataFrame:
    from bigcat._io.tables import read_table

    table = read_table(taxonomy, storage_options, what="taxonomy table")
    missing = [level for level in levels if level not in table.columns]
    if missing:
        msg = f"{taxonomy}: no column {', '.join(map(repr, missing))} (columns: {', '.join(map(str, table.columns))})"
        raise BigcatInputError(msg)
    return table


def taxonomy_tree(
    levels: Sequence[str], leaves: Sequence[str], parents: Mapping[str, Iterable[Any]], codes: np.ndarray | None = None
) -> dict:
    """The taxonomy tree as cell_type_mapper serializes it.

    ``{"hierarchy": levels, <level>: {node: [children…]}, <leaf level>: {leaf: [rows…]}}``:
    each level maps its nodes to their children (sorted), the leaf level maps each leaf to
    the row positions of its cells (``codes``: the leaf index of every input cell, -1 for
    cells left out; ``None``: empty lists).
    """
    tree: dict[str, Any] = {"hierarchy": list(levels)}
    children: list[np.ndarray] = [np.asarray(parents[level], dtype=object) for level in levels[:-1]]
    children.append(np.asarray(leaves, dtype=object))
    for i, level in enumerate(levels[:-1]):
        nodes: dict[str, set] = {}
        for parent, child in zip(children[i], children[i + 1], strict=True):
            nodes.setdefault(str(parent), set()).add(str(child))
        tree[level] = {node: sorted(kids) for node, kids in sorted(nodes.items())}
    rows: dict[str, list[int]] = {str(leaf): [] for leaf in leaves}
    if codes is not None:
        codes = np.asarray(codes)
        order = np.argsort(codes, kind="stable")
        order = order[codes[order] >= 0]
        bounds = np.searchsorted(codes[order], np.arange(len(leaves) + 1))
        for k, leaf in enumerate(leaves):
            rows[str(leaf)] = order[bounds[k] : bounds[k + 1]].tolist()
    tree[levels[-1]] = rows
    return tree


def _counts(ds: Any, name: str) -> np.ndarray | None:
    """Presence counts ``gt0``/``gt1``/``ge1`` from a result: its extra tests, or the main
    ``present_counts`` when it was computed with that test."""
    if f"present_counts_{name}" in ds:
        return np.asarray(ds[f"present_counts_{name}"].values)
    op, threshold = name[:2], float(name[2:])
    if (
        "present_counts" in ds
        and float(ds.attrs.get("threshold", 0.0)) == threshold
        and ds.attrs.get("present_op", "gt") == op
    ):
        return np.asarray(ds["present_counts"].values)
    return None


def write_mapmycells(
    ds: Any,
    path: str | os.PathLike,
    *,
    tree: dict | None = None,
    metadata: dict | None = None,
    ge1: Any = None,
    overwrite: bool = False,
    storage_options: dict | None = None,
) -> Path | str:
    """Write a statistics result as MapMyCells' ``precomputed_stats.h5``.

    Parameters
    ----------
    ds
        A :func:`bigcat.cluster_stats` result on log2(CPM + 1) values with ``sums`` (and
        ``sqr_sums``, and presence counts: ``present_at=("gt1", "ge1")`` with the main
        ``present`` at x > 0 gives all of ``gt0``, ``gt1``, ``ge1``).
    path
        The ``.h5`` file (written atomically).
    tree
        The taxonomy tree (:func:`taxonomy_tree`); default: flat, leaves without cells.
    metadata
        The ``metadata`` record (JSON-serializable); the result's attrs are added.
    ge1
        A second result whose ``present_counts`` are x ≥ 1 (the layout before one pass
        computed every test).
    overwrite, storage_options
        Replace an existing file; fsspec options for URLs.

    Returns
    -------
    str
        The path written.
    """
    import h5py

    from bigcat._io import fs
    from bigcat._io.publish import publish

    if "sums" not in ds:
        msg = "MapMyCells statistics need the 'sums' accumulator (compute means or sums)"
        raise BigcatInputError(msg)
    valid = np.asarray(ds["n_cells"].values) > 0
    ds = ds.isel(cluster=np.flatnonzero(valid))
    clusters = [str(c) for c in ds["cluster"].values]
    genes = [str(g) for g in ds["gene"].values]
    if tree is None:
        tree = taxonomy_tree(["cluster"], clusters, {})
    counts = {name: _counts(ds, name) for name in PRESENCE}
    if ge1 is not None and counts["ge1"] is None:
        counts["ge1"] = np.asarray(ge1.sel(cluster=ds["cluster"].values)["present_counts"].values)
    target = fs.path_of(path)
    with (
        publish(target, overwrite=overwrite, storage_options=storage_options, kind="file") as tmp,
        h5py.File(tmp, "w") as f,
    ):
        f.create_dataset("n_cells", data=np.asarray(ds["n_cells"].values, dtype=np.int64))
        _matrix(f, "sum", ds["sums"], np.float64)
        if "sqr_sums" in ds:
            _matrix(f, "sumsq", ds["sqr_sums"], np.float64)
        for name, values in counts.items():
            if values is not None:
                _matrix(f, name, values, np.int64)
        f.create_dataset("col_names", data=json.dumps(genes).encode())
        f.create_dataset("cluster_to_row", data=json.dumps({c: i for i, c in enumerate(clusters)}).encode())
        f.create_dataset("taxonomy_tree", data=json.dumps(tree).encode())
        meta = dict(metadata or {})
        meta.setdefault("normalization", "log2CPM")
        meta["bigcat"] = {k: v for k, v in ds.attrs.items() if isinstance(v, (str, int, float))}
        meta["written_by"] = "bigcat"
        f.create_dataset("metadata", data=json.dumps(meta).encode())
    return target


def _matrix(f: Any, name: str, values: Any, dtype: Any) -> None:
    """A clusters × genes dataset, contiguous (as cell_type_mapper writes them; HDF5 chunks
    made writing slower: docs/design.md), filled in 64 MB slabs of clusters (no full-size temporary of
    another dtype: the counts are uint16 in memory, int64 in the file)."""
    values = values.variable if hasattr(values, "variable") else values
    shape = tuple(values.shape)
    out = f.create_dataset(name, shape=shape, dtype=dtype)
    step = max(1, (64 << 20) // max(shape[1] * np.dtype(dtype).itemsize, 1))
    for lo in range(0, shape[0], step):
        out[lo : lo + step] = np.asarray(values[lo : lo + step], dtype=dtype)
