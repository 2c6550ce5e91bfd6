"""Independent references shared by the test modules: statistics the obvious way, in dense NumPy."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bigcat.stats import STATISTICS


def oracle(
    x: np.ndarray,
    labels: np.ndarray,
    *,
    threshold: float = 0.0,
    op: str = "gt",
    normalize: bool = False,
    keep: np.ndarray | None = None,
) -> dict:
    """Per-cluster statistics the obvious way: dense float64, one cluster at a time."""
    x = np.asarray(x, dtype=np.float64)
    if normalize:
        totals = x.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(totals != 0, np.log2(x / totals * 1e6 + 1), 0.0)
    labels = pd.Series(labels, dtype=object)
    valid = labels.notna().to_numpy()
    if keep is not None:
        valid &= keep
    clusters = pd.Categorical(labels[valid]).categories
    out = {name: [] for name in ("n_cells", *STATISTICS)}
    for c in clusters:
        rows = x[valid & (labels == c).to_numpy()]
        n = len(rows)
        passes = rows >= threshold if op == "ge" else rows > threshold
        out["n_cells"].append(n)
        out["sums"].append(rows.sum(0))
        out["means"].append(rows.mean(0))
        out["present"].append(passes.mean(0))
        out["sqr_sums"].append((rows**2).sum(0))
        out["sqr_means"].append((rows**2).mean(0))
        out["vars"].append(rows.var(0))
        out["nnz"].append((rows != 0).sum(0))
    result = {k: np.array(v) for k, v in out.items()}
    result["clusters"] = np.asarray(clusters)
    return result


def check(result, expected: dict, stats=STATISTICS) -> None:
    np.testing.assert_array_equal(result["cluster"].values.astype(str), expected["clusters"].astype(str))
    np.testing.assert_array_equal(result["n_cells"].values, expected["n_cells"])
    scale = max(1.0, float(np.abs(expected["sums"]).max(initial=0)))
    for name in stats:
        got = result[name].values
        want = expected[name]
        if name == "nnz":
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            atol = 1e-5 * scale**2 if name == "vars" else 1e-6 * scale
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, err_msg=name)
