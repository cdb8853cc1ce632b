"""Tests of ``coffea-otcal apply`` skims: eager, ROOT output, Dask LocalCluster, atomicity, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot
from coffea.nanoevents import NanoAODSchema, NanoEventsFactory

from coffea_otcal.applier import Calibrator
from coffea_otcal.bundle import Bundle
from coffea_otcal.cli import main
from coffea_otcal.processors import calibration
from coffea_otcal.skim import SKIM_MANIFEST, run_skim
from test_bundle import make_bundle


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> list[Path]:
    from coffea_otcal.generator import GeneratorConfig, generate

    out = tmp_path_factory.mktemp("gen")
    generated = generate(GeneratorConfig(seed=11, scale=0.01), out, progress=False)
    files = sorted(Path(f.path) for f in generated.files if f.region in ("cr_b", "vr"))
    assert [f.name for f in files] == [
        "data_cr_b.root",
        "data_vr.root",
        "mc_cr_b.root",
        "mc_vr.root",
    ]
    return files


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory) -> Path:
    return make_bundle().save(tmp_path_factory.mktemp("bundle") / "bundle.json.gz")


@pytest.fixture(scope="module")
def eager_skim(sample: list[Path], bundle_path: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("skims") / "eager"
    run_skim(bundle_path, sample, out, chunksize=40, progress=False)
    return out


def read_parts(folder: Path) -> dict[str, ak.Array]:
    manifest = json.loads((folder / SKIM_MANIFEST).read_text())
    return {name: ak.from_parquet(folder / name) for name in manifest["parts"]}


def test_eager_skim_content_matches_direct_calibration(
    sample: list[Path], bundle_path: Path, eager_skim: Path
) -> None:
    manifest = json.loads((eager_skim / SKIM_MANIFEST).read_text())
    parts = read_parts(eager_skim)
    assert sorted(p.name for p in eager_skim.iterdir()) == sorted([*parts, SKIM_MANIFEST])
    assert manifest["bundle_digest"] == Bundle.load(bundle_path).integrity.digest
    assert manifest["inputs"]["data_vr"]["is_data"]
    assert not manifest["inputs"]["mc_vr"]["is_data"]
    cal = Calibrator(bundle_path, dtype=np.float32)  # the skim's default precision
    n_events = n_jets = n_mc = 0
    for path in sample:
        events = NanoEventsFactory.from_root(
            {str(path): "Events"}, schemaclass=NanoAODSchema, mode="eager"
        ).events()
        is_data = path.name.startswith("data")
        ref = cal.calibrate_jets(events.Jet, is_data=is_data)
        chunks = [
            parts[k]
            for k in sorted(parts, key=lambda k: int(k.split("__")[2].split("-")[0]))
            if k.startswith(path.stem)
        ]
        got = ak.concatenate(chunks)
        assert max(map(len, chunks)) <= 60  # coffea splits a file into chunks of ~40 events
        assert len(chunks) == max(1, round(len(events) / 40))
        assert got.event.tolist() == events.event.tolist()
        # the skim writes float32 (its default precision), the Calibrator returns float64
        for field in ("btagDeepFlavB_otcal", "btagDeepFlavCvL_otcal"):
            assert str(ak.type(got.Jet[field])).endswith("float32")
            assert ak.all(got.Jet[field] == ak.values_astype(ref[field], np.float32))
        assert ak.all(got.Jet.otcal_status == ref.otcal_status)
        # probabilities only on request (--probabilities): the tagger columns carry them
        assert "p_light_otcal" not in got.Jet.fields
        assert "p_light" not in got.Jet.OTCAL_comp.down.fields
        assert ak.all(
            got.Jet.OTCAL_comp.down.btagDeepFlavCvL
            == ak.values_astype(ref.OTCAL_comp.down.btagDeepFlavCvL, np.float32)
        )
        assert ak.all(got.Jet.btagDeepFlavB == events.Jet.btagDeepFlavB)
        n_events += len(events)
        n_jets += int(ak.sum(ak.num(events.Jet)))
        n_mc += 0 if is_data else int(ak.sum(ak.num(events.Jet)))
    assert manifest["events"] == n_events
    assert manifest["jets"] == n_jets
    assert manifest["status"]["calibrated"] == n_mc
    assert manifest["status"]["data"] == n_jets - n_mc > 0
    assert "genWeight" not in parts[next(iter(parts))].fields  # a skim keeps what it lists


def test_root_skim_is_nanoaod_readable(
    sample: list[Path], bundle_path: Path, eager_skim: Path, tmp_path: Path
) -> None:
    out = tmp_path / "rootskim"
    manifest = run_skim(bundle_path, sample[2:3], out, fmt="root", chunksize=1000, progress=False,
                        probabilities=True)
    (name,) = manifest["parts"]
    tree = uproot.open(out / name)["Events"]
    keys = set(tree.keys())
    assert {
        "nJet",
        "Jet_btagDeepFlavB_otcal",
        "Jet_OTCAL_comp_up_btagDeepFlavB",
        "Jet_OTCAL_comp_up_p_b",
        "Jet_p_b_otcal",
        "Jet_otcal_status",
        "event",
    } <= keys
    events = NanoEventsFactory.from_root(
        {str(out / name): "Events"}, schemaclass=NanoAODSchema, mode="eager"
    ).events()
    parquet = ak.concatenate(
        [v for k, v in read_parts(eager_skim).items() if k.startswith("mc_cr_b")]
    )
    assert ak.all(events.Jet.btagDeepFlavB_otcal == parquet.Jet.btagDeepFlavB_otcal)
    assert ak.all(
        events.Jet.OTCAL_comp_down_btagDeepFlavCvL == parquet.Jet.OTCAL_comp.down.btagDeepFlavCvL
    )
    cal = Calibrator(bundle_path, dtype=np.float32)
    ref = cal.calibrate_jets(events.Jet[[*cal.input_columns]], is_data=False)
    assert ak.all(
        events.Jet.OTCAL_comp_down_p_c == ak.values_astype(ref.OTCAL_comp.down.p_c, np.float32)
    )


def test_dask_local_cluster_skim_is_identical_to_eager(
    sample: list[Path], bundle_path: Path, eager_skim: Path, tmp_path: Path
) -> None:
    out = tmp_path / "dask"
    before = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    manifest = run_skim(
        bundle_path,
        sample,
        out,
        chunksize=40,
        executor="dask",
        workers=2,
        progress=False,
    )
    eager = read_parts(eager_skim)
    dask = read_parts(out)
    assert sorted(dask) == sorted(eager) == manifest["parts"]
    for name, arr in eager.items():
        assert ak.to_list(dask[name]) == ak.to_list(arr), name
    ref = json.loads((eager_skim / SKIM_MANIFEST).read_text())
    for key in ("events", "jets", "status", "clamped", "bundle_digest"):
        assert manifest[key] == ref[key]
    assert manifest["executor"] == "dask"
    assert os.environ.get("MALLOC_TRIM_THRESHOLD_") == before  # nannies' env copy undone


def test_interrupted_skim_leaves_no_output(
    sample: list[Path], bundle_path: Path, tmp_path: Path, monkeypatch
) -> None:
    calls = []
    real = calibration.write_skim_part

    def flaky(record, path, fmt):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(record, path, fmt)

    monkeypatch.setattr(calibration, "write_skim_part", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_skim(bundle_path, sample, tmp_path / "out", chunksize=40, progress=False)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the staging folder


def test_existing_output_and_overwrite(
    sample: list[Path], bundle_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="exists; remove it or pass --overwrite"):
        run_skim(bundle_path, sample[:1], out, progress=False)
    manifest = run_skim(bundle_path, sample[:1], out, progress=False, overwrite=True, variations=[])
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["parts"], SKIM_MANIFEST])
    assert manifest["variations"] == []
    part = ak.from_parquet(out / manifest["parts"][0])
    assert not any(f.startswith("OTCAL_") for f in part.Jet.fields)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_reference_skim_without_calibration(
    sample: list[Path], bundle_path: Path, tmp_path: Path
) -> None:
    manifest = run_skim(bundle_path, sample[2:3], tmp_path / "ref", calibrate=False, progress=False)
    part = ak.from_parquet(tmp_path / "ref" / manifest["parts"][0])
    assert set(part.Jet.fields) == {
        "pt",
        "eta",
        "phi",
        "mass",
        "hadronFlavour",
        "btagDeepFlavB",
        "btagDeepFlavCvL",
        "btagDeepFlavCvB",
    }
    assert manifest["status"] == {}


def test_cli_apply(sample: list[Path], bundle_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    code = main(
        [
            "apply",
            str(bundle_path),
            *map(str, sample[1:3]),
            "-o",
            str(out),
            "--no-progress",
            "--chunksize",
            "1000",
            "--data-glob",
            "data_*",
            "--variations",
            "comp",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{out}: 2 parts,")
    manifest = json.loads((out / SKIM_MANIFEST).read_text())
    assert manifest["inputs"]["data_vr"]["is_data"]
    assert manifest["status"]["data"] > 0


def test_cli_errors_name_the_problem(sample: list[Path], tmp_path: Path, capsys) -> None:
    pnet = make_bundle(adapter="pnet", variations={}).save(tmp_path / "pnet.json")
    assert main(["apply", str(pnet), str(sample[0]), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "columns ['Jet_btagPNetB', 'Jet_btagPNetCvL', 'Jet_btagPNetCvB'] read by adapter 'pnet'" in err
    assert "data_cr_b.root" in err
    assert (
        main(["apply", str(pnet), str(tmp_path / "missing.root"), "-o", str(tmp_path / "o")]) == 1
    )
    assert "missing.root' not found" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    raw = json.loads(pnet.read_text())
    raw["provenance"]["seed"] = 8
    broken.write_text(json.dumps(raw))
    assert main(["apply", str(broken), str(sample[0]), "-o", str(tmp_path / "o")]) == 1
    assert "failed its integrity check" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_mc_data_flags(sample: list[Path], bundle_path: Path, tmp_path: Path) -> None:
    manifest = run_skim(bundle_path, sample[2:3], tmp_path / "d", is_data=True, progress=False)
    assert manifest["status"]["calibrated"] == 0
    assert manifest["status"]["data"] == manifest["jets"]
    with pytest.raises(
        KeyError, match="declared MC but has no truth-flavour branch 'Jet_hadronFlavour'"
    ):
        run_skim(bundle_path, sample[:1], tmp_path / "m", is_data=False, progress=False)
    assert not (tmp_path / "m").exists()
    assert np.all([not p.name.startswith(".") for p in tmp_path.iterdir()])


def test_malloc_trim_option() -> None:
    import argparse

    from coffea_otcal.skim import _trim_option

    assert _trim_option("unset") == "unset"
    assert _trim_option("distributed") is None
    assert _trim_option("65536") == 65536
    with pytest.raises(argparse.ArgumentTypeError, match="takes bytes, 'unset' or 'distributed'"):
        _trim_option("lots")


@pytest.mark.parametrize(("flat_names", "probabilities"), [(False, False), (True, False), (False, True)])
def test_skim_columns_equal_the_event_assignment_route(
    sample: list[Path], bundle_path: Path, tmp_path: Path, flat_names: bool, probabilities: bool
) -> None:
    """The skim's direct route gives the record of add_calibrated_columns + skim_record."""
    cal = Calibrator(bundle_path)
    for path in (p for p in sample if p.stem in ("mc_vr", "data_vr")):
        is_data = path.name.startswith("data")
        for calibrator in (cal, None):

            def events(path: Path = path):
                return NanoEventsFactory.from_root(
                    {str(path): "Events"},
                    schemaclass=NanoAODSchema,
                    mode="virtual",
                    entry_start=3,
                    entry_stop=57,
                ).events()

            fast, flags = calibration.skim_columns(
                events(),
                calibrator,
                tagger_columns=cal.columns,
                flavour_column=cal.flavour_column,
                is_data=is_data,
                flat_names=flat_names,
                probabilities=probabilities,
            )
            slow_events = events()
            if calibrator is not None:
                slow_events = calibration.add_calibrated_columns(slow_events, cal, is_data=is_data)
            slow = calibration.skim_record(
                slow_events, cal, flat_names=flat_names, probabilities=probabilities
            )
            a, b = ak.zip(fast, depth_limit=1), ak.zip(slow, depth_limit=1)
            assert str(a.type) == str(b.type)
            assert ak.array_equal(a, b, equal_nan=True)
            if calibrator is not None and not is_data:
                # probabilities only on request; the tagger's own columns always
                text = str(a.type)
                assert ("p_b:" in text or "p_b_otcal" in text) == probabilities
                assert f"{cal.columns[0]}_otcal" in a.Jet.fields
            if calibrator is None:
                assert flags is None
                assert not any("otcal" in f.lower() for f in a.Jet.fields)
            else:
                status = ak.flatten(slow_events.Jet.otcal_status)
                assert flags is not None
                assert flags["data" if is_data else "calibrated"] == len(status) > 0
            written = calibration.write_skim_part(fast, tmp_path / "part.parquet", "parquet")
            back = ak.from_parquet(tmp_path / "part.parquet")
            assert written > 0
            assert str(back.type) == str(a.type)
            assert ak.array_equal(back, a, equal_nan=True)


def test_float32_calibrator_writes_float32_columns(sample: list[Path], bundle_path: Path) -> None:
    """NanoAOD keeps tagger scores in float32: a float32 skim writes them so, within 1e-5."""
    path = next(p for p in sample if p.stem == "mc_vr")
    out = {}
    for dtype in (np.float64, np.float32):
        cal = Calibrator(bundle_path, dtype=dtype)
        events = NanoEventsFactory.from_root(
            {str(path): "Events"}, schemaclass=NanoAODSchema, mode="virtual"
        ).events()
        record, _ = calibration.skim_columns(events, cal, tagger_columns=cal.columns,
                                             flavour_column=cal.flavour_column, is_data=False)
        out[dtype] = record["Jet"]
    column = f"{Calibrator(bundle_path).columns[0]}_otcal"
    lo, hi = ak.flatten(out[np.float32][column]), ak.flatten(out[np.float64][column])
    assert str(ak.type(lo)).endswith("float32")
    assert str(ak.type(hi)).endswith("float64")
    assert len(lo) > 100
    np.testing.assert_allclose(ak.to_numpy(lo), ak.to_numpy(hi), rtol=1e-5, atol=1e-6)
    assert ak.flatten(out[np.float32].otcal_status).type == ak.flatten(out[np.float64].otcal_status).type


def test_keep_jet_fields(sample: list[Path], bundle_path: Path, tmp_path: Path) -> None:
    """--keep-jet all keeps every Jet_* branch of the inputs; a list keeps exactly it."""
    import uproot

    out = tmp_path / "all"
    code = main(["apply", str(bundle_path), str(sample[2]), "-o", str(out), "--no-progress",
                 "--keep-jet", "all", "--keep-event", "event,genWeight", "--variations", ""])
    assert code == 0
    manifest = json.loads((out / SKIM_MANIFEST).read_text())
    with uproot.open(sample[2]) as f:
        names = f["Events"].keys()
        jet_id = f["Events"]["Jet_jetId"].array()
    branches = [b[4:] for b in names if b.startswith("Jet_")]
    assert "jetId" in branches
    assert manifest["jet_fields"] == branches
    part = next(iter(read_parts(out).values()))
    assert part.fields == ["event", "genWeight", "Jet"]
    assert set(branches) < set(part.Jet.fields)
    np.testing.assert_array_equal(ak.flatten(part.Jet.jetId), ak.flatten(jet_id))
    narrow = tmp_path / "narrow"
    run_skim(bundle_path, [sample[2]], narrow, progress=False, jet_fields=["pt"], variations=[])
    part = next(iter(read_parts(narrow).values()))
    # exactly the fields asked for, besides the tagger, flavour and calibrated ones
    assert part.Jet.fields[:5] == ["pt", "hadronFlavour", "btagDeepFlavB", "btagDeepFlavCvL",
                                   "btagDeepFlavCvB"]
    assert "eta" not in part.Jet.fields
    assert "mass" not in part.Jet.fields
