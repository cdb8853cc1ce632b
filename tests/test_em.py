from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from coffea_otcal.em import (
    CompositionWarning,
    EMConfig,
    EMResult,
    FinalFitConfig,
    RegionData,
    check_composition,
    fit_em,
    fractions_from_logits,
    logits_from_fractions,
    mixture_nll,
    prior_logit_covariance,
)
from coffea_otcal.em_diagnostics import compute_diagnostics
from coffea_otcal.em_prior import map_logits
from coffea_otcal.flows import FlowConfig

torch.set_num_threads(1)

MC_FRACTIONS = {
    "b": [0.90, 0.04, 0.06],
    "c": [0.05, 0.8886, 0.0614],
    "light": [0.0505, 0.0887, 0.861],
}
DATA_FRACTIONS = {"b": [0.86, 0.05, 0.09], "c": [0.08, 0.84, 0.08], "light": [0.04, 0.12, 0.84]}
MEANS = np.array([[2.0, 2.5], [0.0, 0.5], [-0.5, -2.0]])
DATA_SHIFT = np.array([[0.3, -0.2], [0.2, 0.2], [-0.2, 0.3]])
CODES = (5, 4, 0)
FAST = EMConfig(
    flow=FlowConfig(hidden_features=(16, 16), pretrain_steps=80, batch_size=512),
    m_steps=10,
    max_iterations=3,
    min_iterations=2,
    final_fit=None,
)


def synthetic(n, fractions, shift, rng, weights=False):
    """Per-flavour Gaussians in ILR space, exact counts per flavour."""
    counts = np.round(np.asarray(fractions) * n).astype(int)
    x = np.concatenate(
        [rng.normal(MEANS[f] + shift[f], [0.8, 0.7], size=(k, 2)) for f, k in enumerate(counts)]
    )
    flav = np.concatenate([np.full(k, CODES[f]) for f, k in enumerate(counts)])
    w = rng.uniform(0.5, 1.5, len(x)) if weights else None
    return RegionData(x=x, weight=w, flavour=flav)


def make_regions(n=1200, seed=0):
    rng = np.random.default_rng(seed)
    data, mc, truth = {}, {}, {}
    for r in MC_FRACTIONS:
        d = synthetic(n, DATA_FRACTIONS[r], DATA_SHIFT, rng)
        truth[r] = d
        data[r] = RegionData(x=d.x)
        mc[r] = synthetic(n, MC_FRACTIONS[r], np.zeros((3, 2)), rng)
    return data, mc, truth


@pytest.fixture(scope="module")
def regions():
    return make_regions()


@pytest.fixture(scope="module")
def fitted(regions):
    data, mc, _ = regions
    return fit_em(data, mc, FAST, seed=3, progress=False)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, (4, 2), elements=st.floats(-8, 8)))
def test_logits_and_fractions_round_trip(a):
    pi = fractions_from_logits(a)
    np.testing.assert_allclose(pi.sum(axis=1), 1.0)
    np.testing.assert_allclose(logits_from_fractions(pi), a, atol=1e-8)


@settings(max_examples=30, deadline=None)
@given(n_classes=st.integers(2, 5), data=st.data(), width=st.floats(0.05, 2.0))
def test_prior_has_the_paper_width_on_each_log_ratio(n_classes, data, width):
    enriched = data.draw(st.integers(0, n_classes - 1))
    cov = prior_logit_covariance(n_classes, enriched, width)
    # b_h = log(pi_h / pi_e) = a_h - a_e (a_K = 0): each has variance width^2, independent
    rows = []
    for h in range(n_classes):
        if h == enriched:
            continue
        row = np.zeros(n_classes - 1)
        if h < n_classes - 1:
            row[h] += 1
        if enriched < n_classes - 1:
            row[enriched] -= 1
        rows.append(row)
    t = np.array(rows)
    np.testing.assert_allclose(t @ cov @ t.T, width**2 * np.eye(n_classes - 1), atol=1e-10)


def test_map_logits_limits():
    counts = np.array([30.0, 50.0, 920.0])
    a0 = logits_from_fractions(np.array([0.1, 0.1, 0.8]))
    wide = map_logits(counts, a0, np.eye(2) * 1e-12, a0.copy())
    np.testing.assert_allclose(fractions_from_logits(wide), counts / counts.sum(), atol=1e-8)
    narrow = map_logits(counts, a0, np.eye(2) * 1e12, a0.copy())
    np.testing.assert_allclose(narrow, a0, atol=1e-6)
    mid = map_logits(counts, a0, np.eye(2) / 0.3**2, a0.copy())
    pi = fractions_from_logits(mid)[:-1]
    grad = counts[:-1] - counts.sum() * pi - (mid - a0) / 0.3**2
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)


def test_fit_recovers_fractions_and_densities(fitted, regions):
    _, _, truth = regions
    true = np.array([DATA_FRACTIONS[r] for r in fitted.regions])
    # within 2 effective sigma (K&Y eq. 61) of the truth, as the EM issue asks: 1200 jets per
    # region leave deviations of ~0.03 (measured 1.2-1.6 sigma_eff for the largest ones),
    # which move by float rounding across CPUs
    sigma = np.asarray(compute_diagnostics(fitted).fraction_errors_eff)
    assert np.all(np.abs(fitted.fractions - true) < 2 * sigma), (fitted.fractions, sigma)
    assert np.abs(fitted.fractions - true).max() < 0.045
    # the fit moved from the prior (MC) composition towards the truth
    prior = np.array([MC_FRACTIONS[r] for r in fitted.regions])
    assert np.abs(fitted.fractions - true).sum() < 0.6 * np.abs(prior - true).sum()
    trace = [e["objective"] for e in fitted.trace]
    assert trace[-1] < trace[0] - 0.05
    assert fitted.n_iterations == len(fitted.trace) - 1
    # extracted b density: mean of flow samples close to the true data b mean
    y = fitted.flows.sample("b", n=4000, seed=1)
    np.testing.assert_allclose(y.mean(axis=0), MEANS[0] + DATA_SHIFT[0], atol=0.12)
    gamma = fitted.responsibilities("b")
    np.testing.assert_allclose(gamma.sum(axis=1), 1.0)
    assert gamma.shape == (len(truth["b"].x), 3)


def test_pretrained_state_is_the_flows_before_em_not_after(fitted):
    final = fitted.flows.state_dict()
    moved = [k for k, v in fitted.pretrained_state.items()
             if not np.array_equal(v, final[k].detach().numpy())]
    assert len(moved) > len(final) // 2  # the EM M-steps moved the flows away from the MC fit
    assert not np.shares_memory(next(iter(fitted.pretrained_state.values())),
                                next(iter(final.values())).detach().numpy())


def test_initial_fractions_are_perturbed_within_twenty_percent(fitted):
    rel = np.abs(fitted.initial_fractions / fitted.prior_fractions - 1)
    assert rel.max() <= 0.2 + 1e-9
    assert rel.max() > 0.01


def test_result_save_load_round_trip(fitted, tmp_path):
    path = fitted.save(tmp_path / "res.npz")
    back = EMResult.load(path)
    x = np.random.default_rng(0).normal(size=(50, 2))
    np.testing.assert_array_equal(back.log_prob(x), fitted.log_prob(x))
    np.testing.assert_array_equal(back.fractions, fitted.fractions)
    assert back.trace == fitted.trace
    assert back.config == fitted.config
    assert not list(tmp_path.glob(".*tmp*"))


def test_final_fit_refits_the_flows_on_frozen_responsibilities(regions, fitted, tmp_path):
    data, mc, _ = regions
    cfg = FAST.model_copy(update={"final_fit": FinalFitConfig(steps=300, bins=16, candidates=2)})
    res = fit_em(data, mc, cfg, seed=3, progress=False, checkpoint_dir=tmp_path / "ckpt")
    # the iterations are those of the fit without a final fit; only the flows change
    assert fitted.final_fit is None
    assert fitted.flows.config.bins == FAST.flow.bins
    np.testing.assert_array_equal(res.logits, fitted.logits)
    assert [e["nll"] for e in res.trace] == [e["nll"] for e in fitted.trace]
    assert res.flows.config.bins == 16
    assert res.final_fit["bins_used"] == 16
    # eq. 23 at the held fractions: it starts where the iterations stopped and improves
    assert res.final_fit["nll_before"] == pytest.approx(fitted.trace[-1]["nll"], abs=1e-6)
    assert res.final_fit["nll_after"] < res.final_fit["nll_before"] - 0.01
    # of the two candidates, the one of lowest NLL is kept, and it is the flows returned
    nlls = res.final_fit["candidate_nll"]
    assert len(nlls) == 2
    assert nlls[0] != nlls[1]
    assert res.final_fit["nll_after"] == min(nlls) == nlls[res.final_fit["selected"]]
    assert mixture_nll(res) == pytest.approx(min(nlls), abs=1e-9)
    # the saved result rebuilds the refitted (16-bin) flows
    back = EMResult.load(res.save(tmp_path / "res.npz"))
    x = np.random.default_rng(1).normal(size=(50, 2))
    np.testing.assert_array_equal(back.log_prob(x), res.log_prob(x))
    assert back.final_fit == res.final_fit
    np.testing.assert_array_equal(back.pretrained_flows().log_prob_numpy(x),
                                  fitted.pretrained_flows().log_prob_numpy(x))
    # a changed final fit resumes the checkpointed iterations (the fingerprint ignores it)
    again = fit_em(data, mc, cfg.model_copy(update={"final_fit": FinalFitConfig(steps=5, bins=None)}),
                   seed=3, progress=False, checkpoint_dir=tmp_path / "ckpt")
    np.testing.assert_array_equal(again.logits, fitted.logits)
    assert again.final_fit["bins_used"] == FAST.flow.bins


def tiny_fit(regions, every, m_steps, pretrain_steps, **update):
    """Every ``every``-th jet of the module's regions and a two-iteration EM config."""
    data, mc, _ = regions
    small = {k: RegionData(x=v.x[::every]) for k, v in data.items()}
    smc = {k: RegionData(x=v.x[::every], flavour=v.flavour[::every]) for k, v in mc.items()}
    cfg = FAST.model_copy(
        update={"max_iterations": 2, "min_iterations": 2, "m_steps": m_steps, **update}
    )
    cfg = cfg.model_copy(
        update={"flow": cfg.flow.model_copy(update={"pretrain_steps": pretrain_steps})}
    )
    return small, smc, cfg


def test_checkpoint_resume_reproduces_the_uninterrupted_fit(regions, tmp_path):
    small, smc, cfg = tiny_fit(regions, 4, 3, 5)
    straight = fit_em(small, smc, cfg, seed=1, progress=False)
    first = fit_em(
        small,
        smc,
        cfg.model_copy(update={"max_iterations": 1}),
        seed=1,
        progress=False,
        checkpoint_dir=tmp_path,
    )
    assert first.n_iterations == 1
    resumed = fit_em(small, smc, cfg, seed=1, progress=False, checkpoint_dir=tmp_path)
    np.testing.assert_array_equal(resumed.logits, straight.logits)
    assert [e["nll"] for e in resumed.trace] == [e["nll"] for e in straight.trace]
    with pytest.raises(ValueError, match="written for other inputs"):
        fit_em(small, smc, cfg, seed=2, progress=False, checkpoint_dir=tmp_path)


def test_flavours_trained_in_threads_give_the_serial_fit(regions):
    """The flavour flows train side by side (one thread each); the result must not depend
    on the thread count, and the caller's torch thread setting is restored."""
    small, smc, cfg = tiny_fit(regions, 3, 4, 6)
    before = torch.get_num_threads()
    serial = fit_em(small, smc, cfg, seed=5, progress=False, threads=1)
    threaded = fit_em(small, smc, cfg, seed=5, progress=False, threads=3)
    assert torch.get_num_threads() == before
    np.testing.assert_array_equal(threaded.logits, serial.logits)
    assert [e["nll"] for e in threaded.trace] == [e["nll"] for e in serial.trace]
    x = np.concatenate([d.x for d in small.values()])
    np.testing.assert_array_equal(
        threaded.flows.log_prob_numpy(x), serial.flows.log_prob_numpy(x)
    )
    assert serial.trace[-1]["nll"] != serial.trace[0]["nll"]  # the flows did train


def test_shape_warmup_holds_the_fractions_then_releases_them(regions):
    data, mc, _ = regions
    small = {k: RegionData(x=v.x[::4]) for k, v in data.items()}
    smc = {k: RegionData(x=v.x[::4], flavour=v.flavour[::4]) for k, v in mc.items()}
    cfg = FAST.model_copy(update={"max_iterations": 3, "min_iterations": 1, "m_steps": 3,
                                  "shape_warmup": 2, "tol_nll": 10.0, "tol_logit": 10.0,
                                  "patience": 1})
    cfg = cfg.model_copy(update={"flow": cfg.flow.model_copy(update={"pretrain_steps": 5})})
    res = fit_em(small, smc, cfg, seed=1, progress=False)
    fr = [np.asarray(e["fractions"]) for e in res.trace]
    np.testing.assert_array_equal(fr[1], fr[0])  # warm-up: only the flows move
    np.testing.assert_array_equal(fr[2], fr[0])
    assert np.abs(fr[3] - fr[0]).max() > 1e-4  # then the fractions are fitted
    assert res.n_iterations == 3  # and convergence is not declared during the warm-up
    np.testing.assert_allclose(res.initial_fractions, fr[0])


def test_event_weights_are_rescaled_to_the_effective_sample_size():
    rng = np.random.default_rng(4)
    d = synthetic(300, DATA_FRACTIONS["b"], DATA_SHIFT, rng, weights=True)
    data = {r: RegionData(x=d.x, weight=7.0 * d.weight) for r in MC_FRACTIONS}
    mc = {r: synthetic(300, MC_FRACTIONS[r], np.zeros((3, 2)), rng) for r in MC_FRACTIONS}
    cfg = FAST.model_copy(update={"max_iterations": 1, "min_iterations": 1})
    cfg = cfg.model_copy(update={"flow": cfg.flow.model_copy(update={"pretrain_steps": 5})})
    res = fit_em(data, mc, cfg, progress=False)
    w = res.data["b"].weight
    kish = d.weight.sum() ** 2 / (d.weight**2).sum()
    assert w.sum() == pytest.approx(kish)
    np.testing.assert_allclose(w / w[0], d.weight / d.weight[0])


# -- bad input ---------------------------------------------------------------------------
def _bad(regions, which, region, **change):
    data, mc, _ = regions
    data, mc = dict(data), dict(mc)
    target = data if which == "data" else mc
    fields = {
        "x": target[region].x,
        "weight": target[region].weight,
        "flavour": target[region].flavour,
    }
    fields.update(change)
    target[region] = RegionData(**fields)
    return data, mc


def test_region_without_jets_is_refused(regions):
    data, mc = _bad(regions, "data", "c", x=np.zeros((0, 2)))
    with pytest.raises(ValueError, match="data region 'c' has no jets"):
        fit_em(data, mc, FAST, progress=False)


def test_nan_inputs_are_refused(regions):
    x = regions[0]["light"].x.copy()
    x[[3, 17], 1] = np.nan
    data, mc = _bad(regions, "data", "light", x=x)
    with pytest.raises(ValueError, match="data region 'light': 2 of 1200 jets have NaN"):
        fit_em(data, mc, FAST, progress=False)


def test_weights_summing_to_zero_are_refused(regions):
    n = len(regions[1]["b"].x)
    w = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    data, mc = _bad(regions, "mc", "b", weight=w)
    with pytest.raises(ValueError, match=r"MC region 'b': event weights sum to 0 \(<= 0\)"):
        fit_em(data, mc, FAST, progress=False)


def test_flavour_absent_from_mc_is_refused(regions):
    data, mc, _ = regions
    mc = {
        r: RegionData(x=v.x, flavour=np.where(v.flavour == 4, 5, v.flavour)) for r, v in mc.items()
    }
    with pytest.raises(ValueError, match=r"flavour 'c' \(code 4\) is absent from the MC"):
        fit_em(data, mc, FAST, progress=False)


def test_unknown_flavour_code_is_refused(regions):
    flav = regions[1]["c"].flavour.copy()
    flav[:5] = 21
    data, mc = _bad(regions, "mc", "c", flavour=flav)
    with pytest.raises(ValueError, match=r"MC region 'c': 5 jets have flavour codes \[21\]"):
        fit_em(data, mc, FAST, progress=False)


def test_singular_composition_is_refused(regions):
    data, mc, _ = regions
    same = dict(mc)
    same["light"] = mc["c"]  # two regions with the same composition: Pi has rank 2
    with pytest.raises(ValueError, match="singular"):
        fit_em(data, same, FAST, progress=False)


def test_near_singular_composition_warns():
    pi = np.array([[0.5, 0.3, 0.2], [0.45, 0.35, 0.2], [0.1, 0.1, 0.8]])
    with pytest.warns(CompositionWarning, match=r"nearly singular: kappa = \d"):
        kappa = check_composition(pi, ["x", "y", "z"], EMConfig())
    assert kappa > 10
    assert check_composition(np.eye(3) * 0.9 + 0.1 / 3, ["x", "y", "z"], EMConfig()) < 1.5


def test_restarts_return_the_fit_of_highest_posterior(regions, tmp_path):
    """restarts = 3: the first restart is the plain fit of that seed, the others are
    independent fits (own pretraining), the returned fit is the one of lowest final
    objective, and all are recorded (and saved)."""
    small, smc, cfg = tiny_fit(regions, 3, 4, 6)
    single = fit_em(small, smc, cfg, seed=4, progress=False)
    multi = fit_em(small, smc, cfg.model_copy(update={"restarts": 3}), seed=4, progress=False,
                   checkpoint_dir=tmp_path)
    rec = multi.restarts
    assert [r["restart"] for r in rec] == [0, 1, 2]
    assert len({r["seed"] for r in rec}) == 3
    assert rec[0]["seed"] == 4
    assert rec[0]["objective"] == single.trace[-1]["objective"]  # restart 0 = the plain fit
    assert len({round(r["objective"], 12) for r in rec}) == 3  # different starts, optima
    best = min(rec, key=lambda r: r["objective"])
    assert [r["selected"] for r in rec] == [r is best for r in rec]
    assert multi.trace[-1]["objective"] == best["objective"]
    np.testing.assert_allclose(multi.fractions, best["fractions"])
    assert (tmp_path / "restart_2").is_dir()
    loaded = EMResult.load(multi.save(tmp_path / "em.npz"))
    assert loaded.restarts == rec
    assert single.restarts[0]["selected"]
    assert len(single.restarts) == 1
