"""Tests of the bundle format: round trips, integrity, schema checks, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffea_otcal.bundle import (
    SCHEMA_VERSION,
    Bundle,
    bundle_json_schema,
    canonical_json,
)

SCHEMA_FILE = Path(__file__).parents[1] / "src" / "coffea_otcal" / "schemas" / "bundle.schema.json"
PT_CONTEXT = {"name": "log_pt", "column": "pt", "transform": "log", "low": 20.0, "high": 1000.0}
ETA_CONTEXT = {"name": "abs_eta", "column": "eta", "transform": "abs", "low": 0.0, "high": 2.5}


def fitted_map(seed: int, context_dim: int, hidden: tuple[int, ...] = (8, 8)) -> dict:
    """A FittedMap export of a randomly initialised (P)ICNN (torch, test side only)."""
    from coffea_otcal.potentials import ICNN, PICNN, ICNNConfig, PICNNConfig

    rng = np.random.default_rng(seed)
    if context_dim:
        module = PICNN(PICNNConfig(dim=2, context_dim=context_dim, hidden=hidden), seed=seed)
    else:
        module = ICNN(ICNNConfig(dim=2, hidden=hidden), seed=seed)
    return {
        "format": "coffea-otcal.fitted-map",
        "version": 1,
        "name": f"seed{seed}",
        "potential": module.export(),
        "preprocessing": {
            "shift": rng.normal(0.0, 0.3, 2),
            "scale": float(rng.uniform(1.0, 2.0)),
            "context_shift": rng.normal(3.0, 0.2, context_dim) if context_dim else None,
            "context_scale": rng.uniform(0.5, 1.5, context_dim) if context_dim else None,
        },
        "metrics": {"dual": float(seed)},
    }


def make_bundle(
    context: tuple[dict, ...] = (PT_CONTEXT, ETA_CONTEXT),
    variations: dict[str, str] | None = None,
    flavours: tuple[int, ...] = (5, 4, 0),
    adapter: str | dict = "deepjet",
) -> Bundle:
    """A small valid bundle: one random map per flavour and map name."""
    variations = {"comp": "EM composition prior"} if variations is None else variations
    names = ["nominal", *(f"{v}_{d}" for v in variations for d in ("up", "down"))]
    maps = {
        (code, name): fitted_map(100 * i + j, len(context))
        for i, code in enumerate(flavours)
        for j, name in enumerate(names)
    }
    return Bundle.from_maps(
        maps,
        ["b", "c", "light"],
        adapter,
        list(context),
        variations,
        {
            "seed": 7,
            "metrics": {"w2": 0.25},
            "inputs": [{"path": "store.parquet", "sha256": "0" * 64}],
        },
    )


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return make_bundle()


def _rewrite(path: Path, edit, rehash: bool = True) -> None:
    raw = json.loads(path.read_text())
    edit(raw)
    if rehash:
        import hashlib

        body = {k: v for k, v in raw.items() if k != "integrity"}
        raw["integrity"]["digest"] = hashlib.sha256(canonical_json(body).encode()).hexdigest()
    path.write_text(json.dumps(raw))


def test_round_trip_json_and_gzip(bundle: Bundle, tmp_path: Path) -> None:
    plain = bundle.save(tmp_path / "b.json")
    packed = bundle.save(tmp_path / "b.json.gz")
    assert packed.read_bytes()[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(packed.read_bytes())) == json.loads(plain.read_text())
    for path in (plain, packed):
        loaded = Bundle.load(path)
        assert loaded == bundle.with_integrity()
        assert loaded.integrity is not None
        assert loaded.integrity.digest == bundle.content_digest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.json.gz"]  # no temp left
    assert packed.stat().st_size < plain.stat().st_size / 2


def test_accessors(bundle: Bundle) -> None:
    assert bundle.classes == ["b", "c", "light"]
    assert bundle.dim == 2
    assert bundle.flavour_codes == [5, 4, 0]
    assert [f.label for f in bundle.flavours] == ["b", "c", "light"]
    assert bundle.variation_names == ["comp"]
    assert bundle.variations[0].meaning == "EM composition prior"
    assert bundle.map_names == ["nominal", "comp_up", "comp_down"]
    assert [c.name for c in bundle.context] == ["log_pt", "abs_eta"]
    assert bundle.adapter.name == "deepjet"
    assert bundle.provenance.seed == 7
    assert bundle.provenance.metrics == {"w2": 0.25}
    assert bundle.get_map(4, "comp_down").potential.kind == "picnn"
    with pytest.raises(KeyError, match="no map for flavour 15"):
        bundle.get_map(15)


def test_writer_info_records_versions(bundle: Bundle) -> None:
    import numpy
    import torch

    info = bundle.writer_info
    assert info.package == "coffea-otcal"
    assert info.version == __import__("coffea_otcal").__version__
    assert info.numpy == numpy.__version__
    assert info.torch == torch.__version__.split("+")[0] or info.torch == torch.__version__


def test_numpy_values_are_converted_and_exact(bundle: Bundle, tmp_path: Path) -> None:
    exported = fitted_map(0, 2)  # the (b, nominal) map, with numpy preprocessing
    stored = bundle.get_map(5, "nominal")
    assert stored.preprocessing.shift == exported["preprocessing"]["shift"].tolist()
    loaded = Bundle.load(bundle.save(tmp_path / "b.json"))
    assert loaded.get_map(5, "nominal").potential.params == exported["potential"]["params"]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=2, max_size=2))
def test_floats_survive_save_load_bit_exactly(tmp_path_factory, shift: list[float]) -> None:
    b = make_bundle(context=(), variations={}, flavours=(5,))
    raw = b.model_dump(mode="json")
    raw["maps"][0]["map"]["preprocessing"]["shift"] = shift
    b = Bundle.model_validate(raw)
    path = tmp_path_factory.mktemp("h") / "b.json.gz"
    loaded = Bundle.load(b.save(path))
    assert loaded.get_map(5).preprocessing.shift == shift
    assert loaded.content_digest() == b.content_digest()


def test_hash_mismatch_is_refused(bundle: Bundle, tmp_path: Path) -> None:
    path = bundle.save(tmp_path / "b.json")
    _rewrite(path, lambda raw: raw["provenance"].update(seed=8), rehash=False)
    with pytest.raises(ValueError, match="failed its integrity check"):
        Bundle.load(path)
    assert Bundle.load(path, verify=False).provenance.seed == 8


def test_missing_hash_is_refused(bundle: Bundle, tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text(json.dumps(bundle.model_dump(mode="json")))
    with pytest.raises(ValueError, match="no integrity hash"):
        Bundle.load(path)


def test_newer_schema_version_is_refused(bundle: Bundle, tmp_path: Path) -> None:
    path = bundle.save(tmp_path / "b.json")
    _rewrite(path, lambda raw: raw.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(ValueError, match=r"schema_version 2.*upgrade coffea-otcal"):
        Bundle.load(path)


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda raw: raw.update(colour="blue"), "colour"),
        (lambda raw: raw["maps"][3]["map"]["preprocessing"].update(rotation=[1.0]), "rotation"),
        (lambda raw: raw["context"][0].update(units="GeV"), "units"),
    ],
)
def test_unknown_fields_are_refused(bundle: Bundle, tmp_path: Path, edit, where: str) -> None:
    path = bundle.save(tmp_path / "b.json")
    _rewrite(path, edit)
    with pytest.raises(
        ValueError, match=rf"(?s)does not match the bundle schema.*{where}.*Extra inputs"
    ):
        Bundle.load(path)


def test_missing_variation_map_is_refused(bundle: Bundle, tmp_path: Path) -> None:
    path = bundle.save(tmp_path / "b.json")
    _rewrite(path, lambda raw: raw["maps"].pop(4))  # flavour 4, comp_up
    with pytest.raises(
        ValueError, match=r"missing maps for \(flavour, variation\) \[\(4, 'comp_up'\)\]"
    ):
        Bundle.load(path)


def test_missing_flavour_and_undeclared_maps_are_refused(bundle: Bundle) -> None:
    raw = bundle.model_dump(mode="json")
    raw["flavours"].append({"code": 15, "label": "tau"})
    with pytest.raises(ValueError, match=r"missing maps.*\(15, 'comp_down'\)"):
        Bundle.model_validate(raw)
    raw = bundle.model_dump(mode="json")
    raw["maps"][0]["variation"] = "jes_up"
    with pytest.raises(ValueError, match="variation 'jes_up' matches no declared"):
        Bundle.model_validate(raw)


def test_dimension_mismatch_is_refused(bundle: Bundle) -> None:
    raw = bundle.model_dump(mode="json")
    raw["context"] = raw["context"][:1]
    with pytest.raises(ValueError, match="2 context entries, the bundle declares 1"):
        Bundle.model_validate(raw)
    raw = bundle.model_dump(mode="json")
    raw["classes"] = ["b", "c", "light", "tau"]
    with pytest.raises(ValueError, match="shift has 2 entries, the ILR dimension is 3"):
        Bundle.model_validate(raw)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("low", 0.0, "log transform needs low > 0"),
        ("high", 10.0, "need finite low < high"),
    ],
)
def test_bad_context_ranges(field: str, value: float, message: str) -> None:
    spec = {**PT_CONTEXT, field: value}
    with pytest.raises(ValueError, match=message):
        make_bundle(context=(spec,), variations={}, flavours=(5,))


def test_reserved_variation_names() -> None:
    for name in ("nominal", "jes_up"):
        with pytest.raises(ValueError, match="is reserved"):
            make_bundle(context=(), variations={name: "x"}, flavours=(5,))


def test_non_finite_parameters_are_refused(bundle: Bundle) -> None:
    raw = bundle.model_dump(mode="json")
    raw["maps"][0]["map"]["potential"]["params"]["Wx0"][0][0] = float("nan")
    with pytest.raises(ValueError, match="parameter 'Wx0' holds a non-finite number nan"):
        Bundle.model_validate(raw)


def test_unknown_potential_kind_is_refused(bundle: Bundle) -> None:
    raw = bundle.model_dump(mode="json")
    raw["maps"][0]["map"]["potential"]["kind"] = "mlp"
    with pytest.raises(ValueError, match="does not match any of the expected tags"):
        Bundle.model_validate(raw)


def test_not_a_bundle(tmp_path: Path, bundle: Bundle) -> None:
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        Bundle.load(junk)
    junk.write_text(json.dumps({"format": "correctionlib"}))
    with pytest.raises(ValueError, match="is not a coffea-otcal bundle"):
        Bundle.load(junk)
    truncated = tmp_path / "t.json.gz"
    truncated.write_bytes(bundle.save(tmp_path / "b.json.gz").read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated or corrupt gzip"):
        Bundle.load(truncated)
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        Bundle.load(tmp_path / "nope.json")


def test_checked_in_json_schema_is_current() -> None:
    current = json.dumps(bundle_json_schema(), indent=2, sort_keys=True) + "\n"
    assert SCHEMA_FILE.read_text() == current, (
        "regenerate src/coffea_otcal/schemas/bundle.schema.json with bundle_json_schema()"
    )
    schema = json.loads(current)
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) >= {"writer_info", "classes", "adapter", "flavours", "maps"}
    assert schema["$defs"]["FittedMapExport"]["properties"]["potential"]["discriminator"] == {
        "mapping": {"icnn": "#/$defs/ICNNPotential", "picnn": "#/$defs/PICNNPotential"},
        "propertyName": "kind",
    }
