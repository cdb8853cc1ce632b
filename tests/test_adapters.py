from __future__ import annotations

from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from coffea_otcal import geometry as g
from coffea_otcal.adapters import ADAPTERS, get_adapter

NANO_V15 = Path(__file__).parent / "data" / "nano_tt_v15.root"


def _columns(adapter):
    tree = uproot.open(NANO_V15)["Events"]
    return {c: ak.to_numpy(ak.flatten(tree[f"Jet_{c}"].array())) for c in adapter.columns}


def test_deepjet_on_real_nanoaod_is_on_simplex_and_finite_in_ilr():
    ad = get_adapter("deepjet")
    probs, valid = ad.to_simplex(_columns(ad))
    assert probs.shape == (1636, 3)
    assert valid.all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    clipped = g.clip_simplex(probs)
    assert np.all((clipped > 0) & (clipped < 1))
    assert np.all(np.isfinite(g.ilr(probs)))


@pytest.mark.parametrize("name", ["upart", "pnet"])
def test_upart_and_pnet_flag_the_378_default_jets(name):
    ad = get_adapter(name)
    cols = _columns(ad)
    probs, valid = ad.to_simplex(cols)
    assert (~valid).sum() == 378
    assert np.all(cols[ad.columns[0]][~valid] == -1)
    np.testing.assert_allclose(probs[~valid], 1 / 3)


def test_trio_round_trip_on_real_file_reproduces_columns():
    ad = get_adapter("deepjet")
    cols = _columns(ad)
    probs, _ = ad.to_simplex(cols)
    back = ad.from_simplex(probs)
    np.testing.assert_allclose(back["btagDeepFlavB"], cols["btagDeepFlavB"], atol=1e-12)
    np.testing.assert_allclose(back["btagDeepFlavCvL"], cols["btagDeepFlavCvL"], atol=1e-12)
    # CvB is a consistency check of the six-class reconstruction (README: ~5e-4).
    np.testing.assert_allclose(back["btagDeepFlavCvB"], cols["btagDeepFlavCvB"], atol=1e-3)


@settings(max_examples=50, deadline=None)
@given(
    p=arrays(np.float64, (16, 3), elements=st.floats(1e-4, 1.0)).map(
        lambda x: x / x.sum(axis=1, keepdims=True)
    )
)
def test_trio_from_then_to_simplex_is_identity(p):
    ad = get_adapter("upart")
    q, valid = ad.to_simplex(ad.from_simplex(p))
    assert valid.all()
    np.testing.assert_allclose(q, p, atol=1e-12)


def test_gn2_probabilities_with_subcomposition_and_total():
    ad = get_adapter("gn2")
    cols = {"GN2v01_pb": [0.5, np.nan], "GN2v01_pc": [0.2, 0.3], "GN2v01_pu": [0.2, 0.7]}
    probs, valid = ad.to_simplex(cols)
    assert valid.tolist() == [True, False]
    np.testing.assert_allclose(probs[0], [5 / 9, 2 / 9, 2 / 9])
    back = ad.from_simplex(probs[:1], total=[0.9])
    np.testing.assert_allclose(back["GN2v01_pb"], [0.5])


def test_generic_adapter_with_user_columns_and_trio_kind():
    ad = get_adapter("generic", columns=["pb", "pc", "pu", "ptau"], classes=["b", "c", "u", "tau"])
    probs, valid = ad.to_simplex({"pb": [0.1], "pc": [0.2], "pu": [0.3], "ptau": [0.4]})
    assert ad.n_classes == 4
    assert valid.all()
    np.testing.assert_allclose(probs, [[0.1, 0.2, 0.3, 0.4]])
    trio = get_adapter("generic", kind="trio", columns=["B", "CvL", "CvB"])
    probs, _ = trio.to_simplex({"B": [0.5], "CvL": [0.5], "CvB": [0.2]})
    np.testing.assert_allclose(probs, [[0.5, 0.25, 0.25]])


def test_out_of_range_values_are_flagged_not_clipped():
    ad = get_adapter("deepjet")
    probs, valid = ad.to_simplex(
        {"btagDeepFlavB": [1.5, 0.2, 1.0], "btagDeepFlavCvL": [0.5, np.inf, 0.0], "btagDeepFlavCvB": [0.5, 0.5, 0.0]}
    )
    assert valid.tolist() == [False, False, True]
    np.testing.assert_allclose(probs[2], [1.0, 0.0, 0.0])


def test_saturated_b_takes_the_b_to_c_ratio_from_cvb():
    # B stored as exactly 1: 1 - B is lost, CvB = c / (c + b) keeps p_c / p_b
    ad = get_adapter("deepjet", mantissa_bits=10)
    pc, pl = 2.0e-4, 1.0e-7
    pb = 1.0 - pc - pl
    cols = {"btagDeepFlavB": [1.0], "btagDeepFlavCvL": [pc / (pc + pl)],
            "btagDeepFlavCvB": [pc / (pc + pb)]}
    probs, valid = ad.to_simplex(cols)
    assert valid.all()
    np.testing.assert_allclose(probs[0], [pb, pc, pl], rtol=1e-9)
    # without mantissa_bits (float32 storage) a B of exactly 1 still takes the CvB route
    np.testing.assert_allclose(get_adapter("deepjet").to_simplex(cols)[0][0], [pb, pc, pl], rtol=1e-9)


def test_cvb_route_agrees_with_b_route_on_real_nanoaod():
    ad = get_adapter("deepjet")
    raw = _columns(ad)
    b, cvl, cvb = (np.asarray(raw[c], dtype=np.float64) for c in ad.columns)
    ok = (b > 0.05) & (b < 0.95) & (cvl > 0.05) & (cvl < 0.95)
    rest_b = 1.0 - b[ok]
    q = cvb[ok] / (1.0 - cvb[ok])
    rest_cvb = q / (cvl[ok] + q)
    assert ok.sum() > 500
    # the two routes agree to the 10-bit storage precision
    assert np.percentile(np.abs(rest_cvb / rest_b - 1.0), 99) < 3e-3
    saturated = (1.0 - b) < 2.0**-6
    assert 100 < saturated.sum() < 200  # 126 DeepJet jets: the route matters on real data
    probs, _ = get_adapter("deepjet", mantissa_bits=10).to_simplex(raw)
    assert np.all(probs[saturated, 1] > 0)
    assert np.all(probs[saturated, 2] > 0)


def test_dequantisation_stays_in_the_rounding_cell_and_is_deterministic():
    from coffea_otcal.latent_tagger import quantise_mantissa

    rng = np.random.default_rng(4)
    p = rng.dirichlet([0.3, 0.3, 0.3], size=5000)
    cols = {k: quantise_mantissa(v, 10) for k, v in get_adapter("deepjet").from_simplex(p).items()}
    cols |= {"pt": rng.uniform(20, 200, 5000).astype(np.float32),
             "eta": rng.uniform(-2.5, 2.5, 5000).astype(np.float32)}
    plain = get_adapter("deepjet", mantissa_bits=10)
    deq = get_adapter("deepjet", mantissa_bits=10, dequantise=True)
    p0, _ = plain.to_simplex(cols)
    p1, valid = deq.to_simplex(cols)
    p2, _ = deq.to_simplex(cols)
    assert valid.all()
    np.testing.assert_array_equal(p1, p2)  # hash-seeded: the same jet gives the same point
    np.testing.assert_allclose(p1.sum(axis=1), 1.0, atol=1e-12)
    # the dequantised point rounds back to the stored B and CvL (up to double rounding
    # float64 -> float32 -> 10 bits at a cell edge; saturated B is rebuilt from CvB)
    back = deq.from_simplex(p1)
    unsat = 1.0 - cols["btagDeepFlavB"] >= 2.0**-6
    for name in ("btagDeepFlavB", "btagDeepFlavCvL"):
        same = quantise_mantissa(back[name], 10) == cols[name]
        assert same[unsat].mean() > 0.999
    # and it spreads the point masses: many distinct values where the file has few
    z0, z1 = g.ilr(p0), g.ilr(p1)
    assert len(np.unique(z1.round(9), axis=0)) > len(np.unique(z0.round(9), axis=0))
    assert np.median(np.abs(z1 - z0)) < 0.01  # a move within the storage precision
    # a stored 1 covers [1 - 2^-12, 1]: it never stays exactly 1 (no p = 0 on a vertex)
    ones = {"btagDeepFlavB": np.ones(1000), "btagDeepFlavCvL": np.ones(1000),
            "btagDeepFlavCvB": np.linspace(1e-5, 1e-3, 1000),
            "pt": np.full(1000, 50.0), "eta": np.linspace(-2, 2, 1000)}
    p_ones, _ = deq.to_simplex(ones)
    assert np.all(p_ones[:, 2] > 0)
    assert np.all(p_ones[:, 2] <= 2.0**-12 * p_ones[:, 1] / (1 - 2.0**-12) + 1e-18)
    # jets with identical stored scores but different kinematics land on different points
    # (a hash of the scores alone would leave the repeated triples as point masses)
    same = {"btagDeepFlavB": np.full(1000, 0.99951172), "btagDeepFlavCvL": np.full(1000, 0.5),
            "btagDeepFlavCvB": np.full(1000, 4.88e-4), "pt": np.linspace(20, 300, 1000),
            "eta": np.zeros(1000)}
    p_same, _ = deq.to_simplex(same)
    assert len(np.unique(p_same[:, 0])) == 1000
    # spread over the whole CvB rounding cell (relative width 2^-11 at this value)
    assert np.ptp(np.log(p_same[:, 1])) > 0.9 * 2.0**-11
    with pytest.raises(KeyError, match=r"key columns \['pt', 'eta'\].*\['pt', 'eta'\] are missing"):
        deq.to_simplex({k: v for k, v in same.items() if k not in ("pt", "eta")})
    custom = get_adapter("deepjet", mantissa_bits=10, dequantise=True, key_columns=["event"])
    assert custom.read_columns == ("btagDeepFlavB", "btagDeepFlavCvL", "btagDeepFlavCvB", "event")
    assert plain.read_columns == plain.columns
    with pytest.raises(ValueError, match="dequantise=True needs mantissa_bits"):
        get_adapter("deepjet", dequantise=True)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown tagger adapter 'foo'"):
        get_adapter("foo")
    with pytest.raises(KeyError, match="btagDeepFlavCvL"):
        get_adapter("deepjet").to_simplex({"btagDeepFlavB": [0.1]})
    with pytest.raises(ValueError, match="columns"):
        get_adapter("generic")
    with pytest.raises(TypeError, match="unknown options"):
        get_adapter("deepjet", colums=["a"])
    assert {"deepjet", "upart", "pnet", "gn2", "dl1d", "generic"} <= set(ADAPTERS)
