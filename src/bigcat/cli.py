"""The ``bigcat`` command line: parses options, calls the Python API, reports errors.

Exit codes: 0 success, 1 runtime failure, 2 bad input or usage, 130 interrupted.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="bigcat",
    help="Out-of-core tools for cell-by-gene matrices: synth, convert, sample, open.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

log = logging.getLogger("bigcat")
_state = {"debug": False}

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
ForceProgress = Annotated[bool, typer.Option("--progress", help="Show the progress bar even when not on a terminal.")]
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
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output (only one bigcat wrote).")]


def parse_storage_options(pairs: list[str] | None) -> dict | None:
    from bigcat.fs import parse_storage_options as parse

    return parse(pairs) or None


def _progress(quiet: bool, force: bool = False) -> bool | None:
    return False if quiet else True if force else None


def _dashboard(client: object) -> None:
    if client is not None:
        typer.echo(f"bigcat: Dask dashboard: {client.dashboard_link}", err=True)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what is done.")] = False,
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


@app.command()
def synth(
    output: Annotated[str, typer.Argument(help="OUT.h5ad or OUT.zarr (a path or a URL)")],
    cells: Annotated[int, typer.Option("--cells", help="Number of cells.")] = 20_000,
    genes: Annotated[int, typer.Option("--genes", help="Number of genes.")] = 32_285,
    clusters: Annotated[int, typer.Option("--clusters", help="Number of clusters.")] = 50,
    nnz_per_cell: Annotated[int, typer.Option("--nnz-per-cell", help="Mean non-zeros per cell.")] = 2500,
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
    cluster: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--cluster", help="Copy a CSR input in parallel on this Dask cluster (default: stream here)."),
    ] = None,
    idle_timeout: IdleTimeout = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    storage_option: StorageOptions = None,
    progress: ForceProgress = False,
) -> None:
    """Convert an .h5ad file to a chunked Zarr store, streaming in bounded memory."""
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
        )
    typer.echo(f"wrote {path}")


@app.command()
def sample(
    input: Annotated[str, typer.Argument(help="IN.h5ad or IN.zarr (a path or a URL)")],  # noqa: A002
    output: Annotated[str, typer.Argument(help="OUT.h5ad or OUT.zarr (a path or a URL)")],
    fraction: Annotated[Optional[float], typer.Option("--fraction", help="Keep sqrt(F) of cells and of genes.")] = None,  # noqa: UP045
    cells: Annotated[Optional[float], typer.Option("--cells", help="Fraction of cells to keep.")] = None,  # noqa: UP045
    genes: Annotated[Optional[float], typer.Option("--genes", help="Fraction of genes to keep.")] = None,  # noqa: UP045
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
    from bigcat.sample import sample as run

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
    out: Annotated[Optional[str], typer.Option("--out", help="stats.zarr|.parquet|.h5ad|.csv")] = None,  # noqa: UP045
    wide: Annotated[bool, typer.Option("--wide", help="Parquet/CSV: a genes × clusters table per statistic.")] = False,
    merge: Annotated[bool, typer.Option("--merge", help="Merge the given statistics stores instead.")] = False,
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
    options = parse_storage_options(storage_option)
    if merge:
        if out is None:
            msg = "--merge needs --out"
            raise BigcatInputError(msg)
        result = merge_stats(inputs, storage_options=options)
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
                max_cells_per_cluster=max_cells_per_cluster,
                seed=seed,
                engine=engine,
                client=client,
                progress=_progress(quiet, progress),
                storage_options=options,
            )
    if out is None:
        typer.echo(result)
        return
    for path in write_stats(result, out, wide=wide, overwrite=overwrite, storage_options=options):
        typer.echo(f"wrote {path}")


@app.command("open")
def open_(
    paths: Annotated[Optional[list[str]], typer.Argument(help="Files to open as data1 … dataN.")] = None,  # noqa: UP045
    cluster: ClusterSpec = None,
    idle_timeout: IdleTimeout = None,
    command: Annotated[Optional[str], typer.Option("--command", "-c", help="Run this code and exit.")] = None,  # noqa: UP045
    storage_option: StorageOptions = None,
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
    """Run the pipeline on a synthetic atlas: synth → convert → open, printing what it opened."""
    from bigcat.demo import run_demo

    run_demo(folder, n_cells=cells, progress=_progress(quiet))


STORAGE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "adlfs")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:500] + ("…" if len(text) > 500 else "")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (errors as one line on stderr, tracebacks with --debug)."""
    try:  # recent typer vendors its own click
        from typer._click.exceptions import ClickException
    except ImportError:
        from click import ClickException

    from bigcat.errors import BigcatError

    argv = sys.argv[1:] if argv is None else argv
    _state["debug"] = "--debug" in argv
    try:
        app(args=argv, prog_name="bigcat", standalone_mode=False)
    except typer.Exit as done:
        return done.exit_code
    except ClickException as error:
        error.show()
        return 2
    except typer.Abort:
        typer.echo("bigcat: interrupted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("bigcat: interrupted", err=True)
        return 130
    except BigcatError as error:
        if _state["debug"]:
            raise
        typer.echo(f"bigcat: error: {error}", err=True)
        return error.exit_code
    except PermissionError as error:
        if _state["debug"]:
            raise
        typer.echo(
            f"bigcat: error: access denied: {_one_line(error)}; check the credentials (AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, ~/.aws, --storage-option key=… secret=…) and the permissions",
            err=True,
        )
        return 1
    except (OSError, RuntimeError, MemoryError) as error:
        if _state["debug"]:
            raise
        typer.echo(
            f"bigcat: error: {type(error).__name__}: {_one_line(error)} (rerun with --debug for the traceback)",
            err=True,
        )
        return 1
    except Exception as error:
        # object-storage clients raise their own exception types (botocore's are not OSErrors)
        if _state["debug"] or not type(error).__module__.startswith(STORAGE_MODULES):
            raise
        typer.echo(f"bigcat: error: storage: {type(error).__name__}: {_one_line(error)}", err=True)
        return 1
    return 0


def entry_point() -> None:
    """Console-script entry point."""
    sys.exit(main())
