"""obs, var and uns: read from AnnData encodings (any anndata version) and from the dense
layout's coordinates, written by anndata itself, and turned into xarray coordinates.

Both Zarr layouts and :func:`bigcat.open_dataset` name and encode the annotation columns
the same way (:func:`coord_names`, :func:`annotation_coords`, :func:`frame_from_coords`),
so a Dataset looks the same whichever file it came from.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bigcat.errors import BigcatFormatError

__all__ = [
    "anndata_frame",
    "annotation_coords",
    "clean_frame",
    "coord_names",
    "frame_from_coords",
    "is_array",
    "read_column",
    "read_index",
    "read_uns",
    "strings",
    "write_anndata_elements",
]

log = logging.getLogger("bigcat")

#: root attribute of the dense layout mapping original obs/var column names to coordinate names
COLUMNS_KEY = "bigcat_columns"


# -- reading AnnData encodings -------------------------------------------------------------
def strings(node: Any) -> np.ndarray:
    """An HDF5/Zarr array as NumPy; strings (bytes, StringDType) as an object array of str."""
    values = np.asarray(node[...])
    if values.dtype.kind == "O" and len(values) and isinstance(values.flat[0], bytes):
        return np.array([v.decode() for v in values], dtype=object)
    if values.dtype.kind == "S":
        return np.array([v.decode() for v in values], dtype=object)
    return object_strings(values)


def object_strings(values: np.ndarray) -> np.ndarray:
    """Zarr v3 strings (NumPy's StringDType) and unicode arrays as object arrays of str."""
    return values.astype(object) if values.dtype.kind in ("T", "U") else values


def is_array(node: Any) -> bool:
    """Whether an HDF5/Zarr node is an array (not a group)."""
    return hasattr(node, "shape") and hasattr(node, "dtype")


def modern_frame(root: Any, key: str) -> Any:
    """The obs/var group when it uses anndata's ≥ 0.7 dataframe encoding, else ``None``."""
    if key not in root or is_array(root[key]):
        return None
    group = root[key]
    return group if group.attrs.get("encoding-type") == "dataframe" else None


def read_column(group: Any, name: str, length: int) -> Any:
    """Column ``name`` of a dataframe group, read on its own: a ``pandas.Categorical`` or an
    array; ``None`` when its encoding needs anndata's reader of the whole frame (nullable
    types) or its length is not ``length``."""
    if group is None or name not in group:
        return None
    elem = group[name]
    kind = elem.attrs.get("encoding-type")
    if kind == "categorical":
        codes = np.asarray(elem["codes"][...])
        if len(codes) == length:
            categories = strings(elem["categories"])
            return pd.Categorical.from_codes(codes, categories=categories, ordered=bool(elem.attrs.get("ordered")))
    elif is_array(elem) and kind in ("array", "string-array", None):
        values = strings(elem)
        if len(values) == length:
            return values
    return None


def read_index(group: Any, length: int) -> pd.Index | None:
    """The index of a dataframe group, read on its own (``None``: read the whole frame)."""
    index_key = group.attrs.get("_index") if group is not None else None
    if index_key is not None and index_key in group and is_array(group[index_key]):
        values = strings(group[index_key])
        if len(values) == length:
            return pd.Index(values, dtype=object)
    return None


def anndata_frame(root: Any, key: str, length: int, path: Path | str) -> pd.DataFrame:
    """obs or var of an AnnData file or store (``length`` rows), any anndata version."""
    if key not in root:
        frame = pd.DataFrame(index=pd.RangeIndex(length).astype(str))
    elif is_array(root[key]):  # anndata < 0.7: a compound dataset, categories in uns
        frame = _legacy_frame(path, key)
    else:
        from anndata.io import read_elem

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame = read_elem(root[key])
    if len(frame) != length:
        msg = f"{path}: {key} has {len(frame)} rows but X has {length}"
        raise BigcatFormatError(msg)
    return frame


def _legacy_frame(path: Path | str, key: str) -> pd.DataFrame:
    import anndata as ad

    if not isinstance(path, Path):  # anndata reads this encoding from a path on a disk only
        msg = (
            f"{path}: written by anndata < 0.7 ({key} as a compound dataset), an encoding that is read "
            "from a local file only; download it and run `bigcat convert` on the local copy"
        )
        raise BigcatFormatError(msg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = ad.read_h5ad(path, backed="r")
        try:
            return getattr(adata, key).copy()
        finally:
            adata.file.close()


def read_uns(root: Any, path: Path | str) -> dict:
    """uns, read fully (usually small); ``{}`` when absent or unreadable (with a warning)."""
    if "uns" not in root or is_array(root["uns"]):
        return {}
    from anndata.io import read_elem

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return dict(read_elem(root["uns"]))
        except Exception as error:  # noqa: BLE001 - old or exotic uns must not stop a conversion
            log.warning("%s: uns not readable (%s); leaving it out", path, error)
            return {}


# -- xarray coordinates ------------------------------------------------------------------------
def coord_names(obs_columns: list[str], var_columns: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Names of obs and var columns as xarray coordinates, made unique.

    obs columns keep their names; a var column whose name clashes with an obs column or
    a dimension becomes ``gene_<name>`` (an obs column named like a dimension becomes
    ``cell_<name>``). Both layouts use this, so a Dataset looks the same whichever layout
    it came from.
    """
    reserved = {"cell", "gene", "X"}
    obs_map = {c: (f"cell_{c}" if c in reserved else c) for c in obs_columns}
    taken = reserved | set(obs_map.values())
    var_map = {c: (f"gene_{c}" if c in taken else c) for c in var_columns}
    return obs_map, var_map


def annotation_coords(obs: pd.DataFrame, var: pd.DataFrame) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """The coordinates of a Dataset over ``obs`` × ``var`` (``cell``, ``gene`` and a coordinate
    per column, see :func:`coord_names`) and the mapping from column to coordinate names."""
    obs_names, var_names = coord_names([str(c) for c in obs.columns], [str(c) for c in var.columns])
    coords = {
        "cell": ("cell", np.asarray(obs.index.astype(str), dtype=object)),
        "gene": ("gene", np.asarray(var.index.astype(str), dtype=object)),
        **_xarray_coords(obs, obs_names, "cell"),
        **_xarray_coords(var, var_names, "gene"),
    }
    return coords, {"obs": obs_names, "var": var_names}


def _xarray_coords(frame: pd.DataFrame, names: dict[str, str], dim: str) -> dict[str, Any]:
    """obs/var columns as coordinates on ``dim``; categoricals as values plus their categories."""
    import xarray as xr

    coords: dict[str, Any] = {}
    for column, name in names.items():
        values = frame[column]
        attrs = {}
        if isinstance(values.dtype, pd.CategoricalDtype):
            categories = values.cat.categories
            attrs["categorical"] = {"categories": categories.tolist(), "ordered": bool(values.cat.ordered)}
            values = values.astype(categories.dtype)
        array = np.asarray(values)
        if array.dtype == object:
            array = np.array(
                ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in array], dtype=object
            )
        coords[name] = xr.Variable((dim,), array, attrs=attrs)
    return coords


def frame_from_coords(ds: Any, dim: str, mapping: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The annotation table along ``dim`` of a Dataset: a column per 1-D coordinate (named as
    ``mapping`` says: original column name → coordinate name), categoricals restored."""
    if mapping is None:
        mapping = {name: name for name, coord in ds.coords.items() if name != dim and coord.dims == (dim,)}
    columns = {}
    for original, name in mapping.items():
        coord = ds.coords[name]
        values = object_strings(coord.values)
        categorical = coord.attrs.get("categorical")
        if categorical is not None:
            values = pd.Categorical(values, categories=categorical["categories"], ordered=categorical["ordered"])
        columns[original] = values
    return pd.DataFrame(columns, index=pd.Index(object_strings(ds[dim].values), dtype=object))


def xarray_frame(path: Path | str, key: str, storage_options: dict | None = None) -> pd.DataFrame:
    """obs or var of a dense-layout store, with original column names and categoricals restored."""
    import xarray as xr

    from bigcat._io.fs import zarr_store

    ds = xr.open_zarr(zarr_store(path, storage_options), consolidated=True)
    return frame_from_coords(ds, "cell" if key == "obs" else "gene", ds.attrs.get(COLUMNS_KEY, {}).get(key))


# -- writing -------------------------------------------------------------------------------------
def write_anndata_elements(group: Any, obs: pd.DataFrame, var: pd.DataFrame, uns: Mapping) -> None:
    """obs, var, uns and the empty AnnData slots, encoded by anndata itself.

    ``uns`` is copied entry by entry, best effort: an entry anndata cannot write (exotic
    objects in very old files) is left out with a warning instead of failing the run.
    """
    import anndata as ad
    from anndata.io import write_elem

    group.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's notes on v3 dtypes/autosharding: nothing for users to act on
        with (
            ad.settings.override(zarr_write_format=3)
            if type(group).__module__.startswith("zarr")
            else contextlib.nullcontext()
        ):
            write_elem(group, "obs", obs)
            write_elem(group, "var", var)
            for slot in ("uns", "obsm", "varm", "obsp", "varp", "layers"):
                write_elem(group, slot, {})
            for key, value in uns.items():
                try:
                    write_elem(group["uns"], str(key), value)
                except Exception as error:  # noqa: BLE001 - uns must not stop a conversion
                    log.warning("uns[%r] not copied: %s", key, error)


def clean_frame(frame: pd.DataFrame, what: str = "cell", path: Any = "") -> pd.DataFrame:
    """A copy with string index and column names, as anndata requires; duplicate names
    made unique (``name``, ``name-1``, ``name-2`` … as ``AnnData.obs_names_make_unique``),
    with a warning, since cell names key external label tables and gene names select genes."""
    from anndata.utils import make_index_unique

    frame = frame.copy()
    frame.index = frame.index.astype(str)
    frame.columns = [str(c) for c in frame.columns]
    if frame.index.has_duplicates:
        n = int(frame.index.duplicated().sum())
        example = frame.index[frame.index.duplicated()][0]
        frame.index = make_index_unique(frame.index, join="-")
        log.warning(
            "%s: %d duplicate %s names (e.g. %r) made unique by appending -1, -2, … in the output",
            path,
            n,
            what,
            example,
        )
    return frame
