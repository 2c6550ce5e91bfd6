"""The ``bigcat`` application and the options its commands share."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

__all__ = ["app"]

app = typer.Typer(
    name="bigcat",
    help="Out-of-core tools for cell-by-gene matrices: synth, convert, sample, stats, markers, plot, open.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

log = logging.getLogger("bigcat")
#: whether ``--debug`` was given (tracebacks instead of one line)
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
    from bigcat._io.fs import parse_storage_options as parse

    return parse(pairs) or None


def _progress(quiet: bool, force: bool = False) -> bool | None:
    return False if quiet else True if force else None


def _dashboard(client: Any) -> None:
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


Clusters = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--clusters", help="Comma-separated cluster names, or @FILE with one per line (default: all)."),
]
Scale = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--scale", help="Means are 'log' or 'linear' (log2(mean+1) taken); default: from the statistics."),
]


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
