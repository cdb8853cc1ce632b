"""Tests of coffea_otcal.potentials: convexity, closed-form gradient, export round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coffea_otcal.potentials import (
    ICNN,
    PICNN,
    ICNNConfig,
    PICNNConfig,
    potential_from_export,
    smooth_relu,
    smooth_relu_grad,
)


def _perturbed(net: torch.nn.Module, seed: int, scale: float = 0.5) -> torch.nn.Module:
    """A float64 potential with random (non-initial) parameters, projected to stay convex."""
    gen = torch.Generator().manual_seed(seed)
    net = net.double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    net.project()
    return net


def _nets(seed: int) -> list[torch.nn.Module]:
    return [
        _perturbed(ICNN(ICNNConfig(dim=3, hidden=(16, 8, 4)), seed=seed), seed),
        _perturbed(ICNN(ICNNConfig(dim=2, hidden=(6,), activation="softplus"), seed=seed), seed),
        _perturbed(
            PICNN(
                PICNNConfig(dim=3, context_dim=2, hidden=(12, 6), context_hidden=(5, 7)), seed=seed
            ),
            seed,
        ),
    ]


def _ctx(net: torch.nn.Module, n: int, gen: torch.Generator) -> torch.Tensor | None:
    if isinstance(net, PICNN):
        return torch.randn(n, net.config.context_dim, generator=gen, dtype=torch.float64)
    return None


def test_smooth_relu_values_and_derivative():
    u = torch.tensor([-2.0, 0.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    assert torch.allclose(
        smooth_relu(u), torch.tensor([0.0, 0.0, 0.125, 0.5, 2.5], dtype=torch.float64)
    )
    assert torch.allclose(
        smooth_relu_grad(u), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0], dtype=torch.float64)
    )
    u.requires_grad_(True)
    (g,) = torch.autograd.grad(smooth_relu(u).sum(), u)
    assert torch.allclose(g, smooth_relu_grad(u.detach()))


@pytest.mark.parametrize("index", [0, 1, 2])
def test_closed_form_grad_matches_autograd(index):
    net = _nets(3)[index]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, net.config.dim, generator=gen, dtype=torch.float64, requires_grad=True)
    c = _ctx(net, 200, gen)
    (auto,) = torch.autograd.grad(net(x, c).sum(), x)
    closed = net.grad_x(x, c)
    assert torch.max(torch.abs(auto - closed)).item() < 1e-10


def test_value_and_grad_is_one_consistent_pass():
    gen = torch.Generator().manual_seed(11)
    for net in _nets(11):
        x = torch.randn(40, net.config.dim, generator=gen, dtype=torch.float64)
        c = _ctx(net, 40, gen)
        value, grad = net.value_and_grad(x, c, net.quadratic())
        assert torch.allclose(value, net(x, c), atol=1e-12)
        assert torch.allclose(grad, net.grad_x(x, c), atol=1e-12)


def test_gradients_reach_every_parameter():
    for net in _nets(4):
        x = torch.randn(64, net.config.dim, dtype=torch.float64)
        c = _ctx(net, 64, torch.Generator().manual_seed(0))
        loss = net(x, c).sum() + net.grad_x(x, c).pow(2).sum()
        loss.backward()
        for name, p in net.named_parameters():
            assert p.grad is not None, name
            assert torch.any(p.grad != 0), name


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.floats(0.0, 1.0))
def test_convex_along_segments(seed, t):
    gen = torch.Generator().manual_seed(seed)
    for net in _nets(seed % 7):
        x = torch.randn(32, net.config.dim, generator=gen, dtype=torch.float64) * 3
        y = torch.randn(32, net.config.dim, generator=gen, dtype=torch.float64) * 3
        c = _ctx(net, 32, gen)
        with torch.no_grad():
            mid = net(t * x + (1 - t) * y, c)
            chord = t * net(x, c) + (1 - t) * net(y, c)
        assert torch.all(mid <= chord + 1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_map_is_monotone_and_strongly_monotone(seed):
    gen = torch.Generator().manual_seed(seed)
    for net in _nets(seed % 5):
        x = torch.randn(64, net.config.dim, generator=gen, dtype=torch.float64) * 2
        y = torch.randn(64, net.config.dim, generator=gen, dtype=torch.float64) * 2
        c = _ctx(net, 64, gen)
        with torch.no_grad():
            inner = ((net.grad_x(x, c) - net.grad_x(y, c)) * (x - y)).sum(-1)
        mu = net.config.strong_convexity
        assert torch.all(inner >= mu * ((x - y) ** 2).sum(-1) - 1e-9)


def test_initial_map_is_near_identity():
    net = ICNN(ICNNConfig(dim=4, hidden=(32, 32))).double()
    x = torch.randn(500, 4, dtype=torch.float64)
    rel = (net.grad_x(x) - x).pow(2).sum() / x.pow(2).sum()
    assert rel.item() < 0.05
    pic = PICNN(PICNNConfig(dim=2, context_dim=2)).double()
    x2 = torch.randn(500, 2, dtype=torch.float64)
    rel2 = (pic.grad_x(x2, torch.randn(500, 2, dtype=torch.float64)) - x2).pow(2).sum() / x2.pow(
        2
    ).sum()
    assert rel2.item() < 0.05


def test_export_round_trip_is_json_and_exact():
    gen = torch.Generator().manual_seed(5)
    for net in _nets(5):
        d = json.loads(json.dumps(net.export()))
        assert set(d) == {"kind", "config", "params"}
        back = potential_from_export(d)
        x = torch.randn(50, net.config.dim, generator=gen, dtype=torch.float64)
        c = _ctx(net, 50, gen)
        with torch.no_grad():
            assert torch.allclose(back(x, c), net(x, c), atol=1e-9)
            assert torch.allclose(back.grad_x(x, c), net.grad_x(x, c), atol=1e-9)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="hidden widths"):
        ICNNConfig(dim=2, hidden=(0, 3))
    with pytest.raises(ValueError, match="extra"):
        ICNNConfig(dim=2, widths=(3,))
    with pytest.raises(ValueError, match="takes no context"):
        ICNN(ICNNConfig(dim=2))(torch.zeros(1, 2), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="needs a context"):
        PICNN(PICNNConfig(dim=2, context_dim=1))(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="unknown potential kind"):
        potential_from_export({"kind": "mlp", "config": {}, "params": {}})
    assert np.isfinite(ICNN(ICNNConfig(dim=2)).export()["params"]["offset"])
