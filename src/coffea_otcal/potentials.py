"""Input-convex potentials (ICNN, PICNN) whose input gradient is a Brenier transport map."""

from __future__ import annotations

__all__ = [
    "ACTIVATIONS",
    "ICNN",
    "PICNN",
    "ICNNConfig",
    "PICNNConfig",
    "potential_from_export",
    "smooth_relu",
    "smooth_relu_grad",
]

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

#: Activations known to both the torch modules and the numpy kernels.
ACTIVATIONS = ("smooth_relu", "softplus")


def smooth_relu(u: Tensor) -> Tensor:
    r"""Quadratic-linear smooth ReLU, convex, non-decreasing and :math:`C^1`.

    .. math:: \sigma(u) = 0 \ (u<0), \quad u^2/2 \ (0 \le u < 1), \quad u - 1/2 \ (u \ge 1),

    computed as :math:`s (u - s/2)` with :math:`s = \mathrm{clip}(u, 0, 1) = \sigma'(u)`:
    no transcendental function, so the exported kernel stays fast.

    Arguments:
        u: pre-activations.

    Returns:
        :math:`\sigma(u)`, same shape.
    """
    s = u.clamp(0.0, 1.0)
    return s * (u - 0.5 * s)


def smooth_relu_grad(u: Tensor) -> Tensor:
    r"""Derivative :math:`\sigma'(u) = \mathrm{clip}(u, 0, 1)` of :func:`smooth_relu`."""
    return u.clamp(0.0, 1.0)


def _act(name: str, u: Tensor) -> Tensor:
    if name == "smooth_relu":
        return smooth_relu(u)
    return nn.functional.softplus(u)


def _act_grad(name: str, u: Tensor) -> Tensor:
    if name == "smooth_relu":
        return smooth_relu_grad(u)
    return torch.sigmoid(u)


class _ConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: int = Field(ge=1, description="dimension d of the transported coordinates x")
    hidden: tuple[int, ...] = Field(
        default=(32, 32), min_length=1, description="widths of the convex hidden layers"
    )
    activation: Literal["smooth_relu", "softplus"] = Field(
        default="smooth_relu",
        description="convex non-decreasing activation of the convex path",
    )
    strong_convexity: float = Field(
        default=1e-3,
        ge=0.0,
        description="fixed floor mu of the quadratic term 0.5 x^T (L L^T + mu I) x",
    )

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(w < 1 for w in value):
            msg = f"hidden widths must be >= 1, got {value!r}"
            raise ValueError(msg)
        return value


class ICNNConfig(_ConfigBase):
    """Hyper-parameters of an :class:`ICNN` (validated, JSON-able)."""


class PICNNConfig(_ConfigBase):
    """Hyper-parameters of a :class:`PICNN` (validated, JSON-able)."""

    context_dim: int = Field(ge=1, description="dimension of the context vector c")
    context_hidden: tuple[int, ...] | None = Field(
        default=None,
        description="widths of the context trunk u_1..u_L (default: same as hidden)",
    )
    quadratic_rank: int = Field(
        default=0,
        ge=0,
        description="rank r of the context-gated quadratic 0.5 sum_j g_j(c) (q_j . x)^2 "
        "(0 means r = dim)",
    )

    def trunk(self) -> tuple[int, ...]:
        """Context-trunk widths (one per convex hidden layer)."""
        trunk = self.context_hidden if self.context_hidden is not None else self.hidden
        if len(trunk) != len(self.hidden):
            msg = f"context_hidden {trunk!r} must have as many layers as hidden {self.hidden!r}"
            raise ValueError(msg)
        return tuple(trunk)

    def rank(self) -> int:
        """Rank of the gated quadratic term."""
        return self.quadratic_rank or self.dim


def _nonneg_uniform(rows: int, cols: int, generator: torch.Generator | None) -> Tensor:
    # Mean fan-in 1: keeps hidden pre-activations O(1) through depth.
    return torch.rand(rows, cols, generator=generator) * (2.0 / cols)


def _normal(rows: int, cols: int, scale: float, generator: torch.Generator | None) -> Tensor:
    return torch.randn(rows, cols, generator=generator) * scale


def _tolist(t: Tensor) -> list[Any]:
    return t.detach().to("cpu", torch.float64).tolist()


class ICNN(nn.Module):
    r"""Input-convex neural network potential :math:`g(x)` with skips at every layer.

    .. math::
        z_1 &= \sigma(A_0 x + b_0), \qquad
        z_{l+1} = \sigma(W_l z_l + A_l x + b_l), \quad l = 1..L-1, \\
        g(x) &= w^\top z_L + a^\top x + \tfrac12 x^\top (L L^\top + \mu I) x + b,

    with :math:`W_l \ge 0`, :math:`w \ge 0` (projection after each optimiser step, see
    :meth:`project`) and :math:`\sigma` convex non-decreasing, so :math:`g` is convex
    and :math:`\mu`-strongly convex (Amos et al. 2017, Prop. 1). The transport map is
    :math:`T(x) = \nabla_x g(x)` (Brenier 1991; Makkuva et al. 2020). At initialisation
    :math:`L L^\top + \mu I = I`, so :math:`T` starts close to the identity.

    Arguments:
        config: the hyper-parameters (:class:`ICNNConfig`).
        seed: seed of the parameter initialisation.

    Example:
        >>> g = ICNN(ICNNConfig(dim=2, hidden=(8, 8)), seed=0)
        >>> x = torch.zeros(5, 2, dtype=torch.float64)
        >>> g.to(torch.float64).grad_x(x).shape
        torch.Size([5, 2])

    References:
        B. Amos, L. Xu, J. Z. Kolter, "Input Convex Neural Networks", ICML 2017.
        A. Makkuva et al., "Optimal transport mapping via input convex neural
        networks", ICML 2020.
    """

    kind = "icnn"

    def __init__(self, config: ICNNConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        gen = torch.Generator().manual_seed(seed)
        d, hid = config.dim, config.hidden
        self.A = nn.ParameterList(
            [nn.Parameter(_normal(h, d, 1.0 / math.sqrt(d), gen)) for h in hid]
        )
        self.b = nn.ParameterList([nn.Parameter(torch.randn(h, generator=gen) * 0.1) for h in hid])
        self.W = nn.ParameterList(
            [nn.Parameter(_nonneg_uniform(hid[i + 1], hid[i], gen)) for i in range(len(hid) - 1)]
        )
        self.w_out = nn.Parameter(torch.rand(hid[-1], generator=gen) * (0.1 / hid[-1]))
        self.linear = nn.Parameter(torch.zeros(d))
        self.L = nn.Parameter(torch.eye(d) * math.sqrt(max(1.0 - config.strong_convexity, 0.0)))
        self.offset = nn.Parameter(torch.zeros(()))

    def nonneg_parameters(self) -> list[Tensor]:
        """Parameters that must stay non-negative for convexity."""
        return [*self.W, self.w_out]

    @torch.no_grad()
    def project(self) -> None:
        """Clamp the hidden-to-hidden and output weights at zero (keeps ``g`` convex)."""
        for p in self.nonneg_parameters():
            p.clamp_(min=0.0)

    def quadratic(self) -> Tensor:
        r"""The positive-definite matrix :math:`M = L L^\\top + \\mu I` of the quadratic term."""
        eye = torch.eye(self.config.dim, dtype=self.L.dtype, device=self.L.device)
        return self.L @ self.L.T + self.config.strong_convexity * eye

    def _forward_layers(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        act = self.config.activation
        pre: list[Tensor] = []
        outs: list[Tensor] = []
        z: Tensor | None = None
        for i, (a_mat, bias) in enumerate(zip(self.A, self.b, strict=True)):
            a = x @ a_mat.T + bias
            if i > 0 and z is not None:
                a = a + z @ self.W[i - 1].T
            z = _act(act, a)
            pre.append(a)
            outs.append(z)
        return pre, outs

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Potential value :math:`g(x)`, shape ``(n,)``; ``context`` must be ``None``."""
        if context is not None:
            msg = "ICNN takes no context; use PICNN for a context-dependent potential"
            raise ValueError(msg)
        _, outs = self._forward_layers(x)
        quad = 0.5 * ((x @ self.quadratic()) * x).sum(-1)
        return outs[-1] @ self.w_out + x @ self.linear + quad + self.offset

    def grad_x(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        r"""Closed-form :math:`\nabla_x g(x)` (differentiable in the parameters).

        Backward recursion: :math:`e_L = w \odot \sigma'(a_{L-1})`,
        :math:`e_{l-1} = (W_l^\top e_l) \odot \sigma'(a_{l-1})`,
        :math:`\nabla g = \sum_l A_l^\top e_l + a + M x`.
        """
        return self.value_and_grad(x, context)[1]

    def value_and_grad(
        self, x: Tensor, context: Tensor | None = None, quadratic: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""Both :math:`g(x)` (n,) and the closed-form :math:`\\nabla_x g(x)` (n, d), one pass.

        ``quadratic`` may pass a precomputed :meth:`quadratic` (inner loops).
        """
        if context is not None:
            msg = "ICNN takes no context; use PICNN for a context-dependent potential"
            raise ValueError(msg)
        act = self.config.activation
        pre, outs = self._forward_layers(x)
        mx = x @ (self.quadratic() if quadratic is None else quadratic)
        value = outs[-1] @ self.w_out + x @ self.linear + 0.5 * (mx * x).sum(-1) + self.offset
        grad = mx + self.linear
        delta = self.w_out.expand(x.shape[0], -1)
        for i in range(len(pre) - 1, -1, -1):
            e = delta * _act_grad(act, pre[i])
            grad = grad + e @ self.A[i]
            if i > 0:
                delta = e @ self.W[i - 1]
        return value, grad

    def export(self) -> dict[str, Any]:
        """JSON-able export ``{"kind", "config", "params"}`` read by the numpy kernel.

        ``params`` holds the effective (already projected) weights as nested lists:
        ``A{i}`` (h_i, d), ``b{i}`` (h_i), ``W{i}`` (h_i, h_{i-1}) for i >= 1, ``w_out`` (h_L),
        ``linear`` (d), ``quadratic`` (d, d) = L L^T + mu I, ``offset`` (scalar).
        """
        params: dict[str, Any] = {}
        for i, (a_mat, bias) in enumerate(zip(self.A, self.b, strict=True)):
            params[f"A{i}"] = _tolist(a_mat)
            params[f"b{i}"] = _tolist(bias)
        for i, w in enumerate(self.W):
            params[f"W{i + 1}"] = _tolist(w.clamp(min=0.0))
        params["w_out"] = _tolist(self.w_out.clamp(min=0.0))
        params["linear"] = _tolist(self.linear)
        params["quadratic"] = _tolist(self.quadratic())
        params["offset"] = float(self.offset.detach())
        return {"kind": self.kind, "config": self.config.model_dump(mode="json"), "params": params}


class PICNN(nn.Module):
    r"""Partially input-convex potential :math:`g(x \mid c)`: convex in x, any function of c.

    Following Amos et al. 2017 (eq. 3), with a context trunk
    :math:`u_0 = c,\ u_{l+1} = \sigma(V_l u_l + v_l)` and, for :math:`l = 0..L`
    (layer :math:`L` is the scalar output, no activation),

    .. math::
        a_l = W^{z}_l\,(z_l \odot [W^{zu}_l u_l + b^{zu}_l]_+)
              + W^{x}_l\,(x \odot (W^{xu}_l u_l + b^{xu}_l)) + W^{u}_l u_l + b_l,
        \qquad z_{l+1} = \sigma(a_l),

    with :math:`W^z_l \ge 0` (no z-term at l = 0) and a strongly convex quadratic
    :math:`\tfrac12 x^\top (L L^\top + \mu I) x + \tfrac12 \sum_j [G u_L + g]_{+,j}
    (q_j^\top x)^2` whose curvature follows the context. Then
    :math:`g(x \mid c) = a_L + \text{quadratic}` is convex in x for every c and the map
    is :math:`T(x \mid c) = \nabla_x g(x \mid c)`.

    Arguments:
        config: the hyper-parameters (:class:`PICNNConfig`).
        seed: seed of the parameter initialisation.

    Example:
        >>> g = PICNN(PICNNConfig(dim=2, context_dim=1, hidden=(8, 8)), seed=0)
        >>> g(torch.zeros(3, 2), torch.ones(3, 1)).shape
        torch.Size([3])

    References:
        B. Amos, L. Xu, J. Z. Kolter, "Input Convex Neural Networks", ICML 2017.
    """

    kind = "picnn"

    def __init__(self, config: PICNNConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        gen = torch.Generator().manual_seed(seed)
        d, k0 = config.dim, config.context_dim
        hid = (*config.hidden, 1)
        ctx = (k0, *config.trunk())
        n_layers = len(hid)
        self.V = nn.ParameterList(
            [
                nn.Parameter(_normal(ctx[i + 1], ctx[i], 1.0 / math.sqrt(ctx[i]), gen))
                for i in range(len(ctx) - 1)
            ]
        )
        self.v = nn.ParameterList(
            [
                nn.Parameter(torch.randn(ctx[i + 1], generator=gen) * 0.1)
                for i in range(len(ctx) - 1)
            ]
        )
        self.Wz = nn.ParameterList(
            [nn.Parameter(_nonneg_uniform(hid[i], hid[i - 1], gen)) for i in range(1, n_layers)]
        )
        self.Wzu = nn.ParameterList(
            [nn.Parameter(torch.zeros(hid[i - 1], ctx[i])) for i in range(1, n_layers)]
        )
        self.bzu = nn.ParameterList(
            [nn.Parameter(torch.ones(hid[i - 1])) for i in range(1, n_layers)]
        )
        self.Wx = nn.ParameterList(
            [nn.Parameter(_normal(hid[i], d, 1.0 / math.sqrt(d), gen)) for i in range(n_layers)]
        )
        self.Wxu = nn.ParameterList([nn.Parameter(torch.zeros(d, ctx[i])) for i in range(n_layers)])
        self.bxu = nn.ParameterList([nn.Parameter(torch.ones(d)) for _ in range(n_layers)])
        self.Wu = nn.ParameterList(
            [
                nn.Parameter(_normal(hid[i], ctx[i], 0.1 / math.sqrt(ctx[i]), gen))
                for i in range(n_layers)
            ]
        )
        self.b = nn.ParameterList(
            [nn.Parameter(torch.randn(hid[i], generator=gen) * 0.1) for i in range(n_layers)]
        )
        with torch.no_grad():  # small output layer: T starts near the identity
            self.Wz[-1].mul_(0.01)
            self.Wx[-1].zero_()
            self.Wu[-1].zero_()
            self.b[-1].zero_()
        r = config.rank()
        self.L = nn.Parameter(torch.eye(d) * math.sqrt(max(1.0 - config.strong_convexity, 0.0)))
        self.Q = nn.Parameter(_normal(r, d, 0.1 / math.sqrt(d), gen))
        self.G = nn.Parameter(torch.zeros(r, ctx[-1]))
        self.g = nn.Parameter(torch.ones(r))  # gate open (relu'(1) = 1): G and g get gradients

    def nonneg_parameters(self) -> list[Tensor]:
        """Parameters that must stay non-negative for convexity in x."""
        return list(self.Wz)

    @torch.no_grad()
    def project(self) -> None:
        """Clamp the z-path weights at zero (keeps ``g`` convex in x)."""
        for p in self.nonneg_parameters():
            p.clamp_(min=0.0)

    def quadratic(self) -> Tensor:
        r"""Constant part :math:`L L^\\top + \\mu I` of the quadratic term."""
        eye = torch.eye(self.config.dim, dtype=self.L.dtype, device=self.L.device)
        return self.L @ self.L.T + self.config.strong_convexity * eye

    def _trunk(self, c: Tensor) -> list[Tensor]:
        us = [c]
        for v_mat, v_b in zip(self.V, self.v, strict=True):
            us.append(_act(self.config.activation, us[-1] @ v_mat.T + v_b))
        return us

    def _layers(
        self, x: Tensor, context: Tensor | None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        if context is None:
            msg = f"PICNN needs a context of shape (n, {self.config.context_dim})"
            raise ValueError(msg)
        act = self.config.activation
        us = self._trunk(context)
        pre: list[Tensor] = []
        zs: list[Tensor] = []
        gzs: list[Tensor] = []
        gxs: list[Tensor] = []
        z: Tensor | None = None
        for i in range(len(self.Wx)):
            gx = us[i] @ self.Wxu[i].T + self.bxu[i]
            a = (x * gx) @ self.Wx[i].T + us[i] @ self.Wu[i].T + self.b[i]
            if i > 0 and z is not None:
                gz = torch.relu(us[i] @ self.Wzu[i - 1].T + self.bzu[i - 1])
                a = a + (z * gz) @ self.Wz[i - 1].T
                gzs.append(gz)
            gxs.append(gx)
            pre.append(a)
            if i < len(self.Wx) - 1:
                z = _act(act, a)
                zs.append(z)
        return us, pre, zs, gzs, gxs

    def _gate(self, u_last: Tensor) -> Tensor:
        return torch.relu(u_last @ self.G.T + self.g)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        r"""Potential value :math:`g(x \\mid c)`, shape ``(n,)``."""
        us, pre, _, _, _ = self._layers(x, context)
        quad = 0.5 * ((x @ self.quadratic()) * x).sum(-1)
        qx = x @ self.Q.T
        gated = 0.5 * (self._gate(us[-1]) * qx * qx).sum(-1)
        return pre[-1][:, 0] + quad + gated

    def grad_x(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        r"""Closed-form :math:`\nabla_x g(x \mid c)` (differentiable in the parameters)."""
        return self.value_and_grad(x, context)[1]

    def value_and_grad(
        self, x: Tensor, context: Tensor | None = None, quadratic: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""Both :math:`g(x \\mid c)` (n,) and :math:`\\nabla_x g` (n, d), one pass.

        ``quadratic`` may pass a precomputed :meth:`quadratic` (inner loops).
        """
        act = self.config.activation
        us, pre, _, gzs, gxs = self._layers(x, context)
        qx = x @ self.Q.T
        gate = self._gate(us[-1])
        mx = x @ (self.quadratic() if quadratic is None else quadratic)
        value = pre[-1][:, 0] + 0.5 * (mx * x).sum(-1) + 0.5 * (gate * qx * qx).sum(-1)
        grad = mx + (gate * qx) @ self.Q
        n_layers = len(self.Wx)
        e = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        for i in range(n_layers - 1, -1, -1):
            grad = grad + gxs[i] * (e @ self.Wx[i])
            if i > 0:
                delta = (e @ self.Wz[i - 1]) * gzs[i - 1]
                e = delta * _act_grad(act, pre[i - 1])
        return value, grad

    def export(self) -> dict[str, Any]:
        """JSON-able export ``{"kind", "config", "params"}`` read by the numpy kernel.

        ``params``: trunk ``V{i}``, ``v{i}``; per layer ``Wx{i}``, ``Wxu{i}``, ``bxu{i}``,
        ``Wu{i}``, ``b{i}`` (i = 0..L) and ``Wz{i}`` (projected >= 0), ``Wzu{i}``, ``bzu{i}``
        (i = 1..L); quadratic ``quadratic`` = L L^T + mu I, ``Q``, ``G``, ``g``.
        """
        params: dict[str, Any] = {}
        for i, (v_mat, v_b) in enumerate(zip(self.V, self.v, strict=True)):
            params[f"V{i}"] = _tolist(v_mat)
            params[f"v{i}"] = _tolist(v_b)
        for i in range(len(self.Wx)):
            params[f"Wx{i}"] = _tolist(self.Wx[i])
            params[f"Wxu{i}"] = _tolist(self.Wxu[i])
            params[f"bxu{i}"] = _tolist(self.bxu[i])
            params[f"Wu{i}"] = _tolist(self.Wu[i])
            params[f"b{i}"] = _tolist(self.b[i])
            if i > 0:
                params[f"Wz{i}"] = _tolist(self.Wz[i - 1].clamp(min=0.0))
                params[f"Wzu{i}"] = _tolist(self.Wzu[i - 1])
                params[f"bzu{i}"] = _tolist(self.bzu[i - 1])
        params["quadratic"] = _tolist(self.quadratic())
        params["Q"] = _tolist(self.Q)
        params["G"] = _tolist(self.G)
        params["g"] = _tolist(self.g)
        return {"kind": self.kind, "config": self.config.model_dump(mode="json"), "params": params}


def _load_params(module: nn.Module, params: dict[str, Any]) -> None:
    """Load exported (effective) parameters back into a fresh module of the same config."""
    with torch.no_grad():
        dtype = next(module.parameters()).dtype
        if isinstance(module, ICNN):
            for i in range(len(module.A)):
                module.A[i].copy_(torch.tensor(params[f"A{i}"], dtype=dtype))
                module.b[i].copy_(torch.tensor(params[f"b{i}"], dtype=dtype))
            for i in range(len(module.W)):
                module.W[i].copy_(torch.tensor(params[f"W{i + 1}"], dtype=dtype))
            module.w_out.copy_(torch.tensor(params["w_out"], dtype=dtype))
            module.linear.copy_(torch.tensor(params["linear"], dtype=dtype))
            module.offset.copy_(torch.tensor(params["offset"], dtype=dtype))
        else:
            assert isinstance(module, PICNN)
            for i in range(len(module.V)):
                module.V[i].copy_(torch.tensor(params[f"V{i}"], dtype=dtype))
                module.v[i].copy_(torch.tensor(params[f"v{i}"], dtype=dtype))
            for i in range(len(module.Wx)):
                for name in ("Wx", "Wxu", "bxu", "Wu", "b"):
                    getattr(module, name)[i].copy_(torch.tensor(params[f"{name}{i}"], dtype=dtype))
                if i > 0:
                    for name in ("Wz", "Wzu", "bzu"):
                        getattr(module, name)[i - 1].copy_(
                            torch.tensor(params[f"{name}{i}"], dtype=dtype)
                        )
            for name in ("Q", "G", "g"):
                getattr(module, name).copy_(torch.tensor(params[name], dtype=dtype))
        # M = L L^T + mu I: recover L by a Cholesky factor of M - mu I (PSD by construction).
        m = torch.tensor(params["quadratic"], dtype=torch.float64)
        mu = module.config.strong_convexity
        eye = torch.eye(m.shape[0], dtype=torch.float64)
        chol = torch.linalg.cholesky(m - mu * eye + 1e-12 * eye)
        module.L.copy_(chol.to(dtype))


def potential_from_export(d: dict[str, Any]) -> ICNN | PICNN:
    """Rebuild a torch potential (float64) from :meth:`ICNN.export` / :meth:`PICNN.export`.

    Arguments:
        d: the export dictionary.

    Returns:
        The potential, in float64, with the exported parameters.
    """
    kind = d.get("kind")
    if kind == "icnn":
        module: ICNN | PICNN = ICNN(ICNNConfig(**d["config"]))
    elif kind == "picnn":
        module = PICNN(PICNNConfig(**d["config"]))
    else:
        msg = f"unknown potential kind {kind!r}; expected 'icnn' or 'picnn'"
        raise ValueError(msg)
    module = module.to(torch.float64)
    _load_params(module, d["params"])
    return module
