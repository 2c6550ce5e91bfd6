"""Open any supported file as an ``xarray.Dataset`` (or a table), lazily.

Whatever the source (``.h5ad``, the sparse Zarr layout, the dense Zarr layout), the
Dataset looks the same: variable ``X(cell, gene)`` backed by Dask, coordinates ``cell``
and ``gene`` (names), every obs column as a coordinate on ``cell`` and every var column as
a coordinate on ``gene`` (see :func:`bigcat.store.coord_names` for clashes). Categorical
columns become arrays of their values, with ``attrs["categorical"]`` holding the
categories, so ``ds.groupby("cluster")`` works directly.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from bigcat.errors import BigcatFormatError, InputNotFoundError
from bigcat.readers import BLOCK_NNZ, MatrixSource, open_source
from bigcat.store import _xarray_coords, coord_names

__all__ = ["open_dataset", "to_anndata"]


class _LazyX:
    """Array-like over a source's X for ``dask.array.from_array``: returns pydata-sparse COO
    blocks for sparse X (never densified) and NumPy blocks for dense X."""

    def __init__(self, source: MatrixSource) -> None:
        self.source = source
        self.shape = source.shape
        self.dtype = source.dtype
        self.ndim = 2

    def __getitem__(self, key: tuple[slice, slice]) -> Any:
        import sparse

        rows, cols = key
        source = self.source
        r0, r1, _ = rows.indices(self.shape[0])
        c0, c1, _ = cols.indices(self.shape[1])
        if source.encoding == "dense":
            return np.asarray(source._root()["X"][r0:r1, c0:c1])  # noqa: SLF001 - same package
        if source.encoding == "csr":
            block = source.read_rows(r0, r1)
            if (c0, c1) != (0, self.shape[1]):
                block = block[:, c0:c1]
        else:
            block = source.read_columns(c0, c1)
            if (r0, r1) != (0, self.shape[0]):
                block = block[r0:r1]
        return sparse.COO.from_scipy_sparse(block)


def open_dataset(
    path: str | os.PathLike,
    *,
    chunk_nnz: int = BLOCK_NNZ,
    require_marker: bool = True,
    storage_options: dict | None = None,
) -> Any:
    """Open ``path`` lazily as an ``xarray.Dataset`` (or a ``.parquet`` table as a DataFrame).

    Parameters
    ----------
    path
        An ``.h5ad`` file, a bigcat Zarr store (``sparse`` or ``dense`` layout), or a
        ``.parquet`` table.
    chunk_nnz
        Target stored values per Dask chunk of a sparse X (rows are never split).
        ~8M values ≈ 100 MB per chunk in memory.
    require_marker
        Refuse Zarr stores without bigcat's completion marker (see
        :func:`bigcat.readers.open_source`).
    storage_options
        fsspec options when ``path`` is a URL (``s3://…``; see :mod:`bigcat.fs`).

    Returns
    -------
    xarray.Dataset or pandas.DataFrame
        ``X(cell, gene)`` is a Dask array: pydata-sparse COO chunks for sparse sources
        (row blocks for CSR, column blocks for CSC), NumPy chunks for dense ones.

    Raises
    ------
    InputNotFoundError, BigcatFormatError, BigcatStoreIncompleteError, CorruptMatrixError

    Notes
    -----
    Opening reads only metadata, annotations and (for sparse X) the row pointer: O(cells)
    memory and time. Each chunk read later costs O(its stored values).

    Examples
    --------
    >>> ds = bigcat.open_dataset("atlas.zarr")  # doctest: +SKIP
    >>> ds.X.data.blocks[0].compute()  # a sparse.COO block  # doctest: +SKIP
    """
    import dask.array as da
    import sparse
    import xarray as xr

    from bigcat import fs

    path = str(path) if fs.is_url(path) else fs.local(path)
    if fs.suffix_of(path) == ".parquet":
        if not fs.exists(path, storage_options):
            msg = f"{path}: no such file or directory"
            raise InputNotFoundError(msg)
        try:
            return pd.read_parquet(str(path), storage_options=storage_options if fs.is_url(path) else None)
        except Exception as error:
            msg = f"{path}: not a readable Parquet file ({str(error).splitlines()[0]})"
            raise BigcatFormatError(msg) from error
    source = open_source(path, require_marker=require_marker, storage_options=storage_options)
    if source.container == "zarr-dense":
        source.close()
        ds = xr.open_zarr(fs.zarr_store(path, storage_options), consolidated=True)
        # Zarr v3 strings arrive as NumPy's StringDType; use object arrays like the sparse path
        # 1-D annotations are small: load them, and turn Zarr v3 strings (NumPy's StringDType)
        # into object arrays, so the Dataset looks like the one from a sparse source
        return ds.assign_coords(
            {name: coord.copy(data=_object_strings(coord.values)) for name, coord in ds.coords.items() if name != "X"}
        )
    n_cells, n_genes = source.shape
    if source.encoding == "csr":
        bounds = source.row_bounds(chunk_nnz)
        chunks = (tuple(int(n) for n in np.diff(bounds)) or (0,), (n_genes,))
    elif source.encoding == "csc":
        from bigcat.readers import block_bounds

        bounds = block_bounds(source.indptr, chunk_nnz)
        chunks = ((n_cells,), tuple(int(n) for n in np.diff(bounds)) or (0,))
    else:
        bounds = source.row_bounds(chunk_nnz)
        chunks = (tuple(int(n) for n in np.diff(bounds)) or (0,), (n_genes,))
    if source.encoding == "dense":
        meta = np.empty((0, 0), dtype=source.dtype)
    else:
        meta = sparse.COO.from_numpy(np.zeros((0, 0), dtype=source.dtype))
    obs, var = source.obs, source.var
    source.close()
    x = da.from_array(
        _LazyX(source), chunks=chunks, meta=meta, asarray=False, fancy=False, name=f"bigcat-X-{_token(source)}"
    )
    obs_names, var_names = coord_names(list(obs.columns), list(var.columns))
    coords = {
        "cell": ("cell", np.asarray(obs.index.astype(str), dtype=object)),
        "gene": ("gene", np.asarray(var.index.astype(str), dtype=object)),
        **_xarray_coords(obs, obs_names, "cell"),
        **_xarray_coords(var, var_names, "gene"),
    }
    return xr.Dataset(
        {"X": (("cell", "gene"), x)}, coords=coords, attrs={"source": str(path), "encoding": source.encoding}
    )


def _object_strings(values: np.ndarray) -> np.ndarray:
    return values.astype(object) if values.dtype.kind in ("T", "U") else values


def _token(source: MatrixSource) -> str:
    from dask.base import tokenize

    if source.url:
        return tokenize(source.fingerprint())
    stat = source.path.stat()
    return tokenize(str(source.path.resolve()), stat.st_mtime_ns, stat.st_size, source.shape)


def to_anndata(ds: Any) -> Any:
    """Load a Dataset from :func:`open_dataset` into memory as an ``anndata.AnnData``.

    X becomes a SciPy CSR matrix for sparse chunks (a NumPy array for dense ones); obs and
    var are rebuilt from the coordinates, categoricals restored. Memory: the whole
    matrix — meant for small data and tests.
    """
    import anndata as ad
    import dask

    blocks = ds.X.data
    if hasattr(blocks._meta, "to_scipy_sparse"):  # noqa: SLF001 - dask's documented meta
        rows = []
        for i in range(blocks.numblocks[0]):
            parts = dask.compute(*[blocks.blocks[i, j] for j in range(blocks.numblocks[1])])
            rows.append(sp.hstack([p.to_scipy_sparse() for p in parts], format="csr"))
        x = sp.vstack(rows, format="csr") if rows else sp.csr_matrix(ds.X.shape, dtype=ds.X.dtype)
    else:
        x = np.asarray(blocks.compute())
    frames = {}
    for dim in ("cell", "gene"):
        columns = {}
        for name, coord in ds.coords.items():
            if name == dim or coord.dims != (dim,):
                continue
            values = _object_strings(coord.values)
            categorical = coord.attrs.get("categorical")
            if categorical is not None:
                values = pd.Categorical(values, categories=categorical["categories"], ordered=categorical["ordered"])
            columns[name] = values
        frames[dim] = pd.DataFrame(columns, index=pd.Index(_object_strings(ds[dim].values), dtype=object))
    return ad.AnnData(X=x, obs=frames["cell"], var=frames["gene"])
