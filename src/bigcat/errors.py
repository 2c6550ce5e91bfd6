"""Exceptions raised by bigcat.

Every error a user can cause derives from :class:`BigcatError`; the command-line
interface turns these into a one-line message and a non-zero exit code. Errors about
bad input also subclass the matching builtin (``FileNotFoundError``, ``ValueError`` …)
so that generic ``except`` clauses keep working.
"""

from __future__ import annotations

__all__ = [
    "BigcatError",
    "BigcatFormatError",
    "BigcatInputError",
    "BigcatOutputExistsError",
    "BigcatStoreIncompleteError",
    "CorruptMatrixError",
    "InputNotFoundError",
]


class BigcatError(Exception):
    """Base class of all bigcat errors."""

    #: exit code used by the command-line interface
    exit_code: int = 1


class BigcatInputError(BigcatError, ValueError):
    """The input (a file, an option, a label) is not usable as given."""

    exit_code = 2


class InputNotFoundError(BigcatInputError, FileNotFoundError):
    """An input path does not exist."""


class BigcatFormatError(BigcatInputError):
    """A file exists but is not in a format bigcat can read (or lacks what is needed)."""


class CorruptMatrixError(BigcatFormatError):
    """A sparse matrix on disk has an inconsistent structure (indptr, indices)."""


class BigcatStoreIncompleteError(BigcatFormatError):
    """A Zarr store lacks bigcat's completion marker: it was never finished."""


class BigcatOutputExistsError(BigcatInputError, FileExistsError):
    """The output path exists and ``overwrite`` was not given (or may not be overwritten)."""
