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
    assert ad.n_classes == 4 and valid.all()
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


def test_b_of_exactly_one_keeps_the_cvl_information():
    ad = get_adapter("deepjet", vertex_gap=2.0**-13)
    probs, _ = ad.to_simplex(
        {"btagDeepFlavB": [1.0, 1.0], "btagDeepFlavCvL": [0.9, 0.1], "btagDeepFlavCvB": [0.0, 0.0]}
    )
    np.testing.assert_allclose(g.d_cl(probs), [0.9, 0.1], rtol=1e-9)
    np.testing.assert_allclose(probs[:, 0], 1.0 - 2.0**-13)
    off, _ = get_adapter("deepjet").to_simplex(
        {"btagDeepFlavB": [1.0], "btagDeepFlavCvL": [0.9], "btagDeepFlavCvB": [0.0]}
    )
    np.testing.assert_allclose(off, [[1.0, 0.0, 0.0]])


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
