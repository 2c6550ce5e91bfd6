"""bigcat: out-of-core tools for cell-by-gene matrices too big for memory.

The Python API is the product; the ``bigcat`` command line is a thin shell over it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from bigcat._lazy import lazy_exports

if TYPE_CHECKING:
    from bigcat.cluster import connect
    from bigcat.convert import convert
    from bigcat.dataset import open_dataset, to_anndata
    from bigcat.de import DEResult, MergeResult, de_pairs, merge_clusters
    from bigcat.errors import BigcatError, BigcatFormatError, BigcatInputError
    from bigcat.mapping import knn, map_cells
    from bigcat.marker_genes import markers
    from bigcat.plot import dotplot, heatmap
    from bigcat.sample import sample
    from bigcat.stats import cluster_stats, merge_stats, read_stats, write_stats
    from bigcat.stats.rollup import rollup
    from bigcat.synth import synth

try:
    __version__ = version("bigcat")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

# each public name is imported on first use: ``import bigcat`` (and every command) pays only for
# the modules it uses (pandas, numba, dask, xarray cost ~0.6 s together)
__getattr__, __dir__ = lazy_exports(__name__, {
    "bigcat.cluster": ["connect"], "bigcat.convert": ["convert"], "bigcat.dataset": ["open_dataset", "to_anndata"],
    "bigcat.de": ["DEResult", "MergeResult", "de_pairs", "merge_clusters"],
    "bigcat.errors": ["BigcatError", "BigcatFormatError", "BigcatInputError"],
    "bigcat.mapping": ["knn", "map_cells"], "bigcat.marker_genes": ["markers"], "bigcat.plot": ["dotplot", "heatmap"],
    "bigcat.sample": ["sample"], "bigcat.synth": ["synth"],
    "bigcat.stats": ["cluster_stats", "merge_stats", "read_stats", "rollup", "write_stats"],
})  # fmt: skip

__all__ = [
    "BigcatError",
    "BigcatFormatError",
    "BigcatInputError",
    "DEResult",
    "MergeResult",
    "__version__",
    "cluster_stats",
    "connect",
    "convert",
    "de_pairs",
    "dotplot",
    "heatmap",
    "knn",
    "map_cells",
    "markers",
    "merge_clusters",
    "merge_stats",
    "open_dataset",
    "read_stats",
    "rollup",
    "sample",
    "synth",
    "to_anndata",
    "write_stats",
]
