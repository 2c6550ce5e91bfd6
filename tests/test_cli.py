"""The command line, run as users run it: through subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from conftest import ARCHIVES, dense


def bigcat(*args: str, cwd: Path | None = None, stdin: str | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "bigcat", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        input=stdin,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_synth_convert_sample_pipeline(tmp_path):
    done = bigcat(
        "synth", tmp_path / "a.h5ad", "--cells", 500, "--genes", 300, "--clusters", 4, "--nnz-per-cell", 40, "--seed", 1
    )
    assert done.returncode == 0, done.stderr
    assert "500 cells × 300 genes" in done.stdout
    done = bigcat("convert", tmp_path / "a.h5ad", tmp_path / "a.zarr", "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no progress bar when not on a terminal
    src = ad.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_array_equal(dense(ad.read_zarr(tmp_path / "a.zarr").X), dense(src.X))
    done = bigcat("convert", tmp_path / "a.h5ad", tmp_path / "d.zarr", "--layout", "dense", "--chunk-cells", 100)
    assert done.returncode == 0, done.stderr
    done = bigcat("sample", tmp_path / "a.zarr", tmp_path / "s.h5ad", "--n-cells", 50, "--genes", 0.5, "--seed", 4)
    assert done.returncode == 0, done.stderr
    sub = ad.read_h5ad(tmp_path / "s.h5ad")
    assert sub.shape == (50, 150)
    rows, cols = src.obs_names.get_indexer(sub.obs_names), src.var_names.get_indexer(sub.var_names)
    np.testing.assert_array_equal(dense(sub.X), dense(src.X)[np.ix_(rows, cols)])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["convert", "missing.h5ad", "out.zarr"], "missing.h5ad: no such file or directory"),
        (["convert", "fake.h5ad", "out.zarr"], "fake.h5ad: not an HDF5 file"),
        (["convert", str(ARCHIVES / "v0.11.4" / "adata.h5ad"), "out.zarr"], "has no X matrix"),
        (["convert", "in.h5ad", "exists.zarr"], "exists.zarr: output exists; pass --overwrite"),
        (["convert", "in.h5ad", "out.txt"], "unknown output format '.txt'"),
        (["sample", "in.h5ad", "o.h5ad", "--max-cells-per-cluster", "3", "--by", "nope"], "no obs column 'nope'"),
        (["convert", "in.h5ad", "o.zarr", "--layout", "diagonal"], "unknown layout 'diagonal'"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(args, message, tmp_path):
    (tmp_path / "fake.h5ad").write_text("hello")
    assert (
        bigcat(
            "synth", tmp_path / "in.h5ad", "--cells", 50, "--genes", 40, "--clusters", 2, "--nnz-per-cell", 5
        ).returncode
        == 0
    )
    assert bigcat("convert", tmp_path / "in.h5ad", tmp_path / "exists.zarr").returncode == 0
    done = bigcat(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("bigcat: error: ")
    assert message in lines[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.zarr").exists()
    assert not (tmp_path / "o.zarr").exists()


def test_usage_error_exit_code(tmp_path):
    done = bigcat("convert")
    assert done.returncode == 2
    assert "Missing argument" in done.stderr


def test_debug_shows_traceback(tmp_path):
    done = bigcat("--debug", "convert", tmp_path / "missing.h5ad", tmp_path / "o.zarr")
    assert done.returncode != 0
    assert "Traceback" in done.stderr
    assert "InputNotFoundError" in done.stderr


def test_open_runs_code_with_datasets_and_cluster(atlas_h5ad, tmp_path):
    code = "print('SUM', float(data1.X.data.sum(axis=0).compute().sum()), type(client).__name__)"
    done = bigcat("open", atlas_h5ad, "--cluster", "local", "-c", code, timeout=180)
    assert done.returncode == 0, done.stderr
    expected = float(ad.read_h5ad(atlas_h5ad).X.sum())
    line = next(line for line in done.stdout.splitlines() if line.startswith("SUM"))
    assert float(line.split()[1]) == pytest.approx(expected, rel=1e-6)
    assert "Client" in line
    assert "data1 = bigcat.open_dataset(" in done.stdout
    assert "Dask dashboard: http://" in done.stdout


def test_open_interactive_console_reads_stdin(atlas_h5ad):
    done = bigcat("open", atlas_h5ad, "--cluster", "sync", stdin="print('SHAPE', data1.X.shape)\n")
    assert done.returncode == 0, done.stderr
    assert "SHAPE (3000, 1500)" in done.stdout


def test_stats_command_outputs_and_merge(tmp_path):
    done = bigcat("synth", tmp_path / "a.h5ad", "--cells", 400, "--genes", 200, "--clusters", 5, "--nnz-per-cell", 30)
    assert done.returncode == 0, done.stderr
    src = ad.read_h5ad(tmp_path / "a.h5ad")
    x = dense(src.X).astype(np.float64)
    out = tmp_path / "s.parquet"
    done = bigcat("stats", tmp_path / "a.h5ad", "--by", "cluster", "--stats", "means,nnz", "--out", out)
    assert done.returncode == 0, done.stderr
    assert "Dask dashboard" not in done.stderr  # a CSR file: the pass runs on this process' threads
    import pandas as pd

    table = pd.read_parquet(tmp_path / "s.parquet")
    first = table[table["cluster"] == "cl0000"]
    rows = (src.obs["cluster"] == "cl0000").to_numpy()
    np.testing.assert_allclose(first["means"].to_numpy(), x[rows].mean(0), rtol=1e-5)
    np.testing.assert_array_equal(first["nnz"].to_numpy(), (x[rows] != 0).sum(0))
    # two halves, merged from their stores, equal the whole
    half = src.n_obs // 2
    src[:half].write_h5ad(tmp_path / "h1.h5ad")
    src[half:].write_h5ad(tmp_path / "h2.h5ad")
    for name in ("h1", "h2"):
        done = bigcat("stats", tmp_path / f"{name}.h5ad", "--stats", "means,nnz", "--out", tmp_path / f"{name}.zarr")
        assert done.returncode == 0, done.stderr
    done = bigcat("stats", "--merge", tmp_path / "h1.zarr", tmp_path / "h2.zarr", "--out", tmp_path / "m.csv")
    assert done.returncode == 0, done.stderr
    merged = pd.read_csv(tmp_path / "m.csv")
    np.testing.assert_allclose(merged["means"].to_numpy(), table["means"].to_numpy(), rtol=1e-5)
    # a CSC input runs as a Dask graph: by default on a local cluster, whose dashboard is shown
    csc = src.copy()
    csc.X = csc.X.tocsc()
    csc.write_h5ad(tmp_path / "csc.h5ad")
    done = bigcat("stats", tmp_path / "csc.h5ad", "--stats", "means,nnz", "--out", tmp_path / "csc.parquet")
    assert done.returncode == 0, done.stderr
    assert "Dask dashboard: http://" in done.stderr
    np.testing.assert_allclose(pd.read_parquet(tmp_path / "csc.parquet")["means"], table["means"], rtol=1e-5)
    # bad input: one line, exit 2, nothing written
    done = bigcat("stats", tmp_path / "a.h5ad", "--by", "nope", "--out", tmp_path / "bad.parquet")
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1  # one line, no traceback (a dashboard link line may precede it)
    assert "no obs column 'nope'" in errors[0]
    assert not (tmp_path / "bad.parquet").exists()


def test_version_quiet_everywhere_and_sample_needs_a_choice(tmp_path):
    from bigcat import __version__

    done = bigcat("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"bigcat {__version__}"
    path = tmp_path / "a.h5ad"
    assert bigcat("synth", path, "--cells", 300, "--genes", 100, "--clusters", 3, "-q").returncode == 0
    done = bigcat("sample", path, tmp_path / "b.h5ad")
    assert done.returncode == 2
    assert "sample needs a choice" in done.stderr
    assert not (tmp_path / "b.h5ad").exists()
    done = bigcat("sample", path, tmp_path / "b.h5ad", "--cell-fraction", 0.5, "--gene-fraction", 0.5, "-q")
    assert done.returncode == 0, done.stderr
    assert ad.read_h5ad(tmp_path / "b.h5ad").shape == (150, 50)
    stats = tmp_path / "s.zarr"
    assert bigcat("stats", path, "--out", stats, "-q", "--cluster", "threads").returncode == 0
    for command in (["markers", stats], ["plot", "dotplot", stats, "--markers", 1, "--out", tmp_path / "d.png"]):
        done = bigcat(*command, "--quiet")
        assert done.returncode == 0, done.stderr


def test_progress_counts_are_integers_when_small(capsys):
    from bigcat.progress import progress_bar

    with progress_bar(total=16, unit="blocks", desc="stats", enabled=True) as bar:
        bar.update(3)
        bar.refresh()
    assert "3/16" in capsys.readouterr().err


def test_flags_take_no_value_in_help():
    """Boolean flags were listed as taking a ``<bool>`` value."""
    for command in ("convert", "stats", "sample"):
        done = bigcat(command, "--help")
        assert done.returncode == 0, done.stderr
        lines = [line for line in done.stdout.splitlines() if "<bool>" in line and "--help" not in line]
        assert lines == [], lines
        assert "--overwrite" in done.stdout
