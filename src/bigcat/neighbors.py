"""Nearest reference cells for query cells: exact (blocked matrix products), pynndescent or
hnswlib, in a space of selected genes or a PCA of them.

The reference index is built once, in this process, and handed to the Dask workers once
(one key in the graph, or scattered to every worker of a ``client``); the query is read and
searched in row blocks in parallel. ``space="pca"`` fits a PCA on a random sample of
reference cells (sparse input, ARPACK) and applies it block-wise. Memory is planned before
anything is read (:func:`knn_memory`) and refused above ``max_memory``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from bigcat._query import QUERY_BLOCK_NNZ, _gene_columns, _open, _run_blocks, _selected
from bigcat.errors import BigcatInputError

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["knn", "knn_memory"]

log = logging.getLogger("bigcat")

METRICS = ("cosine", "euclidean", "correlation")
METHODS = ("exact", "pynndescent", "hnswlib")
#: bytes one working array of a search task may take (a dense query block in float64, a
#: reference tile, a distance tile); a task holds about ``TASK_ARRAYS`` of them at once
WORK_BYTES = 1 << 26
TASK_ARRAYS = 5
#: what :func:`knn` plans to hold in this process, by default (``max_memory=``)
MAX_MEMORY = 8 << 30
#: pynndescent's neighbours per point while it builds its graph
NND_NEIGHBORS = 30
#: hnswlib's links per point
HNSW_M = 16


def _normalize_rows(x: np.ndarray, metric: str) -> np.ndarray:
    """Rows of ``x`` (float32, owned) made, in place, so that the metric becomes a dot
    product: centred for correlation, then unit length for cosine and correlation."""
    if metric == "correlation":
        x -= x.mean(axis=1, keepdims=True)
    if metric in ("cosine", "correlation"):
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        np.divide(x, norm, out=x, where=norm > 0)
    return x


@dataclass
class _Space:
    """How a block of cells becomes rows of the search space: the selected genes (log2 CPM
    if asked), projected on the principal components if any, prepared for the metric."""

    columns: np.ndarray
    normalize: bool
    metric: str
    pca: dict | None = None  # "components" (dims × genes), "offset" (the mean's projection)

    @property
    def dims(self) -> int:
        return len(self.pca["offset"]) if self.pca is not None else len(self.columns)

    def bounds(self, source: Any) -> np.ndarray:
        """Row blocks of about ``QUERY_BLOCK_NNZ`` values whose dense float64 rows (genes, or
        components) take at most ``WORK_BYTES``."""
        return source.row_bounds(QUERY_BLOCK_NNZ, max(1, WORK_BYTES // (8 * max(self.dims, 1))))

    def embed(self, block: Any, path: Any) -> np.ndarray:
        x = _selected(block, self.columns, self.normalize, path)
        if self.pca is None:
            dense = x.toarray()
        else:  # sparse × dense: the cells are never dense in gene space
            dense = np.asarray(x @ self.pca["components"].T, dtype=np.float32)
            dense -= self.pca["offset"]
        return _normalize_rows(dense, self.metric)


def _in_threads(function: Any, bounds: np.ndarray) -> list:
    """``function(start, stop)`` for every row block, on this machine's cores, in order."""
    from concurrent.futures import ThreadPoolExecutor

    from bigcat.cluster import capacity

    pairs = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
    with ThreadPoolExecutor(capacity(None).threads) as pool:
        return list(pool.map(lambda pair: function(*pair), pairs))


def _embed_reference(source: Any, space: _Space) -> np.ndarray:
    """Every reference cell in the search space, written block by block into one array of
    cells × dims float32 (the only copy)."""
    out = np.empty((source.shape[0], space.dims), dtype=np.float32)

    def fill(start: int, stop: int) -> None:
        out[start:stop] = space.embed(source.read_rows(start, stop), source.path)

    _in_threads(fill, space.bounds(source))
    return out


def _fit_pca(reference: Any, space: _Space, n_components: int, sample: int, seed: int) -> dict:
    """PCA of ``sample`` random reference cells, sparse, centred implicitly (ARPACK); the
    sampled cells are the only ones kept while reading."""
    from sklearn.decomposition import PCA

    n = reference.shape[0]
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(n, size=min(sample, n), replace=False))

    def pick(start: int, stop: int) -> sp.csr_matrix | None:
        lo, hi = np.searchsorted(cells, [start, stop])
        if hi == lo:
            return None
        block = sp.csr_matrix(reference.read_rows(start, stop))[cells[lo:hi] - start]
        return _selected(block, space.columns, space.normalize, reference.path)

    parts = [p for p in _in_threads(pick, reference.row_bounds(QUERY_BLOCK_NNZ)) if p is not None]
    x = sp.vstack(parts, format="csr")
    del parts
    n_components = min(n_components, min(x.shape) - 1)
    if n_components < 1:
        msg = f"{reference.path}: too few cells or genes for a PCA ({x.shape})"
        raise BigcatInputError(msg)
    model = PCA(n_components=n_components, svd_solver="arpack", random_state=seed).fit(x)
    components = model.components_.astype(np.float32)
    return {"components": components, "offset": (model.mean_ @ model.components_.T).astype(np.float32)}


class _ExactIndex:
    """Brute force over the reference in tiles: exact, O(query × reference × dims) time,
    O(``WORK_BYTES``) memory per query block besides the reference."""

    def __init__(self, reference: np.ndarray, metric: str) -> None:
        self.metric = metric
        self.reference = reference
        self.sq = None
        if metric == "euclidean":
            step = max(1, WORK_BYTES // (8 * max(reference.shape[1], 1)))
            self.sq = np.zeros(len(reference))
            for lo in range(0, len(reference), step):  # in float64, a tile at a time
                self.sq[lo : lo + step] = (reference[lo : lo + step].astype(np.float64) ** 2).sum(axis=1)

    def query(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        x64 = x.astype(np.float64)
        rows, dims = x.shape
        x_sq = (x64**2).sum(axis=1)[:, None] if self.sq is not None else None
        step = max(1, WORK_BYTES // (8 * max(rows, dims, 1)))  # a tile and its distances within WORK_BYTES
        best_d = np.zeros((rows, 0))
        best_i = np.zeros((rows, 0), dtype=np.int64)
        for lo in range(0, len(self.reference), step):
            d = x64 @ self.reference[lo : lo + step].astype(np.float64).T
            if self.sq is not None and x_sq is not None:
                d *= -2.0
                d += x_sq
                d += self.sq[lo : lo + step]
                np.sqrt(np.maximum(d, 0, out=d), out=d)
            else:
                np.subtract(1.0, d, out=d)
            if d.shape[1] > k:  # this tile's k best, then merged with the best so far
                keep = np.argpartition(d, k - 1, axis=1)[:, :k]
                d = np.take_along_axis(d, keep, axis=1)
                ids = keep + lo
            else:
                ids = np.broadcast_to(np.arange(lo, lo + d.shape[1]), d.shape)
            d = np.concatenate([best_d, d], axis=1)
            i = np.concatenate([best_i, ids], axis=1)
            order = np.lexsort((i, d), axis=-1)[:, :k]  # by distance, ties by reference row
            best_d = np.take_along_axis(d, order, axis=1)
            best_i = np.take_along_axis(i, order, axis=1)
        return best_i, best_d


class _NNDescentIndex:
    def __init__(self, reference: np.ndarray, metric: str, seed: int) -> None:
        from pynndescent import NNDescent

        # rows are already unit length for cosine and correlation
        use = "euclidean" if metric == "euclidean" else "cosine"
        self.index = NNDescent(reference, metric=use, n_neighbors=NND_NEIGHBORS, random_state=seed, n_jobs=1)
        self.index.prepare()

    def query(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        indices, distances = self.index.query(x, k=k)
        return indices.astype(np.int64), distances


class _HnswIndex:
    def __init__(self, reference: np.ndarray, metric: str, seed: int) -> None:
        import hnswlib

        self.euclidean = metric == "euclidean"
        self.index = hnswlib.Index(space="l2" if self.euclidean else "ip", dim=reference.shape[1])
        self.index.init_index(max_elements=len(reference), ef_construction=200, M=HNSW_M, random_seed=seed)
        self.index.add_items(reference, np.arange(len(reference)))
        self.index.set_ef(100)

    def query(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        labels, distances = self.index.knn_query(x, k=k)
        if self.euclidean:
            distances = np.sqrt(distances)
        return labels.astype(np.int64), distances


def _search_block(
    index: Any, start: int, stop: int, source: Any, space: _Space, k: int
) -> tuple[np.ndarray, np.ndarray]:
    x = space.embed(source.read_rows(start, stop), source.path)
    indices, distances = index.query(x, k)
    return indices, np.asarray(distances, dtype=np.float32)


def knn_memory(
    n_reference: int,
    dims: int,
    *,
    method: str = "exact",
    metric: str = "cosine",
    threads: int = 1,
    pca_cells: int = 0,
    pca_values: int = 0,
    n_genes: int = 0,
    distributed: bool = False,
) -> int:
    """Bytes :func:`knn` holds at its peak in this process, besides the interpreter and the
    libraries themselves (the guard's estimate).

    The largest of: fitting the PCA (the sampled cells, sparse, and ARPACK's vectors over
    ``n_genes``), and searching: the reference in the search space (cells × dims × 4), what
    the index adds (pynndescent: its graph and copies of the data; hnswlib: its
    own copy with links), and ``threads`` query tasks of ``TASK_ARRAYS`` × ``WORK_BYTES``
    plus a block being read. With a ``distributed`` client the index is pickled once more
    to be sent, and the query tasks run on the workers.
    """
    reference = n_reference * dims * 4
    extra = {
        "exact": n_reference * 8 if metric == "euclidean" else 0,
        # pynndescent 0.7 holds about five more copies of the data while it builds and
        # prepares its graph (measured with tracemalloc on 7,200 × 3,000)
        "pynndescent": 5 * reference + n_reference * NND_NEIGHBORS * 8 * 4,
        "hnswlib": n_reference * (dims * 4 + HNSW_M * 2 * 4 * 2 + 16),
    }[method]
    index = reference + extra
    block = QUERY_BLOCK_NNZ * 8 * 3  # read, selected, normalized: values and indices
    tasks = 0 if distributed else threads * (TASK_ARRAYS * WORK_BYTES + block)
    pca = pca_values * 8 * 2 + n_genes * (2 * dims + 1) * 8 * 2 + threads * block if pca_cells else 0
    return int(max(pca, index * (2 if distributed else 1) + tasks))


def _check_options(metric: str, method: str, space: str) -> None:
    if metric not in METRICS:
        msg = f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}"
        raise BigcatInputError(msg)
    if method not in METHODS:
        msg = f"unknown method {method!r}; choose one of {', '.join(METHODS)}"
        raise BigcatInputError(msg)
    if space not in ("log2cpm", "pca"):
        msg = f"unknown space {space!r}; choose log2cpm or pca"
        raise BigcatInputError(msg)
    if method != "exact":
        try:
            __import__(method)
        except ImportError:
            msg = f"method={method!r} needs the optional package {method}: pip install 'bigcat[knn]'"
            raise BigcatInputError(msg) from None


def _shared_genes(ref: Any, qry: Any, genes: Sequence[str] | None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The genes searched (``genes`` found in the reference; default: every reference gene
    also in the query) and their columns in each; genes missing from the query are refused."""
    if genes is None:
        common = pd.Index(np.asarray(ref.var_names()).astype(str))
        genes = common[common.isin(pd.Index(np.asarray(qry.var_names()).astype(str)))].tolist()
    ref_columns, found = _gene_columns(ref, list(genes), "selected")
    genes = list(np.asarray(genes)[found])
    qry_columns, found_q = _gene_columns(qry, genes, "selected")
    if not found_q.all():
        msg = f"{qry.path}: {int((~found_q).sum())} of the genes are missing (e.g. {genes[int(np.argmin(found_q))]!r})"
        raise BigcatInputError(msg)
    return genes, ref_columns, qry_columns


def _check_memory(
    ref: Any, dims: int, n_genes: int, method: str, metric: str, space: str, pca_cells: int, max_memory: int,
    *, distributed: bool,
) -> int:  # fmt: skip
    """The planned peak of this process (:func:`knn_memory`), refused above ``max_memory``."""
    from bigcat.cluster import capacity

    n_ref = int(ref.shape[0])
    need = knn_memory(
        n_ref, dims, method=method, metric=metric, threads=capacity(None).threads, pca_cells=pca_cells,
        pca_values=int(pca_cells * ref.nnz / max(n_ref, 1)), n_genes=n_genes, distributed=distributed,
    )  # fmt: skip
    if need > max_memory:
        hint = "select genes (genes=) or use space='pca'" if space == "log2cpm" else "use fewer n_components"
        msg = (
            f"{ref.path}: nearest neighbours over {n_ref:,} reference cells × {dims:,} dimensions need about "
            f"{need / 2**30:.1f} GiB in this process, over max_memory ({max_memory / 2**30:.1f} GiB); {hint}, "
            "or raise max_memory"
        )
        raise BigcatInputError(msg)
    return need


def knn(
    query: Any,
    reference: Any,
    k: int = 15,
    *,
    genes: Sequence[str] | None = None,
    space: Literal["log2cpm", "pca"] = "log2cpm",
    n_components: int = 50,
    metric: Literal["cosine", "euclidean", "correlation"] = "cosine",
    method: Literal["exact", "pynndescent", "hnswlib"] = "exact",
    normalize: str | None = None,
    pca_sample: int = 20_000,
    seed: int = 0,
    max_memory: int = MAX_MEMORY,
    client: Any = None,
    storage_options: dict | None = None,
    progress: bool | None = None,
) -> xr.Dataset:
    """The ``k`` nearest reference cells of every query cell.

    Parameters
    ----------
    query, reference
        ``.h5ad``/``.zarr`` paths or URLs (or open sources), X in rows (CSR or dense).
    k
        Neighbours per query cell.
    genes
        Genes to use (default: every gene of the reference also in the query).
    space
        ``"log2cpm"`` (the selected genes; the values themselves when ``normalize=None``)
        or ``"pca"`` (``n_components`` principal components fitted on ``pca_sample``
        random reference cells).
    metric
        ``"cosine"``, ``"euclidean"`` or ``"correlation"``.
    method
        ``"exact"`` (blocked brute force), ``"pynndescent"`` or ``"hnswlib"`` (optional
        packages: ``pip install 'bigcat[knn]'``).
    normalize
        ``"log2cpm"`` (from raw counts, with whole-cell totals) or ``None``. For
        ``space="log2cpm"`` the default normalizes.
    seed
        For the PCA sample and the approximate indexes.
    max_memory
        Bytes this process may plan to hold (default 8 GiB): a larger estimate
        (:func:`knn_memory`) is refused before anything is read.
    client
        A ``distributed.Client``: the index is scattered once to every worker and query
        blocks run there (default: threads here).
    progress
        Show a progress bar of query cells searched (``None``: only on a terminal).

    Returns
    -------
    xarray.Dataset
        ``indices(cell, neighbor)`` (int64 rows of the reference) and
        ``distances(cell, neighbor)`` (float32), nearest first; ``cell`` holds the query
        names; ``attrs["memory_estimate"]`` the planned peak in bytes; ``.to_zarr()``
        writes it.

    Notes
    -----
    Cost: the reference is read once (twice with ``space="pca"``: a sample for the fit,
    then every cell projected block by block, sparse) and held in the search space, cells
    × dims × 4 bytes; the query is read once in row blocks, in parallel. ``exact`` takes
    O(query × reference × dims) time, in tiles of bounded size.
    """
    import xarray as xr

    _check_options(metric, method, space)
    if normalize is None and space == "log2cpm" and genes is None:
        normalize = "log2cpm"
    ref = _open(reference, storage_options)
    qry = _open(query, storage_options)
    genes, ref_columns, qry_columns = _shared_genes(ref, qry, genes)
    dims = min(n_components, len(genes)) if space == "pca" else len(genes)
    pca_cells = min(pca_sample, int(ref.shape[0])) if space == "pca" else 0
    need = _check_memory(
        ref, dims, len(genes), method, metric, space, pca_cells, max_memory, distributed=client is not None
    )
    do_norm = normalize == "log2cpm"
    ref_space = _Space(ref_columns, do_norm, metric)
    if space == "pca":
        ref_space.pca = _fit_pca(ref, ref_space, n_components, pca_sample, seed)
    data = _embed_reference(ref, ref_space)
    k = min(k, len(data))
    if method == "exact":
        index: Any = _ExactIndex(data, metric)
    elif method == "pynndescent":
        index = _NNDescentIndex(data, metric, seed)
    else:
        index = _HnswIndex(data, metric, seed)
    del data  # an approximate index holds its own copy
    qry_space = _Space(qry_columns, do_norm, metric, ref_space.pca)
    parts = _run_blocks(_search_block, qry_space.bounds(qry), index, client, qry, qry_space, k, progress=progress,
                        desc="knn")  # fmt: skip
    indices = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, k), np.int64)
    distances = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, k), np.float32)
    cells = np.asarray(qry.obs_names()).astype(str).astype(object)
    return xr.Dataset(
        {"indices": (("cell", "neighbor"), indices), "distances": (("cell", "neighbor"), distances)},
        coords={"cell": cells},
        attrs={"k": k, "metric": metric, "method": method, "space": space, "dims": int(ref_space.dims),
               "reference": str(getattr(ref, "path", "")), "normalize": str(normalize),
               "memory_estimate": int(need)},
    )  # fmt: skip
