"""Hypothesis strategies shared by the test modules: small random problems with every corner
a real file can have (empty rows and columns, explicit zeros, unlabelled cells, odd dtypes)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from hypothesis import strategies as st


@st.composite
def problems(draw):
    """A small sparse matrix with labels (some cells unlabelled, some values negative unless
    normalized), a presence test, a normalization, a block size and a count dtype."""
    n = draw(st.integers(1, 40))
    g = draw(st.integers(1, 25))
    n_labels = draw(st.sampled_from([1, 2, 7, 300]))
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    normalize = draw(st.booleans())
    mask = rng.random((n, g)) < density
    values = rng.integers(0, 6, size=(n, g)).astype(np.float32)  # includes explicit zeros where masked
    if not normalize and draw(st.booleans()):
        values -= 2.5  # negative values
    x = sp.csr_matrix((values[mask], np.nonzero(mask)), shape=(n, g))
    labels = rng.integers(0, n_labels, size=n).astype(object)
    labels = np.array([f"k{v}" for v in labels], dtype=object)
    labels[rng.random(n) < 0.15] = None  # unlabelled cells are excluded
    if all(v is None for v in labels):
        labels[0] = "k0"
    threshold = draw(st.sampled_from([0.0, 1.0, -1.0]))
    op = draw(st.sampled_from(["gt", "ge"]))
    block_nnz = draw(st.sampled_from([1, 3, 50, 10_000]))
    counts = draw(st.sampled_from(["uint16", "int32"]))  # the count accumulators' dtype
    return x, labels, threshold, op, normalize, block_nnz, counts


@st.composite
def anndata_objects(draw):
    """A small matrix of any numeric dtype stored as CSR, CSC or dense, labels of three kinds
    (strings, integers, a categorical with unused categories) and whether to normalize."""
    n = draw(st.integers(1, 30))
    g = draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int32, np.int64]))
    density = draw(st.sampled_from([0.0, 0.2, 0.7, 1.0]))
    mask = rng.random((n, g)) < density
    values = rng.integers(0, 5, size=(n, g)).astype(dtype)  # zeros under the mask are explicit zeros
    x = sp.csr_matrix((values[mask], np.nonzero(mask)), shape=(n, g), dtype=dtype)
    encoding = draw(st.sampled_from(["csr", "csc", "dense"]))
    x = x.tocsc() if encoding == "csc" else x.toarray() if encoding == "dense" else x
    kind = draw(st.sampled_from(["str", "int", "categorical"]))
    codes = rng.integers(0, draw(st.integers(1, 6)), size=n)
    if kind == "int":
        labels = codes
    elif kind == "str":
        labels = np.array([f"ç{c}" for c in codes], dtype=object)
    else:
        labels = pd.Categorical([f"k{c}" for c in codes], categories=[f"k{c}" for c in range(8)])
    normalize = draw(st.booleans())
    return x, labels, normalize
