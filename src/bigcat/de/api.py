"""Pairwise differential expression between clusters, from their statistics alone."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from bigcat.de.engine import METHODS, Thresholds, prepare, run_chunks
from bigcat.de.inputs import load_de_input
from bigcat.de.pairs import resolve_pairs
from bigcat.errors import BigcatInputError

__all__ = ["DEResult", "de_pairs"]

log = logging.getLogger("bigcat")

#: rows per row group of the tables written
ROW_GROUP = 1 << 20


def _schemas() -> dict:
    """The tables' fixed schemas (a chunk with no gene selected must not make a column null)."""
    import pyarrow as pa

    text, count, value = pa.string(), pa.int64(), pa.float64()
    return {
        "pairs": pa.schema(
            [("P1", text), ("P2", text), ("n1", count), ("n2", count), ("score", value), ("up_score", value),
             ("down_score", value), ("num", count), ("up_num", count), ("down_num", count)]
        ),
        "genes": pa.schema(
            [("pair", text), ("P1", text), ("P2", text), ("gene", text), ("direction", text), ("rank", count),
             ("padj", value), ("pval", value), ("lfc", value), ("meanA", value), ("meanB", value), ("q1", value),
             ("q2", value)]
        ),
    }  # fmt: skip


@dataclass
class DEResult:
    """``pairs``: one row per pair (P1, P2, n1, n2, score, up_score, down_score, num, up_num,
    down_num); ``genes``: the top genes of each direction of each pair (pair, P1, P2, gene,
    direction, rank, padj, pval, lfc, meanA, meanB, q1, q2); ``attrs``: the method, thresholds
    and, for fast_limma, the fitted prior (``s2_prior``, ``df_prior``) and ``df``."""

    pairs: pd.DataFrame
    genes: pd.DataFrame
    attrs: dict = field(default_factory=dict)


def de_pairs(
    stats: Any,
    pairs: Any = "all",
    method: Literal["fast_limma", "t.test", "chisq"] = "fast_limma",
    *,
    padj_th: float = 0.01,
    lfc_th: float = 1.0,
    q1_th: float = 0.5,
    q2_th: float | None = None,
    q_diff_th: float = 0.7,
    min_cells: int = 4,
    low_th: float = 1.0,
    top: int = 50,
    scale: Literal["log"] | None = None,
    out: str | os.PathLike | None = None,
    matrix: Literal["score", "num"] | None = None,
    overwrite: bool = False,
    storage_options: dict | None = None,
    progress: bool | None = None,
) -> DEResult | Path | str:
    """Differentially expressed genes between pairs of clusters, as scrattch.bigcat's
    ``de_selected_pairs`` / ``de_stats_pair`` compute them, from cluster statistics alone.

    Parameters
    ----------
    stats
        A result of :func:`bigcat.cluster_stats` (or a path :func:`bigcat.read_stats` reads)
        with ``n_cells``, sums or means, squared sums or means (not for ``chisq``) and the
        presence of x ≥ ``low_th`` (``present_at="ge1"`` for the default ``low_th=1``), of
        log2 data (``normalize="log2cpm"``; ``scale="log"`` when X itself held log2(CPM+1)):
        lfc = mean₁ − mean₂.
    pairs
        ``"all"``, ``"neighbors:K"``, ``"siblings:TABLE[:COLUMN]"`` or a table of pairs (see
        :func:`bigcat.de.pairs.resolve_pairs`). Clusters with fewer than ``min_cells`` cells
        take no part.
    method
        ``"fast_limma"``: a moderated t-test with one pooled variance per gene over the
        clusters taking part (so its results depend on the pair set, as in R), moderated by
        limma's empirical Bayes prior, df = N − K; ``"t.test"``: Welch's t-test; ``"chisq"``:
        the Yates-corrected 2×2 test of presence. p-values are Holm-adjusted across genes
        within each pair.
    padj_th, lfc_th, q1_th, q2_th, q_diff_th, min_cells
        ``de_param``'s thresholds: a gene is up in P1 when padj < padj_th, lfc > lfc_th,
        q1 > q1_th, q1·n1 ≥ min_cells, q2 < q2_th (when given) and |q1 − q2|/max(q1, q2) >
        q_diff_th (down: the same with the clusters' roles swapped).
    low_th
        Presence means x ≥ low_th (scrattch's ``low.th``).
    top
        Genes of each direction kept per pair, by p then |lfc| (0: none).
    out
        A folder to write ``pairs.parquet`` and ``genes.parquet`` into (in bounded memory,
        atomically; any fsspec URL); ``None`` returns the tables.
    matrix
        With ``out``, also the clusters × clusters matrix of this field of the pairs (scrattch's
        ``get_de_matrix``; NaN for pairs not tested) as ``matrix-<field>.parquet``, and a heatmap
        of log10(1 + value) in the order of an average-linkage tree of the cluster means
        (``matrix-<field>.png``).
    overwrite, storage_options, progress
        As elsewhere in bigcat.

    Returns
    -------
    DEResult, or the output folder when ``out`` is given.

    Notes
    -----
    Cost: no pass over cells. Per pair, one fused pass over the genes computes the statistic;
    exact p-values are computed only for genes whose p can be below ``padj_th`` (the only ones
    Holm can select, and the only ones ranked before them); those are ranked and adjusted. Time
    O(pairs × genes); memory the statistics in float64 (means, presence, and squared means or
    variances) plus a bounded buffer of candidate genes.
    """
    th = Thresholds(padj_th, lfc_th, q1_th, q2_th, q_diff_th, int(min_cells))
    _check_options(method, th, low_th, top)
    if matrix is not None and (matrix not in ("score", "num") or out is None):
        msg = "matrix must be 'score' or 'num', and needs out= (the folder it is written to)"
        raise BigcatInputError(msg)
    data = load_de_input(stats, low_th=low_th, need_squares=method != "chisq", scale=scale,
                         storage_options=storage_options)  # fmt: skip
    p1, p2 = resolve_pairs(pairs, data.clusters, data.n_cells, data.means, min_cells=th.min_cells,
                           source=data.source, storage_options=storage_options)  # fmt: skip
    prepared = prepare(data, method, p1, p2)
    data.sqr_means = None  # folded into the method's arrays: not held through the scan
    attrs = {
        "method": method, "padj_th": padj_th, "lfc_th": lfc_th, "q1_th": q1_th, "q2_th": q2_th,
        "q_diff_th": q_diff_th, "min_cells": int(min_cells), "low_th": low_th, "top": top,
        "n_pairs": len(p1), "source": data.source,
    }  # fmt: skip
    if prepared.squeezed is not None:
        attrs.update(df=prepared.df, s2_prior=prepared.squeezed.var_prior, df_prior=prepared.squeezed.df_prior)
    log.info("DE (%s): %d pairs of %d clusters × %d genes", method, len(p1), len(data.clusters), len(data.genes))
    from bigcat.progress import progress_bar

    with progress_bar(total=len(p1), unit="pairs", desc="de", enabled=progress) as bar:
        chunks = run_chunks(data, prepared, p1, p2, th, top=top, progress=bar.update)
        if out is None:
            parts = list(chunks)
            return DEResult(
                pd.concat([p for p, _ in parts], ignore_index=True),
                pd.concat([g for _, g in parts], ignore_index=True),
                attrs,
            )
        grid = _Matrix(data, matrix) if matrix else None
        return _write(chunks, out, attrs, overwrite=overwrite, storage_options=storage_options, matrix=grid)


def _check_options(method: str, th: Thresholds, low_th: float, top: int) -> None:
    if method not in METHODS:
        msg = f"unknown method {method!r}; choose one of {', '.join(METHODS)}"
        raise BigcatInputError(msg)
    problems = [
        ("padj_th", not 0 < th.padj_th <= 1, "a value in (0, 1]"),
        ("lfc_th", th.lfc_th < 0, "non-negative"),
        ("low_th", low_th < 0, "non-negative"),
        ("q1_th", not 0 <= th.q1_th <= 1, "between 0 and 1"),
        ("q2_th", th.q2_th is not None and not 0 <= th.q2_th <= 1, "between 0 and 1"),
        ("q_diff_th", th.q_diff_th < 0, "non-negative"),
        ("min_cells", th.min_cells < 1, "at least 1"),
        ("top", top < 0, "at least 0"),
    ]
    for name, bad, what in problems:
        if bad:
            msg = f"{name} must be {what}"
            raise BigcatInputError(msg)


def _write(chunks: Any, out: str | os.PathLike, attrs: dict, *, overwrite: bool,
           storage_options: dict | None, matrix: _Matrix | None = None) -> Path | str:  # fmt: skip
    """pairs.parquet and genes.parquet streamed chunk by chunk, the folder published atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bigcat._io import fs
    from bigcat._io.publish import publish, refuse_input_as_output, write_folder_marker

    refuse_input_as_output(out, [attrs["source"]])
    metadata = {b"bigcat": json.dumps(attrs, default=str).encode()}
    schemas = _schemas()
    with publish(out, overwrite=overwrite, storage_options=storage_options, kind="folder") as tmp:
        folder = Path(tmp)
        folder.mkdir(exist_ok=True)
        writers: dict[str, Any] = {}
        try:
            for pairs_table, genes_table in chunks:
                if matrix is not None:
                    matrix.add(pairs_table)
                for name, frame in (("pairs", pairs_table), ("genes", genes_table)):
                    schema = schemas[name].with_metadata(metadata)
                    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
                    if name not in writers:
                        writers[name] = pq.ParquetWriter(folder / f"{name}.parquet", schema)
                    writers[name].write_table(table, row_group_size=ROW_GROUP)
        finally:
            for writer in writers.values():
                writer.close()
        if matrix is not None:
            matrix.write(folder)
        write_folder_marker(folder, {"kind": "de", **{k: v for k, v in attrs.items() if not isinstance(v, float)
                                                        or np.isfinite(v)}})  # fmt: skip
    return fs.path_of(out)


class _Matrix:
    """The clusters × clusters matrix of one field of the pairs table, filled chunk by chunk."""

    def __init__(self, data: Any, field: str) -> None:
        self.field = field
        self.names = np.asarray(data.clusters, dtype=str)
        self.position = pd.Series(np.arange(len(self.names)), index=self.names)
        self.values = np.full((len(self.names), len(self.names)), np.nan, dtype=np.float32)
        self.means = data.means

    def add(self, pairs: pd.DataFrame) -> None:
        a = self.position[pairs["P1"].astype(str).to_numpy()].to_numpy()
        b = self.position[pairs["P2"].astype(str).to_numpy()].to_numpy()
        self.values[a, b] = self.values[b, a] = pairs[self.field].to_numpy()

    def write(self, folder: Path) -> None:
        """matrix-<field>.parquet (tested clusters only, in tree order) and its heatmap."""
        from bigcat.plot import _order

        rows = np.flatnonzero(~np.isnan(self.values).all(axis=1))
        rows = rows[_order(self.means[rows])]
        names = self.names[rows]
        grid = self.values[np.ix_(rows, rows)]
        pd.DataFrame(grid, index=pd.Index(names, name="cluster"), columns=names).to_parquet(
            folder / f"matrix-{self.field}.parquet"
        )
        _heatmap(grid, names, self.field, folder / f"matrix-{self.field}.png")


def _heatmap(grid: np.ndarray, names: np.ndarray, field: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    side = float(np.clip(len(names) / 40, 4, 24))
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    image = ax.imshow(np.log10(1 + grid), cmap="jet", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=f"log10(1 + {field})")
    if len(names) <= 200:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(f"DE {field} between clusters ({len(names):,})")
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": "bigcat"})
