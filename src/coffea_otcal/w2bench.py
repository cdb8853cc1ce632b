"""Loader of the public Wasserstein-2 benchmark pairs (Korotin et al. 2021, Mix3toMix10)."""

from __future__ import annotations

__all__ = [
    "W2BENCH_DIMS",
    "W2Pair",
    "default_w2bench_dir",
    "l2_uvp",
    "linear_w2_map",
    "load_w2_pair",
]

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: Dimensions for which the pretrained potentials are available.
W2BENCH_DIMS = (2, 4, 8, 16, 32, 64, 128)

#: Samples used to standardise the ground-truth potential (README: 2^14).
_STANDARDISE_SAMPLES = 2**14
_STANDARDISE_SEED = 0x5EED


def default_w2bench_dir() -> Path:
    """``$COFFEA_OTCAL_W2BENCH`` or ``<repository>/../shared/data/w2bench``."""
    env = os.environ.get("COFFEA_OTCAL_W2BENCH")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "w2bench"


def _mixture_parameters(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres (3, D) and matrices (3, D, D) of the source mixture (README recipe)."""
    state = np.random.get_state()
    try:
        np.random.seed(0)
        centres = np.zeros((3, dim))
        for d in range(dim):
            centres[:, d] = np.random.choice([0, 1, 2], 3, replace=False)
        centres -= 1.0
        mats = np.random.normal(size=(3, dim, dim)).astype(np.float32).astype(np.float64)
    finally:
        np.random.set_state(state)
    mats /= np.linalg.norm(mats, axis=2, keepdims=True)
    factor = math.sqrt(np.mean(np.sum(centres**2, axis=1)) + dim * 0.4**2) / math.sqrt(dim)
    return centres / factor, mats / factor


class _BenchPotential(torch.nn.Module):
    """The benchmark's dense input-convex network (README: rank-1 quadratic layers, CELU)."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        super().__init__()
        self.U = [state[f"quadratic_layers.{i}.quadratic_decomposed"].float() for i in range(3)]
        self.W = [state[f"quadratic_layers.{i}.weight"].float() for i in range(3)]
        self.b = [state[f"quadratic_layers.{i}.bias"].float() for i in range(3)]
        self.C = [state[f"convex_layers.{i}.weight"].float() for i in range(2)]
        self.final = state["final_layer.weight"].float()

    def _q(self, i: int, x: Tensor) -> Tensor:
        dim, rank, width = self.U[i].shape
        proj = (x @ self.U[i].reshape(dim, rank * width)).reshape(-1, rank, width)
        return (proj**2).sum(1) + x @ self.W[i].T + self.b[i]

    def forward(self, x: Tensor) -> Tensor:
        h = self._q(0, x)
        for i in (1, 2):
            h = torch.nn.functional.celu(h @ self.C[i - 1].T + self._q(i, x))
        return (h @ self.final.T)[:, 0] + 0.5 * 0.01 * (x**2).sum(1)


class W2Pair:
    r"""One benchmark pair (P, Q = T*#P) of dimension D with its known optimal map.

    Source: :math:`x = c_k + 0.4 A_k z`, k uniform in {0,1,2}, z ~ N(0, I).
    Ground truth: :math:`\psi = (f_{v1} + f_{v2} - \mu\cdot x)/\sigma`,
    :math:`T^* = \nabla\psi` (Brenier), standardised so that Q has mean 0 and
    per-coordinate variance ~1.

    Arguments:
        dim: D, one of :data:`W2BENCH_DIMS`.
        root: folder with ``{D}_v1.pt`` and ``{D}_v2.pt``.

    References:
        A. Korotin et al., "Do Neural Optimal Transport Solvers Work? A Continuous
        Wasserstein-2 Benchmark", NeurIPS 2021.
    """

    def __init__(self, dim: int, root: Path | str | None = None) -> None:
        if dim not in W2BENCH_DIMS:
            msg = f"W2 benchmark dimension {dim} is not available; choose one of {W2BENCH_DIMS}"
            raise ValueError(msg)
        folder = Path(root) if root is not None else default_w2bench_dir()
        self.dim = dim
        self.centres, self.matrices = _mixture_parameters(dim)
        nets = []
        for tag in ("v1", "v2"):
            path = folder / f"{dim}_{tag}.pt"
            if not path.is_file():
                msg = (
                    f"benchmark potential {path} not found; set COFFEA_OTCAL_W2BENCH to the folder"
                )
                raise FileNotFoundError(msg)
            nets.append(_BenchPotential(torch.load(path, weights_only=True, map_location="cpu")))
        self._nets = nets
        self._mu = torch.zeros(dim, dtype=torch.float64)
        self._sigma = 1.0
        raw = self._raw_grad(
            torch.as_tensor(self.sample_source(_STANDARDISE_SAMPLES, _STANDARDISE_SEED))
        )
        self._mu = raw.mean(0)
        self._sigma = float(raw.var(0, unbiased=False).mean().sqrt())

    def sample_source(self, n: int, seed: int) -> np.ndarray:
        """``n`` samples of P (float64, (n, D)) from ``np.random.default_rng(seed)``."""
        rng = np.random.default_rng(seed)
        k = rng.integers(0, 3, size=n)
        z = rng.standard_normal((n, self.dim))
        x = np.empty((n, self.dim))
        for comp in range(3):
            rows = k == comp
            x[rows] = self.centres[comp] + 0.4 * z[rows] @ self.matrices[comp].T
        return x

    def sample_target(self, n: int, seed: int) -> np.ndarray:
        """``n`` samples of Q = T*#P, independent of :meth:`sample_source` with the same seed."""
        return self.optimal_map(self.sample_source(n, seed + 7_919_000))

    def _raw_grad(self, x: Tensor) -> Tensor:
        # float32 like the published weights (2x faster than float64 at D = 128);
        # the standardisation statistics are accumulated in float64.
        x = x.detach().float().requires_grad_(True)
        total = self._nets[0](x) + self._nets[1](x)
        (grad,) = torch.autograd.grad(total.sum(), x)
        return grad.double()

    def optimal_map(self, x: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """Ground-truth :math:`T^*(x)` at the rows of ``x`` (float64 numpy)."""
        out = np.empty_like(np.asarray(x, dtype=np.float64))
        for start in range(0, len(out), chunk):
            xt = torch.as_tensor(np.asarray(x[start : start + chunk], dtype=np.float64))
            out[start : start + chunk] = ((self._raw_grad(xt) - self._mu) / self._sigma).numpy()
        return out

    def l2_uvp(
        self, transport: Callable[[np.ndarray], np.ndarray], n: int = 4096, seed: int = 12345
    ) -> float:
        """L2-UVP (%) of ``transport`` (numpy (n, D) -> (n, D)) on ``n`` fresh source samples."""
        x = self.sample_source(n, seed)
        y = self.optimal_map(x)
        return l2_uvp(np.asarray(transport(x)), y)


def l2_uvp(predicted: np.ndarray, truth: np.ndarray) -> float:
    r"""L2-UVP (%) :math:`= 100\,E\|\hat T(x) - T^*(x)\|^2 / \mathrm{Var}(Q)`, Var = sum of per-axis variances."""
    var = float(np.sum(np.var(truth, axis=0)))
    return 100.0 * float(np.mean(np.sum((predicted - truth) ** 2, axis=1))) / var


def linear_w2_map(source: np.ndarray, target: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    r"""Gaussian W2 map :math:`x \mapsto m_2 + A (x - m_1)`, :math:`A = S_1^{-1/2}(S_1^{1/2} S_2 S_1^{1/2})^{1/2} S_1^{-1/2}`."""
    m1, m2 = source.mean(0), target.mean(0)
    s1, s2 = np.cov(source, rowvar=False), np.cov(target, rowvar=False)

    def sqrtm(mat: np.ndarray) -> np.ndarray:
        vals, vecs = np.linalg.eigh(np.atleast_2d(mat))
        return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T

    r1 = sqrtm(s1)
    r1_inv = np.linalg.inv(r1)
    a = r1_inv @ sqrtm(r1 @ np.atleast_2d(s2) @ r1) @ r1_inv
    return lambda x: m2 + (np.asarray(x) - m1) @ a.T


def load_w2_pair(dim: int, root: Path | str | None = None) -> W2Pair:
    """Load the Mix3toMix10 pair of dimension ``dim`` (see :class:`W2Pair`)."""
    return W2Pair(dim, root)
