from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coffea_otcal.flows import (
    FlavourFlows,
    FlowConfig,
    pretrain_flows,
    resolve_device,
    state_from_numpy,
    state_to_numpy,
)
from coffea_otcal.generator import GeneratorConfig, simulate_jets
from coffea_otcal.geometry import ilr

torch.set_num_threads(1)
SMALL = FlowConfig(hidden_features=(16, 16), pretrain_steps=150, batch_size=256)


def test_resolve_device_auto_is_cpu_without_gpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(0.01, 50.0),
    outlier=st.floats(0.0, 1e3),
    seed=st.integers(0, 2**16),
)
def test_standardisation_keeps_data_inside_spline_domain(scale, outlier, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, scale, size=(200, 2))
    x[0, 1] += outlier
    flows = FlavourFlows(2, 0, ("b", "c"), SMALL)
    flows.fit_standardisation(x)
    u = flows.standardise(torch.as_tensor(x, dtype=torch.float32))
    limit = SMALL.bound - SMALL.margin
    assert float(u.abs().max()) <= limit * (1 + 1e-5)
    back = flows.destandardise(u).double().numpy()
    np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-4 * max(scale, outlier))


def test_density_integrates_to_one_in_ilr_space():
    torch.manual_seed(3)
    flows = FlavourFlows(2, 0, ("b",), SMALL)
    rng = np.random.default_rng(0)
    flows.fit_standardisation(rng.normal([1.0, -2.0], [3.0, 0.5], size=(500, 2)))
    g1 = np.linspace(1.0 - 30, 1.0 + 30, 241)
    g2 = np.linspace(-2.0 - 6, -2.0 + 6, 241)
    xx, yy = np.meshgrid(g1, g2, indexing="ij")
    pts = np.stack([xx.ravel(), yy.ravel()], axis=1)
    dens = np.exp(flows.log_prob_numpy(pts))
    integral = dens.sum(axis=0) * (g1[1] - g1[0]) * (g2[1] - g2[0])
    np.testing.assert_allclose(integral, 1.0, atol=0.02)


@pytest.mark.parametrize("final_lr", [None, 1e-4])
def test_pretraining_learns_a_gaussian_to_its_entropy(final_lr):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    sig = np.array([0.8, 0.7])
    x = rng.normal(0.0, sig, size=(4000, 2))
    config = SMALL.model_copy(
        update={"pretrain_steps": 200, "learning_rate": 5e-3, "pretrain_final_lr": final_lr}
    )
    flows = FlavourFlows(2, 0, ("b",), config)
    flows.fit_standardisation(x)
    opt = torch.optim.Adam(flows.flows[0].parameters(), lr=config.learning_rate)
    pretrain_flows(flows, x, np.zeros(len(x), int), np.ones(len(x)), optimizers=[opt],
                   progress=False)
    assert opt.param_groups[0]["lr"] == config.learning_rate  # the schedule does not leak
    test = rng.normal(0.0, sig, size=(4000, 2))
    nll = -flows.log_prob_numpy(test)[:, 0].mean()
    entropy = 1.0 + np.log(2 * np.pi) + np.log(sig).sum()
    assert entropy - 0.03 < nll < entropy + 0.1


def test_gradients_reach_every_parameter():
    flows = FlavourFlows(2, 2, ("b", "c"), SMALL)
    x = torch.randn(64, 2)
    c = torch.randn(64, 2)
    flows.log_prob(x, c).sum().backward()
    for name, p in flows.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_conditional_flow_follows_its_context():
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    c = rng.uniform(-2, 2, size=(4000, 1))
    x = np.concatenate([c + rng.normal(0, 0.3, (4000, 1)), rng.normal(0, 1, (4000, 1))], axis=1)
    config = SMALL.model_copy(update={"pretrain_steps": 200, "learning_rate": 5e-3})
    flows = FlavourFlows(2, 1, ("b",), config)
    flows.fit_standardisation(x, c)
    pretrain_flows(flows, x, np.zeros(4000, int), np.ones(4000), context=c, progress=False)
    for value in (-1.5, 1.5):
        y = flows.sample(0, context=np.full((2000, 1), value), seed=4)
        assert abs(y[:, 0].mean() - value) < 0.25
        assert 0.15 < y[:, 0].std() < 0.6


def test_quantised_tagger_scores_never_give_nan():
    rng = np.random.default_rng(2)
    jets = simulate_jets(GeneratorConfig(), "cr_b", 2000, False, rng)
    # the stored 10-bit columns read as if they were full float32 (no mantissa_bits: B route
    # everywhere), the reading that leaves the most point masses
    from coffea_otcal.adapters import get_adapter
    from coffea_otcal.report import requantise

    x = np.asarray(ilr(requantise(get_adapter("deepjet"), jets["probs_raw"], 10)))
    _, counts = np.unique(x, axis=0, return_counts=True)
    assert counts.max() > 20  # real point masses from the quantised scores
    idx = np.array([{5: 0, 4: 1, 0: 2}[int(f)] for f in jets["flavour"]])
    torch.manual_seed(0)
    flows = FlavourFlows(2, 0, ("b", "c", "light"), SMALL.model_copy(update={"pretrain_steps": 40}))
    flows.fit_standardisation(x)
    pretrain_flows(flows, x, idx, np.ones(len(x)), progress=False)
    logp = flows.log_prob_numpy(x)
    assert np.isfinite(logp).all()
    assert np.isfinite(flows.sample("b", n=500, seed=0)).all()


def test_pretraining_refuses_an_absent_flavour():
    flows = FlavourFlows(2, 0, ("b", "c"), SMALL)
    x = np.random.default_rng(0).normal(size=(50, 2))
    flows.fit_standardisation(x)
    with pytest.raises(ValueError, match="flavour 'c' is absent from the MC"):
        pretrain_flows(flows, x, np.zeros(50, int), np.ones(50), progress=False)


def test_conditional_flows_demand_a_context():
    flows = FlavourFlows(2, 2, ("b",), SMALL)
    with pytest.raises(ValueError, match="conditional on 2 context features"):
        flows.log_prob(torch.zeros(3, 2))


def test_sampling_is_reproducible_and_state_round_trips():
    torch.manual_seed(5)
    flows = FlavourFlows(2, 0, ("b", "c"), SMALL)
    flows.fit_standardisation(np.random.default_rng(0).normal(size=(100, 2)))
    a = flows.sample("c", n=100, seed=9)
    b = flows.sample("c", n=100, seed=9)
    np.testing.assert_array_equal(a, b)
    other = FlavourFlows(2, 0, ("b", "c"), SMALL)
    other.load_state_dict(state_from_numpy(state_to_numpy(flows)))
    x = np.random.default_rng(1).normal(size=(20, 2))
    np.testing.assert_array_equal(other.log_prob_numpy(x), flows.log_prob_numpy(x))


def test_flavours_evaluated_in_threads_match_the_batched_torch_densities():
    """log_prob_numpy: per-flavour threads, small batches and the torch log_prob agree,
    for conditional flows too."""
    torch.manual_seed(2)
    rng = np.random.default_rng(2)
    x, c = rng.normal(size=(700, 2)), rng.normal(size=(700, 1))
    flows = FlavourFlows(2, 1, ("b", "c", "light"), SMALL)
    flows.fit_standardisation(x, c)
    ref = flows.log_prob(torch.as_tensor(x, dtype=torch.float32),
                         torch.as_tensor(c, dtype=torch.float32)).detach().double().numpy()
    serial = flows.log_prob_numpy(x, c, batch_size=128)
    threaded = flows.log_prob_numpy(x, c, batch_size=128, threads=3)
    np.testing.assert_array_equal(threaded, serial)
    np.testing.assert_allclose(serial, ref, rtol=0, atol=1e-5)
    assert torch.get_num_threads() == 1  # restored (this module runs on one thread)
    assert flows.log_prob_numpy(x[:0], c[:0]).shape == (0, 3)
    with pytest.raises(ValueError, match="pass context"):
        flows.log_prob_numpy(x)
