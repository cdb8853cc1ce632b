from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from coffea_otcal import geometry
from coffea_otcal.closure import (
    classifier_auc,
    discriminant_values,
    fill_discriminant,
    mean_aitchison_displacement,
    shape_chi2,
    summarize_chi2,
    weighted_auc,
)
from coffea_otcal.vertical import effective_sample_fraction, fit_density_ratio


def _dirichlet(rng, alpha, n):
    return rng.dirichlet(alpha, size=n)


def test_weighted_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 5, 300).astype(float)
    y = rng.random(300) < 0.4
    w = rng.random(300)
    pos, neg = s[y], s[~y]
    wp, wn = w[y], w[~y]
    gt = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    expected = np.sum(wp[:, None] * wn[None, :] * gt) / (wp.sum() * wn.sum())
    assert weighted_auc(s, y, w) == pytest.approx(expected, rel=1e-12)


def test_shape_chi2_is_chi2_distributed_for_identical_shapes():
    rng = np.random.default_rng(2)
    chi2s = []
    for _ in range(200):
        a = rng.poisson(200, 20).astype(float)
        b = rng.poisson(400, 20).astype(float)
        chi2s.append(shape_chi2(a, a, b, b))
    # ndf = 19; the mean of chi2/ndf over many pseudo-experiments is ~1
    assert np.mean([r.chi2_ndf for r in chi2s]) == pytest.approx(1.0, abs=0.1)
    assert all(r.ndf == 19 for r in chi2s)
    ps = np.array([r.p_value for r in chi2s])
    assert stats.kstest(ps, "uniform").pvalue > 1e-3
    summary = summarize_chi2({str(i): r for i, r in enumerate(chi2s)})
    assert summary["n_histograms"] == 200


def test_shape_chi2_detects_a_shape_difference_and_refuses_empty():
    a = np.full(20, 1000.0)
    b = np.linspace(800, 1200, 20)
    assert shape_chi2(a, a, b, b).p_value < 1e-6
    with pytest.raises(ValueError, match="empty"):
        shape_chi2(np.zeros(3), np.zeros(3), a[:3], a[:3])


def test_discriminant_histograms_fill_including_quantised_vertices():
    p = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    h = fill_discriminant(p, "D_bc", 1.0, bins=20)
    assert h.sum().value == pytest.approx(3.0)
    np.testing.assert_allclose(discriminant_values(p, "D_hfl", 2.0)[1], 0.8 / 1.3)
    with pytest.raises(ValueError, match="unknown discriminant"):
        discriminant_values(p, "D_xx", 1.0)


def test_classifier_auc_near_half_for_same_distribution_and_high_for_shift():
    rng = np.random.default_rng(3)
    same = classifier_auc(rng.normal(size=(6000, 2)), rng.normal(size=(6000, 2)), seed=1)
    shifted = classifier_auc(rng.normal(size=(6000, 2)), rng.normal(size=(6000, 2)) + np.array([0.5, 0.0]), seed=1)
    assert abs(same - 0.5) < 0.03
    # two unit Gaussians 0.5 apart: optimal AUC = Phi(0.5 / sqrt(2)) = 0.638
    assert shifted == pytest.approx(stats.norm.cdf(0.5 / np.sqrt(2)), abs=0.03)
    with pytest.raises(ValueError, match="needs >= 20"):
        classifier_auc(np.zeros((5, 1)), np.zeros((50, 1)))


def test_mean_aitchison_displacement():
    p = np.array([[0.94, 0.04, 0.02], [0.4, 0.4, 0.2]])
    q = np.array([[0.94, 0.02, 0.04], [0.4, 0.4, 0.2]])
    assert mean_aitchison_displacement(p, q) == pytest.approx(
        float(geometry.aitchison_distance(p[0], q[0])) / 2
    )
    assert mean_aitchison_displacement(p, q, weight=np.array([0.0, 1.0])) == 0.0


def test_density_ratio_reweights_source_onto_target_and_rho_matches_gaussian_theory():
    rng = np.random.default_rng(4)
    src = rng.normal(size=(30000, 1))
    tgt = rng.normal(size=(30000, 1)) + 0.3
    ratio = fit_density_ratio(src, tgt, seed=0)
    w = ratio(src)
    assert np.average(src[:, 0], weights=w) == pytest.approx(0.3, abs=0.05)
    # for a unit-Gaussian shift mu, rho = exp(-mu^2)
    assert effective_sample_fraction(w) == pytest.approx(np.exp(-0.09), abs=0.04)
    assert effective_sample_fraction(np.ones(10)) == 1.0


def test_closure_and_arrow_plots_are_written(tmp_path):
    from coffea_otcal.closure_plots import plot_discriminant_closure, plot_map_arrows

    rng = np.random.default_rng(5)
    data = rng.dirichlet([2, 1, 1], 2000)
    before = rng.dirichlet([3, 1, 1], 2000)
    after = rng.dirichlet([2, 1, 1], 2000)
    out = plot_discriminant_closure(
        tmp_path / "c.png", "D_cl", 2.0, (data, None), (before, None), (after, None),
        {"v_up": after[::-1]}, experiment="ATLAS", region="VR",
    )
    assert out.stat().st_size > 10_000
    z = {"b": geometry.ilr(before[:50])}
    for space in ("ilr", "simplex"):
        assert plot_map_arrows(tmp_path / f"{space}.png", z, {"b": geometry.ilr(after[:50])}, space=space).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "ilr.png", "simplex.png"]
    with pytest.raises(ValueError, match="unknown plot label"):
        plot_discriminant_closure(tmp_path / "x.png", "D_cl", 1.0, (data, None), (before, None), (after, None), experiment="LEP")
