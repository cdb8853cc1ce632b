"""EM diagnostics: conditioning, Hessian covariance, feedback operator, effective covariance."""

from __future__ import annotations

__all__ = [
    "EMDiagnostics",
    "FitQuality",
    "binned_chi2",
    "compute_diagnostics",
    "condition_number",
    "feedback_operator",
    "fit_quality",
    "fraction_covariance",
    "fraction_drift",
    "fraction_pulls",
    "logit_from_fraction_jacobian",
    "logit_hessian",
    "logit_jacobian",
    "proxy_delta_log_q",
]

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coffea_otcal.em import CompositionWarning
from coffea_otcal.em_result import EMResult, responsibilities

logger = logging.getLogger(__name__)


def condition_number(pi: np.ndarray) -> float:
    r"""Condition number :math:`\kappa(\Pi) = \|\Pi^{-1}\| \|\Pi\|` in the 2-norm (eq. 27).

    For non-square :math:`\Pi` (more regions than flavours) the ratio of the extreme
    singular values; ``inf`` when :math:`\Pi` is rank deficient.
    """
    s = np.linalg.svd(np.asarray(pi, dtype=np.float64), compute_uv=False)
    return float(s[0] / s[-1]) if s[-1] > 0 else float("inf")


def logit_jacobian(fractions: np.ndarray) -> np.ndarray:
    r"""Block-diagonal :math:`J` of eq. 51, :math:`J_{r,k,j} = \pi_{r,k}(\delta_{kj} - \pi_{r,j})`.

    Shape ``(R F, R (F-1))``; rows ordered ``(r, k)``, columns ``(r, j)``, region-major.
    """
    n_r, n_f = fractions.shape
    jac = np.zeros((n_r * n_f, n_r * (n_f - 1)))
    for r, pi in enumerate(fractions):
        block = pi[:, None] * (np.eye(n_f)[:, : n_f - 1] - pi[None, : n_f - 1])
        jac[r * n_f : (r + 1) * n_f, r * (n_f - 1) : (r + 1) * (n_f - 1)] = block
    return jac


def logit_from_fraction_jacobian(fractions: np.ndarray) -> np.ndarray:
    r"""Block-diagonal :math:`M` of eq. 53, :math:`[\delta a_r]_j = \delta\pi_{r,j}/\pi_{r,j} - \delta\pi_{r,K}/\pi_{r,K}`."""
    n_r, n_f = fractions.shape
    m = np.zeros((n_r * (n_f - 1), n_r * n_f))
    for r, pi in enumerate(fractions):
        block = np.zeros((n_f - 1, n_f))
        block[:, : n_f - 1] = np.diag(1.0 / pi[: n_f - 1])
        block[:, n_f - 1] = -1.0 / pi[n_f - 1]
        m[r * (n_f - 1) : (r + 1) * (n_f - 1), r * n_f : (r + 1) * n_f] = block
    return m


def logit_hessian(
    log_q: list[np.ndarray], weights: list[np.ndarray], fractions: np.ndarray
) -> np.ndarray:
    r"""Hessian of :math:`\mathcal{L}_{mix}(a; \hat q)` (eq. 37) in the free logits, eq. 38.

    Per event :math:`\partial^2(-\log p_r)/\partial a\,\partial a^T =
    -(\mathrm{diag}\,\gamma' - \gamma'\gamma'^T) + (\mathrm{diag}\,\pi' - \pi'\pi'^T)`
    (primes: the first :math:`K-1` classes), summed with the event weights; block
    diagonal over regions.
    """
    n_r, n_f = fractions.shape
    k = n_f - 1
    hess = np.zeros((n_r * k, n_r * k))
    for r in range(n_r):
        gamma, _ = responsibilities(log_q[r], np.log(fractions[r]))
        w = weights[r]
        g = gamma[:, :k]
        pi = fractions[r, :k]
        block = -(np.diag(w @ g) - np.einsum("i,ij,il->jl", w, g, g))
        block += w.sum() * (np.diag(pi) - np.outer(pi, pi))
        hess[r * k : (r + 1) * k, r * k : (r + 1) * k] = block
    return hess


def feedback_operator(
    log_q: list[np.ndarray],
    weights: list[np.ndarray],
    fractions: np.ndarray,
    enriched: list[int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Linearised EM feedback :math:`F = M (B + C A_{proxy}) J` (eq. 45-54).

    :math:`B` is the direct response of eq. 47. The density-induced response
    :math:`C A_{proxy}` is evaluated event by event (eq. 45 with eq. 49 inserted, before
    averaging, since :math:`A_{proxy}` depends on :math:`x`):

    .. math::
        \delta\pi^{new}_{r,k} \mathrel{+}= \frac{1}{N_r}\sum_i w_i \sum_j
        (\delta_{kj} - \gamma_{r,i,k})\, \gamma_{r,i,j}\Big(1 - \frac{\hat q_h}{\hat q_j}\Big)
        \, \delta\pi_{r_j,h}, \quad h \ne j,

    where :math:`\gamma_j (1 - q_h/q_j) = \gamma_j - \pi_{r,j} q_h / p_r` is bounded.

    Arguments:
        log_q: per region, :math:`\log\hat q_f(x_{r,i})` of shape ``(n_r, F)``.
        weights: per region, event weights ``(n_r,)``.
        fractions: :math:`\hat\Pi` ``(R, F)``.
        enriched: index :math:`r_j` of the region enriched in each flavour ``j``.

    Returns:
        ``(F, B + C A_proxy, J)``: the ``(R(F-1), R(F-1))`` feedback operator, the
        ``(RF, RF)`` one-step response in fraction space and the Jacobian of eq. 51.
    """
    n_r, n_f = fractions.shape
    response = np.zeros((n_r * n_f, n_r * n_f))
    eye = np.eye(n_f)
    for r in range(n_r):
        pi = fractions[r]
        gamma, log_p = responsibilities(log_q[r], np.log(pi))
        w = weights[r] / weights[r].sum()
        q_over_p = np.exp(log_q[r] - log_p[:, None])
        # direct response, eq. 47
        b = np.einsum("i,im,ikm->km", w, q_over_p, eye[None] - gamma[:, :, None])
        response[r * n_f : (r + 1) * n_f, r * n_f : (r + 1) * n_f] += b
        # density-induced response, eq. 45 + 49
        t = gamma[:, :, None] - pi[None, :, None] * q_over_p[:, None, :]  # (n, j, h)
        s1 = np.einsum("i,ijh->jh", w, t)
        s2 = np.einsum("i,ik,ijh->kjh", w, gamma, t)
        coef = eye[:, :, None] * s1[None] - s2  # (k, j, h)
        for j in range(n_f):
            rj = enriched[j]
            for h in range(n_f):
                if h == j:
                    continue
                response[r * n_f : (r + 1) * n_f, rj * n_f + h] += coef[:, j, h]
    jac = logit_jacobian(fractions)
    m = logit_from_fraction_jacobian(fractions)
    return m @ response @ jac, response, jac


def proxy_delta_log_q(
    log_q: np.ndarray, delta_pi: np.ndarray, enriched: list[int] | tuple[int, ...]
) -> np.ndarray:
    r"""Composition-induced log-density shift, eq. 49 (operator form of eq. 33).

    :math:`\delta\log q_j(x) = \sum_{h\ne j}\delta\pi_{r_j,h}(1 - \hat q_h(x)/\hat q_j(x))`.

    Arguments:
        log_q: :math:`\log\hat q_f(x)` at the points, ``(n, F)``.
        delta_pi: fraction perturbation ``(R, F)``.
        enriched: region index :math:`r_j` per flavour.

    Returns:
        ``(n, F)`` shifts of :math:`\log q_j`.
    """
    n_f = log_q.shape[1]
    out = np.zeros_like(log_q)
    for j in range(n_f):
        for h in range(n_f):
            if h == j:
                continue
            ratio = np.exp(np.clip(log_q[:, h] - log_q[:, j], -700.0, 700.0))
            out[:, j] += delta_pi[enriched[j], h] * (1.0 - ratio)
    return out


def fraction_covariance(v_a: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    r"""Covariance of the fractions, :math:`J V_a J^T` (eq. 52), ``(R F, R F)``."""
    jac = logit_jacobian(fractions)
    return jac @ v_a @ jac.T


@dataclass
class EMDiagnostics:
    """Diagnostics of an EM fit (Kim & Yang Sec. IV-V); matrices in region-major order."""

    classes: tuple[str, ...]
    regions: tuple[str, ...]
    enriched: tuple[str, ...]
    fractions: np.ndarray
    prior_fractions: np.ndarray
    condition_number: float
    prior_condition_number: float
    hessian: np.ndarray
    v_stat: np.ndarray
    v_stat_prior: np.ndarray
    v_prior: np.ndarray
    feedback: np.ndarray
    spectral_radius: float
    g: np.ndarray
    singular_values: np.ndarray
    u: np.ndarray
    v: np.ndarray
    alignment: np.ndarray
    stable: np.ndarray
    v_eff: np.ndarray
    amplification_threshold: float
    prior_pulls: np.ndarray
    fraction_errors_stat: np.ndarray
    fraction_errors_eff: np.ndarray
    warnings: list[str] = field(default_factory=list)
    #: how the fractions were still moving at the end of the fit (:func:`fraction_drift`)
    fraction_drift: dict[str, Any] | None = None

    @property
    def p_stable(self) -> np.ndarray:
        r""":math:`P_{st} = U_{st} U_{st}^T` (eq. 60)."""
        u = self.u[:, self.stable]
        return u @ u.T

    @property
    def p_prior(self) -> np.ndarray:
        r""":math:`P_{pr} = U_{pr} U_{pr}^T` (eq. 60)."""
        u = self.u[:, ~self.stable]
        return u @ u.T

    def parameter_names(self) -> list[str]:
        """Names of the free logits ``a[region, log(pi_j/pi_K)]`` in matrix order."""
        ref = self.classes[-1]
        return [f"{r}:log({c}/{ref})" for r in self.regions for c in self.classes[:-1]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary of every diagnostic."""
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            out[key] = value.tolist() if isinstance(value, np.ndarray) else value
        out["parameter_names"] = self.parameter_names()
        out["classes"] = list(self.classes)
        out["regions"] = list(self.regions)
        out["enriched"] = list(self.enriched)
        return out


def compute_diagnostics(
    result: EMResult,
    amplification_threshold: float = 10.0,
    prior_pull_warn: float = 2.0,
) -> EMDiagnostics:
    r"""All diagnostics of Sec. IV-V at the converged fit.

    - :math:`\hat\Pi` and :math:`\kappa(\hat\Pi)` (eq. 27);
    - :math:`V_a^{(0)}` from the Hessian of eq. 38 (no prior) and eq. 39 (with prior);
    - :math:`F` (eq. 54), :math:`\rho(F)`, :math:`G = (I-F)^{-1} = U S V^T` (eq. 55, 58);
    - the split of the left singular vectors :math:`u_i` into stable channels and
      prior-dominated ones: a channel is stable when :math:`\sigma_i \le`
      ``amplification_threshold`` *and* its amplified statistical variance
      :math:`u_i^T G V_a^{(0)} G^T u_i` does not exceed the prior variance
      :math:`u_i^T V_a^{prior} u_i` (otherwise the data constrain it less than the prior
      does); non-contractive directions (:math:`\rho(F) \ge 1`) have huge
      :math:`\sigma_i` and fall in the prior set. Then the projected covariance of eq. 61,
      :math:`V_a^{eff} = P_{st} G V_a^{(0)} G^T P_{st} + P_{pr} V_a^{prior} P_{pr}`, with
      :math:`V_a^{prior}` the covariance of the logit prior (eq. 21);
    - the Mahalanobis distance of :math:`\hat a_r` from the prior centre per region; a
      :class:`~coffea_otcal.em.CompositionWarning` when it exceeds ``prior_pull_warn``
      (the fit slid along an unstable direction, Sec. VIII.1).
    """
    regions = result.regions
    fractions = result.fractions
    n_r, n_f = fractions.shape
    k = n_f - 1
    log_q = [result.log_prob(result.data[r].x, result.data[r].context) for r in regions]
    weights = [result.data[r].weight_array for r in regions]
    enriched = [regions.index(r) for r in result.enriched]
    notes: list[str] = []

    hess = logit_hessian(log_q, weights, fractions)
    v_prior = np.zeros((n_r * k, n_r * k))
    for r in range(n_r):
        v_prior[r * k : (r + 1) * k, r * k : (r + 1) * k] = result.prior_cov[r]
    v_stat = _safe_inverse(hess, "Hessian of the mixture NLL (eq. 38)", notes)
    v_stat_prior = np.linalg.inv(hess + np.linalg.inv(v_prior))

    feedback, _, _ = feedback_operator(log_q, weights, fractions, enriched)
    rho = float(np.abs(np.linalg.eigvals(feedback)).max())
    g = _safe_inverse(np.eye(n_r * k) - feedback, "I - F (eq. 55)", notes)
    u, s, vt = np.linalg.svd(g)
    alignment = np.abs(np.einsum("ij,ji->i", u.T, vt.T))
    amplified = u.T @ g @ v_stat @ g.T @ u
    prior_var = u.T @ v_prior @ u
    stable = (s <= amplification_threshold) & (np.diag(amplified) <= np.diag(prior_var))
    if rho >= 1.0:
        notes.append(
            f"spectral radius rho(F) = {rho:.3f} >= 1: the linearised EM feedback is not "
            "contractive (the Neumann series of eq. 55 diverges); its non-contractive "
            "directions show up as large singular values of G and are prior-dominated"
        )
    u_st, u_pr = u[:, stable], u[:, ~stable]
    v_eff = u_st @ u_st.T @ g @ v_stat @ g.T @ u_st @ u_st.T
    v_eff = v_eff + u_pr @ u_pr.T @ v_prior @ u_pr @ u_pr.T
    v_eff = 0.5 * (v_eff + v_eff.T)

    pulls = np.zeros(n_r)
    prec = np.linalg.inv(result.prior_cov)
    for r in range(n_r):
        d = result.logits[r] - result.prior_logits[r]
        pulls[r] = float(np.sqrt(d @ prec[r] @ d))
        if pulls[r] > prior_pull_warn:
            msg = (
                f"region {regions[r]!r}: fitted fractions "
                f"{np.round(fractions[r], 4).tolist()} lie {pulls[r]:.2f} prior sigma from the "
                f"prior {np.round(result.prior_fractions[r], 4).tolist()} (> {prior_pull_warn}); "
                "the fit slid along a weakly constrained direction (Kim & Yang Sec. VIII.1): "
                "check the prior centre and width"
            )
            warnings.warn(msg, CompositionWarning, stacklevel=2)
            notes.append(msg)
    drift = fraction_drift(result.trace, regions, result.classes)
    if not result.converged and drift is not None:
        notes.append(drift["message"])
    kappa = condition_number(fractions)
    for i in np.flatnonzero(~stable):
        notes.append(
            f"channel {i + 1}: sigma = {s[i]:.3g} (prior-dominated); dominant entries "
            + ", ".join(_top_entries(u[:, i], _names(result)))
        )
    return EMDiagnostics(
        classes=result.classes,
        regions=regions,
        enriched=result.enriched,
        fractions=fractions,
        prior_fractions=result.prior_fractions,
        condition_number=kappa,
        prior_condition_number=condition_number(result.prior_fractions),
        hessian=hess,
        v_stat=v_stat,
        v_stat_prior=v_stat_prior,
        v_prior=v_prior,
        feedback=feedback,
        spectral_radius=rho,
        g=g,
        singular_values=s,
        u=u,
        v=vt.T,
        alignment=alignment,
        stable=stable,
        v_eff=v_eff,
        amplification_threshold=amplification_threshold,
        prior_pulls=pulls,
        fraction_errors_stat=_fraction_errors(v_stat, fractions),
        fraction_errors_eff=_fraction_errors(v_eff, fractions),
        warnings=notes,
        fraction_drift=drift,
    )


def _names(result: EMResult) -> list[str]:
    ref = result.classes[-1]
    return [f"{r}:log({c}/{ref})" for r in result.regions for c in result.classes[:-1]]


def _top_entries(vec: np.ndarray, names: list[str], n: int = 2) -> list[str]:
    order = np.argsort(-np.abs(vec))[:n]
    return [f"{names[i]} {vec[i]:+.2f}" for i in order]


def fraction_drift(
    trace: list[dict[str, Any]], regions: tuple[str, ...] | list[str],
    classes: tuple[str, ...] | list[str], last: int = 3,
) -> dict[str, Any] | None:
    r"""How the fractions were still moving over the ``last`` iterations of an EM trace.

    An EM that stops at ``max_iterations`` while a fraction keeps moving in one direction
    and the NLL per event barely changes is sliding along a weakly constrained direction
    (Kim & Yang Sec. VIII.1): where it stops is set by the iteration budget and the flows'
    learning-rate schedule, not by the data, and more iterations move it further. Returns
    ``None`` for traces shorter than ``last + 1`` entries, else the fastest-moving entry
    (region, class, change per iteration, whether it moved monotonically), the NLL change
    per iteration over the same span, and a one-line ``message``.
    """
    if len(trace) < last + 1:
        return None
    fr = np.asarray([t["fractions"] for t in trace[-(last + 1):]], dtype=np.float64)
    steps = np.diff(fr, axis=0)
    rate = (fr[-1] - fr[0]) / last
    r, c = np.unravel_index(int(np.argmax(np.abs(rate))), rate.shape)
    monotone = bool(np.all(np.sign(steps[:, r, c]) == np.sign(rate[r, c])))
    dnll = (trace[-1]["nll"] - trace[-(last + 1)]["nll"]) / last
    message = (
        f"EM stopped while {regions[r]}'s {classes[c]} fraction was still moving by "
        f"{rate[r, c]:+.4f} per iteration over the last {last} iterations "
        f"({'monotonically' if monotone else 'not monotonically'}; NLL per event "
        f"{dnll:+.2e} per iteration): if monotonic, the fit is sliding along a weakly "
        "constrained direction and more iterations move it further (Kim & Yang Sec. VIII.1, "
        "docs/em.md 'Where the EM stops')"
    )
    return {"region": regions[r], "class": classes[c], "rate": float(rate[r, c]),
            "monotone": monotone, "nll_rate": float(dnll), "message": message}


def _fraction_errors(v_a: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    cov = fraction_covariance(v_a, fractions)
    return np.sqrt(np.clip(np.diag(cov), 0.0, None)).reshape(fractions.shape)


def _safe_inverse(mat: np.ndarray, what: str, notes: list[str]) -> np.ndarray:
    try:
        return np.linalg.inv(mat)
    except np.linalg.LinAlgError:
        msg = f"{what} is singular (smallest |eigenvalue| {np.abs(np.linalg.eigvals(mat)).min():.3g}); using the pseudo-inverse"
        logger.warning(msg)
        notes.append(msg)
        return np.linalg.pinv(mat)


def fraction_pulls(diagnostics: EMDiagnostics, true_fractions: np.ndarray) -> np.ndarray:
    r"""Pulls :math:`(\hat\pi_{r,f} - \pi^\star_{r,f}) / \sigma^{eff}_{r,f}` ``(R, F)``."""
    err = diagnostics.fraction_errors_eff
    return (diagnostics.fractions - np.asarray(true_fractions)) / np.where(err > 0, err, np.inf)


def binned_chi2(
    a: np.ndarray,
    b: np.ndarray,
    bins: np.ndarray,
    weight_a: np.ndarray | None = None,
    weight_b: np.ndarray | None = None,
    min_count: float = 5.0,
) -> tuple[float, int]:
    r"""Two-sample weighted :math:`\chi^2` between binned 1-d samples, after normalising.

    :math:`\chi^2 = \sum_k (A_k/W_A - B_k/W_B)^2 / (\sigma^2_{A,k}/W_A^2 + \sigma^2_{B,k}/W_B^2)`
    with :math:`\sigma^2 = \sum w^2` per bin, over bins where both samples have at least
    ``min_count`` effective entries; ndf = number of such bins - 1.

    Returns:
        ``(chi2, ndf)``.
    """
    wa = np.ones(len(a)) if weight_a is None else np.asarray(weight_a, dtype=np.float64)
    wb = np.ones(len(b)) if weight_b is None else np.asarray(weight_b, dtype=np.float64)
    ha, _ = np.histogram(a, bins, weights=wa)
    hb, _ = np.histogram(b, bins, weights=wb)
    va, _ = np.histogram(a, bins, weights=wa**2)
    vb, _ = np.histogram(b, bins, weights=wb**2)
    neff_a = np.divide(ha**2, va, out=np.zeros_like(ha), where=va > 0)
    neff_b = np.divide(hb**2, vb, out=np.zeros_like(hb), where=vb > 0)
    ok = (neff_a >= min_count) & (neff_b >= min_count)
    sa, sb = ha[ok].sum(), hb[ok].sum()
    num = (ha[ok] / sa - hb[ok] / sb) ** 2
    den = va[ok] / sa**2 + vb[ok] / sb**2
    return float((num / den).sum()), int(ok.sum() - 1)


@dataclass
class FitQuality:
    r"""Goodness of fit of an EM result on the data alone (no truth needed).

    Two binned two-sample :math:`\chi^2` tests per ILR coordinate (:func:`binned_chi2`):

    * ``mixture[r, k]``: region ``r``'s data against the fitted mixture
      :math:`\sum_f \hat\pi_{r,f} q_f` (Kim & Yang eq. 14), sampled from the flows. A
      mixture that misses the data means the densities or fractions cannot describe the
      region.
    * ``component[f, k]``: flavour ``f``'s flow against what the M-step fits, the data jets
      of every region weighted by :math:`w_i \hat\gamma_{r,i,f}` (eq. 17, 23). Above ~1
      the flow does not reach its own target, and the extracted density is less accurate
      than the data allow (docs/em.md, 'Goodness of fit without truth').

    Neither test sees the flat direction of the fractions (a mixture is unchanged by
    :math:`q' = A^{-1} q,\ \pi' = \pi A`); that is what the effective covariance is for.
    Arrays hold chi2/ndf; ``ndf_*`` the degrees of freedom; ``p_*`` the p-values.
    """

    classes: tuple[str, ...]
    regions: tuple[str, ...]
    bins: int
    mixture: np.ndarray
    ndf_mixture: np.ndarray
    p_mixture: np.ndarray
    component: np.ndarray
    ndf_component: np.ndarray
    p_component: np.ndarray
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (arrays as nested lists, rounded to 4 digits)."""
        out: dict[str, Any] = {"classes": list(self.classes), "regions": list(self.regions),
                               "bins": self.bins, "warnings": list(self.warnings)}
        for key in ("mixture", "ndf_mixture", "p_mixture", "component", "ndf_component",
                    "p_component"):
            value = getattr(self, key)
            out[key] = np.round(value, 4).tolist() if value.dtype.kind == "f" else value.tolist()
        return out

    def table(self) -> str:
        """Markdown table: one row per region (mixture) and per flavour (component)."""
        dim = self.mixture.shape[1]
        head = "| test | " + " | ".join(f"chi2/ndf z{k + 1} (p)" for k in range(dim)) + " |"
        rows = [head, "|" + " --- |" * (dim + 1)]
        for name, chi, p in [
            *[(f"data vs mixture, {r}", self.mixture[i], self.p_mixture[i])
              for i, r in enumerate(self.regions)],
            *[(f"flow vs EM target, {c}", self.component[i], self.p_component[i])
              for i, c in enumerate(self.classes)],
        ]:
            rows.append(f"| {name} | " + " | ".join(
                f"{c:.2f} ({q:.2g})" for c, q in zip(chi, p, strict=True)) + " |")
        return "\n".join(rows)


def _weighted_edges(x: np.ndarray, w: np.ndarray, bins: int, tail: float) -> np.ndarray:
    """``bins`` equal-width bins between the weighted ``tail`` and ``1 - tail`` quantiles."""
    order = np.argsort(x)
    cdf = np.cumsum(np.abs(w[order]))
    cdf /= cdf[-1]
    xs = x[order]
    lo = float(xs[min(int(np.searchsorted(cdf, tail)), len(x) - 1)])
    hi = float(xs[min(int(np.searchsorted(cdf, 1.0 - tail)), len(x) - 1)])
    if not hi > lo:
        hi = lo + 1e-9
    return np.linspace(lo, hi, bins + 1)


def fit_quality(
    result: EMResult,
    bins: int = 40,
    samples_per_jet: float = 1.0,
    tail: float = 0.002,
    threshold: float = 2.0,
    seed: int | None = None,
) -> FitQuality:
    r"""Data-only goodness of fit of an EM result: mixture vs data, flow vs its target.

    Each region ``r`` gets ``samples_per_jet`` flow samples per data jet (default 1: both
    sides of each test carry the same statistics; the chi2 counts both), split over the
    flavours by :math:`\hat\pi_r` (at least 500 per flavour); conditional flows draw their
    contexts from the region's jets (the model of eq. 14 with context: fractions independent
    of the context). Region ``r``'s samples give its mixture; flavour ``f``'s samples of all
    regions, each region's share weighted to that region's responsibility sum
    :math:`\sum_i w_i \hat\gamma_{r,i,f}`, give the flow's side of the component test.
    Bins: ``bins`` equal bins between the (weighted) ``tail`` and ``1 - tail`` quantiles of
    the data side; chi2 by :func:`binned_chi2`. A chi2/ndf above ``threshold`` adds a
    warning naming the region or flavour and coordinate.

    Returns:
        :class:`FitQuality`.
    """
    from scipy import stats

    if bins < 2 or samples_per_jet <= 0:
        msg = f"fit_quality needs bins >= 2 and samples_per_jet > 0; got {bins}, {samples_per_jet}"
        raise ValueError(msg)
    base = result.seed if seed is None else int(seed)
    flows = result.flows
    n_f, regions = len(result.classes), result.regions
    fr = np.asarray(result.fractions)
    samples: list[list[np.ndarray]] = []
    targets = np.zeros((len(regions), n_f))
    gammas = []
    for r, region in enumerate(regions):
        d = result.data[region]
        w = d.weight_array
        gamma = result.responsibilities(region)
        gammas.append(gamma)
        targets[r] = w @ gamma
        per_flavour = []
        for f in range(n_f):
            n = max(round(float(samples_per_jet * len(d.x) * fr[r, f])), 500)
            s = base + 7919 * r + 104729 * f + 17
            if flows.n_context:
                p = np.abs(w) / np.abs(w).sum()
                idx = np.random.default_rng(s).choice(len(d.x), size=n, p=p)
                y = flows.sample(f, context=np.asarray(d.context)[idx], seed=s)
            else:
                y = flows.sample(f, n=n, seed=s)
            per_flavour.append(y)
        samples.append(per_flavour)
    dim = result.data[regions[0]].x.shape[1]
    mix = np.zeros((len(regions), dim))
    ndf_mix = np.zeros((len(regions), dim), dtype=int)
    comp = np.zeros((n_f, dim))
    ndf_comp = np.zeros((n_f, dim), dtype=int)
    notes: list[str] = []
    total = [float(result.data[r].weight_array.sum()) for r in regions]
    for k in range(dim):
        for r, region in enumerate(regions):
            d = result.data[region]
            y = np.concatenate([s[:, k] for s in samples[r]])
            wy = np.concatenate([np.full(len(s), fr[r, f] * total[r] / len(s))
                                 for f, s in enumerate(samples[r])])
            edges = _weighted_edges(d.x[:, k], d.weight_array, bins, tail)
            chi2, ndf = binned_chi2(d.x[:, k], y, edges, weight_a=d.weight_array, weight_b=wy)
            mix[r, k], ndf_mix[r, k] = chi2 / max(ndf, 1), ndf
        x_all = np.concatenate([result.data[r].x[:, k] for r in regions])
        w_all = np.concatenate([result.data[r].weight_array for r in regions])
        for f in range(n_f):
            wt = w_all * np.concatenate([g[:, f] for g in gammas])
            y = np.concatenate([samples[r][f][:, k] for r in range(len(regions))])
            wy = np.concatenate([np.full(len(samples[r][f]), targets[r, f] / len(samples[r][f]))
                                 for r in range(len(regions))])
            edges = _weighted_edges(x_all, wt, bins, tail)
            chi2, ndf = binned_chi2(x_all, y, edges, weight_a=wt, weight_b=wy)
            comp[f, k], ndf_comp[f, k] = chi2 / max(ndf, 1), ndf
    p_mix = stats.chi2.sf(mix * ndf_mix, ndf_mix)
    p_comp = stats.chi2.sf(comp * ndf_comp, ndf_comp)
    for r, region in enumerate(regions):
        for k in range(dim):
            if mix[r, k] > threshold:
                notes.append(
                    f"region {region!r}: the fitted mixture misses the data on ILR z{k + 1} "
                    f"(chi2/ndf {mix[r, k]:.2f}, ndf {ndf_mix[r, k]}); the flows or the "
                    "fractions cannot describe this region (docs/em.md, 'Goodness of fit without truth')")
    for f, cls in enumerate(result.classes):
        for k in range(dim):
            if comp[f, k] > threshold:
                notes.append(
                    f"flavour {cls!r}: its flow misses its EM target on ILR z{k + 1} "
                    f"(chi2/ndf {comp[f, k]:.2f}, ndf {ndf_comp[f, k]}); the extracted "
                    "density is less accurate than the data allow (docs/em.md, 'Goodness of fit without "
                    "truth')")
    for note in notes:
        logger.warning(note)
    return FitQuality(
        classes=tuple(result.classes), regions=tuple(regions), bins=bins,
        mixture=mix, ndf_mixture=ndf_mix, p_mixture=np.asarray(p_mix, dtype=np.float64),
        component=comp, ndf_component=ndf_comp, p_component=np.asarray(p_comp, dtype=np.float64),
        warnings=notes,
    )
