"""The AnnData elements besides X, obs, var and uns: ``layers``, ``obsm``, ``varm``, ``obsp``,
``varp`` and ``raw``.

:func:`find_elements` lists what a file holds; :func:`copy_elements` copies them into an
output (HDF5 or Zarr) in AnnData's own encoding, streamed: sparse matrices as their three
arrays and dense arrays by row slices, a bounded number of values at a time, whatever their
size. Data frames (``obsm/df``, ``raw/var``) and other small elements go through anndata's
``read_elem``/``write_elem``. Files written by anndata < 0.7 (compound ``obsm``/``varm``
datasets, ``raw.X``/``raw.var``) are rewritten in the current encoding.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from bigcat._io.annotations import is_array as _is_array
from bigcat.errors import BigcatFormatError, BigcatInputError

__all__ = ["SLOTS", "Element", "copy_elements", "find_elements", "select_elements"]

log = logging.getLogger("bigcat")

#: The slots :func:`find_elements` looks at, in AnnData's order.
SLOTS = ("layers", "obsm", "varm", "obsp", "varp", "raw")
#: Elements of other encodings are read whole by anndata: refused above this size.
WHOLE_LIMIT = 1 << 30
CHUNK_VALUES = 1 << 20


@dataclass(frozen=True)
class Element:
    """One element of a file besides X, obs, var and uns.

    ``name`` is its AnnData path (``"layers/counts"``, ``"raw"``); ``kind`` is ``"sparse"``
    (CSR/CSC), ``"dense"`` (a numeric array), ``"field"`` (a column of an anndata < 0.7
    compound dataset), ``"raw"`` or ``"other"`` (data frames and the rest); ``where`` is
    its path in the file; ``shape`` and ``nbytes`` its size.
    """

    name: str
    kind: str
    where: str
    shape: tuple[int, ...]
    nbytes: int


def _attrs(node: Any) -> dict:
    return dict(node.attrs)


def _sparse_format(node: Any) -> tuple[str, tuple[int, int]] | None:
    attrs = _attrs(node)
    kind = attrs.get("encoding-type") or (f"{attrs['h5sparse_format']}_matrix" if "h5sparse_format" in attrs else None)
    shape = attrs.get("shape", attrs.get("h5sparse_shape"))
    if kind in ("csr_matrix", "csc_matrix") and shape is not None and {"data", "indices", "indptr"} <= set(node):
        return kind, (int(shape[0]), int(shape[1]))
    return None


def _nbytes(node: Any) -> int:
    if _is_array(node):
        return int(np.prod(node.shape, dtype=np.int64)) * np.dtype(node.dtype).itemsize
    return sum(_nbytes(node[key]) for key in node)


def _classify(name: str, node: Any, where: str) -> Element:
    if _is_array(node):
        dtype = np.dtype(node.dtype)
        kind = "dense" if dtype.kind in "biuf" and dtype.names is None and len(node.shape) >= 1 else "other"
        return Element(name, kind, where, tuple(int(s) for s in node.shape), _nbytes(node))
    sparse = _sparse_format(node)
    if sparse is not None:
        return Element(name, "sparse", where, sparse[1], _nbytes(node))
    return Element(name, "other", where, (), _nbytes(node))


def find_elements(root: Any) -> list[Element]:
    """The elements of an AnnData file (an open ``h5py.File`` or ``zarr.Group``) besides X,
    obs, var and uns, in AnnData's order; empty slots are left out."""
    found: list[Element] = []
    for slot in SLOTS:
        if slot == "raw":
            if "raw" in root and not _is_array(root["raw"]) and "X" in root["raw"]:
                found.append(Element("raw", "raw", "raw", _classify("raw/X", root["raw/X"], "raw/X").shape,
                                     _nbytes(root["raw"])))  # fmt: skip
            elif "raw.X" in root:  # anndata < 0.7
                found.append(Element("raw", "raw", "raw.X", _classify("raw", root["raw.X"], "raw.X").shape,
                                     _nbytes(root["raw.X"])))  # fmt: skip
            continue
        if slot not in root:
            continue
        node = root[slot]
        if _is_array(node):  # anndata < 0.7: one compound dataset, a field per element
            names = np.dtype(node.dtype).names or ()
            for field in names:
                sub = np.dtype(node.dtype).fields[field][0]
                shape = (int(node.shape[0]), *sub.shape)
                nbytes = int(np.prod(shape, dtype=np.int64)) * sub.base.itemsize
                found.append(Element(f"{slot}/{field}", "field", slot, shape, nbytes))
            continue
        found.extend(_classify(f"{slot}/{key}", node[key], f"{slot}/{key}") for key in node)
    return found


def select_elements(elements: list[Element], skip: Iterable[str] = (), *, path: Any = "") -> list[Element]:
    """``elements`` less those named in ``skip`` (a slot such as ``"layers"``, or one element
    such as ``"obsm/X_pca"``).

    Raises
    ------
    BigcatInputError
        For a name in ``skip`` that is neither a slot nor an element of the file.
    """
    skip = {str(s).strip().strip("/") for s in skip if str(s).strip()}
    known = set(SLOTS) | {e.name for e in elements}
    unknown = sorted(skip - known)
    if unknown:
        have = ", ".join(e.name for e in elements) or "none"
        msg = f"{path}: --skip {','.join(unknown)}: no such slot or element (slots: {', '.join(SLOTS)}; here: {have})"
        raise BigcatInputError(msg)
    return [e for e in elements if e.name not in skip and e.name.split("/")[0] not in skip]


# -- writing ------------------------------------------------------------------------------------
def _replace(group: Any, name: str) -> None:
    if name in group:
        del group[name]


def _group(parent: Any, name: str, encoding: str) -> Any:
    group = parent[name] if name in parent else parent.create_group(name)
    group.attrs.update({"encoding-type": encoding, "encoding-version": "0.1.0"})
    return group


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    inner = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    rows = max(1, min(shape[0], CHUNK_VALUES // max(inner, 1)))
    return (rows, *shape[1:])


def _new_array(group: Any, name: str, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    _replace(group, name)
    chunks = _chunks(shape)
    if _is_zarr(group):
        from bigcat._io.layout import sparse_compressors

        return group.create_array(
            name, shape=shape, dtype=dtype, chunks=chunks, compressors=sparse_compressors(), fill_value=0
        )
    if 0 in shape:
        return group.create_dataset(name, shape=shape, dtype=dtype)
    return group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks)


def _slices(n: int, rows: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, rows):
        yield lo, min(n, lo + rows)


def _copy_array(source: Any, group: Any, name: str, block_values: int, field: str | None = None) -> Any:
    """``source`` (or one field of a compound dataset) into ``group[name]`` by row slices."""
    dtype = np.dtype(source.dtype)
    if field is not None:
        sub = dtype.fields[field][0]
        shape, dtype = (int(source.shape[0]), *sub.shape), sub.base
    else:
        shape = tuple(int(s) for s in source.shape)
    dtype = dtype.newbyteorder("=")
    target = _new_array(group, name, shape, dtype)
    per_row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    chunk_rows = _chunks(shape)[0]
    rows = max(chunk_rows, block_values // max(per_row, 1) // chunk_rows * chunk_rows)
    for lo, hi in _slices(shape[0], rows):
        if field is not None:
            values = source.fields(field)[lo:hi] if hasattr(source, "fields") else source[lo:hi][field]
        else:
            values = source[lo:hi]
        target[lo:hi] = np.asarray(values, dtype=dtype)
    target.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    return target


def _copy_sparse(source: Any, group: Any, name: str, block_values: int) -> None:
    found = _sparse_format(source)
    if found is None:  # callers copy sparse elements only
        msg = f"{getattr(source, 'name', source)}: not a CSR/CSC matrix"
        raise ValueError(msg)
    kind, shape = found
    _replace(group, name)
    target = _group(group, name, kind)
    target.attrs["shape"] = [int(shape[0]), int(shape[1])]
    for part in ("data", "indices", "indptr"):
        _copy_array(source[part], target, part, block_values)
        with contextlib.suppress(KeyError):  # parts of a sparse matrix carry no encoding of their own
            del target[part].attrs["encoding-type"]
            del target[part].attrs["encoding-version"]


def _copy_whole(source: Any, group: Any, name: str, element: str, path: Any) -> None:
    from anndata.io import read_elem, write_elem

    size = _nbytes(source)
    if size > WHOLE_LIMIT:
        msg = (
            f"{path}: {element} ({size / 2**30:.1f} GiB, encoding {_attrs(source).get('encoding-type', 'none')!r}) "
            f"would be read whole; leave it out with --skip {element}"
        )
        raise BigcatFormatError(msg)
    try:
        value = read_elem(source)
    except Exception as error:
        msg = f"{path}: {element} cannot be read ({str(error).splitlines()[0]}); leave it out with --skip {element}"
        raise BigcatFormatError(msg) from error
    _replace(group, name)
    write_elem(group, name, value)


def _legacy_table(node: Any) -> pd.DataFrame:
    """A DataFrame from an anndata < 0.7 compound dataset (``raw.var``), index from ``index``."""
    values = np.asarray(node[...])
    columns = {}
    for field in values.dtype.names or ():
        column = values[field]
        if column.dtype.kind == "S":
            column = np.array([v.decode() for v in column], dtype=object)
        columns[field] = column
    frame = pd.DataFrame(columns)
    if "index" in frame:
        frame = frame.set_index("index")  # named "index", as anndata reads it
    frame.index = frame.index.astype(str)
    return frame


def _copy_node(node: Any, group: Any, name: str, element: str, block_values: int, path: Any) -> None:
    item = _classify(element, node, element)
    if item.kind == "dense":
        _copy_array(node, group, name, block_values)
    elif item.kind == "sparse":
        _copy_sparse(node, group, name, block_values)
    elif not _is_array(node) and _attrs(node).get("encoding-type", "dict") == "dict":  # nested, element by element
        _replace(group, name)
        target = _group(group, name, "dict")
        for key in node:
            _copy_node(node[key], target, key, f"{element}/{key}", block_values, path)
    else:
        _copy_whole(node, group, name, element, path)


def _copy_raw(root: Any, dest: Any, element: Element, block_values: int, path: Any) -> None:
    from anndata.io import read_elem, write_elem

    _replace(dest, "raw")
    raw = _group(dest, "raw", "raw")
    if element.where == "raw.X":  # anndata < 0.7
        _copy_node(root["raw.X"], raw, "X", "raw/X", block_values, path)
        if "raw.var" in root:
            node = root["raw.var"]
            write_elem(raw, "var", _legacy_table(node) if _is_array(node) else read_elem(node))
        if "raw.varm" in root and _is_array(root["raw.varm"]):
            varm = _group(raw, "varm", "dict")
            for field in np.dtype(root["raw.varm"].dtype).names or ():
                _copy_array(root["raw.varm"], varm, field, block_values, field=field)
        return
    for key in root["raw"]:
        _copy_node(root["raw"][key], raw, key, f"raw/{key}", block_values, path)


def copy_elements(
    root: Any, dest: Any, elements: Iterable[Element], *, block_values: int = 8 << 20, path: Any = ""
) -> list[str]:
    """Copy ``elements`` of ``root`` (from :func:`find_elements`) into ``dest``, an AnnData
    group (``h5py.File`` or ``zarr.Group``) whose slots may already exist.

    Memory is about ``block_values`` values whatever the elements' size; an element already
    in ``dest`` (an interrupted copy) is replaced. Returns the names copied.

    Raises
    ------
    BigcatFormatError
        An element that cannot be read (naming it and the ``--skip`` that leaves it out).
    """
    import anndata as ad

    copied = []
    zarr_v3 = ad.settings.override(zarr_write_format=3) if _is_zarr(dest) else contextlib.nullcontext()
    with warnings.catch_warnings(), zarr_v3:
        warnings.simplefilter("ignore")  # zarr's notes on v3 string dtypes: nothing for users to act on
        for element in elements:
            slot, _, key = element.name.partition("/")
            if element.kind == "raw":
                _copy_raw(root, dest, element, block_values, path)
            else:
                group = dest[slot] if slot in dest else _group(dest, slot, "dict")
                if element.kind == "field":
                    _copy_array(root[element.where], group, key, block_values, field=key)
                else:
                    _copy_node(root[element.where], group, key, element.name, block_values, path)
            copied.append(element.name)
            log.info("%s: copied %s %s", path, element.name, "×".join(map(str, element.shape)) or "")
    return copied


def _is_zarr(group: Any) -> bool:
    return type(group).__module__.startswith("zarr")
