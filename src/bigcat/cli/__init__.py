"""The ``bigcat`` command line: parses options, calls the Python API, reports errors.

Exit codes: 0 success, 1 runtime failure, 2 bad input or usage, 130 interrupted. The
commands live in ``_data`` (synth, convert, sample, open, demo) and ``_analysis`` (stats,
markers, plot, map); importing them registers them with :data:`app`.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import typer

from bigcat.cli import _data, _de, _mapmycells, _stats, _workspace  # noqa: F401 - registers the commands
from bigcat.cli._app import _state, app

__all__ = ["app", "entry_point", "killed_worker_message", "main"]


def killed_worker_message(error: BaseException) -> str:
    """One line for a Dask ``KilledWorker``: which step died, and what to change."""
    from bigcat._io.copy import STEPS as COPY_STEPS
    from bigcat.sample import STEPS as SAMPLE_STEPS
    from bigcat.stats.blocks import STEPS as STATS_STEPS

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
        from click import ClickException  # type: ignore[assignment]

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
    """Console-script entry point.

    numpy asks the kernel to back its large arrays with transparent huge pages; where THP
    defrag is ``madvise`` (cloud VMs, the machines this was measured on) first touches then
    stall in direct compaction — 0.3 s of a 5 s marker run, and erratic. The command line owns
    its process, so it opts out before numpy is imported, unless ``NUMPY_MADVISE_HUGEPAGE`` is
    set already.

    Once the command is done, the process ends without tearing the interpreter down module by
    module (0.2–0.3 s after every command: numba, llvmlite, pandas, xarray): the exit
    handlers run (logging, clusters bigcat started), the standard streams are flushed, then
    ``os._exit``. Every output is closed and published by then (written under a temporary
    name and renamed when complete).
    """
    os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
    code = main()
    _exit_now(code)


def _exit_now(code: int) -> None:
    import atexit
    import contextlib

    atexit._run_exitfuncs()  # noqa: SLF001 - what interpreter shutdown would run first
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing left to deliver to
            stream.flush()
    os._exit(code)
