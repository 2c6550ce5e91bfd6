"""What pairwise DE reads from a statistics result: cell counts, means, squared means and the
fraction of cells with x ≥ low_th, per cluster and gene, checked once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bigcat.errors import BigcatInputError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DEInput", "load_de_input"]


@dataclass
class DEInput:
    """Per cluster (rows) and gene (columns), in float64 (clusters × genes)."""

    source: str
    clusters: pd.Index
    genes: pd.Index
    n_cells: np.ndarray  # int64 per cluster
    means: np.ndarray
    sqr_means: np.ndarray | None  # None when only presence tests are asked for
    present_counts: np.ndarray  # cells with x ≥ low_th (integers, as stored)

    def take(self, rows: np.ndarray) -> DEInput:
        """The same statistics for the clusters ``rows`` (positions), in that order."""
        return DEInput(
            self.source, self.clusters[rows], self.genes, self.n_cells[rows], self.means[rows],
            None if self.sqr_means is None else self.sqr_means[rows], self.present_counts[rows],
        )  # fmt: skip


def load_de_input(
    stats: Any, *, low_th: float, need_squares: bool, scale: str | None, storage_options: dict | None = None
) -> DEInput:
    """Read and check what DE needs from ``stats`` (a result of :func:`bigcat.cluster_stats` or a
    path :func:`bigcat.read_stats` reads).

    Raises
    ------
    BigcatInputError
        Statistics not on a log2 scale (``scale=None`` and not computed with
        ``normalize="log2cpm"``), without squared sums when a variance is needed, or without
        the fraction of cells with x ≥ ``low_th`` — each with how to compute the right ones.
    """
    import xarray as xr

    from bigcat.stats import read_stats

    if isinstance(stats, xr.Dataset):
        ds, source = stats, "the statistics"
    elif isinstance(stats, (str, os.PathLike)):
        ds, source = read_stats(stats, storage_options), str(stats)
    else:
        msg = f"stats must be a statistics Dataset or the path of one, not {type(stats).__name__}"
        raise BigcatInputError(msg)
    _check_scale(ds, source, scale)
    if "n_cells" not in ds or not ({"sums", "means"} & set(ds.data_vars)):
        msg = f"{source}: DE needs n_cells and sums (or means) per cluster; compute them with bigcat stats"
        raise BigcatInputError(msg)
    n_cells = np.asarray(ds["n_cells"].values, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_cell = n_cells[:, None].astype(np.float64)
        means = _per_cell(ds, "sums", "means", per_cell)
        sqr_means = _per_cell(ds, "sqr_sums", "sqr_means", per_cell) if need_squares else None
        if need_squares and sqr_means is None:
            msg = (
                f"{source}: the t-tests need squared sums (sqr_sums or sqr_means) per cluster; compute them with "
                "bigcat stats --stats means,sqr_means,… (or method='chisq', which needs presence only)"
            )
            raise BigcatInputError(msg)
        if means is None:  # checked above: sums or means are there
            msg = f"{source}: no sums or means"
            raise BigcatInputError(msg)
        counts = _present_counts(ds, source, low_th, n_cells)
    import pandas as pd

    return DEInput(
        source, pd.Index(np.asarray(ds["cluster"].values).astype(str)), pd.Index(np.asarray(ds["gene"].values)),
        n_cells, means, sqr_means, counts,
    )  # fmt: skip


def _check_scale(ds: Any, source: str, scale: str | None) -> None:
    """DE compares means of log2 values (lfc = mean₁ − mean₂), as scrattch does."""
    if scale not in (None, "log"):
        msg = f"scale must be 'log' (X holds log2 values) or None (from the statistics), not {scale!r}"
        raise BigcatInputError(msg)
    if scale is None and ds.attrs.get("normalize") != "log2cpm":
        msg = (
            f"{source}: DE expects statistics of log2 data (lfc = mean1 - mean2), and these were computed on X as "
            f"stored (normalize={ds.attrs.get('normalize', 'none')}); compute them from counts with "
            "--normalize log2cpm, or pass scale='log' (--scale log) if X already holds log2(CPM+1)"
        )
        raise BigcatInputError(msg)


def _per_cell(ds: Any, total: str, mean: str, n: np.ndarray) -> np.ndarray | None:
    """A total per cell (divided, as R divides), or the mean as stored."""
    if total in ds:
        values = ds[total].values
        out = np.empty(values.shape, dtype=np.float64)
        return np.divide(values, n, out=out)
    if mean in ds:
        return np.asarray(ds[mean].values, dtype=np.float64)
    return None


def _present_counts(ds: Any, source: str, low_th: float, n_cells: np.ndarray) -> np.ndarray:
    """Cells with x ≥ ``low_th`` per cluster and gene: a ``present_at`` test of that threshold, or
    the main presence test when it is that one."""
    from bigcat.stats import present_test_name

    name, _, _ = present_test_name(f"ge{low_th:g}")
    for counts, fraction in ((f"present_counts_{name}", f"present_{name}"),):
        if counts in ds:
            return np.asarray(ds[counts].values)
        if fraction in ds:
            return np.rint(np.asarray(ds[fraction].values, dtype=np.float64) * n_cells[:, None]).astype(np.int64)
    op, threshold = ds.attrs.get("present_op", "gt"), float(ds.attrs.get("threshold", 0.0))
    if op == "ge" and threshold == low_th:
        if "present_counts" in ds:
            return np.asarray(ds["present_counts"].values)
        if "present" in ds:
            return np.rint(np.asarray(ds["present"].values, dtype=np.float64) * n_cells[:, None]).astype(np.int64)
    symbol = ">=" if op == "ge" else ">"
    msg = (
        f"{source}: DE counts cells with x >= {low_th:g} (scrattch's low.th), and these statistics count x "
        f"{symbol} {threshold:g}; compute them with bigcat stats … --present-at {name} (present_at='{name}'), "
        "which adds that test to the same pass"
    )
    raise BigcatInputError(msg)
