"""The ``bigcat`` command line: parses options, calls the Python API, reports errors.

Exit codes: 0 success, 1 runtime failure, 2 bad input or usage, 130 interrupted.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

app = typer.Typer(
    name="bigcat",
    help="Out-of-core tools for cell-by-gene matrices: synth, convert, sample, stats, markers, plot, open.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

log = logging.getLogger("bigcat")
_state = {"debug": False}

Quiet = Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="No progress bar.")]
ForceProgress = Annotated[
    bool, typer.Option("--progress", metavar="", help="Show the progress bar even when not on a terminal.")
]
StorageOptions = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Option(
        "--storage-option",
        help="KEY=VALUE passed to fsspec for URLs (e.g. endpoint_url=…, anon=true); repeatable.",
    ),
]
ClusterSpec = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--cluster",
        help="local (default), threads, sync, tcp://HOST:PORT or cluster.yaml (default: $DASK_SCHEDULER_ADDRESS).",
    ),
]
IdleTimeout = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--idle-timeout", help="Clusters bigcat starts stop after this long idle, e.g. '30 minutes'."),
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", metavar="", help="Replace an existing output (only one bigcat wrote).")
]


def parse_storage_options(pairs: list[str] | None) -> dict | None:
    from bigcat.fs import parse_storage_options as parse

    return parse(pairs) or None


def _progress(quiet: bool, force: bool = False) -> bool | None:
    return False if quiet else True if force else None


def _dashboard(client: object) -> None:
    if client is not None:
        typer.echo(f"bigcat: Dask dashboard: {client.dashboard_link}", err=True)


def _show_version(value: bool) -> None:
    if value:
        from bigcat import __version__

        typer.echo(f"bigcat {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", metavar="", help="Show tracebacks and debug logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", metavar="", help="Log what is done.")] = False,
    version: Annotated[  # noqa: ARG001 - handled by its eager callback
        bool,
        typer.Option(
            "--version", metavar="", help="Print the version and exit.", callback=_show_version, is_eager=True
        ),
    ] = False,
) -> None:
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("bigcat: %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(level)
    # an optional-package hint distributed logs when it starts a dashboard: noise for our users
    logging.getLogger("distributed.http.proxy").setLevel(logging.ERROR)
    if not debug:  # a failed task's traceback, logged by an in-process worker: the error line says it
        logging.getLogger("distributed.worker").setLevel(logging.CRITICAL)


@app.command()
def synth(
    output: Annotated[str, typer.Argument(help="OUT.h5ad or OUT.zarr (a path or a URL)")],
    cells: Annotated[int, typer.Option("--cells", help="Number of cells.")] = 20_000,
    genes: Annotated[int, typer.Option("--genes", help="Number of genes.")] = 32_285,
    clusters: Annotated[int, typer.Option("--clusters", help="Number of clusters.")] = 50,
    nnz_per_cell: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option("--nnz-per-cell", help="Mean non-zeros per cell (default 2500, or 7.7% of fewer genes)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same file contents).")] = 0,
    layout: Annotated[str, typer.Option("--layout", help="Zarr layout: sparse or dense.")] = "sparse",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    storage_option: StorageOptions = None,
) -> None:
    """Write a synthetic atlas of raw counts (negative binomial, marker genes, skewed clusters)."""
    from bigcat.synth import synth as run

    path = run(
        output,
        n_cells=cells,
        n_genes=genes,
        n_clusters=clusters,
        nnz_per_cell=nnz_per_cell,
        seed=seed,
        layout=layout,
        overwrite=overwrite,
        progress=_progress(quiet),
        storage_options=parse_storage_options(storage_option),
    )
    typer.echo(f"wrote {path}: {cells} cells × {genes} genes, {clusters} clusters")


@app.command()
def convert(
    input: Annotated[str, typer.Argument(help="IN.h5ad (or an AnnData Zarr store; a path or a URL)")],  # noqa: A002
    output: Annotated[str, typer.Argument(help="OUT.zarr (a path or a URL)")],
    layout: Annotated[str, typer.Option("--layout", help="sparse (AnnData encoding) or dense (xarray).")] = "sparse",
    chunk_cells: Annotated[Optional[int], typer.Option("--chunk-cells", help="Rows per dense chunk (8000).")] = None,  # noqa: UP045
    shard_values: Annotated[
        int, typer.Option("--shard-values", help="Sparse layout: values per file of X/data and X/indices.")
    ] = 32 << 20,
    block_values: Annotated[
        int, typer.Option("--block-values", help="Stored values read per block (memory ~ 30 bytes each).")
    ] = 8_000_000,
    cluster: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--cluster", help="Copy a CSR input in parallel on this Dask cluster (default: stream here)."),
    ] = None,
    idle_timeout: IdleTimeout = None,
    overwrite: Overwrite = False,
    resume: Annotated[
        bool,
        typer.Option("--resume", metavar="", help="Continue an interrupted conversion from its last recorded row."),
    ] = False,
    skip: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--skip",
            help="Leave out these AnnData elements (comma-separated slots or elements: layers,raw,obsm/X_pca); "
            "all others are copied.",
        ),
    ] = None,
    quiet: Quiet = False,
    storage_option: StorageOptions = None,
    progress: ForceProgress = False,
) -> None:
    """Convert an .h5ad file to a chunked Zarr store, streaming in bounded memory (resumable).

    X, obs, var, uns and every layer, raw, obsm, varm, obsp and varp are copied (the dense
    layout holds X alone: leave the others out with --skip).
    """
    import contextlib

    from bigcat.cluster import connect
    from bigcat.convert import convert as run

    with connect(cluster, idle_timeout=idle_timeout) if cluster else contextlib.nullcontext() as client:
        _dashboard(client)
        path = run(
            input,
            output,
            layout=layout,
            chunk_cells=chunk_cells,
            overwrite=overwrite,
            progress=_progress(quiet, progress),
            client=client,
            storage_options=parse_storage_options(storage_option),
            resume=resume,
            shard_values=shard_values,
            block_nnz=block_values,
            skip=(skip or "").split(","),
        )
    typer.echo(f"wrote {path}")


@app.command()
def sample(
    input: Annotated[str, typer.Argument(help="IN.h5ad or IN.zarr (a path or a URL)")],  # noqa: A002
    output: Annotated[str, typer.Argument(help="OUT.h5ad or OUT.zarr (a path or a URL)")],
    fraction: Annotated[Optional[float], typer.Option("--fraction", help="Keep sqrt(F) of cells and of genes.")] = None,  # noqa: UP045
    cells: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option("--cell-fraction", "--cells", help="Fraction of cells to keep (0–1)."),
    ] = None,
    genes: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option("--gene-fraction", "--genes", help="Fraction of genes to keep (0–1)."),
    ] = None,
    n_cells: Annotated[Optional[int], typer.Option("--n-cells", help="Number of cells to keep.")] = None,  # noqa: UP045
    max_cells_per_cluster: Annotated[
        Optional[int], typer.Option("--max-cells-per-cluster", help="At most N cells per --by group.")  # noqa: UP045
    ] = None,
    by: Annotated[str, typer.Option("--by", help="obs column for --max-cells-per-cluster.")] = "cluster",
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    layout: Annotated[str, typer.Option("--layout", help="Zarr layout of the output.")] = "sparse",
    cluster: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--cluster", help="Read and subset row blocks on this Dask cluster (default: here)."),
    ] = None,
    idle_timeout: IdleTimeout = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    storage_option: StorageOptions = None,
) -> None:
    """Write a random subset of cells and genes, without loading the matrix."""
    import contextlib

    from bigcat.cluster import connect
    from bigcat.errors import BigcatInputError
    from bigcat.sample import sample as run

    if all(v is None for v in (fraction, cells, genes, n_cells, max_cells_per_cluster)):
        msg = (
            "sample needs a choice of what to keep: --fraction F, --cell-fraction F [--gene-fraction F], --n-cells N "
            "or --max-cells-per-cluster N (use convert to copy everything)"
        )
        raise BigcatInputError(msg)

    with connect(cluster, idle_timeout=idle_timeout) if cluster else contextlib.nullcontext() as client:
        _dashboard(client)
        path = run(
            input,
            output,
            fraction=fraction,
            cells=cells,
            genes=genes,
            n_cells=n_cells,
            max_cells_per_cluster=max_cells_per_cluster,
            by=by,
            seed=seed,
            layout=layout,
            overwrite=overwrite,
            progress=_progress(quiet),
            storage_options=parse_storage_options(storage_option),
            client=client,
        )
    typer.echo(f"wrote {path}")


@app.command()
def stats(
    inputs: Annotated[Optional[list[str]], typer.Argument(help="IN.zarr|IN.h5ad … (statistics accumulate)")] = None,  # noqa: UP045
    by: Annotated[str, typer.Option("--by", help="obs column with the cluster labels.")] = "cluster",
    labels: Annotated[Optional[str], typer.Option("--labels", help="CSV/Parquet table with the labels.")] = None,  # noqa: UP045
    label_column: Annotated[Optional[str], typer.Option("--label-column", help="Label column of --labels.")] = None,  # noqa: UP045
    cell_column: Annotated[Optional[str], typer.Option("--cell-column", help="Cell-name column of --labels.")] = None,  # noqa: UP045
    statistics: Annotated[str, typer.Option("--stats", help="Comma-separated statistics.")] = "means,present,sqr_means",
    normalize: Annotated[Optional[str], typer.Option("--normalize", help="log2cpm: on the fly from counts.")] = None,  # noqa: UP045
    threshold: Annotated[float, typer.Option("--threshold", help="present counts x > threshold.")] = 0.0,
    present_op: Annotated[str, typer.Option("--present-op", help="gt (x > th) or ge (x >= th).")] = "gt",
    max_cells_per_cluster: Annotated[
        Optional[int], typer.Option("--max-cells-per-cluster", help="Sample at most N cells per cluster.")  # noqa: UP045
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed for --max-cells-per-cluster.")] = 0,
    engine: Annotated[str, typer.Option("--engine", help="blocks (default) or groupby (xarray+flox).")] = "blocks",
    block_values: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            "--block-values",
            help="Stored values per block read by one task (memory per task; default 8M, 32M with >800 clusters).",
        ),
    ] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="stats.zarr|.parquet|.h5ad|.csv")] = None,  # noqa: UP045
    out_format: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--format",
            help="mapmycells: write --out X.h5 as MapMyCells' precomputed_stats.h5 (sum, sumsq, gt0, gt1, ge1, "
            "n_cells, taxonomy tree) in one pass.",
        ),
    ] = None,
    hierarchy: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--hierarchy", help="mapmycells: taxonomy levels, coarsest first (class,subclass,cluster)."),
    ] = None,
    taxonomy: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--taxonomy", help="mapmycells: CSV/Parquet with a column per --hierarchy level."),
    ] = None,
    present_at: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--present-at", help="Further presence tests in the same pass, e.g. gt1,ge1."),
    ] = None,
    wide: Annotated[
        bool, typer.Option("--wide", metavar="", help="Parquet/CSV: a genes × clusters table per statistic.")
    ] = False,
    merge: Annotated[
        bool, typer.Option("--merge", metavar="", help="Merge the given statistics stores instead.")
    ] = False,
    allow_duplicates: Annotated[
        bool,
        typer.Option(
            "--allow-duplicates", metavar="", help="Accept inputs sharing cell names, or merging a result twice."
        ),
    ] = False,
    cluster: ClusterSpec = None,
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
    if out_format:
        from bigcat.mapmycells import precompute_stats

        with connect(cluster, idle_timeout=idle_timeout) as client:
            _dashboard(client)
            written = precompute_stats(
                list(inputs), out, by=by, hierarchy=_names(hierarchy), taxonomy=taxonomy, normalize=normalize,
                labels=labels, label_column=label_column, cell_column=cell_column,
                max_cells_per_cluster=max_cells_per_cluster, seed=seed, engine=engine, client=client,
                block_nnz=block_values, progress=_progress(quiet, progress), overwrite=overwrite,
                storage_options=options,
            )  # fmt: skip
        typer.echo(f"wrote {written}")
        return
    if merge:
        if out is None:
            msg = "--merge needs --out"
            raise BigcatInputError(msg)
        result = merge_stats(inputs, storage_options=options, allow_repeats=allow_duplicates)
    else:
        with connect(cluster, idle_timeout=idle_timeout) as client:
            _dashboard(client)
            result = cluster_stats(
                list(inputs),
                by=by,
                stats=statistics,
                labels=labels,
                label_column=label_column,
                cell_column=cell_column,
                normalize=normalize,
                threshold=threshold,
                present_op=present_op,
                present_at=present_at or (),
                max_cells_per_cluster=max_cells_per_cluster,
                seed=seed,
                engine=engine,
                block_nnz=block_values,
                client=client,
                progress=_progress(quiet, progress),
                storage_options=options,
                allow_duplicate_cells=allow_duplicates,
            )
    if out is None:
        typer.echo(result)
        return
    for path in write_stats(result, out, wide=wide, overwrite=overwrite, storage_options=options):
        typer.echo(f"wrote {path}")


def _names(text: str | None) -> list[str] | None:
    """``"a,b, c"`` → ``["a", "b", "c"]``; ``@file`` reads one name per line."""
    if text is None:
        return None
    if text.startswith("@"):
        from bigcat.errors import InputNotFoundError

        path = Path(text[1:])
        if not path.exists():
            msg = f"{path}: no such file (a list of names, one per line)"
            raise InputNotFoundError(msg)
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [name.strip() for name in text.split(",") if name.strip()]


Clusters = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--clusters", help="Comma-separated cluster names, or @FILE with one per line (default: all)."),
]
Scale = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--scale", help="Means are 'log' or 'linear' (log2(mean+1) taken); default: from the statistics."),
]


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

Genes = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--genes", help="Comma-separated gene names, or @FILE with one per line."),
]
MarkerCount = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option("--markers", help="Show the top N marker genes of each cluster shown."),
]
Order = Annotated[str, typer.Option("--order", help="Cluster order: hierarchical or given.")]
FigureOut = Annotated[str, typer.Option("--out", help="Figure file: .png, .svg or .pdf.")]


def _plot(kind: str, stats_path: str, out: str, overwrite: bool, storage_option: list[str] | None, **how: Any) -> None:
    """Draw every page of a ``kind`` plot and save it; with several pages, page N goes to OUT-pNNN.png."""
    from bigcat import fs, plot

    options = parse_storage_options(storage_option)
    plot.check_format(out)
    suffix = fs.suffix_of(out)
    stem = out[: -len(suffix)]
    pages = plot.dotplot_pages if kind == "dotplot" else plot.heatmap_pages
    for fig in pages(stats_path, storage_options=options, **how):
        layout = fig.bigcat_layout
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


@app.command("open")
def open_(
    paths: Annotated[Optional[list[str]], typer.Argument(help="Files to open as data1 … dataN.")] = None,  # noqa: UP045
    cluster: ClusterSpec = None,
    idle_timeout: IdleTimeout = None,
    command: Annotated[Optional[str], typer.Option("--command", "-c", help="Run this code and exit.")] = None,  # noqa: UP045
    storage_option: StorageOptions = None,
    quiet: Quiet = False,  # noqa: ARG001 - accepted by every command (nothing to silence here)
) -> None:
    """An interactive Python shell with the datasets opened and a Dask client ready."""
    from bigcat.shell import open_shell

    open_shell(
        paths or [],
        cluster=cluster,
        command=command,
        idle_timeout=idle_timeout,
        storage_options=parse_storage_options(storage_option),
    )


@app.command()
def demo(
    folder: Annotated[Path, typer.Argument(help="Where to write the demo files.")] = Path("demo-data"),
    cells: Annotated[int, typer.Option("--cells", help="Number of cells.")] = 20_000,
    quiet: Quiet = False,
) -> None:
    """Run the pipeline on a synthetic atlas: synth → convert → open → stats → markers → dot plot."""
    from bigcat.demo import run_demo

    run_demo(folder, n_cells=cells, progress=_progress(quiet))


def killed_worker_message(error: BaseException) -> str:
    """One line for a Dask ``KilledWorker``: which step died, and what to change."""
    from bigcat.sample import STEPS as SAMPLE_STEPS
    from bigcat.stats.blocks import STEPS as STATS_STEPS
    from bigcat.store import STEPS as COPY_STEPS

    task = error.args[0] if error.args else "?"
    name = task[0] if isinstance(task, tuple) else str(task)
    steps = {**STATS_STEPS, **COPY_STEPS, **SAMPLE_STEPS}
    step, smaller = next(
        ((s, m) for prefix, (s, m) in steps.items() if name.startswith(prefix)), (f"task {name}", "smaller blocks")
    )
    return (
        f"a Dask worker died while computing {step}, probably out of memory (task {name}); give each worker "
        f"more memory (dask worker --memory-limit, or memory in cluster.yaml) or use {smaller}"
    )


STORAGE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "adlfs")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:500] + ("…" if len(text) > 500 else "")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (errors as one line on stderr, tracebacks with --debug)."""
    argv = sys.argv[1:] if argv is None else argv
    _state["debug"] = "--debug" in argv
    previous = _terminate_like_ctrl_c()
    try:
        code = app(args=argv, prog_name="bigcat", standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into Exit(130), returned in non-standalone mode
            typer.echo("bigcat: interrupted", err=True)
            return 130
        return code if isinstance(code, int) else 0
    except typer.Exit as done:
        return done.exit_code
    except KeyboardInterrupt:
        typer.echo("bigcat: interrupted", err=True)
        return 130
    except Exception as error:  # noqa: BLE001 - each kind is reported or re-raised below
        return _report(error)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _report(error: Exception) -> int:
    """One line on stderr for ``error`` and its exit code; re-raises what is not bigcat's to
    report (and everything with --debug). Called while ``error`` is being handled."""
    try:  # recent typer vendors its own click
        from typer._click.exceptions import ClickException
    except ImportError:
        from click import ClickException

    from bigcat.errors import BigcatError

    if isinstance(error, ClickException):
        error.show()
        return 2
    if isinstance(error, typer.Abort):
        typer.echo("bigcat: interrupted", err=True)
        return 130
    if _state["debug"]:
        raise error
    if isinstance(error, BigcatError):
        typer.echo(f"bigcat: error: {error}", err=True)
        return error.exit_code
    if isinstance(error, PermissionError):
        typer.echo(
            f"bigcat: error: access denied: {_one_line(error)}; check the credentials (AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, ~/.aws, --storage-option key=… secret=…) and the permissions",
            err=True,
        )
        return 1
    if isinstance(error, (OSError, RuntimeError, MemoryError)):
        typer.echo(
            f"bigcat: error: {type(error).__name__}: {_one_line(error)} (rerun with --debug for the traceback)",
            err=True,
        )
        return 1
    if type(error).__name__ == "KilledWorker":
        typer.echo(f"bigcat: error: {killed_worker_message(error)}", err=True)
        return 1
    # object-storage clients raise their own exception types (botocore's are not OSErrors)
    if not type(error).__module__.startswith(STORAGE_MODULES):
        raise error
    typer.echo(f"bigcat: error: storage: {type(error).__name__}: {_one_line(error)}", err=True)
    return 1


def _terminate_like_ctrl_c() -> Any:
    """SIGTERM (``kill``, a batch system ending the job) unwinds like Ctrl-C, so clusters
    bigcat started are shut down (their worker jobs cancelled) and partial outputs removed.
    Returns the previous handler (``None`` off the main thread, where none can be set)."""

    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def entry_point() -> None:
    """Console-script entry point."""
    sys.exit(main())
