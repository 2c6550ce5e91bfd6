"""Per-cluster statistics (sums, means, present, squared means, variances, non-zeros), out of core.

:func:`cluster_stats` is the heart of bigcat; :func:`merge_stats` merges results over
disjoint cells exactly; :func:`read_stats` and :func:`write_stats` move them to and from
``.zarr``, ``.h5ad``, ``.parquet`` and ``.csv``. The modules, in the order a run uses them:

- :mod:`~bigcat.stats.statistics`: what each statistic needs (accumulators, dtypes) and
  the settings of a pass;
- :mod:`~bigcat.stats.inputs` and :mod:`~bigcat.stats.labels`: the inputs as parts, cluster
  labels as codes, cell and gene selections;
- :mod:`~bigcat.stats.plan`: block sizes and the R × C decomposition of the accumulators;
- :mod:`~bigcat.stats.blocks` (the compiled single-pass engine: a Dask graph on a cluster,
  :mod:`~bigcat.stats.local`'s threads in this process) and :mod:`~bigcat.stats.groupby`
  (xarray + flox, the reference);
- :mod:`~bigcat.stats.lazy`: the float32 statistics computed from the accumulators when read;
- :mod:`~bigcat.stats.api` and :mod:`~bigcat.stats.formats`: the public functions;
- :mod:`~bigcat.stats.rollup`: statistics of a taxonomy's coarser levels, by adding accumulators.
"""

from bigcat.stats.api import cluster_stats, merge_stats, runs_in_process
from bigcat.stats.formats import read_stats, write_stats
from bigcat.stats.rollup import rollup
from bigcat.stats.statistics import (
    DEFAULT_STATS,
    STATISTICS,
    count_dtype,
    extra_present_names,
    present_test_name,
)

__all__ = [
    "DEFAULT_STATS",
    "STATISTICS",
    "cluster_stats",
    "count_dtype",
    "extra_present_names",
    "merge_stats",
    "present_test_name",
    "read_stats",
    "rollup",
    "runs_in_process",
    "write_stats",
]
