r"""Vertical calibration baseline: classifier density-ratio reweighting (Mind the Gap eq. 1, 5).

The standard alternative to transport moves no jet: it reweights each MC jet of flavour f
by an estimate of the density ratio :math:`s_f(x) = p^{data}_f(x) / p^{MC}_f(x)` (Algren et
al. 2025, eq. 1), here obtained from a classifier trained to separate the MC source of
flavour f from the data target of the same flavour (the targets the OT maps are trained
on), :math:`s = \frac{c}{1-c} \frac{W_{MC}}{W_{data}}`. Reweighting dilutes the MC
statistics by the effective-sample-size fraction :math:`\rho` of eq. 5; transport keeps
:math:`\rho = 1` by construction.
"""

from __future__ import annotations

__all__ = ["DensityRatio", "effective_sample_fraction", "fit_density_ratio"]

from dataclasses import dataclass
from typing import Any

import numpy as np


def effective_sample_fraction(weights: np.ndarray) -> float:
    r""":math:`\rho = \frac{1}{N} (\sum_i s_i)^2 / \sum_i s_i^2` (Mind the Gap eq. 5)."""
    s = np.asarray(weights, dtype=np.float64)
    if len(s) == 0 or not np.all(np.isfinite(s)):
        msg = f"effective sample fraction needs finite weights, got {len(s)} entries"
        raise ValueError(msg)
    return float(s.sum() ** 2 / (len(s) * np.sum(s**2)))


@dataclass
class DensityRatio:
    """A fitted classifier density ratio :math:`s(x)` of target over source.

    Attributes:
        classifier: the fitted scikit-learn classifier (label 1 = target).
        prior_ratio: :math:`W_{source} / W_{target}`, the class-prior correction.
        max_weight: weights are clipped to this value (documented in the report).
    """

    classifier: Any
    prior_ratio: float
    max_weight: float

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """Per-jet weights :math:`s(x)` for source jets with the given features."""
        x = np.asarray(features, dtype=np.float64)
        c = np.clip(self.classifier.predict_proba(x if x.ndim == 2 else x[:, None])[:, 1], 1e-6, 1 - 1e-6)
        return np.minimum(c / (1.0 - c) * self.prior_ratio, self.max_weight)


def fit_density_ratio(
    source: np.ndarray,
    target: np.ndarray,
    source_weight: np.ndarray | None = None,
    target_weight: np.ndarray | None = None,
    *,
    seed: int = 0,
    max_iter: int = 300,
    max_weight: float = 100.0,
) -> DensityRatio:
    """Fit :math:`s(x) = p_{target}(x) / p_{source}(x)` with a gradient-boosted classifier.

    Arguments:
        source: ``(n, k)`` features of the MC jets of one flavour (e.g. ILR + log pT).
        target: ``(m, k)`` features of the data target of that flavour.
        source_weight: optional MC weights.
        target_weight: optional target weights.
        seed: classifier seed.
        max_iter: boosting iterations (early-stopped on 20 % of the sample).
        max_weight: clip of the per-jet weight (large weights are where MC lacks support).

    Returns:
        The fitted :class:`DensityRatio`.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    xs, xt = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if xs.ndim == 1:
        xs, xt = xs[:, None], xt[:, None]
    ws = np.ones(len(xs)) if source_weight is None else np.asarray(source_weight, dtype=np.float64)
    wt = np.ones(len(xt)) if target_weight is None else np.asarray(target_weight, dtype=np.float64)
    if len(xs) < 20 or len(xt) < 20 or ws.sum() <= 0 or wt.sum() <= 0:
        msg = (
            f"density ratio needs >= 20 jets with positive total weight on each side "
            f"(source {len(xs)} jets / weight {ws.sum():.3g}, target {len(xt)} / {wt.sum():.3g})"
        )
        raise ValueError(msg)
    x = np.concatenate([xs, xt])
    y = np.concatenate([np.zeros(len(xs)), np.ones(len(xt))])
    w = np.concatenate([ws, wt])
    clf = HistGradientBoostingClassifier(
        max_iter=max_iter, early_stopping=True, validation_fraction=0.2, random_state=seed,
        max_leaf_nodes=31, learning_rate=0.1,
    )
    clf.fit(x, y, sample_weight=w)
    return DensityRatio(clf, float(ws.sum() / wt.sum()), float(max_weight))
