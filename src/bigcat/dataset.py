"""Open any supported file as an ``xarray.Dataset`` (or a table), lazily.

Whatever the source (``.h5ad``, the sparse Zarr layout, the dense Zarr layout), the
Dataset looks the same: variable ``X(cell, gene)`` backed by Dask, coordinates ``cell``
and ``gene`` (names), every obs column as a coordinate on ``cell`` and every var column as
a coordinate on ``gene`` (see :func:`bigcat._io.annotations.coord_names` for clashes). Categorical
columns become arrays of their values, with ``attrs["categorical"]`` holding the
categories, so ``ds.groupby("cluster")`` works directly.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from bigcat._io.annotations import annotation_coords, frame_from_coords, object_strings
from bigcat._io.source import BLOCK_NNZ, MatrixSource, open_source
from bigcat.errors import BigcatFormatError, InputNotFoundError

if TYPE_CHECKING:
    import anndata as ad
    import xarray as xr

__all__ = ["open_dataset", "to_anndata"]

log = logging.getLogger("bigcat")


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
            return np.asarray(source.root()[source.element][r0:r1, c0:c1])
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
) -> xr.Dataset | pd.DataFrame:
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
        :func:`bigcat._io.source.open_source`).
    storage_options
        fsspec options when ``path`` is a URL (``s3://…``; see :mod:`bigcat._io.fs`).

    Returns
    -------
    xarray.Dataset or pandas.DataFrame
        ``X(cell, gene)`` is a Dask array: pydata-sparse COO chunks for sparse sources
        (row blocks for CSR, column blocks for CSC), NumPy chunks for dense ones. The
        file's other matrices are variables too, read the same way: ``layers.<name>(cell,
        gene)``, ``obsm.<name>(cell, obsm.<name>_dim)``, ``varm.<name>(gene,
        varm.<name>_dim)`` and ``raw.X(cell, raw_gene)``. Data frames in obsm/varm and
        ``obsp``/``varp`` (one dimension twice, which xarray cannot label) stay in the
        file: ``anndata.read_zarr`` / ``read_h5ad`` open them.

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
    >>> ds["obsm.X_umap"]  # (cell, obsm.X_umap_dim)  # doctest: +SKIP
    """
    import xarray as xr

    from bigcat._io import fs

    path = fs.path_of(path)
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
    if source.dense_layout:
        source.close()
        ds = xr.open_zarr(fs.zarr_store(path, storage_options), consolidated=True)
        # 1-D annotations are small: load them here, in this thread (not as tasks on whatever
        # scheduler or cluster is configured), and turn Zarr v3 strings (NumPy's StringDType)
        # into object arrays, so the Dataset looks like the one from a sparse source
        loaded = {name: coord.compute(scheduler="synchronous") for name, coord in ds.coords.items() if name != "X"}
        return ds.assign_coords({name: c.copy(data=object_strings(c.values)) for name, c in loaded.items()})
    x = _lazy(source, chunk_nnz)
    obs, var = source.obs, source.var
    extras = _extra_variables(source, chunk_nnz)
    source.close()
    coords, _ = annotation_coords(obs, var)
    variables = {"X": (("cell", "gene"), x)}
    for name, (dims, array, extra_coords) in extras.items():
        variables[name] = (dims, array)
        coords.update(extra_coords)
    return xr.Dataset(variables, coords=coords, attrs={"source": str(path), "encoding": source.encoding})


def _lazy(source: MatrixSource, chunk_nnz: int) -> Any:
    """A source's matrix as a Dask array: row blocks of ~``chunk_nnz`` values (column
    blocks for CSC), pydata-sparse COO chunks for sparse matrices, NumPy for dense ones."""
    import dask.array as da
    import sparse

    n_cells, n_genes = source.shape
    if source.encoding == "csc":
        from bigcat._io.source import block_bounds

        bounds = block_bounds(source.indptr, chunk_nnz)
        chunks: tuple[tuple[int, ...], ...] = ((n_cells,), tuple(int(n) for n in np.diff(bounds)) or (0,))
    else:
        bounds = source.row_bounds(chunk_nnz)
        chunks = (tuple(int(n) for n in np.diff(bounds)) or (0,), (n_genes,))
    if source.encoding == "dense":
        meta = np.empty((0, 0), dtype=source.dtype)
    else:
        meta = sparse.COO.from_numpy(np.zeros((0, 0), dtype=source.dtype))
    name = f"{array_name(source.element)}-{_token(source)}"
    return da.from_array(_LazyX(source), chunks=chunks, meta=meta, asarray=False, fancy=False, name=name)


def array_name(element: str) -> str:
    """The name prefix of the Dask array over one of a file's matrices (``bigcat-X`` for X):
    statistics read the file directly when a Dataset's X is still this untouched array."""
    return f"bigcat-{element.replace('/', '-')}"


def _extra_variables(source: MatrixSource, chunk_nnz: int) -> dict[str, tuple]:
    """``layers/<k>`` as ``layers.<k>(cell, gene)``, ``obsm/<k>`` as ``obsm.<k>(cell, obsm.<k>_dim)``,
    ``varm/<k>`` as ``varm.<k>(gene, varm.<k>_dim)`` and ``raw/X`` as ``raw.X(cell, raw_gene)``:
    the two-dimensional numeric matrices of the file, lazily (data frames, ``obsp``/``varp``,
    whose two dimensions are one, and the elements of anndata < 0.7 files are left out)."""
    out: dict[str, tuple] = {}
    n_cells, n_genes = source.shape
    for element in source.elements():
        slot, _, key = element.name.partition("/")
        if slot not in ("layers", "obsm", "varm", "raw") or element.kind not in ("dense", "sparse", "raw"):
            continue
        if element.kind == "raw" and element.where != "raw":  # anndata < 0.7's raw.X: convert the file first
            continue
        where = "raw/X" if element.kind == "raw" else element.where
        try:
            matrix = source.matrix(where)
        except Exception as error:  # noqa: BLE001 - an element bigcat cannot read lazily stays out of the Dataset
            log.debug("%s: %s left out of the Dataset (%s)", source.path, element.name, error)
            continue
        if len(matrix.shape) != 2:
            continue
        array = _lazy(matrix, chunk_nnz)
        name = f"{slot}.{key}" if key else "raw.X"
        if slot == "layers" and matrix.shape == (n_cells, n_genes):
            out[name] = (("cell", "gene"), array, {})
        elif slot in ("obsm", "varm") and matrix.shape[0] == (n_cells if slot == "obsm" else n_genes):
            out[name] = (("cell" if slot == "obsm" else "gene", f"{name}_dim"), array, {})
        elif slot == "raw" and matrix.shape[0] == n_cells:
            genes = _raw_gene_names(source.root(), matrix.shape[1])
            out[name] = (("cell", "raw_gene"), array, {"raw_gene": ("raw_gene", genes)})
    return out


def _raw_gene_names(root: Any, n: int) -> np.ndarray:
    from anndata.io import read_elem

    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            index = read_elem(root["raw/var"]).index
        if len(index) == n:
            return np.asarray(index.astype(str), dtype=object)
    except Exception:  # noqa: BLE001, S110 - names are a convenience; positions serve otherwise
        pass
    return np.asarray([str(i) for i in range(n)], dtype=object)


def _token(source: MatrixSource) -> str:
    from dask.base import tokenize

    if isinstance(source.path, str):  # a URL
        return tokenize(source.fingerprint())
    stat = source.path.stat()
    return tokenize(str(source.path.resolve()), stat.st_mtime_ns, stat.st_size, source.shape)


def to_anndata(ds: xr.Dataset) -> ad.AnnData:
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
    frames = {dim: frame_from_coords(ds, dim) for dim in ("cell", "gene")}
    return ad.AnnData(X=x, obs=frames["cell"], var=frames["gene"])
