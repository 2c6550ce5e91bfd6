"""cluster_stats against a naive dense NumPy oracle, scanpy.get.aggregate, and itself across engines.

Tolerances: results are float32 computed from float64 accumulators, so relative 1e-5
(float32 keeps ~7 digits) with an absolute floor of 1e-5 × the largest |value| squared
for variances (E[x²] − E[x]² in float64, then rounded to float32). Counts are exact.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings

import bigcat
from bigcat.cluster import Capacity
from bigcat.errors import BigcatInputError
from bigcat.stats import STATISTICS, cluster_stats, merge_stats, read_stats, write_stats
from bigcat.stats import api as api_module
from bigcat.stats import blocks as blocks_module
from bigcat.stats import lazy as derived_module
from bigcat.stats import plan as plan_module
from bigcat.stats.statistics import _Settings
from conftest import dense
from oracles import check, oracle
from strategies import problems

ALL = ",".join(STATISTICS)


def write_h5ad(path: Path, x, labels, **obs) -> Path:
    n, g = x.shape
    frame = pd.DataFrame({"cluster": pd.Categorical(labels), **obs}, index=[f"c{i}" for i in range(n)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(g)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.AnnData(X=x, obs=frame, var=var).write_h5ad(path)
    return path


def stats_of(path: Path, threshold: float, op: str, normalize: bool, **options):
    """Every statistic of a drawn problem's file, with its threshold test and normalization."""
    return cluster_stats(
        path, stats=ALL, threshold=threshold, present_op=op, normalize="log2cpm" if normalize else None, **options
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problems())
def test_blocks_engine_matches_oracle(tmp_path_factory, problem):
    x, labels, threshold, op, normalize, block_nnz, counts = problem
    path = write_h5ad(tmp_path_factory.mktemp("p") / "x.h5ad", x, labels)
    with pytest.MonkeyPatch.context() as patch:
        # clusters here are small (uint16 counts); int32 is what clusters of > 65,535 cells get
        patch.setattr(api_module, "count_dtype", lambda _n: np.dtype(counts))
        result = stats_of(path, threshold, op, normalize, block_nnz=block_nnz)
    assert result["present_counts"].dtype == result["nnz"].dtype == np.dtype(counts)
    check(result, oracle(x.toarray(), labels, threshold=threshold, op=op, normalize=normalize))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problems())
def test_groupby_engine_matches_oracle(tmp_path_factory, problem):
    x, labels, threshold, op, normalize, _, _ = problem
    path = write_h5ad(tmp_path_factory.mktemp("p") / "x.h5ad", x, labels)
    result = stats_of(path, threshold, op, normalize, engine="groupby")
    check(result, oracle(x.toarray(), labels, threshold=threshold, op=op, normalize=normalize))


@pytest.fixture(scope="module")
def stores(atlas_h5ad, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stores")
    out = {"h5ad": atlas_h5ad}
    out["sparse"] = bigcat.convert(atlas_h5ad, folder / "sparse.zarr", progress=False)
    out["dense"] = bigcat.convert(atlas_h5ad, folder / "dense.zarr", layout="dense", chunk_cells=700, progress=False)
    return out


@pytest.mark.parametrize("layout", ["h5ad", "sparse", "dense", "csc"])
@pytest.mark.parametrize("engine", ["blocks", "groupby"])
def test_several_presence_tests_in_one_pass(stores, encodings, atlas, layout, engine, tmp_path):
    """gt0, gt1, ge1 (cell_type_mapper's) and a negative threshold (an implicit zero passes)
    next to the main present test, each against the dense oracle, and through a merge."""
    path = encodings["csc"] if layout == "csc" else stores[layout]
    tests = ("gt1", "ge1", "ge0", "gt-0.5", "ge3.5")
    result = cluster_stats(path, stats="present,sums", threshold=2.0, present_at=",".join(tests), engine=engine,
                           normalize="log2cpm", block_nnz=40_000)  # fmt: skip
    x, labels = dense(atlas.X), atlas.obs["cluster"].to_numpy()
    check(result, oracle(x, labels, threshold=2.0, normalize=True), stats=("present", "sums"))
    assert result.attrs["present_at"] == "gt1,ge1,ge0,gt-0.5,ge3.5"
    for name in tests:
        op, threshold = name[:2], float(name[2:])
        expected = oracle(x, labels, threshold=threshold, op=op, normalize=True)
        np.testing.assert_allclose(result[f"present_{name}"].values, expected["present"], rtol=1e-6, err_msg=name)
        counts = result[f"present_counts_{name}"]
        assert counts.dtype == result["present_counts"].dtype
        np.testing.assert_array_equal(counts.values, np.rint(expected["present"] * expected["n_cells"][:, None]))
    # exact merges over disjoint cells keep every test
    half = np.arange(atlas.n_obs) % 2 == 0
    parts = [cluster_stats(path, stats="present", present_at=tests, normalize="log2cpm", cells=half),
             cluster_stats(path, stats="present", present_at=tests, normalize="log2cpm", cells=~half)]  # fmt: skip
    merged = merge_stats(parts)
    whole = cluster_stats(path, stats="present", present_at=tests, normalize="log2cpm")
    for name in tests:
        np.testing.assert_array_equal(merged[f"present_counts_{name}"].values, whole[f"present_counts_{name}"].values)
    with pytest.raises(BigcatInputError, match="different present_at"):
        merge_stats([parts[0], cluster_stats(path, stats="present", cells=~half, normalize="log2cpm")])
    # every output format keeps them
    for suffix in (".zarr", ".parquet", ".h5ad"):
        write_stats(whole, tmp_path / f"s{suffix}")
        back = read_stats(tmp_path / f"s{suffix}")
        np.testing.assert_array_equal(back["present_counts_ge1"].values, whole["present_counts_ge1"].values)
    with pytest.raises(BigcatInputError, match="unknown presence test"):
        cluster_stats(path, present_at="lt1")


@pytest.mark.parametrize("layout", ["h5ad", "sparse", "dense"])
@pytest.mark.parametrize("engine", ["blocks", "groupby"])
@pytest.mark.parametrize("normalize", [False, True])
def test_layouts_and_engines_agree_with_oracle(stores, atlas, layout, engine, normalize):
    result = cluster_stats(
        stores[layout], stats=ALL, engine=engine, normalize="log2cpm" if normalize else None, block_nnz=40_000
    )
    check(result, oracle(dense(atlas.X), atlas.obs["cluster"].to_numpy(), normalize=normalize))
    assert result.attrs["engine"] == engine
    assert result["means"].dtype == np.float32
    assert result["sums"].dtype == np.float64


@pytest.mark.parametrize("encoding", ["csc", "dense", "int64", "bigendian"])
def test_every_x_encoding(encodings, atlas, encoding):
    result = cluster_stats(encodings[encoding], stats=ALL, normalize="log2cpm", block_nnz=30_000)
    check(result, oracle(dense(atlas.X), atlas.obs["cluster"].to_numpy(), normalize=True))


def test_subsets_threshold_and_gene_order(stores, atlas):
    rng = np.random.default_rng(3)
    cells = rng.random(atlas.n_obs) < 0.4
    genes = np.array(atlas.var_names[[17, 3, 900, 4, 1499]])
    result = cluster_stats(
        stores["sparse"], stats=ALL, cells=cells, genes=genes, threshold=2, present_op="ge", normalize="log2cpm"
    )
    assert list(result["gene"].values) == list(genes)
    full = dense(atlas.X)
    totals = full.sum(axis=1, keepdims=True)
    normed = np.log2(full / np.where(totals == 0, 1, totals) * 1e6 + 1)[:, [17, 3, 900, 4, 1499]]
    expected = oracle(normed, atlas.obs["cluster"].to_numpy(), threshold=2, op="ge", keep=cells)
    check(result, expected)
    # the same cells by name and by position
    by_name = cluster_stats(stores["sparse"], stats="sums", cells=atlas.obs_names[cells], genes=[17, 3, 900, 4, 1499])
    raw = oracle(full[:, [17, 3, 900, 4, 1499]], atlas.obs["cluster"].to_numpy(), keep=cells)
    np.testing.assert_allclose(by_name["sums"].values, raw["sums"])


@pytest.mark.parametrize(
    ("capacity", "acc_bytes", "blocks", "in_process", "expected"),
    [
        # 20 workers an adaptive deploy will have (none connected yet): a chain for each
        (Capacity(workers=20, threads=1, memory=2_000_000_000), 10_000_000, 300, False, (20, 1)),
        (Capacity(workers=4, threads=8, memory=64_000_000_000), 10_000_000, 300, False, (32, 1)),
        # fewer blocks than threads: the rest of the threads split the clusters
        (Capacity(workers=4, threads=2, memory=64_000_000_000), 10_000_000, 3, False, (3, 2)),
        # 3 GB of accumulators, 2 GB workers: pieces of ≤ 0.5 GB, one row partition
        (Capacity(workers=2, threads=1, memory=2_000_000_000), 3_000_000_000, 300, False, (1, 6)),
        # ... on 10 such workers: a quarter of their memory holds one copy
        (Capacity(workers=10, threads=2, memory=2_000_000_000), 3_000_000_000, 300, False, (1, 20)),
        # in this process: R copies within a quarter of the memory, R = 1 above 512 MB
        (Capacity(workers=1, threads=2, memory=24_000_000_000), 10_000_000, 300, True, (2, 1)),
        (Capacity(workers=1, threads=2, memory=24_000_000_000), 3_000_000_000, 300, True, (1, 2)),
    ],
)
def test_decomposition_gives_every_planned_thread_a_share(capacity, acc_bytes, blocks, in_process, expected):
    rows, ranges = plan_module._decompose(capacity, acc_bytes, blocks, 5000, in_process)
    assert (rows, ranges) == expected
    if not in_process:
        assert rows * ranges >= capacity.workers  # no worker left idle
        assert acc_bytes / ranges <= 0.25 * capacity.memory  # a piece fits one worker
        if rows > 1:  # copies only where the workers' memory holds them
            assert rows * acc_bytes <= 0.25 * capacity.memory * capacity.workers


def _large_accumulators_with_arena_spy(monkeypatch) -> list:
    """Make every accumulator count as large (blocks read into an arena); returns the list
    each arena made is appended to."""
    monkeypatch.setattr(plan_module, "BIG_ACCUMULATORS", 0)
    arenas: list = []

    class Spy(blocks_module.PageArena):
        def __init__(self, nbytes: int) -> None:
            super().__init__(nbytes)
            arenas.append(self)

    monkeypatch.setattr(blocks_module, "PageArena", Spy)
    return arenas


def test_cluster_ranges_and_row_partitions_give_the_same_result(stores, atlas, monkeypatch, caplog):
    """Force the many-clusters decomposition (one row partition × 4 cluster ranges) and the
    few-clusters one (4 row partitions summed by a tree)."""
    expected = oracle(dense(atlas.X), atlas.obs["cluster"].to_numpy())

    def decomposition() -> str:
        return next(r.getMessage() for r in reversed(caplog.records) if "row partitions" in r.getMessage())

    caplog.set_level("INFO", logger="bigcat")
    monkeypatch.setattr(blocks_module, "_capacity", lambda client: Capacity(1, 4, 1))  # tiny budget → R = 1, C = 4
    check(cluster_stats(stores["sparse"], stats=ALL, block_nnz=20_000), expected)
    assert decomposition().endswith("as 1 row partitions × 4 cluster ranges")
    monkeypatch.setattr(blocks_module, "_capacity", lambda client: Capacity(1, 4, 1 << 40))  # R = 4, C = 1
    check(cluster_stats(stores["sparse"], stats=ALL, block_nnz=20_000), expected)
    assert decomposition().endswith("as 4 row partitions × 1 cluster ranges")
    # large accumulators, threads in this process: one copy of them, cluster ranges only;
    # blocks read into an arena in which the float32 statistics are then built
    arenas = _large_accumulators_with_arena_spy(monkeypatch)
    result = cluster_stats(stores["sparse"], stats=ALL, block_nnz=20_000)
    check(result, expected)
    assert decomposition().endswith("as 1 row partitions × 4 cluster ranges")
    if sys.platform.startswith("linux"):
        (arena,) = arenas
        for name in ("means", "present", "sqr_means", "vars"):
            values = result[name].variable._data  # computed already, into the arena
            assert isinstance(values, np.ndarray), name
            assert values.base is arena.memory, name


def test_the_command_builds_large_statistics_as_it_writes_them(stores, atlas, monkeypatch, tmp_path):
    """With large accumulators, `bigcat stats --out` does not build the float32 statistics in
    the pass' arena (to be read back by the writer): they stay lazy, computed chunk by chunk
    as they are encoded, and the arena's pages go back to the system; the files hold the
    oracle's values."""
    from bigcat.cli import main

    expected = oracle(dense(atlas.X), atlas.obs["cluster"].to_numpy())
    arenas = _large_accumulators_with_arena_spy(monkeypatch)
    spares = []
    real_derive = api_module._derive

    def derive(acc, n_cells, stats, spare=None):
        spares.append(spare)
        return real_derive(acc, n_cells, stats, spare)

    monkeypatch.setattr(api_module, "_derive", derive)
    result = cluster_stats(stores["sparse"], stats=ALL, block_nnz=20_000, _only_written=True)
    assert spares == [None]
    for name in ("means", "present", "sqr_means", "vars"):
        assert not isinstance(result[name].variable._data, np.ndarray), name  # lazy
    check(result, expected)
    if sys.platform.startswith("linux"):
        (arena,) = arenas
        assert arena.used == 0  # nothing was built in it
    for suffix in ("zarr", "parquet"):
        spares.clear()
        out = tmp_path / f"stats.{suffix}"
        assert main(["stats", str(stores["sparse"]), "--stats", ALL, "--out", str(out), "--quiet"]) == 0
        assert spares == [None], suffix  # the command asked for lazy statistics
        check(read_stats(out), expected)
    # the API's result, which the caller may read whole, still builds them in the arena
    spares.clear()
    cluster_stats(stores["sparse"], stats=ALL, block_nnz=20_000)
    assert spares[0] is not None or not sys.platform.startswith("linux")


def test_derived_statistics_are_lazy_and_index_like_numpy(stores, atlas, monkeypatch):
    """means/present/vars are computed on access: any selection equals the oracle's, and
    loading builds each statistic in place (no Dask graph, no copy)."""
    result = cluster_stats(stores["sparse"], stats=ALL)
    expected = oracle(dense(atlas.X), atlas.obs["cluster"].to_numpy())
    for name in ("means", "present", "vars", "sqr_means"):
        assert result[name].chunks is None  # not a Dask array
        want = expected[name]
        for key in [np.s_[3], np.s_[:, 5], np.s_[1:7:2, 3], np.s_[::-1, ::3], np.s_[-2:, 10:20]]:
            np.testing.assert_allclose(result[name].values[key], want[key], rtol=1e-5, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(result[name][key].values, want[key], rtol=1e-5, atol=1e-6, err_msg=name)
        picked = result[name].isel(cluster=[4, 0, 2], gene=[9, 1]).values
        np.testing.assert_allclose(picked, want[[4, 0, 2]][:, [9, 1]], rtol=1e-5, atol=1e-6)
        assert result[name].dtype == np.float32
    loaded = result.load()
    np.testing.assert_allclose(loaded["means"].values, expected["means"], rtol=1e-5, atol=1e-6)
    # large outputs are built by slabs on several threads: force that path
    monkeypatch.setattr(derived_module, "PARALLEL_ABOVE", 0)
    monkeypatch.setattr(derived_module, "SLAB_VALUES", 2 * atlas.n_vars)  # slabs of 2 clusters
    fresh = cluster_stats(stores["sparse"], stats=ALL)
    for name in ("means", "present", "vars", "sqr_means"):
        np.testing.assert_allclose(fresh[name].values, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(fresh[name][::2, 1::3].values, expected[name][::2, 1::3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.chunk()["means"].values, expected["means"], rtol=1e-5, atol=1e-6)


def test_block_size_grows_with_the_accumulators(monkeypatch, stores, atlas):
    settings = _Settings(("sums", "sqr_sums", "present_counts"), 0.0, op_ge=False, normalize=False)
    base = plan_module.BLOCK_NNZ
    assert plan_module._default_block_nnz(50, 32285, settings) == base
    # the switch is where the accumulators (20 bytes per cluster × gene here) pass 512 MB
    assert plan_module._default_block_nnz(792, 32285, settings) == base
    assert plan_module._default_block_nnz(793, 32285, settings) == 4 * base
    # then blocks of accumulator bytes / 24 values, up to MAX_BLOCK_NNZ
    assert plan_module._default_block_nnz(2000, 32285, settings) == 2000 * 32285 * 20 // 24
    assert plan_module._default_block_nnz(5000, 32285, settings) == plan_module.MAX_BLOCK_NNZ
    narrow = _Settings(settings.accumulators, 0.0, op_ge=False, normalize=False, counts="uint16")
    assert plan_module._default_block_nnz(5000, 32285, narrow) == 5000 * 32285 * 18 // 24
    # blocks sent between worker processes stay small
    assert plan_module._default_block_nnz(5000, 32285, narrow, in_process=False) == 4 * base
    # and it changes nothing but speed: force the large-block path on the test atlas
    seen = []
    real = blocks_module._plan_blocks

    def spy(parts, settings, block_nnz, *args):
        seen.append(block_nnz)
        return real(parts, settings, block_nnz, *args)

    monkeypatch.setattr(plan_module, "BIG_ACCUMULATORS", 0)
    monkeypatch.setattr(blocks_module, "_plan_blocks", spy)
    result = cluster_stats(stores["sparse"], stats=ALL)
    assert seen == [4 * base]
    check(result, oracle(dense(atlas.X), atlas.obs["cluster"].to_numpy()))


def test_count_accumulators_are_as_narrow_as_the_largest_cluster_allows(stores):
    assert bigcat.stats.count_dtype(1) == bigcat.stats.count_dtype(65_535) == np.dtype(np.uint16)
    assert bigcat.stats.count_dtype(65_536) == np.dtype(np.int32)
    result = cluster_stats(stores["sparse"], stats="present,nnz")
    assert result["present_counts"].dtype == result["nnz"].dtype == np.dtype(np.uint16)
    # merged results of uint16 counts whose sums pass 65,535 widen to int32, exactly
    big = result.isel(cluster=[0]).copy(deep=True)
    big["n_cells"][:] = 40_000
    big["present_counts"][:] = np.arange(big.sizes["gene"]) % 3 + 39_990
    other = big.copy(deep=True)
    other["cluster"] = big["cluster"]  # the same cluster, other cells
    merged = merge_stats([big, other], allow_repeats=True)  # a copy of one run standing for other cells
    assert merged["present_counts"].dtype == np.dtype(np.int32)
    np.testing.assert_array_equal(merged["present_counts"].values[0], 2 * (np.arange(big.sizes["gene"]) % 3 + 39_990))
    assert int(merged["n_cells"][0]) == 80_000
    np.testing.assert_allclose(merged["present"].values[0], (np.arange(big.sizes["gene"]) % 3 + 39_990) / 40_000)


def test_non_finite_entries_are_counted_slab_by_slab():
    values = np.random.default_rng(0).normal(size=(37, 41))
    values.reshape(-1)[[0, 99, 100, 101, 1516]] = [np.nan, np.inf, -np.inf, np.nan, np.inf]  # at slab edges too
    for slab in (1, 7, 100, 1 << 18):
        assert api_module._count_nonfinite(values, slab=slab) == 5
    assert api_module._count_nonfinite(np.zeros((0, 4))) == 0


def test_release_free_memory_runs_on_linux_without_a_child_process(monkeypatch):
    import subprocess

    from bigcat._memory import release_free_memory

    def no_children(*args, **kwargs):
        msg = f"a child process was started: {args}"
        raise AssertionError(msg)

    # called at the end of a pass holding the accumulators: a forked child (ldconfig, as
    # ctypes.util.find_library runs) doubles the process tree's RSS as monitors see it
    monkeypatch.setattr(subprocess, "Popen", no_children)
    monkeypatch.setattr(os, "posix_spawn", no_children, raising=False)
    assert release_free_memory() is sys.platform.startswith("linux")


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_local_schedulers(stores, atlas, scheduler):
    with bigcat.connect(scheduler):
        result = cluster_stats(stores["sparse"], stats=ALL, block_nnz=50_000)
    check(result, oracle(dense(atlas.X), atlas.obs["cluster"].to_numpy()))


def test_many_files_accumulate_and_merge_exactly(atlas, tmp_path):
    x = sp.csr_matrix(atlas.X)
    labels = atlas.obs["cluster"].to_numpy()
    halves = [slice(0, 1200), slice(1200, None)]
    paths = []
    for i, rows in enumerate(halves):
        part = atlas[rows].copy()
        part.obs_names = [f"f{i}-{n}" for n in part.obs_names]
        path = tmp_path / f"part{i}.h5ad"
        part.write_h5ad(path)
        paths.append(path)
    expected = oracle(x.toarray(), labels)
    together = cluster_stats(paths, stats=ALL)
    check(together, expected)
    separate = [cluster_stats(p, stats=ALL) for p in paths]
    merged = merge_stats(separate)
    check(merged, expected)
    for name in ("sums", "sqr_sums", "present_counts", "nnz"):  # the accumulators add exactly
        np.testing.assert_array_equal(merged[name].values, together[name].values)
    # through stores on disk, as `bigcat stats --merge` does
    stores = [tmp_path / "a.zarr", tmp_path / "b.zarr"]
    for result, store in zip(separate, stores, strict=True):
        write_stats(result, store)
    check(merge_stats(stores), expected)


def test_labels_from_an_external_table(stores, atlas, tmp_path):
    rng = np.random.default_rng(0)
    names = atlas.obs_names.to_numpy()
    chosen = rng.permutation(len(names))[:2000]
    table = pd.DataFrame({"cell_label": names[chosen], "cluster_alias": rng.integers(0, 30, len(chosen))})
    table = pd.concat([table, pd.DataFrame({"cell_label": ["nope1", "nope2"], "cluster_alias": [1, 2]})])
    for suffix in (".csv", ".parquet"):
        path = tmp_path / f"meta{suffix}"
        table.to_csv(path, index=False) if suffix == ".csv" else table.to_parquet(path)
        result = cluster_stats(
            stores["sparse"], stats="sums,nnz", labels=path, label_column="cluster_alias", cell_column="cell_label"
        )
        labels = np.full(len(names), None, dtype=object)
        labels[chosen] = table["cluster_alias"].to_numpy()[: len(chosen)]
        expected = oracle(dense(atlas.X), labels)
        check(result, expected, stats=("sums", "nnz"))
        assert result.attrs["labels_unmatched"] == 2
    with pytest.raises(BigcatInputError, match="label column 'nope'"):
        cluster_stats(stores["sparse"], labels=path, label_column="nope", cell_column="cell_label")


def test_max_cells_per_cluster_is_reproducible(stores, atlas):
    a = cluster_stats(stores["sparse"], stats="sums", max_cells_per_cluster=20, seed=1)
    b = cluster_stats(stores["sparse"], stats="sums", max_cells_per_cluster=20, seed=1)
    c = cluster_stats(stores["sparse"], stats="sums", max_cells_per_cluster=20, seed=2)
    sizes = atlas.obs["cluster"].value_counts().reindex(a["cluster"].values)
    np.testing.assert_array_equal(a["n_cells"].values, np.minimum(sizes.to_numpy(), 20))
    np.testing.assert_array_equal(a["sums"].values, b["sums"].values)
    assert not np.array_equal(a["sums"].values, c["sums"].values)


def test_dataset_input_subset_with_isel(stores, atlas):
    ds = bigcat.open_dataset(stores["sparse"])
    rows = np.arange(0, atlas.n_obs, 3)
    # cells subset by isel; genes by `genes=` so cell totals still cover every gene (a Dataset
    # subset with isel(gene=…) holds only those genes, and its totals cover only them)
    result = cluster_stats(ds.isel(cell=rows), genes=np.arange(100, 400), stats=ALL, normalize="log2cpm")
    full = dense(atlas.X)[rows]
    totals = full.sum(axis=1, keepdims=True)
    normed = np.log2(full / np.where(totals == 0, 1, totals) * 1e6 + 1)[:, 100:400]
    check(result, oracle(normed, atlas.obs["cluster"].to_numpy()[rows]))
    whole = cluster_stats(ds, stats="means")  # an untouched Dataset reads its file directly
    check(whole, oracle(dense(atlas.X), atlas.obs["cluster"].to_numpy()), stats=("means",))


def test_agrees_with_scanpy_aggregate_on_pbmc68k_reduced(tmp_path):
    sc = pytest.importorskip("scanpy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = sc.datasets.pbmc68k_reduced()
        path = tmp_path / "pbmc.h5ad"
        ad.AnnData(X=sp.csr_matrix(adata.X), obs=adata.obs[["louvain"]], var=adata.var[[]]).write_h5ad(path)
        expected = sc.get.aggregate(adata, by="louvain", func=["sum", "mean", "count_nonzero", "var"], dof=0)
    result = cluster_stats(path, by="louvain", stats="sums,means,nnz,vars")
    clusters = list(expected.obs_names)
    result = result.sel(cluster=clusters)
    np.testing.assert_allclose(result["sums"].values, expected.layers["sum"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(result["means"].values, expected.layers["mean"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result["nnz"].values, expected.layers["count_nonzero"])
    np.testing.assert_allclose(result["vars"].values, expected.layers["var"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("suffix", [".zarr", ".parquet", ".csv", ".h5ad"])
def test_outputs(stores, atlas, tmp_path, suffix):
    result = cluster_stats(stores["sparse"], stats="means,present,sqr_means")
    path = tmp_path / f"stats{suffix}"
    write_stats(result, path)
    assert not [p for p in tmp_path.iterdir() if "bigcat-tmp" in p.name]
    if suffix == ".zarr":
        back = read_stats(path)
        np.testing.assert_array_equal(back["means"].values, result["means"].values)
        assert list(back["cluster"].values) == list(result["cluster"].values)
    elif suffix == ".h5ad":
        back = ad.read_h5ad(path)
        np.testing.assert_array_equal(back.layers["present"], result["present"].values)
        np.testing.assert_array_equal(back.obs["n_cells"].to_numpy(), result["n_cells"].values)
    else:
        table = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
        assert len(table) == result.sizes["cluster"] * result.sizes["gene"]
        row = table.iloc[atlas.n_vars + 5]  # second cluster, sixth gene
        assert row["gene"] == result["gene"].values[5]
        assert row["n_cells"] == result["n_cells"].values[1]
        np.testing.assert_allclose(row["means"], result["means"].values[1, 5], rtol=1e-6)
    with pytest.raises(bigcat.errors.BigcatOutputExistsError):
        write_stats(result, path)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_long_table_built_and_encoded_piece_by_piece(stores, tmp_path, monkeypatch, suffix):
    """Pieces of 5 clusters (the 12 clusters in 3 pieces, the last one short) come back whole
    and in order, while each is encoded on a thread as the next is built."""
    from bigcat.stats import formats

    result = cluster_stats(stores["sparse"], stats="means,present,sqr_means")
    n_clusters, n_genes = result.sizes["cluster"], result.sizes["gene"]
    assert n_clusters == 12
    monkeypatch.setattr(formats, "LONG_PIECE_VALUES", 5 * n_genes)
    path = write_stats(result, tmp_path / f"stats{suffix}")[0]
    table = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
    clusters = np.asarray(result["cluster"].values).astype(str)
    np.testing.assert_array_equal(table["cluster"].astype(str), np.repeat(clusters, n_genes))
    np.testing.assert_array_equal(table["gene"].astype(str), np.tile(result["gene"].values.astype(str), n_clusters))
    np.testing.assert_array_equal(table["n_cells"], np.repeat(result["n_cells"].values, n_genes))
    for name in ("means", "present", "sqr_means", "sums"):
        np.testing.assert_allclose(table[name], result[name].values.reshape(-1), rtol=1e-6, err_msg=name)
    if suffix == ".parquet":  # required columns: no definition levels to encode (a quarter of the time)
        import pyarrow.parquet as pq

        assert not [f.name for f in pq.read_schema(path) if f.nullable]


def test_wide_tables(stores, tmp_path):
    result = cluster_stats(stores["sparse"], stats="means,present")
    written = write_stats(result, tmp_path / "stats.parquet", wide=True)
    assert {p.name for p in written} >= {"stats.means.parquet", "stats.present.parquet"}
    table = pd.read_parquet(tmp_path / "stats.means.parquet").set_index("gene")
    first = str(result["cluster"].values[0])
    np.testing.assert_array_equal(table[first].to_numpy(), result["means"].values[0])


def test_bad_requests(stores):
    with pytest.raises(BigcatInputError, match="unknown statistic"):
        cluster_stats(stores["sparse"], stats="medians")
    with pytest.raises(BigcatInputError, match="no obs column 'nope'"):
        cluster_stats(stores["sparse"], by="nope")
    with pytest.raises(BigcatInputError, match="gene name"):
        cluster_stats(stores["sparse"], genes=["not-a-gene"])
    with pytest.raises(BigcatInputError, match="unknown engine"):
        cluster_stats(stores["sparse"], engine="magic")


@pytest.mark.parametrize("budget", [1, 1 << 40], ids=["cluster-ranges", "row-partitions"])
@pytest.mark.parametrize("engine", ["blocks", "groupby"])
def test_remote_scheduler(dask_scheduler, stores, atlas, monkeypatch, budget, engine):
    """The same code path on a real `dask scheduler` + `dask worker` pair on 127.0.0.1."""
    from distributed import Client

    real = blocks_module._capacity
    monkeypatch.setattr(blocks_module, "_capacity", lambda client: replace(real(client), threads=2, memory=budget))
    with Client(dask_scheduler) as client:
        result = cluster_stats(
            stores["sparse"], stats=ALL, normalize="log2cpm", block_nnz=50_000, client=client, engine=engine
        )
        assert client.run(lambda: 1)  # the worker is alive after the run
    check(result, oracle(dense(atlas.X), atlas.obs["cluster"].to_numpy(), normalize=True))


def test_groupby_engine_shows_progress(atlas_h5ad, capsys):
    bigcat.cluster_stats(atlas_h5ad, stats="sums", engine="groupby", progress=True)
    err = capsys.readouterr().err
    done = re.findall(r"stats: 100%\|[^|]*\| (\d+)/(\d+)", err)
    assert done, err
    assert done[-1][0] == done[-1][1]
    assert int(done[-1][1]) > 0
