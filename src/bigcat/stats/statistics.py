"""What a statistic is: the accumulators it needs, their dtypes, and the settings of a pass."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bigcat.errors import BigcatInputError

__all__ = [
    "ACCUMULATOR_TABLE",
    "DEFAULT_STATS",
    "STATISTICS",
    "STATISTIC_TABLE",
    "Accumulator",
    "Statistic",
    "count_dtype",
    "extra_present_names",
    "present_test_name",
    "statistic",
]

DEFAULT_STATS = ("means", "present", "sqr_means")
ENGINES = ("blocks", "groupby")
NORMALIZATIONS = (None, "log2cpm")
PRESENT_OPS = ("gt", "ge")


@dataclass(frozen=True)
class Accumulator:
    """An additive cluster × gene sum over cells, what a pass accumulates (and results keep,
    so that results over disjoint cells merge exactly).

    ``term(x, settings)`` is the per-cell value summed, for the ``groupby`` engine (the
    ``blocks`` engine's compiled kernel computes every accumulator in one fused pass).
    """

    name: str
    count: bool  # an integer count (its dtype: count_dtype) rather than a float64 sum
    term: Callable[[Any, Any], Any]


@dataclass(frozen=True)
class Statistic:
    """A statistic: the accumulators it needs and how it is finished from them, as flox's
    ``Aggregation`` (chunk → combine → finalize) but over one fused pass.

    ``finalize(acc, n)`` takes the needed accumulators (slices of them) and the clusters'
    cell counts as a column; ``None``: the statistic is its accumulator.
    """

    name: str
    needs: tuple[str, ...]
    finalize: Callable[[Mapping[str, np.ndarray], np.ndarray], np.ndarray] | None = None


def passes(x: Any, threshold: float, op_ge: bool) -> Any:
    """The presence test: ``x >= threshold`` or ``x > threshold``."""
    return x >= threshold if op_ge else x > threshold


def _mean(accumulator: str) -> Callable[[Mapping[str, np.ndarray], np.ndarray], np.ndarray]:
    return lambda acc, n: acc[accumulator] / n


def _variance(acc: Mapping[str, np.ndarray], n: np.ndarray) -> np.ndarray:
    """Population variance from float64 accumulators (rounding below zero clipped)."""
    mean = acc["sums"] / n
    return np.maximum(acc["sqr_sums"] / n - mean * mean, 0.0)


#: the accumulators, in the order results hold them
ACCUMULATOR_TABLE = {
    a.name: a
    for a in (
        Accumulator("sums", count=False, term=lambda x, _settings: x),
        Accumulator("sqr_sums", count=False, term=lambda x, _settings: x * x),
        Accumulator("present_counts", count=True, term=lambda x, s: passes(x, s.threshold, s.op_ge)),
        Accumulator("nnz", count=True, term=lambda x, _settings: x != 0),
    )
}
#: every statistic :func:`cluster_stats` computes, named as R's scrattch tools name them
STATISTIC_TABLE = {
    s.name: s
    for s in (
        Statistic("sums", ("sums",)),
        Statistic("means", ("sums",), _mean("sums")),
        Statistic("present", ("present_counts",), _mean("present_counts")),
        Statistic("sqr_sums", ("sqr_sums",)),
        Statistic("sqr_means", ("sqr_sums",), _mean("sqr_sums")),
        Statistic("vars", ("sums", "sqr_sums"), _variance),
        Statistic("nnz", ("nnz",)),
    )
}
STATISTICS = tuple(STATISTIC_TABLE)
ACCUMULATORS = tuple(ACCUMULATOR_TABLE)
#: the additive accumulators each statistic is derived from
NEEDS = {name: s.needs for name, s in STATISTIC_TABLE.items()}
#: the float32 statistics derived from the accumulators (the others are accumulators themselves)
DERIVED = tuple(name for name, s in STATISTIC_TABLE.items() if s.finalize is not None)
#: float accumulators; the counts take :func:`count_dtype`
FLOAT_ACCUMULATORS = tuple(name for name, a in ACCUMULATOR_TABLE.items() if not a.count)
#: the accumulator of the ``present_at`` tests inside a pass (split into
#: ``present_counts_<test>`` variables in results)
EXTRA = "present_extra"


def statistic(name: str) -> Statistic:
    """The statistic ``name``: one of :data:`STATISTICS`, or ``present_<test>`` (the fraction
    of a ``present_at`` test, from ``present_counts_<test>``)."""
    if name in STATISTIC_TABLE:
        return STATISTIC_TABLE[name]
    if name.startswith("present_") and not name.startswith("present_counts"):
        counts = "present_counts" + name[len("present") :]
        return Statistic(name, (counts,), _mean(counts))
    raise KeyError(name)


def _acc_dtype(accumulator: str, counts: Any) -> np.dtype:
    """float64 for sums, else the count dtype ``counts``."""
    return np.dtype(np.float64 if accumulator in FLOAT_ACCUMULATORS else counts)


def _zero_passes(threshold: float, op_ge: bool) -> bool:
    """Whether an implicit zero passes a presence test (then failures are counted instead)."""
    return (threshold <= 0.0) if op_ge else (threshold < 0.0)


def present_test_name(spec: str) -> tuple[str, float, bool]:
    """``"ge1"``, ``"gt0"``, ``"ge0.5"`` → (canonical name, threshold, op is ``>=``).

    The names of :func:`cluster_stats`'s ``present_at`` tests (cell_type_mapper's
    ``gt0``/``gt1``/``ge1``): the statistic is ``present_<name>``, its counts
    ``present_counts_<name>``.
    """
    match = re.fullmatch(r"(gt|ge)(-?\d+(?:\.\d+)?(?:e-?\d+)?)", str(spec).strip())
    if match is None:
        msg = f"unknown presence test {spec!r}: use gt<threshold> or ge<threshold>, e.g. gt0, gt1, ge1"
        raise BigcatInputError(msg)
    threshold = float(match.group(2))
    return f"{match.group(1)}{threshold:g}", threshold, match.group(1) == "ge"


@dataclass(frozen=True)
class _Settings:
    """What every kernel call needs besides the block (an opaque literal in the task graph)."""

    accumulators: tuple[str, ...]
    threshold: float
    op_ge: bool
    normalize: bool
    counts: str = "int32"  # dtype of the count accumulators (see :func:`count_dtype`)
    #: further presence tests counted in the same pass: (name, threshold, op is ``>=``)
    extra: tuple[tuple[str, float, bool], ...] = ()

    def dtype(self, accumulator: str) -> np.dtype:
        """The dtype of one accumulator."""
        return _acc_dtype(accumulator, self.counts)

    def shape(self, accumulator: str, n_clusters: int, n_genes: int) -> tuple[int, ...]:
        """One accumulator's shape: clusters × genes, or clusters × tests × genes for the
        extra presence counts (so a cluster's counts for every test lie together)."""
        if accumulator == EXTRA:
            return (n_clusters, len(self.extra), n_genes)
        return (n_clusters, n_genes)

    @property
    def count_fails(self) -> bool:
        """An implicit zero passes the present test: count stored values failing it instead."""
        return _zero_passes(self.threshold, self.op_ge)

    @property
    def tests(self) -> np.ndarray:
        """The extra tests as the kernels take them: rows of (threshold, >=, count failures)."""
        rows = [(t, float(ge), float(_zero_passes(t, ge))) for _, t, ge in self.extra]
        return np.array(rows, dtype=np.float64).reshape(len(rows), 3)


def count_dtype(max_cells: int) -> np.dtype:
    """The dtype of the count accumulators for clusters of at most ``max_cells`` cells.

    ``uint16`` when every count fits (clusters of up to 65,535 cells, as in every atlas
    with thousands of clusters), else ``int32``: half the memory, and half the memory
    traffic for the kernel, whose scattered updates are bound by it.
    """
    return np.dtype(np.uint16) if max_cells <= np.iinfo(np.uint16).max else np.dtype(np.int32)


def _accumulator_bytes(n_clusters: int, n_genes: int, settings: _Settings) -> int:
    """Memory of one full set of accumulators (clusters × genes)."""
    return sum(
        int(np.prod(settings.shape(a, n_clusters, n_genes))) * settings.dtype(a).itemsize for a in settings.accumulators
    )


def _check_present_at(specs: str | Iterable[str]) -> tuple[tuple[str, float, bool], ...]:
    if isinstance(specs, str):
        specs = [t for t in specs.split(",") if t.strip()]
    tests = [present_test_name(t) for t in specs]
    return tuple({name: (name, t, ge) for name, t, ge in tests}.values())


def extra_present_names(ds_or_attrs: Any) -> list[str]:
    """The ``present_at`` tests recorded in a result (or its attrs)."""
    attrs = getattr(ds_or_attrs, "attrs", ds_or_attrs)
    return [t for t in str(attrs.get("present_at", "") or "").split(",") if t]


def _check_stats(stats: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(stats, str):
        stats = [s.strip() for s in stats.split(",") if s.strip()]
    stats = tuple(dict.fromkeys(stats))
    unknown = [s for s in stats if s not in STATISTICS]
    if unknown or not stats:
        msg = f"unknown statistic(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(STATISTICS)}"
        raise BigcatInputError(msg)
    return stats
