"""Tests of latent-space calibration: fit, subspace lift, closure, bundle, LatentCalibrator, plots."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import awkward as ak
import numpy as np
import pytest
import torch
from coffea.nanoevents import NanoAODSchema, NanoEventsFactory
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from coffea_otcal.bundle import Bundle
from coffea_otcal.generator import GeneratorConfig, generate, latent_head, simulate_jets
from coffea_otcal.latent_apply import LatentCalibrator
from coffea_otcal.latent_calib import (
    LatentCalibConfig,
    LatentMaps,
    embed_subspace_map,
    fit_latent_maps,
    latent_closure,
    principal_subspace,
    tagger_responsibilities,
)
from coffea_otcal.latent_plots import (
    plot_latent_corner,
    plot_latent_rocs,
    plot_output_discriminants,
)
from coffea_otcal.ot import OTConfig, fit_ot_map

DIM = 32
COLUMNS = [f"latent_{i}" for i in range(DIM)]
FAST_OT = OTConfig(hidden=(16, 16), steps=150, batch_size=512, eval_every=50, lr=5e-3)


class ToySchema(NanoAODSchema):
    """NanoAODSchema without warnings about collections a jets-only file lacks."""

    warn_missing_crossrefs = False


@pytest.fixture(scope="module")
def gen_config() -> GeneratorConfig:
    return GeneratorConfig(
        seed=11, latent={"enabled": True, "latent_dim": DIM}, mismodelling={"strength": 1.5}
    )


@pytest.fixture(scope="module")
def jets(gen_config: GeneratorConfig) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    n = 4000
    return {
        name: simulate_jets(gen_config, "vr", n, is_data, rng)
        for name, is_data in (
            ("mc", False),
            ("data", True),
            ("mc_eval", False),
            ("data_eval", True),
        )
    }


@pytest.fixture(scope="module")
def maps(jets: dict[str, dict[str, np.ndarray]]) -> LatentMaps:
    torch.set_num_threads(1)
    cfg = LatentCalibConfig(n_components=12, ot=FAST_OT)
    mc, data = jets["mc"], jets["data"]
    return fit_latent_maps(
        mc["latent"],
        mc["flavour"],
        data["latent"],
        data_flavour=data["flavour"],
        config=cfg,
        device="cpu",
        seed=1,
        progress=False,
    )


@pytest.fixture(scope="module")
def bundle(maps: LatentMaps) -> Bundle:
    return maps.to_bundle(provenance={"seed": 1})


def _small_map(k: int, seed: int = 0) -> object:
    rng = np.random.default_rng(seed)
    src = rng.normal(size=(400, k))
    tgt = 1.3 * rng.normal(size=(400, k)) + 0.5
    cfg = OTConfig(hidden=(8, 8), steps=20, batch_size=128, eval_every=10)
    return fit_ot_map(src, tgt, config=cfg, device="cpu", seed=seed, progress=False)


def test_lifted_map_acts_in_the_subspace_and_is_the_identity_elsewhere():
    d, k = 7, 3
    rng = np.random.default_rng(2)
    fitted = _small_map(k)
    center = rng.normal(size=d)
    comps, _ = np.linalg.qr(rng.normal(size=(d, k)))
    lifted = embed_subspace_map(fitted, center, comps)
    z = rng.normal(size=(50, d)) * 2
    y = (z - center) @ comps
    expected = (
        center + (z - center) - (z - center) @ comps @ comps.T + fitted.transport(y) @ comps.T
    )
    assert lifted.dim == d
    np.testing.assert_allclose(lifted.transport(z), expected, atol=1e-10)
    # the torch potential rebuilt from the lifted export agrees with the numpy kernel
    np.testing.assert_allclose(lifted.transport_torch(z).numpy(), expected, atol=1e-8)


@settings(max_examples=25, deadline=None)
@given(arrays(np.float64, (2, 6), elements=st.floats(-5, 5)))
def test_lifted_map_is_monotone(points: np.ndarray):
    rng = np.random.default_rng(4)
    comps, _ = np.linalg.qr(rng.normal(size=(6, 2)))
    lifted = embed_subspace_map(_LIFT_BASE, np.zeros(6), comps)
    t = lifted.transport(points)
    assert np.dot(t[0] - t[1], points[0] - points[1]) >= -1e-9


_LIFT_BASE = _small_map(2, seed=3)


def test_principal_subspace_is_orthonormal_and_explains_the_variance():
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(10, 2)))
    src = rng.normal(size=(500, 2)) @ basis.T * 3 + rng.normal(size=(500, 10)) * 0.01
    tgt = rng.normal(size=(500, 2)) @ basis.T * 3 + basis @ np.array([1.0, -0.5])
    _center, comps, explained = principal_subspace(src, tgt, 2)
    np.testing.assert_allclose(comps.T @ comps, np.eye(2), atol=1e-12)
    assert explained > 0.95
    # the two leading directions span the generating plane
    assert np.linalg.norm(basis - comps @ (comps.T @ basis)) < 0.05
    assert principal_subspace(src, tgt, None)[1].shape == (10, 10)


@settings(max_examples=30, deadline=None)
@given(
    arrays(np.float64, (5, 3), elements=st.floats(0.01, 1.0)),
    arrays(np.float64, (3,), elements=st.floats(0.05, 1.0)),
)
def test_tagger_responsibilities_are_posteriors(raw: np.ndarray, fractions: np.ndarray):
    probs = raw / raw.sum(axis=1, keepdims=True)
    resp = tagger_responsibilities(probs, fractions)
    np.testing.assert_allclose(resp.sum(axis=1), 1.0)
    # uniform fractions and a uniform prior return the tagger output itself
    np.testing.assert_allclose(tagger_responsibilities(probs, [1, 1, 1]), probs, atol=1e-12)
    # raising a class's fraction raises its responsibility
    boosted = tagger_responsibilities(probs, fractions * np.array([3.0, 1.0, 1.0]))
    assert np.all(boosted[:, 0] >= resp[:, 0] - 1e-12)


def test_calibration_closes_the_outputs(maps, jets, gen_config):
    ev, de = jets["mc_eval"], jets["data_eval"]
    cal = maps.transport(ev["latent"], ev["flavour"])
    res = latent_closure(
        ev["latent"],
        de["latent"],
        cal,
        latent_head(gen_config),
        source_flavour=ev["flavour"],
        target_flavour=de["flavour"],
        max_iter=60,
    )
    out = res.aucs["outputs"]
    assert out["source_vs_target"] > 0.56
    assert out["calibrated_vs_target"] < out["source_vs_target"] - 0.03
    assert res.aucs["z_prime"]["calibrated_vs_target"] < res.aucs["z_prime"]["source_vs_target"]
    mean_before = np.mean([r["source"] for r in res.chi2.values()])
    mean_after = np.mean([r["calibrated"] for r in res.chi2.values()])
    assert mean_after < 0.5 * mean_before
    assert "| outputs |" in res.table()
    assert "D_bc(k=1)" in res.chi2_table()
    # per truth flavour, the calibrated outputs are closer to that flavour's data too
    assert set(res.aucs_by_flavour) == {"b", "c", "light"}
    for row in res.aucs_by_flavour.values():
        assert row["calibrated_vs_target"] < row["source_vs_target"]
    assert set(maps.metrics) == {"b", "c", "light"}
    assert all(m["components"] == 12 for m in maps.metrics.values())


def test_responsibility_mode_fits_weighted_targets(jets, gen_config):
    mc, data = jets["mc"], jets["data"]
    with pytest.raises(ValueError, match="needs data_flavour_weights"):
        fit_latent_maps(
            mc["latent"],
            mc["flavour"],
            data["latent"],
            config=LatentCalibConfig(target_mode="responsibility"),
        )
    resp = tagger_responsibilities(data["probs"], [1 / 3, 1 / 3, 1 / 3])
    cfg = LatentCalibConfig(
        target_mode="responsibility",
        n_components=8,
        ot=OTConfig(hidden=(8, 8), steps=20, batch_size=256, eval_every=10),
    )
    fitted = fit_latent_maps(
        mc["latent"],
        mc["flavour"],
        data["latent"],
        data_flavour_weights=resp,
        config=cfg,
        device="cpu",
        progress=False,
    )
    assert fitted.metrics["b"]["n_target"] > 0.8 * len(data["latent"]) / 3
    assert fitted.metrics["b"]["target_effective"] < fitted.metrics["b"]["n_target"]
    with pytest.raises(ValueError, match=r"data_flavour_weights has shape \(4000, 2\)"):
        fit_latent_maps(
            mc["latent"],
            mc["flavour"],
            data["latent"],
            data_flavour_weights=resp[:, :2],
            config=cfg,
        )


def test_bundle_round_trip_and_calibrator_agree(bundle, maps, jets, gen_config, tmp_path):
    path = bundle.save(tmp_path / "latent.json.gz")
    loaded = Bundle.load(path)
    assert loaded.coordinates.kind == "latent"
    assert loaded.coordinates.columns == COLUMNS
    assert loaded.dim == DIM
    cal = LatentCalibrator(path)
    ev = jets["mc_eval"]
    flav = ev["flavour"].copy()
    flav[:7] = 15  # a flavour without a map passes through unchanged
    expected = maps.transport(ev["latent"], flav)
    z_np, status = cal.calibrate_latent(ev["latent"], flav)
    np.testing.assert_allclose(z_np, expected, rtol=1e-12, atol=1e-12)
    assert np.array_equal(z_np[:7], ev["latent"][:7].astype(np.float64))
    assert np.bincount(status, minlength=4)[[0, 3]].tolist() == [len(flav) - 7, 7]
    # jagged awkward jets (events x jets) give the same numbers and the head outputs
    fields = {c: ev["latent"][:, i] for i, c in enumerate(COLUMNS)}
    fields["hadronFlavour"] = flav
    counts = np.array([3, 0, 5] + [1] * (len(flav) - 8))
    jagged = ak.unflatten(ak.zip(fields), counts)
    head = latent_head(gen_config)
    out = cal.calibrate_jets(jagged, head=head)
    assert ak.num(out, axis=1).tolist() == counts.tolist()
    flat = ak.flatten(out)
    got = np.stack([ak.to_numpy(flat[f"{c}_otcal"]) for c in COLUMNS], axis=1)
    np.testing.assert_array_equal(got, z_np)
    np.testing.assert_allclose(ak.to_numpy(flat.p_b_otcal), head(z_np)[:, 0], atol=1e-12)
    assert "btagDeepFlavB_otcal" in flat.fields
    # data are never moved
    data_out = cal.calibrate_jets(jagged, is_data=True)
    assert np.all(ak.to_numpy(ak.flatten(data_out.otcal_status)) == 1)
    np.testing.assert_array_equal(
        ak.to_numpy(ak.flatten(data_out.latent_3_otcal)), ev["latent"][:, 3].astype(np.float64)
    )
    # pickling travels as JSON and gives identical results
    again = pickle.loads(pickle.dumps(cal))
    np.testing.assert_array_equal(again.calibrate_latent(ev["latent"], flav)[0], z_np)


def test_calibrator_on_nanoaod_files(bundle, gen_config, tmp_path):
    cfg = gen_config.model_copy(
        update={
            "regions": {"vr": GeneratorConfig().regions["vr"].model_copy(update={"n_jets": 300})}
        }
    )
    sample = generate(cfg, tmp_path, progress=False)
    events = NanoEventsFactory.from_root(
        {sample.file("vr", is_data=False).path: "Events"}, schemaclass=ToySchema, mode="eager"
    ).events()
    cal = LatentCalibrator(bundle)
    out = cal.calibrate_jets(events.Jet, head=latent_head(cfg))
    flat_jets = ak.flatten(events.Jet)
    z = np.stack([ak.to_numpy(flat_jets[c]) for c in COLUMNS], axis=1)
    expected, _ = cal.calibrate_latent(z, ak.to_numpy(flat_jets.hadronFlavour))
    np.testing.assert_allclose(ak.to_numpy(ak.flatten(out.latent_5_otcal)), expected[:, 5])
    assert ak.all(ak.num(out, axis=1) == ak.num(events.Jet, axis=1))


def test_bad_inputs_give_clear_errors(bundle, jets):
    cal = LatentCalibrator(bundle)
    ev = jets["mc_eval"]
    fields = {c: ev["latent"][:20, i] for i, c in enumerate(COLUMNS[:-1])}
    fields["hadronFlavour"] = ev["flavour"][:20]
    with pytest.raises(KeyError, match="latent_31"):
        cal.calibrate_jets(ak.zip(fields))
    with pytest.raises(ValueError, match=r"latent must have shape \(n, 32\)"):
        cal.calibrate_latent(ev["latent"][:, :16], ev["flavour"])
    with pytest.raises(ValueError, match="need their truth flavour"):
        cal.calibrate_latent(ev["latent"])
    nan = ev["latent"][:4].astype(np.float64)
    nan[1, 0] = np.nan
    out, status = cal.calibrate_latent(nan, ev["flavour"][:4])
    assert status[1] == 2
    assert np.isnan(out[1, 0])


def test_bundle_checks_latent_coordinates(bundle):
    raw = bundle.model_dump(mode="json")
    raw["coordinates"]["columns"] = None
    with pytest.raises(ValueError, match="need the latent Jet field names"):
        Bundle.model_validate(raw)
    raw["coordinates"]["columns"] = COLUMNS[:-1]
    with pytest.raises(ValueError, match="shift has 32 entries, the latent dimension is 31"):
        Bundle.model_validate(raw)
    raw["coordinates"] = {"kind": "ilr", "columns": ["latent_0"]}
    with pytest.raises(ValueError, match="take no 'columns'"):
        Bundle.model_validate(raw)
    with pytest.raises(ValueError, match=r"use coffea_otcal\.latent_apply\.LatentCalibrator"):
        bundle.require_coordinates("ilr", "Calibrator")
    from coffea_otcal.applier import Calibrator

    with pytest.raises(ValueError, match=r"Calibrator reads bundles with 'ilr' coordinates"):
        Calibrator(bundle)


def test_latent_calibrator_refuses_an_ilr_bundle():
    ilr_bundle = Bundle.from_maps(
        {(code, "nominal"): _small_map(2, seed=code).export() for code in (5, 4, 0)},
        classes=("b", "c", "light"),
        adapter="deepjet",
    )
    with pytest.raises(ValueError, match="LatentCalibrator reads bundles with 'latent'"):
        LatentCalibrator(ilr_bundle)


def test_plots_are_written(maps, jets, gen_config, tmp_path):
    ev, de = jets["mc_eval"], jets["data_eval"]
    cal = maps.transport(ev["latent"][:1500], ev["flavour"][:1500])
    corner = plot_latent_corner(
        tmp_path / "corner.png",
        {"target": de["latent"][:1500], "source": ev["latent"][:1500], "calibrated": cal},
        n_components=3,
    )
    res = latent_closure(
        ev["latent"][:1500], de["latent"][:1500], cal, latent_head(gen_config), max_iter=10
    )
    roc = plot_latent_rocs(tmp_path / "roc.png", res)
    disc = plot_output_discriminants(tmp_path, res)
    for path in (corner, roc, *disc):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(disc) == 3


def test_latent_calibrator_needs_neither_torch_nor_dask(bundle, jets, tmp_path):
    path = bundle.save(tmp_path / "b.json")
    z = jets["mc_eval"]["latent"][:5].astype(np.float64)
    np.save(tmp_path / "z.npy", z)
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['dask'] = None\n"
        "import numpy as np\n"
        "from coffea_otcal.latent_apply import LatentCalibrator\n"
        f"cal = LatentCalibrator({str(path)!r})\n"
        f"z = np.load({str(tmp_path / 'z.npy')!r})\n"
        "out, status = cal.calibrate_latent(z, np.array([5, 4, 0, 5, 0]))\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, out)\n"
    )
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    expected, _ = LatentCalibrator(bundle).calibrate_latent(z, np.array([5, 4, 0, 5, 0]))
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_latent_command_writes_bundle_report_and_plots(tmp_path):
    from coffea_otcal.cli import main

    cfg = GeneratorConfig(
        seed=2,
        regions={"vr": GeneratorConfig().regions["vr"].model_copy(update={"n_jets": 1600})},
        latent={"enabled": True, "latent_dim": 16},
    )
    generate(cfg, tmp_path / "sample", progress=False)
    out = tmp_path / "out"
    argv = ["latent", str(tmp_path / "sample"), str(out), "--components", "6", "--steps", "30"]
    assert (
        main([*argv, "--hidden", "8", "8", "--max-iter", "10", "--no-plots", "--no-progress"]) == 0
    )
    cal = LatentCalibrator(out / "latent_bundle.json.gz")
    assert cal.columns == tuple(f"latent_{i}" for i in range(16))
    report = (out / "report.md").read_text()
    assert "| outputs |" in report
    assert "| light |" in report
    assert json.loads((out / "report.json").read_text())["maps"]["b"]["components"] == 6
    assert main(["latent", str(tmp_path / "missing"), str(out)]) == 1
