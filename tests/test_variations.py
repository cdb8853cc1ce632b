from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from coffea_otcal.cli import main
from coffea_otcal.em import EMConfig, RegionData, fit_em
from coffea_otcal.em_diagnostics import compute_diagnostics, proxy_delta_log_q
from coffea_otcal.flows import FlowConfig
from coffea_otcal.geometry import ilr_inv
from coffea_otcal.store import Cutflow, DatasetInfo, RegionInfo, StoreMetadata, write_store
from coffea_otcal.variations import (
    Targets,
    build_targets,
    make_variations,
    variation_weights,
)

torch.set_num_threads(1)
MEANS = np.array([[2.0, 2.5], [0.0, 0.5], [-0.5, -2.0]])
FRACTIONS = {"b": [0.86, 0.05, 0.09], "c": [0.08, 0.84, 0.08], "light": [0.04, 0.12, 0.84]}
CODES = np.array([5, 4, 0])
FAST = EMConfig(
    flow=FlowConfig(hidden_features=(16, 16), pretrain_steps=60, batch_size=512),
    m_steps=6,
    max_iterations=2,
    min_iterations=1,
)


def _region(n, row, rng, context):
    f = rng.choice(3, size=n, p=row)
    ctx = rng.normal(size=(n, 1)) if context else None
    x = MEANS[f] + rng.normal(size=(n, 2)) + (0.3 * ctx if context else 0.0)
    return RegionData(x=x, context=ctx, weight=rng.uniform(0.5, 1.5, n), flavour=CODES[f])


@pytest.fixture(scope="module", params=[False, True], ids=["unconditional", "conditional"])
def fitted(request):
    rng = np.random.default_rng(7)
    mc = {r: _region(500, row, rng, request.param) for r, row in FRACTIONS.items()}
    data = {
        r: RegionData(x=d.x, context=d.context)
        for r, d in ((r, _region(500, row, rng, request.param)) for r, row in FRACTIONS.items())
    }
    res = fit_em(data, mc, FAST, seed=0, progress=False)
    return res, mc, compute_diagnostics(res)


def test_variations_span_the_effective_covariance(fitted):
    _, _, diag = fitted
    variations = make_variations(diag)
    names = [v.name for v in variations]
    assert len(set(names)) == len(names)
    for v in variations:
        assert v.name == f"em_{v.kind}_{v.index}"
        assert v.meaning.startswith(("data-constrained", "prior-dominated"))
        assert "Up shifts pi[" in v.meaning
    # sum of delta a delta a^T over the variations rebuilds V_eff (eq. 61)
    rebuilt = sum(np.outer(v.delta_logits, v.delta_logits) for v in variations)
    np.testing.assert_allclose(rebuilt, diag.v_eff, atol=1e-9 * max(1.0, np.abs(diag.v_eff).max()))
    n_stable = int(diag.stable.sum())
    assert sum(v.kind == "stable" for v in variations) <= n_stable
    # delta pi sums to zero in every region
    for v in variations:
        np.testing.assert_allclose(np.sum(v.delta_fractions, axis=1), 0.0, atol=1e-12)


def test_variation_weights_are_normalised_and_mirror(fitted):
    res, _, diag = fitted
    variations = make_variations(diag)
    rng = np.random.default_rng(0)
    y = rng.normal(MEANS[1], 1.0, size=(500, 2))
    ctx = rng.normal(size=(500, 1)) if res.conditional else None
    log_q = res.log_prob(y, ctx)
    base = rng.uniform(0.5, 2.0, 500)
    enriched = [res.regions.index(r) for r in res.enriched]
    weights, clipped = variation_weights(log_q, 1, variations, enriched, base, max_abs_log=50.0)
    assert clipped == 0.0
    for v in variations:
        up, down = weights[v.name]
        assert up.sum() == pytest.approx(base.sum())
        assert down.sum() == pytest.approx(base.sum())
        assert (up > 0).all()
        dlog = proxy_delta_log_q(log_q, np.asarray(v.delta_fractions), enriched)[:, 1]
        # Up and Down are exp(+-delta log q): their product is base^2 up to normalisation
        prod = up * down / base**2
        np.testing.assert_allclose(prod / prod[0], 1.0, rtol=1e-9)
        np.testing.assert_allclose(
            np.log(up / base) - np.log(up[0] / base[0]), dlog - dlog[0], atol=1e-12
        )


def test_flow_targets_pair_the_mc_source_contexts(fitted, tmp_path):
    res, mc, diag = fitted
    variations = make_variations(diag)
    targets = build_targets(res, mc, variations, method="flow", samples_per_source=2, seed=3)
    assert targets.variation_names() == [v.name for v in variations]
    for f, name in enumerate(res.classes):
        t = targets.flavours[name]
        n_src = sum(int((d.flavour == CODES[f]).sum()) for d in mc.values())
        assert len(t.source_x) == n_src
        assert len(t.target_y) == 2 * n_src
        assert t.target_weight.sum() == pytest.approx(t.source_weight.sum())
        assert np.isfinite(t.target_y).all()
        if res.conditional:
            np.testing.assert_array_equal(t.target_context[::2], t.source_context)
        else:
            assert t.target_context is None
        p = np.asarray(ilr_inv(t.target_y))
        np.testing.assert_allclose(p.sum(axis=1), 1.0)
        _, _, w = t.target(variations[0].name, "down")
        assert w.sum() == pytest.approx(t.target_weight.sum())
    # the nominal flow target of b is b-like: close to the true b mean
    np.testing.assert_allclose(targets.flavours["b"].target_y.mean(axis=0), MEANS[0], atol=0.35)
    path = targets.save(tmp_path / "targets.npz")
    back = Targets.load(path)
    assert back.meta == targets.meta
    for name in res.classes:
        a, b = targets.flavours[name], back.flavours[name]
        np.testing.assert_array_equal(a.target_y, b.target_y)
        for var in targets.variation_names():
            np.testing.assert_array_equal(a.variation_weights[var][0], b.variation_weights[var][0])
    with pytest.raises(KeyError, match="unknown variation 'nope'"):
        back.flavours["b"].target("nope")


def test_responsibility_targets_carry_gamma_weights(fitted):
    res, mc, _ = fitted
    targets = build_targets(res, mc, method="responsibility")
    total = sum(res.data[r].weight.sum() for r in res.regions)
    got = sum(t.target_weight.sum() for t in targets.flavours.values())
    assert got == pytest.approx(total)
    assert targets.meta.method == "responsibility"


def test_targets_file_with_another_version_is_refused(fitted, tmp_path):
    res, mc, _ = fitted
    path = build_targets(res, mc).save(tmp_path / "t.npz")
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    meta["schema_version"] = 99
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="schema_version 99 is not 1"):
        Targets.load(tmp_path / "bad.npz")


def _store_arrays(n, row, rng, is_data):
    f = rng.choice(3, size=n, p=row)
    x = MEANS[f] + rng.normal(size=(n, 2))
    probs = np.asarray(ilr_inv(x))
    return {
        "file": np.full(n, "f.root", dtype=object),
        "entry": np.arange(n, dtype=np.int64),
        "jet_index": np.zeros(n, dtype=np.int32),
        "valid": np.ones(n, dtype=bool),
        "flavour": np.full(n, -1, np.int32) if is_data else CODES[f].astype(np.int32),
        "weight": np.ones(n),
        "rand": rng.random(n),
        "probs": probs,
        "raw": probs,
        "kin": np.stack([rng.uniform(20, 200, n), rng.uniform(-2.5, 2.5, n)], axis=1),
        "latent": np.zeros((n, 0)),
    }


def test_em_command_runs_on_a_real_store(tmp_path):
    rng = np.random.default_rng(11)
    regions = {f"{r}_cr": row for r, row in FRACTIONS.items()}
    jets = {
        name: {
            "mc": _store_arrays(500, row, rng, False),
            "data": _store_arrays(500, row, rng, True),
        }
        for name, row in regions.items()
    }
    meta = StoreMetadata(
        classes=["b", "c", "light"],
        adapter={"name": "gn2", "options": {}},
        raw_columns=["pb", "pc", "pu"],
        kinematics=["pt", "eta"],
        latent_dim=0,
        flavour_column="HadronConeExclTruthLabelID",
        flavour_codes={"b": 5, "c": 4, "light": 0},
        regions={name: RegionInfo(datasets=["mc", "data"]) for name in regions},
        datasets={
            "mc": DatasetInfo(is_data=False, files=["mc.root"], weight=None),
            "data": DatasetInfo(is_data=True, files=["data.root"], weight=None),
        },
        cutflow={name: {"mc": Cutflow(jets=500), "data": Cutflow(jets=500)} for name in regions},
    )
    store = write_store(tmp_path / "cr.parquet", jets, meta)
    config = tmp_path / "em.json"
    config.write_text(FAST.model_dump_json(exclude={"classes", "flavour_codes"}))
    out = tmp_path / "out"
    code = main(
        [
            "em",
            str(store),
            "-o",
            str(out),
            "--config",
            str(config),
            "--context",
            "pt",
            "eta",
            "--no-plots",
            "--no-progress",
        ]
    )
    assert code == 0
    targets = Targets.load(out / "targets.npz")
    assert targets.meta.n_context == 2
    assert set(targets.flavours) == {"b", "c", "light"}
    # flat tables in the layout `coffea-otcal train` reads
    with np.load(out / "ot_tables" / "target.npz") as f:
        assert {"z1", "z2", "c1", "c2", "weight", "flavour"} <= set(f.files)
        assert set(np.unique(f["flavour"])) == {0, 4, 5}
    name = targets.variation_names()[0]
    assert (out / "ot_tables" / f"target_{name}Down.npz").exists()
    report = json.loads((out / "em_diagnostics.json").read_text())
    assert len(report["diagnostics"]["singular_values"]) == 6
    assert report["variations"][0]["name"].startswith("em_")
    # a bad context column is a clear error with exit code 1
    assert main(["em", str(store), "-o", str(out), "--context", "phi", "--no-progress"]) == 1
