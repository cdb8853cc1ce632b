from __future__ import annotations

import json
from pathlib import Path

import awkward as ak
import numpy as np
import pyarrow.parquet as pq
import pydantic
import pytest
import uproot
from coffea.nanoevents import NanoAODSchema, NanoEventsFactory
from hypothesis import given, settings
from hypothesis import strategies as st

from coffea_otcal import cli
from coffea_otcal import latent_tagger as lt
from coffea_otcal.adapters import get_adapter
from coffea_otcal.generator import (
    GeneratedSample,
    GeneratorConfig,
    generate,
    latent_head,
    quantise_mantissa,
    sample_response,
    simulate_jets,
)

NANO_V15 = Path(__file__).parent / "data" / "nano_tt_v15.root"
DEEPJET = ("btagDeepFlavB", "btagDeepFlavCvL", "btagDeepFlavCvB")


class ToySchema(NanoAODSchema):
    """NanoAODSchema without the warnings about collections a jets-only file does not have."""

    warn_missing_crossrefs = False


def _events(path: str):
    return NanoEventsFactory.from_root(
        {path: "Events"}, schemaclass=ToySchema, mode="eager"
    ).events()


def _auc(signal: np.ndarray, background: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties)."""
    both = np.concatenate([signal, background])
    order = both.argsort(kind="stable")
    ranks = np.empty(both.size)
    ranks[order] = np.arange(1, both.size + 1)
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    u = ranks[: signal.size].sum() - signal.size * (signal.size + 1) / 2
    return float(u / (signal.size * background.size))


def _cvl(p: np.ndarray) -> np.ndarray:
    """DeepJet CvL = p_c / (p_c + p_light), 0 where both vanish (B = 1 exactly)."""
    den = p[:, 1] + p[:, 2]
    return np.divide(p[:, 1], den, out=np.zeros_like(den), where=den > 0)


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory) -> GeneratedSample:
    cfg = GeneratorConfig(seed=7, scale=0.02)
    return generate(cfg, tmp_path_factory.mktemp("toy"), progress=False)


@pytest.fixture(scope="module")
def latent_sample(tmp_path_factory) -> GeneratedSample:
    cfg = GeneratorConfig(
        seed=3,
        regions={"vr": {"mc_fractions": {"b": 0.4, "c": 0.3, "light": 0.3}, "n_jets": 600}},
        latent={"enabled": True, "latent_dim": 32},
    )
    return generate(cfg, tmp_path_factory.mktemp("latent"), progress=False)


def test_nanoaod_schema_reads_mc_and_data_files(small_sample):
    assert sorted(f.dataset for f in small_sample.files) == sorted(
        f"{k}_{r}" for k in ("mc", "data") for r in ("cr_b", "cr_c", "cr_light", "vr")
    )
    mc = _events(small_sample.file("cr_b", is_data=False).path)
    data = _events(small_sample.file("cr_b", is_data=True).path)
    info = small_sample.file("cr_b", is_data=False)
    assert len(mc) == info.n_events
    assert int(ak.sum(ak.num(mc.Jet))) == info.n_jets == 1000
    assert {"pt", "eta", "phi", "mass", "hadronFlavour", *DEEPJET} <= set(mc.Jet.fields)
    assert "hadronFlavour" not in data.Jet.fields
    assert set(DEEPJET) <= set(data.Jet.fields)
    # NanoAOD conventions: jets ordered by pT, tracker acceptance, unique event ids, weights
    pt = mc.Jet.pt
    assert ak.all(pt[:, 1:] <= pt[:, :-1])
    assert float(ak.min(pt)) >= 20.0
    assert float(ak.max(abs(mc.Jet.eta))) <= 2.5
    assert np.unique(ak.to_numpy(data.event)).size == len(data)
    assert set(ak.to_numpy(mc.run).tolist()) == {1}
    np.testing.assert_array_equal(ak.to_numpy(data.genWeight), 1.0)
    counts = np.bincount(ak.to_numpy(ak.flatten(mc.Jet.hadronFlavour)), minlength=6)
    assert counts[[5, 4, 0]].tolist() == [info.flavour_counts[c] for c in ("b", "c", "light")]
    # four-momenta behaviour works
    assert float(ak.min(mc.Jet.energy)) > 0


def test_jet_truth_sidecar_matches_files_also_for_data(small_sample):
    table = pq.read_table(small_sample.jet_truth_path).to_pandas()
    info = small_sample.file("cr_c", is_data=True)
    rows = table[table["file"] == Path(info.path).name]
    assert len(rows) == info.n_jets
    tree = uproot.open(info.path)["Events"]
    events = tree["event"].array(library="np")
    n_jet = tree["nJet"].array(library="np")
    expected_events = np.repeat(events, n_jet)
    order = np.lexsort((rows["jet"].to_numpy(), rows["event"].to_numpy()))
    np.testing.assert_array_equal(rows["event"].to_numpy()[order], expected_events)
    np.testing.assert_array_equal(
        rows["pt"].to_numpy()[order], ak.to_numpy(ak.flatten(tree["Jet_pt"].array()))
    )
    flav = rows["flavour"].to_numpy()
    assert [(flav == code).sum() for code in (5, 4, 0)] == [
        info.flavour_counts[c] for c in ("b", "c", "light")
    ]
    truth = json.loads(Path(small_sample.truth_path).read_text())
    data_truth = truth["regions"]["cr_c"]["data"]
    assert data_truth["configured_fractions"] == pytest.approx(
        {"b": 0.07, "c": 0.85, "light": 0.08}
    )
    assert truth["tagger"]["columns"] == list(DEEPJET)
    assert truth["writer_info"]["package"] == "coffea-otcal"


def test_load_round_trips_and_gives_a_fileset(small_sample):
    loaded = GeneratedSample.load(small_sample.outdir)
    assert loaded == small_sample
    fileset = loaded.fileset()
    assert fileset["data_vr"]["metadata"] == {"region": "vr", "is_data": True}
    assert list(fileset["mc_cr_b"]["files"].values()) == ["Events"]
    with pytest.raises(FileNotFoundError, match="run `coffea-otcal generate"):
        GeneratedSample.load(Path(small_sample.outdir) / "missing")


@pytest.mark.parametrize("is_data", [False, True])
@pytest.mark.parametrize("region", ["cr_b", "cr_c", "cr_light", "vr"])
def test_truth_fractions_match_configuration(region, is_data):
    cfg = GeneratorConfig()
    n = 20_000
    jets = simulate_jets(cfg, region, n, is_data, np.random.default_rng(11))
    expected = cfg.regions[region].fractions(is_data).as_array()
    observed = np.array([(jets["flavour"] == code).sum() for code in (5, 4, 0)])
    sigma = np.sqrt(n * expected * (1 - expected))
    assert np.all(np.abs(observed - n * expected) < 4 * sigma), (observed, n * expected)


def test_default_fractions_are_kim_yang_table_1_and_data_differs():
    cfg = GeneratorConfig()
    b = cfg.regions["cr_b"]
    assert (b.mc_fractions.b, b.mc_fractions.c, b.mc_fractions.light) == (0.90, 0.04, 0.06)
    light = cfg.regions["cr_light"].mc_fractions.as_array()
    np.testing.assert_allclose(light, np.array([0.0505, 0.0887, 0.861]) / 1.0002)
    for name in ("cr_b", "cr_c", "cr_light"):
        reg = cfg.regions[name]
        assert not np.allclose(reg.fractions(True).as_array(), reg.fractions(False).as_array())
    np.testing.assert_allclose(cfg.regions["vr"].fractions(True).as_array(), 1 / 3)
    assert cfg.jets("vr", is_data=True) >= 30_000
    assert cfg.jets("cr_c", is_data=False) == 50_000


def test_simulation_is_deterministic_for_a_seed():
    cfg = GeneratorConfig()
    first = simulate_jets(cfg, "cr_c", 3000, True, np.random.default_rng(5))
    again = simulate_jets(cfg, "cr_c", 3000, True, np.random.default_rng(5))
    other = simulate_jets(cfg, "cr_c", 3000, True, np.random.default_rng(6))
    assert first.keys() == again.keys()
    for key in first:
        assert first[key].tobytes() == again[key].tobytes(), key
    assert first["probs"].tobytes() != other["probs"].tobytes()


def test_generate_is_deterministic_for_a_seed(tmp_path):
    cfg = GeneratorConfig(seed=99, scale=0.004)
    one = generate(cfg, tmp_path / "one", progress=False)
    two = generate(cfg, tmp_path / "two", progress=False)
    three = generate(cfg.model_copy(update={"seed": 100}), tmp_path / "three", progress=False)
    for f1, f2, f3 in zip(one.files, two.files, three.files, strict=True):
        a, b, c = (uproot.open(f.path)["Events"].arrays() for f in (f1, f2, f3))
        assert a.fields == b.fields
        flat = lambda arr, key: ak.to_numpy(ak.flatten(arr[key], axis=None))  # noqa: E731
        for key in a.fields:
            assert flat(a, key).tobytes() == flat(b, key).tobytes(), (f1.dataset, key)
        assert not np.array_equal(flat(a, "Jet_pt"), flat(c, "Jet_pt"))
    t1 = pq.read_table(one.jet_truth_path)
    t2 = pq.read_table(two.jet_truth_path)
    assert t1.equals(t2)
    # no temporary files are left behind by the atomic writes
    assert not [p for p in (tmp_path / "one").iterdir() if p.name.startswith(".")]


def test_a_region_does_not_change_when_other_regions_are_removed(small_sample, tmp_path):
    cfg = GeneratorConfig(seed=7, scale=0.02)
    only_vr = cfg.model_copy(update={"regions": {"vr": cfg.regions["vr"]}})
    sample = generate(only_vr, tmp_path, progress=False)
    a = uproot.open(sample.file("vr", True).path)["Events"]["Jet_btagDeepFlavB"].array()
    b = uproot.open(small_sample.file("vr", True).path)["Events"]["Jet_btagDeepFlavB"].array()
    assert ak.all(ak.flatten(a) == ak.flatten(b))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(st.just(0.0), st.floats(float(np.finfo(np.float32).tiny), 1.0, width=32)),
        min_size=1,
        max_size=50,
    )
)
def test_quantise_mantissa_is_nanoaod_rounding(values):
    x = np.array(values, dtype=np.float32)
    q = quantise_mantissa(x, 10)
    assert q.dtype == np.float32
    assert np.all(q.view(np.uint32) & np.uint32((1 << 13) - 1) == 0)  # 10 stored bits
    assert np.all(np.abs(q - x) <= np.abs(x) * 2.0**-11)  # round to nearest (normal floats)
    np.testing.assert_array_equal(quantise_mantissa(q, 10), q)  # idempotent
    assert np.all((q >= 0) & (q <= 1))


def test_quantised_scores_sit_on_the_nanoaod_grid():
    assert float(quantise_mantissa(np.float32(0.9998), 10)) == 1.0
    assert float(quantise_mantissa(np.float32(0.9997), 10)) == 0.99951171875
    cfg = GeneratorConfig()
    jets = sample_response(cfg, "b", 40_000, False, np.random.default_rng(1))
    from coffea_otcal.adapters import get_adapter

    stored = {k: quantise_mantissa(v, 10) for k, v in get_adapter("deepjet").from_simplex(jets["probs"]).items()}
    b = stored["btagDeepFlavB"]
    assert b[b < 1].max() == 0.99951171875
    assert (b == 1.0).sum() > 100  # point mass at the vertex, as in real NanoAOD
    # ... where the adapter takes p_c / p_b from CvB, so p_b stays below 1
    pb = jets["probs"][:, 0]
    assert pb.max() < 1.0
    assert np.all(jets["probs"][b == 1.0, 1] > 0)
    raw = sample_response(
        cfg.model_copy(update={"quantise": False}), "b", 40_000, False, np.random.default_rng(1)
    )
    assert raw["probs"][:, 0][raw["probs"][:, 0] < 1].max() > 0.99951171875
    np.testing.assert_allclose(raw["probs"], jets["probs"], atol=2.0**-10)
    # the returned probabilities are what the adapter reads back from the stored columns
    np.testing.assert_allclose(jets["probs"].sum(axis=1), 1.0, atol=1e-12)


def test_pseudo_data_is_less_discriminating_and_mismodelling_is_controllable():
    cfg = GeneratorConfig()
    n = 15_000

    def aucs(config, is_data):
        rng = np.random.default_rng(2)
        b = sample_response(config, "b", n, is_data, rng)["probs"]
        c = sample_response(config, "c", n, is_data, rng)["probs"]
        light = sample_response(config, "light", n, is_data, rng)["probs"]
        return _auc(b[:, 0], light[:, 0]), _auc(_cvl(c), _cvl(light))

    mc_bl, mc_cl = aucs(cfg, False)
    data_bl, data_cl = aucs(cfg, True)
    assert mc_bl - data_bl > 0.01
    assert mc_cl - data_cl > 0.02
    off = cfg.model_copy(
        update={"mismodelling": cfg.mismodelling.model_copy(update={"strength": 0.0})}
    )
    off_bl, off_cl = aucs(off, True)
    assert abs(off_bl - mc_bl) < 0.005
    assert abs(off_cl - mc_cl) < 0.01


def test_tagger_response_depends_on_pt():
    cfg = GeneratorConfig(mismodelling={"strength": 0.0})
    rng = np.random.default_rng(4)
    n = 10_000

    def auc_at(pt):
        pts = np.full(n, pt)
        b = sample_response(cfg, 5, n, False, rng, pt=pts)["probs"][:, 0]
        light = sample_response(cfg, 0, n, False, rng, pt=pts)["probs"][:, 0]
        return _auc(b, light)

    low, mid, high = auc_at(22.0), auc_at(100.0), auc_at(900.0)
    assert mid > low + 0.01
    assert mid > high + 0.01
    # mismodelling grows with pT (positive slope): the data/MC gap is larger at high pT
    gaps = []
    for pt in (25.0, 400.0):
        pts = np.full(n, pt)
        rng_mc, rng_data = np.random.default_rng(8), np.random.default_rng(8)
        mc = sample_response(GeneratorConfig(), "light", n, False, rng_mc, pt=pts)["probs"][:, 0]
        data = sample_response(GeneratorConfig(), "light", n, True, rng_data, pt=pts)["probs"][:, 0]
        gaps.append(np.mean(data > 0.3) - np.mean(mc > 0.3))
    assert gaps[1] > gaps[0] > 0


def test_shapes_resemble_deepjet_in_real_ttbar():
    cfg = GeneratorConfig(mismodelling={"strength": 0.0})
    rng = np.random.default_rng(12)
    toy = {f: sample_response(cfg, f, 10_000, False, rng)["probs"] for f in (5, 4, 0)}
    tree = uproot.open(NANO_V15)["Events"]
    flav = ak.to_numpy(ak.flatten(tree["Jet_hadronFlavour"].array()))
    real_b = ak.to_numpy(ak.flatten(tree["Jet_btagDeepFlavB"].array()))
    for code in (5, 4, 0):
        toy_med = np.median(toy[code][:, 0])
        real_med = np.median(real_b[flav == code])
        # medians of B agree within a factor of two in log-odds
        logit = lambda p: np.log(p / (1 - p))  # noqa: E731
        assert abs(logit(min(toy_med, 0.999)) - logit(min(real_med, 0.999))) < np.log(4.0), code
    assert np.median(toy[5][:, 0]) > 0.8
    assert np.median(toy[0][:, 0]) < 0.05
    cvl = {f: _cvl(p) for f, p in toy.items()}
    assert np.quantile(cvl[4], 0.75) > 0.4 > np.quantile(cvl[0], 0.9)


def test_latent_mode_writes_latents_and_the_head_reproduces_the_scores(latent_sample):
    cfg = latent_sample.config
    events = _events(latent_sample.file("vr", is_data=False).path)
    names = [f"latent_{i}" for i in range(32)]
    assert set(names) <= set(events.Jet.fields)
    assert "latent_32" not in events.Jet.fields
    z = np.stack([ak.to_numpy(ak.flatten(events.Jet[name])) for name in names], axis=1)
    assert z.dtype == np.float32
    head = latent_head(cfg)
    probs = head(z.astype(np.float64))
    stored = get_adapter("deepjet").to_simplex(
        {c: ak.to_numpy(ak.flatten(events.Jet[c])) for c in DEEPJET}
    )[0]
    np.testing.assert_allclose(probs, stored, atol=2.0**-10)
    assert head.penultimate(z).shape == (z.shape[0], 32)
    # the network is a faithful copy of the Bayes tagger on simulated jets
    rng = np.random.default_rng(0)
    jets = simulate_jets(cfg, "vr", 4000, False, rng)
    bayes = np.exp(lt.bayes_log_probs(jets["features"], jets["pt"], jets["eta"]))
    assert np.mean(np.abs(jets["probs_raw"] - bayes).max(axis=1)) < 0.005
    # the latent of pseudo-data differs from MC (smeared inputs)
    data = simulate_jets(cfg, "vr", 4000, True, np.random.default_rng(0))
    assert data["latent"].std(axis=0).mean() > jets["latent"].std(axis=0).mean()


def test_latent_head_torch_copy_matches_numpy():
    import torch

    cfg = GeneratorConfig(latent={"enabled": True, "latent_dim": 16})
    head = latent_head(cfg)
    z = np.random.default_rng(0).standard_normal((50, 16))
    logits = head.to_torch()(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(logits, head.logits(z), rtol=1e-10, atol=1e-10)
    assert GeneratorConfig().latent.latent_dim == 128


def test_gn2_format_writes_probability_columns(tmp_path):
    cfg = GeneratorConfig(
        tagger="gn2",
        regions={"cr_b": {"mc_fractions": {"b": 0.9, "c": 0.04, "light": 0.06}, "n_jets": 300}},
    )
    sample = generate(cfg, tmp_path, progress=False)
    tree = uproot.open(sample.file("cr_b", False).path)["Events"]
    cols = [ak.to_numpy(ak.flatten(tree[f"Jet_GN2v01_{c}"].array())) for c in ("pb", "pc", "pu")]
    np.testing.assert_allclose(np.sum(cols, axis=0), 1.0, atol=3e-3)


def test_event_sizes_sum_exactly_and_respect_the_cap():
    counts = lt.sample_event_sizes(10_001, np.random.default_rng(0), 5.0, 9)
    assert counts.sum() == 10_001
    assert counts.min() >= 1
    assert counts.max() <= 9
    assert 4.0 < counts[:-1].mean() < 5.0
    assert lt.sample_event_sizes(0, np.random.default_rng(0), 5.0, 9).size == 0


@pytest.mark.parametrize(
    ("update", "match"),
    [
        ({"regions": {"cr_b": {"mc_fractions": {"b": 0.9, "c": 0.2, "light": 0.1}}}}, "sum to 1.2"),
        (
            {"regions": {"CR b": {"mc_fractions": {"b": 0.9, "c": 0.05, "light": 0.05}}}},
            "must match",
        ),
        ({"regions": {}}, "at least one region"),
        ({"seeed": 1}, "Extra inputs are not permitted"),
        ({"tagger": "deepcsv"}, "deepjet"),
        ({"kinematics": {"pt_min": 50, "pt_max": 30}}, "must exceed pt_min"),
        ({"scale": -1}, "greater than 0"),
    ],
)
def test_bad_configs_are_refused_with_a_clear_message(update, match):
    with pytest.raises(pydantic.ValidationError, match=match):
        GeneratorConfig.model_validate(update)


def test_config_files_round_trip_and_unknown_things_are_refused(tmp_path):
    cfg = GeneratorConfig(seed=5, scale=0.5, latent={"enabled": True})
    for name in ("cfg.json", "cfg.yaml"):
        cfg.to_file(tmp_path / name)
        assert GeneratorConfig.from_file(tmp_path / name) == cfg
    (tmp_path / "cfg.txt").write_text("{}")
    with pytest.raises(ValueError, match=r"must end in \.json, \.yaml or \.yml"):
        GeneratorConfig.from_file(tmp_path / "cfg.txt")
    with pytest.raises(KeyError, match="unknown region 'sr'"):
        simulate_jets(cfg, "sr", 10, False, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown flavour 'tau'"):
        sample_response(cfg, "tau", 10, False, np.random.default_rng(0))


def test_cli_generate(tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli.main(["generate", str(out), "--seed", "1", "--jets", "200", "--no-progress"])
    assert code == 0
    truth = json.loads((out / "truth.json").read_text())
    assert truth["config"]["seed"] == 1
    assert {f["n_jets"] for f in truth["files"]} == {200}
    assert len(list(out.glob("*.root"))) == 8
    assert "mc_cr_b.root" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"regions": {"vr": {"mc_fractions": {"b": 1, "c": 1, "light": 1}}}}))
    assert cli.main(["generate", str(out), "--config", str(bad), "--no-progress"]) == 1
    assert "sum to 3" in capsys.readouterr().err
