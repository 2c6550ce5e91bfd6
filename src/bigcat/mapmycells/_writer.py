"""cell_type_mapper's ``reference_markers.h5``, streamed: markers by pair spill to raw files as
the engine yields them; by gene is their transpose, built in gene ranges that fit a budget."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numba
import numpy as np

from bigcat._io.layout import bigcat_version

__all__ = ["choose_int_dtype", "pair_to_idx_json", "write_reference_markers"]

#: bytes of pair indices held at once while transposing markers by pair into markers by gene
TRANSPOSE_BUDGET = 512 << 20
#: entries copied at once from the raw spill files into the HDF5 datasets
COPY_BLOCK = 1 << 24
#: cell_type_mapper's chunk length for the long 1-D datasets
H5_CHUNK = 1_000_000


def choose_int_dtype(low: int, high: int) -> np.dtype:
    """The smallest integer dtype holding [low, high], in cell_type_mapper's order of preference."""
    for candidate in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64):
        info = np.iinfo(candidate)
        if low >= info.min and high <= info.max:
            return np.dtype(candidate)
    return np.dtype(np.int64)


def pair_to_idx_json(level: str, leaves: list[str]) -> bytes:
    """``{level: {leaf_i: {leaf_j: index}}}`` for i < j in combinations order, as ``json.dumps``
    writes cell_type_mapper's dict (every leaf a key, the last with ``{}``), without building
    the 12.5-million-entry dict."""
    names = [json.dumps(leaf) for leaf in leaves]
    parts = ["{", json.dumps(level), ": {"]
    index = 0
    for i, name in enumerate(names):
        if i:
            parts.append(", ")
        later = names[i + 1 :]
        inner = ", ".join(f"{other}: {index + k}" for k, other in enumerate(later))
        index += len(later)
        parts.append(f"{name}: {{{inner}}}")
    parts.append("}}")
    return "".join(parts).encode()


class _Spill:
    """One direction's markers by pair: gene indices appended to a raw file, counts per pair
    and per gene kept in memory."""

    def __init__(self, folder: str, name: str, gene_dtype: np.dtype, n_genes: int) -> None:
        self.path = Path(folder) / f"{name}.bin"
        self.handle = self.path.open("wb")  # closed in finish()
        self.gene_dtype = gene_dtype
        self.pair_counts: list[np.ndarray] = []
        self.gene_counts = np.zeros(n_genes, dtype=np.int64)
        self.total = 0

    def add(self, counts: np.ndarray, genes: np.ndarray) -> None:
        self.pair_counts.append(counts.astype(np.int64))
        if len(genes):
            self.handle.write(np.ascontiguousarray(genes, dtype=self.gene_dtype).tobytes())
            self.gene_counts += np.bincount(genes, minlength=len(self.gene_counts))
        self.total += len(genes)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(pair pointer, the gene indices as a read-only memmap)."""
        self.handle.close()
        counts = np.concatenate(self.pair_counts) if self.pair_counts else np.zeros(0, dtype=np.int64)
        ptr = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=ptr[1:])
        genes = np.memmap(self.path, dtype=self.gene_dtype, mode="r") if self.total else np.zeros(0, self.gene_dtype)
        return ptr, genes


def write_reference_markers(
    out: str | os.PathLike, data: Any, chunks: Iterable[tuple], *, config: dict, started: float, overwrite: bool,
    storage_options: dict | None,
) -> Path | str:  # fmt: skip
    """Write ``reference_markers.h5``: gene_names, pair_to_idx, n_pairs, sparse_by_pair and
    sparse_by_gene (up and down), metadata (with the ``precomputed_path`` cell_type_mapper's
    query_markers looks the taxonomy up in)."""
    import h5py

    from bigcat._io import fs
    from bigcat._io.publish import publish

    target = fs.path_of(out)
    n_genes, n_pairs = len(data.genes), len(data.leaves) * (len(data.leaves) - 1) // 2
    gene_dtype = choose_int_dtype(0, n_genes)
    with publish(target, overwrite=overwrite, storage_options=storage_options, kind="file") as tmp:
        folder = str(Path(tmp).resolve().parent)
        with tempfile.TemporaryDirectory(prefix=".bigcat-markers-", dir=folder) as scratch:
            spills = {d: _Spill(scratch, d, gene_dtype, n_genes) for d in ("up", "down")}
            marker_started = time.time()
            for up_counts, up_genes, down_counts, down_genes in chunks:
                spills["up"].add(up_counts, up_genes)
                spills["down"].add(down_counts, down_genes)
            found_in = time.time() - marker_started
            with h5py.File(tmp, "w") as f:
                f.create_dataset("gene_names", data=json.dumps(data.genes).encode())
                f.create_dataset("pair_to_idx", data=pair_to_idx_json(data.level, data.leaves))
                f.create_dataset("n_pairs", data=n_pairs)
                for direction, spill in spills.items():
                    ptr, genes = spill.finish()
                    _by_pair(f, direction, ptr, genes, gene_dtype)
                    _by_gene(f, direction, ptr, genes, spill.gene_counts, n_pairs)
                    del genes
                metadata = {
                    "config": config, "precomputed_path": config["precomputed_path"],
                    "log": [f"markers of {n_pairs:,} pairs found in {found_in:.1f} s"],
                    "duration": time.time() - started, "written_by": "bigcat", "bigcat_version": bigcat_version(),
                }  # fmt: skip
                f.create_dataset("metadata", data=json.dumps(metadata).encode())
    return target


def _chunks(n: int) -> tuple[int] | None:
    return (min(n, H5_CHUNK),) if n else None


def _by_pair(f: Any, direction: str, ptr: np.ndarray, genes: np.ndarray, gene_dtype: np.dtype) -> None:
    group = f.require_group("sparse_by_pair")
    total = int(ptr[-1])
    group.create_dataset(f"{direction}_pair_idx", data=ptr.astype(choose_int_dtype(0, total)))
    out = group.create_dataset(f"{direction}_gene_idx", shape=(total,), dtype=gene_dtype, chunks=_chunks(total))
    for lo in range(0, total, COPY_BLOCK):
        out[lo : lo + COPY_BLOCK] = genes[lo : lo + COPY_BLOCK]


def _by_gene(f: Any, direction: str, ptr: np.ndarray, genes: np.ndarray, per_gene: np.ndarray, n_pairs: int) -> None:
    """The transpose: for each gene, the pairs it is a marker of (ascending). Built in ranges of
    genes whose pairs fit TRANSPOSE_BUDGET, each a pass over the markers by pair."""
    group = f.require_group("sparse_by_gene")
    total = int(ptr[-1])
    gene_ptr = np.zeros(len(per_gene) + 1, dtype=np.int64)
    np.cumsum(per_gene, out=gene_ptr[1:])
    pair_dtype = choose_int_dtype(0, n_pairs)
    group.create_dataset(f"{direction}_gene_idx", data=gene_ptr.astype(choose_int_dtype(0, total)))
    out = group.create_dataset(f"{direction}_pair_idx", shape=(total,), dtype=pair_dtype, chunks=_chunks(total))
    budget = max(1, TRANSPOSE_BUDGET // pair_dtype.itemsize)
    g0 = 0
    while g0 < len(per_gene):
        # the widest range of genes from g0 whose entries fit the budget (at least one gene)
        g1 = int(np.searchsorted(gene_ptr, gene_ptr[g0] + budget, side="right")) - 1
        g1 = min(max(g1, g0 + 1), len(per_gene))
        lo, hi = int(gene_ptr[g0]), int(gene_ptr[g1])
        if hi > lo:
            block = np.empty(hi - lo, dtype=pair_dtype)
            cursor = gene_ptr[g0:g1] - lo
            _scatter(genes, ptr, g0, g1, cursor, block)
            out[lo:hi] = block
        g0 = g1


@numba.njit(cache=True)
def _scatter(genes, ptr, g0, g1, cursor, out):
    """The pairs of each gene in [g0, g1), in pair order: ``out[cursor[g - g0]++] = pair``."""
    for pair in range(len(ptr) - 1):
        for e in range(ptr[pair], ptr[pair + 1]):
            g = genes[e]
            if g0 <= g < g1:
                out[cursor[g - g0]] = pair
                cursor[g - g0] += 1
