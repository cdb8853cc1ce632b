"""Input layouts: the same jets as NanoAOD, PHYSLITE (decorated or linked scores) and a flat ntuple.

Every file is a real ROOT file written with uproot and read back through coffea's own
schemas (NanoAODSchema via the fill, PHYSLITESchema, BaseSchema); the fill's store and the
applier's calibrated columns must not depend on the layout. The PHYSLITE files follow the
derivation's branch names (``AnalysisJetsAuxDyn.pt``, ``BTagging_AntiKt4EMPFlowAuxDyn.GN2v01_pb``,
``AnalysisJetsAuxDyn.btaggingLink.m_persIndex``, ``EventInfoAuxDyn.mcEventWeights``); uproot
writes jagged branches with a counter where Athena writes ``std::vector``, which the schemas
read the same way.
"""

from __future__ import annotations

from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot
from coffea.nanoevents import BaseSchema, NanoEventsFactory, PHYSLITESchema

from coffea_otcal.applier import Calibrator
from coffea_otcal.config import ConfigError
from coffea_otcal.fill import load_config, run_fill
from coffea_otcal.input_layout import (
    InputLayout,
    LayoutError,
    layout_jets,
    read_event_path,
    schema_class,
)
from coffea_otcal.processors.calibration import add_calibrated_columns
from coffea_otcal.processors.control_region import BadInputError
from coffea_otcal.store import load_store
from test_bundle import ETA_CONTEXT, PT_CONTEXT, make_bundle

GN2 = ("GN2v01_pb", "GN2v01_pc", "GN2v01_pu")
FLAVOUR = "HadronConeExclTruthLabelID"
N_EVENTS = 300
#: pt in MeV, as PHYSLITE stores it; every layout holds the same numbers
PT_MEV = dict(PT_CONTEXT, low=20_000.0, high=1_000_000.0)


def _jets(seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Per-event jet counts, flat per-jet columns and two MC weights per event."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 6, N_EVENTS)
    n = int(counts.sum())
    probs = rng.dirichlet([2.0, 1.0, 3.0], n).astype(np.float32)
    ptau = rng.uniform(0.0, 0.02, n).astype(np.float32)
    cols = {
        "pt": rng.uniform(21_000.0, 300_000.0, n).astype(np.float32),
        "eta": rng.uniform(-2.4, 2.4, n).astype(np.float32),
        "phi": rng.uniform(-3.1, 3.1, n).astype(np.float32),
        "m": rng.uniform(1_000.0, 20_000.0, n).astype(np.float32),
        # a sub-composition, as GN2 without ptau
        **{c: probs[:, i] * (1 - ptau) for i, c in enumerate(GN2)},
        FLAVOUR: rng.choice(np.array([0, 4, 5, 15], dtype=np.int32), n, p=[0.5, 0.2, 0.28, 0.02]),
    }
    weights = rng.normal(1.0, 0.2, (N_EVENTS, 2))
    return counts, cols, weights


def _jag(values: np.ndarray, counts: np.ndarray) -> ak.Array:
    return ak.unflatten(values, counts)


def _write_ttree(path: Path, tree: str, records: dict[str, ak.Array], sep: str) -> None:
    """A TTree (uproot's default for a dict is an RNTuple) with one counter per record."""
    with uproot.recreate(path) as f:
        f.mktree(
            tree,
            {k: v.type.content for k, v in records.items()},
            field_name=lambda outer, inner: f"{outer}{sep}{inner}",
            counter_name=lambda counted: f"n{counted}",
        )
        f[tree].extend(records)


def write_nanoaod(path: Path, seed: int = 0) -> Path:
    counts, cols, weights = _jets(seed)
    jets = ak.zip({k: _jag(v, counts) for k, v in cols.items()})
    _write_ttree(path, "Events", {"Jet": jets, "genWeight": ak.Array(weights[:, 0])}, "_")
    return path


def write_physlite(path: Path, seed: int = 0, linked: bool = False) -> Path:
    """PHYSLITE branches; ``linked``: scores in a shuffled BTagging container with links."""
    counts, cols, weights = _jets(seed)
    rng = np.random.default_rng(seed + 1)
    jet_cols = {k: _jag(v, counts) for k, v in cols.items() if not (linked and k in GN2)}
    records: dict[str, ak.Array] = {}
    if linked:
        # one extra b-tagging object per event, in a random order; jet i links to its own
        offsets = np.concatenate([[0], np.cumsum(counts)])
        n_tag = counts + 1
        tag_cols: dict[str, list[np.ndarray]] = {c: [] for c in GN2}
        links = []
        for e in range(N_EVENTS):
            perm = rng.permutation(n_tag[e])  # position of jet i's object: perm[i]
            for c in GN2:
                tag = np.full(n_tag[e], 0.3, dtype=np.float32)
                tag[perm[: counts[e]]] = cols[c][offsets[e] : offsets[e + 1]]
                tag_cols[c].append(tag)
            links.append(perm[: counts[e]].astype(np.uint32))
        link = np.concatenate(links)
        link[3] = np.uint32(2**32 - 1)  # a jet without b-tagging object
        records["BTagging_AntiKt4EMPFlow"] = ak.zip(
            {c: _jag(np.concatenate(tag_cols[c]), n_tag) for c in GN2})
        jet_cols["btaggingLink.m_persIndex"] = _jag(link, counts)
        jet_cols["btaggingLink.m_persKey"] = _jag(np.full(len(link), 1234, np.uint32), counts)
    records["AnalysisJets"] = ak.zip(jet_cols)
    records["EventInfo"] = ak.zip({"mcEventWeights": ak.Array(list(weights))})
    _write_ttree(path, "CollectionTree", records, "AuxDyn.")
    return path


def write_flat(path: Path, seed: int = 0) -> Path:
    """An analysis ntuple: ``jet_pt_NOSYS``, ``jet_GN2v01_pb``, ..., ``weight_mc_NOSYS``."""
    counts, cols, weights = _jets(seed)
    jets = ak.zip({("pt_NOSYS" if k == "pt" else k): _jag(v, counts) for k, v in cols.items()})
    # a per-event branch under the jet prefix, as ntuples often have (jet_n): not a jet field
    _write_ttree(path, "reco", {"jet": jets, "weight_mc_NOSYS": ak.Array(weights[:, 0]),
                                "jet_n": ak.Array(counts.astype(np.int32))}, "_")
    return path


def _config(path: Path, tree: str, weight: str, **extra) -> dict:
    return {
        "datasets": {
            "mc": {"files": [str(path)], "tree": tree, "weight": weight},
            "data": {"files": [str(path)], "tree": tree, "is_data": True},
        },
        "regions": {
            "central": {"datasets": ["mc", "data"], "selection": "abs(eta) < 1.5"},
            "forward": {"datasets": ["mc", "data"], "selection": "abs(eta) >= 1.5"},
        },
        "adapter": {"name": "gn2"},
        "flavour_column": FLAVOUR,
        "flavour_codes": {"b": 5, "c": 4, "light": 0},
        "kinematics": ["pt", "eta"],
        "preselection": {"pt_min": 25_000.0},
        "output": str(path.with_suffix(".parquet")),
        **extra,
    }


def _fill(raw: dict) -> dict[str, np.ndarray]:
    store = load_store(run_fill(load_config(raw), progress=False).output)
    names = ("region", "dataset", "valid", "flavour", "weight", "entry", "jet_index", "kin_eta")
    out = {n: store.column(n) for n in names}
    out["probs"] = np.stack([store.column(f"p_{k}") for k in ("b", "c", "light")], axis=1)
    out["kin_pt"] = store.column("kin_pt")
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("layouts")
    return {
        "nanoaod": write_nanoaod(tmp / "nano.root"),
        "physlite": write_physlite(tmp / "physlite.root"),
        "linked": write_physlite(tmp / "linked.root", linked=True),
        "flat": write_flat(tmp / "flat.root"),
    }


@pytest.fixture(scope="module")
def reference(files) -> dict[str, np.ndarray]:
    return _fill(_config(files["nanoaod"], "Events", "genWeight"))


def _assert_same(store: dict, ref: dict, flagged: np.ndarray | None = None) -> None:
    for name, values in ref.items():
        if name == "probs" and flagged is not None:
            np.testing.assert_array_equal(store[name][~flagged], values[~flagged])
            continue
        if name == "valid" and flagged is not None:
            np.testing.assert_array_equal(store[name], values & ~flagged)
            continue
        np.testing.assert_array_equal(store[name], values, err_msg=name)


def test_physlite_fill_equals_nanoaod(files, reference) -> None:
    """Decorated GN2 scores on AnalysisJets, weights from EventInfo.mcEventWeights[0]."""
    raw = _config(files["physlite"], "CollectionTree", "EventInfo.mcEventWeights[0]",
                  input={"format": "physlite"})
    store = _fill(raw)
    assert len(store["flavour"]) > 500
    _assert_same(store, reference)


def test_physlite_scores_through_the_btagging_link(files, reference) -> None:
    # on a process pool: the layout travels to the workers with the processor
    raw = _config(files["linked"], "CollectionTree", "EventInfo.mcEventWeights[0]",
                  input={"format": "physlite", "btagging": {}},
                  executor={"kind": "futures", "workers": 2, "chunksize": 70})
    store = _fill(raw)
    # the jet whose link points nowhere (the 4th jet of the file) is flagged, never dropped
    counts, _, _ = _jets()
    entry4 = int(np.searchsorted(np.cumsum(counts), 4))
    index4 = 3 - int(np.concatenate([[0], np.cumsum(counts)])[entry4])
    flagged = (store["entry"] == entry4) & (store["jet_index"] == index4)
    assert flagged.sum() == 2  # stored once as MC and once as data
    assert not store["valid"][flagged].any()
    _assert_same(store, reference, flagged)


def test_flat_ntuple_fill_equals_nanoaod(files, reference) -> None:
    raw = _config(files["flat"], "reco", "weight_mc_NOSYS",
                  input={"format": "flat", "fields": {"pt": "pt_NOSYS"}})
    store = _fill(raw)
    _assert_same(store, reference)


def test_layout_errors_name_what_is_missing(files, tmp_path) -> None:
    # a flat ntuple without the renamed branch: the pre-flight check names it
    raw = _config(files["flat"], "reco", "weight_mc_NOSYS", input={"format": "flat"})
    with pytest.raises(BadInputError, match=r"flat.root: tree 'reco' lacks the branches \['jet_pt'\]"):
        run_fill(load_config(raw), progress=False)
    # an event weight index that some events lack
    events = NanoEventsFactory.from_root(
        {str(files["physlite"]): "CollectionTree"}, schemaclass=PHYSLITESchema, mode="eager"
    ).events()
    with pytest.raises(LayoutError, match=r"mcEventWeights\[2\].*300 events have no entry"):
        read_event_path(events, "EventInfo.mcEventWeights[2]", "physlite.root")
    np.testing.assert_array_equal(
        read_event_path(events, "EventInfo.mcEventWeights[1]", "x"), _jets()[2][:, 1]
    )
    with pytest.raises(LayoutError, match="not a field path"):
        read_event_path(events, "EventInfo..w", "x")
    with pytest.raises(LayoutError, match=r"one number per event in x; drop the index \[0\]"):
        read_event_path(events, "nJets[0]", "x")
    with pytest.raises(LayoutError, match="is not one number per event"):
        read_event_path(events, "EventInfo.mcEventWeights", "x")
    # the b-tagging link of a file that has none
    with pytest.raises(LayoutError, match=r"container .BTagging_AntiKt4EMPFlow. \(input.btagging.collection\) is missing"):
        layout_jets(events, InputLayout(format="physlite", btagging={}), "Jets", ["GN2v01_pb"],
                    "physlite.root", tagger_columns=GN2)
    # settings that do not fit the format are refused with the configuration's key
    raw = _config(files["nanoaod"], "Events", "genWeight", input={"btagging": {}})
    with pytest.raises(ConfigError, match="btagging applies to the physlite format only"):
        load_config(raw)


def _events(path: Path, tree: str, schema) -> ak.Array:
    return NanoEventsFactory.from_root({str(path): tree}, schemaclass=schema, mode="eager").events()


def test_applier_reads_every_layout_the_same(files) -> None:
    """add_calibrated_columns on PHYSLITE (linked) and a flat ntuple = the NanoAOD result."""
    cal = Calibrator(make_bundle(context=(PT_MEV, ETA_CONTEXT), adapter="gn2"),
                     flavour_column=FLAVOUR)
    nano = add_calibrated_columns(_events(files["nanoaod"], "Events", schema_class(InputLayout())), cal,
                                  is_data=False)
    ref = {f: ak.to_numpy(ak.flatten(nano.Jet[f])) for f in ("GN2v01_pb_otcal", "otcal_status")}
    ref_up = ak.to_numpy(ak.flatten(nano.Jet.OTCAL_comp.up.GN2v01_pc))
    assert (ref["otcal_status"] == 0).sum() > 500

    linked = add_calibrated_columns(
        _events(files["linked"], "CollectionTree", PHYSLITESchema), cal, is_data=False,
        layout={"format": "physlite", "btagging": {}})
    status = ak.to_numpy(ak.flatten(linked.Jets.otcal_status))
    assert status[3] == 2  # no b-tagging object: invalid score, passed through
    keep = np.arange(len(status)) != 3
    np.testing.assert_array_equal(status[keep], ref["otcal_status"][keep])
    np.testing.assert_array_equal(
        ak.to_numpy(ak.flatten(linked.Jets.GN2v01_pb_otcal))[keep], ref["GN2v01_pb_otcal"][keep])
    assert np.isnan(ak.to_numpy(ak.flatten(linked.Jets.GN2v01_pb_otcal))[3])

    flat = add_calibrated_columns(
        _events(files["flat"], "reco", BaseSchema), cal,
        layout={"format": "flat", "fields": {"pt": "pt_NOSYS"}})  # MC: the flavour branch exists
    np.testing.assert_array_equal(ak.to_numpy(ak.flatten(flat["jet_GN2v01_pb_otcal"])),
                                  ref["GN2v01_pb_otcal"])
    np.testing.assert_array_equal(ak.to_numpy(ak.flatten(flat["jet_OTCAL_comp"].up.GN2v01_pc)),
                                  ref_up)
    # the flat ntuple's jet multiplicities are kept
    np.testing.assert_array_equal(ak.num(flat["jet_GN2v01_pb_otcal"]), ak.num(flat["jet_eta"]))


def test_pipeline_context_follows_physlite_units(files) -> None:
    """The default pt validity range is in MeV for PHYSLITE input; an explicit one is kept."""
    from coffea_otcal.pipeline import PipelineConfig

    fill = _config(files["physlite"], "CollectionTree", "EventInfo.mcEventWeights[0]",
                   input={"format": "physlite"})
    fill["regions"]["vr"] = {"datasets": ["mc", "data"]}
    config = PipelineConfig.model_validate({"fill": fill})
    ranges = {c.column: (c.low, c.high) for c in config.context}
    assert ranges == {"pt": (20_000.0, 1_000_000.0), "eta": (0.0, 2.5)}
    nano = PipelineConfig.model_validate({"fill": {**fill, "input": {}}})
    assert {c.column: c.low for c in nano.context}["pt"] == 20.0
    mine = [{"name": "log_pt", "column": "pt", "transform": "log", "low": 25.0, "high": 500.0}]
    explicit = PipelineConfig.model_validate({"fill": fill, "context": mine})
    assert [(c.low, c.high) for c in explicit.context] == [(25.0, 500.0)]


def test_generated_physlite_sample_fills_like_its_nanoaod_twin(tmp_path) -> None:
    """`coffea-otcal generate --layout physlite` and the demo's configuration for it."""
    from coffea_otcal.generator import GeneratorConfig, generate
    from coffea_otcal.run_cli import demo_config

    stores = {}
    for layout in ("nanoaod", "physlite"):
        cfg = GeneratorConfig(seed=3, scale=0.02, tagger="gn2", quantise=False, layout=layout)
        sample = generate(cfg, tmp_path / layout, progress=False)
        config = demo_config(sample, seed=1)
        fill = config.fill.model_copy(update={"output": str(tmp_path / f"{layout}.parquet")})
        stores[layout] = load_store(run_fill(fill, progress=False).output)
    nano, lite = stores["nanoaod"], stores["physlite"]
    assert len(nano) == len(lite) > 5000
    for name in ("region", "dataset", "valid", "flavour", "weight", "entry", "jet_index",
                 "p_b", "p_c", "p_light", "kin_eta"):
        np.testing.assert_array_equal(lite.column(name), nano.column(name), err_msg=name)
    np.testing.assert_allclose(lite.column("kin_pt"), 1e3 * nano.column("kin_pt"), rtol=1e-6)
    assert lite.metadata.flavour_column == "HadronConeExclTruthLabelID"


def _skim_jets(folder: Path, collection: str) -> dict[str, np.ndarray]:
    import json

    from coffea_otcal.skim import SKIM_MANIFEST

    manifest = json.loads((folder / SKIM_MANIFEST).read_text())
    parts = [ak.from_parquet(folder / name) for name in manifest["parts"]]
    jets = ak.concatenate([p[collection] for p in parts])
    return {f: ak.to_numpy(ak.flatten(jets[f])) for f in ("GN2v01_pb_otcal", "otcal_status")} | {
        "up": ak.to_numpy(ak.flatten(jets.OTCAL_comp.up.GN2v01_pu)),
        "fields": np.array(parts[0].fields, dtype=object),
        "jet_fields": np.array(parts[0][collection].fields, dtype=object),
    }


def test_skims_of_every_layout_agree(files, tmp_path, capsys) -> None:
    """coffea-otcal apply on PHYSLITE (linked scores) and a flat ntuple = the NanoAOD skim."""
    from coffea_otcal.cli import main
    from coffea_otcal.skim import run_skim

    cal = Calibrator(make_bundle(context=(PT_MEV, ETA_CONTEXT), adapter="gn2"),
                     flavour_column=FLAVOUR)
    run_skim(cal, [files["nanoaod"]], tmp_path / "nano", progress=False, is_data=False)
    nano = _skim_jets(tmp_path / "nano", "Jet")
    assert (nano["otcal_status"] == 0).sum() > 500
    run_skim(cal, [files["linked"]], tmp_path / "lite", progress=False, treename="CollectionTree",
             layout={"format": "physlite", "btagging": {}}, jet_fields=["pt", "eta", "m"])
    lite = _skim_jets(tmp_path / "lite", "Jets")
    keep = np.arange(len(lite["otcal_status"])) != 3  # the jet without b-tagging object
    assert lite["otcal_status"][3] == 2
    for key in ("GN2v01_pb_otcal", "otcal_status", "up"):
        np.testing.assert_array_equal(lite[key][keep], nano[key][keep], err_msg=key)
    assert list(lite["jet_fields"][:3]) == ["pt", "eta", "m"]
    # the command line, on the flat ntuple; the default event fields are kept when present
    bundle = tmp_path / "b.json.gz"
    make_bundle(context=(PT_MEV, ETA_CONTEXT), adapter="gn2").save(bundle)
    code = main(["apply", str(bundle), str(files["flat"]), "-o", str(tmp_path / "flat"),
                 "--no-progress", "--treename", "reco", "--input", "flat", "--field",
                 "pt=pt_NOSYS", "--mc", "--keep-jet", "all"])
    assert code == 1  # the bundle's flavour column (hadronFlavour) is not in the ntuple
    assert "no truth-flavour branch 'jet_hadronFlavour'" in capsys.readouterr().err
    code = main(["apply", str(bundle), str(files["flat"]), "-o", str(tmp_path / "flat"),
                 "--no-progress", "--treename", "reco", "--input", "flat", "--field",
                 "pt=pt_NOSYS", "--field", f"hadronFlavour={FLAVOUR}", "--keep-jet", "all",
                 "--precision", "float64"])
    assert code == 0
    flat = _skim_jets(tmp_path / "flat", "jet")
    for key in ("GN2v01_pb_otcal", "otcal_status", "up"):
        np.testing.assert_array_equal(flat[key], nano[key], err_msg=key)
    assert {"pt", "eta", "phi", "m"} <= set(flat["jet_fields"])
    assert "n" not in set(flat["jet_fields"])  # --keep-jet all keeps per-jet numbers only


def test_example_physlite_pipeline_config(tmp_path, capsys) -> None:
    """examples/pipeline_physlite.yaml on a generated PHYSLITE sample: validated, fill stage run."""
    import json
    import shutil

    from coffea_otcal import cli
    from coffea_otcal.generator import GeneratorConfig, generate
    from coffea_otcal.pipeline import load_pipeline_config

    generate(GeneratorConfig(seed=1, scale=0.02, tagger="gn2", quantise=False, layout="physlite"),
             tmp_path / "sample_physlite", progress=False)
    path = tmp_path / "pipeline_physlite.yaml"
    shutil.copy(Path(__file__).parents[1] / "examples" / "pipeline_physlite.yaml", path)
    config = load_pipeline_config(path)
    assert config.fill.input.btagging is not None
    assert config.fill.collection == "Jets"
    assert [c.high for c in config.context] == [1_000_000.0, 2.5]
    out = tmp_path / "out"
    assert cli.main(["run", str(path), "-o", str(out), "--stages", "fill", "--no-progress"]) == 0
    manifest = json.loads((out / "fill" / "manifest.json").read_text())
    assert manifest["summary"]["n_jets"] == 3 * 2000 + 2 * 600
    assert "fill" in capsys.readouterr().out


def test_calibration_processor_wraps_a_physlite_processor(files) -> None:
    """CalibrationProcessor(inner=..., layout=physlite): the inner processor sees Jets calibrated."""
    from coffea import processor

    from coffea_otcal.processors.calibration import CalibrationProcessor

    class Inner(processor.ProcessorABC):
        def process(self, events):
            return {"n": int(ak.sum(ak.num(events.Jets.GN2v01_pb_otcal))),
                    "moved": int(ak.sum(events.Jets.otcal_status == 0))}

        def postprocess(self, accumulator):
            return accumulator

    cal = Calibrator(make_bundle(context=(PT_MEV, ETA_CONTEXT), adapter="gn2"),
                     flavour_column=FLAVOUR)
    proc = CalibrationProcessor(cal, inner=Inner(), is_data=False,
                                layout={"format": "physlite", "btagging": {}})
    out = proc.process(_events(files["linked"], "CollectionTree", PHYSLITESchema))
    counts = _jets()[0]
    assert out["n"] == out["otcal"]["jets"] == int(counts.sum())
    assert out["moved"] == out["otcal"]["status"]["calibrated"] > 500
    assert out["otcal"]["status"]["invalid_score"] == 1  # the jet without b-tagging object
