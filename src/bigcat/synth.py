"""Synthetic single-cell atlases that look like droplet data, at any scale.

The generative model (all parameters drawn from one seed):

* gene baselines ``b_g`` are log-normal (σ = 2 on the natural-log scale), normalised to sum 1;
* each cluster ``k`` boosts ``n_markers`` marker genes by a log-normal fold change
  (median 10×), so its expression profile is ``p_kg = b_g f_kg / Z_k``;
* library sizes ``L_c`` are log-normal; their median is calibrated so that the expected
  number of non-zeros per cell equals ``nnz_per_cell``;
* counts are gamma-Poisson (negative binomial, dispersion ``θ_g`` log-normal around 2):
  ``x_cg ~ Poisson(L_c p_kg G_cg)`` with ``G_cg ~ Gamma(θ_g, 1/θ_g)``, for every marker
  gene and every gene whose mean in a median cell is at least 0.5. Below that, NB and
  Poisson differ by a few percent in P(0), and the counts are drawn as Poisson, sparsely:
  a Poisson number of draws from an alias table over those genes — which is what keeps
  generation O(non-zeros) instead of O(cells × genes);
* cluster sizes follow a Zipf-like law (a few big clusters, many small ones); when there
  are at least as many cells as clusters every cluster gets at least one cell; cells are
  shuffled, so clusters are interleaved as in a real file.

Generation streams in fixed batches of cells (each seeded from the global seed and its
batch number), so the output depends only on the seed and never on the thread count,
and memory stays bounded whatever the number of cells.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from bigcat._io.layout import Layout
from bigcat.errors import BigcatInputError

__all__ = ["SynthModel", "make_model", "synth", "synth_batches"]

log = logging.getLogger("bigcat")

#: cells per generated batch; fixed so that output never depends on the machine
BATCH_CELLS = 4096


@dataclass(frozen=True)
class SynthModel:
    """All parameters of one synthetic atlas (see the module docstring)."""

    n_cells: int
    n_genes: int
    n_clusters: int
    seed: int
    labels: np.ndarray  # (n_cells,) int32 cluster code of each cell
    donors: np.ndarray  # (n_cells,) int8 donor code of each cell
    baseline: np.ndarray  # (n_genes,) float64, sums to 1
    dispersion: np.ndarray  # (n_genes,) float64 NB θ
    markers: np.ndarray  # (n_clusters, n_markers) int32
    folds: np.ndarray  # (n_clusters, n_markers) float64
    norm: np.ndarray  # (n_clusters,) float64: Z_k = Σ_g b_g f_kg
    top_genes: np.ndarray  # int32, sorted: genes drawn with the full gamma-Poisson model
    low_genes: np.ndarray  # int32: the rest, drawn sparsely
    low_mass: float  # Σ b_g over low_genes
    alias_prob: np.ndarray  # alias table over low_genes
    alias_index: np.ndarray
    log_lib_mean: float
    log_lib_sd: float

    @property
    def cluster_names(self) -> list[str]:
        width = max(4, len(str(self.n_clusters)))
        return [f"cl{k:0{width}d}" for k in range(self.n_clusters)]

    @property
    def gene_names(self) -> list[str]:
        width = max(5, len(str(self.n_genes)))
        return [f"gene{g:0{width}d}" for g in range(self.n_genes)]

    @property
    def cell_names(self) -> list[str]:
        width = max(7, len(str(self.n_cells)))
        return [f"cell{c:0{width}d}" for c in range(self.n_cells)]

    def obs(self) -> pd.DataFrame:
        """Cell annotations: ``cluster`` and ``donor`` (categoricals), indexed by cell name."""
        n_donors = int(self.donors.max()) + 1 if self.n_cells else 1
        return pd.DataFrame(
            {
                "cluster": pd.Categorical.from_codes(self.labels, categories=self.cluster_names),
                "donor": pd.Categorical.from_codes(
                    self.donors.astype(np.int8), categories=[f"donor{d + 1}" for d in range(max(n_donors, 4))]
                ),
            },
            index=pd.Index(self.cell_names, name=None, dtype=object),
        )

    def var(self) -> pd.DataFrame:
        """Gene annotations: indexed by gene name, with the synthetic baseline."""
        return pd.DataFrame(
            {"baseline": self.baseline.astype(np.float32)},
            index=pd.Index(self.gene_names, dtype=object),
        )

    def uns(self) -> dict:
        """The ground truth worth keeping beside the data (markers of each cluster)."""
        return {
            "bigcat_synth": {
                "seed": self.seed,
                "markers": self.markers,
                "marker_folds": self.folds.astype(np.float32),
            }
        }


def _alias_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias table for sampling indices proportional to ``weights``."""
    n = len(weights)
    prob = weights / weights.sum() * n
    alias = np.zeros(n, dtype=np.int32)
    small = [i for i in range(n) if prob[i] < 1.0]
    large = [i for i in range(n) if prob[i] >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        alias[s] = g
        prob[g] = prob[g] + prob[s] - 1.0
        (small if prob[g] < 1.0 else large).append(g)
    for i in small + large:
        prob[i] = 1.0
    return prob, alias


def _expected_nnz(log_mean: float, log_sd: float, baseline: np.ndarray, theta: np.ndarray) -> float:
    """Expected non-zeros per cell under the NB model (Gauss-Hermite over library size)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(24)
    weights = weights / weights.sum()
    total = 0.0
    for z, w in zip(nodes, weights, strict=True):
        lib = np.exp(log_mean + log_sd * z)
        p_zero = (1.0 + lib * baseline / theta) ** (-theta)
        total += w * float(np.sum(1.0 - p_zero))
    return total


#: non-zeros per cell of a whole-transcriptome droplet atlas (32,285 genes); fewer genes
#: keep the same fraction (7.7%) by default
DEFAULT_NNZ_PER_CELL = 2500
WHOLE_TRANSCRIPTOME = 32_285


def default_nnz_per_cell(n_genes: int) -> float:
    """2,500 non-zeros per cell, or the same fraction of a smaller gene set."""
    return float(min(DEFAULT_NNZ_PER_CELL, n_genes * DEFAULT_NNZ_PER_CELL / WHOLE_TRANSCRIPTOME))


def _check_size(n_cells: int, n_genes: int, n_clusters: int, nnz_per_cell: float | None) -> float:
    """The non-zeros per cell to aim at, once the sizes are checked."""
    if n_cells < 0 or n_genes < 1 or n_clusters < 1:
        msg = f"synth: need cells ≥ 0, genes ≥ 1 and clusters ≥ 1 (got {n_cells}, {n_genes}, {n_clusters})"
        raise BigcatInputError(msg)
    if nnz_per_cell is None:
        nnz_per_cell = default_nnz_per_cell(n_genes)
    if not 0 < nnz_per_cell < n_genes:
        msg = (
            f"synth: --nnz-per-cell must be between 1 and the number of genes - 1 "
            f"(got {nnz_per_cell:g} for {n_genes} genes)"
        )
        raise BigcatInputError(msg)
    return nnz_per_cell


def _calibrate(
    baseline: np.ndarray, dispersion: np.ndarray, log_lib_sd: float, nnz_per_cell: float
) -> tuple[float, np.ndarray]:
    """The log-median library size giving ``nnz_per_cell`` non-zeros, and which genes get the
    full gamma-Poisson draw.

    Genes whose mean in a median cell reaches 0.5 get the full gamma-Poisson draw; for the
    others NB and Poisson barely differ (P(0) within a few %), and the Poisson part is drawn
    sparsely. The split depends on the library size, which is calibrated on the split: two
    rounds of fixed-point iteration settle it.
    """
    theta = dispersion.copy()
    log_lib_mean = 0.0
    is_top = np.ones(len(baseline), dtype=bool)
    for _ in range(3):
        lo, hi = -5.0, 30.0  # bisection on the log-median library size
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if _expected_nnz(mid, log_lib_sd, baseline, theta) < nnz_per_cell:
                lo = mid
            else:
                hi = mid
        log_lib_mean = 0.5 * (lo + hi)
        is_top = baseline * np.exp(log_lib_mean) >= 0.5
        theta = np.where(is_top, dispersion, 1e9)
    return log_lib_mean, is_top


def make_model(
    n_cells: int,
    n_genes: int,
    n_clusters: int,
    *,
    nnz_per_cell: float | None = None,
    n_markers: int = 20,
    n_donors: int = 4,
    seed: int = 0,
) -> SynthModel:
    """Draw the parameters of a synthetic atlas.

    Parameters
    ----------
    n_cells, n_genes, n_clusters
        Size of the atlas.
    nnz_per_cell
        Target mean number of non-zero genes per cell (below ``n_genes``); default
        :func:`default_nnz_per_cell` (2,500, or 7.7% of fewer than 32,285 genes).
    n_markers
        Marker genes per cluster (capped at a tenth of the genes).
    n_donors
        Number of levels of the ``donor`` column.
    seed
        Seed of everything; the same seed gives the same atlas.

    Returns
    -------
    SynthModel
        Parameters and per-cell labels; memory O(n_cells + n_genes + n_clusters × n_markers).
    """
    nnz_per_cell = _check_size(n_cells, n_genes, n_clusters, nnz_per_cell)
    rng = np.random.default_rng(seed)
    baseline = rng.lognormal(0.0, 2.0, n_genes)
    baseline /= baseline.sum()
    dispersion = rng.lognormal(np.log(2.0), 0.5, n_genes)

    n_markers = max(1, min(n_markers, n_genes // 10 or 1))
    order = np.argsort(baseline)
    # markers come from the middle of the expression range: real markers are neither
    # housekeeping genes nor never-seen ones
    pool = order[int(0.3 * n_genes) : max(int(0.95 * n_genes), int(0.3 * n_genes) + n_markers)]
    markers = np.stack([np.sort(rng.choice(pool, n_markers, replace=False)) for _ in range(n_clusters)]).astype(
        np.int32
    )
    folds = rng.lognormal(np.log(10.0), 0.5, markers.shape)
    norm = 1.0 + (baseline[markers] * (folds - 1.0)).sum(axis=1)

    log_lib_sd = 0.6
    log_lib_mean, is_top = _calibrate(baseline, dispersion, log_lib_sd, nnz_per_cell)
    top_genes = np.flatnonzero(is_top).astype(np.int32)
    low_genes = np.flatnonzero(~is_top).astype(np.int32)
    if len(low_genes) == 0:  # tiny gene sets: keep one dummy low gene of zero mass
        low_genes = top_genes[:1]
        low_mass = 0.0
        alias_prob, alias_index = np.ones(1), np.zeros(1, dtype=np.int32)
    else:
        low_mass = float(baseline[low_genes].sum())
        alias_prob, alias_index = _alias_table(baseline[low_genes])

    weights = 1.0 / np.arange(1, n_clusters + 1) ** 0.9
    weights = rng.permutation(weights / weights.sum())
    if n_cells >= n_clusters:
        sizes = 1 + rng.multinomial(n_cells - n_clusters, weights)
    else:
        sizes = rng.multinomial(n_cells, weights)
    labels = rng.permutation(np.repeat(np.arange(n_clusters, dtype=np.int32), sizes))
    donors = rng.integers(0, n_donors, n_cells).astype(np.int8)
    return SynthModel(
        n_cells=n_cells,
        n_genes=n_genes,
        n_clusters=n_clusters,
        seed=seed,
        labels=labels,
        donors=donors,
        baseline=baseline,
        dispersion=dispersion,
        markers=markers,
        folds=folds,
        norm=norm,
        top_genes=top_genes,
        low_genes=low_genes,
        low_mass=low_mass,
        alias_prob=alias_prob,
        alias_index=alias_index.astype(np.int32),
        log_lib_mean=log_lib_mean,
        log_lib_sd=log_lib_sd,
    )


@numba.njit(nogil=True, cache=True)
def _generate_batch(  # noqa: PLR0915 - one compiled kernel, kept whole for numba
    seed,
    labels,
    baseline,
    dispersion,
    markers,
    folds,
    norm,
    top_genes,
    low_genes,
    low_mass,
    alias_prob,
    alias_index,
    log_lib_mean,
    log_lib_sd,
    n_genes,
):
    np.random.seed(seed)
    n = labels.shape[0]
    capacity = max(1024, n * 64)
    indices = np.empty(capacity, dtype=np.int32)
    data = np.empty(capacity, dtype=np.float32)
    indptr = np.zeros(n + 1, dtype=np.int64)
    counts = np.zeros(n_genes, dtype=np.float64)  # scratch: count of each gene in this cell
    fold = np.ones(n_genes, dtype=np.float64)  # scratch: this cell's marker folds
    is_top = np.zeros(n_genes, dtype=np.bool_)
    for g in top_genes:
        is_top[g] = True
    touched = np.empty(n_genes, dtype=np.int32)
    n_low = low_genes.shape[0]
    pos = 0
    for c in range(n):
        k = labels[c]
        lib = np.exp(log_lib_mean + log_lib_sd * np.random.standard_normal())
        scale = lib / norm[k]
        for j in range(markers.shape[1]):
            fold[markers[k, j]] = folds[k, j]
        n_touched = 0
        # gamma-Poisson for genes with a noticeable mean
        for g in top_genes:
            mu = scale * baseline[g] * fold[g]
            theta = dispersion[g]
            x = np.random.poisson(mu * np.random.gamma(theta, 1.0 / theta))
            if x > 0:
                counts[g] = x
                touched[n_touched] = g
                n_touched += 1
        for j in range(markers.shape[1]):
            g = markers[k, j]
            if is_top[g] or counts[g] > 0:
                continue
            mu = scale * baseline[g] * fold[g]
            theta = dispersion[g]
            x = np.random.poisson(mu * np.random.gamma(theta, 1.0 / theta))
            if x > 0:
                counts[g] = x
                touched[n_touched] = g
                n_touched += 1
        # Poisson for the long tail: a Poisson number of alias draws, markers thinned out
        n_draws = np.random.poisson(scale * low_mass) if low_mass > 0 else 0
        for _ in range(n_draws):
            i = np.random.randint(0, n_low)
            if np.random.random() >= alias_prob[i]:
                i = alias_index[i]
            g = low_genes[i]
            if fold[g] != 1.0:  # a marker of this cluster: already drawn above
                continue
            if counts[g] == 0:
                touched[n_touched] = g
                n_touched += 1
            counts[g] += 1
        genes = np.sort(touched[:n_touched])
        if pos + n_touched > capacity:
            capacity = max(2 * capacity, pos + n_touched)
            new_indices = np.empty(capacity, dtype=np.int32)
            new_indices[:pos] = indices[:pos]
            indices = new_indices
            new_data = np.empty(capacity, dtype=np.float32)
            new_data[:pos] = data[:pos]
            data = new_data
        for g in genes:
            indices[pos] = g
            data[pos] = counts[g]
            counts[g] = 0
            pos += 1
        indptr[c + 1] = pos
        for j in range(markers.shape[1]):
            fold[markers[k, j]] = 1.0
    return indptr, indices[:pos].copy(), data[:pos].copy()


def _batch_seed(seed: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


def generate_rows(model: SynthModel, start: int, stop: int) -> sp.csr_matrix:
    """Counts of cells ``start:stop``; ``start`` must be a multiple of :data:`BATCH_CELLS`
    and the batch must not straddle two (so that results do not depend on batching)."""
    batch = start // BATCH_CELLS
    indptr, indices, data = _generate_batch(
        _batch_seed(model.seed, batch),
        model.labels[start:stop],
        model.baseline,
        model.dispersion,
        model.markers,
        model.folds,
        model.norm,
        model.top_genes,
        model.low_genes,
        model.low_mass,
        model.alias_prob,
        model.alias_index,
        model.log_lib_mean,
        model.log_lib_sd,
        model.n_genes,
    )
    return sp.csr_matrix((data, indices, indptr), shape=(stop - start, model.n_genes))


def synth_batches(model: SynthModel, *, n_threads: int | None = None) -> Iterator[sp.csr_matrix]:
    """Yield the atlas as consecutive CSR row batches, generated on ``n_threads`` threads.

    At most ``2 × n_threads`` batches are in flight, so memory is bounded by the batch
    size, not by the atlas size.
    """
    n_threads = n_threads or max(1, min(4, os.cpu_count() or 1))
    starts = list(range(0, model.n_cells, BATCH_CELLS))
    with ThreadPoolExecutor(n_threads) as pool:
        pending = []
        for start in starts:
            pending.append(pool.submit(generate_rows, model, start, min(start + BATCH_CELLS, model.n_cells)))
            if len(pending) >= 2 * n_threads:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def synth(
    path: str | os.PathLike,
    *,
    n_cells: int = 20_000,
    n_genes: int = 32_285,
    n_clusters: int = 50,
    nnz_per_cell: float | None = None,
    seed: int = 0,
    layout: Layout = "sparse",
    overwrite: bool = False,
    progress: bool | None = None,
    storage_options: dict | None = None,
) -> Path | str:
    """Write a synthetic atlas of raw counts to ``path`` (``.h5ad`` or ``.zarr``).

    Parameters
    ----------
    path
        Output file; the extension picks the format (``.h5ad``, or a bigcat Zarr store).
    n_cells, n_genes, n_clusters
        Size of the atlas.
    nnz_per_cell
        Target mean of non-zeros per cell; default 2,500, or 7.7% of fewer than 32,285 genes.
    seed
        The same seed gives byte-identical data.
    layout
        Zarr layout (``"sparse"`` or ``"dense"``), ignored for ``.h5ad``.
    overwrite
        Replace an existing output (only one bigcat wrote, for a directory).
    progress
        Show a progress bar; ``None`` shows it on a terminal only.
    storage_options
        fsspec options when ``path`` is a URL (``s3://…``; see :mod:`bigcat._io.fs`).

    Returns
    -------
    pathlib.Path
        The written path.

    Notes
    -----
    Streams in batches of :data:`BATCH_CELLS` cells: peak memory is a few hundred MB plus
    O(n_cells) for labels and the row pointer, whatever the size. Time is O(non-zeros):
    about 1 µs per 10-20 non-zeros per core.

    Examples
    --------
    >>> import bigcat
    >>> bigcat.synth("atlas.h5ad", n_cells=1000, n_genes=2000, n_clusters=10)  # doctest: +SKIP
    """
    from bigcat._io.writers import open_writer
    from bigcat.progress import progress_bar

    if nnz_per_cell is None:
        nnz_per_cell = default_nnz_per_cell(n_genes)
    if float(nnz_per_cell).is_integer():
        nnz_per_cell = int(nnz_per_cell)  # recorded as before for whole numbers
    model = make_model(n_cells, n_genes, n_clusters, nnz_per_cell=nnz_per_cell, seed=seed)
    source = {
        "synth": {
            "n_cells": n_cells,
            "n_genes": n_genes,
            "n_clusters": n_clusters,
            "seed": seed,
            "nnz_per_cell": nnz_per_cell,
        }
    }
    with (
        open_writer(
            path,
            obs=model.obs(),
            var=model.var(),
            uns=model.uns(),
            dtype=np.float32,
            layout=layout,
            overwrite=overwrite,
            source=source,
            storage_options=storage_options,
        ) as writer,
        progress_bar(total=n_cells, unit="cells", desc="synth", enabled=progress) as bar,
    ):
        for block in synth_batches(model):
            writer.write_rows(block)
            bar.update(block.shape[0])
    return writer.path
