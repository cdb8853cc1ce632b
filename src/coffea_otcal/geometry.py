r"""Compositional geometry of the probability simplex (Aitchison, ILR, CLR, discriminants).

The tagger outputs of a D-class flavour tagger lie on the simplex
:math:`\mathcal{S}^{D-1} = \{p : p_i > 0, \sum_i p_i = 1\}`. Kim & Yang (2026),
Sec. II.3, calibrate in isometric log-ratio (ILR) coordinates
:math:`z = H \log p \in \mathbb{R}^{D-1}` (eq. 8) with the Helmert sub-matrix :math:`H`,
where the Euclidean distance equals the Aitchison distance (eq. 6, 9), so quadratic-cost
optimal transport in ILR space is minimum-distortion transport on the simplex.

Every function accepts numpy arrays, torch tensors and awkward arrays (regular or jagged,
e.g. ``events * var * jets * D``) with the classes on the last axis, and returns the same
kind. The class order of the 3-class trio is ``(b, c, light)``.

Clipping: tagger scores stored with NanoAOD's reduced float precision contain exact 0 and
1. Before any logarithm every component is floored at ``eps`` (default
:data:`DEFAULT_EPS` = 1e-12) and the vector is re-closed (divided by its sum). This bounds
ILR coordinates by about :math:`\sqrt{2} \ln(1/\epsilon) \approx 39` and never yields
inf or NaN. The floor is far below any probability a tagger resolves: a floor of 1e-6
(our first default) piled up 1-3 % of the b jets of the demo sample on the line
:math:`p_\ell = 10^{-6}`, with different fractions in simulation and data, which no
transport map can match (``docs/methods.md``). Negative or non-finite inputs (tagger defaults such as -1, NaN) are *not*
clipped: they raise, because they must have been flagged by the tagger adapter first.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_EPS",
    "aitchison_distance",
    "clip_simplex",
    "closure",
    "clr",
    "clr_inv",
    "d_bc",
    "d_cl",
    "d_hfl",
    "helmert_basis",
    "ilr",
    "ilr_inv",
    "ratio_score",
    "reweight",
    "reweight_shift",
]

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: Floor applied to every probability before a logarithm is taken.
DEFAULT_EPS = 1e-12


@functools.lru_cache(maxsize=64)
def _helmert_cached(n_classes: int) -> np.ndarray:
    rows = []
    for i in range(1, n_classes):
        row = np.zeros(n_classes)
        row[:i] = 1.0 / np.sqrt(i * (i + 1))
        row[i] = -i / np.sqrt(i * (i + 1))
        rows.append(row)
    basis = np.array(rows)
    basis.setflags(write=False)
    return basis


def helmert_basis(n_classes: int) -> np.ndarray:
    r"""Orthonormal Helmert sub-matrix :math:`H` of shape ``(D-1, D)`` (Kim & Yang eq. 8).

    Row :math:`i` (0-based) is :math:`(1, \dots, 1, -(i+1), 0, \dots, 0) / \sqrt{(i+1)(i+2)}`
    with :math:`i+1` leading ones, so :math:`H H^T = I_{D-1}` and :math:`H \mathbf{1} = 0`.
    For D = 3 this is eq. 8: rows :math:`(1,-1,0)/\sqrt2` and :math:`(1,1,-2)/\sqrt6`.

    Arguments:
        n_classes: the number of classes D >= 2.

    Returns:
        A read-only float64 array of shape ``(D-1, D)``.

    Example:
        >>> helmert_basis(3).round(4)
        array([[ 0.7071, -0.7071,  0.    ],
               [ 0.4082,  0.4082, -0.8165]])
    """
    if int(n_classes) != n_classes or n_classes < 2:
        msg = f"the simplex needs at least 2 classes, got n_classes={n_classes!r}"
        raise ValueError(msg)
    return _helmert_cached(int(n_classes))


# --------------------------------------------------------------------------- backends


def _is_torch(x: Any) -> bool:
    mod = type(x).__module__
    return mod.startswith("torch") and hasattr(x, "detach")


def _is_awkward(x: Any) -> bool:
    return type(x).__module__.startswith("awkward")


def _as_matrix(basis: np.ndarray, like: Any) -> Any:
    if _is_torch(like):
        import torch

        return torch.tensor(np.array(basis), dtype=like.dtype, device=like.device)
    return basis


def _awkward_apply(func: Callable[[np.ndarray], np.ndarray], arr: Any) -> Any:
    """Apply a kernel on ``(n, D)`` numpy rows to an awkward array with classes last."""
    import awkward as ak

    if arr.fields:
        msg = (
            f"expected an awkward array of numbers with the classes on the last axis, got "
            f"records with fields {arr.fields}; select the probability field first"
        )
        raise TypeError(msg)
    if arr.ndim < 2:
        msg = f"expected classes on the last axis (ndim >= 2), got type {arr.type}"
        raise ValueError(msg)
    lengths = np.asarray(ak.flatten(ak.num(arr, axis=-1), axis=None))
    if len(lengths) and np.any(lengths != lengths[0]):
        msg = (
            f"every innermost list must hold the same number of classes; found lengths "
            f"{sorted(set(lengths.tolist()))[:5]}"
        )
        raise ValueError(msg)
    n_cls = int(lengths[0]) if len(lengths) else 0
    flat = np.asarray(ak.to_numpy(ak.flatten(arr, axis=None)), dtype=np.float64)
    rows = flat.reshape(-1, n_cls) if n_cls else flat.reshape(0, 0)
    out = ak.from_numpy(np.asarray(func(rows)), regulararray=True)
    counts = [ak.flatten(ak.num(arr, axis=axis), axis=None) for axis in range(arr.ndim - 2, 0, -1)]
    for c in counts:
        out = ak.unflatten(out, c)
    return out


def _dispatch(func: Callable[..., Any]) -> Callable[..., Any]:
    """Let a numpy/torch kernel accept awkward arrays (flatten, compute, unflatten)."""

    @functools.wraps(func)
    def wrapper(x: Any, *args: Any, **kwargs: Any) -> Any:
        if _is_awkward(x):
            return _awkward_apply(lambda rows: func(rows, *args, **kwargs), x)
        if not _is_torch(x):
            x = np.asarray(x, dtype=np.float64)
        return func(x, *args, **kwargs)

    return wrapper


def _check_probabilities(p: Any) -> None:
    """Refuse negative or non-finite probabilities, naming the first offending value."""
    if _is_torch(p):
        import torch

        bad = ~torch.isfinite(p) | (p < 0)
        if bool(bad.any()):
            first = p[bad].flatten()[0].item()
            msg = (
                f"{int(bad.sum())} probability entries are negative or not finite (first: "
                f"{first!r}); flag tagger defaults with the adapter before calibrating"
            )
            raise ValueError(msg)
        return
    bad = ~np.isfinite(p) | (p < 0)
    if bad.any():
        msg = (
            f"{int(bad.sum())} probability entries are negative or not finite (first: "
            f"{p[bad].ravel()[0]!r}); flag tagger defaults with the adapter before calibrating"
        )
        raise ValueError(msg)


def _logsumexp_last(x: Any) -> Any:
    if _is_torch(x):
        import torch

        return torch.logsumexp(x, dim=-1, keepdim=True)
    m = np.max(x, axis=-1, keepdims=True)
    return m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def _sum_last(x: Any) -> Any:
    if _is_torch(x):
        return x.sum(dim=-1, keepdim=True)
    return np.sum(x, axis=-1, keepdims=True)


def _log(x: Any) -> Any:
    if _is_torch(x):
        import torch

        return torch.log(x)
    return np.log(x)


def _floor(x: Any, eps: float) -> Any:
    if _is_torch(x):
        return x.clamp(min=eps)
    return np.maximum(x, eps)


# --------------------------------------------------------------------------- closure, CLR, ILR


@_dispatch
def closure(x: Any) -> Any:
    r"""Rescale positive vectors to sum to one: :math:`\mathcal{C}(x) = x / \sum_i x_i`.

    Example:
        >>> closure([2.0, 1.0, 1.0]).tolist()
        [0.5, 0.25, 0.25]
    """
    return x / _sum_last(x)


@_dispatch
def clip_simplex(p: Any, eps: float = DEFAULT_EPS) -> Any:
    """Floor every component at ``eps`` and re-close (see the module docstring).

    Arguments:
        p: probabilities with the classes on the last axis (each >= 0, finite).
        eps: the floor; components at exactly 0 become ``eps`` before re-closing.

    Returns:
        Probabilities each in ``(0, 1)`` that sum to one.
    """
    _check_probabilities(p)
    return closure(_floor(p, eps))


@_dispatch
def clr(p: Any, eps: float = DEFAULT_EPS) -> Any:
    r"""Centred log-ratio :math:`\mathrm{clr}(p)_i = \ln p_i - \frac1D \sum_j \ln p_j`."""
    logp = _log(clip_simplex(p, eps))
    return logp - _sum_last(logp) / logp.shape[-1]


@_dispatch
def clr_inv(y: Any) -> Any:
    r"""Inverse CLR: :math:`p = \mathcal{C}(\exp y)`, computed stably via log-sum-exp."""
    if _is_torch(y):
        import torch

        return torch.exp(y - _logsumexp_last(y))
    return np.exp(y - _logsumexp_last(y))


@_dispatch
def ilr(p: Any, eps: float = DEFAULT_EPS) -> Any:
    r"""Isometric log-ratio coordinates :math:`z = H \log p` (Kim & Yang eq. 7-8).

    Arguments:
        p: probabilities, classes on the last axis (D >= 2), each in [0, 1].
        eps: clipping floor (module docstring).

    Returns:
        ILR coordinates with D-1 entries on the last axis.

    Example:
        >>> z = ilr([0.7, 0.2, 0.1])
        >>> ilr_inv(z).round(6).tolist()
        [0.7, 0.2, 0.1]
    """
    logp = _log(clip_simplex(p, eps))
    basis = _as_matrix(helmert_basis(logp.shape[-1]), logp)
    return logp @ basis.T


@_dispatch
def ilr_inv(z: Any) -> Any:
    r"""Inverse ILR: :math:`p = \exp(H^T z) / \mathbf{1}^T \exp(H^T z)` (below eq. 11)."""
    basis = _as_matrix(helmert_basis(z.shape[-1] + 1), z)
    return clr_inv(z @ basis)


def aitchison_distance(p: Any, q: Any, eps: float = DEFAULT_EPS) -> Any:
    """Aitchison distance (Kim & Yang eq. 6), computed as the Euclidean ILR distance (eq. 9).

    Arguments:
        p: probabilities, classes on the last axis.
        q: probabilities of the same shape.
        eps: clipping floor.

    Returns:
        :math:`d_A(p, q)` with the class axis reduced.

    Example:
        >>> float(aitchison_distance([0.94, 0.04, 0.02], [0.94, 0.02, 0.04])).__round__(3)
        0.98
    """
    dz = ilr(p, eps) - ilr(q, eps)
    if _is_torch(dz):
        return dz.norm(dim=-1)
    if _is_awkward(dz):
        import awkward as ak

        return np.sqrt(ak.sum(dz**2, axis=-1))
    return np.sqrt(np.sum(dz**2, axis=-1))


# --------------------------------------------------------------------------- prior reweighting


def reweight_shift(kappa: Sequence[float] | np.ndarray) -> np.ndarray:
    r"""ILR translation equivalent to reweighting the class priors by ``kappa``.

    Reweighting :math:`p'_f = \kappa_f p_f / \sum_j \kappa_j p_j` is the translation
    :math:`z' = z + H \log \kappa` in ILR coordinates, because the rows of :math:`H`
    sum to zero (Kim & Yang eq. 11, there for :math:`\kappa = (1, \kappa, 1)`:
    :math:`(-\ln\kappa/\sqrt2, +\ln\kappa/\sqrt6)`).

    Arguments:
        kappa: positive per-class factors (length D).

    Returns:
        The shift vector of length D-1.
    """
    k = np.asarray(kappa, dtype=np.float64)
    if k.ndim != 1 or np.any(~np.isfinite(k)) or np.any(k <= 0):
        msg = f"kappa must be a 1-d vector of positive finite factors, got {kappa!r}"
        raise ValueError(msg)
    return helmert_basis(k.size) @ np.log(k)


def reweight(p: Any, kappa: Sequence[float] | np.ndarray, eps: float = DEFAULT_EPS) -> Any:
    r"""Reweight class priors, :math:`p' = \mathcal{C}(\kappa \odot p)`, via the ILR shift."""
    shift = reweight_shift(kappa)
    z = ilr(p, eps)
    if _is_torch(z):
        import torch

        return ilr_inv(z + torch.as_tensor(shift, dtype=z.dtype, device=z.device))
    return ilr_inv(z + shift)


# --------------------------------------------------------------------------- discriminants


@_dispatch
def _weighted_ratio(p: Any, num: np.ndarray, den: np.ndarray, eps: float) -> Any:
    p = clip_simplex(p, eps)
    n_cls = p.shape[-1]
    if num.shape != (n_cls,) or den.shape != (n_cls,):
        msg = f"weights need {n_cls} entries (one per class), got {num.tolist()} / {den.tolist()}"
        raise ValueError(msg)
    return (p @ _as_matrix(num, p)) / (p @ _as_matrix(den, p))


def ratio_score(
    p: Any,
    numerator_weights: Sequence[float],
    denominator_weights: Sequence[float],
    eps: float = DEFAULT_EPS,
) -> Any:
    r"""Generic ratio score :math:`(a \cdot p) / (b \cdot p)` on clipped probabilities.

    All scores of Kim & Yang eq. 1 and eq. 62 are of this form; e.g. DeepJet's CvL is
    ``ratio_score(p, [0, 1, 0], [0, 1, 1])``. The class axis is reduced.

    Arguments:
        p: probabilities, classes on the last axis.
        numerator_weights: non-negative weights a (one per class).
        denominator_weights: non-negative weights b with b >= a componentwise for a score
            in [0, 1].
        eps: clipping floor (guarantees a positive denominator).
    """
    num = np.asarray(numerator_weights, dtype=np.float64)
    den = np.asarray(denominator_weights, dtype=np.float64)
    if np.any(num < 0) or np.any(den < 0) or not np.any(den > 0):
        msg = f"ratio-score weights must be non-negative with a positive denominator: {num}, {den}"
        raise ValueError(msg)
    return _weighted_ratio(p, num, den, eps)


def d_bc(p: Any, k: float = 1.0, eps: float = DEFAULT_EPS) -> Any:
    r""":math:`D_{b/c}(\kappa) = p_b / (p_b + \kappa p_c)` (Kim & Yang eq. 62), order (b, c, l)."""
    return ratio_score(p, [1.0, 0.0, 0.0], [1.0, k, 0.0], eps)


def d_cl(p: Any, k: float = 1.0, eps: float = DEFAULT_EPS) -> Any:
    r""":math:`D_{c/\ell}(\kappa) = \kappa p_c / (\kappa p_c + p_\ell)` (eq. 62)."""
    return ratio_score(p, [0.0, k, 0.0], [0.0, k, 1.0], eps)


def d_hfl(p: Any, k: float = 1.0, eps: float = DEFAULT_EPS) -> Any:
    r""":math:`D_{HF/\ell}(\kappa) = (p_b + \kappa p_c) / (p_b + \kappa p_c + p_\ell)` (eq. 62)."""
    return ratio_score(p, [1.0, k, 0.0], [1.0, k, 1.0], eps)
