"""MapMyCells (AllenInstitute/cell_type_mapper) files from bigcat's statistics.

- :func:`precompute_stats` / :func:`write_mapmycells`: ``precomputed_stats.h5``;
- :func:`reference_markers`: ``reference_markers.h5``, every pair of leaves through bigcat's
  all-pairs DE engine with cell_type_mapper's test;
- :func:`query_markers`: ``query_markers.json``, cell_type_mapper's greedy choice per parent node.
"""

from typing import TYPE_CHECKING

from bigcat._lazy import lazy_exports

if TYPE_CHECKING:
    from bigcat.mapmycells.precompute import PRESENCE, precompute_stats, taxonomy_tree, write_mapmycells
    from bigcat.mapmycells.query import query_markers
    from bigcat.mapmycells.reference import reference_markers

# imported on first use: the marker commands do not load the statistics side (pandas, dask)
__getattr__, __dir__ = lazy_exports(__name__, {
    "bigcat.mapmycells.precompute": ["PRESENCE", "precompute_stats", "taxonomy_tree", "write_mapmycells"],
    "bigcat.mapmycells.query": ["query_markers"], "bigcat.mapmycells.reference": ["reference_markers"],
})  # fmt: skip

__all__ = ["PRESENCE", "precompute_stats", "query_markers", "reference_markers", "taxonomy_tree", "write_mapmycells"]
