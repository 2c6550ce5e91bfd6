"""``bigcat mapmycells …``: MapMyCells (cell_type_mapper) marker files from statistics."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from bigcat.cli._app import Overwrite, Quiet, StorageOptions, _progress, app, parse_storage_options

__all__ = ["query_markers", "reference_markers"]

mapmycells_app = typer.Typer(help="MapMyCells (cell_type_mapper) marker files.", no_args_is_help=True)
app.add_typer(mapmycells_app, name="mapmycells")


def _query_genes(query_path: str | None, options: dict | None) -> list[str] | None:
    """The var index of the query (cell_type_mapper's ``query_path``), or None."""
    if query_path is None:
        return None
    from bigcat._io.source import open_source

    with open_source(query_path, require_marker=False, storage_options=options) as source:
        return [str(g) for g in source.var_names()]


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
    genes = _query_genes(query_path, options)
    path = run(stats_path, out, p_th=p_th, q1_th=q1_th, q1_min_th=q1_min_th, qdiff_th=qdiff_th,
               qdiff_min_th=qdiff_min_th, log2_fold_th=log2_fold_th, log2_fold_min_th=log2_fold_min_th,
               n_valid=n_valid, exact_penetrance=exact_penetrance, genes=genes, overwrite=overwrite,
               progress=_progress(quiet), storage_options=options)  # fmt: skip
    typer.echo(f"wrote {path}")


def _overrides(pairs: list[str] | None) -> dict[str, int] | None:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        node, sep, n = pair.rpartition("=")
        if not sep or not node or not n.strip().isdigit():
            msg = f"{pair!r}: expected LEVEL/NODE=N (or None=N for the root)"
            raise typer.BadParameter(msg)
        out[node] = int(n)
    return out


@mapmycells_app.command("query-markers")
def query_markers(
    reference_path: Annotated[
        str, typer.Argument(metavar="REFERENCE_MARKERS.h5", help="reference_markers.h5 (reference-markers).")
    ],
    out: Annotated[str, typer.Option("--out", help="The query_markers.json to write.")],
    n_per_utility: Annotated[
        int, typer.Option("--n-per-utility", help="Markers wanted per pair of leaves and direction.")
    ] = 30,
    n_per_utility_override: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--n-per-utility-override", help="LEVEL/NODE=N: another n for one parent (repeatable)."),
    ] = None,
    genes_at_a_time: Annotated[
        int, typer.Option("--genes-at-a-time", help="Genes taken between updates (1: exact).")
    ] = 1,
    query_path: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--query-path", help="An .h5ad whose genes (var index) are the only possible markers."),
    ] = None,
    drop_level: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--drop-level", help="A taxonomy level to leave out."),
    ] = None,
    stats: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--stats", help="The precomputed_stats.h5 (default: the one the reference markers name)."),
    ] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    storage_option: StorageOptions = None,
) -> None:
    """Query markers for every parent node, as cell_type_mapper's query_markers chooses them."""
    from bigcat.mapmycells import query_markers as run

    options = parse_storage_options(storage_option)
    genes = _query_genes(query_path, options)
    overrides = _overrides(n_per_utility_override)
    path = run(reference_path, out, n_per_utility=n_per_utility, n_per_utility_override=overrides,
               genes_at_a_time=genes_at_a_time, genes=genes, drop_level=drop_level, stats=stats, overwrite=overwrite,
               progress=_progress(quiet), storage_options=options)  # fmt: skip
    typer.echo(f"wrote {path}")
