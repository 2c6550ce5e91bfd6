"""Commands that make and move data: synth, convert, sample."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional, cast

import typer

from bigcat.cli._app import (
    ForceProgress,
    IdleTimeout,
    Overwrite,
    Quiet,
    StorageOptions,
    _dashboard,
    _progress,
    app,
    parse_storage_options,
)

if TYPE_CHECKING:
    from bigcat._io.layout import Layout

__all__ = ["convert", "sample", "synth"]


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
        layout=cast("Layout", layout),
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
            layout=cast("Layout", layout),
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
            layout=cast("Layout", layout),
            overwrite=overwrite,
            progress=_progress(quiet),
            storage_options=parse_storage_options(storage_option),
            client=client,
        )
    typer.echo(f"wrote {path}")
