"""Tests of coffea_otcal.kernels: numpy evaluator against torch, fitted-map algebra."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from coffea_otcal.gradient_kernels import CHUNK
from coffea_otcal.kernels import FittedMap, NumpyPotential
from coffea_otcal.potentials import ICNN, PICNN, ICNNConfig, PICNNConfig


def _net(kind: str, seed: int = 0) -> torch.nn.Module:
    if kind == "icnn":
        net = ICNN(ICNNConfig(dim=3, hidden=(16, 8, 4)), seed=seed)
    elif kind == "icnn-softplus":
        net = ICNN(ICNNConfig(dim=2, hidden=(8, 8), activation="softplus"), seed=seed)
    else:
        net = PICNN(
            PICNNConfig(
                dim=3, context_dim=2, hidden=(12, 6), context_hidden=(5, 7), quadratic_rank=2
            ),
            seed=seed,
        )
    net = net.double()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.4 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    net.project()
    return net


@pytest.mark.parametrize("kind", ["icnn", "icnn-softplus", "picnn"])
def test_numpy_grad_matches_torch_autograd_float64(kind):
    net = _net(kind)
    gen = torch.Generator().manual_seed(2)
    n = 20_000  # more than one evaluation chunk
    x = torch.randn(n, net.config.dim, generator=gen, dtype=torch.float64, requires_grad=True)
    c = torch.randn(n, 2, generator=gen, dtype=torch.float64) if kind == "picnn" else None
    value = net(x, c)
    (auto,) = torch.autograd.grad(value.sum(), x)
    kernel = NumpyPotential.from_export(json.loads(json.dumps(net.export())))
    v_np, g_np = kernel.value_and_grad(x.detach().numpy(), None if c is None else c.numpy())
    assert g_np.dtype == np.float64
    assert np.max(np.abs(g_np - auto.numpy())) < 1e-6
    assert np.max(np.abs(v_np - value.detach().numpy())) < 1e-6
    assert np.max(np.abs(g_np - auto.numpy())) < 1e-12  # in fact exact to rounding


@pytest.mark.parametrize("kind", ["icnn", "picnn"])
def test_float32_kernel_close_to_float64(kind):
    net = _net(kind, seed=1)
    x = np.random.default_rng(0).normal(size=(1000, 3))
    c = np.random.default_rng(1).normal(size=(1000, 2)) if kind == "picnn" else None
    k64 = NumpyPotential.from_export(net.export())
    k32 = NumpyPotential.from_export(net.export(), dtype=np.float32)
    g32 = k32.grad(x, c)
    assert g32.dtype == np.float32
    assert np.max(np.abs(g32 - k64.grad(x, c))) < 1e-4 * (1 + np.max(np.abs(k64.grad(x, c))))


def _fitted(kind: str) -> dict:
    net = _net(kind, seed=3)
    pre = {"shift": [0.5, -1.0, 2.0], "scale": 1.7}
    if kind == "picnn":
        pre |= {"context_shift": [3.0, 1.0], "context_scale": [0.5, 2.0]}
    return {
        "format": "coffea-otcal.fitted-map",
        "version": 1,
        "name": "b",
        "potential": net.export(),
        "preprocessing": pre,
        "metrics": {"steps": 1},
    }


@pytest.mark.parametrize("kind", ["icnn", "picnn"])
def test_fitted_map_is_gradient_of_potential_in_original_coordinates(kind):
    fm = FittedMap.from_export(json.loads(json.dumps(_fitted(kind))))
    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, 3)) * 2
    c = rng.normal(size=(50, 2)) if kind == "picnn" else None
    h = 1e-5
    num = np.stack(
        [
            (fm.potential_value(x + h * e, c) - fm.potential_value(x - h * e, c)) / (2 * h)
            for e in np.eye(3)
        ],
        axis=1,
    )
    t = fm.transport(x, c)
    assert np.max(np.abs(num - t)) < 1e-5
    assert np.max(np.abs(fm.transport_torch(x, c).numpy() - t)) < 1e-9
    assert FittedMap.from_export(fm.export()).transport(x, c) == pytest.approx(t, abs=1e-12)


def test_fitted_map_bad_inputs_are_named():
    fm = FittedMap.from_export(_fitted("picnn"))
    with pytest.raises(ValueError, match=r"map 'b' needs a context"):
        fm.transport(np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        fm.transport(np.zeros((3, 2)), np.zeros((3, 2)))
    bad = _fitted("icnn")
    bad["potential"]["params"].pop("A1")
    with pytest.raises(ValueError, match="lacks parameter 'A1'"):
        FittedMap.from_export(bad)
    bad = _fitted("icnn")
    bad["potential"]["params"]["A0"][0][0] = float("nan")
    with pytest.raises(ValueError, match="parameter 'A0' holds a non-finite number nan"):
        FittedMap.from_export(bad)
    bad = _fitted("icnn")
    bad["preprocessing"]["shift"] = [0.0]
    with pytest.raises(ValueError, match="shift has length 1"):
        FittedMap.from_export(bad)
    bad = _fitted("icnn")
    bad["unknown"] = 1
    with pytest.raises(ValueError, match="unknown"):
        FittedMap.from_export(bad)


def test_kernels_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import json, numpy as np\n"
        "from coffea_otcal.kernels import FittedMap\n"
        f"fm = FittedMap.from_export(json.loads({json.dumps(json.dumps(_fitted('icnn')))}))\n"
        "print(fm.transport(np.zeros((2, 3))).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(2, 3)"


@pytest.mark.parametrize("kind", ["icnn", "icnn-softplus", "picnn"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gradient_only_kernel_equals_value_and_grad(kind, dtype):
    net = _net(kind, seed=5)
    rng = np.random.default_rng(6)
    n = CHUNK + 1234  # a full block and a partial one
    x = rng.normal(size=(n, net.config.dim)) * 1.5
    c = rng.normal(size=(n, 2)) if kind == "picnn" else None
    kernel = NumpyPotential.from_export(net.export(), dtype=dtype)
    fast = kernel.grad(x, c)
    ref = kernel.value_and_grad(x, c)[1]
    assert fast.dtype == np.dtype(dtype)
    scale = 1 + np.max(np.abs(ref))
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert np.max(np.abs(fast - ref)) < tol * scale


@pytest.mark.parametrize("kind", ["icnn", "picnn"])
def test_transport_folds_the_standardisation_exactly(kind):
    fm = FittedMap.from_export(_fitted(kind))
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3000, 3)) * 2
    c = rng.normal(size=(3000, 2)) * 3 + 1 if kind == "picnn" else None
    cs = None
    if c is not None:
        cs = (c - fm.context_shift) / fm.context_scale
    by_hand = fm.shift + fm.scale * fm.potential.grad((x - fm.shift) / fm.scale, cs)
    out = np.full((3000, 3), np.nan)
    got = fm.transport(x, c, out=out)
    assert got is out
    assert np.max(np.abs(got - by_hand)) < 1e-12
    if c is not None:  # float32 context and a float32 map: same map to float32 rounding
        f32 = FittedMap.from_export(_fitted(kind), dtype=np.float32)
        got32 = f32.transport(x.astype(np.float32), c.astype(np.float32))
        assert got32.dtype == np.float64
        assert np.max(np.abs(got32 - got)) < 1e-4 * (1 + np.max(np.abs(got)))
    with pytest.raises(ValueError, match=r"out must be a float64 array of shape \(3000, 3\)"):
        fm.transport(x, c, out=np.empty((3000, 2)))


def test_work_buffers_are_per_thread_and_shared_across_maps():
    """Maps of different widths reuse one thread's buffers; threads never share them."""
    maps = [
        FittedMap.from_export(_fitted("picnn")),
        FittedMap.from_export(_fitted("icnn")),
        FittedMap.from_export(_fitted("picnn"), dtype=np.float32),
    ]
    rng = np.random.default_rng(8)
    x = rng.normal(size=(2 * CHUNK, 3))
    c = rng.normal(size=(2 * CHUNK, 2))
    args = [(x, c), (x, None), (x, c)]
    serial = [m.transport(*a) for m, a in zip(maps, args, strict=True)]
    # interleaved in one thread: a wide map's buffers serve the next, narrower one
    assert all(np.array_equal(maps[i].transport(*args[i]), serial[i]) for i in (2, 0, 1, 0, 2, 1))
    mismatches = []

    def work() -> None:
        for _ in range(4):
            if not np.array_equal(maps[0].transport(*args[0]), serial[0]):
                mismatches.append(1)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mismatches == []


def test_block_products_run_on_one_blas_thread():
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    fm = FittedMap.from_export(_fitted("picnn"))
    seen: list[list[int]] = []
    original = fm.potential.grad_block

    def spy(*args: object) -> np.ndarray:
        seen.append(blas_threads())
        return original(*args)

    fm.potential.grad_block = spy  # type: ignore[method-assign]
    with threadpool_limits(2, user_api="blas"):
        before = blas_threads()
        fm.transport(np.zeros((5, 3)), np.zeros((5, 2)))
        assert blas_threads() == before == [2] * len(before)
    assert len(before) >= 1
    assert seen == [[1] * len(before)]
