"""Commands to work with data interactively: open (a shell) and demo (a tour)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bigcat.cli._app import ClusterSpec, IdleTimeout, Quiet, StorageOptions, _progress, app, parse_storage_options

__all__ = ["demo", "open_"]


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
