"""Reading and writing statistics results: ``.zarr``, ``.h5ad``, ``.parquet``, ``.csv``."""

from __future__ import annotations

import base64
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bigcat.errors import BigcatFormatError, BigcatInputError, InputNotFoundError
from bigcat.stats.statistics import DERIVED, statistic

if TYPE_CHECKING:
    import xarray as xr


__all__ = ["FORMATS", "read_stats", "write_stats"]


def read_stats(path: str | os.PathLike, storage_options: dict | None = None) -> xr.Dataset:
    """Open a statistics result written by :func:`write_stats`.

    Parameters
    ----------
    path
        ``.zarr`` (opened lazily), ``.h5ad`` (a layer per statistic), or the long
        ``.parquet``/``.csv`` table (one row per cluster × gene); a path or a URL.
    storage_options
        fsspec options when ``path`` is a URL.

    Returns
    -------
    xarray.Dataset
        Dims ``(cluster, gene)``, a variable per statistic found, ``n_cells(cluster)``, and
        the attributes recorded when it was computed (where the format keeps them).
    """
    from bigcat._io import fs

    path = fs.path_of(path)
    if not fs.exists(path, storage_options):
        msg = f"{path}: no such file or directory"
        raise InputNotFoundError(msg)
    read, _ = FORMATS.get(fs.suffix_of(path), FORMATS[".zarr"])
    return read(path, storage_options)


def _read_stats_zarr(path: Path | str, storage_options: dict | None) -> xr.Dataset:
    import xarray as xr

    from bigcat._io import fs
    from bigcat._io.publish import read_marker

    marker = read_marker(path, storage_options)
    if marker is None or marker.get("layout") != "stats" or not marker.get("complete"):
        msg = f"{path}: not a complete bigcat statistics store (written by `bigcat stats --out X.zarr`)"
        raise BigcatFormatError(msg)
    ds = xr.open_zarr(fs.zarr_store(path, storage_options))
    ds.attrs.pop("bigcat", None)
    for name in ("cluster", "gene"):
        if ds[name].dtype.kind in "TU":
            ds = ds.assign_coords({name: ds[name].values.astype(object)})
    return ds


def _read_stats_h5ad(path: Path | str, storage_options: dict | None) -> xr.Dataset:
    import anndata as ad
    import h5py
    import xarray as xr

    from bigcat._io import fs

    try:
        with fs.open_file(path, storage_options) as handle, h5py.File(handle, "r") as f:
            if "layers" not in f or "obs" not in f:
                msg = f"{path}: not a statistics .h5ad (no layers; written by `bigcat stats --out X.h5ad`)"
                raise BigcatFormatError(msg)
            adata = ad.io.read_elem(f["obs"]), ad.io.read_elem(f["var"]), ad.io.read_elem(f["layers"])
            uns = ad.io.read_elem(f["uns"]) if "uns" in f else {}
    except OSError as error:
        msg = f"{path}: not a readable HDF5 file ({error})"
        raise BigcatFormatError(msg) from error
    obs, var, layers = adata
    if "n_cells" not in obs:
        msg = f"{path}: not a statistics .h5ad (obs has no n_cells column)"
        raise BigcatFormatError(msg)
    variables: dict[str, Any] = {"n_cells": (("cluster",), obs["n_cells"].to_numpy(np.int64))}
    for name, values in layers.items():
        variables[name] = (("cluster", "gene"), np.asarray(values))
    coords = {"cluster": obs.index.to_numpy(object), "gene": var.index.to_numpy(object)}
    attrs = dict(uns.get("bigcat_stats", {}))
    return xr.Dataset(variables, coords=coords, attrs=attrs)


def _read_stats_table(path: Path | str, storage_options: dict | None) -> xr.Dataset:
    """The long table (cluster, gene, n_cells, one column per statistic) back as a Dataset."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    import xarray as xr

    from bigcat._io import fs

    try:
        with fs.open_file(path, storage_options) as handle:
            if fs.suffix_of(path) == ".parquet":
                table = pq.read_table(handle, read_dictionary=["cluster", "gene"])
            else:
                options = pacsv.ConvertOptions(
                    column_types={"cluster": pa.string(), "gene": pa.string()},
                    auto_dict_encode=True,
                    auto_dict_max_cardinality=1 << 30,
                )
                table = pacsv.read_csv(handle, convert_options=options)
    except (pa.ArrowInvalid, OSError) as error:
        msg = f"{path}: not a readable statistics table ({' '.join(str(error).split())[:200]})"
        raise BigcatFormatError(msg) from error
    missing = [c for c in ("cluster", "gene", "n_cells") if c not in table.column_names]
    if missing:
        msg = (
            f"{path}: not a long statistics table (no column {', '.join(missing)}; "
            "written by `bigcat stats --out X.parquet` without --wide)"
        )
        raise BigcatFormatError(msg)

    def codes(name: str) -> tuple[np.ndarray, np.ndarray]:
        column = table.column(name)
        if not pa.types.is_dictionary(column.type):
            column = column.dictionary_encode()
        column = column.unify_dictionaries().combine_chunks() if column.num_chunks > 1 else column.combine_chunks()
        values, order = pd.factorize(np.asarray(column.indices), sort=False)
        return values, np.asarray(column.dictionary.to_pylist(), dtype=object)[order]

    rows, clusters = codes("cluster")
    cols, genes = codes("gene")
    shape = (len(clusters), len(genes))
    if len(rows) != shape[0] * shape[1]:
        msg = f"{path}: the table does not have one row per cluster × gene ({len(rows)} rows for {shape})"
        raise BigcatFormatError(msg)
    variables: dict[str, Any] = {}
    n_cells = np.zeros(shape[0], dtype=np.int64)
    n_cells[rows] = np.asarray(table.column("n_cells"))
    variables["n_cells"] = (("cluster",), n_cells)
    for name in table.column_names:
        if name in ("cluster", "gene", "n_cells"):
            continue
        values = np.asarray(table.column(name))
        # CSV has no types: the derived statistics are float32 (as written), the rest as parsed
        derived = name in DERIVED or _is_test_fraction(name)
        dtype = np.float32 if derived else values.dtype
        out = np.empty(shape, dtype=dtype)
        out[rows, cols] = values
        variables[name] = (("cluster", "gene"), out)
    attrs = {}
    if table.schema.metadata and b"bigcat" in table.schema.metadata:
        attrs = json.loads(table.schema.metadata[b"bigcat"])
    return xr.Dataset(variables, coords={"cluster": clusters, "gene": genes}, attrs=attrs)


#: uncompressed bytes of one chunk of a statistics store's float64 matrices (rows of clusters × all genes)
STATS_CHUNK_BYTES = 8 << 20
#: Blosc settings of a statistics store's matrices (with bit shuffle): float32 statistics
#: barely compress, and LZ4 level 1 with bit shuffle encodes them fastest of the settings
#: measured (docs/design.md)
STATS_CODEC: dict[str, Any] = {"cname": "lz4", "clevel": 1}
#: xarray's ``_FillValue`` attribute of float arrays in Zarr v3: NaN as float64 bytes, base64
NAN_FILL = base64.b64encode(np.float64(np.nan).tobytes()).decode()


def _write_stats_zarr(ds: Any, store: Any) -> None:
    """The Dataset as a Zarr store; its clusters × genes matrices encoded on every core.

    xarray writes the coordinates and the small variables; the matrices are declared as
    xarray declares them (chunks of rows of clusters × all genes, Blosc LZ4 with bit
    shuffle, the dimension names, a NaN ``_FillValue`` for floats), without a Dask array per
    matrix (importing Dask for them cost 0.25 s of every command); their chunks are then
    computed (a slab of a lazy statistic at a time, never a float64 temporary of full size),
    encoded and stored by a thread pool (NumPy, Blosc and file writes release the GIL).
    xarray handing whole NumPy arrays to zarr encodes them on one thread, with zarr's
    default Zstandard and small chunks (docs/design.md, "Writing results"). The caller
    consolidates the metadata.
    """
    import zarr
    from zarr.codecs import BloscCodec

    matrices = [n for n, v in ds.data_vars.items() if v.dims == ("cluster", "gene")]
    n_clusters, n_genes = ds.sizes["cluster"], ds.sizes["gene"]
    rows = int(max(1, min(n_clusters, STATS_CHUNK_BYTES // max(8 * n_genes, 1))))
    skeleton = ds.drop_vars(matrices)
    for name, variable in skeleton.variables.items():  # small arrays (n_cells, names…) of a lazily read result
        if variable.chunks is not None:
            skeleton[name] = variable.load()
    skeleton.to_zarr(store, mode="w-", consolidated=False)
    root = zarr.open_group(store, mode="r+")
    for name in matrices:
        dtype = np.dtype(ds[name].dtype)
        floating = dtype.kind == "f"
        root.create_array(
            name, shape=(n_clusters, n_genes), dtype=dtype, chunks=(rows, n_genes), dimension_names=("cluster", "gene"),
            compressors=[BloscCodec(shuffle="bitshuffle", **STATS_CODEC)], fill_value=np.nan if floating else 0,
            attributes={**ds[name].attrs, **({"_FillValue": NAN_FILL} if floating else {})},
        )  # fmt: skip
    _store_chunks(ds, store, matrices, rows)


def _store_chunks(ds: Any, store: Any, names: list[str], rows: int) -> None:
    """Every (rows × all genes) chunk of the matrices ``names`` of ``ds``, encoded as the
    arrays the skeleton declared (``bytes`` little-endian + Blosc) and stored, in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    import zarr
    from numcodecs import Blosc
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from bigcat.cluster import capacity

    root: Any = zarr.open_group(store, mode="r+")
    blosc = Blosc(cname=STATS_CODEC["cname"], clevel=STATS_CODEC["clevel"], shuffle=Blosc.BITSHUFFLE)
    local = Path(store) if isinstance(store, str) else None  # a local store: plain file writes
    jobs = []
    for name in names:
        array = root[name]
        for i, lo in enumerate(range(0, ds.sizes["cluster"], rows)):
            key = array.metadata.encode_chunk_key((i, 0))
            jobs.append((name, lo, f"{array.path}/{key}" if array.path else key, array.dtype))
    prototype = default_buffer_prototype()

    def write(job: tuple) -> None:
        name, lo, key, dtype = job
        values = np.ascontiguousarray(np.asarray(ds[name][lo : lo + rows].values, dtype=dtype))
        if values.dtype.byteorder == ">":
            values = values.astype(values.dtype.newbyteorder("<"))
        if len(values) < rows:  # an edge chunk is encoded padded to the full chunk, as zarr does
            values = np.concatenate([values, np.zeros((rows - len(values), values.shape[1]), dtype=values.dtype)])
        encoded = blosc.encode(values)
        if local is not None:
            target = local / key
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(encoded)
        else:
            sync(root.store_path.store.set(key, prototype.buffer.from_bytes(encoded)))

    with ThreadPoolExecutor(capacity(None).threads, thread_name_prefix="bigcat-write") as threads:
        list(threads.map(write, jobs))


def _runs(ds: Any) -> list[str]:
    """The runs a result's cells come from (none recorded by older versions)."""
    try:
        return [str(r) for r in json.loads(ds.attrs.get("runs", "[]") or "[]")]
    except (TypeError, ValueError):
        return []


def _long_arrow(ds: Any, clusters: slice, names: dict) -> Any:
    """Rows ``clusters`` of the long table as an Arrow table: cluster and gene names as
    dictionary columns over ``names`` (no string per row is ever built), the statistics as
    flat views of their matrices (pandas strings per row cost many times more to write;
    docs/design.md). Every column is declared non-nullable (none holds a null): Parquet
    then writes no definition levels, a quarter of the encoding time (docs/design.md)."""
    import pyarrow as pa

    lo, hi, _ = clusters.indices(ds.sizes["cluster"])
    n_c, n_g = hi - lo, ds.sizes["gene"]
    columns = {
        "cluster": pa.DictionaryArray.from_arrays(np.repeat(np.arange(lo, hi, dtype=np.int32), n_g), names["cluster"]),
        "gene": pa.DictionaryArray.from_arrays(np.tile(np.arange(n_g, dtype=np.int32), n_c), names["gene"]),
        "n_cells": np.repeat(np.asarray(ds["n_cells"].values[lo:hi]), n_g),
    }
    for name, var in ds.data_vars.items():
        if var.dims == ("cluster", "gene"):
            columns[name] = np.ascontiguousarray(np.asarray(var[lo:hi].values)).reshape(-1)
    table = pa.table(columns)
    return table.cast(pa.schema([f.with_nullable(nullable=False) for f in table.schema]))


def write_stats(
    ds: xr.Dataset,
    path: str | os.PathLike,
    *,
    wide: bool = False,
    overwrite: bool = False,
    storage_options: dict | None = None,
) -> list[Path | str]:
    """Write a statistics Dataset, atomically, in the format its extension names.

    Parameters
    ----------
    ds
        A result of :func:`cluster_stats` or :func:`merge_stats`.
    path
        ``.zarr`` (the Dataset), ``.parquet``/``.csv`` (long form: one row per cluster ×
        gene with a column per statistic and ``n_cells``, like R's ``cl.stats`` table),
        ``.h5ad`` (clusters as obs with ``n_cells``, genes as var, each statistic a layer,
        like ``scanpy.get.aggregate``).
    wide
        For ``.parquet``/``.csv``: one genes × clusters table per statistic instead, written
        to ``NAME.<statistic>.parquet`` (what ``get_cl_stats_parquet`` users get).
    overwrite
        Replace existing outputs.
    storage_options
        fsspec options when ``path`` is a URL (``s3://…``; see :mod:`bigcat._io.fs`).

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    from bigcat._io import fs
    from bigcat._io.publish import refuse_input_as_output

    path = fs.path_of(path)
    suffix = fs.suffix_of(path)
    try:
        sources = json.loads(ds.attrs.get("source", "[]"))
    except (TypeError, ValueError):
        sources = []
    refuse_input_as_output(path, [s for s in sources if isinstance(s, str)])
    if suffix not in FORMATS:
        msg = f"{path}: unknown output type {suffix or '(none)'!r}; use .zarr, .parquet, .csv or .h5ad"
        raise BigcatInputError(msg)
    if wide and suffix not in (".parquet", ".csv"):
        msg = f"{path}: --wide (wide=True) is for .parquet and .csv tables; a {suffix} output is always whole"
        raise BigcatInputError(msg)
    _, write = FORMATS[suffix]
    return write(ds, path, _Target(overwrite, storage_options, wide=wide))


@dataclass(frozen=True)
class _Target:
    """How an output is published: replace an existing one or not, fsspec options, and for
    tables whether they are wide."""

    overwrite: bool
    storage_options: dict | None
    wide: bool = False

    def publish(self, path: Any) -> Any:
        """A temporary path that becomes ``path`` atomically when the block ends."""
        from bigcat._io import fs
        from bigcat._io.publish import publish

        zarr_output = fs.suffix_of(path) == ".zarr"
        return publish(
            path, overwrite=self.overwrite, storage_options=self.storage_options, kind="zarr" if zarr_output else "file"
        )


def _matrices(ds: Any) -> list[str]:
    return [n for n, v in ds.data_vars.items() if v.dims == ("cluster", "gene")]


def _write_zarr(ds: Any, path: Any, target: _Target) -> list:
    import xarray as xr
    import zarr
    from zarr.errors import UnstableSpecificationWarning

    from bigcat._io import fs

    with target.publish(path) as tmp:
        out = ds.copy()
        for name in ("cluster", "gene"):
            if out[name].dtype == object:  # fixed-length strings, as a Variable: from an array xarray
                # would import dask.array to ask whether it is one (0.25 s)
                out = out.assign_coords({name: xr.Variable((name,), out[name].values.astype(str), fastpath=True)})
        out.attrs["bigcat"] = {"complete": False, "layout": "stats", "format_version": 1}
        store = fs.zarr_store(tmp, target.storage_options, read_only=False)
        with warnings.catch_warnings():
            # zarr's notes on consolidated metadata and on the names' fixed-length strings
            # (read back by zarr-python and xarray): once here, not a page per array
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            warnings.filterwarnings("ignore", category=UnstableSpecificationWarning)
            _write_stats_zarr(out, store)
            root = zarr.open_group(store, mode="r+")
            root.attrs["bigcat"] = {"complete": True, "layout": "stats", "format_version": 1}
            zarr.consolidate_metadata(store)
    return [path]


def _write_h5ad(ds: Any, path: Any, target: _Target) -> list:
    import anndata as ad

    from bigcat._io import fs

    obs = pd.DataFrame({"n_cells": ds["n_cells"].values}, index=pd.Index(ds["cluster"].values.astype(str)))
    var = pd.DataFrame(index=pd.Index(ds["gene"].values.astype(str)))
    layers = {name: np.asarray(ds[name].values) for name in _matrices(ds)}
    uns = {"bigcat_stats": {k: v for k, v in ds.attrs.items() if isinstance(v, (str, int, float))}}
    adata = ad.AnnData(obs=obs, var=var, layers=layers, uns=uns)
    with target.publish(path) as tmp:
        adata.write_h5ad(tmp)
        if not fs.is_url(path):  # the mark of a file bigcat wrote (--overwrite replaces only those)
            import h5py

            with h5py.File(tmp, "a") as f:
                f.attrs["bigcat"] = json.dumps({"layout": "stats", "complete": True})
    return [path]


def _table_writer(path: Any, tmp: Any, schema: Any) -> Any:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from bigcat._io import fs

    return pq.ParquetWriter(tmp, schema) if fs.suffix_of(path) == ".parquet" else pacsv.CSVWriter(tmp, schema)


def _write_table(ds: Any, path: Any, target: _Target) -> list:
    """The long table (one row per cluster × gene), or with ``wide`` one genes × clusters
    table per statistic."""
    return _write_wide(ds, path, target) if target.wide else _write_long(ds, path, target)


def _write_wide(ds: Any, path: Any, target: _Target) -> list:
    import pyarrow as pa

    from bigcat._io import fs

    suffix = fs.suffix_of(path)
    written = []
    for name in _matrices(ds):
        stem = str(path)[: -len(suffix)] if suffix else str(path)
        final = f"{stem}.{name}{suffix}" if fs.is_url(path) else Path(f"{stem}.{name}{suffix}")
        values = np.asarray(ds[name].values)
        columns = {"gene": pa.array(ds["gene"].values.astype(str))}
        for i, label in enumerate(ds["cluster"].values):
            columns[str(label)] = pa.array(values[i])
        table = pa.table(columns)
        if suffix == ".parquet":  # the mark of a file bigcat wrote (--overwrite replaces only those)
            table = table.replace_schema_metadata({b"bigcat": json.dumps({"statistic": name}).encode()})
        with target.publish(final) as tmp:
            writer = _table_writer(path, tmp, table.schema)
            writer.write_table(table)
            writer.close()
        written.append(final)
    return written


#: cluster × gene rows of the long table built (and encoded) at a time
LONG_PIECE_VALUES = 1 << 22


def _write_long(ds: Any, path: Any, target: _Target) -> list:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bigcat._io import fs

    parquet = fs.suffix_of(path) == ".parquet"
    attrs_json = json.dumps({k: v for k, v in ds.attrs.items() if isinstance(v, (str, int, float))})
    step = max(1, LONG_PIECE_VALUES // max(ds.sizes["gene"], 1))
    names = {axis: pa.array(np.asarray(ds[axis].values).astype(str)) for axis in ("cluster", "gene")}
    with target.publish(path) as tmp, ThreadPoolExecutor(1, thread_name_prefix="bigcat-table") as encoding:
        # each piece is encoded on a thread of its own (Arrow releases the GIL) while the next is built
        writer: Any = None
        pending: Any = None
        for lo in [*range(0, ds.sizes["cluster"], step)] or [0]:
            table = _long_arrow(ds, slice(lo, lo + step), names)
            if writer is None:
                if parquet:  # strings as before for readers (no Arrow schema: no categoricals)
                    # dictionary pages where they help (the names), min/max statistics only where
                    # they let a reader skip row groups: rows run cluster by cluster, so every row
                    # group spans all genes — min/max of the gene names (string comparisons on every
                    # page, a quarter of the writing time) would never skip one, nor would the
                    # float columns' (half of it)
                    writer = pq.ParquetWriter(
                        tmp, table.schema, store_schema=False, use_dictionary=["cluster", "gene"],
                        write_statistics=["cluster", "n_cells"],
                    )  # fmt: skip
                else:
                    writer = _table_writer(path, tmp, table.schema)
            if pending is not None:
                pending.result()
            pending = encoding.submit(writer.write_table, table)
        if pending is not None:
            pending.result()
        if parquet:  # the attributes travel in the file's metadata (CSV has nowhere to keep them)
            writer.add_key_value_metadata({"bigcat": attrs_json})
        writer.close()
    return [path]


def _is_test_fraction(name: str) -> bool:
    """``present_<test>``: the fraction of a ``present_at`` test (a derived statistic)."""
    try:
        return statistic(name).finalize is not None
    except KeyError:
        return False


#: each output format's reader and writer, by suffix
FORMATS = {
    ".zarr": (_read_stats_zarr, _write_zarr),
    ".h5ad": (_read_stats_h5ad, _write_h5ad),
    ".parquet": (_read_stats_table, _write_table),
    ".csv": (_read_stats_table, _write_table),
}
