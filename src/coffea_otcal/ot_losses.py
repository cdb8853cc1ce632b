"""Objectives of the neural OT trainers: amortised convex conjugate, Makkuva minimax, dual."""

from __future__ import annotations

__all__ = [
    "conjugate_dual_loss",
    "gradient_regression_loss",
    "held_out_dual",
    "identity_loss",
    "minimax_f_loss",
    "minimax_g_loss",
    "solve_conjugate",
    "weighted_mean",
]

from typing import Any, Protocol

import torch
from torch import Tensor


class Potential(Protocol):
    """What the objectives need from a potential (``ICNN`` / ``PICNN``)."""

    config: Any

    def __call__(self, x: Tensor, context: Tensor | None = None) -> Tensor: ...

    def grad_x(self, x: Tensor, context: Tensor | None = None) -> Tensor: ...

    def value_and_grad(
        self, x: Tensor, context: Tensor | None = None, quadratic: Tensor | None = None
    ) -> tuple[Tensor, Tensor]: ...

    def quadratic(self) -> Tensor: ...


def weighted_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    r"""Monte-Carlo estimate :math:`\frac1n \sum_i w_i v_i` with weights normalised to mean 1.

    The weights are normalised ONCE on the whole training sample (not per batch), so this
    is an unbiased estimate of :math:`E_w[v]` even with negative MC weights.
    """
    if weights is None:
        return values.mean()
    return (values * weights).mean()


@torch.no_grad()
def solve_conjugate(
    g: Potential,
    y: Tensor,
    context: Tensor | None,
    init: Tensor,
    steps: int,
    step_size: Tensor | None = None,
    tol: float = 1e-4,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Maximise :math:`\phi(x) = \langle x, y\rangle - g(x \mid c)` per row: :math:`g^*(y \mid c)`.

    Gradient ascent :math:`x \leftarrow x + \eta_i (y - \nabla g(x))` with a per-row
    Barzilai-Borwein step :math:`\eta_i = s^\top s / s^\top q` (:math:`s` the last move,
    :math:`q` the change of :math:`\nabla g`: the inverse of the local curvature along the
    move), safeguarded: a step that does not increase :math:`\phi` is rejected and
    :math:`\eta_i` halved, so :math:`\phi` is monotone. Stops early when every residual
    :math:`\|y - \nabla g(\hat x)\| < ` ``tol``. Warm-started from ``init`` (the previous
    solution of the same sample: amortisation by memory, Amos 2023 Sec. 3), so a few steps
    per training step keep :math:`\hat x(y) = \nabla g^*(y)`. For a PICNN the conjugate is
    taken at the target's own context :math:`c_j`.

    Arguments:
        g: the potential.
        y: target points (n, d).
        context: their context (n, k) or None.
        init: starting points (n, d).
        steps: maximum ascent steps.
        step_size: per-row initial step (n,) or None (1 / largest curvature of the quadratic).
        tol: residual below which the solve stops.

    Returns:
        ``(x_hat, phi, step_size)``: maximiser estimate, :math:`\phi(\hat x)` (= the
        conjugate value) and the adapted step sizes (to warm-start the next solve).

    References:
        B. Amos, "On amortizing convex conjugates for optimal transport", ICLR 2023.
        J. Barzilai, J. M. Borwein, IMA J. Numer. Anal. 8 (1988) 141.
    """
    quad = g.quadratic().detach()
    eta_max = 1.0 / max(float(g.config.strong_convexity), 1e-6)
    x = init.clone()
    value, grad = g.value_and_grad(x, context, quad)
    phi = (x * y).sum(-1) - value
    res = y - grad
    if step_size is None:
        eta = torch.full(
            (len(y),), 1.0 / float(torch.linalg.eigvalsh(quad)[-1]), dtype=y.dtype, device=y.device
        )
    else:
        eta = step_size.clone()
    for _ in range(steps):
        # active set: rows already solved to ``tol`` are not evaluated again (after the warm
        # start most rows converge in a few steps, so this is most of the solve's cost)
        active = (res.norm(dim=-1) >= tol).nonzero().squeeze(1)
        if len(active) == 0:
            break
        xa, ga, pa, ra, ea = x[active], grad[active], phi[active], res[active], eta[active]
        ya = y[active]
        ca = None if context is None else context[active]
        cand = xa + ea[:, None] * ra
        v_new, g_new = g.value_and_grad(cand, ca, quad)
        phi_new = (cand * ya).sum(-1) - v_new
        ok = phi_new >= pa
        move = cand - xa
        curv = (move * (g_new - ga)).sum(-1)
        bb = (move * move).sum(-1) / curv.clamp(min=1e-30)
        ga = torch.where(ok[:, None], g_new, ga)
        x[active] = torch.where(ok[:, None], cand, xa)
        grad[active] = ga
        phi[active] = torch.where(ok, phi_new, pa)
        res[active] = ya - ga
        eta[active] = torch.where(ok, bb.clamp(1e-4, eta_max), ea * 0.25)
    return x, phi, eta


def conjugate_dual_loss(
    g: Potential,
    x: Tensor,
    x_context: Tensor | None,
    x_weight: Tensor | None,
    x_hat: Tensor,
    y: Tensor,
    y_context: Tensor | None,
    y_weight: Tensor | None,
) -> Tensor:
    r"""Semi-dual of quadratic OT with the conjugate at its (detached) maximiser.

    .. math:: \mathcal{L}(g) = E_P[g(x \mid c)] + E_Q[\langle \hat x, y\rangle - g(\hat x \mid c)],

    whose parameter gradient equals that of :math:`E_P g + E_Q g^*` by the envelope
    theorem (Danskin) when :math:`\hat x = \nabla g^*(y)`. Minimised over convex g, it
    gives the Brenier potential, :math:`W_2^2/2 = (E\|x\|^2 + E\|y\|^2)/2 - \min \mathcal L`
    (Makkuva et al. 2020 eq. 5; Amos 2023 eq. 5).
    """
    src = weighted_mean(g(x, x_context), x_weight)
    tgt = weighted_mean((x_hat * y).sum(-1) - g(x_hat, y_context), y_weight)
    return src + tgt


def minimax_g_loss(
    f: Potential, g: Potential, x: Tensor, context: Tensor | None, weight: Tensor | None
) -> Tensor:
    r"""Inner problem of Makkuva et al. (Mind the Gap eq. 7): :math:`E_P[f(\nabla g(x)) - \langle x, \nabla g(x)\rangle]`."""
    t = g.grad_x(x, context)
    return weighted_mean(f(t, context) - (x * t).sum(-1), weight)


def minimax_f_loss(
    f: Potential,
    g: Potential,
    x: Tensor,
    x_context: Tensor | None,
    x_weight: Tensor | None,
    y: Tensor,
    y_context: Tensor | None,
    y_weight: Tensor | None,
) -> Tensor:
    r"""Outer problem of Makkuva et al.: minimise :math:`E_Q[f(y)] - E_P[f(\nabla g(x))]` over f."""
    with torch.no_grad():
        t = g.grad_x(x, x_context)
    return weighted_mean(f(y, y_context), y_weight) - weighted_mean(f(t, x_context), x_weight)


def gradient_regression_loss(
    g: Potential, x: Tensor, context: Tensor | None, target: Tensor, weights: Tensor | None
) -> Tensor:
    r"""Least squares :math:`E_w\|\nabla g(x \mid c) - \bar y\|^2` of the map on given targets."""
    return weighted_mean(((g.grad_x(x, context) - target) ** 2).sum(-1), weights)


def identity_loss(g: Potential, x: Tensor, context: Tensor | None) -> Tensor:
    r"""Identity pre-training :math:`E\|\nabla g(x) - x\|^2` (Makkuva et al. 2020, Sec. 4)."""
    return gradient_regression_loss(g, x, context, x, None)


@torch.no_grad()
def held_out_dual(
    g: Potential,
    x: Tensor,
    x_context: Tensor | None,
    x_weight: Tensor | None,
    y: Tensor,
    y_context: Tensor | None,
    y_weight: Tensor | None,
    x_hat: Tensor,
    steps: int,
    chunk: int = 65536,
) -> tuple[float, Tensor, float]:
    r"""Held-out dual :math:`E_P g + E_Q g^*` (lower is better) with a well-solved conjugate.

    Uses only source and target samples (no ground truth), so it is the model-selection
    and early-stopping criterion. ``x_hat`` warm-starts the conjugate and is updated.

    Returns:
        ``(dual, x_hat, residual)`` where residual is the mean :math:`\|y - \nabla g(\hat x)\|`.
    """
    src = torch.zeros((), dtype=x.dtype, device=x.device)
    for s in range(0, len(x), chunk):
        cs = None if x_context is None else x_context[s : s + chunk]
        ws = None if x_weight is None else x_weight[s : s + chunk]
        src = src + weighted_mean(g(x[s : s + chunk], cs), ws) * len(x[s : s + chunk])
    tgt = torch.zeros((), dtype=x.dtype, device=x.device)
    res = torch.zeros((), dtype=x.dtype, device=x.device)
    out = torch.empty_like(x_hat)
    for s in range(0, len(y), chunk):
        cs = None if y_context is None else y_context[s : s + chunk]
        ws = None if y_weight is None else y_weight[s : s + chunk]
        xh, phi, _ = solve_conjugate(g, y[s : s + chunk], cs, x_hat[s : s + chunk], steps)
        out[s : s + chunk] = xh
        tgt = tgt + weighted_mean(phi, ws) * len(phi)
        res = res + (y[s : s + chunk] - g.grad_x(xh, cs)).norm(dim=-1).sum()
    dual = float(src / len(x) + tgt / len(y))
    return dual, out, float(res / len(y))
