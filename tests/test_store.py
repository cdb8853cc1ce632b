from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffea_otcal import geometry
from coffea_otcal.store import (
    METADATA_KEY,
    Cutflow,
    DatasetInfo,
    RegionInfo,
    StoreMetadata,
    load_store,
    schema_version,
    write_store,
)


def _arrays(n, rng, flavours=(5, 4, 0), is_data=False, latent_dim=2):
    probs = rng.dirichlet([1.0, 1.0, 1.0], size=n)
    valid = rng.random(n) > 0.2
    probs[~valid] = 1.0 / 3.0
    return {
        "file": np.full(n, "f.root", dtype=object),
        "entry": np.arange(n, dtype=np.int64),
        "jet_index": np.zeros(n, dtype=np.int32),
        "valid": valid,
        "flavour": np.full(n, -1, np.int32)
        if is_data
        else rng.choice(flavours, n).astype(np.int32),
        "weight": rng.normal(1.0, 0.1, n),
        "rand": rng.random(n),
        "probs": probs,
        "raw": rng.random((n, 3)),
        "kin": np.stack([rng.uniform(20, 200, n), rng.uniform(-2.5, 2.5, n)], axis=1),
        "latent": rng.normal(size=(n, latent_dim)),
    }


def _metadata(latent_dim=2):
    return StoreMetadata(
        classes=["b", "c", "light"],
        adapter={"name": "deepjet", "options": {}},
        raw_columns=["btagDeepFlavB", "btagDeepFlavCvL", "btagDeepFlavCvB"],
        kinematics=["pt", "eta"],
        latent_dim=latent_dim,
        flavour_column="hadronFlavour",
        flavour_codes={"b": 5, "c": 4, "light": 0},
        regions={
            "b_cr": RegionInfo(datasets=["mc", "data"], selection="pt > 30"),
            "l_cr": RegionInfo(datasets=["mc"]),
        },
        datasets={
            "mc": DatasetInfo(is_data=False, files=["mc.root"], weight="genWeight"),
            "data": DatasetInfo(is_data=True, files=["data.root"], weight=None),
        },
        cutflow={"b_cr": {"mc": Cutflow(jets=10)}, "l_cr": {"mc": Cutflow(jets=5)}},
    )


@pytest.fixture
def filled(tmp_path):
    rng = np.random.default_rng(1)
    jets = {
        "b_cr": {"mc": _arrays(40, rng), "data": _arrays(30, rng, is_data=True)},
        "l_cr": {"mc": _arrays(25, rng)},
    }
    path = write_store(tmp_path / "sub" / "cr.parquet", jets, _metadata())
    return path, jets


def test_round_trip_selects_by_region_data_and_flavour(filled):
    path, jets = filled
    store = load_store(path)
    assert len(store) == 95
    assert store.classes == ("b", "c", "light")
    assert store.regions == ("b_cr", "l_cr")
    mc = jets["b_cr"]["mc"]
    ok = mc["valid"]
    np.testing.assert_array_equal(store.probs(region="b_cr", is_data=False), mc["probs"][ok])
    np.testing.assert_array_equal(store.kin(region="b_cr", dataset="mc"), mc["kin"][ok])
    np.testing.assert_array_equal(
        store.kin(["eta"], region="b_cr", dataset="mc"), mc["kin"][ok][:, 1:]
    )
    np.testing.assert_array_equal(store.latent(region="b_cr", dataset="mc"), mc["latent"][ok])
    np.testing.assert_array_equal(store.weight(region="b_cr", dataset="mc"), mc["weight"][ok])
    b = ok & (mc["flavour"] == 5)
    np.testing.assert_array_equal(store.probs(region="b_cr", flavour="b"), mc["probs"][b])
    np.testing.assert_array_equal(store.probs(region="b_cr", flavour=[5]), mc["probs"][b])
    data = jets["b_cr"]["data"]
    assert np.all(store.flavour(is_data=True) == -1)
    assert len(store.weight(is_data=True)) == data["valid"].sum()
    flagged = store.select(region="l_cr", flagged=True)
    assert len(flagged) == (~jets["l_cr"]["mc"]["valid"]).sum()
    assert not flagged.valid.any()
    np.testing.assert_allclose(flagged.probs, 1.0 / 3.0)
    both = store.valid(flagged=None)
    assert len(both) == 95
    assert both.sum() == sum(a["valid"].sum() for per in jets.values() for a in per.values())
    assert store.cutflow["b_cr"]["mc"].jets == 10
    sel = store.select(region="b_cr", dataset="mc")
    np.testing.assert_allclose(sel.ilr(), geometry.ilr(mc["probs"][ok]))
    assert set(sel.dataset) == {"mc"}
    assert set(sel.region) == {"b_cr"}
    np.testing.assert_array_equal(sel.raw, mc["raw"][ok])
    np.testing.assert_array_equal(sel.rand, mc["rand"][ok])


def test_ilr_matches_geometry_and_is_finite_on_vertices(tmp_path):
    rng = np.random.default_rng(2)
    arrays = _arrays(6, rng)
    arrays["valid"][:] = True
    arrays["probs"] = np.array(
        [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0], [0.2, 0.3, 0.5], [1 / 3] * 3]
    )
    meta = _metadata().model_copy(update={"regions": {"b_cr": RegionInfo(datasets=["mc"])}})
    path = write_store(tmp_path / "cr.parquet", {"b_cr": {"mc": arrays}}, meta)
    z = load_store(path).ilr()
    assert z.shape == (6, 2)
    assert np.all(np.isfinite(z))
    np.testing.assert_allclose(z, geometry.ilr(arrays["probs"]))
    np.testing.assert_allclose(z[-1], 0.0, atol=1e-12)


def test_empty_store_round_trips(tmp_path):
    path = write_store(tmp_path / "empty.parquet", {}, _metadata(latent_dim=0))
    store = load_store(path)
    assert len(store) == 0
    assert store.probs().shape == (0, 3)
    assert store.kin().shape == (0, 2)
    with pytest.raises(ValueError, match="no latent columns"):
        store.latent()


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path, filled):
    path, _ = filled
    before = path.read_bytes()
    bad = {"b_cr": {"mc": {"valid": np.ones(3, bool)}}}
    with pytest.raises(ValueError, match="lack the fields"):
        write_store(path, bad, _metadata())
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["cr.parquet"]


def test_unknown_region_in_jets_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="region 'vr' has jets but is not in the store metadata"):
        write_store(tmp_path / "x.parquet", {"vr": {"mc": _arrays(3, rng)}}, _metadata())


def _rewrite_metadata(path, change):
    table = pq.read_table(path)
    doc = json.loads(table.schema.metadata[METADATA_KEY])
    change(doc)
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(doc).encode()})
    pq.write_table(table, path)


def test_newer_schema_version_is_refused(filled):
    path, _ = filled
    _rewrite_metadata(path, lambda d: d.update(schema_version=schema_version + 1))
    with pytest.raises(
        ValueError, match=r"schema_version 2, newer than the 1 .*; upgrade coffea-otcal"
    ):
        load_store(path)


def test_unknown_or_missing_schema_version_is_refused(filled):
    path, _ = filled
    _rewrite_metadata(path, lambda d: d.update(schema_version=0))
    with pytest.raises(ValueError, match="unknown store schema_version 0"):
        load_store(path)
    _rewrite_metadata(path, lambda d: d.pop("schema_version"))
    with pytest.raises(ValueError, match="no integer schema_version"):
        load_store(path)


def test_unknown_metadata_key_is_refused(filled):
    path, _ = filled
    _rewrite_metadata(path, lambda d: d.update(surprise=1))
    with pytest.raises(ValueError, match="surprise"):
        load_store(path)


def test_missing_column_is_named(filled):
    path, _ = filled
    table = pq.read_table(path)
    meta = table.schema.metadata
    table = table.drop_columns(["kin_eta"]).replace_schema_metadata(meta)
    pq.write_table(table, path)
    with pytest.raises(ValueError, match=r"lacks the store columns \['kin_eta'\]"):
        load_store(path)


def test_plain_parquet_and_missing_file_are_refused(tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), plain)
    with pytest.raises(ValueError, match="not a coffea-otcal control-region store"):
        load_store(plain)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_store(tmp_path / "nope.parquet")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        load_store(garbage)


def test_unknown_selection_values_are_named(filled):
    store = load_store(filled[0])
    with pytest.raises(ValueError, match=r"unknown region \['vr'\]"):
        store.probs(region="vr")
    with pytest.raises(ValueError, match="unknown flavour 'tau'"):
        store.probs(flavour="tau")
    with pytest.raises(ValueError, match=r"unknown kinematic column \['mass'\]"):
        store.kin(["mass"])


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 30),
    seed=st.integers(0, 2**16),
    region=st.sampled_from(["b_cr", "l_cr", None]),
    flavour=st.sampled_from(["b", "c", "light", None]),
)
def test_selection_counts_partition_the_store(tmp_path_factory, n, seed, region, flavour):
    rng = np.random.default_rng(seed)
    jets = {"b_cr": {"mc": _arrays(n, rng)}, "l_cr": {"mc": _arrays(n + 1, rng)}}
    path = write_store(tmp_path_factory.mktemp("h") / "cr.parquet", jets, _metadata())
    store = load_store(path)
    good = len(store.weight(region=region, flavour=flavour))
    bad = len(store.weight(region=region, flavour=flavour, flagged=True))
    everything = len(store.weight(region=region, flavour=flavour, flagged=None))
    assert good + bad == everything
    code = {"b": 5, "c": 4, "light": 0}.get(flavour)
    expected = sum(
        int(((a["flavour"] == code) if code is not None else np.ones(len(a["valid"]), bool)).sum())
        for r, per in jets.items()
        if region in (None, r)
        for a in per.values()
    )
    assert everything == expected
