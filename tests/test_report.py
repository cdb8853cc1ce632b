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
    # sigma per bin = sqrt(1/100^2 + 1/100^2) = 0.01414
    variation = np.array([25.0, 30.0, 45.0, 0.0])  # shape (0.25, 0.3, 0.45, 0)
    # bin 0: envelope [0.25, 0.30] +- 0.014 misses 0.2; bin 1: inside; bin 2: [0.4, 0.45]
    # +- 0.014 misses 0.5; bin 3 is empty in both and not counted
    assert band_coverage(data, nominal, [variation]) == (1, 3)
    wide = np.array([18.0, 30.0, 52.0, 0.0])  # widens the envelope over bins 0 and 2
    assert band_coverage(data, nominal, [variation, wide]) == (3, 3)
    # without variations only the statistical error counts
    assert band_coverage(data, nominal, []) == (1, 3)
    # large statistical errors cover everything
    loud = (data[0], np.array([400.0, 400.0, 400.0, 0.0]))
    assert band_coverage(loud, nominal, []) == (3, 3)


def test_band_coverage_is_normalisation_free() -> None:
    data = (np.array([20.0, 30.0, 50.0]), np.array([20.0, 30.0, 50.0]))
    nominal = (np.array([3.0, 3.0, 4.0]), np.array([0.1, 0.1, 0.1]))
    variation = np.array([2.6, 3.0, 4.4])
    scaled = (nominal[0] * 10, nominal[1] * 100)  # weights x 10: variances x 100
    assert band_coverage(data, nominal, [variation]) == band_coverage(data, scaled, [variation * 7])


histograms = hnp.arrays(np.float64, 12, elements=st.floats(0.0, 1e4))


@settings(max_examples=60, deadline=None)
@given(histograms, histograms, st.lists(histograms, max_size=3), histograms)
def test_band_coverage_properties(
    d: np.ndarray, n: np.ndarray, variations: list[np.ndarray], extra: np.ndarray
) -> None:
    d, n = d + 1.0, n + 1.0  # every bin filled, sums positive
    variations = [v + 1.0 for v in variations]
    inside, used = band_coverage((d, d), (n, n), variations)
    assert used == 12
    assert 0 <= inside <= used
    # another variation only widens the envelope
    more, _ = band_coverage((d, d), (n, n), [*variations, extra + 1.0])
    assert more >= inside
    # the data as the nominal are inside in every bin
    assert band_coverage((d, d), (d, d), variations) == (12, 12)


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
