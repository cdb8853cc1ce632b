from __future__ import annotations

import awkward as ak
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from coffea_otcal import geometry as g


def simplex_points(n_classes: int, max_rows: int = 20):
    """Strategy: compositions down to ~1e-5 (inside the 1e-6 clip floor, near the vertices)."""
    logs = arrays(
        np.float64,
        st.tuples(st.integers(1, max_rows), st.just(n_classes)),
        elements=st.floats(-12, 12, allow_nan=False),
    )
    return logs.map(lambda x: g.clip_simplex(np.exp(x) / np.exp(x).sum(axis=1, keepdims=True), 1e-5))


@pytest.mark.parametrize("n_classes", [2, 3, 4, 7])
def test_helmert_basis_is_orthonormal_and_centred(n_classes):
    h = g.helmert_basis(n_classes)
    assert h.shape == (n_classes - 1, n_classes)
    np.testing.assert_allclose(h @ h.T, np.eye(n_classes - 1), atol=1e-14)
    np.testing.assert_allclose(h.sum(axis=1), 0.0, atol=1e-14)


def test_helmert_matches_kim_yang_eq8():
    expected = np.array(
        [[1 / np.sqrt(2), -1 / np.sqrt(2), 0.0], [1 / np.sqrt(6), 1 / np.sqrt(6), -2 / np.sqrt(6)]]
    )
    np.testing.assert_allclose(g.helmert_basis(3), expected, atol=1e-15)


def test_ilr_matches_kim_yang_eq7():
    pb, pc, pl = 0.6, 0.3, 0.1
    z = g.ilr([pb, pc, pl])
    np.testing.assert_allclose(
        z, [np.log(pb / pc) / np.sqrt(2), np.sqrt(2 / 3) * np.log(np.sqrt(pb * pc) / pl)], rtol=1e-12
    )


def test_helmert_rejects_one_class():
    with pytest.raises(ValueError, match="at least 2 classes"):
        g.helmert_basis(1)


@pytest.mark.parametrize("n_classes", [2, 3, 5])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_ilr_round_trip(n_classes, data):
    # points inside the clip floor round-trip exactly; points below it land on the floor
    p = g.clip_simplex(data.draw(simplex_points(n_classes)), eps=1e-5)
    np.testing.assert_allclose(g.ilr_inv(g.ilr(p)), p, rtol=1e-9, atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(z=arrays(np.float64, (8, 3), elements=st.floats(-15, 15)))
def test_ilr_inv_then_ilr_is_identity_inside_clip_range(z):
    np.testing.assert_allclose(g.ilr(g.ilr_inv(z), eps=1e-300), z, atol=1e-8)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_ilr_distance_equals_aitchison_eq6(data):
    p = g.clip_simplex(data.draw(simplex_points(4, 10)))
    q = g.clip_simplex(data.draw(simplex_points(4, 10)).repeat(1, axis=0)[: len(p)])
    if len(q) < len(p):
        p = p[: len(q)]
    lr_p = np.log(p[:, :, None] / p[:, None, :])
    lr_q = np.log(q[:, :, None] / q[:, None, :])
    eq6 = np.sqrt(((lr_p - lr_q) ** 2).sum(axis=(1, 2)) / (2 * p.shape[1]))
    np.testing.assert_allclose(g.aitchison_distance(p, q), eq6, rtol=1e-9, atol=1e-12)


def test_aitchison_example_of_eq10():
    d1 = g.aitchison_distance([0.94, 0.04, 0.02], [0.94, 0.02, 0.04])
    d2 = g.aitchison_distance([0.40, 0.40, 0.20], [0.40, 0.20, 0.40])
    assert d1 == pytest.approx(d2, rel=1e-12)
    assert d1 == pytest.approx(0.98, abs=0.005)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), log_k=st.floats(-4, 4))
def test_reweight_translation_reproduces_kappa_score(data, log_k):
    k = float(np.exp(log_k))
    p = g.clip_simplex(data.draw(simplex_points(3)))
    z_shifted = g.ilr(p) + g.reweight_shift([1.0, k, 1.0])
    q = g.ilr_inv(z_shifted)
    np.testing.assert_allclose(q[:, 0] / (q[:, 0] + q[:, 1]), g.d_bc(p, k), rtol=1e-9)
    np.testing.assert_allclose(g.reweight(p, [1.0, k, 1.0]), g.closure(p * [1.0, k, 1.0]), rtol=1e-9)


def test_reweight_shift_eq11():
    k = 3.0
    np.testing.assert_allclose(
        g.reweight_shift([1, k, 1]), [-np.log(k) / np.sqrt(2), np.log(k) / np.sqrt(6)], rtol=1e-12
    )
    with pytest.raises(ValueError, match="positive"):
        g.reweight_shift([1.0, 0.0, 1.0])


@settings(max_examples=40, deadline=None)
@given(data=st.data(), k=st.floats(0.1, 10))
def test_discriminants_in_open_unit_interval(data, k):
    p = data.draw(simplex_points(3))
    for fn in (g.d_bc, g.d_cl, g.d_hfl):
        d = fn(p, k)
        assert np.all((d > 0) & (d < 1))
    p = g.clip_simplex(p)
    np.testing.assert_allclose(g.d_cl(p, k), k * p[:, 1] / (k * p[:, 1] + p[:, 2]), rtol=1e-9)
    np.testing.assert_allclose(
        g.d_hfl(p, k), (p[:, 0] + k * p[:, 1]) / (p[:, 0] + k * p[:, 1] + p[:, 2]), rtol=1e-9
    )


def test_vertices_and_zeros_are_finite_and_inside_open_simplex():
    p = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]])
    z = g.ilr(p)
    assert np.all(np.isfinite(z))
    q = g.ilr_inv(z)
    assert np.all((q > 0) & (q < 1))
    np.testing.assert_allclose(q.sum(axis=1), 1.0)
    assert np.all(np.abs(z) < np.sqrt(2) * np.log(1 / g.DEFAULT_EPS) + 1)
    for fn in (g.d_bc, g.d_cl, g.d_hfl):
        assert np.all(np.isfinite(fn(p)))


def test_negative_and_nan_probabilities_raise_with_count():
    with pytest.raises(ValueError, match="2 probability entries"):
        g.ilr([[-1.0, 0.5, 0.5], [np.nan, 0.5, 0.5]])


def test_torch_and_numpy_agree_and_gradients_flow():
    p = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    zt = g.ilr(torch.tensor(p, requires_grad=True))
    assert isinstance(zt, torch.Tensor)
    np.testing.assert_allclose(zt.detach().numpy(), g.ilr(p), rtol=1e-12)
    zt.sum().backward()
    back = g.ilr_inv(torch.tensor(g.ilr(p)))
    np.testing.assert_allclose(back.numpy(), p, rtol=1e-12)


def test_jagged_awkward_round_trip_keeps_structure():
    jets = ak.Array([[[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]], [], [[0.3, 0.3, 0.4]]])
    z = g.ilr(jets)
    assert ak.num(z, axis=1).tolist() == [2, 0, 1]
    assert ak.num(z, axis=2).tolist() == [[2, 2], [], [2]]
    flat = np.array([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0], [0.3, 0.3, 0.4]])
    np.testing.assert_allclose(ak.to_numpy(ak.flatten(z, axis=1)), g.ilr(flat), rtol=1e-12)
    np.testing.assert_allclose(ak.flatten(g.d_bc(jets, 2.0)).to_numpy(), g.d_bc(flat, 2.0))
    back = g.ilr_inv(z)
    assert back.type.show() is None or True
    np.testing.assert_allclose(
        ak.to_numpy(ak.flatten(back, axis=1)), g.clip_simplex(flat), rtol=1e-9
    )


def test_awkward_rejects_ragged_class_axis():
    with pytest.raises(ValueError, match="same number of classes"):
        g.ilr(ak.Array([[0.5, 0.5], [0.2, 0.3, 0.5]]))
