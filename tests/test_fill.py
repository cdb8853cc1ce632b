from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import uproot
import yaml

from coffea_otcal import geometry
from coffea_otcal.cli import main
from coffea_otcal.fill import ConfigError, check_file, load_config, run_fill
from coffea_otcal.generator import GeneratorConfig, generate
from coffea_otcal.processors.control_region import BadInputError
from coffea_otcal.store import load_store

DATA = Path(__file__).parent / "data"
NANO_V15 = DATA / "nano_tt_v15.root"
NANO_DY = DATA / "nano_dy.root"


def _write(path, doc):
    path.write_text(yaml.safe_dump(doc) if path.suffix != ".toml" else doc)
    return path


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A generated toy sample (coffea_otcal.generator) with known truth."""
    out = tmp_path_factory.mktemp("gen")
    generate(GeneratorConfig(seed=5, scale=0.04), out, progress=False)
    return out


def _toy_config(sample, tmp_path, **extra):
    doc = {
        "datasets": {
            "mc_b": {"files": [str(sample / "mc_cr_b.root")]},
            "data_b": {"files": [str(sample / "data_cr_b.root")], "is_data": True},
            "mc_l": {"files": [str(sample / "mc_cr_*.root")]},
        },
        "regions": {
            "cr_b": {"datasets": ["mc_b", "data_b"], "selection": "btagDeepFlavB > 0.1"},
            "cr_l": {"datasets": ["mc_l"]},
        },
        "adapter": {"name": "deepjet"},
        "output": str(tmp_path / "cr.parquet"),
        "executor": {"kind": "iterative", "chunksize": 150},
        "seed": 3,
    }
    doc.update(extra)
    return load_config(doc)


def test_cli_deepjet_on_real_nanoaod(tmp_path, capsys):
    shutil.copy(NANO_V15, tmp_path / "nano_tt_v15.root")
    cfg = _write(
        tmp_path / "fill.yaml",
        {
            "datasets": {"ttbar": {"files": ["nano_tt_v15.root"]}},
            "regions": {"all_jets": {"datasets": ["ttbar"]}},
            "adapter": {"name": "deepjet"},
            "output": "store/cr.parquet",
        },
    )
    assert main(["fill", str(cfg), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "1636" in printed
    assert "b=348 c=194 light=1094" in printed
    store = load_store(tmp_path / "store" / "cr.parquet")
    assert len(store) == 1636
    assert store.cutflow["all_jets"]["ttbar"].jets_flagged == 0
    flav = store.flavour()
    assert [(flav == c).sum() for c in (5, 4, 0)] == [348, 194, 1094]
    assert len(store.probs(flavour="b")) == 348
    probs = store.probs()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    clipped = geometry.clip_simplex(probs)
    assert np.all((clipped > 0) & (clipped < 1))
    assert np.all(np.isfinite(store.ilr()))
    assert store.metadata.adapter["name"] == "deepjet"
    assert store.metadata.datasets["ttbar"].files == [str(tmp_path / "nano_tt_v15.root")]
    tree = uproot.open(NANO_V15)["Events"]
    raw_b = np.concatenate(tree["Jet_btagDeepFlavB"].array().to_list())
    sel = store.select()
    np.testing.assert_array_equal(sel.raw[:, 0], raw_b)
    np.testing.assert_array_equal(sel.probs[:, 0], raw_b)
    gen = tree["genWeight"].array(library="np")
    np.testing.assert_allclose(sel.weight, np.repeat(gen, tree["nJet"].array(library="np")))
    np.testing.assert_allclose(
        store.cutflow["all_jets"]["ttbar"].sum_event_weights, gen.astype(np.float64).sum()
    )
    assert store.kinematics == ("pt", "eta", "phi")
    pt = np.concatenate(tree["Jet_pt"].array().to_list())
    np.testing.assert_array_equal(store.kin(["pt"])[:, 0], pt)


def test_cli_upart_toml_flags_378_jets(tmp_path, capsys):
    cfg = _write(
        tmp_path / "fill.toml",
        f"""
output = "cr.parquet"
[adapter]
name = "upart"
[datasets.ttbar]
files = ["{NANO_V15}"]
[regions.all_jets]
datasets = ["ttbar"]
[executor]
kind = "iterative"
""",
    )
    assert main(["fill", str(cfg), "--no-progress", "--seed", "9"]) == 0
    store = load_store(tmp_path / "cr.parquet")
    assert store.cutflow["all_jets"]["ttbar"].jets_flagged == 378
    assert (~store.valid(flagged=None)).sum() == 378
    assert len(store.probs()) == 1636 - 378
    flagged = store.select(flagged=True)
    np.testing.assert_array_equal(flagged.raw, -1.0)
    assert np.all(np.abs(flagged.kin[:, store.kinematics.index("eta")]) >= 2.5)
    assert store.metadata.seed == 9


def test_fill_counts_match_the_generator_truth(sample, tmp_path):
    config = _toy_config(sample, tmp_path)
    report = run_fill(config, progress=False)
    truth = {f["dataset"]: f for f in json.loads((sample / "truth.json").read_text())["files"]}
    store = load_store(report.output)
    cut = store.cutflow["cr_l"]["mc_l"]
    mc_files = [f for f in truth.values() if f["path"].startswith("mc_cr_")]
    assert len(mc_files) == 3
    assert cut.jets == sum(f["n_jets"] for f in mc_files)
    assert cut.events == sum(f["n_events"] for f in mc_files)
    for name in ("b", "c", "light"):
        assert cut.flavours.get(name, 0) == sum(f["flavour_counts"][name] for f in mc_files)
    b = store.cutflow["cr_b"]["mc_b"]
    assert b.jets == truth["mc_cr_b"]["n_jets"]
    assert b.jets_selected == len(store.weight(region="cr_b", dataset="mc_b", flagged=None))
    assert np.all(store.probs(region="cr_b", dataset="mc_b")[:, 0] > 0.1)
    assert np.all(store.flavour(is_data=True) == -1)
    assert report.n_jets == len(store.weight(flagged=None))


def test_fill_is_deterministic_for_a_seed_and_executor(sample, tmp_path):
    first = run_fill(_toy_config(sample, tmp_path / "a"), progress=False)
    futures = {"kind": "futures", "pool": "processes", "workers": 2, "chunksize": 150}
    again = run_fill(_toy_config(sample, tmp_path / "b", executor=futures), progress=False)
    other = run_fill(_toy_config(sample, tmp_path / "c", seed=4), progress=False)
    ta, tb, tc = (pq.read_table(r.output) for r in (first, again, other))
    assert ta.equals(tb)
    assert ta.schema.metadata == tb.schema.metadata
    assert ta.drop_columns(["rand"]).equals(tc.drop_columns(["rand"]))
    assert not np.array_equal(ta["rand"].to_numpy(), tc["rand"].to_numpy())


def test_fill_with_dask_local_cluster_equals_iterative(sample, tmp_path):
    eager = run_fill(_toy_config(sample, tmp_path / "a"), progress=False)
    dask = run_fill(
        _toy_config(
            sample,
            tmp_path / "b",
            executor={"kind": "dask", "workers": 2, "processes": False, "chunksize": 150},
        ),
        progress=False,
    )
    assert pq.read_table(eager.output).equals(pq.read_table(dask.output))


def test_latent_auto_reads_every_latent_branch(tmp_path):
    gen = tmp_path / "gen"
    generate(
        GeneratorConfig.model_validate(
            {
                "seed": 2,
                "scale": 1.0,
                "latent": {"enabled": True, "latent_dim": 16},
                "regions": {
                    "cr_b": {"mc_fractions": {"b": 0.9, "c": 0.05, "light": 0.05}, "n_jets": 200}
                },
            }
        ),
        gen,
        progress=False,
    )
    config = load_config(
        {
            "datasets": {"mc": {"files": [str(gen / "mc_cr_b.root")]}},
            "regions": {"cr_b": {"datasets": ["mc"]}},
            "adapter": {"name": "deepjet"},
            "latent": "auto",
            "output": str(tmp_path / "cr.parquet"),
        }
    )
    store = load_store(run_fill(config, progress=False).output)
    assert store.metadata.latent_dim == 16
    z = store.latent(flagged=None)
    assert z.shape == (len(store), 16)
    tree = uproot.open(gen / "mc_cr_b.root")["Events"]
    truth = tree.arrays(filter_name=["Jet_latent_13", "Jet.latent_13"], how=tuple)[0]
    np.testing.assert_array_equal(z[:, 13], np.concatenate(truth.to_list()))


def _bad_inputs(tmp_path):
    truncated = tmp_path / "truncated.root"
    truncated.write_bytes(NANO_V15.read_bytes()[:1_500_000])
    empty_bytes = tmp_path / "zero.root"
    empty_bytes.write_bytes(b"")
    empty_tree = tmp_path / "no_events.root"
    with uproot.recreate(empty_tree) as f:
        f.mktree("Events", {"nJet": np.int32, "genWeight": np.float32})
    other_tree = tmp_path / "other_tree.root"
    with uproot.recreate(other_tree) as f:
        f.mktree("Runs", {"run": np.int32})
    return truncated, empty_bytes, empty_tree, other_tree


def test_bad_files_are_all_named_at_once(tmp_path):
    truncated, empty_bytes, empty_tree, other_tree = _bad_inputs(tmp_path)
    config = load_config(
        {
            "datasets": {
                "dy": {"files": [str(NANO_DY)]},
                "bad": {
                    "files": [
                        str(truncated),
                        str(empty_bytes),
                        str(empty_tree),
                        str(other_tree),
                        str(tmp_path / "absent.root"),
                    ]
                },
            },
            "regions": {"r": {"datasets": ["dy", "bad"]}},
            "adapter": {"name": "deepjet"},
            "output": str(tmp_path / "cr.parquet"),
        }
    )
    with pytest.raises(BadInputError) as info:
        run_fill(config, progress=False)
    text = str(info.value)
    assert "6 bad input file(s)" in text
    assert (
        "nano_dy.root: tree 'Events' lacks the branches ['Jet_btagDeepFlavCvL', 'Jet_btagDeepFlavCvB']"
        in text
    )
    assert "truncated.root is truncated (1500000 of 2876917 bytes)" in text
    assert "zero.root cannot be read as a ROOT file" in text
    assert "no_events.root: tree 'Events' lacks the branches" in text
    assert "other_tree.root has no tree 'Events' (trees: ['Runs'])" in text
    assert "absent.root does not exist" in text
    assert "skip_bad_files" in text
    assert not (tmp_path / "cr.parquet").exists()


def test_empty_tree_and_wrong_tree_name_are_named(tmp_path, sample):
    _, _, empty_tree, _ = _bad_inputs(tmp_path)
    check = check_file(str(empty_tree), "Events", ["nJet", "genWeight"])
    assert check.problem == f"{empty_tree}: tree 'Events' is empty (0 entries); remove the file"
    check = check_file(str(NANO_V15), "events", [])
    assert "has no tree 'events' (trees: ['Events']); set the dataset's tree" in check.problem
    good = sample / "mc_cr_b.root"
    check = check_file(str(good), "Events", ["nJet", "Jet_pt", "Jet_btagDeepFlavB", "genWeight"])
    assert check.problem is None
    assert check.entries == uproot.open(good)["Events"].num_entries > 0


def test_skip_bad_files_fills_the_rest_and_reports(tmp_path, capsys, sample):
    good = sample / "mc_cr_c.root"
    truncated, empty_bytes = tmp_path / "truncated.root", tmp_path / "zero.root"
    truncated.write_bytes(good.read_bytes()[:-2000])
    empty_bytes.write_bytes(b"")
    cfg = _write(
        tmp_path / "fill.yaml",
        {
            "datasets": {"ttbar": {"files": [str(good), str(truncated), str(empty_bytes)]}},
            "regions": {"all_jets": {"datasets": ["ttbar"]}},
            "adapter": {"name": "deepjet"},
            "output": "cr.parquet",
        },
    )
    assert main(["fill", str(cfg), "--no-progress"]) == 1
    assert "bad input file(s)" in capsys.readouterr().err
    assert main(["fill", str(cfg), "--no-progress", "--skip-bad-files"]) == 0
    out = capsys.readouterr().out
    assert "skipped ttbar:" in out
    assert "truncated.root is truncated" in out
    store = load_store(tmp_path / "cr.parquet")
    assert len(store.weight(flagged=None)) == store.cutflow["all_jets"]["ttbar"].jets
    assert store.cutflow["all_jets"]["ttbar"].jets == sum(
        len(n) for n in uproot.open(good)["Events"]["Jet_pt"].array()
    )
    assert sorted(Path(b.file).name for b in store.metadata.bad_files) == [
        "truncated.root",
        "zero.root",
    ]


def test_malformed_config_lists_every_problem(tmp_path):
    doc = {
        "datasets": {"mc": {"files": [], "is_data": "perhaps"}, "orphan": {"files": ["x.root"]}},
        "regions": {"r": {"datasets": ["mc", "ghost"], "selection": "pt > 30 & import os"}},
        "adapter": {"name": "deepcsv"},
        "executor": {"kind": "condor"},
        "colour": "blue",
    }
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path / "bad.yaml", doc))
    text = str(info.value)
    for needle in (
        "datasets.mc.files: List should have at least 1 item",
        "datasets.mc.is_data: Input should be a valid boolean",
        "executor.kind: Input should be 'iterative', 'futures' or 'dask'",
        "output: Field required",
        "colour: Extra inputs are not permitted",
        "regions.r.datasets: unknown datasets ['ghost']",
        "regions.r.selection: selection 'pt > 30 & import os': not a valid expression",
        "datasets.orphan: in no region",
        "adapter: unknown tagger adapter 'deepcsv'; known adapters:",
    ):
        assert needle in text, needle


def test_config_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="cannot be parsed"):
        load_config(_write(tmp_path / "broken.toml", "datasets = [unclosed"))
    (tmp_path / "broken.yaml").write_text("datasets: {a: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "conf.ini").write_text("[x]")
    with pytest.raises(ConfigError, match=r"use a \.yaml, \.yml or \.toml file"):
        load_config(tmp_path / "conf.ini")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match=r"pattern 'nothing_\*.root' matches no file"):
        load_config(
            {
                "datasets": {"a": {"files": ["nothing_*.root"]}},
                "regions": {"r": {"datasets": ["a"]}},
                "adapter": {"name": "deepjet"},
                "output": "x.parquet",
            },
            base_dir=tmp_path,
        )
    with pytest.raises(ConfigError, match="adapter: adapter 'deepjet' got unknown options"):
        load_config(
            {
                "datasets": {"a": {"files": ["a.root"]}},
                "regions": {"r": {"datasets": ["a"]}},
                "adapter": {"name": "deepjet", "options": {"colour": 1}},
                "output": "x.parquet",
            }
        )


def test_cli_reports_unknown_adapter(tmp_path, capsys):
    cfg = _write(
        tmp_path / "fill.yaml",
        {
            "datasets": {"ttbar": {"files": [str(NANO_V15)]}},
            "regions": {"all_jets": {"datasets": ["ttbar"]}},
            "adapter": {"name": "deepflav"},
            "output": "cr.parquet",
        },
    )
    assert main(["fill", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "adapter: unknown tagger adapter 'deepflav'" in err
    assert str(cfg) in err


def test_corrupt_basket_fails_or_is_skipped_at_run_time(tmp_path, sample):
    good = sample / "mc_cr_b.root"
    data = bytearray(good.read_bytes())
    middle = len(data) // 3
    data[middle : middle + 3000] = bytes(3000)  # zero a stretch of compressed baskets
    corrupt = tmp_path / "corrupt.root"
    corrupt.write_bytes(bytes(data))
    assert check_file(str(corrupt), "Events", ["nJet"]).problem is None  # header is intact
    doc = {
        "datasets": {"mc": {"files": [str(corrupt), str(good)]}},
        "regions": {"r": {"datasets": ["mc"]}},
        "adapter": {"name": "deepjet"},
        "output": str(tmp_path / "cr.parquet"),
    }
    with pytest.raises(BadInputError, match=r"processing failed: .*corrupt\.root.*set skip_bad_files"):
        run_fill(load_config(doc), progress=False)
    report = run_fill(load_config({**doc, "skip_bad_files": True}), progress=False)
    n_good = uproot.open(good)["Events"].num_entries
    assert report.cutflow["r"]["mc"].events == n_good
    (bad,) = report.bad_files
    assert bad.file == str(corrupt)
    assert f"only 0 of {n_good} entries could be read" in bad.reason
    assert "The error was:" in bad.reason  # coffea's message with uproot's read error
    assert load_store(report.output).metadata.bad_files == [bad]
