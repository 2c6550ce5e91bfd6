"""Pictures of cluster statistics: dot plots and heatmaps.

Every function returns a :class:`matplotlib.figure.Figure` built without ``pyplot``, so
nothing depends on (or changes) the global backend: it works headless, and saving uses
Agg. :func:`save` writes a figure atomically (``.png``, ``.svg``, ``.pdf``).

Selection shared by both plots (:func:`plot_layout`):

- genes: ``genes=[…]`` in the order given, or ``markers=N``, the top N markers
  (:func:`bigcat.marker_genes.markers`) of each cluster shown, grouped in cluster order;
- clusters: all clusters with cells, or ``clusters=[…]``;
- order: ``"hierarchical"`` (default) orders clusters by average-linkage clustering of
  their mean profiles over the genes used (randomly projected to 64 dimensions when more
  genes are used, which preserves distances closely and keeps 5,000 clusters fast), or
  ``"given"`` keeps the statistics' order (or the order of ``clusters``);
- pages: a dot plot of 5,000 clusters is unreadable, so clusters are split into pages of
  ``per_page`` in plot order; ``page`` picks one (``bigcat plot`` writes them all).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bigcat._io.fs import name_of
from bigcat.errors import BigcatInputError
from bigcat.marker_genes import load_stats, log_means, lookup, markers

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from matplotlib.figure import Figure

__all__ = [
    "PlotLayout",
    "check_format",
    "dotplot",
    "dotplot_pages",
    "heatmap",
    "heatmap_pages",
    "plot_layout",
    "plot_layouts",
    "save",
]

FORMATS = (".png", ".svg", ".pdf")
#: dimensions of the random projection used to order many-gene profiles
PROJECTED = 64


@dataclass
class PlotLayout:
    """What one page of a plot shows: rows (clusters) and columns (genes), in plot order."""

    clusters: np.ndarray  #: row positions in the statistics, top to bottom
    genes: np.ndarray  #: column positions in the statistics, left to right
    cluster_names: list[str]
    gene_names: list[str]
    means: np.ndarray  #: clusters × genes, as stored (the colour of a dot plot)
    present: np.ndarray | None  #: clusters × genes fraction present (the dot size), if stored
    page: int
    n_pages: int
    source: str
    unit: str


def _order(profiles: np.ndarray, seed: int = 0) -> np.ndarray:
    """Leaf order of an average-linkage tree of the rows of ``profiles``."""
    from scipy.cluster.hierarchy import leaves_list, linkage

    if len(profiles) < 3:
        return np.arange(len(profiles))
    x = np.nan_to_num(np.asarray(profiles, dtype=np.float64))
    if x.shape[1] > PROJECTED:
        rng = np.random.default_rng(seed)
        x = x @ rng.standard_normal((x.shape[1], PROJECTED)) / math.sqrt(PROJECTED)
    return leaves_list(linkage(x, method="average", metric="euclidean"))


def plot_layouts(
    stats: Any,
    genes: Sequence[str] | None = None,
    *,
    markers_per_cluster: int | None = None,
    clusters: Sequence[Any] | None = None,
    order: str = "hierarchical",
    per_page: int | None = None,
    scale: str | None = None,
    storage_options: dict | None = None,
) -> list[PlotLayout]:
    """Choose the clusters and genes of every page of a plot (see the module docstring).

    Parameters
    ----------
    stats
        A statistics Dataset or the path/URL of one (``.zarr``, ``.h5ad``, ``.parquet``,
        ``.csv``).
    genes, markers_per_cluster
        Exactly one: gene names, or the number of top markers per shown cluster.
    clusters
        Cluster names to show (default: all clusters with cells).
    order
        ``"hierarchical"`` or ``"given"``.
    per_page
        Clusters per page (default: one page with everything).
    scale
        Passed to :func:`bigcat.marker_genes.markers` / :func:`~bigcat.marker_genes.log_means`.
    storage_options
        fsspec options for URLs.
    """
    ds, source = load_stats(stats, storage_options)
    if "means" not in ds:
        msg = f"{source}: plots need the 'means' statistic (compute it with --stats means,present)"
        raise BigcatInputError(msg)
    if (genes is None) == (markers_per_cluster is None):
        msg = "give either genes or a number of markers per cluster (--genes or --markers)"
        raise BigcatInputError(msg)
    if order not in ("hierarchical", "given"):
        msg = f"order must be 'hierarchical' or 'given', not {order!r}"
        raise BigcatInputError(msg)
    labels = ds["cluster"].values
    gene_labels = ds["gene"].values
    n_cells = np.asarray(ds["n_cells"].values)
    rows = np.flatnonzero(n_cells > 0) if clusters is None else lookup(labels, clusters, "cluster", source)
    if len(rows) == 0:
        msg = f"{source}: no cluster with cells to plot"
        raise BigcatInputError(msg)
    marker_table = None
    if genes is not None:
        columns = lookup(gene_labels, genes, "gene", source)
        feature_columns = columns
    else:
        if markers_per_cluster is None or markers_per_cluster < 1:
            msg = f"--markers must be at least 1, not {markers_per_cluster}"
            raise BigcatInputError(msg)
        marker_table = markers(ds, top=markers_per_cluster, clusters=[labels[r] for r in rows], scale=scale)
        feature_columns = lookup(gene_labels, marker_table["gene"].drop_duplicates().tolist(), "gene", source)
    if order == "hierarchical" and len(rows) > 2:
        lm, _ = log_means(ds, scale)
        if len(feature_columns) == 0:
            feature_columns = np.arange(len(gene_labels))
        rows = rows[_order(lm[np.ix_(rows, feature_columns)])]
    per_page = per_page or len(rows)
    if per_page < 1:
        msg = f"per_page must be at least 1, not {per_page}"
        raise BigcatInputError(msg)
    n_pages = max(1, math.ceil(len(rows) / per_page))
    by_cluster = {}
    if marker_table is not None:
        by_cluster = {str(k): g["gene"].tolist() for k, g in marker_table.groupby("cluster", sort=False)}
    unit = "log2 CPM" if ds.attrs.get("normalize") == "log2cpm" else "expression"
    means_all = np.asarray(ds["means"].values)
    present_all = np.asarray(ds["present"].values) if "present" in ds else None
    layouts = []
    for page in range(n_pages):
        shown = rows[page * per_page : (page + 1) * per_page]
        if marker_table is not None:
            # each shown cluster's markers, in row order; a gene shared by two clusters once
            names = list(dict.fromkeys(g for r in shown for g in by_cluster.get(str(labels[r]), [])))
            if not names:
                msg = f"{source}: the clusters shown have no marker genes (no gene is more specific to one of them)"
                raise BigcatInputError(msg)
            columns = lookup(gene_labels, names, "gene", source)
        index = np.ix_(shown, columns)
        layouts.append(
            PlotLayout(
                clusters=shown,
                genes=np.asarray(columns),
                cluster_names=[str(labels[r]) for r in shown],
                gene_names=[str(gene_labels[c]) for c in columns],
                means=means_all[index],
                present=None if present_all is None else present_all[index],
                page=page,
                n_pages=n_pages,
                source=source,
                unit=unit,
            )
        )
    return layouts


def plot_layout(stats: Any, genes: Sequence[str] | None = None, *, page: int = 0, **options: Any) -> PlotLayout:
    """One page of :func:`plot_layouts` (``page`` counts from 0)."""
    layouts = plot_layouts(stats, genes, **options)
    if not 0 <= page < len(layouts):
        msg = f"page {page} does not exist: there are {len(layouts)} page(s) (counted from 0)"
        raise BigcatInputError(msg)
    return layouts[page]


def _figure(width: float, height: float) -> Any:

    from matplotlib.figure import Figure

    return Figure(figsize=(min(width, 200.0), min(height, 200.0)), layout="constrained")


def _label_axes(ax: Any, layout: PlotLayout, *, max_labels: int = 200) -> None:
    n_rows, n_cols = len(layout.cluster_names), len(layout.gene_names)
    step_r = max(1, math.ceil(n_rows / max_labels))
    step_c = max(1, math.ceil(n_cols / max_labels))
    ax.set_yticks(np.arange(0, n_rows, step_r), layout.cluster_names[::step_r], fontsize=8)
    ax.set_xticks(np.arange(0, n_cols, step_c), layout.gene_names[::step_c], fontsize=8, rotation=90)
    ax.set_xlim(-0.5, n_cols - 0.5)
    ax.set_ylim(n_rows - 0.5, -0.5)
    ax.set_xlabel("gene")
    ax.set_ylabel("cluster")


def _title(layout: PlotLayout, kind: str, title: str | None) -> str:
    if title is not None:
        return title
    page = f", page {layout.page + 1} of {layout.n_pages}" if layout.n_pages > 1 else ""
    return f"{kind} of {name_of(layout.source)}{page}"


def dotplot(
    stats: Any,
    genes: Sequence[str] | None = None,
    *,
    markers: int | None = None,
    clusters: Sequence[Any] | None = None,
    order: str = "hierarchical",
    page: int = 0,
    per_page: int | None = 60,
    standard_scale: str | None = None,
    max_dot_size: float = 120.0,
    cmap: str = "Reds",
    title: str | None = None,
    scale: str | None = None,
    storage_options: dict | None = None,
) -> Figure:
    """A dot plot: a dot per cluster × gene, area ∝ fraction present, colour = mean.

    Parameters
    ----------
    stats, genes, markers, clusters, order, page, per_page, scale, storage_options
        Selection and layout: see :func:`plot_layout` (``markers`` is the number of top
        markers per cluster). ``per_page`` defaults to 60 clusters per page.
    standard_scale
        ``"gene"``: colour each gene's means scaled to 0–1 over the clusters shown (as
        scanpy's ``standard_scale="var"``); default: the means themselves.
    max_dot_size
        Marker area in points² of a gene present in every cell of a cluster; a dot's
        area is ``present × max_dot_size``.
    cmap, title
        Colour map; title (default: names the statistics and the page).

    Returns
    -------
    matplotlib.figure.Figure
        Axes 0 is the plot: one ``PathCollection`` whose offsets are (gene column, cluster
        row), sizes are ``present × max_dot_size`` and colour array the (scaled) means.
    """
    layout = plot_layout(
        stats, genes, page=page, markers_per_cluster=markers, clusters=clusters, order=order,
        per_page=per_page, scale=scale, storage_options=storage_options,
    )  # fmt: skip
    return _draw_dotplot(layout, standard_scale, max_dot_size, cmap, title)


def dotplot_pages(
    stats: Any,
    genes: Sequence[str] | None = None,
    *,
    markers: int | None = None,
    clusters: Sequence[Any] | None = None,
    order: str = "hierarchical",
    per_page: int | None = 60,
    scale: str | None = None,
    storage_options: dict | None = None,
    **style: Any,
) -> Iterator[Figure]:
    """Every page of :func:`dotplot`, one figure at a time (the selection is computed once)."""
    for layout in plot_layouts(
        stats, genes, markers_per_cluster=markers, clusters=clusters, order=order, per_page=per_page,
        scale=scale, storage_options=storage_options,
    ):  # fmt: skip
        yield _draw_dotplot(layout, **style)


def _draw_dotplot(
    layout: PlotLayout,
    standard_scale: str | None = None,
    max_dot_size: float = 120.0,
    cmap: str = "Reds",
    title: str | None = None,
) -> Figure:
    if layout.present is None:
        msg = f"{layout.source}: a dot plot needs the 'present' statistic (compute it with --stats means,present)"
        raise BigcatInputError(msg)
    colour = _scaled(layout.means, standard_scale)
    n_rows, n_cols = colour.shape
    fig = _figure(2.8 + 0.26 * n_cols + 0.07 * max(map(len, layout.cluster_names)), 1.6 + 0.24 * n_rows)
    grid = fig.add_gridspec(2, 2, width_ratios=[max(n_cols, 1), 2.2], height_ratios=[1, 1])
    ax = fig.add_subplot(grid[:, 0])
    yy, xx = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    dots = ax.scatter(
        xx.ravel(),
        yy.ravel(),
        s=np.asarray(layout.present, dtype=np.float64).ravel() * max_dot_size,
        c=colour.ravel(),
        cmap=cmap,
        edgecolors="none",
    )
    _label_axes(ax, layout)
    ax.set_title(_title(layout, "Dot plot", title), fontsize=10)
    ax.grid(visible=True, linewidth=0.3, alpha=0.3)
    ax.set_axisbelow(True)
    bar = fig.colorbar(dots, ax=ax, cax=fig.add_subplot(grid[0, 1]))
    bar.set_label("mean, scaled per gene" if standard_scale else f"mean ({layout.unit})", fontsize=8)
    legend = fig.add_subplot(grid[1, 1])
    fractions = np.array([0.25, 0.5, 0.75, 1.0])
    legend.scatter(np.zeros(4), np.arange(4), s=fractions * max_dot_size, c="grey", edgecolors="none")
    legend.set_yticks(np.arange(4), [f"{f:.0%}" for f in fractions], fontsize=8)
    legend.yaxis.tick_right()
    legend.set_xticks([])
    legend.set_ylim(-0.7, 3.7)
    legend.set_title("present", fontsize=8)
    for spine in legend.spines.values():
        spine.set_visible(False)
    fig.bigcat_layout = layout
    return fig


def _scaled(means: np.ndarray, how: str | None) -> np.ndarray:
    means = np.asarray(means, dtype=np.float64)
    if how is None or how == "none":
        return means
    with np.errstate(invalid="ignore", divide="ignore"):
        if how == "gene":  # 0–1 per gene
            low, high = np.nanmin(means, axis=0), np.nanmax(means, axis=0)
            span = np.where(high > low, high - low, 1.0)
            return (means - low) / span
        if how == "zscore":  # centred and scaled per gene
            sd = np.nanstd(means, axis=0)
            return (means - np.nanmean(means, axis=0)) / np.where(sd > 0, sd, 1.0)
    msg = f"unknown scaling {how!r}: use 'gene' (0–1 per gene), 'zscore' (per gene) or none"
    raise BigcatInputError(msg)


def heatmap(
    stats: Any,
    genes: Sequence[str] | None = None,
    *,
    markers: int | None = None,
    clusters: Sequence[Any] | None = None,
    order: str = "hierarchical",
    page: int = 0,
    per_page: int | None = None,
    standard_scale: str | None = None,
    cmap: str | None = None,
    title: str | None = None,
    scale: str | None = None,
    storage_options: dict | None = None,
) -> Figure:
    """A heatmap of cluster means: clusters as rows, genes as columns.

    Parameters
    ----------
    stats, genes, markers, clusters, order, page, per_page, scale, storage_options
        Selection and layout: see :func:`plot_layout`. One page holds every cluster by
        default: an image stays readable with 5,000 rows (labels are thinned to 200).
    standard_scale
        ``"zscore"`` (centred and scaled per gene over the clusters shown), ``"gene"``
        (0–1 per gene) or ``None`` (the means).
    cmap, title
        Colour map (default ``viridis``; ``RdBu_r`` for z-scores); title.

    Returns
    -------
    matplotlib.figure.Figure
        Axes 0 holds one image whose array is the clusters × genes values shown.
    """
    layout = plot_layout(
        stats, genes, page=page, markers_per_cluster=markers, clusters=clusters, order=order,
        per_page=per_page, scale=scale, storage_options=storage_options,
    )  # fmt: skip
    return _draw_heatmap(layout, standard_scale, cmap, title)


def heatmap_pages(
    stats: Any,
    genes: Sequence[str] | None = None,
    *,
    markers: int | None = None,
    clusters: Sequence[Any] | None = None,
    order: str = "hierarchical",
    per_page: int | None = None,
    scale: str | None = None,
    storage_options: dict | None = None,
    **style: Any,
) -> Iterator[Figure]:
    """Every page of :func:`heatmap`, one figure at a time (the selection is computed once)."""
    for layout in plot_layouts(
        stats, genes, markers_per_cluster=markers, clusters=clusters, order=order, per_page=per_page,
        scale=scale, storage_options=storage_options,
    ):  # fmt: skip
        yield _draw_heatmap(layout, **style)


def _draw_heatmap(
    layout: PlotLayout, standard_scale: str | None = None, cmap: str | None = None, title: str | None = None
) -> Figure:
    values = _scaled(layout.means, standard_scale)
    n_rows, n_cols = values.shape
    width = 3.0 + min(0.22 * n_cols, 40) + 0.07 * max(map(len, layout.cluster_names))
    fig = _figure(width, 1.8 + min(0.2 * n_rows, 40))
    ax = fig.add_subplot()
    if cmap is None:
        cmap = "RdBu_r" if standard_scale == "zscore" else "viridis"
    limits = {}
    if standard_scale == "zscore":
        bound = float(np.nanmax(np.abs(values))) if values.size else 1.0
        limits = {"vmin": -bound, "vmax": bound}
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=cmap, **limits)
    _label_axes(ax, layout)
    ax.set_title(_title(layout, "Heatmap", title), fontsize=10)
    label = {"zscore": "z-score of the mean per gene", "gene": "mean, scaled per gene"}.get(
        standard_scale or "", f"mean ({layout.unit})"
    )
    fig.colorbar(image, ax=ax, shrink=min(1.0, 6 / max(fig.get_figheight(), 1))).set_label(label, fontsize=8)
    fig.bigcat_layout = layout
    return fig


def check_format(path: str | os.PathLike) -> str:
    """The figure format ``path`` names (``.png``, ``.svg``, ``.pdf``), or a clear error."""
    from bigcat._io import fs

    suffix = fs.suffix_of(path)
    if suffix not in FORMATS:
        msg = f"{path}: unknown figure type {suffix or '(none)'!r}; use {', '.join(FORMATS)}"
        raise BigcatInputError(msg)
    return suffix


def _version() -> str:
    from bigcat import __version__

    return __version__


def save(
    fig: Figure, path: str | os.PathLike, *, overwrite: bool = False, storage_options: dict | None = None
) -> Path | str:
    """Write ``fig`` to ``path`` (``.png``, ``.svg`` or ``.pdf``, from the suffix), atomically."""
    from bigcat._io import fs
    from bigcat._io.publish import publish

    suffix = check_format(path)
    target = fs.path_of(path)
    with publish(target, overwrite=overwrite, storage_options=storage_options, kind="file") as tmp:
        software = {"png": "Software", "svg": "Creator", "pdf": "Creator"}[suffix[1:]]
        fig.savefig(tmp, format=suffix[1:], dpi=120, metadata={software: f"bigcat {_version()}"})
    return target
