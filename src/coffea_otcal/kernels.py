"""Numpy-only evaluation of exported convex potentials, their gradient maps and fitted maps."""

from __future__ import annotations

__all__ = [
    "FITTED_MAP_FORMAT",
    "FITTED_MAP_VERSION",
    "FittedMap",
    "FittedMapExport",
    "NumpyPotential",
    "Preprocessing",
]

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from coffea_otcal.gradient_kernels import CHUNK, WORKSPACE, FeatureMajorGradient, one_blas_thread
from coffea_otcal.map_format import (
    FITTED_MAP_FORMAT,
    FITTED_MAP_VERSION,
    FittedMapExport,
    ICNNPotential,
    PICNNPotential,
    Preprocessing,
    parse_potential,
)

#: Rows evaluated at once (see ``gradient_kernels.CHUNK``).
_CHUNK = CHUNK


def _smooth_relu(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.clip(u, 0.0, 1.0)
    return s * (u - 0.5 * s), s


def _softplus(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    value = np.logaddexp(0.0, u)
    return value, np.exp(u - value)


_ACTIVATIONS: dict[str, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "smooth_relu": _smooth_relu,
    "softplus": _softplus,
}


def _as_array(value: Any, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if shape is not None and arr.shape != shape:
        msg = f"exported parameter {name!r} has shape {arr.shape}, expected {shape}"
        raise ValueError(msg)
    if not np.all(np.isfinite(arr)):
        msg = f"exported parameter {name!r} contains NaN or inf; the export is corrupt"
        raise ValueError(msg)
    return arr


class NumpyPotential:
    r"""Numpy evaluator of an exported ICNN / PICNN: value and closed-form gradient.

    The forward pass is the one of :class:`coffea_otcal.potentials.ICNN` /
    :class:`~coffea_otcal.potentials.PICNN`; the gradient is the hand-written backward
    recursion (ICNN: :math:`e_L = w \odot \sigma'(a_{L-1})`,
    :math:`e_{l-1} = (W_l^\top e_l) \odot \sigma'(a_{l-1})`,
    :math:`\nabla g = \sum_l A_l^\top e_l + a + M x`), so no torch is needed.

    Arguments:
        export: a potential export ``{"kind", "config", "params"}``.
        dtype: float precision of the evaluation (float64 default, float32 is ~2x faster).

    Example:
        >>> d = {"kind": "icnn", "config": {"dim": 1, "hidden": [1], "activation":
        ...      "smooth_relu", "strong_convexity": 0.0}, "params": {"A0": [[1.0]],
        ...      "b0": [0.0], "w_out": [0.0], "linear": [0.0], "quadratic": [[1.0]],
        ...      "offset": 0.0}}
        >>> NumpyPotential.from_export(d).grad(np.array([[2.0]]))
        array([[2.]])
    """

    def __init__(self, export: ICNNPotential | PICNNPotential, dtype: type = np.float64) -> None:
        self.kind = export.kind
        self.config = dict(export.config)
        self.dtype = np.dtype(dtype)
        self.dim = int(self.config["dim"])
        self.context_dim = int(self.config.get("context_dim", 0) or 0)
        self.activation = _ACTIVATIONS[str(self.config.get("activation", "smooth_relu"))]
        hidden = tuple(int(h) for h in self.config["hidden"])
        p = export.params
        d = self.dim
        self._p: dict[str, np.ndarray] = {}
        if self.kind == "icnn":
            for i, h in enumerate(hidden):
                self._set(f"A{i}", p, (h, d))
                self._set(f"b{i}", p, (h,))
                if i > 0:
                    self._set(f"W{i}", p, (h, hidden[i - 1]))
            self._set("w_out", p, (hidden[-1],))
            self._set("linear", p, (d,))
            self._set("offset", p, ())
            self.n_layers = len(hidden)
        else:
            trunk_cfg = self.config.get("context_hidden")
            trunk = tuple(int(h) for h in (trunk_cfg if trunk_cfg is not None else hidden))
            ctx = (self.context_dim, *trunk)
            hid = (*hidden, 1)
            rank = int(self.config.get("quadratic_rank", 0) or 0) or d
            for i in range(len(ctx) - 1):
                self._set(f"V{i}", p, (ctx[i + 1], ctx[i]))
                self._set(f"v{i}", p, (ctx[i + 1],))
            for i in range(len(hid)):
                self._set(f"Wx{i}", p, (hid[i], d))
                self._set(f"Wxu{i}", p, (d, ctx[i]))
                self._set(f"bxu{i}", p, (d,))
                self._set(f"Wu{i}", p, (hid[i], ctx[i]))
                self._set(f"b{i}", p, (hid[i],))
                if i > 0:
                    self._set(f"Wz{i}", p, (hid[i], hid[i - 1]))
                    self._set(f"Wzu{i}", p, (hid[i - 1], ctx[i]))
                    self._set(f"bzu{i}", p, (hid[i - 1],))
            self._set("Q", p, (rank, d))
            self._set("G", p, (rank, ctx[-1]))
            self._set("g", p, (rank,))
            self.n_layers = len(hid)
        self._set("quadratic", p, (d, d))
        self._fuse()
        self._gradient = FeatureMajorGradient(self)

    def _set(self, name: str, params: dict[str, Any], shape: tuple[int, ...]) -> None:
        if name not in params:
            msg = f"exported {self.kind} potential lacks parameter {name!r}; the export is corrupt"
            raise ValueError(msg)
        arr = _as_array(params[name], name, shape).astype(self.dtype)
        # Transposed copies in C order: the kernels multiply (n, in) @ (in, out).
        self._p[name] = np.ascontiguousarray(arr.T) if arr.ndim == 2 else arr

    @classmethod
    def from_export(
        cls, export: dict[str, Any] | ICNNPotential | PICNNPotential, dtype: type = np.float64
    ) -> NumpyPotential:
        """Build the evaluator from :meth:`ICNN.export` / :meth:`PICNN.export` output."""
        return cls(parse_potential(export), dtype=dtype)

    def _check(self, x: Any, context: Any) -> tuple[np.ndarray, np.ndarray | None]:
        arr = np.asarray(x, dtype=self.dtype)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            msg = f"x must have shape (n, {self.dim}), got {arr.shape}"
            raise ValueError(msg)
        if self.kind == "icnn":
            if context is not None:
                msg = "this potential is an ICNN and takes no context; pass context=None"
                raise ValueError(msg)
            return arr, None
        if context is None:
            msg = f"this potential is a PICNN: pass a context of shape (n, {self.context_dim})"
            raise ValueError(msg)
        ctx = np.asarray(context, dtype=self.dtype)
        if ctx.ndim != 2 or ctx.shape != (arr.shape[0], self.context_dim):
            msg = f"context must have shape ({arr.shape[0]}, {self.context_dim}), got {ctx.shape}"
            raise ValueError(msg)
        return arr, ctx

    def value(self, x: Any, context: Any = None) -> np.ndarray:
        r"""Potential :math:`g(x \\mid c)` at the rows of ``x`` (n, d); returns (n,)."""
        return self.value_and_grad(x, context)[0]

    def grad(self, x: Any, context: Any = None) -> np.ndarray:
        r"""Map :math:`T(x \\mid c) = \\nabla_x g(x \\mid c)` at the rows of ``x``; returns (n, d).

        Uses the gradient-only recursion of :meth:`grad_block` (no potential value, no
        forward pass of the output layer), block by block in feature-major layout.
        """
        arr, ctx = self._check(x, context)
        out = np.empty((arr.shape[0], self.dim), dtype=self.dtype)
        layer0 = self.layer0()
        with one_blas_thread():
            for start in range(0, arr.shape[0], _CHUNK):
                stop = min(start + _CHUNK, arr.shape[0])
                xt = WORKSPACE.get("x_in", self.dim, stop - start, self.dtype)
                np.copyto(xt, arr[start:stop].T)
                c = None if ctx is None else ctx[start:stop].T
                out[start:stop] = self.grad_block(xt, c, layer0).T
        return out

    def layer0(
        self, context_shift: Any = None, context_scale: Any = None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        r"""First context matrix and bias of a PICNN, optionally with a standardisation folded in.

        With :math:`c' = (c - c_m)/c_s` the first trunk product is
        :math:`M c' + b = (M / c_s)\,c + (b - M (c_m / c_s))`, so raw context rows enter
        :meth:`grad_block` directly (one product, no standardised copy). None for an ICNN.
        """
        if self.kind == "icnn":
            return None
        mat, bias = self._gradient.mats[0][:2]
        if context_shift is None or context_scale is None:
            return mat, bias
        cm = np.asarray(context_shift, dtype=np.float64)
        cs = np.asarray(context_scale, dtype=np.float64)
        m64 = mat.astype(np.float64)
        folded = np.ascontiguousarray(m64 / cs[None, :], dtype=self.dtype)
        shifted = bias.astype(np.float64) - (m64 @ (cm / cs))[:, None]
        return folded, np.ascontiguousarray(shifted, dtype=self.dtype)

    def grad_block(
        self, x: np.ndarray, ctx: np.ndarray | None, layer0: tuple[np.ndarray, np.ndarray] | None
    ) -> np.ndarray:
        """Gradient of one block in feature-major layout: ``x`` (d, B) -> (d, B).

        Arguments:
            x: standardised coordinates, one row per coordinate (C-contiguous, evaluator dtype).
            ctx: context (k, B) as ``layer0`` expects it (standardised, or raw with a folded
                :meth:`layer0`); None for an ICNN.
            layer0: :meth:`layer0` output (None for an ICNN).

        Returns:
            The gradient, ``(d, B)``, in a per-thread work buffer: valid until the next call
            in the same thread (copy it out). Every intermediate is a contiguous
            ``(width, B)`` work buffer, so slices of a fused product are contiguous and
            elementwise work streams.
        """
        return self._gradient(x, ctx, layer0)

    def value_and_grad(self, x: Any, context: Any = None) -> tuple[np.ndarray, np.ndarray]:
        r"""Both :math:`g` (n,) and :math:`\\nabla_x g` (n, d), evaluated in chunks."""
        arr, ctx = self._check(x, context)
        n = arr.shape[0]
        values = np.empty(n, dtype=self.dtype)
        grads = np.empty((n, self.dim), dtype=self.dtype)
        run = self._icnn if self.kind == "icnn" else self._picnn
        for start in range(0, n, _CHUNK):
            stop = min(start + _CHUNK, n)
            c = None if ctx is None else ctx[start:stop]
            values[start:stop], grads[start:stop] = run(arr[start:stop], c)
        return values, grads

    def _fuse(self) -> None:
        """Concatenate matrices that multiply the same input into one (fewer, larger matmuls)."""
        p = self._p
        if self.kind == "icnn":
            widths = [p[f"b{i}"].shape[0] for i in range(self.n_layers)]
            self._offsets = np.cumsum([0, *widths])
            self._a_all = np.ascontiguousarray(
                np.concatenate([p[f"A{i}"] for i in range(self.n_layers)], axis=1)
            )
            self._a_all_t = np.ascontiguousarray(self._a_all.T)
            self._b_all = np.concatenate([p[f"b{i}"] for i in range(self.n_layers)])
            self._w_t = {i: np.ascontiguousarray(p[f"W{i}"].T) for i in range(1, self.n_layers)}
            return
        # PICNN: per layer i, u_i multiplies [Wxu_i | Wu_i | Wzu_i (i>0) | V_i (i<L) | G (i=L)].
        self._u_mats: list[tuple[np.ndarray, np.ndarray, list[int]]] = []
        last = self.n_layers - 1
        for i in range(self.n_layers):
            blocks = [("Wxu", "bxu"), ("Wu", "b")]
            if i > 0:
                blocks.append(("Wzu", "bzu"))
            mats = [p[f"{w}{i}"] for w, _ in blocks]
            biases = [p[f"{b}{i}"] for _, b in blocks]
            if i < last:
                mats.append(p[f"V{i}"])
                biases.append(p[f"v{i}"])
            else:
                mats.append(p["G"])
                biases.append(p["g"])
            cuts = list(np.cumsum([m.shape[1] for m in mats]))
            self._u_mats.append(
                (np.ascontiguousarray(np.concatenate(mats, axis=1)), np.concatenate(biases), cuts)
            )
        self._wx_t = [np.ascontiguousarray(p[f"Wx{i}"].T) for i in range(self.n_layers)]
        self._wz_t = {i: np.ascontiguousarray(p[f"Wz{i}"].T) for i in range(1, self.n_layers)}
        self._q_t = np.ascontiguousarray(p["Q"].T)

    def _icnn(self, x: np.ndarray, _ctx: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        p, act, off = self._p, self.activation, self._offsets
        pre = x @ self._a_all
        pre += self._b_all
        slopes = np.empty_like(pre)
        z = None
        for i in range(self.n_layers):
            a = pre[:, off[i] : off[i + 1]]
            if z is not None:
                a += z @ p[f"W{i}"]
            z, slopes[:, off[i] : off[i + 1]] = act(a)
        mx = x @ p["quadratic"]
        value = z @ p["w_out"] + x @ p["linear"] + 0.5 * np.einsum("ij,ij->i", mx, x) + p["offset"]
        # e_i (backward signals) overwrite the slopes in place: e_{L-1} = w * s'(a_{L-1}), ...
        e = slopes
        e[:, off[-2] :] *= p["w_out"]
        for i in range(self.n_layers - 1, 0, -1):
            e[:, off[i - 1] : off[i]] *= e[:, off[i] : off[i + 1]] @ self._w_t[i]
        grad = e @ self._a_all_t
        grad += mx
        grad += p["linear"]
        return value, grad

    def _picnn(self, x: np.ndarray, ctx: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        p, act = self._p, self.activation
        assert ctx is not None
        last = self.n_layers - 1
        u = ctx
        slopes: list[np.ndarray] = []
        gzs: list[np.ndarray] = []
        gxs: list[np.ndarray] = []
        z = None
        a = x
        gate = x
        for i in range(self.n_layers):
            mat, bias, cuts = self._u_mats[i]
            uu = u @ mat
            uu += bias
            gx = uu[:, : cuts[0]]
            a = uu[:, cuts[0] : cuts[1]]
            a += (x * gx) @ p[f"Wx{i}"]
            if i > 0:
                gz = np.maximum(uu[:, cuts[1] : cuts[2]], 0.0)
                a += (z * gz) @ p[f"Wz{i}"]
                gzs.append(gz)
            gxs.append(gx)
            if i < last:
                z, s = act(a)
                slopes.append(s)
                u = act(uu[:, cuts[-2] :])[0]
            else:
                gate = np.maximum(uu[:, cuts[-2] :], 0.0)
        mx = x @ p["quadratic"]
        qx = x @ p["Q"]
        gq = gate * qx
        value = a[:, 0] + 0.5 * np.einsum("ij,ij->i", mx, x) + 0.5 * np.einsum("ij,ij->i", gq, qx)
        grad = gq @ self._q_t
        grad += mx
        grad += gxs[last] * self._wx_t[last][0]
        e = None
        for i in range(last, 0, -1):
            e = p[f"Wz{i}"].T[0] * gzs[i - 1] if e is None else (e @ self._wz_t[i]) * gzs[i - 1]
            e *= slopes[i - 1]
            grad += gxs[i - 1] * (e @ self._wx_t[i - 1])
        return value, grad


class FittedMap:
    r"""A fitted transport map :math:`T(x \mid c) = m + s\,\nabla g((x - m)/s \mid c')`.

    With one isotropic scale :math:`s` the map is the gradient of the convex potential
    :math:`s^2 g((x - m)/s) + m \cdot x` in the ORIGINAL coordinates, so it keeps the
    Brenier optimality of the quadratic cost there (Aitchison optimality in ILR space,
    Kim & Yang Sec. II.2-3). Context variables are standardised per coordinate,
    :math:`c' = (c - c_m)/c_s` (they are not transported).

    Evaluation uses only numpy (:class:`NumpyPotential`); :meth:`transport_torch` imports
    torch lazily. The export layout is documented in ``docs/ot.md``.

    Arguments:
        export: a :class:`FittedMapExport` (or its dict).
        dtype: float precision of the numpy evaluation.
    """

    def __init__(
        self, export: FittedMapExport | Mapping[str, Any], dtype: type = np.float64
    ) -> None:
        model = (
            export
            if isinstance(export, FittedMapExport)
            else FittedMapExport.model_validate(export)
        )
        self._export = model
        self.name = model.name
        self.potential = NumpyPotential(model.potential, dtype=dtype)
        pre = model.preprocessing
        self.shift = np.asarray(pre.shift, dtype=np.float64)
        self.scale = float(pre.scale)
        if self.shift.shape != (self.potential.dim,):
            msg = f"preprocessing.shift has length {self.shift.size}, the potential dim is {self.potential.dim}"
            raise ValueError(msg)
        self.context_shift = None if pre.context_shift is None else np.asarray(pre.context_shift)
        self.context_scale = None if pre.context_scale is None else np.asarray(pre.context_scale)
        if self.potential.kind == "picnn" and (
            self.context_shift is None or self.context_scale is None
        ):
            msg = "a PICNN map needs preprocessing.context_shift and context_scale"
            raise ValueError(msg)
        self.metrics = dict(model.metrics)
        self._layer0 = None
        if self.potential.kind == "picnn":
            assert self.context_shift is not None
            assert self.context_scale is not None
            self._layer0 = self.potential.layer0(self.context_shift, self.context_scale)

    @property
    def dim(self) -> int:
        """Dimension of the transported coordinates."""
        return self.potential.dim

    @property
    def context_dim(self) -> int:
        """Dimension of the context (0 for an unconditional map)."""
        return self.potential.context_dim

    @classmethod
    def from_export(cls, d: dict[str, Any], dtype: type = np.float64) -> FittedMap:
        """Rebuild the map from :meth:`export` output (numpy only)."""
        return cls(d, dtype=dtype)

    def export(self) -> dict[str, Any]:
        """JSON-able dict: format, version, name, potential, preprocessing, metrics."""
        return self._export.model_dump(mode="json")

    def _standardise(self, x: Any, context: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Checked inputs (:meth:`_inputs`) standardised in float64."""
        arr, ctx = self._inputs(x, context)
        xs = (arr.astype(np.float64, copy=False) - self.shift) / self.scale
        if ctx is None:
            return xs, None
        assert self.context_shift is not None
        assert self.context_scale is not None
        return xs, (ctx.astype(np.float64, copy=False) - self.context_shift) / self.context_scale

    def transport(self, x: Any, context: Any = None, out: np.ndarray | None = None) -> np.ndarray:
        r"""Apply the map to the rows of ``x`` (n, d) with optional raw context (n, k).

        Evaluated block by block (``_CHUNK`` rows, so every intermediate stays in the L2
        cache): :math:`x' = (x - m)/s` in float64, cast to the evaluator's dtype, the context
        standardisation folded into the first trunk layer
        (:meth:`NumpyPotential.layer0`), and :math:`m + s\,\nabla g` written into a
        float64 result.

        Arguments:
            x: ``(n, d)`` coordinates (float32 or float64).
            context: ``(n, k)`` raw context (not standardised); ``(n,)`` when k = 1. A
                float array of the evaluator's dtype is used without a copy.
            out: optional ``(n, d)`` float64 array to write the result into.

        Returns:
            The ``(n, d)`` float64 transported coordinates (``out`` when given).
        """
        with one_blas_thread():
            return self.transport_unlimited(x, context, out)

    def transport_unlimited(
        self, x: Any, context: Any = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """:meth:`transport` without limiting BLAS threads (for callers that already did)."""
        arr, ctx = self._inputs(x, context)
        n = arr.shape[0]
        if out is None:
            out = np.empty((n, self.dim), dtype=np.float64)
        elif out.shape != (n, self.dim) or out.dtype != np.float64:
            msg = f"map {self.name!r}: out must be a float64 array of shape ({n}, {self.dim})"
            raise ValueError(msg)
        pot, dtype, ws, d = self.potential, self.potential.dtype, WORKSPACE, self.dim
        shift = self.shift[:, None]
        for start in range(0, n, _CHUNK):
            stop = min(start + _CHUNK, n)
            xt64 = ws.get("x_std", d, stop - start, np.dtype(np.float64))
            np.subtract(arr[start:stop].T, shift, out=xt64)
            xt64 /= self.scale
            xt = xt64
            if dtype != xt64.dtype:
                xt = ws.get("x_in", d, stop - start, dtype)
                np.copyto(xt, xt64)
            cb = None
            if ctx is not None:
                cb = ctx[start:stop].T
                if cb.dtype != dtype:
                    cb = ws.get("c_in", ctx.shape[1], stop - start, dtype)
                    np.copyto(cb, ctx[start:stop].T)
            grad = pot.grad_block(xt, cb, self._layer0)
            block = out[start:stop]
            np.multiply(grad.T, self.scale, out=block, dtype=np.float64)
            block += self.shift
        return out

    def _inputs(self, x: Any, context: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Check shapes; keep float32/float64 arrays as they are (no standardised copies)."""
        arr = np.asarray(x)
        if arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float64)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            msg = f"map {self.name!r}: x must have shape (n, {self.dim}), got {arr.shape}"
            raise ValueError(msg)
        if self.context_dim == 0:
            if context is not None:
                msg = f"map {self.name!r} is unconditional; pass context=None"
                raise ValueError(msg)
            return arr, None
        if context is None:
            msg = f"map {self.name!r} needs a context of shape (n, {self.context_dim})"
            raise ValueError(msg)
        ctx = np.asarray(context)
        if ctx.dtype not in (np.float32, np.float64):
            ctx = ctx.astype(np.float64)
        if ctx.ndim == 1 and self.context_dim == 1:
            ctx = ctx[:, None]
        if ctx.shape != (arr.shape[0], self.context_dim):
            msg = (
                f"map {self.name!r}: context must have shape ({arr.shape[0]}, "
                f"{self.context_dim}), got {ctx.shape}"
            )
            raise ValueError(msg)
        return arr, ctx

    def potential_value(self, x: Any, context: Any = None) -> np.ndarray:
        r"""Convex potential in original coordinates, :math:`s^2 g((x-m)/s) + m \cdot x`."""
        xs, cs = self._standardise(x, context)
        arr = np.asarray(x, dtype=np.float64)
        return self.scale**2 * self.potential.value(xs, cs).astype(np.float64) + arr @ self.shift

    def transport_torch(self, x: Any, context: Any = None) -> Any:
        """Apply the map with torch (float64, differentiable in ``x``); imports torch lazily."""
        import torch

        from coffea_otcal.potentials import potential_from_export

        module = getattr(self, "_torch_module", None)
        if module is None:
            module = potential_from_export(self._export.potential.model_dump(mode="json"))
            module.requires_grad_(False)
            self._torch_module = module
        xt = torch.as_tensor(x, dtype=torch.float64)
        shift = torch.as_tensor(self.shift, dtype=torch.float64)
        xs = (xt - shift) / self.scale
        cs = None
        if self.context_dim:
            if context is None:
                msg = f"map {self.name!r} needs a context of shape (n, {self.context_dim})"
                raise ValueError(msg)
            ct = torch.as_tensor(context, dtype=torch.float64)
            if ct.ndim == 1:
                ct = ct[:, None]
            cs = (ct - torch.as_tensor(self.context_shift)) / torch.as_tensor(self.context_scale)
        return shift + self.scale * module.grad_x(xs, cs)
