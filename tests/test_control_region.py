from __future__ import annotations

import concurrent.futures
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot
from coffea import processor
from coffea.nanoevents import NanoEventsFactory
from hypothesis import given, settings
from hypothesis import strategies as st

from coffea_otcal.processors.control_region import (
    BadInputError,
    ControlRegionProcessor,
    ControlRegionSchema,
    DatasetSpec,
    JetChunks,
    RegionSpec,
    SelectionExpression,
    jet_uniforms,
)

DATA = Path(__file__).parent / "data"
NANO_DY = DATA / "nano_dy.root"


def write_toy(path, n_events, seed, is_data=False, latent_dim=0):
    """A small NanoAOD-like file: nJet, Jet_{pt,eta,phi,btagDeepFlav*,hadronFlavour,latent_i}."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 6, n_events)
    n = int(counts.sum())
    flav = rng.choice([5, 4, 0], n, p=[0.2, 0.2, 0.6])
    fields = {
        "pt": rng.uniform(20, 200, n).astype(np.float32),
        "eta": rng.uniform(-2.8, 2.8, n).astype(np.float32),
        "phi": rng.uniform(-3.1, 3.1, n).astype(np.float32),
        "btagDeepFlavB": np.where(flav == 5, rng.beta(5, 1, n), rng.beta(1, 5, n)).astype(
            np.float32
        ),
        "btagDeepFlavCvL": rng.beta(2, 2, n).astype(np.float32),
        "btagDeepFlavCvB": rng.beta(2, 2, n).astype(np.float32),
    }
    fields["btagDeepFlavB"][rng.random(n) < 0.05] = -1.0
    if not is_data:
        fields["hadronFlavour"] = flav.astype(np.int32)
    for i in range(latent_dim):
        fields[f"latent_{i}"] = rng.normal(size=n).astype(np.float32)
    tree = {
        "Jet": ak.unflatten(ak.zip(fields), counts),
        "run": np.ones(n_events, np.uint32),
        "luminosityBlock": np.ones(n_events, np.uint32),
        "event": np.arange(n_events, dtype=np.uint64),
    }
    if not is_data:
        tree["genWeight"] = rng.normal(1.0, 0.1, n_events).astype(np.float32)
    with uproot.recreate(path) as f:
        f.mktree("Events", tree)  # a TTree, as NanoAOD (f["Events"] = ... writes an RNTuple)
    return path


def run(fileset, proc, executor=None, chunksize=100_000):
    runner = processor.Runner(
        executor or processor.IterativeExecutor(status=False),
        pre_executor=processor.IterativeExecutor(status=False),
        schema=ControlRegionSchema,
        chunksize=chunksize,
        metadata_cache={},
    )
    return runner({k: [str(f) for f in v] for k, v in fileset.items()}, proc, treename="Events")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    base = tmp_path_factory.mktemp("toy")
    return {
        "mc": [
            write_toy(base / "mc_0.root", 700, 1, latent_dim=2),
            write_toy(base / "mc_1.root", 500, 2, latent_dim=2),
        ],
        "data": [write_toy(base / "data_0.root", 600, 3, is_data=True, latent_dim=2)],
    }


def _toy_flat(path, field):
    return ak.to_numpy(ak.flatten(uproot.open(path)["Events"][f"Jet_{field}"].array()))


@pytest.mark.filterwarnings("ignore:Branch Photon_.* already exists:RuntimeWarning")
def test_missing_branch_names_the_branch_and_the_file():
    events = NanoEventsFactory.from_root(
        {str(NANO_DY): "Events"},
        schemaclass=ControlRegionSchema,
        mode="virtual",
        metadata={"dataset": "dy", "filename": str(NANO_DY)},
    ).events()
    proc = ControlRegionProcessor("deepjet", {"all": RegionSpec(("dy",))}, {"dy": DatasetSpec()})
    with pytest.raises(
        BadInputError,
        match=r"branch 'Jet_btagDeepFlavCvL' \(jet\) is missing in file '.*nano_dy.root'",
    ):
        proc.process(events)


def test_regions_selections_weights_and_data(toy):
    def forward(events, jets):
        return jets.eta > 0

    regions = {
        "central": RegionSpec(("mc", "data"), "pt > 40 & abs(eta) < 2.4"),
        "forward": RegionSpec(("mc",), forward),
        "all": RegionSpec(("mc",)),
    }
    datasets = {"mc": DatasetSpec(scale=2.0), "data": DatasetSpec(is_data=True, scale=3.0)}
    proc = ControlRegionProcessor("deepjet", regions, datasets, pt_min=25.0, latent_dim=2)
    out = run(toy, proc)
    pt = np.concatenate([_toy_flat(f, "pt") for f in toy["mc"]])
    eta = np.concatenate([_toy_flat(f, "eta") for f in toy["mc"]])
    pre = pt > 25.0
    central = out["jets"]["central"]["mc"]
    assert len(central["valid"]) == int((pre & (pt > 40) & (np.abs(eta) < 2.4)).sum())
    np.testing.assert_array_equal(central["kin"][:, 0], pt[pre & (pt > 40) & (np.abs(eta) < 2.4)])
    assert len(out["jets"]["forward"]["mc"]["valid"]) == int((pre & (eta > 0)).sum())
    cut = out["cutflow"]["all"]["mc"]
    assert cut["jets"] == len(pt)
    assert cut["jets_preselected"] == cut["jets_selected"] == int(pre.sum())
    flagged = np.concatenate([_toy_flat(f, "btagDeepFlavB") for f in toy["mc"]]) < 0
    assert cut["jets_flagged"] == int((pre & flagged).sum()) > 0
    assert sum(cut["flavours"].values()) == cut["jets_selected"]
    gen = np.concatenate(
        [uproot.open(f)["Events"]["genWeight"].array(library="np") for f in toy["mc"]]
    )
    np.testing.assert_allclose(cut["sum_event_weights"], 2.0 * gen.astype(np.float64).sum())
    data = out["jets"]["central"]["data"]
    assert np.all(data["flavour"] == -1)
    np.testing.assert_array_equal(data["weight"], 3.0)
    assert out["cutflow"]["central"]["data"]["flavours"] == {}
    lat = np.concatenate([_toy_flat(f, "latent_1") for f in toy["mc"]])
    np.testing.assert_array_equal(out["jets"]["all"]["mc"]["latent"][:, 1], lat[pre])


def test_no_kinematics_and_selection_on_other_fields(toy):
    proc = ControlRegionProcessor(
        "deepjet",
        {"r": RegionSpec(("mc",), "btagDeepFlavCvL > 0.5")},
        {"mc": DatasetSpec()},
        kinematics=(),
    )
    out = run({"mc": toy["mc"]}, proc)
    jets = out["jets"]["r"]["mc"]
    cvl = np.concatenate([_toy_flat(f, "btagDeepFlavCvL") for f in toy["mc"]])
    assert jets["kin"].shape == ((cvl > 0.5).sum(), 0)
    np.testing.assert_array_equal(jets["raw"][:, 1], cvl[cvl > 0.5])


def test_output_is_independent_of_chunking_and_fixed_by_the_seed(toy):
    def fill(seed, chunksize):
        proc = ControlRegionProcessor(
            "deepjet",
            {"r": RegionSpec(("mc", "data"), "pt > 30")},
            {"mc": DatasetSpec(), "data": DatasetSpec(is_data=True)},
            seed=seed,
        )
        return run(toy, proc, chunksize=chunksize)

    big, small, other = fill(7, 100_000), fill(7, 137), fill(8, 100_000)
    for dataset in ("mc", "data"):
        a, b = big["jets"]["r"][dataset], small["jets"]["r"][dataset]
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        assert not np.array_equal(a["rand"], other["jets"]["r"][dataset]["rand"])
    assert big["cutflow"] == small["cutflow"]
    rand = big["jets"]["r"]["mc"]["rand"]
    assert rand.min() >= 0.0
    assert rand.max() < 1.0
    assert abs(rand.mean() - 0.5) < 0.03


def _assert_same(a, b):
    assert a["cutflow"] == b["cutflow"]
    for region, per in a["jets"].items():
        for dataset, arrays in per.items():
            for name, values in arrays.items():
                np.testing.assert_array_equal(
                    values, b["jets"][region][dataset][name], err_msg=name
                )


def _toy_processor():
    return ControlRegionProcessor(
        "deepjet",
        {
            "b": RegionSpec(("mc", "data"), "btagDeepFlavB > 0.5"),
            "l": RegionSpec(("mc",), "btagDeepFlavB < 0.1"),
        },
        {"mc": DatasetSpec(), "data": DatasetSpec(is_data=True)},
        latent_dim=2,
    )


def test_futures_executor_equals_iterative(toy):
    eager = run(toy, _toy_processor(), chunksize=400)
    threads = processor.FuturesExecutor(
        workers=2, pool=concurrent.futures.ThreadPoolExecutor, status=False
    )
    _assert_same(eager, run(toy, _toy_processor(), threads, chunksize=400))


@pytest.mark.slow
def test_dask_executor_on_local_cluster_with_worker_processes_equals_iterative(toy):
    import distributed

    eager = run(toy, _toy_processor(), chunksize=400)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        executor = processor.DaskExecutor(client=client, status=False)
        dask_out = run(toy, _toy_processor(), executor, chunksize=400)
        assert len(client.scheduler_info()["workers"]) == 2
    _assert_same(eager, dask_out)


def test_jet_chunks_refuse_a_chunk_seen_twice():
    part = {("r", "d"): {("f", 0): {"valid": np.ones(1, bool)}}}
    acc = JetChunks(dict(part))
    with pytest.raises(ValueError, match="processed twice"):
        acc.add(JetChunks(dict(part)))


def test_processor_refuses_unknown_dataset_and_adapter():
    with pytest.raises(ValueError, match=r"region 'r' names unknown datasets \['nope'\]"):
        ControlRegionProcessor("deepjet", {"r": RegionSpec(("nope",))}, {"mc": DatasetSpec()})
    with pytest.raises(ValueError, match="unknown tagger adapter 'deepcsv'"):
        ControlRegionProcessor("deepcsv", {"r": RegionSpec(("mc",))}, {"mc": DatasetSpec()})


def test_selection_expression_precedence_and_functions():
    env = {"pt": np.array([10.0, 35, 50, 80]), "eta": np.array([0.1, -2.6, 1.0, -1.0])}
    assert SelectionExpression("pt > 30 & abs(eta) < 2.5")(env).tolist() == [
        False,
        False,
        True,
        True,
    ]
    assert SelectionExpression("pt < 20 | ~(pt < 60)")(env).tolist() == [True, False, False, True]
    assert SelectionExpression("20 < pt <= 50 and not eta > 0.5")(env).tolist() == [
        False,
        True,
        False,
        False,
    ]
    assert SelectionExpression("sqrt(pt**2) / 2 >= maximum(eta, 20)")(env).tolist() == [
        False,
        False,
        True,
        True,
    ]
    assert SelectionExpression("True")(env).tolist() == [True] * 4


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("__import__('os').system('true')", "calls only"),
        ("pt.__class__", "Attribute"),
        ("[pt][0] > 1", "is not allowed"),
        ("lambda: 1", "Lambda"),
        ("pt > 'x'", "Constant"),
        ("round(pt) > 1", "calls only"),
        ("pt >", "not a valid expression"),
        ("abs(x=pt) > 1", "positional arguments only"),
    ],
)
def test_selection_expression_refuses_anything_else(text, match):
    with pytest.raises(ValueError, match=match):
        SelectionExpression(text)


def test_selection_expression_needs_booleans_and_known_fields():
    with pytest.raises(ValueError, match="gives float64 values, not booleans"):
        SelectionExpression("pt * 2")({"pt": np.ones(3)})
    with pytest.raises(KeyError, match=r"needs the jet fields \['eta'\]"):
        SelectionExpression("eta > 1")({"pt": np.ones(3)})


@settings(max_examples=50, deadline=None)
@given(
    lo=st.floats(0, 100),
    hi=st.floats(0, 100),
    eta_max=st.floats(0.1, 3.0),
    seed=st.integers(0, 1000),
)
def test_selection_expression_matches_numpy(lo, hi, eta_max, seed):
    rng = np.random.default_rng(seed)
    env = {"pt": rng.uniform(0, 120, 50), "eta": rng.uniform(-3, 3, 50)}
    got = SelectionExpression(f"pt > {lo!r} & pt <= {hi!r} | abs(eta) >= {eta_max!r}")(env)
    want = ((env["pt"] > lo) & (env["pt"] <= hi)) | (np.abs(env["eta"]) >= eta_max)
    np.testing.assert_array_equal(got, want)


def test_jet_uniforms_are_deterministic_and_distinct():
    entry, idx = np.repeat(np.arange(1000), 3), np.tile(np.arange(3), 1000)
    u = jet_uniforms(1, "mc", "/a/f.root", entry, idx)
    np.testing.assert_array_equal(u, jet_uniforms(1, "mc", "/elsewhere/f.root", entry, idx))
    assert len(np.unique(u)) == len(u)
    assert not np.array_equal(u, jet_uniforms(2, "mc", "/a/f.root", entry, idx))
    assert not np.array_equal(u, jet_uniforms(1, "data", "/a/f.root", entry, idx))
    hist, _ = np.histogram(u, bins=10, range=(0, 1))
    assert hist.min() > 240
