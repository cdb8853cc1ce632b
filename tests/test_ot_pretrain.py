"""Tests of coffea_otcal.ot_pretrain: block OT targets and the minibatch-OT start of fit_ot_map."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffea_otcal.ot import OTConfig, fit_ot_map
from coffea_otcal.ot_pretrain import blockwise_ot_targets


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(5, 60), block=st.integers(2, 25))
def test_unit_weight_targets_are_a_monotone_pairing_of_the_targets(seed, n, block):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, 2)), rng.normal(size=(n, 2)) * 2 + 1
    out = blockwise_ot_targets(x, y, block=block, rng=np.random.default_rng(seed))
    assert len(out["x"]) == n
    assert out["blocks"] == -(-n // block)
    np.testing.assert_allclose(out["weight"], 1.0)
    # unit weights: the plan is a permutation, so every target is one of the y rows, once
    matched = [np.flatnonzero(np.all(np.isclose(y, t), axis=1)) for t in out["target"]]
    assert all(len(m) == 1 for m in matched)
    assert len({int(m[0]) for m in matched}) == n
    # an optimal assignment is cyclically monotone: no swap of two partners lowers the cost
    xs, ts = out["x"], out["target"]
    i, j = rng.integers(0, n, size=(2, 200))
    same_block = i // block == j // block  # rows are kept in draw order, block by block
    kept = ((xs[i] - ts[i]) ** 2).sum(1) + ((xs[j] - ts[j]) ** 2).sum(1)
    swapped = ((xs[i] - ts[j]) ** 2).sum(1) + ((xs[j] - ts[i]) ** 2).sum(1)
    assert np.all(kept[same_block] <= swapped[same_block] + 1e-9)


def test_equal_samples_give_the_identity():
    x = np.random.default_rng(3).normal(size=(300, 2))
    out = blockwise_ot_targets(x, x.copy(), block=300, rng=np.random.default_rng(0))
    # one block holding the same points on both sides: the optimal plan is the identity
    order = np.argsort(out["x"][:, 0])
    np.testing.assert_allclose(out["target"][order], out["x"][order])


def test_non_positive_weights_are_left_out_of_the_pairing():
    rng = np.random.default_rng(4)
    n = 400
    x, y = rng.normal(size=(n, 1)), rng.normal(size=(n, 1)) + 3
    wx = np.where(np.arange(n) % 4 == 0, 0.0, 1.0)
    wx[1] = -2.0  # negative MC weights count as zero in the pairing
    out = blockwise_ot_targets(x, y, x_weight=wx, block=n, rng=np.random.default_rng(0))
    assert len(out["x"]) == int((wx > 0).sum())
    np.testing.assert_allclose(out["weight"].mean(), 1.0)
    # 300 sources of equal mass share the 400 targets: each barycentre lies in their hull
    assert out["target"].min() >= y.min()
    assert out["target"].max() <= y.max()


def test_context_cost_pairs_jets_within_their_context():
    rng = np.random.default_rng(5)
    n = 300
    cx = np.repeat([0.0, 1.0], n // 2)[:, None]
    cy = rng.permutation(cx)
    x = rng.normal(size=(n, 2))
    y = rng.normal(size=(n, 2)) + 4 * cy  # the targets of context 1 lie far away
    out = blockwise_ot_targets(x, y, x_context=cx, y_context=cy, block=n, context_cost=1e4,
                               rng=np.random.default_rng(0))
    for value in (0.0, 1.0):
        rows = out["context"][:, 0] == value
        ys = y[cy[:, 0] == value]
        partner_in_group = [np.any(np.all(np.isclose(ys, t), axis=1)) for t in out["target"][rows]]
        assert all(partner_in_group)
    # without the context term the closest targets are taken, whatever their context
    free = blockwise_ot_targets(x, y, x_context=cx, y_context=cy, block=n, context_cost=0.0,
                                rng=np.random.default_rng(0))
    assert not np.allclose(free["target"], out["target"])


def test_block_must_hold_two_rows():
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="pretrain_block must be >= 2"):
        blockwise_ot_targets(x, x, block=1, name="b")


def test_minibatch_ot_start_gives_an_accurate_map_and_records_it():
    rng = np.random.default_rng(5)
    # a two-component source: not a Gaussian pair, so the closed-form start alone is off
    k = rng.integers(0, 2, size=8000)
    x = np.where(k[:, None] == 1, 1.2, -1.2) + 0.5 * rng.normal(size=(8000, 2))
    def true_map(v):
        return 1.5 * v + 0.2 * np.tanh(v) + np.array([0.5, -1.0])
    y = true_map(np.where(rng.integers(0, 2, size=(8000, 1)) == 1, 1.2, -1.2)
                 + 0.5 * rng.normal(size=(8000, 2)))
    cfg = OTConfig(steps=200, batch_size=512, eval_every=100, hidden=(16, 16),
                   init="minibatch_ot", pretrain_steps=600, pretrain_block=500,
                   pretrain_rows=4000, lr=3e-3)
    fm = fit_ot_map(x, y, config=cfg, device="cpu", progress=False, name="mix")
    pre = fm.metrics["pretrain"]
    assert pre["rows"] == 4000
    assert pre["blocks"] == 8
    xt = x[:2000]
    truth = true_map(xt)
    uvp = 100 * np.mean(np.sum((fm.transport(xt) - truth) ** 2, 1)) / np.sum(np.var(truth, 0))
    assert uvp < 1.0, uvp
    # still the gradient of a convex potential: a monotone map
    x1, x2 = rng.normal(size=(2, 500, 2)) * 3
    assert np.all(np.sum((fm.transport(x1) - fm.transport(x2)) * (x1 - x2), 1) >= 0)
