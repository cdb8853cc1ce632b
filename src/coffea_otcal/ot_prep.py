"""Input checks, weights, moments and the Gaussian (closed-form) start of the OT trainers."""

from __future__ import annotations

__all__ = ["check_array", "check_weights", "gaussian_w2_map", "set_affine", "weighted_moments"]

import logging
from typing import Any

import numpy as np
import torch

from coffea_otcal.potentials import ICNN, PICNN

logger = logging.getLogger("coffea_otcal.ot")


def check_array(arr: Any, what: str, name: str, ndim: int, min_rows: int) -> np.ndarray:
    """Float64 copy of ``arr``; errors name the map, the input, the shape and the bad-row count."""
    out = np.asarray(arr, dtype=np.float64)
    if ndim == 2 and out.ndim == 1:
        out = out[:, None]
    if out.ndim != ndim:
        msg = f"map {name!r}: {what} must be {ndim}-dimensional, got shape {out.shape}"
        raise ValueError(msg)
    if len(out) < min_rows:
        msg = (
            f"map {name!r}: {what} has {len(out)} rows, fewer than min_samples={min_rows}; "
            "merge bins or lower OTConfig.min_samples"
        )
        raise ValueError(msg)
    bad = ~np.isfinite(out)
    if bad.any():
        rows = int(bad.reshape(len(out), -1).any(axis=1).sum())
        msg = f"map {name!r}: {what} has {rows} rows with NaN or inf; drop or fix them first"
        raise ValueError(msg)
    return out


def check_weights(w: Any, n: int, what: str, name: str, policy: str) -> np.ndarray:
    """Validated weights (ones if None); ``policy`` 'keep' or 'clip' for negative weights."""
    if w is None:
        return np.ones(n)
    arr = check_array(w, what, name, 1, 0)
    if len(arr) != n:
        msg = f"map {name!r}: {what} has {len(arr)} entries for {n} samples"
        raise ValueError(msg)
    neg = float(np.mean(arr < 0))
    if neg > 0:
        if policy == "clip":
            arr = np.clip(arr, 0.0, None)
        else:
            logger.info("map %r: %s has %.1f%% negative weights (kept)", name, what, 100 * neg)
    if arr.sum() <= 0:
        msg = f"map {name!r}: {what} sums to {arr.sum():.4g} <= 0; cannot define a distribution"
        raise ValueError(msg)
    return arr


def weighted_moments(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted per-axis mean and variance."""
    mean = (w[:, None] * x).sum(0) / w.sum()
    var = (w[:, None] * (x - mean) ** 2).sum(0) / w.sum()
    return mean, np.clip(var, 0.0, None)


def gaussian_w2_map(
    x: np.ndarray, wx: np.ndarray, y: np.ndarray, wy: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    r"""Closed-form W2 map between Gaussian fits, :math:`T(x) = A x + b` with A symmetric PD.

    :math:`A = S_1^{-1/2}(S_1^{1/2} S_2 S_1^{1/2})^{1/2} S_1^{-1/2}`, :math:`b = m_2 - A m_1`
    (Dowson & Landau 1982); the gradient of the convex :math:`\tfrac12 x^\top A x + b\cdot x`.
    """

    def moments(a: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = np.abs(w) / np.abs(w).sum()
        m = w @ a
        cov = (a - m).T @ ((a - m) * w[:, None])
        return m, cov + 1e-9 * np.eye(a.shape[1])

    def sqrtm(m: np.ndarray, power: float = 0.5) -> np.ndarray:
        vals, vecs = np.linalg.eigh(0.5 * (m + m.T))
        return (vecs * np.clip(vals, 1e-12, None) ** power) @ vecs.T

    m1, s1 = moments(x, wx)
    m2, s2 = moments(y, wy)
    r1, r1i = sqrtm(s1), sqrtm(s1, -0.5)
    a = r1i @ sqrtm(r1 @ s2 @ r1) @ r1i
    a = 0.5 * (a + a.T)
    return a, m2 - a @ m1


@torch.no_grad()
def set_affine(net: ICNN | PICNN, a: np.ndarray, b: np.ndarray) -> None:
    """Make the quadratic + linear part of ``net`` equal ``0.5 x^T a x + b . x``."""
    mu = net.config.strong_convexity
    vals, vecs = np.linalg.eigh(a)
    lmat = vecs * np.sqrt(np.clip(vals - mu, 1e-6, None))
    net.L.copy_(torch.as_tensor(lmat, dtype=net.L.dtype))
    if isinstance(net, ICNN):
        net.linear.copy_(torch.as_tensor(b, dtype=net.linear.dtype))
    else:
        net.Wx[-1].copy_(torch.as_tensor(b[None, :], dtype=net.Wx[-1].dtype))
        net.Wxu[-1].zero_()
        net.bxu[-1].fill_(1.0)
