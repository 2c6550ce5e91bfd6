"""Small CSV/Parquet tables the commands read beside the data (taxonomies, pairs of clusters)."""

from __future__ import annotations

import os
from typing import Any

import pandas as pd

from bigcat.errors import BigcatInputError, InputNotFoundError

__all__ = ["read_table"]


def read_table(source: Any, storage_options: dict | None = None, *, what: str = "table") -> pd.DataFrame:
    """A CSV or Parquet table (by the suffix) from a path or an fsspec URL; a DataFrame as given.

    Raises
    ------
    InputNotFoundError
        No such file.
    BigcatInputError
        A file that is not a readable CSV/Parquet table (the reader's first line of error).
    """
    from bigcat._io import fs

    if isinstance(source, pd.DataFrame):
        return source
    if not isinstance(source, (str, os.PathLike)) or not fs.exists(source, storage_options):
        msg = f"{source}: no such file"
        raise InputNotFoundError(msg)
    path = fs.path_of(source)
    options = storage_options if fs.is_url(path) else None
    try:
        if fs.suffix_of(path) == ".parquet":
            return pd.read_parquet(str(path), storage_options=options)
        return pd.read_csv(str(path), storage_options=options)
    except (ValueError, OSError) as error:
        msg = f"{path}: not a readable CSV/Parquet {what} ({str(error).splitlines()[0] if str(error) else error!r})"
        raise BigcatInputError(msg) from error
