"""The ``de`` command: pairwise differential expression from cluster statistics."""

from __future__ import annotations

from typing import Annotated, Any, Optional, cast

import typer

from bigcat.cli._app import Overwrite, Quiet, StorageOptions, _progress, app, parse_storage_options

__all__ = ["de"]

Pairs = Annotated[
    str,
    typer.Option(
        "--pairs",
        help="all, neighbors:K, siblings:TAXONOMY.csv[:COLUMN], or a CSV/Parquet table with P1 and P2.",
    ),
]
Method = Annotated[str, typer.Option("--method", help="fast_limma (default), t.test or chisq.")]


@app.command()
def de(
    stats_path: Annotated[str, typer.Argument(metavar="STATS", help="Statistics (bigcat stats --out …).")],
    out: Annotated[str, typer.Option("--out", help="Output folder: pairs.parquet and genes.parquet.")],
    pairs: Pairs = "all",
    method: Method = "fast_limma",
    padj_th: Annotated[float, typer.Option("--padj-th", help="Holm-adjusted p below this.")] = 0.01,
    lfc_th: Annotated[float, typer.Option("--lfc-th", help="|log2 fold change| above this.")] = 1.0,
    q1_th: Annotated[float, typer.Option("--q1-th", help="Present in more than this fraction of the cluster.")] = 0.5,
    q2_th: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option("--q2-th", help="Present in less than this fraction of the other cluster."),
    ] = None,
    q_diff_th: Annotated[float, typer.Option("--q-diff-th", help="|q1 - q2| / max(q1, q2) above this.")] = 0.7,
    min_cells: Annotated[int, typer.Option("--min-cells", help="Clusters with fewer cells take no part.")] = 4,
    low_th: Annotated[float, typer.Option("--low-th", help="Present means x >= this.")] = 1.0,
    top: Annotated[int, typer.Option("--top", help="Genes of each direction kept per pair.")] = 50,
    scale: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--scale", help="log: X held log2(CPM+1) (default: the statistics say)."),
    ] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    storage_option: StorageOptions = None,
) -> None:
    """Differentially expressed genes between pairs of clusters (scrattch.bigcat's de_selected_pairs)."""
    from bigcat.de import de_pairs

    path = de_pairs(
        stats_path, pairs, cast("Any", method), padj_th=padj_th, lfc_th=lfc_th, q1_th=q1_th, q2_th=q2_th,
        q_diff_th=q_diff_th, min_cells=min_cells, low_th=low_th, top=top, scale=cast("Any", scale), out=out,
        overwrite=overwrite, storage_options=parse_storage_options(storage_option), progress=_progress(quiet),
    )  # fmt: skip
    typer.echo(f"wrote {path}")
