"""Tests of the numpy / awkward applier against the torch potentials and its pass-through rules."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffea_otcal.adapters import get_adapter
from coffea_otcal.applier import (
    STATUS_BAD_CONTEXT,
    STATUS_CALIBRATED,
    STATUS_DATA,
    STATUS_INVALID_SCORE,
    STATUS_NO_MAP,
    Calibrator,
    jet_record,
    status_counts,
    transform_context,
)
from coffea_otcal.bundle import Bundle
from coffea_otcal.geometry import ilr, ilr_inv
from test_bundle import PT_CONTEXT, make_bundle

DEEPJET = ("btagDeepFlavB", "btagDeepFlavCvL", "btagDeepFlavCvB")


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return make_bundle()


@pytest.fixture(scope="module")
def calibrator(bundle: Bundle) -> Calibrator:
    return Calibrator(bundle)


def random_jets(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Flat DeepJet-like jet columns (float32 scores, quantised like NanoAOD)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet([0.6, 0.4, 0.8], n)
    cols = {k: v.astype(np.float32) for k, v in get_adapter("deepjet").from_simplex(p).items()}
    special = [1.0, 0.0, 0.999512, 0.5, 1e-7]  # vertices and quantised values
    cols["btagDeepFlavB"][: len(special)] = special[:n]
    cols["hadronFlavour"] = rng.choice(np.array([0, 4, 5], dtype=np.uint8), n)
    cols["pt"] = rng.uniform(15.0, 1200.0, n).astype(np.float32)
    cols["eta"] = rng.uniform(-2.7, 2.7, n).astype(np.float32)
    return cols


def torch_map(export: dict, z: np.ndarray, context: np.ndarray) -> np.ndarray:
    """T(z|c) = m + s grad g((z-m)/s | (c-cm)/cs) with torch AUTOGRAD on the torch module."""
    import torch

    from coffea_otcal.potentials import potential_from_export

    module = potential_from_export(export["potential"])
    pre = export["preprocessing"]
    m = torch.tensor(pre["shift"], dtype=torch.float64)
    s = pre["scale"]
    x = ((torch.tensor(z) - m) / s).requires_grad_(True)
    c = (torch.tensor(context) - torch.tensor(pre["context_shift"])) / torch.tensor(
        pre["context_scale"]
    )
    (grad,) = torch.autograd.grad(module(x, c).sum(), x)
    return (m + s * grad).detach().numpy()


def test_numpy_map_agrees_with_torch_autograd(bundle: Bundle, calibrator: Calibrator) -> None:
    cols = random_jets(500)
    z = ilr(get_adapter("deepjet").to_simplex(cols)[0])
    ctx, _, _ = transform_context(bundle.context, cols)
    worst = 0.0
    for entry in bundle.maps:
        ours = calibrator.calibrate_ilr(z, entry.flavour, cols, entry.variation)
        ref = torch_map(entry.map.model_dump(mode="json"), z, ctx)
        worst = max(worst, float(np.max(np.abs(ours - ref))))
        assert np.max(np.abs(ours - z)) > 1e-3  # the maps really move the jets
    assert worst < 1e-6


def test_float32_evaluation_is_close(bundle: Bundle, calibrator: Calibrator) -> None:
    cols = random_jets(300, seed=1)
    z = ilr(get_adapter("deepjet").to_simplex(cols)[0])
    fast = Calibrator(bundle, dtype="float32").calibrate_ilr(z, 5, cols)
    exact = calibrator.calibrate_ilr(z, 5, cols)
    assert fast.dtype == np.float64
    np.testing.assert_allclose(fast, exact, atol=1e-4)


def test_numpy_flat_jagged_and_pickled_are_identical(calibrator: Calibrator) -> None:
    cols = random_jets(400, seed=2)
    ref = calibrator.calibrate_columns(cols)
    flat = calibrator.calibrate_jets(ak.zip(cols))
    counts = np.array([0, 5, 1, 0, 394])
    jagged = calibrator.calibrate_jets(ak.unflatten(ak.zip(cols), counts))
    clone = pickle.loads(pickle.dumps(calibrator))
    assert clone is not calibrator
    pickled = clone.calibrate_jets(ak.unflatten(ak.zip(cols), counts))
    assert str(ak.type(jagged)).startswith("5 * var * {")
    assert ak.num(jagged).tolist() == counts.tolist()
    for name in ("btagDeepFlavB_otcal", "p_c_otcal", "otcal_status", "otcal_clamped"):
        for other in (
            ak.to_numpy(flat[name]),
            ak.to_numpy(ak.flatten(jagged[name])),
            ak.to_numpy(ak.flatten(pickled[name])),
        ):
            np.testing.assert_array_equal(other, ref[name])
    for direction in ("up", "down"):
        for col in (*DEEPJET, "p_b"):
            expect = ref["OTCAL_comp"][direction][col]
            np.testing.assert_array_equal(ak.to_numpy(flat.OTCAL_comp[direction][col]), expect)
            np.testing.assert_array_equal(
                ak.to_numpy(ak.flatten(pickled.OTCAL_comp[direction][col])), expect
            )


def test_pickle_is_the_bundle_json(calibrator: Calibrator) -> None:
    payload = pickle.dumps(calibrator)
    assert (
        b'"format":"coffea-otcal-bundle"' in payload
        or b'"format": "coffea-otcal-bundle"' in payload
    )
    assert b"numpy" not in payload.split(b"coffea-otcal-bundle")[0]


def test_outputs_live_on_the_simplex_and_match_tagger_columns(calibrator: Calibrator) -> None:
    cols = random_jets(1000, seed=3)
    out = calibrator.calibrate_columns(cols)
    for fields in (
        {k[:-6]: v for k, v in out.items() if k.endswith("_otcal")},
        out["OTCAL_comp"]["up"],
        out["OTCAL_comp"]["down"],
    ):
        p = np.stack([fields["p_b"], fields["p_c"], fields["p_light"]], axis=-1)
        assert np.all((p > 0) & (p < 1))
        np.testing.assert_allclose(p.sum(axis=-1), 1.0, atol=1e-12)
        np.testing.assert_allclose(fields["btagDeepFlavB"], p[:, 0], atol=1e-15)
        np.testing.assert_allclose(
            fields["btagDeepFlavCvL"], p[:, 1] / (p[:, 1] + p[:, 2]), rtol=1e-12
        )
        np.testing.assert_allclose(
            fields["btagDeepFlavCvB"], p[:, 1] / (p[:, 1] + p[:, 0]), rtol=1e-12
        )
    assert not np.allclose(out["p_b_otcal"], out["OTCAL_comp"]["up"]["p_b"])


def test_probs_path_equals_ilr_path(bundle: Bundle, calibrator: Calibrator) -> None:
    cols = random_jets(200, seed=4)
    p = get_adapter("deepjet").to_simplex(cols)[0]
    flav = cols["hadronFlavour"].astype(int)
    out = calibrator.calibrate_columns(cols, variations=[])
    assert not any(k.startswith("OTCAL_") for k in out)
    for code in (5, 4, 0):
        sel = flav == code
        kin = {"pt": cols["pt"][sel], "eta": cols["eta"][sel]}
        direct = calibrator.calibrate_probs(p[sel], code, kin)
        np.testing.assert_allclose(direct[:, 0], out["p_b_otcal"][sel], rtol=0, atol=1e-15)
        via_ilr = ilr_inv(calibrator.calibrate_ilr(ilr(p[sel]), code, kin))
        np.testing.assert_array_equal(direct, via_ilr)


def test_data_jets_are_never_moved(calibrator: Calibrator) -> None:
    cols = random_jets(300, seed=5)
    del cols["hadronFlavour"]
    out = calibrator.calibrate_columns(cols, is_data=True)
    assert set(np.unique(out["otcal_status"])) == {STATUS_DATA}
    for col in DEEPJET:
        np.testing.assert_array_equal(out[f"{col}_otcal"], cols[col].astype(np.float64))
        np.testing.assert_array_equal(out["OTCAL_comp"]["down"][col], cols[col].astype(np.float64))
    with pytest.raises(KeyError, match="'hadronFlavour' is missing from the MC jets"):
        calibrator.calibrate_columns(cols)


def test_per_jet_problems_pass_through_and_are_counted(calibrator: Calibrator) -> None:
    cols = random_jets(12, seed=6)
    cols["hadronFlavour"][:] = 5
    cols["pt"][:], cols["eta"][:] = 50.0, 0.5
    cols["btagDeepFlavB"][0] = -1.0  # tagger default
    cols["btagDeepFlavCvL"][1] = np.nan
    cols["btagDeepFlavCvB"][2] = np.inf  # every column must be valid
    cols["hadronFlavour"][3] = 15  # no map for taus
    cols["pt"][4] = np.nan  # bad context
    cols["eta"][5] = -np.inf
    cols["pt"][6] = 5000.0  # clamped to 1000 GeV
    cols["eta"][7] = -4.0  # clamped to |eta| = 2.5
    out = calibrator.calibrate_columns(cols)
    expect = [2, 2, 2, 3, 4, 4, 0, 0, 0, 0, 0, 0]
    assert out["otcal_status"].tolist() == expect
    assert np.flatnonzero(out["otcal_clamped"]).tolist() == [6, 7]
    unchanged = np.array(expect) != STATUS_CALIBRATED
    for col in DEEPJET:
        orig = cols[col].astype(np.float64)
        np.testing.assert_array_equal(out[f"{col}_otcal"][unchanged], orig[unchanged])
        assert np.all(out[f"{col}_otcal"][~unchanged] != orig[~unchanged])
    assert np.isnan(out["p_b_otcal"][:3]).all()
    assert status_counts(out["otcal_status"], out["otcal_clamped"]) == {
        "calibrated": 6,
        "data": 0,
        "invalid_score": 3,
        "no_map": 1,
        "bad_context": 2,
        "clamped": 2,
    }
    assert (STATUS_INVALID_SCORE, STATUS_NO_MAP, STATUS_BAD_CONTEXT) == (2, 3, 4)


def test_clamped_context_equals_edge_value(calibrator: Calibrator) -> None:
    cols = random_jets(4, seed=7)
    cols["hadronFlavour"][:] = 4
    beyond = {
        **cols,
        "pt": np.array([3000.0, 5.0, 100.0, 100.0]),
        "eta": np.array([0.1, 0.1, 3.0, -9.0]),
    }
    edges = {
        **cols,
        "pt": np.array([1000.0, 20.0, 100.0, 100.0]),
        "eta": np.array([0.1, 0.1, 2.5, 2.5]),
    }
    a, b = calibrator.calibrate_columns(beyond), calibrator.calibrate_columns(edges)
    np.testing.assert_array_equal(a["p_b_otcal"], b["p_b_otcal"])
    assert a["otcal_clamped"].all()
    assert not b["otcal_clamped"].any()


def test_transform_context_from_array() -> None:
    spec = make_bundle().context
    ctx, clamped, bad = transform_context(
        spec, np.array([[50.0, -1.0], [2000.0, 0.5], [np.nan, 0.0]])
    )
    np.testing.assert_allclose(ctx[:2], [[np.log(50.0), 1.0], [np.log(1000.0), 0.5]])
    assert clamped.tolist() == [False, True, False]
    assert bad.tolist() == [False, False, True]
    with pytest.raises(ValueError, match=r"expected \(n, 2\) with columns \['pt', 'eta'\]"):
        transform_context(spec, np.zeros((3, 3)))


def test_bad_arguments(calibrator: Calibrator) -> None:
    cols = random_jets(10, seed=8)
    with pytest.raises(KeyError, match=r"unknown variations \['jes'\]"):
        calibrator.calibrate_columns(cols, variations=["jes"])
    with pytest.raises(KeyError, match="needs the jet column 'btagDeepFlavCvB'"):
        calibrator.calibrate_columns({k: v for k, v in cols.items() if k != "btagDeepFlavCvB"})
    with pytest.raises(KeyError, match=r"jet fields \['eta'\] needed by the bundle are missing"):
        calibrator.calibrate_jets(ak.zip({k: v for k, v in cols.items() if k != "eta"}))
    with pytest.raises(ValueError, match=r"z must have shape \(n, 2\)"):
        calibrator.calibrate_ilr(np.zeros((3, 3)), 5, cols)
    with pytest.raises(ValueError, match="context rows are NaN/inf"):
        calibrator.calibrate_ilr(np.zeros((2, 2)), 5, np.array([[np.nan, 0.0], [30.0, 0.0]]))
    with pytest.raises(KeyError, match="no map for flavour 15"):
        calibrator.calibrate_ilr(np.zeros((2, 2)), 15, np.ones((2, 2)) * 30)


def test_bundle_without_context_and_with_gn2_adapter() -> None:
    spec = {
        "name": "generic",
        "options": {"columns": ["pb", "pc", "pu"], "classes": ["b", "c", "light"]},
    }
    cal = Calibrator(make_bundle(context=(), variations={}, flavours=(5, 0), adapter=spec))
    rng = np.random.default_rng(9)
    p = rng.dirichlet([1, 1, 1], 50)
    cols = {"pb": p[:, 0], "pc": p[:, 1], "pu": p[:, 2], "hadronFlavour": np.repeat([5, 4], 25)}
    out = cal.calibrate_columns(cols)
    assert out["otcal_status"].tolist() == [0] * 25 + [3] * 25
    np.testing.assert_allclose(out["pb_otcal"] + out["pc_otcal"] + out["pu_otcal"], 1.0)
    np.testing.assert_array_equal(out["pc_otcal"][25:], p[25:, 1])
    with pytest.raises(ValueError, match="is unconditional; pass context=None"):
        cal.fitted_map(5).transport(ilr(p[:2]), np.ones((2, 1)))


def test_adapter_classes_must_match_bundle() -> None:
    spec = {
        "name": "generic",
        "options": {"columns": ["pb", "pc", "pu"], "classes": ["c", "b", "light"]},
    }
    with pytest.raises(ValueError, match="differ from the classes"):
        Calibrator(make_bundle(context=(), variations={}, flavours=(5,), adapter=spec))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(-4, 4), min_size=4, max_size=4),
    st.floats(20.0, 1000.0),
)
def test_map_is_monotone(calibrator: Calibrator, xy: list[float], pt: float) -> None:
    """Brenier maps are gradients of convex potentials: (T(x) - T(y)) . (x - y) >= 0."""
    z = np.array([xy[:2], xy[2:]])
    kin = {"pt": np.array([pt, pt]), "eta": np.array([0.3, 0.3])}
    for code in (5, 4, 0):
        t = calibrator.calibrate_ilr(z, code, kin)
        assert float((t[0] - t[1]) @ (z[0] - z[1])) >= -1e-12


def test_loading_and_applying_needs_neither_torch_nor_dask(bundle: Bundle, tmp_path: Path) -> None:
    path = bundle.save(tmp_path / "b.json.gz")
    code = f"""
import sys
for name in ("torch", "dask", "distributed", "zuko", "dask_awkward"):
    sys.modules[name] = None
import numpy as np, awkward as ak
from coffea_otcal.applier import Calibrator
cal = Calibrator({str(path)!r})
jets = ak.Array([[{{"btagDeepFlavB": 0.7, "btagDeepFlavCvL": 0.4, "btagDeepFlavCvB": 0.2,
                  "hadronFlavour": 5, "pt": 60.0, "eta": 1.0}}]])
out = cal.calibrate_jets(jets)
assert out.otcal_status.tolist() == [[0]], out.otcal_status.tolist()
print(float(out.btagDeepFlavB_otcal[0, 0]))
"""
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr
    cal = Calibrator(bundle)
    expect = cal.calibrate_columns(
        {
            "btagDeepFlavB": [0.7],
            "btagDeepFlavCvL": [0.4],
            "btagDeepFlavCvB": [0.2],
            "hadronFlavour": [5],
            "pt": [60.0],
            "eta": [1.0],
        }
    )["btagDeepFlavB_otcal"][0]
    assert float(res.stdout) == pytest.approx(expect, abs=1e-15)


def test_calibrator_from_path_and_repr(bundle: Bundle, tmp_path: Path) -> None:
    cal = Calibrator(bundle.save(tmp_path / "b.json"))
    assert cal.columns == DEEPJET
    assert cal.input_columns == (*DEEPJET, "hadronFlavour", "pt", "eta")
    assert "variations=['comp']" in repr(cal)
    assert PT_CONTEXT["column"] in cal.input_columns


def test_jet_record_builds_the_zip_and_unflatten_layout() -> None:
    rng = np.random.default_rng(11)
    fields = {
        "a": rng.normal(size=9),
        "s": rng.integers(0, 4, 9).astype(np.int8),
        "OTCAL_v": {"up": {"a": rng.normal(size=9)}, "down": {"a": rng.normal(size=9)}},
    }
    counts = np.array([2, 0, 4, 3])
    got = jet_record(fields, counts)
    nested = {
        k: ak.zip({d: ak.zip(v[d]) for d in v}, depth_limit=1) if isinstance(v, dict) else v
        for k, v in fields.items()
    }
    ref = ak.unflatten(ak.zip(nested, depth_limit=1), counts)
    assert str(got.type) == str(ref.type)
    assert str(got.type) == (
        "4 * var * {a: float64, s: int8, OTCAL_v: {up: {a: float64}, down: {a: float64}}}"
    )
    assert ak.array_equal(got, ref)
    flat = jet_record(fields)
    assert len(flat) == 9
    assert flat.OTCAL_v.down.a.tolist() == fields["OTCAL_v"]["down"]["a"].tolist()
    with pytest.raises(ValueError, match="counts add up to 10 jets, the columns hold 9"):
        jet_record(fields, np.array([10]))
    with pytest.raises(ValueError, match=r"different lengths: \[9, 3\]"):
        jet_record({"a": fields["a"], "b": np.zeros(3)})


def test_maps_equal_to_their_nominal_are_evaluated_once() -> None:
    """A variation published as a copy of a flavour's nominal map (the pipeline does this
    where the variation leaves that flavour's target unchanged) is not evaluated again,
    and every output equals the per-map evaluation."""
    from test_bundle import ETA_CONTEXT, fitted_map

    names = ["nominal", "a_up", "a_down", "b_up", "b_down"]
    distinct = {(code, name): fitted_map(100 * i + j, 2)
                for i, code in enumerate((5, 4, 0)) for j, name in enumerate(names)}
    maps = dict(distinct)
    # variation a: a copy of the nominal for b and light jets (new label, same content);
    # variation b: a copy of the nominal for every flavour
    for code in (5, 0):
        for name in ("a_up", "a_down"):
            maps[code, name] = {**distinct[code, "nominal"], "name": f"{code}/{name}"}
    for code in (5, 4, 0):
        for name in ("b_up", "b_down"):
            maps[code, name] = distinct[code, "nominal"]
    bundle = Bundle.from_maps(maps, ["b", "c", "light"], "deepjet",
                              [PT_CONTEXT, ETA_CONTEXT],
                              {"a": "partly shared", "b": "all shared"}, {"seed": 1})
    cal = Calibrator(bundle)
    cols = random_jets(3000, seed=11)
    out = cal.calibrate_columns(cols)
    # only the 3 nominal maps and c's two variation-a maps were built
    assert sorted(cal._maps) == sorted([(5, "nominal"), (4, "nominal"), (0, "nominal"),
                                        (4, "a_up"), (4, "a_down")])
    flav = cols["hadronFlavour"].astype(int)
    p = get_adapter("deepjet").to_simplex(cols)[0]
    reference = Calibrator(bundle)
    for var, direction in (("a", "up"), ("a", "down"), ("b", "up")):
        fields = out[f"OTCAL_{var}"][direction]
        for code in (5, 4, 0):
            sel = flav == code
            kin = {"pt": cols["pt"][sel], "eta": cols["eta"][sel]}
            expect = reference.calibrate_probs(p[sel], code, kin, f"{var}_{direction}")
            np.testing.assert_allclose(fields["p_b"][sel], expect[:, 0], rtol=0, atol=1e-15)
            np.testing.assert_allclose(fields["p_light"][sel], expect[:, 2], rtol=0, atol=1e-15)
    # variation b equals the nominal everywhere, in separate arrays
    np.testing.assert_array_equal(out["OTCAL_b"]["up"]["btagDeepFlavB"], out["btagDeepFlavB_otcal"])
    assert out["OTCAL_b"]["up"]["p_b"] is not out["p_b_otcal"]
    assert not np.shares_memory(out["OTCAL_b"]["down"]["p_c"], out["OTCAL_b"]["up"]["p_c"])
    # variation a moved the c jets differently from the nominal
    c_jets = flav == 4
    assert not np.allclose(out["OTCAL_a"]["up"]["p_c"][c_jets], out["p_c_otcal"][c_jets])
    assert cal.map_digest(5, "a_up") == cal.map_digest(5, "nominal") != cal.map_digest(4, "a_up")
