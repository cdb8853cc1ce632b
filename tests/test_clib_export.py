from __future__ import annotations

import gzip
import json
from pathlib import Path

import awkward as ak
import correctionlib
import correctionlib.schemav2 as cs
import numpy as np
import pytest
from coffea.nanoevents import NanoAODSchema, NanoEventsFactory
from hypothesis import given, settings
from hypothesis import strategies as st

from coffea_otcal import cli, geometry
from coffea_otcal.adapters import get_adapter
from coffea_otcal.applier import Calibrator
from coffea_otcal.bundle import Bundle
from coffea_otcal.clib_export import (
    ExportGrid,
    ExportMetadata,
    KinematicAxis,
    build_correction_set,
    correction_names,
    load_evaluator,
    multilinear_expression,
    systematic_keys,
    write_correction_set,
)
from coffea_otcal.export_cli import (
    bundle_grid,
    columns_from_ilr,
    evaluate_export,
    export_bundle,
    ilr_from_columns,
    measure_accuracy,
    parse_grid,
    sample_validation_jets,
)

NANO_TT = Path("/work/shared/data/nanoaod/nano_tt_v15.root")
META = ExportMetadata(tagger="toy", classes=["b", "c", "light"])
W = np.array([0.6, -0.8])


def smooth_map(z, context, flavour, systematic):
    """Gradient of a convex potential: z + 0.3 tanh(z) + 0.2 sigmoid(w.z) w + shift(pt)."""
    shift = {"central": 0.0, "up_comp": 0.1, "down_comp": -0.1}[systematic]
    pt = np.clip(context[:, 0], 20.0, 1000.0)  # clamped to the validity range, as the applier
    offset = 0.05 * np.log(pt) + shift + 0.01 * flavour
    gate = 1.0 / (1.0 + np.exp(-(z @ W)))
    return z + 0.3 * np.tanh(z) + 0.2 * gate[:, None] * W + offset[:, None]


def bilinear_map(z, context, flavour, systematic):
    """Multilinear in z: the export must reproduce it exactly (up to the kinematic bin)."""
    a = 1.0 + 0.1 * (flavour == 5) + (0.2 if systematic == "up_comp" else 0.0)
    return np.stack([a * z[:, 0] - 0.3 * z[:, 0] * z[:, 1] + 0.5, z[:, 1] + 0.2 * z[:, 0]], -1)


@pytest.fixture(scope="module")
def smooth_export():
    grid = ExportGrid(ilr_bins=16, ilr_range=(-6.0, 6.0))
    cset = build_correction_set(
        smooth_map, n_classes=3, flavours=[5, 4], identity_flavours=[0], variations=["comp"],
        grid=grid, metadata=META,
    )
    return grid, cset, load_evaluator(cset)


# --------------------------------------------------------------------------- layout


def test_layout_follows_the_btv_shape_convention(smooth_export):
    _, cset, _ = smooth_export
    assert [c.name for c in cset.corrections] == ["otcal_toy_z1", "otcal_toy_z2"]
    corr = cset.corrections[0]
    assert [(v.name, v.type) for v in corr.inputs] == [
        ("systematic", "string"), ("flavor", "int"), ("pt", "real"), ("abseta", "real"),
        ("z1", "real"), ("z2", "real"),
    ]
    assert [item.key for item in corr.data.content] == ["central", "up_comp", "down_comp"]
    flav = corr.data.content[0].value
    assert [item.key for item in flav.content] == [5, 4, 0]
    binning = flav.content[0].value
    assert isinstance(binning, cs.MultiBinning)
    assert binning.inputs == ["pt", "abseta", "z1", "z2"]
    assert binning.flow == "clamp"
    assert binning.edges[0] == [float(e) for e in (20, 30, 50, 70, 100, 140, 200, 300, 500, 1000)]
    assert binning.edges[1] == cs.UniformBinning(n=2, low=0.0, high=2.5)
    assert binning.edges[2] == cs.UniformBinning(n=16, low=-6.0, high=6.0)
    assert len(binning.content) == 9 * 2 * 16 * 16
    assert all(isinstance(leaf, cs.FormulaRef) and len(leaf.parameters) == 4
               for leaf in binning.content)
    assert corr.generic_formulas[0].expression == "[0]+y*[1]+x*([2]+y*[3])"
    assert corr.generic_formulas[0].variables == ["z1", "z2"]
    assert isinstance(flav.content[2].value, cs.Formula)  # identity for light


def test_names_and_expressions():
    assert systematic_keys(["a", "b"]) == ["central", "up_a", "down_a", "up_b", "down_b"]
    assert correction_names("deepjet", 3) == ["otcal_deepjet_z1", "otcal_deepjet_z2",
                                              "otcal_deepjet_z3"]
    assert multilinear_expression(1) == "[0]+x*[1]"
    assert multilinear_expression(3).count("+") == 7
    assert multilinear_expression(3).count("*") == 7
    with pytest.raises(ValueError, match="at most 4 variables"):
        multilinear_expression(5)
    with pytest.raises(ValueError, match="whitespace"):
        systematic_keys(["bad name"])
    with pytest.raises(ValueError, match="duplicate"):
        systematic_keys(["a", "a"])


# --------------------------------------------------------------------------- maths


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-3, 3), min_size=4, max_size=4),
    st.floats(-9.0, 9.0), st.floats(-9.0, 9.0), st.floats(20.0, 2000.0),
)
def test_multilinear_maps_are_reproduced_exactly_even_outside_the_grid(coef, z1, z2, pt):
    """Multilinear interpolation is exact for multilinear maps, also when extrapolating."""
    c0, c1, c2, c3 = coef

    def fn(z, context, flavour, systematic):
        out = c0 + c1 * z[:, 1] + c2 * z[:, 0] + c3 * z[:, 0] * z[:, 1]
        return np.stack([out, -out], axis=-1)

    grid = ExportGrid(ilr_bins=3, ilr_range=(-2.0, 4.0),
                      kinematics=[KinematicAxis(name="pt", edges=[20.0, 100.0, 1000.0])])
    ev = load_evaluator(build_correction_set(fn, n_classes=3, flavours=[5], grid=grid,
                                             metadata=META))
    got = evaluate_export(ev, "toy", "central", 5, [np.array([pt])], np.array([[z1, z2]]))
    want = fn(np.array([[z1, z2]]), None, 5, "central")
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-9)


def test_exact_at_nodes_and_bilinear_maps_everywhere():
    grid = ExportGrid(ilr_bins=4, ilr_range=[(-4.0, 4.0), (-2.0, 6.0)])
    cset = build_correction_set(bilinear_map, n_classes=3, flavours=[5, 4, 0],
                                variations=["comp"], grid=grid, metadata=META)
    ev = load_evaluator(cset)
    z, ctx = sample_validation_jets(grid, 2, 500, seed=3)
    for key in ("central", "up_comp", "down_comp"):
        for flav in (5, 4, 0):
            got = evaluate_export(ev, "toy", key, flav, list(ctx.T), z)
            np.testing.assert_allclose(got, bilinear_map(z, ctx, flav, key), atol=1e-12)
    # ILR axes: the per-axis ranges are honoured
    edges = cset.corrections[1].data.content[0].value.content[0].value.edges
    assert edges[3] == cs.UniformBinning(n=4, low=-2.0, high=6.0)


@pytest.mark.parametrize("pt_edges", [[20.0, 1000.0], [20.0, 50.0, 200.0, 1000.0]])
def test_interpolated_pt_is_exact_for_linear_pt_and_clamped_outside(pt_edges):
    def fn(z, context, flavour, systematic):
        pt = np.clip(context[:, 0], 20.0, 1000.0)  # the applier clamps to the range
        return bilinear_map(z, context, flavour, systematic) * (1.0 + 1e-3 * pt)[:, None]

    axes = [KinematicAxis(name="pt", edges=pt_edges, log_center=True),
            KinematicAxis(name="abseta", edges=[0.0, 1.25, 2.5])]
    grid = ExportGrid(ilr_bins=3, ilr_range=(-3.0, 3.0), kinematics=axes, interpolate=["pt"])
    cset = build_correction_set(fn, n_classes=3, flavours=[5], variations=["comp"], grid=grid,
                                metadata=META)
    formulas = cset.corrections[0].generic_formulas
    assert formulas[0].variables == ["pt", "z1", "z2"]
    assert len(formulas) == 4
    assert "min(max(x,[8]),[9])" in formulas[3].expression
    ev = load_evaluator(cset)
    rng = np.random.default_rng(4)
    z = rng.uniform(-5.0, 5.0, (400, 2))
    pt = np.concatenate([rng.uniform(20.0, 1000.0, 300), [5.0, 15.0, 1500.0, 1e5] * 25])
    eta = rng.uniform(0.0, 3.0, 400)
    for key in ("central", "down_comp"):
        got = evaluate_export(ev, "toy", key, 5, [pt, eta], z)
        np.testing.assert_allclose(got, fn(z, pt[:, None], 5, key), rtol=1e-10, atol=1e-9)
    with pytest.raises(ValueError, match="at most one kinematic axis"):
        ExportGrid(kinematics=axes, interpolate=["pt", "abseta"])
    with pytest.raises(ValueError, match="at most one kinematic axis"):
        ExportGrid(kinematics=axes, interpolate=["mass"])
    with pytest.raises(ValueError, match="at most one kinematic axis"):
        build_correction_set(fn, n_classes=3, flavours=[5], metadata=META,
                             grid=ExportGrid(interpolate=["mass"]))


def test_smooth_map_accuracy_within_documented_tolerance(smooth_export):
    grid, _, ev = smooth_export
    z, ctx = sample_validation_jets(grid, 2, 4000, seed=7)
    report = measure_accuracy(ev, smooth_map, tagger="toy", z=z, context=ctx, flavours=[5, 4],
                              systematics=systematic_keys(["comp"]))
    # measured 2.9e-2 max / 8.1e-3 rms (dp: 1.0e-2 max): half a log-pt bin of the 0.05 log(pt)
    # drift plus the h^2/8 |T''| interpolation term (docs/correctionlib.md)
    assert max(report.max_abs) < 0.04
    assert max(report.rms) < 0.012
    assert report.max_abs_prob < 0.015
    assert report.n_jets == 4000
    # the exact nodes: pt at a bin's geometric centre, z on the grid
    zn = np.array([[-6.0, -6.0], [0.75, 1.5], [6.0, -3.0]])
    ptc = np.full(3, np.sqrt(20.0 * 30.0))
    got = evaluate_export(ev, "toy", "up_comp", 4, [ptc, np.full(3, 0.3)], zn)
    np.testing.assert_allclose(got, smooth_map(zn, ptc[:, None], 4, "up_comp"), atol=1e-12)


def test_identity_flavour_and_unknown_keys(smooth_export):
    _, _, ev = smooth_export
    z = np.array([[0.3, -7.5], [9.0, 2.0]])
    got = evaluate_export(ev, "toy", "down_comp", np.array([0, 0]), [np.array([40.0, 900.0]),
                          np.array([0.1, 2.4])], z)
    np.testing.assert_array_equal(got, z)
    with pytest.raises(IndexError, match="up_jes"):
        ev["otcal_toy_z1"].evaluate("up_jes", 5, 50.0, 1.0, 0.0, 0.0)
    with pytest.raises(IndexError):
        ev["otcal_toy_z1"].evaluate("central", 15, 50.0, 1.0, 0.0, 0.0)
    with pytest.raises(KeyError, match="otcal_other_z1"):
        evaluate_export(ev, "other", "central", 5, [np.array([50.0]), np.array([1.0])],
                        np.zeros((1, 2)))


def test_grid_and_builder_errors():
    with pytest.raises(ValueError, match="strictly increasing"):
        KinematicAxis(name="pt", edges=[30.0, 20.0])
    with pytest.raises(ValueError, match="log_center"):
        KinematicAxis(name="eta", edges=[-2.5, 2.5], log_center=True)
    with pytest.raises(ValueError, match="low < high"):
        ExportGrid(ilr_range=(3.0, -3.0))
    with pytest.raises(ValueError, match="max_leaves"):
        build_correction_set(smooth_map, n_classes=3, flavours=[5], metadata=META,
                             grid=ExportGrid(ilr_bins=200, max_leaves=1000))
    with pytest.raises(ValueError, match="one \\(low, high\\) per coordinate"):
        ExportGrid(ilr_range=[(-1.0, 1.0)] * 3).ilr_ranges(2)
    with pytest.raises(ValueError, match="non-finite"):
        build_correction_set(lambda z, c, f, s: z * np.nan, n_classes=3, flavours=[5],
                             metadata=META, grid=ExportGrid(ilr_bins=2))
    with pytest.raises(ValueError, match="disjoint"):
        build_correction_set(smooth_map, n_classes=3, flavours=[5], identity_flavours=[5],
                             metadata=META)


def test_four_classes_export_trilinear():
    def fn(z, context, flavour, systematic):
        return z + 0.1 * z[:, [1, 2, 0]] * z[:, [2, 0, 1]]

    grid = ExportGrid(ilr_bins=3, ilr_range=(-1.0, 1.0), kinematics=[])
    cset = build_correction_set(fn, n_classes=4, flavours=[5], grid=grid, metadata=META)
    assert [v.name for v in cset.corrections[2].inputs] == ["systematic", "flavor", "z1", "z2",
                                                            "z3"]
    ev = load_evaluator(cset)
    z = np.random.default_rng(1).uniform(-1, 1, (200, 3))
    np.testing.assert_allclose(evaluate_export(ev, "toy", "central", 5, [], z),
                               fn(z, None, 5, "central"), atol=1e-12)


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("name", ["out.json", "out.json.gz"])
def test_write_is_atomic_and_correctionlib_reads_it(tmp_path, smooth_export, name):
    _, cset, ev = smooth_export
    path = write_correction_set(cset, tmp_path / "sub" / name)
    assert sorted(p.name for p in path.parent.iterdir()) == [name]
    raw = path.read_bytes()
    text = gzip.decompress(raw) if name.endswith(".gz") else raw
    assert json.loads(text)["schema_version"] == 2
    loaded = correctionlib.CorrectionSet.from_file(str(path))
    z = np.array([[0.2, -0.4]])
    args = ("up_comp", 5, 75.0, 1.7, z[:, 0], z[:, 1])
    assert loaded["otcal_toy_z2"].evaluate(*args) == ev["otcal_toy_z2"].evaluate(*args)
    with pytest.raises(FileNotFoundError, match="coffea-otcal export"):
        load_evaluator(tmp_path / "missing.json")


# --------------------------------------------------------------------------- bundles


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    from coffea_otcal.potentials import PICNN, PICNNConfig

    maps = {}
    for i, flav in enumerate((5, 4, 0)):
        for j, name in enumerate(("nominal", "comp_up", "comp_down")):
            pot = PICNN(PICNNConfig(dim=2, context_dim=2, hidden=(8, 8)), seed=10 * i + j)
            maps[(flav, name)] = {
                "format": "coffea-otcal.fitted-map", "version": 1, "name": f"{flav}/{name}",
                "potential": pot.export(),
                "preprocessing": {"shift": [0.5 * i, -1.0], "scale": 1.5,
                                  "context_shift": [4.0, 1.2], "context_scale": [1.0, 0.7]},
            }
    bundle = Bundle.from_maps(
        maps, ["b", "c", "light"], "deepjet",
        context_spec=[
            {"name": "log_pt", "column": "pt", "transform": "log", "low": 20.0, "high": 1000.0},
            {"name": "abseta", "column": "eta", "transform": "abs", "low": 0.0, "high": 2.5},
        ],
        variations_meta={"comp": "composition prior"},
    )
    return bundle.save(tmp_path_factory.mktemp("bundle") / "toy.bundle.json.gz")


@pytest.fixture(scope="module")
def bundle_export(bundle_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "otcal.json.gz"
    grid = ExportGrid(ilr_bins=12, kinematic_bins={"pt": 6})
    return export_bundle(bundle_path, out, grid, n_validation=2000)


def test_bundle_grid_comes_from_the_bundle(bundle_path):
    grid = bundle_grid(Bundle.load(bundle_path), ExportGrid(kinematic_bins={"pt": 5}))
    pt, eta = grid.kinematics
    assert (pt.name, eta.name) == ("pt", "abseta")
    np.testing.assert_allclose(pt.edges, np.geomspace(20.0, 1000.0, 6))
    assert pt.log_center
    assert eta.edges == [0.0, 1.25, 2.5]
    assert grid.ilr_range == [(-6.0, 7.0), (-7.0, 5.0)]  # shift +- 4 * scale, union of maps
    with pytest.raises(ValueError, match="one axis per context variable"):
        bundle_grid(Bundle.load(bundle_path), ExportGrid(kinematics=[]))
    with pytest.raises(ValueError, match=r"kinematic_bins names \['eta'\]"):
        bundle_grid(Bundle.load(bundle_path), ExportGrid(kinematic_bins={"eta": 3}))
    with pytest.raises(ValueError, match="at most one kinematic axis"):
        bundle_grid(Bundle.load(bundle_path), ExportGrid(interpolate=["eta"]))
    assert bundle_grid(Bundle.load(bundle_path), ExportGrid(interpolate=["abseta"])).interpolate


def test_bundle_export_metadata(bundle_export, bundle_path):
    bundle = Bundle.load(bundle_path)
    cset = bundle_export.correction_set
    for text in [cset.description, *(c.description for c in cset.corrections)]:
        assert "toy.bundle.json.gz" in text
        assert f"integrity.digest(sha256)={bundle.integrity.digest}" in text
        assert "schema=1" in text
        assert "coffea-otcal 0.1.0" in text
        assert "held-out jets" in text
    assert "central, up_comp, down_comp" in cset.description
    assert [c.name for c in cset.corrections] == ["otcal_deepjet_z1", "otcal_deepjet_z2"]
    assert bundle_export.path.is_file()
    assert max(bundle_export.accuracy.max_abs) < 5e-3


def test_bundle_export_matches_the_calibrator_on_real_nanoaod_jets(bundle_export, bundle_path):
    """correctionlib (plain, from the file) vs the exact map on real DeepJet jets."""
    events = NanoEventsFactory.from_root(
        {str(NANO_TT): "Events"}, schemaclass=NanoAODSchema, mode="virtual"
    ).events()
    adapter = get_adapter("deepjet")
    fields = [*adapter.columns, "hadronFlavour", "pt", "eta"]
    jets = {f: ak.to_numpy(ak.flatten(events.Jet[f])) for f in fields}
    cols = {c: jets[c] for c in adapter.columns}
    z, valid = ilr_from_columns(adapter, cols)
    assert valid.all()
    flav = jets["hadronFlavour"].astype(np.int64)
    pt, abseta = jets["pt"], np.abs(jets["eta"])
    ev = load_evaluator(bundle_export.path)
    cal = Calibrator(bundle_path)
    for key, name in (("central", "nominal"), ("down_comp", "comp_down")):
        got = evaluate_export(ev, "deepjet", key, flav, [pt, abseta], z)
        want = np.empty_like(z)
        for f in (5, 4, 0):
            sel = flav == f
            want[sel] = cal.calibrate_ilr(z[sel], f, np.stack([pt[sel], abseta[sel]], -1), name)
        assert np.abs(got - want).max() < 5e-3
        # back to the tagger's own columns, as the applier writes them
        exported = columns_from_ilr(adapter, got)
        exact = columns_from_ilr(adapter, want)
        assert np.abs(exported["btagDeepFlavB"] - exact["btagDeepFlavB"]).max() < 2e-3
    full = cal.calibrate_columns(cols | {"hadronFlavour": flav, "pt": pt, "eta": jets["eta"]},
                                 variations=[])
    nominal = columns_from_ilr(adapter, evaluate_export(ev, "deepjet", "central", flav,
                                                        [pt, abseta], z))
    assert np.abs(nominal["btagDeepFlavCvL"] - full["btagDeepFlavCvL_otcal"]).max() < 2e-3


def test_cli_export(bundle_path, tmp_path, capsys):
    out = tmp_path / "cli.json"
    grid = json.dumps({"ilr_bins": 4, "ilr_range": [-5, 5], "kinematic_bins": {"pt": 2}})
    code = cli.main(["export", str(bundle_path), "-o", str(out), "--grid", grid,
                     "--ilr-bins", "6", "--validation-jets", "300", "--no-progress",
                     "--interpolate", "pt"])
    assert code == 0
    text = capsys.readouterr().out
    assert "otcal_deepjet_z1, otcal_deepjet_z2" in text
    assert "300 held-out jets" in text
    edges = json.loads(out.read_text())["corrections"][0]["data"]["content"][0]["value"][
        "content"][0]["value"]["edges"]
    assert edges[2] == {"n": 6, "low": -5.0, "high": 5.0}
    assert len(edges[0]) == 3
    assert json.loads(out.read_text())["corrections"][0]["generic_formulas"][0]["variables"] == [
        "pt", "z1", "z2"]
    assert cli.main(["export", str(tmp_path / "nope.json"), "-o", str(out)]) == 1
    assert "not found" in capsys.readouterr().err


def test_parse_grid(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"ilr_bins": 10, "ilr_range": [[-1, 1], [-2, 2]]}))
    assert parse_grid(str(path)).ilr_ranges(2) == [(-1.0, 1.0), (-2.0, 2.0)]
    assert parse_grid(None) == ExportGrid()
    with pytest.raises(FileNotFoundError, match="neither a JSON object"):
        parse_grid(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_grid("{bad")


def test_ilr_helpers_round_trip():
    adapter = get_adapter("deepjet")
    cols = {"btagDeepFlavB": np.array([0.9, 0.01, -1.0]),
            "btagDeepFlavCvL": np.array([0.5, 0.2, -1.0]),
            "btagDeepFlavCvB": np.array([0.05, 0.9, -1.0])}
    z, valid = ilr_from_columns(adapter, cols)
    assert valid.tolist() == [True, True, False]
    np.testing.assert_allclose(z[2], 0.0, atol=1e-12)
    back = columns_from_ilr(adapter, z[:2])
    np.testing.assert_allclose(back["btagDeepFlavB"], [0.9, 0.01], rtol=1e-9)
    np.testing.assert_allclose(back["btagDeepFlavCvL"], [0.5, 0.2], rtol=1e-9)
    np.testing.assert_allclose(z[:2], geometry.ilr(np.array([[0.9, 0.05, 0.05],
                                                            [0.01, 0.198, 0.792]])))


def test_documented_cpp_formulas_match_the_python_helpers():
    """docs/correctionlib.md spells the DeepJet ILR and its inverse out for C++ users."""
    rng = np.random.default_rng(5)
    b, cvl = rng.uniform(0, 1, 500), rng.uniform(0, 1, 500)
    b[:3], cvl[:3] = [0.0, 1.0, 0.999512], [1.0, 0.0, 0.0]  # quantised vertices
    cvb = rng.uniform(0, 0.5, 500)
    b[3:40] = 1.0 - rng.uniform(0, 2.0**-6, 37)  # saturated B: the b/c ratio comes from CvB
    eps = 1e-12
    q = cvb / (1 - cvb)
    rest = np.where(1 - b < 2.0 ** (4 - 10), q / (cvl + q), 1 - b)
    pb, pc, pl = 1 - rest, cvl * rest, (1 - cvl) * rest
    lb, lc, ll = (np.log(np.maximum(x, eps)) for x in (pb, pc, pl))
    z = np.stack([(lb - lc) / np.sqrt(2.0), (lb + lc - 2.0 * ll) / np.sqrt(6.0)], -1)
    adapter = get_adapter("deepjet", mantissa_bits=10)
    cols = {"btagDeepFlavB": b, "btagDeepFlavCvL": cvl, "btagDeepFlavCvB": cvb}
    np.testing.assert_allclose(z, ilr_from_columns(adapter, cols)[0], atol=1e-12)
    z1, z2 = z[:, 0] + 0.3, z[:, 1] - 0.2
    cb = z1 / np.sqrt(2.0) + z2 / np.sqrt(6.0)
    cc = -z1 / np.sqrt(2.0) + z2 / np.sqrt(6.0)
    cl = -2.0 * z2 / np.sqrt(6.0)
    m = np.maximum(np.maximum(cb, cc), cl)
    eb, ec, el = np.exp(cb - m), np.exp(cc - m), np.exp(cl - m)
    s = eb + ec + el
    back = columns_from_ilr(adapter, np.stack([z1, z2], -1))
    np.testing.assert_allclose(eb / s, back["btagDeepFlavB"], rtol=1e-12)
    np.testing.assert_allclose((ec / s) / ((ec + el) / s), back["btagDeepFlavCvL"], rtol=1e-12)
    np.testing.assert_allclose(ec / (ec + eb), back["btagDeepFlavCvB"], rtol=1e-12)


def test_export_needs_neither_torch_nor_dask(bundle_path, tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['dask'] = None\n"
        "from coffea_otcal.clib_export import ExportGrid\n"
        "from coffea_otcal.export_cli import export_bundle\n"
        f"r = export_bundle({str(bundle_path)!r}, {str(tmp_path / 'x.json')!r}, "
        "ExportGrid(ilr_bins=3, kinematic_bins={'pt': 1}), n_validation=50)\n"
        "print(max(r.accuracy.max_abs) < 1.0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
