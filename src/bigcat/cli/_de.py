"""The ``de`` and ``merge`` commands: pairwise differential expression and cluster merging from statistics."""

from __future__ import annotations

from typing import Annotated, Any, Optional, cast

import typer

from bigcat.cli._app import Overwrite, Quiet, StorageOptions, _progress, app, parse_storage_options

__all__ = ["de", "merge"]

Pairs = Annotated[
    str,
    typer.Option(
        "--pairs",
        help="all, neighbors:K, siblings:TAXONOMY.csv[:COLUMN], or a CSV/Parquet table with P1 and P2.",
    ),
]
Method = Annotated[str, typer.Option("--method", help="fast_limma (default), t.test or chisq.")]
Stats = Annotated[str, typer.Argument(metavar="STATS", help="Statistics (bigcat stats --out …).")]
Q1 = Annotated[float, typer.Option("--q1-th", help="Present in more than this fraction of the cluster.")]
QDiff = Annotated[float, typer.Option("--q-diff-th", help="|q1 - q2| / max(q1, q2) above this.")]
Scale = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--scale", help="log: X held log2(CPM+1) (default: the statistics say)."),
]


@app.command()
def de(
    stats_path: Stats,
    out: Annotated[str, typer.Option("--out", help="Output folder: pairs.parquet and genes.parquet.")],
    pairs: Pairs = "all",
    method: Method = "fast_limma",
    padj_th: Annotated[float, typer.Option("--padj-th", help="Holm-adjusted p below this.")] = 0.01,
    lfc_th: Annotated[float, typer.Option("--lfc-th", help="|log2 fold change| above this.")] = 1.0,
    q1_th: Q1 = 0.5,
    q2_th: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option("--q2-th", help="Present in less than this fraction of the other cluster."),
    ] = None,
    q_diff_th: QDiff = 0.7,
    min_cells: Annotated[int, typer.Option("--min-cells", help="Clusters with fewer cells take no part.")] = 4,
    low_th: Annotated[float, typer.Option("--low-th", help="Present means x >= this.")] = 1.0,
    top: Annotated[int, typer.Option("--top", help="Genes of each direction kept per pair.")] = 50,
    matrix: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--matrix", help="score or num: also the clusters × clusters matrix and its heatmap."),
    ] = None,
    scale: Scale = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    storage_option: StorageOptions = None,
) -> None:
    """Differentially expressed genes between pairs of clusters (scrattch.bigcat's de_selected_pairs)."""
    from bigcat.de import de_pairs

    path = de_pairs(
        stats_path, pairs, cast("Any", method), padj_th=padj_th, lfc_th=lfc_th, q1_th=q1_th, q2_th=q2_th,
        q_diff_th=q_diff_th, min_cells=min_cells, low_th=low_th, top=top, scale=cast("Any", scale), out=out,
        matrix=cast("Any", matrix),
        overwrite=overwrite, storage_options=parse_storage_options(storage_option), progress=_progress(quiet),
    )  # fmt: skip
    typer.echo(f"wrote {path}")


@app.command()
def merge(
    stats_path: Stats,
    out: Annotated[str, typer.Option("--out", help="Merged statistics: .zarr, .parquet, .csv or .h5ad.")],
    mapping: Annotated[str, typer.Option("--mapping", help="Old → new cluster table: .csv or .parquet.")],
    de_score_th: Annotated[float, typer.Option("--de-score-th", help="Pairs scoring below this merge.")] = 150.0,
    min_genes: Annotated[int, typer.Option("--min-genes", help="Pairs with fewer DE genes merge.")] = 5,
    k: Annotated[int, typer.Option("--k", help="Nearest clusters tested against each cluster.")] = 4,
    merge_type: Annotated[str, typer.Option("--merge-type", help="undirectional or directional.")] = "undirectional",
    method: Method = "fast_limma",
    q1_th: Q1 = 0.5,
    q_diff_th: QDiff = 0.7,
    min_cells: Annotated[int, typer.Option("--min-cells", help="Smaller clusters join their nearest first.")] = 4,
    scale: Scale = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,  # noqa: ARG001 - accepted by every command (nothing to show here)
    storage_option: StorageOptions = None,
) -> None:
    """Merge clusters that are not distinct (scrattch.bigcat's merge_cl), from statistics alone."""
    from bigcat.de import merge_clusters
    from bigcat.marker_genes import write_table
    from bigcat.stats import write_stats

    options = parse_storage_options(storage_option)
    result = merge_clusters(
        stats_path, de_score_th=de_score_th, min_genes=min_genes, k=k, merge_type=cast("Any", merge_type),
        method=cast("Any", method), q1_th=q1_th, q_diff_th=q_diff_th, min_cells=min_cells, scale=cast("Any", scale),
        storage_options=options,
    )  # fmt: skip
    for path in write_stats(result.stats, out, overwrite=overwrite, storage_options=options):
        typer.echo(f"wrote {path}")
    typer.echo(f"wrote {write_table(result.mapping, mapping, overwrite=overwrite, storage_options=options)}")
    typer.echo(f"{len(result.mapping)} clusters → {result.mapping['merged'].nunique()}")
