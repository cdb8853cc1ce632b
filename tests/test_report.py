"""Tests of the closure-report helpers of coffea_otcal.report (band coverage, requantisation)."""

from __future__ import annotations

from pathlib import Path

import awkward as ak
import numpy as np
import pytest
from coffea.nanoevents import NanoAODSchema, NanoEventsFactory
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from coffea_otcal import geometry
from coffea_otcal.adapters import get_adapter
from coffea_otcal.closure import variation_band
from coffea_otcal.latent_tagger import quantise_mantissa
from coffea_otcal.report import (
    band_coverage,
    detect_mantissa_bits,
    em_fraction_factors,
    requantise,
)

REAL = Path(__file__).parent / "data" / "nano_tt_v15.root"


# ----------------------------------------------------------------------------- EM fractions


def test_em_fraction_factors_give_the_fitted_composition() -> None:
    rng = np.random.default_rng(3)
    flavour = rng.choice([5, 4, 0, 15], size=5000, p=[0.6, 0.2, 0.15, 0.05])
    weight = rng.uniform(-0.2, 2.0, size=5000)  # negative MC weights allowed
    fitted = [[0.9, 0.05, 0.05], [0.5, 0.3, 0.2]]
    factors = em_fraction_factors(fitted, ["cr_b", "cr_x"], [5, 4, 0], "cr_x", flavour, weight)
    assert factors is not None
    w = weight * factors
    known = np.isin(flavour, [5, 4, 0])
    # flavour 15 has no fitted fraction: its jets keep their weight
    np.testing.assert_array_equal(factors[~known], 1.0)
    total = weight.sum()
    for code, frac in zip([5, 4, 0], fitted[1], strict=True):
        assert w[flavour == code].sum() / total == pytest.approx(frac, rel=1e-12)
    # a region the EM did not fit (validation) has no post-fit composition
    assert em_fraction_factors(fitted, ["cr_b", "cr_x"], [5, 4, 0], "vr", flavour, weight) is None


# ----------------------------------------------------------------------------- band coverage


def test_band_coverage_by_hand() -> None:
    # unit-area shapes: data (0.2, 0.3, 0.5, 0), nominal (0.3, 0.3, 0.4, 0)
    data = (np.array([20.0, 30.0, 50.0, 0.0]), np.array([1.0, 1.0, 1.0, 0.0]))
    nominal = (np.array([30.0, 30.0, 40.0, 0.0]), np.array([1.0, 1.0, 1.0, 0.0]))
    # sigma^2 per bin = 1/100^2 + 1/100^2 = 2e-4 (sigma 0.01414)
    up = np.array([25.0, 30.0, 45.0, 0.0])  # shape (0.25, 0.3, 0.45, 0)
    down = np.array([35.0, 30.0, 35.0, 0.0])  # shape (0.35, 0.3, 0.35, 0)
    # bin 0: residual -0.1, downward band 0.05: sqrt(0.05^2 + 2e-4) = 0.052 < 0.1: outside;
    # bin 1: residual 0: inside; bin 2: +0.1 vs upward 0.052: outside; bin 3 empty, not counted
    one = {"v_up": up, "v_down": down}
    assert band_coverage(data, nominal, one) == (1, 3)
    # a second independent source of the same size: sqrt(2 * 0.05^2 + 2e-4) = 0.0728 < 0.1
    two = {**one, "w_up": up, "w_down": down}
    assert band_coverage(data, nominal, two) == (1, 3)
    # four sources: sqrt(4 * 0.05^2 + 2e-4) = 0.1020 > 0.1: every bin inside (an envelope
    # of the same four shapes would stay at 0.05 + stat and miss bins 0 and 2)
    four = {**two, "x_up": up, "x_down": down, "y_up": up, "y_down": down}
    assert band_coverage(data, nominal, four) == (3, 3)
    # at the 90 % interval (z = 1.645) two sources suffice: 1.645 * 0.0728 = 0.120 > 0.1
    assert band_coverage(data, nominal, two, z=1.645) == (3, 3)
    # without variations only the statistical error counts
    assert band_coverage(data, nominal, {}) == (1, 3)
    # large statistical errors cover everything
    loud = (data[0], np.array([400.0, 400.0, 400.0, 0.0]))
    assert band_coverage(loud, nominal, {}) == (3, 3)


def test_band_coverage_rejects_empty_histograms() -> None:
    h = (np.array([1.0, 2.0]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="em_prior_1_up"):
        band_coverage(h, h, {"em_prior_1_up": np.array([1.0, -1.0])})
    with pytest.raises(ValueError, match="nominal"):
        band_coverage(h, (np.zeros(2), np.zeros(2)), {})


def test_band_sides_are_kept_apart() -> None:
    # a one-sided source (up and down both raise bin 0) gives no downward band there
    nominal = np.array([0.5, 0.5])
    down, up = variation_band(nominal, {"s_up": np.array([0.6, 0.4]), "s_down": np.array([0.55, 0.45])})
    np.testing.assert_allclose(up, [0.1, 0.0])
    np.testing.assert_allclose(down, [0.0, 0.1])
    # one suffix only: variation "x_down" has maps "x_down_up" / "x_down_down"
    down, up = variation_band(nominal, {"x_down_up": np.array([0.6, 0.4]),
                                        "x_down_down": np.array([0.4, 0.6]),
                                        "x_up": np.array([0.6, 0.4])})
    np.testing.assert_allclose(up, [np.hypot(0.1, 0.1), 0.1])
    # an unpaired name is a source of its own; sources add in quadrature
    down, up = variation_band(nominal, {"s_up": np.array([0.6, 0.4]), "t": np.array([0.7, 0.3])})
    np.testing.assert_allclose(up, [np.hypot(0.1, 0.2), 0.0])
    np.testing.assert_allclose(down, [0.0, np.hypot(0.1, 0.2)])


def test_band_coverage_is_normalisation_free() -> None:
    data = (np.array([20.0, 30.0, 50.0]), np.array([20.0, 30.0, 50.0]))
    nominal = (np.array([3.0, 3.0, 4.0]), np.array([0.1, 0.1, 0.1]))
    variation = np.array([2.6, 3.0, 4.4])
    scaled = (nominal[0] * 10, nominal[1] * 100)  # weights x 10: variances x 100
    assert band_coverage(data, nominal, {"v_up": variation}) == band_coverage(
        data, scaled, {"v_up": variation * 7}
    )


def test_perfect_calibration_covers_68_and_90_percent() -> None:
    # data and MC drawn from the same shape: the one-sigma coverage is P(|z| < 1) = 68.3 %,
    # the 90 % interval covers 90 % (the scale of docs/methods.md), up to the normalisation:
    # a unit-area fraction varies by p (1 - p) / N, the Poisson error says p / N, so bin i is
    # covered with P(|z| < z0 / sqrt(1 - p_i)) (a little more)
    from scipy import stats

    rng = np.random.default_rng(11)
    shape = rng.dirichlet(np.full(20, 5.0))
    inside = inside90 = used = 0
    for _ in range(2000):
        d = rng.multinomial(30000, shape).astype(float)
        n = rng.multinomial(30000, shape).astype(float)
        i, u = band_coverage((d, d), (n, n), {})
        i90, _ = band_coverage((d, d), (n, n), {}, z=1.6449)
        inside, inside90, used = inside + i, inside90 + i90, used + u
    expected = {z0: np.mean(2 * stats.norm.cdf(z0 / np.sqrt(1 - shape)) - 1) for z0 in (1, 1.6449)}
    assert 0.683 < expected[1] < 0.70
    assert 0.90 < expected[1.6449] < 0.915
    assert inside / used == pytest.approx(expected[1], abs=0.007)  # 3 sigma of 40000 bins
    assert inside90 / used == pytest.approx(expected[1.6449], abs=0.0045)


histograms = hnp.arrays(np.float64, 12, elements=st.floats(0.0, 1e4))


@settings(max_examples=60, deadline=None)
@given(histograms, histograms, st.lists(histograms, max_size=3), histograms)
def test_band_coverage_properties(
    d: np.ndarray, n: np.ndarray, variations: list[np.ndarray], extra: np.ndarray
) -> None:
    d, n = d + 1.0, n + 1.0  # every bin filled, sums positive
    named = {f"v{i}_up": v + 1.0 for i, v in enumerate(variations)}
    inside, used = band_coverage((d, d), (n, n), named)
    assert used == 12
    assert 0 <= inside <= used
    # another source only widens the band; a wider interval only covers more
    more, _ = band_coverage((d, d), (n, n), {**named, "extra_up": extra + 1.0})
    assert more >= inside
    assert band_coverage((d, d), (n, n), named, z=1.645)[0] >= inside
    # the data as the nominal are inside in every bin
    assert band_coverage((d, d), (d, d), named) == (12, 12)
    # the band is never narrower than the largest single shift (the envelope)
    nf = n / n.sum()
    shapes = {k: v / v.sum() for k, v in named.items()}
    down, up = variation_band(nf, shapes)
    for v in shapes.values():
        assert np.all(up >= v - nf - 1e-15)
        assert np.all(down >= nf - v - 1e-15)


# ----------------------------------------------------------------------------- mantissa


@pytest.fixture(scope="module")
def real_jets() -> dict[str, np.ndarray]:
    """Tagger columns of the real NanoAOD v15 file, read by coffea NanoEvents."""
    events = NanoEventsFactory.from_root(
        {str(REAL): "Events"}, schemaclass=NanoAODSchema, mode="virtual"
    ).events()
    fields = [*get_adapter("deepjet").columns, *get_adapter("upart").columns]
    return {f: ak.to_numpy(ak.flatten(events.Jet[f])) for f in fields}


def test_detect_mantissa_bits_real_nanoaod(real_jets: dict[str, np.ndarray]) -> None:
    deepjet = np.stack([real_jets[c] for c in get_adapter("deepjet").columns], axis=1)
    assert deepjet.shape == (1636, 3)
    assert detect_mantissa_bits(deepjet) == 10
    # the v15 UParT columns keep two more bits (and hold -1 for jets it did not evaluate)
    upart = np.stack([real_jets[c] for c in get_adapter("upart").columns], axis=1)
    assert (upart == -1).any()
    assert detect_mantissa_bits(upart) == 12


def test_detect_mantissa_bits_synthetic() -> None:
    rng = np.random.default_rng(3)
    x = rng.random(5000).astype(np.float32)
    assert detect_mantissa_bits(x) is None  # full float32
    for bits in (4, 7, 10, 16):
        assert detect_mantissa_bits(quantise_mantissa(x, bits)) == bits
    assert detect_mantissa_bits(np.zeros(10)) is None
    assert detect_mantissa_bits(np.array([np.nan, 0.0, 0.5, 1.0])) == 4  # 0.5, 1 need no bits
    assert detect_mantissa_bits(quantise_mantissa(x, 16), max_bits=12) is None


# ----------------------------------------------------------------------------- requantise


def test_requantise_onto_the_real_grid(real_jets: dict[str, np.ndarray]) -> None:
    adapter = get_adapter("deepjet")
    probs, valid = adapter.to_simplex(real_jets)
    probs = probs[valid]
    # a smooth calibration-like shift in ILR space moves every jet off the 10-bit grid
    moved = np.asarray(geometry.ilr_inv(np.asarray(geometry.ilr(probs)) + np.array([0.13, -0.07])))
    out = requantise(adapter, moved, 10)
    assert out.shape == moved.shape
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-12)
    cols = adapter.from_simplex(out)
    for c in ("btagDeepFlavB", "btagDeepFlavCvL"):  # the trio's independent columns
        np.testing.assert_allclose(cols[c], quantise_mantissa(cols[c], 10), rtol=0, atol=1e-9)
    raw_moved = adapter.from_simplex(moved)
    assert not np.allclose(
        raw_moved["btagDeepFlavB"],
        quantise_mantissa(raw_moved["btagDeepFlavB"], 10),
        rtol=0,
        atol=1e-9,
    )
    # the rounding moves each column by at most half a grid step (2^-11 relative)
    for c in ("btagDeepFlavB", "btagDeepFlavCvL"):
        step = np.abs(raw_moved[c]) * 2.0**-10
        assert np.all(np.abs(cols[c] - raw_moved[c]) <= step + 1e-12)
    # the same bits the data carry: detect_mantissa_bits agrees, and rounding is idempotent
    stacked = np.stack([cols[c] for c in adapter.columns[:2]], axis=1)
    assert detect_mantissa_bits(stacked) == 10
    np.testing.assert_array_equal(requantise(adapter, out, 10), out)


def test_requantise_full_precision_and_invalid_rows() -> None:
    adapter = get_adapter("deepjet")
    p = np.array([[0.7, 0.2, 0.1], [np.nan, 0.5, 0.5], [0.2, 0.3, 0.5]])
    assert requantise(adapter, p, None) is p
    out = requantise(adapter, p, 4)
    assert np.array_equal(out[1], p[1], equal_nan=True)  # not a valid tagger output: kept
    # 4 bits: B = 0.7 -> 0.6875 (11/16), CvL = 2/3 -> 0.65625 (21/32)
    np.testing.assert_allclose(out[0], [0.6875, 0.65625 * 0.3125, (1 - 0.65625) * 0.3125])
    assert np.array_equal(out[2], [0.203125, 0.375 * 0.796875, 0.625 * 0.796875])
