from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from coffea_otcal.em import CompositionWarning, EMConfig, RegionData, fit_em
from coffea_otcal.em_diagnostics import (
    binned_chi2,
    compute_diagnostics,
    condition_number,
    feedback_operator,
    fraction_drift,
    fraction_pulls,
    logit_from_fraction_jacobian,
    logit_hessian,
    logit_jacobian,
    proxy_delta_log_q,
)
from coffea_otcal.em_plots import EMTruth, plot_em_report
from coffea_otcal.em_result import fractions_from_logits, responsibilities
from coffea_otcal.flows import FlowConfig

torch.set_num_threads(1)
MEANS = np.array([[2.0, 2.5], [0.0, 0.5], [-0.5, -2.0]])
FRACTIONS = np.array([[0.86, 0.05, 0.09], [0.08, 0.84, 0.08], [0.04, 0.12, 0.84]])
CODES = (5, 4, 0)


def _gauss_logq(x):
    d = x[:, None, :] - MEANS[None]
    return -0.5 * (d**2).sum(-1) - np.log(2 * np.pi)


def _toy(n=400, seed=0):
    """Regions of unit Gaussians: log q known exactly."""
    rng = np.random.default_rng(seed)
    xs, flavs = [], []
    for row in FRACTIONS:
        f = rng.choice(3, size=n, p=row)
        xs.append(MEANS[f] + rng.normal(size=(n, 2)))
        flavs.append(np.asarray(CODES)[f])
    return xs, flavs


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, (2, 2), elements=st.floats(-4, 4)))
def test_jacobians_match_finite_differences_and_invert(a):
    pi = fractions_from_logits(a)
    jac = logit_jacobian(pi)
    eps = 1e-6
    for col in range(4):
        da = np.zeros(4)
        da[col] = eps
        num = (fractions_from_logits(a + da.reshape(2, 2)) - pi).ravel() / eps
        np.testing.assert_allclose(jac[:, col], num, atol=1e-5)
    # eq. 53 inverts eq. 52 on the tangent space of the simplex
    np.testing.assert_allclose(logit_from_fraction_jacobian(pi) @ jac, np.eye(4), atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(arrays(np.float64, (3, 3), elements=st.floats(0.01, 1.0)))
def test_condition_number_is_at_least_one(m):
    pi = m / m.sum(axis=1, keepdims=True)
    assert condition_number(pi) >= 1.0 - 1e-9
    assert condition_number(np.eye(3)) == pytest.approx(1.0)


def _nll(a, log_q, w):
    pi = fractions_from_logits(a.reshape(len(log_q), -1))
    return -sum(
        float(w[r] @ responsibilities(log_q[r], np.log(pi[r]))[1]) for r in range(len(log_q))
    )


def test_hessian_matches_finite_differences_of_the_mixture_nll():
    xs, _ = _toy()
    log_q = [_gauss_logq(x) for x in xs]
    w = [np.random.default_rng(r).uniform(0.5, 1.5, len(x)) for r, x in enumerate(xs)]
    a = np.log(FRACTIONS[:, :2]) - np.log(FRACTIONS[:, 2:])
    hess = logit_hessian(log_q, w, FRACTIONS)
    eps = 1e-4
    flat = a.ravel()
    num = np.zeros((6, 6))
    for i in range(6):
        for j in range(6):
            e_i, e_j = np.eye(6)[i] * eps, np.eye(6)[j] * eps
            num[i, j] = (
                _nll(flat + e_i + e_j, log_q, w)
                - _nll(flat + e_i - e_j, log_q, w)
                - _nll(flat - e_i + e_j, log_q, w)
                + _nll(flat - e_i - e_j, log_q, w)
            ) / (4 * eps**2)
    np.testing.assert_allclose(hess, num, rtol=1e-3, atol=1e-2)


def test_feedback_response_is_the_linearised_em_update():
    """B + C A_proxy (eq. 47-50) equals the derivative of one closed-form EM step (eq. 43)
    in which log q moves by the proxy of eq. 49."""
    # arbitrary positive densities at the events with bounded ratios q_h / q_j, so that a
    # finite difference stays in the linear regime of the proxy
    rng = np.random.default_rng(3)
    log_q = [rng.normal(0.0, 1.0, size=(300, 3)) + 2.0 * np.eye(3)[r] for r in range(3)]
    w = [rng.uniform(0.5, 1.5, 300) for _ in range(3)]
    enriched = [0, 1, 2]
    pi_hat = FRACTIONS
    _, response, jac = feedback_operator(log_q, w, pi_hat, enriched)

    def em_step(pi):
        dpi = pi - pi_hat
        out = []
        for r in range(3):
            lq = log_q[r] + proxy_delta_log_q(log_q[r], dpi, enriched)
            gamma, _ = responsibilities(lq, np.log(pi[r]))
            out.append(w[r] @ gamma / w[r].sum())
        return np.array(out).ravel()

    base = em_step(pi_hat)
    eps = 1e-7
    num = np.zeros((9, 9))
    for col in range(9):
        d = np.zeros(9)
        d[col] = eps
        num[:, col] = (em_step(pi_hat + d.reshape(3, 3)) - base) / eps
    np.testing.assert_allclose(response, num, atol=1e-5)
    assert jac.shape == (9, 6)


def test_proxy_matches_eq_49_by_hand():
    log_q = np.log(np.array([[0.5, 0.2, 0.1]]))
    dpi = np.zeros((3, 3))
    dpi[0, 1] = 0.01  # pi[r_b, c]
    dpi[0, 2] = -0.02  # pi[r_b, light]
    out = proxy_delta_log_q(log_q, dpi, [0, 1, 2])
    expected_b = 0.01 * (1 - 0.2 / 0.5) - 0.02 * (1 - 0.1 / 0.5)
    np.testing.assert_allclose(out[0], [expected_b, 0.0, 0.0])


def test_binned_chi2_separates_equal_from_shifted_samples():
    rng = np.random.default_rng(0)
    edges = np.linspace(-3, 3, 31)
    values = []
    for _ in range(20):
        chi2, ndf = binned_chi2(rng.normal(size=5000), rng.normal(size=5000), edges)
        values.append(chi2 / ndf)
    assert 0.8 < np.mean(values) < 1.2
    chi2, ndf = binned_chi2(rng.normal(size=5000), rng.normal(0.2, 1, size=5000), edges)
    assert chi2 / ndf > 3


@pytest.fixture(scope="module")
def fitted():
    xs, flavs = _toy(n=900, seed=2)
    rng = np.random.default_rng(5)
    data = {name: RegionData(x=x) for name, x in zip(("b", "c", "light"), xs, strict=True)}
    mc = {}
    for name, row in zip(("b", "c", "light"), FRACTIONS, strict=True):
        f = rng.choice(3, size=900, p=row)
        mc[name] = RegionData(x=MEANS[f] + rng.normal(size=(900, 2)), flavour=np.asarray(CODES)[f])
    cfg = EMConfig(
        flow=FlowConfig(hidden_features=(16, 16), pretrain_steps=60, batch_size=512),
        m_steps=6,
        max_iterations=2,
        min_iterations=1,
    )
    truth = {k: RegionData(x=v.x, flavour=f) for (k, v), f in zip(data.items(), flavs, strict=True)}
    return fit_em(data, mc, cfg, seed=0, progress=False), truth


def test_diagnostics_of_a_fit(fitted):
    res, truth = fitted
    diag = compute_diagnostics(res)
    assert diag.condition_number == pytest.approx(condition_number(res.fractions))
    np.testing.assert_allclose(diag.v_eff, diag.v_eff.T)
    assert np.linalg.eigvalsh(diag.v_eff).min() > -1e-12
    # the stable / prior projectors split the logit space
    np.testing.assert_allclose(diag.p_stable + diag.p_prior, np.eye(6), atol=1e-10)
    np.testing.assert_allclose(diag.g @ (np.eye(6) - diag.feedback), np.eye(6), atol=1e-8)
    assert diag.spectral_radius == pytest.approx(np.abs(np.linalg.eigvals(diag.feedback)).max())
    # with the prior (eq. 39) the covariance is tighter than without (eq. 38)
    assert np.trace(diag.v_stat_prior) < np.trace(diag.v_stat)
    assert (diag.fraction_errors_eff > 0).all()
    true = EMTruth(truth).true_fractions(res.regions, CODES)
    pulls = fraction_pulls(diag, true)
    assert np.abs(pulls).max() < 3
    text = json.dumps(diag.to_dict())
    assert "parameter_names" in text
    assert diag.parameter_names()[0] == "b:log(b/light)"


def test_fit_beyond_the_prior_warns(fitted):
    res, _ = fitted
    slid = dataclasses.replace(
        res, logits=res.prior_logits + np.array([[1.5, 0.0], [0, 0], [0, 0]])
    )
    with pytest.warns(CompositionWarning, match=r"region 'b': fitted fractions .* prior sigma"):
        diag = compute_diagnostics(slid)
    assert diag.prior_pulls[0] > 2


def test_logit_plane_plots_are_written(fitted, tmp_path):
    res, truth = fitted
    paths = plot_em_report(res, tmp_path, truth=EMTruth(truth), kinds=("logits", "trace"))
    assert sorted(p.name for p in paths) == [
        "em_logits_b.png",
        "em_logits_c.png",
        "em_logits_light.png",
        "em_nll_trace.png",
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"unknown plot kinds \['nope'\]"):
        plot_em_report(res, tmp_path, kinds=("nope",))


@pytest.mark.slow
def test_report_plots_are_written(fitted, tmp_path):
    res, truth = fitted
    paths = plot_em_report(res, tmp_path, truth=EMTruth(truth))
    names = sorted(p.name for p in paths)
    assert "em_logits_b.png" in names
    assert "em_extracted_light.png" in names
    assert "em_outputs_c.png" in names
    assert len(paths) == 3 + 3 + 3 + 1
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stat().st_size > 5000


def _trace(lc_values, nll_values):
    """A trace whose cr_light c fraction follows ``lc_values`` (b takes 30 % of its change,
    light the rest)."""
    return [
        {"iteration": i, "nll": nll, "fractions": [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05],
                                                    [0.05 - 0.3 * (lc - 0.1), lc,
                                                     0.95 - 0.7 * (lc - 0.1) - 0.1]]}
        for i, (lc, nll) in enumerate(zip(lc_values, nll_values, strict=True))
    ]


def test_fraction_drift_names_the_sliding_entry_and_its_rate():
    regions, classes = ("cr_b", "cr_c", "cr_light"), ("b", "c", "light")
    trace = _trace([0.10, 0.11, 0.13, 0.136, 0.141, 0.143], [2.6, 2.53, 2.5281, 2.5279,
                                                             2.5278, 2.5277])
    drift = fraction_drift(trace, regions, classes, last=3)
    assert (drift["region"], drift["class"]) == ("cr_light", "c")
    assert drift["rate"] == pytest.approx((0.143 - 0.13) / 3)
    assert drift["monotone"] is True
    assert drift["nll_rate"] == pytest.approx(-0.0004 / 3)
    assert "cr_light's c fraction was still moving by +0.0043" in drift["message"]
    wobble = fraction_drift(_trace([0.1, 0.12, 0.11, 0.125], [2.5] * 4), regions, classes, 3)
    assert wobble["monotone"] is False
    assert fraction_drift(trace[:3], regions, classes, last=3) is None


def test_fit_quality_tests_the_mixture_and_each_flow_on_the_data_alone(fitted):
    from coffea_otcal.em_diagnostics import fit_quality

    fitted, _ = fitted
    quality = fit_quality(fitted, bins=20)
    assert quality.mixture.shape == (3, 2)
    assert quality.component.shape == (3, 2)
    assert np.all(quality.ndf_mixture >= 10)
    assert np.all(quality.ndf_component >= 10)
    assert np.all((quality.p_mixture >= 0) & (quality.p_mixture <= 1))
    # the fitted mixture describes each region's data
    assert quality.mixture.max() < 2.5, quality.table()
    assert json.loads(json.dumps(quality.to_dict()))["regions"] == list(fitted.regions)
    assert quality.table().count("\n") == 2 + 3 + 3 - 1
    # same seed, same numbers
    again = fit_quality(fitted, bins=20)
    np.testing.assert_array_equal(again.mixture, quality.mixture)
    # fractions of the wrong region: the b region's mixture now has the light composition,
    # and the test says which region misses
    swapped = dataclasses.replace(fitted, logits=fitted.logits[::-1].copy())
    bad = fit_quality(swapped, bins=20)
    assert bad.mixture[0].max() > 10 * quality.mixture[0].max()
    assert any("region 'b'" in note for note in bad.warnings)


def test_fit_quality_refuses_a_meaningless_binning(fitted):
    from coffea_otcal.em_diagnostics import fit_quality

    with pytest.raises(ValueError, match="bins >= 2"):
        fit_quality(fitted[0], bins=1)


def test_fit_quality_flags_a_flow_that_misses_its_target(fitted):
    import copy

    from coffea_otcal.em_diagnostics import fit_quality
    from coffea_otcal.flows import FlavourFlows

    res, _ = fitted
    flows = copy.deepcopy(res.flows)
    torch.manual_seed(0)
    fresh = FlavourFlows(flows.n_features, flows.n_context, flows.classes, flows.config)
    flows.flows[0].load_state_dict(fresh.flows[0].state_dict())  # b: an untrained flow
    good = fit_quality(res, bins=20)
    bad = fit_quality(dataclasses.replace(res, flows=flows), bins=20)
    assert bad.component[0].max() > 5 * good.component[0].max()
    assert bad.component[2].max() < 2.5  # light's flow is untouched
    assert any(note.startswith("flavour 'b': its flow misses") for note in bad.warnings)
