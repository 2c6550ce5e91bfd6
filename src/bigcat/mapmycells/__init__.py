"""MapMyCells (AllenInstitute/cell_type_mapper) files from bigcat's statistics.

- :func:`precompute_stats` / :func:`write_mapmycells`: ``precomputed_stats.h5``;
- :func:`reference_markers`: ``reference_markers.h5``, every pair of leaves through bigcat's
  all-pairs DE engine with cell_type_mapper's test;
- :func:`query_markers`: ``query_markers.json``, cell_type_mapper's greedy choice per parent node.
"""

from bigcat.mapmycells.precompute import PRESENCE, precompute_stats, taxonomy_tree, write_mapmycells
from bigcat.mapmycells.query import query_markers
from bigcat.mapmycells.reference import reference_markers

__all__ = ["PRESENCE", "precompute_stats", "query_markers", "reference_markers", "taxonomy_tree", "write_mapmycells"]
