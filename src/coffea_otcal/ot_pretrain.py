"""Minibatch-OT start of a Brenier potential: exact OT plans of blocks, then least squares on grad g."""

from __future__ import annotations

__all__ = ["blockwise_ot_targets", "fit_gradient_regression"]

import math
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from coffea_otcal.ot_losses import gradient_regression_loss


def blockwise_ot_targets(
    x: np.ndarray,
    y: np.ndarray,
    *,
    x_context: np.ndarray | None = None,
    y_context: np.ndarray | None = None,
    x_weight: np.ndarray | None = None,
    y_weight: np.ndarray | None = None,
    block: int = 2048,
    max_rows: int = 200_000,
    context_cost: float = 100.0,
    rng: np.random.Generator | None = None,
    name: str = "",
) -> dict[str, Any]:
    r"""Barycentric targets of exact discrete OT plans between blocks of source and target rows.

    Up to ``max_rows`` rows of each side are drawn without replacement and cut into blocks
    of ``block`` source and ``block`` target rows. For each block pair the exact plan
    :math:`G` of the discrete problem with cost
    :math:`\|x_i - y_j\|^2 + \lambda \|c_i - c_j\|^2` (:math:`\lambda` = ``context_cost``:
    pairs are formed within nearly equal contexts) and marginals proportional to the
    clipped weights :math:`\max(w, 0)` is solved by the network simplex (POT ``ot.emd``),
    and every source row gets the barycentric projection
    :math:`\bar y_i = \sum_j G_{ij} y_j / \sum_j G_{ij}` (its partner, for unit weights).

    Regressing :math:`\nabla g` on :math:`\bar y` is a well-conditioned least-squares
    problem whose solution is close to the Brenier map: the plan of a block of n points is
    a blurred version of the population plan (a bias that shrinks as n grows; measured on
    the W2 benchmark pair d = 2, docs/ot.md), which the semi-dual training that follows
    removes. Meant for low dimensions (the bias grows quickly with d).

    Arguments:
        x: (n, d) source rows.
        y: (m, d) target rows.
        x_context: (n, k) source context or None.
        y_context: (m, k) target context or None.
        x_weight: (n,) source weights (negative ones count as 0 here) or None.
        y_weight: (m,) target weights or None.
        block: rows per side in one exact problem (cost ~ block^2 memory, ~ block^2-3 time).
        max_rows: rows drawn per side.
        context_cost: weight of the context distance in the cost.
        rng: numpy generator of the row draw.
        name: map label for errors.

    Returns:
        ``{"x", "context", "target", "weight"}``: the source rows used, their context,
        their barycentric targets and their marginal weights, plus ``"blocks"`` and
        ``"seconds"``.

    References:
        K. Fatras et al., "Learning with minibatch Wasserstein", AISTATS 2020;
        R. Flamary et al., "POT: Python Optimal Transport", JMLR 22 (2021) 1.
    """
    try:
        import ot
    except ImportError as err:  # pragma: no cover - POT is in the train extra
        msg = (
            f"map {name!r}: init='minibatch_ot' needs POT (the 'pot' package, part of "
            "coffea-otcal[train]); install it or use init='gaussian'"
        )
        raise ImportError(msg) from err
    rng = rng or np.random.default_rng(0)
    if block < 2:
        msg = f"map {name!r}: pretrain_block must be >= 2, got {block}"
        raise ValueError(msg)
    wx = np.ones(len(x)) if x_weight is None else np.clip(np.asarray(x_weight, float), 0.0, None)
    wy = np.ones(len(y)) if y_weight is None else np.clip(np.asarray(y_weight, float), 0.0, None)
    n = min(max_rows, len(x), len(y))
    ix, iy = rng.permutation(len(x))[:n], rng.permutation(len(y))[:n]
    start = time.perf_counter()
    target = np.empty((n, y.shape[1]))
    weight = np.zeros(n)
    blocks = 0
    for lo in range(0, n, block):
        bx, by = ix[lo : lo + block], iy[lo : lo + block]
        a, b = wx[bx], wy[by]
        if a.sum() <= 0 or b.sum() <= 0:
            continue
        cost = ot.dist(x[bx], y[by])
        if x_context is not None and y_context is not None:
            cost += context_cost * ot.dist(x_context[bx], y_context[by])
        plan = ot.emd(a / a.sum(), b / b.sum(), cost, numItermax=max(100_000, 50 * len(bx) ** 2))
        mass = plan.sum(1)
        keep = mass > 0
        target[lo : lo + len(bx)][keep] = (plan[keep] @ y[by]) / mass[keep, None]
        weight[lo : lo + len(bx)] = mass * a.sum()
        blocks += 1
    used = weight > 0
    return {
        "x": x[ix][used],
        "context": None if x_context is None else x_context[ix][used],
        "target": target[used],
        "weight": weight[used] / weight[used].mean(),
        "blocks": blocks,
        "seconds": time.perf_counter() - start,
    }


def fit_gradient_regression(
    g: Any,
    x: Tensor,
    context: Tensor | None,
    target: Tensor,
    weight: Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    lr_final: float,
    grad_clip: float,
    generator: torch.Generator,
) -> float:
    r"""Least squares :math:`E_w \|\nabla_x g(x \mid c) - \bar y\|^2` over the potential g.

    AdamW with a cosine schedule from ``lr`` to ``lr_final``, gradient-norm clipping and
    the potential's non-negativity projection after every step, so g stays convex.

    Returns:
        The loss of the last minibatch.
    """
    opt = torch.optim.AdamW(g.parameters(), lr=lr, weight_decay=0.0)
    loss = torch.zeros(())
    for step in range(steps):
        frac = step / max(1, steps)
        for group in opt.param_groups:
            group["lr"] = lr_final + (lr - lr_final) * 0.5 * (1.0 + math.cos(math.pi * frac))
        idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=generator,
                            device=x.device)
        ctx = None if context is None else context[idx]
        loss = gradient_regression_loss(g, x[idx], ctx, target[idx], weight[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(g.parameters(), grad_clip)
        opt.step()
        g.project()
    return float(loss.detach())
