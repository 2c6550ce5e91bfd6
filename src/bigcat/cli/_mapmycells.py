"""``bigcat mapmycells …``: MapMyCells (cell_type_mapper) marker files from statistics."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from bigcat.cli._app import Overwrite, Quiet, StorageOptions, _progress, app, parse_storage_options

__all__ = ["reference_markers"]

mapmycells_app = typer.Typer(help="MapMyCells (cell_type_mapper) marker files.", no_args_is_help=True)
app.add_typer(mapmycells_app, name="mapmycells")


@mapmycells_app.command("reference-markers")
def reference_markers(
    stats_path: Annotated[
        str, typer.Argument(metavar="STATS.h5", help="precomputed_stats.h5 (bigcat stats --format mapmycells).")
    ],
    out: Annotated[str, typer.Option("--out", help="The reference_markers.h5 to write.")],
    p_th: Annotated[float, typer.Option("--p-th", help="Holm-adjusted Welch p below this.")] = 0.01,
    q1_th: Annotated[float, typer.Option("--q1-th", help="max(P1, P2) above this (P: fraction x >= 1).")] = 0.5,
    q1_min_th: Annotated[float, typer.Option("--q1-min-th", help="Floor of q1 (approximate test).")] = 0.1,
    qdiff_th: Annotated[float, typer.Option("--qdiff-th", help="|P1 - P2| / q1 above this.")] = 0.7,
    qdiff_min_th: Annotated[float, typer.Option("--qdiff-min-th", help="Floor of qdiff (approximate test).")] = 0.1,
    log2_fold_th: Annotated[float, typer.Option("--log2-fold-th", help="|mean1 - mean2| above this.")] = 1.0,
    log2_fold_min_th: Annotated[
        float, typer.Option("--log2-fold-min-th", help="Floor of the fold (approximate test).")
    ] = 0.8,
    n_valid: Annotated[int, typer.Option("--n-valid", help="Markers the approximate test tries for per pair.")] = 30,
    exact_penetrance: Annotated[
        bool, typer.Option("--exact-penetrance", help="Hold markers to the exact thresholds.")
    ] = False,
    query_path: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--query-path", help="An .h5ad whose genes (var index) are the only possible markers."),
    ] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    storage_option: StorageOptions = None,
) -> None:
    """Reference markers for every pair of leaves, as cell_type_mapper's reference_markers finds them."""
    from bigcat.mapmycells import reference_markers as run

    options = parse_storage_options(storage_option)
    genes = None
    if query_path is not None:
        from bigcat._io.source import open_source

        with open_source(query_path, require_marker=False, storage_options=options) as source:
            genes = [str(g) for g in source.var_names()]
    path = run(stats_path, out, p_th=p_th, q1_th=q1_th, q1_min_th=q1_min_th, qdiff_th=qdiff_th,
               qdiff_min_th=qdiff_min_th, log2_fold_th=log2_fold_th, log2_fold_min_th=log2_fold_min_th,
               n_valid=n_valid, exact_penetrance=exact_penetrance, genes=genes, overwrite=overwrite,
               progress=_progress(quiet), storage_options=options)  # fmt: skip
    typer.echo(f"wrote {path}")
