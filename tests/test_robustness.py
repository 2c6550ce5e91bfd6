"""Interruptions, resumable conversion, bad inputs and edge cases."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings

import bigcat
from bigcat.cli import killed_worker_message, main
from bigcat.errors import BigcatInputError, BigcatOutputExistsError
from oracles import check, oracle
from strategies import anndata_objects

SHARD = 1 << 14  # small shards: many checkpoints on a small file
BIGCAT = [sys.executable, "-m", "bigcat"]


def files_of(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 4M values: a few seconds to convert in small blocks, time enough to interrupt."""
    path = tmp_path_factory.mktemp("medium") / "medium atlas.h5ad"  # a space in the name, on purpose
    bigcat.synth(path, n_cells=20_000, n_genes=2000, n_clusters=10, nnz_per_cell=200, seed=1, progress=False)
    return path


def convert_args(layout: str) -> list[str]:
    return ["--layout", layout] + (["--shard-values", str(SHARD)] if layout == "sparse" else ["--chunk-cells", "500"])


def start_and_interrupt(source: Path, output: Path, layout: str, sig: int) -> subprocess.CompletedProcess:
    """Start `bigcat convert` in its own process and send ``sig`` once it recorded progress."""
    state = output.parent / f".{output.name}.bigcat-partial" / "bigcat-resume" / "state.json"
    proc = subprocess.Popen(
        [*BIGCAT, "convert", str(source), str(output), "--quiet", "--block-values", "2000", *convert_args(layout)],
        stderr=subprocess.PIPE,
        text=True,
        # a shell without job control starts background jobs with SIGINT ignored, and Python
        # keeps it ignored: give the child the default disposition so Ctrl-C reaches it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not state.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


@pytest.mark.parametrize("layout", ["sparse", "dense"])
def test_resume_after_sigkill_is_byte_identical(medium: Path, tmp_path: Path, layout: str, capsys) -> None:
    reference = tmp_path / "reference.zarr"
    assert main(["convert", str(medium), str(reference), "--quiet", *convert_args(layout)]) == 0
    output = tmp_path / "out put.zarr"
    done = start_and_interrupt(medium, output, layout, signal.SIGKILL)
    assert done.returncode == -signal.SIGKILL
    assert not output.exists()  # nothing under the final name
    partial = tmp_path / f".{output.name}.bigcat-partial"
    state = __import__("json").loads((partial / "bigcat-resume" / "state.json").read_text())
    assert 0 < state["rows"] < 20_000
    capsys.readouterr()
    # without --resume the interrupted work is not thrown away silently
    assert main(["convert", str(medium), str(output), "--quiet", *convert_args(layout)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["convert", str(medium), str(output), "--quiet", "--resume", *convert_args(layout)]) == 0
    assert "resuming after" in capsys.readouterr().err
    assert not partial.exists()
    assert files_of(output) == files_of(reference)
    ds = bigcat.open_dataset(output)
    assert ds.sizes["cell"] == 20_000


def test_sigint_exits_130_and_resume_finishes(medium: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference.zarr"
    bigcat.convert(medium, reference, shard_values=SHARD, progress=False)
    output = tmp_path / "out.zarr"
    done = start_and_interrupt(medium, output, "sparse", signal.SIGINT)
    assert done.returncode == 130, done.stderr
    assert "interrupted" in done.stderr
    assert "rerun with --resume to continue" in done.stderr
    assert "Traceback" not in done.stderr
    bigcat.convert(medium, output, shard_values=SHARD, progress=False, resume=True)
    assert files_of(output) == files_of(reference)


def test_resume_refuses_a_changed_input_and_overwrite_starts_over(medium: Path, tmp_path: Path) -> None:
    source = tmp_path / "input.h5ad"
    shutil.copy(medium, source)
    output = tmp_path / "out.zarr"
    start_and_interrupt(source, output, "sparse", signal.SIGKILL)
    # another shard size: the message names the recorded one and the flag that continues the run
    pattern = rf"used --shard-values {SHARD} .*rerun with --resume --shard-values {SHARD}"
    with pytest.raises(BigcatInputError, match=pattern):
        bigcat.convert(source, output, shard_values=2 * SHARD, progress=False, resume=True)
    bigcat.synth(source, n_cells=20_000, n_genes=2000, n_clusters=10, nnz_per_cell=200, seed=2, progress=False,
                 overwrite=True)  # fmt: skip
    with pytest.raises(BigcatInputError, match=r"refusing to resume: the input changed since"):
        bigcat.convert(source, output, shard_values=SHARD, progress=False, resume=True)
    with pytest.raises(BigcatOutputExistsError, match="interrupted conversion"):
        bigcat.convert(source, output, shard_values=SHARD, progress=False)
    bigcat.convert(source, output, shard_values=SHARD, progress=False, overwrite=True)
    reference = tmp_path / "reference.zarr"
    bigcat.convert(source, reference, shard_values=SHARD, progress=False)
    assert files_of(output) == files_of(reference)
    assert not any(p.name.endswith("bigcat-partial") for p in tmp_path.iterdir())
    with pytest.raises(BigcatInputError, match=r"--resume works for \.zarr outputs only"):
        bigcat.convert(source, tmp_path / "x.h5ad", resume=True, progress=False)


def test_resume_refuses_int32_indices_the_values_outgrew(medium: Path, tmp_path: Path, monkeypatch) -> None:
    """An interrupted store with int32 indices (all an older bigcat wrote) cannot take an input
    whose values need int64 ones: indptr and indices share one dtype, so resuming is refused
    (one clear error), and a fresh conversion writes int64 for both."""
    import zarr

    import bigcat._io.writers as writers

    output = tmp_path / "out.zarr"
    start_and_interrupt(medium, output, "sparse", signal.SIGKILL)
    partial = tmp_path / f".{output.name}.bigcat-partial"
    assert zarr.open_group(partial, mode="r")["X/indices"].dtype == np.int32
    monkeypatch.setattr(writers, "INT32_MAX", 1000)  # as if the input had more values than int32 holds
    with pytest.raises(BigcatInputError, match=r"stores int32 indices, but its [\d,]+ values need int64 ones"):
        bigcat.convert(medium, output, shard_values=SHARD, progress=False, resume=True)
    bigcat.convert(medium, output, shard_values=SHARD, progress=False, overwrite=True)
    x = zarr.open_group(output, mode="r")["X"]
    assert x["indptr"].dtype == x["indices"].dtype == np.int64
    got, want = ad.read_zarr(output).X, ad.read_h5ad(medium).X
    assert got.indptr.dtype == got.indices.dtype == np.int64
    assert (got != want).nnz == 0


# ------------------------------------------------------------------------------------------
# bad inputs: one line naming the file and the problem, exit code 2 (1 for runtime failures)
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bad inputs")
    rng = np.random.default_rng(0)
    x = sp.random(50, 20, density=0.3, format="csr", random_state=0, dtype=np.float32)
    x.data = np.ceil(x.data * 5)
    obs = pd.DataFrame({"cluster": pd.Categorical(rng.choice(["a", "b"], 50))}, index=[f"c{i}" for i in range(50)])
    var = pd.DataFrame(index=[f"g{i}" for i in range(20)])

    def write(name: str, x=x, obs=obs, var=var) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ad.AnnData(X=x, obs=obs, var=var).write_h5ad(folder / name)

    write("good.h5ad")
    (folder / "text.h5ad").write_text("hello\n")
    data = (folder / "good.h5ad").read_bytes()
    (folder / "truncated.h5ad").write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.AnnData(obs=obs, var=var).write_h5ad(folder / "no-x.h5ad")
    write("unlabelled.h5ad", obs=obs.assign(cluster=pd.Categorical([None] * 50, categories=["a"])))
    write("zero-cells.h5ad", x=sp.csr_matrix((0, 20), dtype=np.float32), obs=obs.iloc[:0])
    write("zero-genes.h5ad", x=sp.csr_matrix((50, 0), dtype=np.float32), var=var.iloc[:0])
    negative = x.copy()
    negative.data[0] = -1
    write("negative.h5ad", x=negative)
    for name, damage in [
        ("indptr", lambda g: g["indptr"].__setitem__(5, 0)),
        ("indices", lambda g: g["indices"].__setitem__(3, 999)),
        ("length", None),
    ]:
        shutil.copy(folder / "good.h5ad", folder / f"corrupt-{name}.h5ad")
        with h5py.File(folder / f"corrupt-{name}.h5ad", "a") as f:
            if damage is not None:
                damage(f["X"])
            else:
                indptr = f["X"]["indptr"][...]
                indptr[-1] += 10
                del f["X"]["indptr"]
                f["X"].create_dataset("indptr", data=indptr)
    with h5py.File(folder / "tenx.h5", "w") as f:
        m = f.create_group("matrix")
        for key in ("data", "indices", "indptr"):
            m.create_dataset(key, data=getattr(x.T.tocsc(), key))
        m.create_dataset("shape", data=[20, 50])
        m.create_dataset("barcodes", data=np.array([b"AAAC"] * 50))
        m.create_group("features").create_dataset("id", data=np.array([b"g"] * 20))
    with h5py.File(folder / "other.h5", "w") as f:
        f.create_dataset("foo", data=np.arange(3))
    (folder / "exists.zarr").mkdir()
    bigcat.convert(folder / "good.h5ad", folder / "done.zarr", progress=False)
    return folder


BAD = [
    (["convert", "missing.h5ad", "o.zarr"], 2, "missing.h5ad: no such file"),
    (["stats", "missing.zarr"], 2, "missing.zarr: no such file"),
    (["convert", "text.h5ad", "o.zarr"], 2, "text.h5ad: not an HDF5 file"),
    (["convert", "truncated.h5ad", "o.zarr"], 2, "truncated.h5ad: cannot be read as HDF5"),
    (["convert", "no-x.h5ad", "o.zarr"], 2, "no-x.h5ad: has no X matrix"),
    (["stats", "good.h5ad", "--by", "clust", "--cluster", "sync"], 2, "no obs column 'clust'; available: cluster"),
    (["stats", "unlabelled.h5ad", "--cluster", "sync"], 2, "unlabelled.h5ad: no cell has a cluster label in 'cluster'"),
    (["stats", "zero-cells.h5ad", "--cluster", "sync"], 2, "zero-cells.h5ad: X has no cells"),
    (["stats", "zero-genes.h5ad", "--cluster", "sync"], 2, "zero-genes.h5ad: X has no genes"),
    (["stats", "negative.h5ad", "--normalize", "log2cpm", "--cluster", "sync"], 2,
     "negative.h5ad: X has negative values"),
    (["convert", "corrupt-indptr.h5ad", "o.zarr"], 2, "corrupt-indptr.h5ad: X/indptr is not monotone"),
    (["convert", "corrupt-indices.h5ad", "o.zarr"], 2, "corrupt-indices.h5ad: X/indices[3] = 999 is out of range"),
    (["stats", "corrupt-indices.h5ad", "--cluster", "sync"], 2, "X/indices[3] = 999 is out of range"),
    (["convert", "corrupt-length.h5ad", "o.zarr"], 2, "X/indptr ends at 310 but X/data has 300 values"),
    (["convert", "tenx.h5", "o.zarr"], 2, "tenx.h5: is a 10x Genomics .h5 file, not AnnData"),
    (["convert", "other.h5", "o.zarr"], 2, "other.h5: is not an AnnData file (no X, obs or var); top-level"),
    (["convert", "good.h5ad", "no folder/o.zarr"], 2, "/no folder/o.zarr: output folder /"),  # paths made absolute
    (["convert", "good.h5ad", "done.zarr"], 2, "done.zarr: output exists; pass --overwrite"),
    (["convert", "good.h5ad", "exists.zarr", "--overwrite"], 2, "not a store bigcat wrote"),
    (["stats", "good.h5ad", "--stats", "means,foo"], 2, "unknown statistic(s) foo; choose from"),
    (["convert", "good.h5ad", "/proc/o.zarr"], 2, "/proc/o.zarr: cannot write in the output folder /proc"),
    (["stats", "good.h5ad", "--out", "/proc/s.parquet", "--cluster", "sync"], 2, "cannot write in the output folder"),
    (["convert", "good.h5ad", "o.txt"], 2, "unknown output format '.txt'"),
    (["stats", "good.h5ad", "--out", "s.xlsx", "--cluster", "sync"], 2, "unknown output type '.xlsx'"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "code", "message"), BAD, ids=[" ".join(a[:2]) + f" {i}" for i, (a, *_) in
                                                                enumerate(BAD)])  # fmt: skip
def test_bad_inputs_give_one_line_and_an_exit_code(bad: Path, args, code, message, capsys, monkeypatch) -> None:
    monkeypatch.chdir(bad)
    before = sorted(p.name for p in bad.iterdir())
    assert main(args) == code
    err = [line for line in capsys.readouterr().err.splitlines() if "dashboard" not in line]
    assert len(err) == 1, err
    assert err[0].startswith("bigcat: error: ")
    assert message in err[0]
    assert sorted(p.name for p in bad.iterdir()) == before  # nothing written, not even a temporary


def test_debug_shows_the_traceback(bad: Path, monkeypatch) -> None:
    monkeypatch.chdir(bad)
    done = subprocess.run([*BIGCAT, "--debug", "convert", "text.h5ad", "o.zarr"], capture_output=True, text=True)
    assert done.returncode != 0
    assert "Traceback" in done.stderr
    done = subprocess.run([*BIGCAT, "convert", "text.h5ad", "o.zarr"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr


def test_api_errors(bad: Path) -> None:
    with pytest.raises(BigcatInputError, match="by has 10 labels but the data has 50 cells"):
        bigcat.cluster_stats(bad / "good.h5ad", by=np.arange(10))
    with pytest.raises(BigcatInputError, match="unknown statistic"):
        bigcat.cluster_stats(bad / "good.h5ad", stats=["mean"])


def test_duplicate_names_are_made_unique_with_a_warning(bad: Path, tmp_path: Path, caplog) -> None:
    x = sp.csr_matrix(np.eye(4, dtype=np.float32))
    obs = pd.DataFrame({"cluster": ["a", "a", "b", "b"]}, index=["x", "x", "y", "x"])
    var = pd.DataFrame(index=["g", "g", "h", "i"])
    source = tmp_path / "dup.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.AnnData(X=x, obs=obs, var=var).write_h5ad(source)
    with caplog.at_level("WARNING", logger="bigcat"):
        bigcat.convert(source, tmp_path / "dup.zarr", progress=False)
    assert "2 duplicate cell names (e.g. 'x') made unique" in caplog.text
    assert "1 duplicate gene names (e.g. 'g') made unique" in caplog.text
    back = ad.read_zarr(tmp_path / "dup.zarr")
    assert back.obs_names.tolist() == ["x", "x-1", "y", "x-2"]
    assert back.var_names.tolist() == ["g", "g-1", "h", "i"]
    np.testing.assert_array_equal(back.X.toarray(), np.eye(4))


def test_non_finite_values_are_counted_and_follow_ieee(tmp_path: Path, caplog) -> None:
    dense = np.array([[1, 0, np.nan], [np.inf, 2, 0], [-np.inf, 0, 3], [1, 1, 1]], dtype=np.float64)
    labels = np.array(["a", "a", "a", "b"], dtype=object)
    source = tmp_path / "nan.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.AnnData(X=sp.csr_matrix(dense), obs=pd.DataFrame({"cluster": labels}, index=list("wxyz"))).write_h5ad(source)
    with caplog.at_level("WARNING", logger="bigcat"):
        bigcat.convert(source, tmp_path / "nan.zarr", progress=False)
        result = bigcat.cluster_stats(tmp_path / "nan.zarr", stats=("sums", "means", "present", "nnz"))
    assert "X holds 3 non-finite values" in caplog.text
    assert "2 cluster × gene sums are not finite" in caplog.text
    with np.errstate(invalid="ignore"):
        expected = oracle(dense, labels)
    np.testing.assert_array_equal(result["sums"].values, expected["sums"])  # NaN where NaN, inf − inf = NaN
    np.testing.assert_array_equal(result["present"].values, expected["present"].astype(np.float32))
    np.testing.assert_array_equal(result["nnz"].values, expected["nnz"])


# ------------------------------------------------------------------------------------------
# a Dask worker that runs out of memory: which step, and what to change
# ------------------------------------------------------------------------------------------
def test_killed_worker_names_the_step_and_the_remedy(tmp_path: Path, capsys) -> None:
    from conftest import DaskProcesses

    source = tmp_path / "wide.h5ad"
    bigcat.synth(source, n_cells=12_000, n_genes=8000, n_clusters=5, nnz_per_cell=10, seed=0, progress=False)
    labels = tmp_path / "one cluster per cell.csv"
    names = bigcat.open_dataset(source)["cell"].values
    pd.DataFrame({"cell": names, "cluster": np.arange(len(names))}).to_csv(labels, index=False)
    # 12,000 clusters × 8,000 genes of sums (768 MB). The plan sizes each piece to a quarter of
    # the worker's memory limit (2 GB: two pieces of 384 MB, one per thread); the nanny is told
    # to terminate at 30% of it (600 MB), so the pieces cannot fit whatever the timing. (With
    # a 700 MB limit and the nanny's default 95%, the planned pieces sometimes just fit and
    # the run succeeded: the test was flaky.)
    cluster = DaskProcesses(
        tmp_path, n_workers=1, threads=2, memory_limit="2GB", nanny=True,
        env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0",
             "DASK_DISTRIBUTED__WORKER__MEMORY__TERMINATE": "0.3"},
    )  # fmt: skip
    try:
        code = main(["stats", str(source), "--labels", str(labels), "--label-column", "cluster", "--cell-column",
                     "cell", "--stats", "means", "--cluster", cluster.address, "--quiet"])  # fmt: skip
    finally:
        cluster.close()
    err = capsys.readouterr().err
    assert code == 1
    assert "a Dask worker died while computing cluster statistics" in err
    assert "probably out of memory" in err
    assert "--memory-limit" in err
    assert "Traceback" not in err


def test_killed_worker_message_for_each_step() -> None:
    from distributed.scheduler import KilledWorker

    message = killed_worker_message(KilledWorker("bigcat-copy-12-3-0", None, 0))
    assert "while computing convert (copying a shard of values)" in message
    assert "--shard-values" in message
    assert "sample" in killed_worker_message(KilledWorker(("_read_subset-abc", 0), None, 0))


# ------------------------------------------------------------------------------------------
# edge cases that must give correct results
# ------------------------------------------------------------------------------------------
def roundtrip(tmp_path: Path, x, labels, *, names=None, genes=None, **stats_options):
    """Write with anndata, convert, open, compute: the statistics and the opened X."""
    n, g = x.shape
    obs = pd.DataFrame({"cluster": labels}, index=names if names is not None else [f"c{i}" for i in range(n)])
    var = pd.DataFrame(index=genes if genes is not None else [f"g{j}" for j in range(g)])
    folder = tmp_path / "a folder with spaces"
    folder.mkdir(exist_ok=True)
    source = folder / "in put.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.AnnData(X=x, obs=obs, var=var).write_h5ad(source)
    store = folder / "st ore.zarr"
    bigcat.convert(source, store, progress=False, overwrite=True)
    ds = bigcat.open_dataset(store)
    result = bigcat.cluster_stats(store, stats=STATS, **stats_options)
    return result, ds


def dense_of(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


STATS = ("sums", "means", "present", "sqr_means", "vars", "nnz")


@pytest.mark.parametrize(
    ("case", "x", "labels"),
    [
        ("single cell", sp.csr_matrix(np.array([[0, 3, 1]], dtype=np.float32)), ["a"]),
        ("cluster of one", sp.csr_matrix(np.arange(12, dtype=np.float32).reshape(4, 3)), ["a", "b", "b", "b"]),
        ("one cluster", sp.csr_matrix(np.arange(12, dtype=np.float32).reshape(4, 3)), ["a"] * 4),
        ("integer labels", sp.csr_matrix(np.arange(12, dtype=np.int64).reshape(4, 3)), [3, 1, 3, 2]),
        ("float64 dense", np.arange(12, dtype=np.float64).reshape(4, 3) / 7, ["x", "y", "x", "y"]),
        ("int32", sp.csr_matrix(np.arange(12, dtype=np.int32).reshape(4, 3)), ["x", "y", "x", "y"]),
        (
            "unused categories",
            sp.csr_matrix(np.arange(12, dtype=np.float32).reshape(4, 3)),
            pd.Categorical(["b", "b", "d", "b"], categories=["a", "b", "c", "d"]),
        ),
    ],
)
def test_edge_cases_equal_the_dense_oracle(tmp_path: Path, case: str, x, labels) -> None:
    result, ds = roundtrip(tmp_path, x, labels)
    np.testing.assert_array_equal(np.asarray(ds.X.data.compute().todense()), dense_of(x).astype(ds.X.dtype))
    expected = oracle(dense_of(x), np.asarray(labels, dtype=object))
    check(result, expected, STATS)


def test_explicit_stored_zeros_count_as_zeros(tmp_path: Path) -> None:
    x = sp.csr_matrix((np.array([0.0, 2.0, 0.0, 5.0], dtype=np.float32), ([0, 0, 1, 2], [0, 1, 1, 2])), shape=(3, 3))
    assert x.nnz == 4  # two of them explicit zeros
    result, _ = roundtrip(tmp_path, x, ["a", "a", "b"], threshold=-1.0)
    expected = oracle(dense_of(x), np.array(["a", "a", "b"], dtype=object), threshold=-1.0)
    check(result, expected, STATS)  # nnz counts values != 0, present counts x > -1 (all cells)


def test_five_thousand_clusters_and_unicode_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    n = 5200
    x = sp.random(n, 30, density=0.2, format="csr", random_state=5, dtype=np.float32)
    labels = np.array([f"typ-é{v}" for v in rng.permutation(np.arange(n) % 5100)], dtype=object)
    names = [f"zelle-ü{i}" for i in range(n)]
    genes = [f"gèn-β{j}" for j in range(30)]
    # anndata would turn the strings into categories in natural order; the oracle sorts plainly
    categorical = pd.Categorical(labels, categories=sorted(set(labels)))
    result, ds = roundtrip(tmp_path, x, categorical, names=names, genes=genes)
    assert result.sizes["cluster"] == 5100
    assert list(ds["gene"].values) == genes
    assert list(ds["cell"].values[:2]) == names[:2]
    check(result, oracle(dense_of(x), labels), STATS)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(anndata_objects())
def test_random_anndata_round_trips_through_convert_open_stats(tmp_path_factory, problem) -> None:
    x, labels, normalize = problem
    tmp = tmp_path_factory.mktemp("roundtrip")
    result, ds = roundtrip(tmp, x, labels, normalize="log2cpm" if normalize else None)
    opened = ds.X.data.compute()
    np.testing.assert_array_equal(np.asarray(opened.todense() if hasattr(opened, "todense") else opened), dense_of(x))
    expected = oracle(dense_of(x), np.asarray(labels, dtype=object), normalize=normalize)
    check(result, expected, STATS)


def test_paths_with_spaces_through_the_cli(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "my data"
    folder.mkdir()
    source = folder / "an atlas.h5ad"
    assert main(["synth", str(source), "--cells", "300", "--genes", "200", "--clusters", "4", "--nnz-per-cell", "20",
                 "--quiet"]) == 0  # fmt: skip
    assert main(["convert", str(source), str(folder / "an atlas.zarr"), "--quiet"]) == 0
    assert main(["stats", str(folder / "an atlas.zarr"), "--out", str(folder / "st ats.parquet"), "--quiet",
                 "--cluster", "sync"]) == 0  # fmt: skip
    assert (folder / "st ats.parquet").exists()
    assert (folder / "st ats.parquet").stat().st_size > 0
