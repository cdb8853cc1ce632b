"""Inputs and prior of the EM fit: region checks, prior composition, logit MAP (Kim & Yang)."""

from __future__ import annotations

__all__ = [
    "CompositionWarning",
    "check_composition",
    "check_region",
    "flavour_index",
    "initial_logits",
    "map_logits",
    "prior_fractions",
    "prior_logit_covariance",
]

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from coffea_otcal.em_result import RegionData, fractions_from_logits, logits_from_fractions

if TYPE_CHECKING:
    from coffea_otcal.em import EMConfig

logger = logging.getLogger("coffea_otcal.em")


class CompositionWarning(UserWarning):
    """The composition matrix is nearly singular, or a fit slid beyond its prior."""


def prior_logit_covariance(n_classes: int, enriched: int, width: float) -> np.ndarray:
    r"""Covariance :math:`\Sigma_{a,r}` of eq. 21 for a region enriched in class ``enriched``.

    The paper sets a width ``width`` on each background-to-signal log-ratio
    :math:`b_h = \log(\pi_h / \pi_e)`, :math:`h \ne e` (Sec. VII), independently. With
    :math:`a_K \equiv 0`, :math:`b = T a` with rows :math:`T_h = \hat e_h - \hat e_e`, so
    :math:`\Sigma_a = T^{-1} (\sigma^2 I) T^{-T}`; for the light region (the reference
    class) :math:`T = I`.
    """
    k = n_classes - 1

    def unit(j: int) -> np.ndarray:
        v = np.zeros(k)
        if j < k:
            v[j] = 1.0
        return v

    rows = [unit(h) - unit(enriched) for h in range(n_classes) if h != enriched]
    t = np.array(rows)
    t_inv = np.linalg.inv(t)
    return width**2 * t_inv @ t_inv.T


def check_region(name: str, d: RegionData, kind: str, need_flavour: bool) -> RegionData:
    """Validated float64 copy of one region's inputs; a clear error names the bad region."""
    x = np.asarray(d.x, dtype=np.float64)
    if x.ndim != 2:
        msg = (
            f"{kind} region {name!r}: x must be (n_jets, D-1) ILR coordinates, got shape {x.shape}"
        )
        raise ValueError(msg)
    n = len(x)
    if n == 0:
        msg = f"{kind} region {name!r} has no jets; fill it or drop it from the fit"
        raise ValueError(msg)
    bad = int((~np.isfinite(x)).any(axis=1).sum())
    if bad:
        msg = f"{kind} region {name!r}: {bad} of {n} jets have NaN/inf ILR coordinates; flag them with the tagger adapter and drop them"
        raise ValueError(msg)
    w = np.ones(n) if d.weight is None else np.asarray(d.weight, dtype=np.float64)
    if w.shape != (n,):
        msg = f"{kind} region {name!r}: weight has shape {w.shape}, expected ({n},)"
        raise ValueError(msg)
    nbad = int((~np.isfinite(w)).sum())
    if nbad:
        msg = f"{kind} region {name!r}: {nbad} event weights are NaN/inf"
        raise ValueError(msg)
    if w.sum() <= 0:
        msg = f"{kind} region {name!r}: event weights sum to {w.sum():.6g} (<= 0); cannot fit"
        raise ValueError(msg)
    ctx = None
    if d.context is not None:
        ctx = np.asarray(d.context, dtype=np.float64)
        if ctx.ndim == 1:
            ctx = ctx[:, None]
        if ctx.shape[0] != n:
            msg = f"{kind} region {name!r}: context has {ctx.shape[0]} rows for {n} jets"
            raise ValueError(msg)
        cbad = int((~np.isfinite(ctx)).any(axis=1).sum())
        if cbad:
            msg = f"{kind} region {name!r}: {cbad} jets have NaN/inf context values"
            raise ValueError(msg)
    flav = None
    if need_flavour:
        if d.flavour is None:
            msg = (
                f"{kind} region {name!r} has no truth flavour labels; MC needs them for pretraining"
            )
            raise ValueError(msg)
        flav = np.asarray(d.flavour)
        if flav.shape != (n,):
            msg = f"{kind} region {name!r}: flavour has shape {flav.shape}, expected ({n},)"
            raise ValueError(msg)
    return RegionData(x=x, context=ctx, weight=w, flavour=flav)


def flavour_index(name: str, flavour: np.ndarray, config: EMConfig) -> np.ndarray:
    """Class index of each MC jet from its truth flavour code; unknown codes are an error."""
    codes = np.asarray(config.flavour_codes)
    idx = np.full(len(flavour), -1)
    for i, code in enumerate(codes):
        idx[flavour == code] = i
    if (idx < 0).any():
        unknown = sorted({int(v) for v in np.unique(flavour[idx < 0])})
        msg = (
            f"MC region {name!r}: {int((idx < 0).sum())} jets have flavour codes {unknown} "
            f"not in flavour_codes {tuple(config.flavour_codes)} (classes {config.classes})"
        )
        raise ValueError(msg)
    return idx


def prior_fractions(
    regions: Sequence[str],
    mc: Mapping[str, RegionData],
    mc_index: Mapping[str, np.ndarray],
    config: EMConfig,
) -> np.ndarray:
    r"""Prior centre :math:`\pi^0_r` of eq. 21 per region: configured, or the weighted MC composition."""
    n_f = len(config.classes)
    rows = []
    for r in regions:
        if config.prior_fractions is not None:
            if r not in config.prior_fractions:
                msg = f"prior_fractions has no entry for data region {r!r}"
                raise ValueError(msg)
            row = np.asarray(config.prior_fractions[r], dtype=np.float64)
            if row.shape != (n_f,) or (row < 0).any() or row.sum() <= 0:
                msg = f"prior_fractions[{r!r}] = {row.tolist()} is not {n_f} non-negative fractions"
                raise ValueError(msg)
        else:
            if r not in mc:
                msg = (
                    f"no MC region named {r!r} to take the prior composition from; MC regions "
                    f"are {sorted(mc)}; name them like the data regions or set prior_fractions"
                )
                raise ValueError(msg)
            w = mc[r].weight_array
            row = np.array([w[mc_index[r] == i].sum() for i in range(n_f)])
            if row.sum() <= 0:
                msg = f"MC region {r!r}: weights sum to {row.sum():.6g}; cannot form the prior"
                raise ValueError(msg)
        row = row / row.sum()
        for i, v in enumerate(row):
            if v < config.min_fraction:
                logger.warning(
                    "region %r: prior fraction of %r is %.3g; floored at %.3g",
                    r,
                    config.classes[i],
                    v,
                    config.min_fraction,
                )
        row = np.maximum(row, config.min_fraction)
        rows.append(row / row.sum())
    return np.array(rows)


def check_composition(pi: np.ndarray, regions: Sequence[str], config: EMConfig) -> float:
    """Condition number (eq. 27) of a composition matrix; error / warning when too large."""
    s = np.linalg.svd(pi, compute_uv=False)
    kappa = float(s[0] / s[-1]) if s[-1] > 0 else float("inf")
    if pi.shape[0] < pi.shape[1]:
        msg = (
            f"{pi.shape[0]} regions {list(regions)} cannot separate {pi.shape[1]} flavours: "
            "the composition matrix Pi needs at least as many regions as flavours"
        )
        raise ValueError(msg)
    if not np.isfinite(kappa) or kappa > config.condition_error:
        msg = (
            f"composition matrix of regions {list(regions)} is singular (condition number "
            f"kappa = {kappa:.3g} > {config.condition_error:.3g}); the regions need distinct "
            f"flavour compositions. Pi = {np.round(pi, 4).tolist()}"
        )
        raise ValueError(msg)
    if kappa > config.condition_warn:
        msg = (
            f"composition matrix of regions {list(regions)} is nearly singular: kappa = "
            f"{kappa:.3g} > {config.condition_warn:.3g}; extracted densities amplify errors "
            "by up to kappa (Kim & Yang eq. 26-27)"
        )
        warnings.warn(msg, CompositionWarning, stacklevel=3)
    return kappa


def initial_logits(pi0: np.ndarray, delta: float, rng: np.random.Generator) -> np.ndarray:
    """Random start: every fraction changed by at most ``delta`` relative (Sec. VII)."""
    out = []
    for row in pi0:
        for _ in range(1000):
            trial = row * (1.0 + rng.uniform(-delta, delta, size=row.shape))
            trial = trial / trial.sum()
            if np.all(np.abs(trial / row - 1.0) <= delta + 1e-12):
                break
        else:  # pragma: no cover - the identity draw always passes for small delta
            trial = row
        out.append(trial)
    return logits_from_fractions(np.array(out))


def map_logits(
    counts: np.ndarray, a0: np.ndarray, precision: np.ndarray, start: np.ndarray
) -> np.ndarray:
    r"""Row-local MAP of eq. 22-23 for the logits by Newton's method.

    Maximises :math:`\sum_k n_k \log\pi_k(a) - \tfrac12 (a-a^0)^T \Sigma^{-1} (a-a^0)`
    with :math:`n_k = \sum_i w_i \gamma_{i,k}`: gradient :math:`n_j - N\pi_j -
    [\Sigma^{-1}(a - a^0)]_j`, Hessian :math:`-N(\mathrm{diag}\,\pi' - \pi'\pi'^T) -
    \Sigma^{-1}` (strictly concave, so Newton with step halving converges).
    """
    n_total = counts.sum()

    def objective(a: np.ndarray) -> float:
        pi = fractions_from_logits(a)
        d = a - a0
        return float(counts @ np.log(pi) - 0.5 * d @ precision @ d)

    a = start.copy()
    f = objective(a)
    for _ in range(100):
        pi = fractions_from_logits(a)[:-1]
        grad = counts[:-1] - n_total * pi - precision @ (a - a0)
        hess = -n_total * (np.diag(pi) - np.outer(pi, pi)) - precision
        step = -np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6:
            f_new = objective(a + t * step)
            if f_new >= f - 1e-12:
                break
            t *= 0.5
        a = a + t * step
        f = f_new
        if np.abs(t * step).max() < 1e-10:
            break
    return a
