"""Tests of the drop-in processor and add_calibrated_columns on real and generated NanoAOD."""

from __future__ import annotations

import shutil
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
from coffea import processor
from coffea.nanoevents import NanoAODSchema, NanoEventsFactory

from coffea_otcal.applier import Calibrator
from coffea_otcal.processors.calibration import CalibrationProcessor, add_calibrated_columns
from test_bundle import ETA_CONTEXT, PT_CONTEXT, make_bundle

REAL = Path(__file__).parent / "data" / "nano_tt_v15.root"
SHARED = Path("/work/shared/data/nanoaod/nano_tt_v15.root")


@pytest.fixture(scope="module")
def real_file(tmp_path_factory) -> Path:
    if REAL.is_file():
        return REAL
    path = tmp_path_factory.mktemp("real") / "nano_tt_v15.root"
    shutil.copy(SHARED, path)
    return path


def flat_jets(path: Path, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Flat jet branches read straight with uproot (an independent reference)."""
    import uproot

    tree = uproot.open(path)["Events"]
    return {f: ak.to_numpy(ak.flatten(tree[f"Jet_{f}"].array())) for f in fields}


def eager_events(path: Path):
    return NanoEventsFactory.from_root(
        {str(path): "Events"}, schemaclass=NanoAODSchema, mode="virtual"
    ).events()


def test_pnet_defaults_and_unmapped_flavours_pass_through(real_file: Path) -> None:
    """Real v15 NanoAOD: PNet is -1 for |eta| >= 2.5; a b/c-only bundle leaves light jets."""
    cal = Calibrator(make_bundle(flavours=(5, 4), adapter="pnet"))
    events = eager_events(real_file)
    orig = {c: ak.to_numpy(ak.flatten(events.Jet[c])) for c in cal.columns}
    flav = ak.to_numpy(ak.flatten(events.Jet.hadronFlavour))
    eta = ak.to_numpy(ak.flatten(events.Jet.eta))
    events = add_calibrated_columns(events, cal)
    jets = events.Jet
    status = ak.to_numpy(ak.flatten(jets.otcal_status))
    defaults = orig["btagPNetB"] < 0
    assert int(defaults.sum()) == 378
    assert np.all(np.abs(eta[defaults]) >= 2.5)
    assert np.all(status[defaults] == 2)
    assert np.all(status[~defaults & (flav == 0)] == 3)
    assert np.all(status[~defaults & (flav != 0)] == 0)
    assert int((status == 0).sum()) == int((~defaults & (flav != 0)).sum()) > 300
    for col, values in orig.items():
        new = ak.to_numpy(ak.flatten(jets[f"{col}_otcal"]))
        up = ak.to_numpy(ak.flatten(jets.OTCAL_comp.up[col]))
        np.testing.assert_array_equal(new[status != 0], values[status != 0])
        np.testing.assert_array_equal(up[status != 0], values[status != 0])
        assert np.all(new[status == 0] != values[status == 0])
    # NanoEvents behaviour survives, the event count and jet multiplicities are unchanged
    assert len(events) == 200
    assert ak.sum(ak.num(jets)) == 1636
    assert type(jets).__name__ == "JetArray"
    np.testing.assert_array_equal(
        ak.to_numpy(ak.flatten(jets.pt)), flat_jets(real_file, ("pt",))["pt"]
    )


def test_replace_nominal_keeps_the_original(real_file: Path) -> None:
    cal = Calibrator(make_bundle(variations={}, context=(PT_CONTEXT,)))
    events = eager_events(real_file)
    before = ak.to_numpy(ak.flatten(events.Jet.btagDeepFlavB))
    events = add_calibrated_columns(events, cal, replace_nominal=True)
    np.testing.assert_array_equal(ak.to_numpy(ak.flatten(events.Jet.btagDeepFlavB_orig)), before)
    np.testing.assert_array_equal(
        ak.to_numpy(ak.flatten(events.Jet.btagDeepFlavB)),
        ak.to_numpy(ak.flatten(events.Jet.btagDeepFlavB_otcal)),
    )
    assert not any(f.startswith("OTCAL_") for f in events.Jet.fields)


class _Histogrammer(processor.ProcessorABC):
    """A user's processor: sums the calibrated D_b of b-tagged jets."""

    def process(self, events):
        jets = events.Jet
        return {"sum_b": float(ak.sum(jets.btagDeepFlavB_otcal)), "n": len(events)}

    def postprocess(self, accumulator):
        return accumulator


@pytest.mark.parametrize("is_data", [False, True])
def test_processor_wraps_an_existing_processor(real_file: Path, is_data: bool) -> None:
    cal = Calibrator(make_bundle(context=(PT_CONTEXT, ETA_CONTEXT)))
    fileset = {"tt": {"files": {str(real_file): "Events"}, "metadata": {"is_data": is_data}}}
    run = processor.Runner(
        executor=processor.IterativeExecutor(status=False),
        schema=NanoAODSchema,
        chunksize=200,
        metadata_cache={},  # coffea's default cache would keep the first run's is_data
    )
    out = run(
        fileset,
        processor_instance=CalibrationProcessor(cal, inner=_Histogrammer()),
        treename="Events",
    )
    assert out["n"] == 200
    assert out["otcal"]["events"] == 200
    assert out["otcal"]["jets"] == 1636
    status = out["otcal"]["status"]
    if is_data:
        assert status["data"] == 1636
        assert status["calibrated"] == 0
        orig = flat_jets(real_file, ("btagDeepFlavB",))["btagDeepFlavB"].astype(np.float64)
        assert out["sum_b"] == pytest.approx(float(orig.sum()), rel=1e-12)
    else:
        assert status["calibrated"] == 1636
        assert status["data"] == 0
        ref = cal.calibrate_columns(flat_jets(real_file, cal.input_columns))
        assert out["sum_b"] == pytest.approx(float(ref["btagDeepFlavB_otcal"].sum()), rel=1e-12)
        assert out["otcal"]["clamped"] == int(ref["otcal_clamped"].sum()) > 0


def test_data_detected_without_flavour_field(tmp_path: Path) -> None:
    from coffea_otcal.generator import GeneratorConfig, generate

    sample = generate(GeneratorConfig(seed=3, scale=0.004), tmp_path, progress=False)
    cal = Calibrator(make_bundle())
    for f in sample.files:
        events = eager_events(tmp_path / Path(f.path).name)
        status = ak.flatten(add_calibrated_columns(events, cal).Jet.otcal_status)
        assert set(np.unique(ak.to_numpy(status)).tolist()) == ({1} if f.is_data else {0})


def test_processor_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown skim format 'csv'"):
        CalibrationProcessor(make_bundle(), output_dir="x", fmt="csv")  # type: ignore[arg-type]


def _jets(path: Path) -> dict[str, np.ndarray]:
    import uproot

    tree = uproot.open(path)["Events"]
    arrays = tree.arrays(library="ak")
    jets = arrays.Jet if "Jet" in arrays.fields else None
    names = ["btagDeepFlavB", "btagDeepFlavCvL", "btagDeepFlavCvB", "pt", "hadronFlavour"]
    if jets is None:
        return {
            n: ak.to_numpy(ak.flatten(arrays[f"Jet_{n}"]))
            for n in names
            if f"Jet_{n}" in arrays.fields
        }
    return {n: ak.to_numpy(ak.flatten(jets[n])) for n in names if n in jets.fields}


def _train_bundle(tmp_path: Path):
    import hashlib

    from coffea_otcal.applier import transform_context
    from coffea_otcal.bundle import Bundle
    from coffea_otcal.generator import GeneratorConfig, generate
    from coffea_otcal.geometry import ilr
    from coffea_otcal.ot import OTConfig, fit_ot_map

    sample = generate(GeneratorConfig(seed=5, scale=0.02), tmp_path / "gen", progress=False)
    adapter = Calibrator(make_bundle(variations={}, context=(PT_CONTEXT,))).adapter
    spec = make_bundle(variations={}, context=(PT_CONTEXT,)).context
    config = OTConfig(steps=60, hidden=(8, 8), eval_every=30, batch_size=256, min_samples=50)
    maps, inputs, shifts = {}, [], {}
    for code, region in ((5, "cr_b"), (4, "cr_c")):
        mc, data = (_jets(Path(sample.file(region, d).path)) for d in (False, True))
        mc = {k: v[mc["hadronFlavour"] == code] for k, v in mc.items()}
        z_mc, z_data = (ilr(adapter.to_simplex(s)[0]) for s in (mc, data))
        c_mc, c_data = (transform_context(spec, s)[0] for s in (mc, data))
        fitted = fit_ot_map(
            z_mc,
            z_data,
            source_context=c_mc,
            target_context=c_data,
            config=config,
            device="cpu",
            seed=1,
            progress=False,
            name=str(code),
        )
        maps[(code, "nominal")] = fitted.export()
        moved = fitted.transport(z_mc, c_mc)
        shifts[code] = (
            np.linalg.norm(z_mc.mean(0) - z_data.mean(0)),
            np.linalg.norm(moved.mean(0) - z_data.mean(0)),
        )
        for d in (False, True):
            path = Path(sample.file(region, d).path)
            inputs.append(
                {"path": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            )
    for before, after in shifts.values():
        assert after < 0.5 * before  # the maps pull MC towards data
    return Bundle.from_maps(
        maps,
        ["b", "c", "light"],
        "deepjet",
        [PT_CONTEXT],
        {},
        {"seed": 1, "inputs": inputs, "config": config.model_dump(mode="json")},
    )


def test_real_nanoaod_with_a_bundle_trained_on_generated_deepjet(
    real_file: Path, tmp_path: Path
) -> None:
    """Train b and c maps on generated DeepJet CRs, apply them to the real v15 file."""
    import torch

    from coffea_otcal.bundle import Bundle

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny trainings: threads only contend on the shared CPUs
    try:
        bundle = _train_bundle(tmp_path)
    finally:
        torch.set_num_threads(threads)
    cal = Calibrator(Bundle.load(bundle.save(tmp_path / "trained.json.gz")))

    events = eager_events(real_file)
    # DeepJet has no defaults in this file: give forward jets the NanoAOD default -1
    forward = abs(events.Jet.eta) > 2.4
    events["Jet", "btagDeepFlavB"] = ak.where(forward, np.float32(-1.0), events.Jet.btagDeepFlavB)
    events = add_calibrated_columns(events, cal)
    jets = events.Jet
    flav = ak.to_numpy(ak.flatten(jets.hadronFlavour))
    status = ak.to_numpy(ak.flatten(jets.otcal_status))
    pt = ak.to_numpy(ak.flatten(jets.pt))
    default = ak.to_numpy(ak.flatten(forward))
    assert (flav == 5).sum() == 348
    assert (flav == 4).sum() == 194
    assert default.sum() > 100
    np.testing.assert_array_equal(status, np.where(default, 2, np.where(flav == 0, 3, 0)))
    flav = np.where(default, 0, flav)  # below: jets that must be unchanged look like light
    clamped = ak.to_numpy(ak.flatten(jets.otcal_clamped))
    np.testing.assert_array_equal(clamped, (flav != 0) & ((pt < 20.0) | (pt > 1000.0)))
    for col in cal.columns:
        orig = ak.to_numpy(ak.flatten(jets[col])).astype(np.float64)
        new = ak.to_numpy(ak.flatten(jets[f"{col}_otcal"]))
        np.testing.assert_array_equal(new[flav == 0], orig[flav == 0])
        assert np.mean(new[flav != 0] != orig[flav != 0]) > 0.99
        assert np.all((new[~default] >= 0) & (new[~default] <= 1))
        if col == "btagDeepFlavB":
            np.testing.assert_array_equal(new[default], -1.0)
    p = np.stack([ak.to_numpy(ak.flatten(jets[f"p_{k}_otcal"])) for k in cal.classes], axis=-1)
    np.testing.assert_allclose(p[~default].sum(axis=-1), 1.0, atol=1e-12)
    assert np.isnan(p[default]).all()
