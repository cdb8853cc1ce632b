"""Gradient-only numpy kernels of exported ICNN / PICNN potentials (feature-major, buffered)."""

from __future__ import annotations

__all__ = ["CHUNK", "WORKSPACE", "FeatureMajorGradient", "Workspace", "one_blas_thread"]

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from coffea_otcal.kernels import NumpyPotential

#: Rows evaluated at once: keeps the (width, CHUNK) work buffers inside the L2 cache.
CHUNK = 8192


def _relu(a: np.ndarray) -> None:
    """``a = max(a, 0)`` in place, with numpy's dedicated clip loop.

    ``np.clip`` with both bounds is 2.6x faster than ``np.maximum``, whose NaN-propagating
    loop dominated the gates (numpy 2.4). Values are equal and NaN is kept; -0.0 stays -0.0
    (``maximum`` gives +0.0), which no sum or product downstream can tell apart: the
    calibrated columns came out bit-identical on 300k jets.
    """
    np.clip(a, 0.0, np.inf, out=a)


class Workspace(threading.local):
    """Per-thread scratch buffers, reused by every block and every map (no allocation per block).

    Allocating the ``(width, chunk)`` temporaries afresh for each block costs a page fault
    per page whenever glibc serves them with ``mmap`` (blocks above its mmap threshold, e.g.
    in a fresh worker process): the kernels ran 3x slower that way. Buffers are named; a
    name's buffer grows to the largest size asked for and is never shared by two live
    arrays of one evaluation.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, str], np.ndarray] = {}

    def get(self, name: str, rows: int, cols: int, dtype: np.dtype) -> np.ndarray:
        """A C-contiguous ``(rows, cols)`` view of the buffer ``name`` (uninitialised)."""
        key = (name, dtype.char)
        size = rows * cols
        buf = self.buffers.get(key)
        if buf is None or buf.size < size:
            buf = np.empty(max(size, rows * CHUNK), dtype=dtype)
            self.buffers[key] = buf
        return buf[:size].reshape(rows, cols)


#: The module's per-thread work buffers.
WORKSPACE = Workspace()

_CONTROLLER: Any = None


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block products on one BLAS thread (restored on exit).

    The products of a block are far too small to split across threads: with OpenBLAS's
    default of one thread per core, a PICNN map ran at 0.13 M jets/s instead of 4 M jets/s
    on a loaded 2-core machine (``docs/bundle.md``, speed). Dask workers already set
    ``OPENBLAS_NUM_THREADS=1``; this covers in-process executors and direct use. The
    ``threadpoolctl`` controller is built once per process; a limit costs ~20 us.
    """
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    with _CONTROLLER.limit(limits=1, user_api="blas"):
        yield


class FeatureMajorGradient:
    r"""The gradient map :math:`\nabla_x g` of a :class:`~coffea_otcal.kernels.NumpyPotential`.

    Feature-major layout: a block of B rows is held as ``(width, B)`` arrays, so every slice
    of a fused product (gates, pre-activations, trunk) is contiguous and every elementwise
    pass streams; products are ``W @ h`` with the weights as ``(out, in)`` matrices. Only
    the gradient recursion runs (no potential value, no forward pass of the output layer),
    and every intermediate lives in a per-thread :data:`WORKSPACE` buffer (no allocation
    per block). The maths and the floats are those of ``NumpyPotential.value_and_grad``
    up to the order of float summation.

    Arguments:
        pot: the evaluator whose fused parameters are re-laid out.
    """

    def __init__(self, pot: NumpyPotential) -> None:
        from coffea_otcal.kernels import _smooth_relu

        p = pot._p
        self.kind, self.dim, self.dtype, self.n_layers = pot.kind, pot.dim, pot.dtype, pot.n_layers
        self.p = p
        self.activation: Any = None if pot.activation is _smooth_relu else pot.activation
        last = pot.n_layers - 1
        if self.kind == "icnn":
            self.offsets = pot._offsets
            self.a_all = pot._a_all
            self.a = np.ascontiguousarray(pot._a_all.T)
            self.b = np.ascontiguousarray(pot._b_all[:, None])
            self.w = {i: np.ascontiguousarray(p[f"W{i}"].T) for i in range(1, pot.n_layers)}
            self.quad = np.ascontiguousarray(p["quadratic"].T)
            self.lin = np.ascontiguousarray(p["linear"][:, None])
            self.wout = np.ascontiguousarray(p["w_out"][:, None])
            return
        # Gradient-only, feature-major copies: (out, in) matrices, (width, 1) biases; the last
        # layer's Wu column (it enters the value only) is dropped, and x multiplies
        # [quadratic | Q] in one product.
        self.mats: list[tuple[np.ndarray, np.ndarray, list[int]]] = []
        for i, (mat, bias, cuts) in enumerate(pot._u_mats):
            if i == last:
                keep = np.r_[0 : cuts[0], cuts[1] : mat.shape[1]]
                mat, bias = mat[:, keep], bias[keep]
                cuts = [cuts[0], *(c - (cuts[1] - cuts[0]) for c in cuts[2:])]
            self.mats.append(
                (np.ascontiguousarray(mat.T), np.ascontiguousarray(bias[:, None]), cuts)
            )
        self.wx = [np.ascontiguousarray(p[f"Wx{i}"].T) for i in range(pot.n_layers)]
        self.wz = {i: np.ascontiguousarray(p[f"Wz{i}"].T) for i in range(1, pot.n_layers)}
        self.xq = np.ascontiguousarray(np.concatenate([p["quadratic"], p["Q"]], axis=1).T)
        self.q = np.ascontiguousarray(p["Q"])
        self.wz_last = np.ascontiguousarray(p[f"Wz{last}"][:, :1]) if last > 0 else None
        self.wx_last = np.ascontiguousarray(p[f"Wx{last}"][:, :1])

    def __call__(
        self, x: np.ndarray, ctx: np.ndarray | None, layer0: tuple[np.ndarray, np.ndarray] | None
    ) -> np.ndarray:
        """Gradient of one block: ``x`` (d, B) -> (d, B) (see ``NumpyPotential.grad_block``)."""
        if self.kind == "icnn":
            return self._icnn_grad(x)
        assert ctx is not None
        assert layer0 is not None
        return self._picnn_grad(x, ctx, layer0)

    def _act_into(self, a: np.ndarray, slope: np.ndarray, value: np.ndarray | None) -> None:
        r"""Activation slope (and value) of ``a`` written into work buffers.

        Smooth ReLU: :math:`\sigma(u) = s\,(u - s/2)`, :math:`\sigma'(u) = s`,
        :math:`s = \mathrm{clip}(u, 0, 1)` (``potentials.smooth_relu``), in 4 streaming passes.
        """
        if self.activation is not None:
            v, sl = self.activation(a)
            np.copyto(slope, sl)
            if value is not None:
                np.copyto(value, v)
            return
        np.clip(a, 0.0, 1.0, out=slope)
        if value is not None:
            np.multiply(slope, 0.5, out=value)
            np.subtract(a, value, out=value)
            value *= slope

    def _icnn_grad(self, x: np.ndarray) -> np.ndarray:
        r"""ICNN gradient, feature-major: :math:`\nabla g = \sum_l A_l^\top e_l + M x + a`."""
        off, last, p = self.offsets, self.n_layers - 1, self.p
        b, dt, ws = x.shape[1], self.dtype, WORKSPACE
        pre = ws.get("pre", int(off[-1]), b, dt)
        np.matmul(self.a, x, out=pre)
        pre += self.b
        slopes = ws.get("slopes", int(off[-1]), b, dt)
        z = None
        for i in range(self.n_layers):
            a = pre[off[i] : off[i + 1]]
            if z is not None:
                t = ws.get("t", a.shape[0], b, dt)
                np.matmul(self.w[i], z, out=t)
                a += t
            value = ws.get(f"z{i}", a.shape[0], b, dt) if i < last else None
            self._act_into(a, slopes[off[i] : off[i + 1]], value)
            z = value
        e = slopes
        e[off[-2] :] *= self.wout
        for i in range(last, 0, -1):
            t = ws.get("t", int(off[i] - off[i - 1]), b, dt)
            np.matmul(p[f"W{i}"], e[off[i] : off[i + 1]], out=t)
            e[off[i - 1] : off[i]] *= t
        grad = ws.get("grad", self.dim, b, dt)
        np.matmul(self.a_all, e, out=grad)
        t = ws.get("td", self.dim, b, dt)
        np.matmul(self.quad, x, out=t)
        grad += t
        grad += self.lin
        return grad

    def _picnn_grad(
        self, x: np.ndarray, ctx: np.ndarray, layer0: tuple[np.ndarray, np.ndarray]
    ) -> np.ndarray:
        r"""PICNN gradient, feature-major (the recursion of ``NumpyPotential._picnn``, no value).

        :math:`\nabla_x g = Q^\top (\gamma \odot Q x) + M x
        + \sum_l \tilde x_l \odot (W^x_l{}^\top e_l)` with the gates
        :math:`\tilde x_l = W^{xu}_l u_l + b^{xu}_l`, :math:`e_L = 1` and
        :math:`e_{l-1} = (W^z_l{}^\top e_l) \odot [W^{zu}_l u_l + b^{zu}_l]_+ \odot
        \sigma'(a_{l-1})`.
        """
        p = self.p
        last, d = self.n_layers - 1, self.dim
        b, dt, ws = x.shape[1], self.dtype, WORKSPACE
        u = ctx
        slopes: list[np.ndarray] = []
        gzs: list[np.ndarray] = []
        gxs: list[np.ndarray] = []
        z = None
        gate = None
        for i in range(self.n_layers):
            mat, bias, cuts = self.mats[i]
            if i == 0:
                mat, bias = layer0
            uu = ws.get(f"uu{i}", mat.shape[0], b, dt)
            np.matmul(mat, u, out=uu)
            uu += bias
            gx = uu[:d]
            gxs.append(gx)
            if i == last:
                if i > 0:
                    gz = uu[cuts[0] : cuts[1]]
                    _relu(gz)
                    gzs.append(gz)
                gate = uu[cuts[-2] :]
                _relu(gate)
                break
            a = uu[cuts[0] : cuts[1]]
            h = a.shape[0]
            xg = ws.get("xg", d, b, dt)
            np.multiply(x, gx, out=xg)
            t = ws.get("t", h, b, dt)
            np.matmul(self.wx[i], xg, out=t)
            a += t
            if i > 0:
                gz = uu[cuts[1] : cuts[2]]
                _relu(gz)
                assert z is not None
                zg = ws.get("zg", gz.shape[0], b, dt)
                np.multiply(z, gz, out=zg)
                np.matmul(self.wz[i], zg, out=t)
                a += t
                gzs.append(gz)
            s = ws.get(f"s{i}", h, b, dt)
            z = ws.get(f"z{i}", h, b, dt)
            self._act_into(a, s, z)
            slopes.append(s)
            v = uu[cuts[-2] :]
            u = ws.get(f"u{i + 1}", v.shape[0], b, dt)
            self._act_into(v, ws.get("us", v.shape[0], b, dt), u)
        assert gate is not None
        xq = ws.get("xq", self.xq.shape[0], b, dt)
        np.matmul(self.xq, x, out=xq)
        gq = xq[d:]
        gq *= gate
        grad = ws.get("grad", d, b, dt)
        np.matmul(self.q, gq, out=grad)
        grad += xq[:d]
        td = ws.get("td", d, b, dt)
        np.multiply(gxs[last], self.wx_last, out=td)
        grad += td
        e = None
        for i in range(last, 0, -1):
            gz = gzs[i - 1]
            e_new = ws.get(f"e{i % 2}", gz.shape[0], b, dt)
            if e is None:
                assert self.wz_last is not None  # set whenever there is more than one layer
                np.multiply(self.wz_last, gz, out=e_new)
            else:
                np.matmul(p[f"Wz{i}"], e, out=e_new)
                e_new *= gz
            e_new *= slopes[i - 1]
            e = e_new
            np.matmul(p[f"Wx{i - 1}"], e, out=td)
            td *= gxs[i - 1]
            grad += td
        return grad
