"""The inputs of a statistics run: files, lists of files and Datasets, as parts with their labels."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bigcat._io.source import MatrixSource, open_source
from bigcat.errors import BigcatInputError

__all__ = []


@dataclass
class _Part:
    """One input: a file (read by row or column blocks) or a Dask array (read by chunks)."""

    name: str
    n_cells: int
    gene_names: pd.Index
    labels: Any = None  # per-cell labels from the file's obs (when ``by`` is a column)
    source: MatrixSource | None = None
    array: Any = None  # dask array for Datasets that are not a plain view of a file
    codes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    names: pd.Index | None = None  # cell names, read when first needed

    @property
    def cell_names(self) -> pd.Index:
        if self.names is None:
            assert self.source is not None
            self.names = self.source.obs_names()
            self.source.close()
        return self.names


def _as_list(data: Any) -> list[Any]:
    if isinstance(data, (str, os.PathLike)):
        return [data]
    if isinstance(data, Sequence):
        return list(data)
    return [data]


def _open_parts(data: Any, by: Any, storage_options: dict | None = None) -> list[_Part]:
    import xarray as xr

    items = _as_list(data)
    if not items:
        msg = "no input given"
        raise BigcatInputError(msg)
    parts = []
    for item in items:
        if isinstance(item, xr.Dataset):
            parts.append(_dataset_part(item, by, storage_options))
            continue
        source = open_source(item, storage_options=storage_options)
        labels = None
        if isinstance(by, str):
            try:
                labels = source.obs_column(by)
            except KeyError:
                available = ", ".join(source.obs_columns()) or "(none)"
                msg = f"{source.path}: no obs column {by!r}; available: {available}"
                raise BigcatInputError(msg) from None
        parts.append(
            _Part(
                name=str(source.path),
                n_cells=source.shape[0],
                gene_names=source.var_names(),
                labels=labels,
                source=source,
            )
        )
        source.close()
    return parts


def _dataset_part(ds: Any, by: Any, storage_options: dict | None = None) -> _Part:
    """A Dataset from :func:`open_dataset`: read its file directly when it is an untouched view."""
    from bigcat.dataset import array_name

    if "X" not in ds:
        msg = "the Dataset has no variable X"
        raise BigcatInputError(msg)
    labels = None
    if isinstance(by, str):
        if by not in ds.coords and by not in ds:
            msg = f"the Dataset has no coordinate {by!r}"
            raise BigcatInputError(msg)
        coord = ds[by]
        values = coord.values
        categorical = coord.attrs.get("categorical")
        labels = (
            pd.Categorical(values, categories=categorical["categories"], ordered=categorical.get("ordered", False))
            if categorical
            else values
        )
    x = ds["X"].transpose("cell", "gene").data
    name = ds.attrs.get("source", "dataset")
    part = _Part(name=str(name), n_cells=ds.sizes["cell"], gene_names=pd.Index(ds["gene"].values.astype(str)))
    part.labels = labels
    part.names = pd.Index(ds["cell"].values.astype(str))
    untouched = str(getattr(x, "name", "")).startswith(f"{array_name('X')}-") and "source" in ds.attrs
    if untouched:
        part.source = open_source(ds.attrs["source"], storage_options=storage_options)
        part.source.close()
        if part.source.shape != tuple(x.shape):
            part.source = None
    if part.source is None:
        import dask.array as da

        part.array = x if isinstance(x, da.Array) else da.from_array(x, chunks=(8192, -1))
    return part


def _refuse_shared_cells(parts: list[_Part]) -> None:
    """Inputs sharing cell names would count those cells twice (``a.zarr a-dense.zarr``)."""
    names = [pd.Index(np.asarray(p.cell_names).astype(str)).unique() for p in parts]
    owner = np.repeat(np.arange(len(parts)), [len(n) for n in names])
    every = pd.Index(np.concatenate([np.asarray(n) for n in names])) if names else pd.Index([])
    twice = every.duplicated(keep=False)
    if not twice.any():
        return
    where = sorted(set(owner[twice].tolist()))
    first, second = parts[where[0]], parts[where[1]]
    example = every[twice][0]
    msg = (
        f"{second.name}: {int(twice.sum()) // 2} of its cells (e.g. {example!r}) are also in {first.name}; they "
        "would be counted twice (pass allow_duplicate_cells=True / --allow-duplicates if they are different cells)"
    )
    raise BigcatInputError(msg)
