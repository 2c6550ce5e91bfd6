"""Resumable conversions: the partial store and its recorded progress.

A conversion (``open_writer(..., resume=False|True)``) writes its store under a fixed
hidden name beside the output (``.NAME.zarr.bigcat-partial``; for a URL, the output
itself, marked incomplete) and, after every shard of values is safely written, records
its progress in ``bigcat-resume/`` inside it: ``state.json`` (rows and values done, the
input's fingerprint, the settings) and the per-row value counts since the previous
checkpoint (``rows-NNNNNN.npy``). An interrupted run (SIGKILL, Ctrl-C, a lost
connection) leaves that behind; ``resume=True`` refuses it if the input or the settings
changed, else truncates the arrays to the last complete shard, re-reads the values of
the shard in progress from the store itself and continues with the next row. The
``bigcat-resume/`` folder is removed before the completion marker is written, so a
resumed store is byte for byte the store an uninterrupted run writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bigcat._io import fs
from bigcat._io.publish import (
    check_replaceable,
    check_writable,
    output_lock,
    read_marker,
    remove_local,
    swap_into,
)
from bigcat.errors import BigcatInputError, BigcatOutputExistsError

__all__ = ["Checkpoints", "partial_store"]

log = logging.getLogger("bigcat")

#: folder inside a partial store holding the progress of a resumable conversion
RESUME_DIR = "bigcat-resume"


class Checkpoints:
    """The progress of a resumable conversion, kept inside its partial store.

    Parameters
    ----------
    store
        The partial store (a local path or a URL).
    settings
        What must not change between the interrupted and the resumed run (input
        fingerprint, layout, dtype, shape, chunking).
    storage_options
        fsspec options for URLs.
    """

    def __init__(self, store: Any, settings: dict, storage_options: dict | None = None) -> None:
        self.url = fs.is_url(store)
        self.dir: Any
        self.settings = json.loads(json.dumps(settings, default=str))  # as it reads back from JSON
        if self.url:
            self.fs, root = fs.filesystem(str(store), storage_options)
            self.dir = f"{root.rstrip('/')}/{RESUME_DIR}"
        else:
            self.fs, self.dir = None, fs.local(store) / RESUME_DIR
        self.rows = 0
        self.nnz = 0
        self.n_files = 0

    def _path(self, name: str) -> Any:
        return f"{self.dir}/{name}" if self.url else self.dir / name

    def read(self) -> dict | None:
        """The recorded state, or ``None`` when there is none (or it is unreadable)."""
        path = self._path("state.json")
        try:
            raw = self.fs.cat_file(path) if self.url else path.read_bytes()
            return json.loads(raw)
        except (OSError, ValueError):
            return None

    def adopt(self, state: dict, *, counts: bool = True) -> np.ndarray:
        """Continue from ``state``; returns the value count of each row done (``counts``:
        the layout recorded them)."""
        import io

        self.rows, self.nnz, self.n_files = int(state["rows"]), int(state["nnz"]), int(state["files"])
        parts = []
        for k in range(self.n_files):
            path = self._path(f"rows-{k:06d}.npy")
            raw = self.fs.cat_file(path) if self.url else path.read_bytes()
            parts.append(np.load(io.BytesIO(raw)))
        found = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if counts and (len(found) != self.rows or int(found.sum()) != self.nnz):
            msg = f"{self.dir}: the recorded progress is inconsistent; rerun without --resume to start over"
            raise BigcatInputError(msg)
        return found

    def save(self, rows: int, nnz: int, row_counts: np.ndarray | None) -> None:
        """Record that the first ``rows`` rows (``nnz`` values) are safely in the store.

        ``row_counts``: the value count of each row since the previous checkpoint (sparse
        layout; ``None`` when the layout needs none). Written before the state that
        refers to it, and the state replaced in one step, so a kill at any moment leaves a
        consistent record.
        """
        import io

        if rows <= self.rows:
            return
        files = self.n_files
        if row_counts is not None:
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(row_counts, dtype=np.int64))
            self._write(f"rows-{files:06d}.npy", buffer.getvalue())
            files += 1
        state = {"settings": self.settings, "rows": int(rows), "nnz": int(nnz), "files": files}
        self._write("state.json", json.dumps(state).encode(), atomic=True)
        self.rows, self.nnz, self.n_files = rows, nnz, files

    def _write(self, name: str, data: bytes, *, atomic: bool = False) -> None:
        if self.url:
            self.fs.pipe_file(self._path(name), data)  # one PUT: all or nothing
            return
        self.dir.mkdir(exist_ok=True)
        path = self._path(name)
        tmp = path.with_name(path.name + ".tmp") if atomic else path
        tmp.write_bytes(data)
        if atomic:
            tmp.replace(path)

    def remove(self) -> None:
        """Forget the progress (before the store is completed)."""
        if self.url:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.dir, recursive=True)
        elif self.dir.exists():
            shutil.rmtree(self.dir)


def _describe_state(state: dict) -> str:
    shape = state.get("settings", {}).get("shape") or ["?", "?"]
    return f"{state.get('rows', 0):,} of {shape[0]:,} rows" if isinstance(shape[0], int) else "some rows"


def _settings_differ(recorded: dict, wanted: dict) -> list[str]:
    return [key for key in sorted(set(recorded) | set(wanted)) if recorded.get(key) != wanted.get(key)]


#: the options of ``bigcat convert`` behind each recorded setting a resume must repeat
SETTING_FLAGS = {"shard": "--shard-values", "chunk_cells": "--chunk-cells", "layout": "--layout"}


def _resume_refusal(final: Any, changed: list[str], recorded: dict, wanted: dict) -> str:
    """Why a resume is refused, naming what to pass: the interrupted run's own options, or
    that its input changed (then only starting over helps)."""
    options = [key for key in changed if key in SETTING_FLAGS]
    if options and len(options) == len(changed):
        flags = " ".join(f"{SETTING_FLAGS[key]} {recorded.get(key)}" for key in options)
        used = ", ".join(f"{SETTING_FLAGS[key]} {recorded.get(key)} (this run: {wanted.get(key)})" for key in options)
        return (
            f"{final}: the interrupted conversion used {used}; rerun with --resume {flags} to continue it, "
            "or --overwrite to start over"
        )
    what = "the input changed since" if "source" in changed else f"other {' and '.join(changed)} than"
    return f"{final}: refusing to resume: {what} the interrupted conversion; rerun with --overwrite to start over"


@contextlib.contextmanager
def partial_store(
    final: str | os.PathLike,
    *,
    settings: dict,
    overwrite: bool = False,
    resume: bool = False,
    storage_options: dict | None = None,
) -> Iterator[tuple[Any, Checkpoints, dict | None]]:
    """Where a resumable conversion writes (under :func:`output_lock`)."""
    with (
        output_lock(final),
        _partial_store(
            final, settings=settings, overwrite=overwrite, resume=resume, storage_options=storage_options
        ) as where,
    ):
        yield where


def _partial_location(final: Any, *, overwrite: bool, storage_options: dict | None) -> tuple[Any, Any, bool]:
    """``(final, partial, whether the partial exists)``: a URL is written in place (a
    complete store bigcat wrote there is removed with ``overwrite``); a local output next to
    its final name, after checking the folder and what the final name holds."""
    if fs.is_url(final):
        partial = str(final)
        there = fs.exists(partial, storage_options)
        marker = read_marker(partial, storage_options) if there else None
        if there and (marker is None or marker.get("complete")):
            if not overwrite:
                msg = f"{partial}: output exists; pass --overwrite (overwrite=True) to replace it"
                raise BigcatOutputExistsError(msg)
            if marker is None:
                msg = f"{partial}: output exists and is not a store bigcat wrote; bigcat will not delete it"
                raise BigcatOutputExistsError(msg)
            fs.remove(partial, storage_options)
            there = False
        return final, partial, there
    final = fs.local(final)
    if not final.parent.is_dir():
        msg = f"{final}: output folder {final.parent} does not exist"
        raise BigcatInputError(msg)
    check_replaceable(final, overwrite=overwrite)
    check_writable(final)
    partial = final.parent / f".{final.name}.bigcat-partial"
    return final, partial, partial.exists()


def _take_up_partial(
    final: Any, partial: Any, checkpoints: Checkpoints, state: dict | None, *, resume: bool, overwrite: bool,
    storage_options: dict | None,
) -> dict | None:  # fmt: skip
    """What to do with an unfinished store found at ``partial``: resume it (same settings
    only), refuse (progress recorded, neither flag given), or remove it; the state to resume."""
    url = fs.is_url(partial)
    if state is not None and resume:
        recorded = state.get("settings", {})
        changed = _settings_differ(recorded, checkpoints.settings)
        if changed:
            raise BigcatInputError(_resume_refusal(final, changed, recorded, checkpoints.settings))
        log.warning("%s: resuming after %s", final, _describe_state(state))
        if not url:  # writes the kill cut short: zarr's temporary files (KEY.<uuid>.partial)
            for leftover in partial.rglob("*.partial"):
                if re.fullmatch(r".*\.[0-9a-f]{32}\.partial", leftover.name):
                    leftover.unlink()
        return state
    if state is not None and not overwrite:
        msg = (
            f"{final}: an interrupted conversion is there ({_describe_state(state)} done); "
            "pass --resume to continue it or --overwrite to start over"
        )
        raise BigcatOutputExistsError(msg)
    log.info("%s: removing an unfinished store without recorded progress", partial)
    if url:
        fs.remove(partial, storage_options)
    else:
        remove_local(partial)
    return None


@contextlib.contextmanager
def _partial_store(
    final: str | os.PathLike,
    *,
    settings: dict,
    overwrite: bool = False,
    resume: bool = False,
    storage_options: dict | None = None,
) -> Iterator[tuple[Any, Checkpoints, dict | None]]:
    """Where a resumable conversion writes: ``(partial store, checkpoints, state to resume)``.

    See the module docstring. On success the partial store is renamed to ``final``
    (locally; a URL is written in place). On failure it is kept when it holds recorded
    progress and the failure is not bad input (so ``resume=True`` can continue), and
    removed otherwise.

    Raises
    ------
    BigcatOutputExistsError
        ``final`` exists (or an interrupted conversion of it does) and neither
        ``overwrite`` nor ``resume`` says what to do.
    BigcatInputError
        ``resume`` and the interrupted conversion was of another input or used other
        settings; or the output folder is missing or not writable.
    """
    url = fs.is_url(final)
    final, partial, there = _partial_location(final, overwrite=overwrite, storage_options=storage_options)
    checkpoints = Checkpoints(partial, settings, storage_options)
    state = checkpoints.read() if there else None
    if there:
        state = _take_up_partial(final, partial, checkpoints, state, resume=resume, overwrite=overwrite,
                                 storage_options=storage_options)  # fmt: skip
    elif resume:
        log.warning("%s: nothing to resume, starting from the first row", final)
    try:
        yield partial, checkpoints, state
    except BaseException as error:
        recorded = checkpoints.read()
        if recorded is not None and not isinstance(error, BigcatInputError):
            log.warning(
                "%s: stopped after %s; rerun with --resume to continue from there", final, _describe_state(recorded)
            )
        elif url:
            with contextlib.suppress(Exception):
                fs.remove(partial, storage_options)
        else:
            remove_local(partial)
        raise
    if url:
        return
    swap_into(partial, Path(final), overwrite=overwrite)
