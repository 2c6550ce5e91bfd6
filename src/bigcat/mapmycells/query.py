"""MapMyCells query markers (cell_type_mapper's ``query_markers.json``) from a
``reference_markers.h5``: for each parent node of the taxonomy, cell_type_mapper's greedy
choice of genes that tell apart the leaves under its different children."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigcat._io.layout import bigcat_version
from bigcat.errors import BigcatInputError
from bigcat.mapmycells.reference import INVALID_PREFIX, absolute, open_h5

__all__ = ["ReferenceMarkers", "parent_pairs", "query_markers", "read_reference_markers"]

log = logging.getLogger("bigcat")


@dataclass
class ReferenceMarkers:
    """A ``reference_markers.h5`` read for query-marker selection: markers by pair (CSR over
    cell_type_mapper's pair index, up and down), the genes, the taxonomy of its statistics."""

    source: str
    genes: list[str]
    tree: dict
    leaves: list[str]
    up_ptr: np.ndarray
    up_idx: np.ndarray
    down_ptr: np.ndarray
    down_idx: np.ndarray
    pair_index: Any  # None: combinations order of the sorted leaves; else {leaf: {leaf: index}}
    metadata: dict


def _stats_path(source: str, metadata: dict, stats: str | os.PathLike | None, storage_options: dict | None) -> str:
    """The statistics whose taxonomy the markers belong to: ``stats`` if given, else the file
    the reference markers record, else one of that name beside them (cell_type_mapper's
    ``search_for_stats_file``)."""
    from bigcat._io import fs

    if stats is not None:
        return str(stats)
    recorded = metadata.get("precomputed_path")
    if recorded is None:
        msg = f"{source}: its metadata names no precomputed_stats file; pass the statistics (--stats)"
        raise BigcatInputError(msg)
    if fs.exists(recorded, storage_options):
        return str(recorded)
    if not fs.is_url(source):
        beside = Path(source).resolve().parent / Path(str(recorded)).name
        if beside.is_file():
            return str(beside)
    msg = (f"{source}: the statistics it was computed from, {recorded}, are gone (nor beside it); "
           "pass them with --stats")  # fmt: skip
    raise BigcatInputError(msg)


def read_reference_markers(
    path: str | os.PathLike, stats: str | os.PathLike | None = None, storage_options: dict | None = None
) -> ReferenceMarkers:
    """Read a ``reference_markers.h5`` (bigcat's or cell_type_mapper's) and the taxonomy tree
    of the ``precomputed_stats.h5`` it was computed from."""
    from bigcat._io import fs
    from bigcat.mapmycells._writer import pair_to_idx_json

    source = str(path)
    if not fs.is_url(path) and not Path(path).is_file():
        msg = f"{source}: no such file"
        raise BigcatInputError(msg)
    with fs.open_file(path, storage_options) as handle, open_h5(handle, source, "reference_markers.h5") as f:
        need = ["gene_names", "pair_to_idx", "n_pairs", "metadata"] + [
            f"sparse_by_pair/{d}_{k}" for d in ("up", "down") for k in ("pair_idx", "gene_idx")
        ]
        missing = [k for k in need if k not in f]
        if missing:
            msg = (f"{source}: not a reference_markers.h5 (it lacks {', '.join(missing)}); write one with "
                   "`bigcat mapmycells reference-markers precomputed_stats.h5 --out reference_markers.h5`")  # fmt: skip
            raise BigcatInputError(msg)
        genes = json.loads(f["gene_names"][()].decode())
        metadata = json.loads(f["metadata"][()].decode())
        pair_bytes = f["pair_to_idx"][()]
        n_pairs = int(f["n_pairs"][()])
        arrays = {
            f"{d}_{k}": f[f"sparse_by_pair/{d}_{k}"][()] for d in ("up", "down") for k in ("pair_idx", "gene_idx")
        }
    stats_path = _stats_path(source, metadata, stats, storage_options)
    with fs.open_file(stats_path, storage_options) as handle, open_h5(handle, stats_path) as f:
        if "taxonomy_tree" not in f:
            msg = f"{stats_path}: no taxonomy_tree (a precomputed_stats.h5 is expected)"
            raise BigcatInputError(msg)
        tree = json.loads(f["taxonomy_tree"][()].decode())
    leaves = sorted(tree[tree["hierarchy"][-1]].keys())
    for d in ("up", "down"):
        if len(arrays[f"{d}_pair_idx"]) != n_pairs + 1:
            got = len(arrays[f"{d}_pair_idx"])
            msg = f"{source}: sparse_by_pair/{d}_pair_idx has {got:,} entries for {n_pairs:,} pairs"
            raise BigcatInputError(msg)
    pair_index = None
    if pair_bytes != pair_to_idx_json(tree["hierarchy"][-1], leaves):
        # not the combinations order of the sorted leaves: look pairs up in the file's own dict
        pair_index = json.loads(pair_bytes.decode())[tree["hierarchy"][-1]]
    return ReferenceMarkers(source, genes, tree, leaves, arrays["up_pair_idx"], arrays["up_gene_idx"],
                            arrays["down_pair_idx"], arrays["down_gene_idx"], pair_index, metadata)  # fmt: skip


def drop_tree_level(tree: dict, level: str) -> dict:
    """The taxonomy without ``level`` (not the leaves'): its nodes' children hang from their
    parents (cell_type_mapper's ``TaxonomyTree.drop_level``)."""
    hierarchy = list(tree["hierarchy"])
    if level not in hierarchy:
        return tree
    if level == hierarchy[-1]:
        msg = f"cannot drop the leaf level {level!r} of the taxonomy"
        raise BigcatInputError(msg)
    out = {k: v for k, v in tree.items() if k not in ("hierarchy", level)}
    at = hierarchy.index(level)
    if at > 0:
        above = hierarchy[at - 1]
        out[above] = {node: sorted(c for kid in kids for c in tree[level][kid]) for node, kids in tree[above].items()}
    out["hierarchy"] = hierarchy[:at] + hierarchy[at + 1 :]
    return out


def _leaves_under(tree: dict) -> dict[str, dict[str, list[str]]]:
    hierarchy = tree["hierarchy"]
    under: dict[str, dict[str, list[str]]] = {hierarchy[-1]: {leaf: [leaf] for leaf in tree[hierarchy[-1]]}}
    for i in range(len(hierarchy) - 2, -1, -1):
        below = under[hierarchy[i + 1]]
        under[hierarchy[i]] = {
            node: [x for kid in kids for x in below[kid]] for node, kids in tree[hierarchy[i]].items()
        }
    return under


def parents_of(tree: dict) -> list[tuple[str, str] | None]:
    """cell_type_mapper's ``all_parents``: the root (None), then every node above the leaves."""
    return [None] + [(level, node) for level in tree["hierarchy"][:-1] for node in sorted(tree[level])]


def parent_pairs(markers: ReferenceMarkers, tree: dict, parent: tuple[str, str] | None, under: dict) -> np.ndarray:
    """The (sorted) pair indices of the leaves under different children of ``parent``
    (cell_type_mapper's ``leaves_to_compare``)."""
    hierarchy = tree["hierarchy"]
    if parent is None:
        level, children = hierarchy[0], list(tree[hierarchy[0]].keys())
    else:
        if parent[0] == hierarchy[-1]:
            return np.zeros(0, dtype=np.int64)
        level = hierarchy[hierarchy.index(parent[0]) + 1]
        children = list(tree[parent[0]][parent[1]])
    if len(children) < 2:
        return np.zeros(0, dtype=np.int64)
    position = {leaf: i for i, leaf in enumerate(markers.leaves)}
    leaf_pos, label = [], []
    for c, child in enumerate(children):
        for leaf in under[level][child]:
            leaf_pos.append(position[leaf])
            label.append(c)
    pos, lab = np.asarray(leaf_pos, dtype=np.int64), np.asarray(label, dtype=np.int64)
    order = np.argsort(pos)
    pos, lab = pos[order], lab[order]
    n = len(markers.leaves)
    if markers.pair_index is not None:
        names = markers.leaves
        found = [markers.pair_index[names[pos[a]]][names[pos[b]]]
                 for a in range(len(pos)) for b in range(a + 1, len(pos)) if lab[a] != lab[b]]  # fmt: skip
        return np.sort(np.asarray(found, dtype=np.int64))
    chunks = []
    for a in range(len(pos) - 1):
        later = pos[a + 1 :][lab[a + 1 :] != lab[a]]
        i = pos[a]
        # index of (i, j), i < j, in combinations order
        chunks.append(i * n - i * (i + 1) // 2 + (later - i - 1))
    return np.sort(np.concatenate(chunks)) if chunks else np.zeros(0, dtype=np.int64)


def _select(markers: ReferenceMarkers, pairs: np.ndarray, gene_of: np.ndarray, n_genes: int, n_per: int,
            genes_at_a_time: int) -> tuple[np.ndarray, dict]:  # fmt: skip
    """cell_type_mapper's ``select_marker_genes_v2`` for one parent's pairs: the genes (kept
    indices) in the order chosen, and its summary."""
    from bigcat.mapmycells import _greedy

    census, ptr, genes, utility = _greedy.gather(pairs, markers.up_ptr, markers.up_idx, markers.down_ptr,
                                                 markers.down_idx, gene_of, n_genes)  # fmt: skip
    gptr, gslots = _greedy.transpose(ptr, genes, n_genes)
    n = len(pairs)
    possible = (census >= n_per).sum(axis=1) == 2
    n_useful = int((utility > 0).sum())
    counts = np.zeros((n, 2), dtype=np.int64)
    agg = np.zeros(n, dtype=np.int64)
    filled = np.zeros((n, 2), dtype=bool)
    dirty = np.zeros(n, dtype=bool)
    queue = np.arange(n, dtype=np.int64)
    chosen = np.zeros(n_genes, dtype=bool)
    n_filled = _greedy.refresh(queue, n, dirty, counts, agg, census, possible, filled, n_per, utility, ptr, genes)
    # the order is numpy's argsort of the utilities, as cell_type_mapper sorts them: among
    # genes of equal utility the last of it is taken first
    order = np.argsort(utility)
    taken, n_queue = _greedy.desperate(n_per, chosen, utility, gptr, gslots, counts, agg, dirty, queue, census,
                                       ptr, genes, n_genes)  # fmt: skip
    picked = [taken]
    n_desperate = len(taken)
    newly = _greedy.refresh(queue, n_queue, dirty, counts, agg, census, possible, filled, n_per, utility, ptr, genes)
    n_filled += newly
    top = int(utility.max(initial=0))
    cursor = n_genes - 1
    batch = np.empty(genes_at_a_time, dtype=np.int64)
    while True:
        if newly:
            order = np.argsort(utility)
            cursor = n_genes - 1
        if top <= 0 or n_filled == 2 * n:
            break
        k = 0
        while k < genes_at_a_time and cursor >= 0:
            g = order[cursor]
            cursor -= 1
            if chosen[g]:
                continue
            batch[k] = g
            k += 1
        if k == 0:
            break
        picked.append(batch[:k].copy())
        newly, top = _greedy.step(batch[:k], chosen, utility, gptr, gslots, counts, agg, dirty, queue, census,
                                  possible, filled, n_per, ptr, genes)  # fmt: skip
        n_filled += newly
    chosen_order = np.concatenate(picked)
    return chosen_order, _summary(counts, agg, len(chosen_order), n_filled, 2 * n, n_desperate, n_useful, n_per,
                                  genes_at_a_time)  # fmt: skip


def _summary(counts: np.ndarray, agg: np.ndarray, n_genes: int, n_filled: int, size: int, n_desperate: int,
             n_useful: int, n_per: int, genes_at_a_time: int) -> dict:  # fmt: skip
    """The per-parent log cell_type_mapper writes under ``log`` (same keys)."""
    out: dict[str, Any] = {
        "min_n_genes": int(agg.min()), "median_n_genes": int(np.median(agg)), "max_n_genes": int(agg.max()),
        "n_zero": int((agg == 0).sum()), "lt_5": int((agg < 5).sum()), "lt_15": int((agg < 15).sum()),
        "lt_30": int((agg < 30).sum()), "n_genes": n_genes, "filled": n_filled, "unfilled": size - n_filled,
        "n_desperate": n_desperate, "n_original_markers": n_useful,
    }  # fmt: skip
    thresholds = sorted({1, *range(5, n_per, 5), n_per})
    out["marker_distribution"] = {
        f"lt_{t}": {"up": int((counts[:, 1] < t).sum()), "down": int((counts[:, 0] < t).sum())} for t in thresholds
    }
    out["genes_at_a_time"] = genes_at_a_time
    return out


def _kept_genes(markers: ReferenceMarkers, genes: Sequence[str] | None) -> np.ndarray:
    """cell_type_mapper's gene thinning: reference genes that are query genes (all, without a
    query) and not ``INVALID_MARKER…``, renumbered in reference order (−1: dropped)."""
    wanted = set(markers.genes) if genes is None else set(map(str, genes))
    keep = np.array([g in wanted and not g.startswith(INVALID_PREFIX) for g in markers.genes], dtype=bool)
    if not keep.any():
        shown = ", ".join(list(map(str, genes or []))[:3])
        msg = f"{markers.source}: none of the query's genes ({shown}, …) is a gene of the reference markers"
        raise BigcatInputError(msg)
    gene_of = np.full(len(markers.genes), -1, dtype=np.int64)
    gene_of[keep] = np.arange(int(keep.sum()))
    return gene_of


def _group(parent: tuple[str, str] | None) -> str:
    return "None" if parent is None else f"{parent[0]}/{parent[1]}"


def query_markers(
    reference_markers: str | os.PathLike,
    out: str | os.PathLike,
    *,
    n_per_utility: int = 30,
    n_per_utility_override: Mapping[str, int] | None = None,
    genes_at_a_time: int = 1,
    genes: Sequence[str] | None = None,
    drop_level: str | None = None,
    stats: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    storage_options: dict | None = None,
) -> Path | str:
    """MapMyCells' query markers, as cell_type_mapper's ``query_markers`` chooses them, written
    as its ``query_markers.json`` (what ``from_specified_markers`` reads).

    Parameters
    ----------
    reference_markers
        A ``reference_markers.h5`` (:func:`bigcat.mapmycells.reference_markers` or
        cell_type_mapper's own).
    out
        The ``query_markers.json`` to write (atomically; a path or a URL).
    n_per_utility
        Markers wanted per (pair of leaves, direction) — cell_type_mapper's default 30.
    n_per_utility_override
        Another ``n_per_utility`` for some parents: ``{"level/node": n}`` (``"None"``: the root).
    genes_at_a_time
        Genes taken between updates of what is filled (cell_type_mapper's option; 1 is exact).
    genes
        The query's genes (cell_type_mapper's ``query_path``): only these can be markers.
        Default: every gene of the reference markers.
    drop_level
        A level of the taxonomy to leave out (its children hang from its parents).
    stats
        The ``precomputed_stats.h5`` with the taxonomy; default the one the reference markers
        record, or one of that name beside them.
    overwrite, progress, storage_options
        As elsewhere in bigcat.

    Returns
    -------
    The path written.

    Notes
    -----
    For each parent node, the pairs of leaves under different children; genes are taken
    greedily by utility (how many unfilled (pair, direction) they are markers of), after every
    marker of the pairs that have at most ``n_per_utility`` of them; a (pair, direction) is
    filled at ``n_per_utility`` markers (when both directions can reach it), at all it has, or
    at ``2 × n_per_utility`` for the pair. Ties go as cell_type_mapper breaks them (the last of
    numpy's argsort). Unlike cell_type_mapper, a step touches only the pairs the chosen gene is
    a marker of, and the by-gene lists are built per parent from its own pairs.
    """
    from bigcat._io import fs
    from bigcat._io.publish import publish
    from bigcat.progress import progress_bar

    if n_per_utility < 1 or genes_at_a_time < 1:
        msg = f"n_per_utility ({n_per_utility}) and genes_at_a_time ({genes_at_a_time}) must be at least 1"
        raise BigcatInputError(msg)
    started = time.time()
    markers = read_reference_markers(reference_markers, stats, storage_options)
    tree = markers.tree if drop_level is None else drop_tree_level(markers.tree, drop_level)
    overrides = dict(n_per_utility_override or {})
    parents = parents_of(tree)
    unknown = sorted(set(overrides) - {_group(p) for p in parents})
    if unknown:
        msg = f"{markers.source}: n_per_utility_override names nodes not in the taxonomy: {', '.join(unknown[:5])}"
        raise BigcatInputError(msg)
    gene_of = _kept_genes(markers, genes)
    kept = np.flatnonzero(gene_of >= 0)
    names = [markers.genes[i] for i in kept]
    under = _leaves_under(tree)
    lookup: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    with progress_bar(total=len(parents), unit="parents", desc="query markers", enabled=progress) as bar:
        for parent in parents:
            group = _group(parent)
            t0 = time.time()
            pairs = parent_pairs(markers, tree, parent, under)
            if len(pairs) == 0:
                lookup[group] = []
                summary[group] = {"n_genes": 0, "msg": "Skipping; no leaf nodes to compare"}
            else:
                chosen, info = _select(markers, pairs, gene_of, len(kept), int(overrides.get(group, n_per_utility)),
                                       int(genes_at_a_time))  # fmt: skip
                lookup[group] = [names[g] for g in chosen]
                info["duration"] = time.time() - t0
                summary[group] = info
            bar.update(1)
    config = {
        "reference_marker_path_list": [absolute(reference_markers)], "n_per_utility": n_per_utility,
        "n_per_utility_override": overrides or None, "genes_at_a_time": genes_at_a_time, "drop_level": drop_level,
        "query_genes": None if genes is None else len(kept),
    }  # fmt: skip
    lookup["log"] = summary
    lookup["metadata"] = {"config": config, "duration": time.time() - started, "written_by": "bigcat",
                          "bigcat_version": bigcat_version()}  # fmt: skip
    target = fs.path_of(out)
    with publish(target, overwrite=overwrite, storage_options=storage_options, kind="file") as tmp:
        Path(tmp).write_text(json.dumps(lookup, indent=2))
    log.info("query markers for %d parents in %.1f s", len(parents), time.time() - started)
    return target
