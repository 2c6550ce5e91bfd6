"""limma's empirical Bayes moderation of gene variances, and Holm's p-value adjustment.

:func:`squeeze_var` follows limma's ``squeezeVar`` / ``fitFDist`` (no covariate, not robust, the
numerator degrees of freedom the same for every gene), the prior fitted by moments of the
log variances with ``trigammaInverse``; :func:`holm` follows R's ``p.adjust(method="holm")``,
missing p-values left out of the count. Both are checked against R itself in the tests.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import special

__all__ = ["Squeezed", "holm", "squeeze_var", "trigamma_inverse"]


def trigamma_inverse(x: float) -> float:
    """The ``y`` with ``trigamma(y) = x`` (limma's Newton iteration from ``0.5 + 1/x``)."""
    if not np.isfinite(x) or x < 0:
        return float("nan")
    if x > 1e7:
        return 1.0 / np.sqrt(x)
    if x < 1e-6:
        return 1.0 / x
    y = 0.5 + 1.0 / x
    for _ in range(50):
        tri = special.polygamma(1, y)
        step = tri * (1.0 - tri / x) / special.polygamma(2, y)
        y += step
        if -step / y < 1e-8:
            break
    return float(y)


@dataclass(frozen=True)
class Squeezed:
    """Posterior variances (one per gene) and the prior they were moderated towards."""

    var_post: np.ndarray
    var_prior: float
    df_prior: float


def squeeze_var(var: np.ndarray, df: float) -> Squeezed:
    """Moderated variances ``(df·s² + d₀·s₀²) / (df + d₀)`` with the prior (``s₀²``, ``d₀``) fitted
    to all of ``var`` as limma's ``squeezeVar(var, df)`` fits it.

    Variances that are not finite take no part in the fit (and stay NaN); zeros are offset to
    ``1e-5 ×`` the median for the fit only. With no spread left beyond what ``df`` explains,
    ``d₀`` is infinite and every posterior variance is the prior, the mean variance.
    """
    var = np.asarray(var, dtype=np.float64)
    n = len(var)
    if n == 0:
        msg = "no variances to squeeze"
        raise ValueError(msg)
    if n == 1:
        return Squeezed(var.copy(), float(var[0]), 0.0)
    scale, df_prior = _fit_f_dist(var, float(df))
    if np.isnan(df_prior):
        msg = "could not estimate the prior degrees of freedom"
        raise ValueError(msg)
    post = np.full(n, scale) if np.isinf(df_prior) else (df * var + df_prior * scale) / (df + df_prior)
    return Squeezed(post, float(scale), float(df_prior))


def _fit_f_dist(x: np.ndarray, df1: float) -> tuple[float, float]:
    """Scale and denominator degrees of freedom of a scaled F distribution, by moments of log x."""
    if not (np.isfinite(df1) and df1 > 1e-15):
        return float("nan"), float("nan")
    ok = np.isfinite(x) & (x > -1e-15)
    x = x[ok]
    if len(x) == 1:
        return float(x[0]), 0.0
    if len(x) == 0:
        return float("nan"), float("nan")
    x = np.maximum(x, 0.0)
    m = float(np.median(x))
    if m == 0:
        warnings.warn("more than half of the residual variances are exactly zero", stacklevel=3)
        m = 1.0
    x = np.maximum(x, 1e-5 * m)
    e = np.log(x) - special.digamma(df1 / 2) + np.log(df1 / 2)
    emean = float(np.mean(e))
    evar = float(np.sum((e - emean) ** 2) / (len(x) - 1)) - float(special.polygamma(1, df1 / 2))
    if evar > 0:
        df2 = 2 * trigamma_inverse(evar)
        return float(np.exp(emean + special.digamma(df2 / 2) - np.log(df2 / 2))), df2
    return float(np.mean(x)), float("inf")


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values along the last axis (R's ``p.adjust``): ``min(1, cummax((m − i + 1) p₍ᵢ₎))``
    over the ``m`` p-values that are not NaN, ranked with ties in their order; NaN stays NaN."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    flat_p, flat_out = p.reshape(-1, p.shape[-1]), out.reshape(-1, p.shape[-1])
    for row, res in zip(flat_p, flat_out, strict=True):
        ok = np.flatnonzero(~np.isnan(row))
        order = ok[np.argsort(row[ok], kind="stable")]
        m = len(order)
        adjusted = np.maximum.accumulate((m - np.arange(m)) * row[order])
        res[order] = np.minimum(adjusted, 1.0)
    return out
