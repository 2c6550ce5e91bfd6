"""Pairwise differential expression between clusters from their statistics alone
(scrattch.bigcat's ``de_selected_pairs`` / ``de_stats_pair`` semantics).

- :mod:`~bigcat.de.inputs`: what DE reads from a statistics result, checked once;
- :mod:`~bigcat.de.pairs`: which pairs (all, nearest clusters, siblings, a table);
- :mod:`~bigcat.de.limma`: limma's variance moderation and Holm's adjustment;
- :mod:`~bigcat.de.kernels` and :mod:`~bigcat.de.engine`: the all-pairs engine;
- :mod:`~bigcat.de.api`: :func:`de_pairs`;
- :mod:`~bigcat.de.merge`: :func:`merge_clusters` (scrattch's ``merge_cl``).
"""

from typing import TYPE_CHECKING

from bigcat._lazy import lazy_exports

if TYPE_CHECKING:
    from bigcat.de.api import DEResult, de_pairs
    from bigcat.de.merge import MergeResult, merge_clusters

# imported on first use: the engine alone (MapMyCells' markers) needs neither pandas nor the API
__getattr__, __dir__ = lazy_exports(__name__, {"bigcat.de.api": ["DEResult", "de_pairs"],
                                               "bigcat.de.merge": ["MergeResult", "merge_clusters"]})  # fmt: skip

__all__ = ["DEResult", "MergeResult", "de_pairs", "merge_clusters"]
