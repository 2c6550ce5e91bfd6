"""Commands over cluster statistics: stats, markers, plot, map."""

from __future__ import annotations

import os
from typing import Annotated, Any, Optional

import typer

from bigcat.cli._app import (
    Clusters,
    ClusterSpec,
    FigureOut,
    ForceProgress,
    Genes,
    IdleTimeout,
    MarkerCount,
    Order,
    Overwrite,
    Quiet,
    Scale,
    StorageOptions,
    _dashboard,
    _names,
    _progress,
    app,
    parse_storage_options,
)

__all__ = ["map_", "markers_", "plot_dotplot", "plot_heatmap", "stats"]

StatsClusterSpec = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--cluster",
        help="threads, local, sync, tcp://HOST:PORT or cluster.yaml (default: $DASK_SCHEDULER_ADDRESS; else "
        "threads when the pass runs in this process without a graph — CSR inputs, the blocks engine — else local).",
    ),
]

Inputs = Annotated[Optional[list[str]], typer.Argument(help="IN.zarr|IN.h5ad … (statistics accumulate)")]  # noqa: UP045
By = Annotated[str, typer.Option("--by", help="obs column with the cluster labels.")]
Labels = Annotated[Optional[str], typer.Option("--labels", help="CSV/Parquet table with the labels.")]  # noqa: UP045
LabelColumn = Annotated[Optional[str], typer.Option("--label-column", help="Label column of --labels.")]  # noqa: UP045
CellColumn = Annotated[Optional[str], typer.Option("--cell-column", help="Cell-name column of --labels.")]  # noqa: UP045
Statistics = Annotated[str, typer.Option("--stats", help="Comma-separated statistics.")]
Normalize = Annotated[Optional[str], typer.Option("--normalize", help="log2cpm: on the fly from counts.")]  # noqa: UP045
Threshold = Annotated[float, typer.Option("--threshold", help="present counts x > threshold.")]
PresentOp = Annotated[str, typer.Option("--present-op", help="gt (x > th) or ge (x >= th).")]
MaxCells = Annotated[
    Optional[int], typer.Option("--max-cells-per-cluster", help="Sample at most N cells per cluster.")  # noqa: UP045
]
Seed = Annotated[int, typer.Option("--seed", help="Random seed for --max-cells-per-cluster.")]
Engine = Annotated[str, typer.Option("--engine", help="blocks (default) or groupby (xarray+flox).")]
BlockValues = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--block-values",
        help="Stored values per block read by one task (memory per task; default 8M, 32M with >800 clusters).",
    ),
]
StatsOut = Annotated[Optional[str], typer.Option("--out", help="stats.zarr|.parquet|.h5ad|.csv")]  # noqa: UP045
OutFormat = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--format",
        help="mapmycells: write --out X.h5 as MapMyCells' precomputed_stats.h5 (sum, sumsq, gt0, gt1, ge1, "
        "n_cells, taxonomy tree) in one pass.",
    ),
]
Hierarchy = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--hierarchy", help="mapmycells: taxonomy levels, coarsest first (class,subclass,cluster)."),
]
Taxonomy = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--taxonomy", help="mapmycells: CSV/Parquet with a column per --hierarchy level."),
]
PresentAt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--present-at", help="Further presence tests in the same pass, e.g. gt1,ge1."),
]
Wide = Annotated[bool, typer.Option("--wide", metavar="", help="Parquet/CSV: a genes × clusters table per statistic.")]
Merge = Annotated[bool, typer.Option("--merge", metavar="", help="Merge the given statistics stores instead.")]
AllowDuplicates = Annotated[
    bool,
    typer.Option("--allow-duplicates", metavar="", help="Accept inputs sharing cell names, or merging a result twice."),
]


@app.command()
def stats(
    inputs: Inputs = None,
    by: By = "cluster",
    labels: Labels = None,
    label_column: LabelColumn = None,
    cell_column: CellColumn = None,
    statistics: Statistics = "means,present,sqr_means",
    normalize: Normalize = None,
    threshold: Threshold = 0.0,
    present_op: PresentOp = "gt",
    max_cells_per_cluster: MaxCells = None,
    seed: Seed = 0,
    engine: Engine = "blocks",
    block_values: BlockValues = None,
    out: StatsOut = None,
    out_format: OutFormat = None,
    hierarchy: Hierarchy = None,
    taxonomy: Taxonomy = None,
    present_at: PresentAt = None,
    wide: Wide = False,
    merge: Merge = False,
    allow_duplicates: AllowDuplicates = False,
    cluster: StatsClusterSpec = None,
    idle_timeout: IdleTimeout = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    storage_option: StorageOptions = None,
    progress: ForceProgress = False,
) -> None:
    """Per-cluster statistics (means, present, sqr_means, …), out of core."""
    from bigcat.cluster import connect
    from bigcat.errors import BigcatInputError
    from bigcat.stats import cluster_stats, merge_stats, write_stats

    if not inputs:
        msg = "stats needs at least one input"
        raise BigcatInputError(msg)
    if out_format not in (None, "mapmycells"):
        msg = f"unknown --format {out_format!r}; the only one is mapmycells (default: from the --out suffix)"
        raise BigcatInputError(msg)
    if out_format and (out is None or merge):
        msg = "--format mapmycells needs --out precomputed_stats.h5 (and no --merge)"
        raise BigcatInputError(msg)
    options = parse_storage_options(storage_option)
    common: dict[str, Any] = {
        "by": by, "labels": labels, "label_column": label_column, "cell_column": cell_column, "normalize": normalize,
        "max_cells_per_cluster": max_cells_per_cluster, "seed": seed, "engine": engine, "block_nnz": block_values,
        "progress": _progress(quiet, progress), "storage_options": options,
    }  # fmt: skip
    if merge:
        if out is None:
            msg = "--merge needs --out"
            raise BigcatInputError(msg)
        result = merge_stats(inputs, storage_options=options, allow_repeats=allow_duplicates)
    else:
        if cluster is None and not os.environ.get("DASK_SCHEDULER_ADDRESS"):
            from bigcat.stats import runs_in_process

            # a pass without a graph: no scheduler to start (its dashboard would show nothing)
            if runs_in_process(list(inputs), engine=engine, storage_options=options):
                cluster = "threads"
        with connect(cluster, idle_timeout=idle_timeout) as client:
            _dashboard(client)
            if out_format:
                from bigcat.mapmycells import precompute_stats

                written = precompute_stats(
                    list(inputs), str(out), hierarchy=_names(hierarchy), taxonomy=taxonomy, client=client,
                    overwrite=overwrite, **common,
                )  # fmt: skip
                typer.echo(f"wrote {written}")
                return
            result = cluster_stats(
                list(inputs), stats=statistics, threshold=threshold, present_op=present_op,
                present_at=present_at or (), client=client, allow_duplicate_cells=allow_duplicates,
                _only_written=out is not None, **common,
            )  # fmt: skip
    if out is None:
        typer.echo(result)
        return
    for path in write_stats(result, out, wide=wide, overwrite=overwrite, storage_options=options):
        typer.echo(f"wrote {path}")


@app.command("markers")
def markers_(
    stats_path: Annotated[str, typer.Argument(metavar="STATS", help="Statistics: .zarr, .h5ad, .parquet or .csv.")],
    top: Annotated[int, typer.Option("--top", help="Markers per cluster.")] = 10,
    clusters: Clusters = None,
    min_present: Annotated[float, typer.Option("--min-present", help="Present in at least this fraction.")] = 0.0,
    scale: Scale = None,
    out: Annotated[Optional[str], typer.Option("--out", help="markers.csv or markers.parquet")] = None,  # noqa: UP045
    overwrite: Overwrite = False,
    storage_option: StorageOptions = None,
    quiet: Quiet = False,  # noqa: ARG001 - accepted by every command (nothing to silence here)
) -> None:
    """Top marker genes per cluster, ranked by specificity (present in vs out, log fold change)."""
    from bigcat.marker_genes import markers, write_table

    options = parse_storage_options(storage_option)
    table = markers(
        stats_path, top=top, clusters=_names(clusters), min_present=min_present, scale=scale, storage_options=options
    )
    if out is not None:
        typer.echo(f"wrote {write_table(table, out, overwrite=overwrite, storage_options=options)}")
        return
    import pandas as pd

    with pd.option_context("display.max_rows", 200, "display.width", 200, "display.float_format", "{:.3f}".format):
        typer.echo(table.to_string(index=False))


plot_app = typer.Typer(help="Dot plots and heatmaps of cluster statistics.", no_args_is_help=True)
app.add_typer(plot_app, name="plot")


def _plot(kind: str, stats_path: str, out: str, overwrite: bool, storage_option: list[str] | None, **how: Any) -> None:
    """Draw every page of a ``kind`` plot and save it; with several pages, page N goes to OUT-pNNN.png."""
    from bigcat import plot
    from bigcat._io import fs

    options = parse_storage_options(storage_option)
    plot.check_format(out)
    suffix = fs.suffix_of(out)
    stem = out[: -len(suffix)]
    pages = plot.dotplot_pages if kind == "dotplot" else plot.heatmap_pages
    for fig in pages(stats_path, storage_options=options, **how):
        layout = fig.bigcat_layout  # type: ignore[attr-defined]  # set by bigcat.plot
        target = out if layout.n_pages == 1 else f"{stem}-p{layout.page + 1:03d}{suffix}"
        typer.echo(f"wrote {plot.save(fig, target, overwrite=overwrite, storage_options=options)}")


@plot_app.command("dotplot")
def plot_dotplot(
    stats_path: Annotated[str, typer.Argument(metavar="STATS", help="Statistics: .zarr, .h5ad, .parquet or .csv.")],
    genes: Genes = None,
    markers: MarkerCount = None,
    clusters: Clusters = None,
    order: Order = "hierarchical",
    per_page: Annotated[int, typer.Option("--per-page", help="Clusters per page (one file per page).")] = 60,
    standard_scale: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--standard-scale", help="'gene': colour scaled 0–1 per gene."),
    ] = None,
    scale: Scale = None,
    out: FigureOut = "dotplot.png",
    overwrite: Overwrite = False,
    storage_option: StorageOptions = None,
    quiet: Quiet = False,  # noqa: ARG001 - accepted by every command (nothing to silence here)
) -> None:
    """Dot plot: dot area = fraction of cells present, colour = cluster mean."""
    _plot(
        "dotplot", stats_path, out, overwrite, storage_option, genes=_names(genes), markers=markers,
        clusters=_names(clusters), order=order, per_page=per_page, scale=scale, standard_scale=standard_scale,
    )  # fmt: skip


@plot_app.command("heatmap")
def plot_heatmap(
    stats_path: Annotated[str, typer.Argument(metavar="STATS", help="Statistics: .zarr, .h5ad, .parquet or .csv.")],
    genes: Genes = None,
    markers: MarkerCount = None,
    clusters: Clusters = None,
    order: Order = "hierarchical",
    per_page: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--per-page", help="Clusters per page (default: all on one page)."),
    ] = None,
    standard_scale: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--standard-scale", help="'zscore' or 'gene' (0–1) per gene; default: the means."),
    ] = None,
    scale: Scale = None,
    out: FigureOut = "heatmap.png",
    overwrite: Overwrite = False,
    storage_option: StorageOptions = None,
    quiet: Quiet = False,  # noqa: ARG001 - accepted by every command (nothing to silence here)
) -> None:
    """Heatmap of cluster means (clusters × genes), optionally scaled per gene."""
    _plot(
        "heatmap", stats_path, out, overwrite, storage_option, genes=_names(genes), markers=markers,
        clusters=_names(clusters), order=order, per_page=per_page, scale=scale, standard_scale=standard_scale,
    )  # fmt: skip


@app.command("map")
def map_(
    query: Annotated[str, typer.Argument(help="QUERY.h5ad or .zarr: the cells to map (raw counts).")],
    reference: Annotated[str, typer.Option("--reference", help="Reference statistics (bigcat stats --out …).")],
    markers: Annotated[int, typer.Option("--markers", help="Marker genes per reference cluster.")] = 20,
    method: Annotated[str, typer.Option("--method", help="correlation (default) or knn.")] = "correlation",
    reference_data: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--reference-data", help="knn: the reference cells (.h5ad/.zarr)."),
    ] = None,
    by: Annotated[str, typer.Option("--by", help="knn: obs column of the reference clusters.")] = "cluster",
    k: Annotated[int, typer.Option("--k", help="knn: neighbours that vote.")] = 15,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Resamples of half the markers (confidence).")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")] = 0,
    out: Annotated[Optional[str], typer.Option("--out", help="assignments.parquet or .csv")] = None,  # noqa: UP045
    cluster: ClusterSpec = None,
    idle_timeout: IdleTimeout = None,
    overwrite: Overwrite = False,
    storage_option: StorageOptions = None,
    quiet: Quiet = False,
) -> None:
    """Map query cells onto reference clusters (correlation with cluster means over markers, or kNN vote)."""
    from bigcat.cluster import connect
    from bigcat.mapping import map_cells
    from bigcat.marker_genes import write_table

    options = parse_storage_options(storage_option)
    with connect(cluster, idle_timeout=idle_timeout) as client:
        _dashboard(client)
        table = map_cells(
            query, reference, markers=markers, method=method, reference_data=reference_data, by=by, k=k,
            bootstrap=bootstrap, seed=seed, client=client, storage_options=options, progress=_progress(quiet),
        )  # fmt: skip
    counts = table["cluster"].astype(str).value_counts()
    typer.echo(
        f"mapped {len(table):,} cells to {len(counts)} clusters (median score {table['score'].median():.3f}); "
        f"largest: {', '.join(f'{c} {n:,}' for c, n in counts.head(3).items())}"
    )
    if out is not None:
        typer.echo(f"wrote {write_table(table.reset_index(), out, overwrite=overwrite, storage_options=options)}")
