r"""Closure metrics: discriminant histograms, chi2 tests, classifier two-sample test, displacement.

The closure study of Kim & Yang (Sec. VIII.3) compares calibrated MC with (pseudo-)data on
derived discriminants that are *not* used in training, :math:`D_{b/c}(\kappa)`,
:math:`D_{c/\ell}(\kappa)` and :math:`D_{HF/\ell}(\kappa)` (eq. 62), for several
:math:`\kappa`. This module computes those histograms (``hist``), a shape chi2 between two
weighted histograms, a classifier two-sample test (the AUC of a small classifier trained to
tell calibrated MC from data, evaluated on held-out jets) and the mean Aitchison displacement
of the calibrated jets. Plots live in :mod:`coffea_otcal.closure_plots`.
"""

from __future__ import annotations

__all__ = [
    "DISCRIMINANTS",
    "Chi2Result",
    "classifier_auc",
    "classifier_scores",
    "discriminant_values",
    "fill_discriminant",
    "mean_aitchison_displacement",
    "shape_chi2",
    "summarize_chi2",
    "variation_band",
    "weighted_auc",
]

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from coffea_otcal import geometry

#: name -> function of (probs (n, 3) in order b, c, light; kappa) (Kim & Yang eq. 62).
DISCRIMINANTS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "D_bc": geometry.d_bc,
    "D_cl": geometry.d_cl,
    "D_hfl": geometry.d_hfl,
}


def discriminant_values(probs: np.ndarray, name: str, kappa: float) -> np.ndarray:
    """Evaluate one eq.-62 discriminant on ``(n, 3)`` probabilities in class order (b, c, l)."""
    try:
        fn = DISCRIMINANTS[name]
    except KeyError:
        msg = f"unknown discriminant {name!r}; known: {sorted(DISCRIMINANTS)}"
        raise ValueError(msg) from None
    return np.asarray(fn(np.asarray(probs, dtype=np.float64), kappa))


def fill_discriminant(
    probs: np.ndarray,
    name: str,
    kappa: float,
    weight: np.ndarray | None = None,
    bins: int = 20,
) -> Any:
    """Fill a weighted ``hist.Hist`` of one discriminant on [0, 1] (Weight storage)."""
    import hist

    h = hist.Hist(
        hist.axis.Regular(bins, 0.0, 1.0, name=name, label=f"{name}(k={kappa:g})"),
        storage=hist.storage.Weight(),
    )
    values = discriminant_values(probs, name, kappa)
    h.fill(np.clip(values, 0.0, np.nextafter(1.0, 0.0)), weight=weight)
    return h


@dataclass(frozen=True)
class Chi2Result:
    r"""Shape chi2 between two weighted histograms.

    Attributes:
        chi2: :math:`\sum_i (a_i/A - b_i/B)^2 / (\sigma^2_{a,i}/A^2 + \sigma^2_{b,i}/B^2)`.
        ndf: the number of bins with entries in either histogram, minus one (shapes are
            compared, the normalisations are not).
        p_value: the upper tail probability of the chi2 distribution.
    """

    chi2: float
    ndf: int
    p_value: float

    @property
    def chi2_ndf(self) -> float:
        """chi2 per degree of freedom (NaN for ndf = 0)."""
        return self.chi2 / self.ndf if self.ndf > 0 else float("nan")

    def to_dict(self) -> dict[str, float]:
        """JSON-friendly view."""
        return {**asdict(self), "chi2_ndf": self.chi2_ndf}


def variation_band(
    nominal: np.ndarray, variations: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    r"""One-sigma band of a histogram shape from up/down variations, summed in quadrature.

    The EM variations are the eigen-directions of the effective covariance (Kim & Yang
    eq. 57 and 61; their :math:`\delta a\,\delta a^T` sum back to :math:`V_{eff}`), so each
    is an independent one-sigma component and the band propagated from the covariance is
    the quadrature sum of the per-direction shifts, not their envelope (which is only the
    largest single shift). The sum is taken per side, as HEP analyses combine asymmetric
    sources: for each source the upward shift of a bin is
    :math:`\max(u - n, d - n, 0)` and the downward one :math:`\max(n - u, n - d, 0)`.

    Arguments:
        nominal: the nominal shape (any normalisation, the variations in the same units).
        variations: shape per map name; ``<v>_up`` / ``<v>_down`` are paired into source
            ``<v>``, any other name is a source of its own.

    Returns:
        ``(down, up)``: non-negative half-widths below and above the nominal per bin.
    """
    n = np.asarray(nominal, dtype=np.float64)
    sources: dict[str, list[np.ndarray]] = {}
    for name, shape in variations.items():
        suffix = next((x for x in ("_up", "_down") if name.endswith(x)), "")
        base = name[: len(name) - len(suffix)]
        sources.setdefault(base, []).append(np.asarray(shape, dtype=np.float64) - n)
    up2, down2 = np.zeros_like(n), np.zeros_like(n)
    for shifts in sources.values():
        s = np.stack(shifts)
        up2 += np.maximum(s.max(axis=0), 0.0) ** 2
        down2 += np.maximum(-s.min(axis=0), 0.0) ** 2
    return np.sqrt(down2), np.sqrt(up2)


def shape_chi2(
    values_a: np.ndarray,
    variances_a: np.ndarray,
    values_b: np.ndarray,
    variances_b: np.ndarray,
    extra_variance: np.ndarray | None = None,
) -> Chi2Result:
    """Chi2 test that two weighted histograms have the same shape.

    Both histograms are normalised to unit area; the per-bin variance is the sum of the two
    normalised statistical variances (sum of squared weights), plus ``extra_variance`` (for
    example a systematic band, already in normalised units) when given.

    Arguments:
        values_a: bin contents (sum of weights) of the first histogram.
        variances_a: bin variances (sum of squared weights).
        values_b: bin contents of the second histogram.
        variances_b: bin variances of the second.
        extra_variance: optional additional per-bin variance of the normalised difference.

    Returns:
        The :class:`Chi2Result`.
    """
    from scipy import stats

    a, va, b, vb = (np.asarray(v, dtype=np.float64) for v in (values_a, variances_a, values_b, variances_b))
    sum_a, sum_b = a.sum(), b.sum()
    if sum_a <= 0 or sum_b <= 0:
        msg = f"cannot compare shapes of empty histograms (sums of weights {sum_a}, {sum_b})"
        raise ValueError(msg)
    var = va / sum_a**2 + vb / sum_b**2
    if extra_variance is not None:
        var = var + np.asarray(extra_variance, dtype=np.float64)
    used = (a != 0) | (b != 0)
    used &= var > 0
    chi2 = float(np.sum((a[used] / sum_a - b[used] / sum_b) ** 2 / var[used]))
    ndf = int(used.sum()) - 1
    p_value = float(stats.chi2.sf(chi2, ndf)) if ndf > 0 else float("nan")
    return Chi2Result(chi2, ndf, p_value)


def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Area under the ROC curve with per-sample weights (ties counted one half)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    s, y, w = s[order], y[order], w[order]
    # group ties: cumulative negative weight below each unique score
    _, start = np.unique(s, return_index=True)
    neg_w = np.where(~y, w, 0.0)
    pos_w = np.where(y, w, 0.0)
    neg_per = np.add.reduceat(neg_w, start) if len(s) else np.zeros(0)
    pos_per = np.add.reduceat(pos_w, start) if len(s) else np.zeros(0)
    neg_below = np.cumsum(neg_per) - neg_per
    total_pos, total_neg = pos_per.sum(), neg_per.sum()
    if total_pos <= 0 or total_neg <= 0:
        msg = "the AUC needs positive total weight in both classes"
        raise ValueError(msg)
    auc = np.sum(pos_per * (neg_below + 0.5 * neg_per)) / (total_pos * total_neg)
    return float(auc)


def classifier_scores(
    features_a: np.ndarray,
    features_b: np.ndarray,
    weight_a: np.ndarray | None = None,
    weight_b: np.ndarray | None = None,
    *,
    test_fraction: float = 0.5,
    seed: int = 0,
    max_iter: int = 200,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out scores of a classifier trained to tell sample a from sample b.

    A gradient-boosted tree classifier (scikit-learn ``HistGradientBoostingClassifier``,
    early-stopped on a validation split of the training half) is trained on a random
    ``1 - test_fraction`` of each sample and scores the rest. Both classes are given equal
    total weight, so results do not depend on the sample sizes.

    Arguments:
        features_a: ``(n_a, k)`` features of sample a (e.g. ILR coordinates + log pT).
        features_b: ``(n_b, k)`` features of sample b.
        weight_a: optional per-jet weights of a.
        weight_b: optional per-jet weights of b.
        test_fraction: fraction held out.
        seed: seed of the split and the classifier.
        max_iter: boosting iterations (early stopping usually ends sooner).

    Returns:
        ``(scores, labels, weights)`` of the held-out jets (label 1 = sample b).
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    xa = np.asarray(features_a, dtype=np.float64).reshape(len(features_a), -1)
    xb = np.asarray(features_b, dtype=np.float64).reshape(len(features_b), -1)
    wa = np.ones(len(xa)) if weight_a is None else np.asarray(weight_a, dtype=np.float64)
    wb = np.ones(len(xb)) if weight_b is None else np.asarray(weight_b, dtype=np.float64)
    for name, x, w in (("a", xa, wa), ("b", xb, wb)):
        if len(x) < 20 or not np.all(np.isfinite(x)) or w.sum() <= 0:
            msg = (
                f"classifier two-sample test: sample {name} needs >= 20 finite rows with positive "
                f"total weight (got {len(x)} rows, weight sum {w.sum():.3g})"
            )
            raise ValueError(msg)
    x = np.concatenate([xa, xb])
    y = np.concatenate([np.zeros(len(xa)), np.ones(len(xb))])
    w = np.concatenate([wa / wa.sum(), wb / wb.sum()]) * len(x) / 2
    rng = np.random.default_rng(seed)
    test = rng.random(len(x)) < test_fraction
    clf = HistGradientBoostingClassifier(
        max_iter=max_iter, early_stopping=True, validation_fraction=0.2, random_state=seed,
        max_leaf_nodes=15, learning_rate=0.1,
    )
    clf.fit(x[~test], y[~test], sample_weight=w[~test])
    return clf.predict_proba(x[test])[:, 1], y[test], w[test]


def classifier_auc(
    features_a: np.ndarray,
    features_b: np.ndarray,
    weight_a: np.ndarray | None = None,
    weight_b: np.ndarray | None = None,
    *,
    test_fraction: float = 0.5,
    seed: int = 0,
    max_iter: int = 200,
) -> float:
    """Classifier two-sample test: held-out AUC of a classifier telling sample a from b.

    The weighted AUC of :func:`classifier_scores` on the held-out jets (classes at equal
    total weight). 0.5 means the classifier cannot tell the samples apart.

    Arguments:
        features_a: ``(n_a, k)`` features of sample a (e.g. ILR coordinates + log pT).
        features_b: ``(n_b, k)`` features of sample b.
        weight_a: optional per-jet weights of a.
        weight_b: optional per-jet weights of b.
        test_fraction: fraction held out for the AUC.
        seed: seed of the split and the classifier.
        max_iter: boosting iterations (early stopping usually ends sooner).

    Returns:
        The held-out AUC (label 1 = sample b).
    """
    scores, labels, weights = classifier_scores(
        features_a, features_b, weight_a, weight_b,
        test_fraction=test_fraction, seed=seed, max_iter=max_iter,
    )
    return weighted_auc(scores, labels, weights)


def mean_aitchison_displacement(
    before: np.ndarray, after: np.ndarray, weight: np.ndarray | None = None
) -> float:
    """Weighted mean Aitchison distance (eq. 6) between each jet before and after calibration."""
    d = np.asarray(geometry.aitchison_distance(before, after))
    if weight is None:
        return float(d.mean()) if len(d) else 0.0
    w = np.asarray(weight, dtype=np.float64)
    return float(np.sum(w * d) / np.sum(w))


def summarize_chi2(results: Mapping[str, Chi2Result]) -> dict[str, float]:
    """Mean chi2/ndf, minimum p-value and count of histograms of a set of chi2 tests."""
    vals = [r.chi2_ndf for r in results.values() if r.ndf > 0]
    ps = [r.p_value for r in results.values() if r.ndf > 0]
    return {
        "n_histograms": len(vals),
        "mean_chi2_ndf": float(np.mean(vals)) if vals else float("nan"),
        "min_p_value": float(np.min(ps)) if ps else float("nan"),
    }
