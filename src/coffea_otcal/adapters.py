r"""Tagger adapters: file columns <-> probabilities on the simplex with a named class order.

Two families cover the taggers analysts use:

* **ratio trio** (CMS DeepJet, UParT AK4, PNet, RobustParTAK4): the file holds
  ``B``, ``CvL`` and ``CvB`` with ``B = b + bb + lepb``, ``CvL = c / (c + uds + g)`` and
  ``CvB = c / (c + B)``. The simplex point in class order ``(b, c, light)`` is
  :math:`p_b = B,\ p_c = \mathrm{CvL}(1 - B),\ p_\ell = (1 - \mathrm{CvL})(1 - B)`
  (``../shared/data/nanoaod/README.md``); ``CvB`` is written back but not read.
  NanoAOD stores the columns with 10 mantissa bits, so :math:`1 - B` keeps only a few
  significant bits for b-like jets (every B above :math:`1 - 2^{-12}` is stored as exactly
  1, which would set :math:`p_c = p_\ell = 0`). Where :math:`1 - B < 2^{4 - m}` (``m`` the
  stored mantissa bits, 23 for full float32) the adapter therefore takes the b-vs-rest
  ratio from CvB, whose small values keep full relative precision:
  :math:`p_c / p_b = \mathrm{CvB}/(1 - \mathrm{CvB})` and
  :math:`1 - p_b = q / (\mathrm{CvL} + q)` with :math:`q = p_c/p_b`; CvL still splits
  :math:`1 - p_b` into c and light. Both routes agree on exact inputs (checked to 1e-3 on
  the real ``nano_tt_v15.root``, where 8 % of the DeepJet jets have :math:`1-B < 2^{-6}`).
* **Dequantisation** (trio and probability families, ``dequantise=True`` with
  ``mantissa_bits``): each stored value :math:`v` is replaced by a point of its rounding
  cell :math:`[v - u_-/2,\ v + u_+/2] \cap [0, 1]` (:math:`u_\pm` the spacing of the
  representable values above and below :math:`v`), at a uniform position drawn from a hash
  of the jet's stored tagger bits and of its ``key_columns`` (default ``pt``, ``eta``):
  deterministic, so the same jet gives the same point in the fill, the trainer and the
  applier, and different jets with identical stored scores get different points (without
  the kinematic key, the 8 % of b jets of the demo whose stored B, CvL, CvB repeat exactly
  stayed point masses). Quantised scores are point masses and filaments in ILR
  coordinates that no smooth transport map or flow can match; the dequantised scores are
  a sample of a continuous density that rounds back to the stored values (Theis et al.
  2016). Calibrated columns written back to a file are rounded again by the writer.
* **probabilities** (ATLAS GN2 / DL1d ``pb, pc, pu``, or any user columns): the columns
  are the class probabilities; a sub-composition (e.g. GN2 without ``ptau``) is re-closed.

A jet is *valid* when every column is finite and inside ``[0, 1]`` (within ``tolerance``)
and, for the probability family, the columns sum to a positive number. Invalid jets (tagger
defaults such as -1 or -3, NaN) are flagged, never calibrated; their row in the returned
probability array holds the uniform point ``1/D`` so that no NaN enters a kernel, and
callers must pass the original values through unchanged (the processors count them).
"""

from __future__ import annotations

__all__ = ["ADAPTERS", "DEFAULT_KEY_COLUMNS", "TaggerAdapter", "get_adapter", "rounding_cell"]

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Kind = Literal["trio", "probabilities"]

#: per-jet columns mixed into the dequantisation hash by default
DEFAULT_KEY_COLUMNS = ("pt", "eta")


@dataclass(frozen=True)
class TaggerAdapter:
    """Conversion between a tagger's file columns and simplex probabilities.

    Arguments:
        name: the adapter's registry name (recorded in bundles and stores).
        kind: ``"trio"`` (B, CvL, CvB ratios) or ``"probabilities"``.
        columns: the Jet field names, without the ``Jet_`` prefix, in the family's order
            (trio: B, CvL, CvB; probabilities: one column per class).
        classes: class names in simplex order, e.g. ``("b", "c", "light")``.
        tolerance: how far outside ``[0, 1]`` a stored value may lie (float rounding).
        mantissa_bits: stored mantissa bits of the columns (NanoAOD: 10; None: float32).
        dequantise: spread each stored value uniformly over its rounding cell (needs
            ``mantissa_bits``), see the module docstring.
        key_columns: per-jet columns (e.g. ``pt``, ``eta``) mixed into the dequantisation
            hash; :meth:`to_simplex` needs them when ``dequantise`` is on.
        options: the keyword options the adapter was built with (for provenance).

    Example:
        >>> ad = get_adapter("deepjet")
        >>> p, ok = ad.to_simplex({"btagDeepFlavB": [0.9, -1.0],
        ...                        "btagDeepFlavCvL": [0.5, -1.0],
        ...                        "btagDeepFlavCvB": [0.05, -1.0]})
        >>> p.round(3).tolist(), ok.tolist()
        ([[0.9, 0.05, 0.05], [0.333, 0.333, 0.333]], [True, False])
    """

    name: str
    kind: Kind
    columns: tuple[str, ...]
    classes: tuple[str, ...]
    tolerance: float = 1e-6
    options: dict[str, Any] = field(default_factory=dict)
    mantissa_bits: int | None = None
    dequantise: bool = False
    key_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "trio" and (len(self.columns) != 3 or len(self.classes) != 3):
            msg = (
                f"adapter {self.name!r}: the ratio-trio family needs 3 columns (B, CvL, CvB) "
                f"and classes (b, c, light), got columns={self.columns} classes={self.classes}"
            )
            raise ValueError(msg)
        if self.kind == "probabilities" and len(self.columns) != len(self.classes):
            msg = (
                f"adapter {self.name!r}: one column per class is needed, got "
                f"{len(self.columns)} columns {self.columns} for classes {self.classes}"
            )
            raise ValueError(msg)
        if self.mantissa_bits is not None and not 1 <= self.mantissa_bits <= 23:
            msg = f"adapter {self.name!r}: mantissa_bits must be in 1..23, got {self.mantissa_bits}"
            raise ValueError(msg)
        if self.dequantise and self.mantissa_bits is None:
            msg = (
                f"adapter {self.name!r}: dequantise=True needs mantissa_bits (the stored "
                f"precision of the columns, 10 for NanoAOD tagger scores)"
            )
            raise ValueError(msg)
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            msg = f"adapter {self.name!r}: need >= 2 distinct class names, got {self.classes}"
            raise ValueError(msg)

    @property
    def n_classes(self) -> int:
        """The number of classes D."""
        return len(self.classes)

    @property
    def read_columns(self) -> tuple[str, ...]:
        """Every column :meth:`to_simplex` reads: the tagger's, then the dequantisation key."""
        key = self.key_columns if self.dequantise else ()
        return tuple(dict.fromkeys((*self.columns, *key)))

    def _column(self, columns: Mapping[str, Any], name: str) -> np.ndarray:
        try:
            values = columns[name]
        except KeyError:
            msg = (
                f"tagger adapter {self.name!r} needs the jet column {name!r}, which is missing; "
                f"available: {sorted(columns)[:40]}. Choose another adapter or give its column "
                f"names as options"
            )
            raise KeyError(msg) from None
        return np.asarray(values, dtype=np.float64)

    def to_simplex(self, columns: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Convert flat column arrays to ``(probs (n, D) float64, valid (n,) bool)``.

        Arguments:
            columns: a mapping from column name to a flat array (numpy, or anything
                ``np.asarray`` takes) with at least :attr:`read_columns`; extra entries
                are ignored.

        Returns:
            Probabilities on the simplex (uniform 1/D on invalid rows) and the validity flag.
        """
        raw = np.stack([self._column(columns, c) for c in self.columns], axis=-1)
        tol = self.tolerance
        valid = np.all(np.isfinite(raw) & (raw >= -tol) & (raw <= 1.0 + tol), axis=-1)
        clean = np.where(valid[:, None], np.clip(raw, 0.0, 1.0), 0.5)
        if self.dequantise:
            missing = [c for c in self.key_columns if c not in columns]
            if missing:
                msg = (
                    f"adapter {self.name!r} dequantises with the per-jet key columns "
                    f"{list(self.key_columns)}, but {missing} are missing; pass them with the "
                    f"tagger columns (or set the adapter option key_columns)"
                )
                raise KeyError(msg)
            key = [self._column(columns, c) for c in self.key_columns]
            clean = _dequantise(clean, int(self.mantissa_bits or 23), key)
        if self.kind == "trio":
            b, cvl, cvb = clean[:, 0], clean[:, 1], clean[:, 2]
            bits = 23 if self.mantissa_bits is None else self.mantissa_bits
            with np.errstate(divide="ignore", invalid="ignore"):
                q = cvb / (1.0 - cvb)  # p_c / p_b from CvB
                rest_cvb = np.where(np.isinf(q), 1.0, q / (cvl + q))
            rest_cvb = np.where(np.isfinite(rest_cvb), rest_cvb, 1.0 - b)
            rest = np.where(1.0 - b < 2.0 ** (4 - bits), rest_cvb, 1.0 - b)
            probs = np.stack([1.0 - rest, cvl * rest, (1.0 - cvl) * rest], axis=-1)
        else:
            total = clean.sum(axis=-1, keepdims=True)
            valid &= total[:, 0] > 0
            probs = clean / np.where(total > 0, total, 1.0)
        probs[~valid] = 1.0 / self.n_classes
        return probs, valid

    def from_simplex(self, probs: Any, total: Any = None) -> dict[str, np.ndarray]:
        """Convert simplex probabilities back to the tagger's own columns.

        Arguments:
            probs: ``(n, D)`` probabilities.
            total: for the probability family, the original sum of the columns (e.g.
                ``1 - ptau`` for GN2) to restore a sub-composition's scale; default 1.

        Returns:
            A dict column name -> float64 array (trio: B, CvL, CvB as the file defines them).
        """
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != self.n_classes:
            msg = f"adapter {self.name!r} expects probabilities of shape (n, {self.n_classes}), got {p.shape}"
            raise ValueError(msg)
        if self.kind == "trio":
            pb, pc, pl = p[:, 0], p[:, 1], p[:, 2]
            with np.errstate(invalid="ignore", divide="ignore"):
                cvl = np.where(pc + pl > 0, pc / (pc + pl), 0.0)
                cvb = np.where(pc + pb > 0, pc / (pc + pb), 0.0)
            return dict(zip(self.columns, (pb, cvl, cvb), strict=True))
        scale = 1.0 if total is None else np.asarray(total, dtype=np.float64)[:, None]
        out = p * scale
        return {c: out[:, i] for i, c in enumerate(self.columns)}


def _trio(name: str, prefix: str) -> Callable[..., TaggerAdapter]:
    def build(
        columns: Sequence[str] | None = None,
        tolerance: float = 1e-6,
        mantissa_bits: int | None = None,
        dequantise: bool = False,
        key_columns: Sequence[str] = DEFAULT_KEY_COLUMNS,
        **unknown: Any,
    ) -> TaggerAdapter:
        _refuse_unknown(name, unknown)
        cols = tuple(columns) if columns else (f"{prefix}B", f"{prefix}CvL", f"{prefix}CvB")
        opts = {"columns": list(cols), "tolerance": tolerance, "mantissa_bits": mantissa_bits,
                "dequantise": dequantise, "key_columns": list(key_columns)}
        return TaggerAdapter(name, "trio", cols, ("b", "c", "light"), tolerance, opts,
                             mantissa_bits, dequantise, tuple(key_columns))

    return build


def _probabilities(name: str, default_columns: Sequence[str] | None) -> Callable[..., TaggerAdapter]:
    def build(
        columns: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
        kind: Kind = "probabilities",
        tolerance: float = 1e-6,
        mantissa_bits: int | None = None,
        dequantise: bool = False,
        key_columns: Sequence[str] = DEFAULT_KEY_COLUMNS,
        **unknown: Any,
    ) -> TaggerAdapter:
        _refuse_unknown(name, unknown)
        cols = tuple(columns) if columns else tuple(default_columns or ())
        if not cols:
            msg = (
                f"adapter {name!r} needs columns=[...] (the Jet field names, one per class, or "
                f"B, CvL, CvB with kind='trio')"
            )
            raise ValueError(msg)
        cls = tuple(classes) if classes else ("b", "c", "light")
        opts = {"columns": list(cols), "classes": list(cls), "kind": kind, "tolerance": tolerance,
                "mantissa_bits": mantissa_bits, "dequantise": dequantise,
                "key_columns": list(key_columns)}
        return TaggerAdapter(name, kind, cols, cls, tolerance, opts, mantissa_bits, dequantise,
                             tuple(key_columns))

    return build


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(h: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (a bijective avalanche on uint64)."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def rounding_cell(v: np.ndarray, mantissa_bits: int) -> tuple[np.ndarray, np.ndarray]:
    r"""The interval of values that a stored value rounds from, truncated to [0, 1].

    With :math:`u_\pm` the spacing of the representable values above and below ``v`` at
    ``mantissa_bits`` stored bits, the cell is :math:`[v - u_-/2,\ v + u_+/2] \cap [0, 1]`
    (a stored 1 covers :math:`[1 - 2^{-(m+2)}, 1]` only; a stored 0 is a point).

    Returns:
        ``(low, high)`` arrays of the shape of ``v``.
    """
    v = np.asarray(v, dtype=np.float64)
    _, e_up = np.frexp(v)
    _, e_dn = np.frexp(v * (1.0 - 2.0**-30))
    up = np.where(v > 0, np.ldexp(1.0, e_up - 1 - mantissa_bits), 0.0)
    down = np.where(v > 0, np.ldexp(1.0, e_dn - 1 - mantissa_bits), 0.0)
    return np.maximum(v - 0.5 * down, 0.0), np.minimum(v + 0.5 * up, 1.0)


def _bits(v: np.ndarray) -> np.ndarray:
    """The float32 bit pattern of each value, as uint64 (a stable per-value hash input)."""
    return np.ascontiguousarray(v, dtype=np.float32).view(np.uint32).astype(np.uint64)


def _dequantise(
    values: np.ndarray, mantissa_bits: int, key_columns: Sequence[np.ndarray] = ()
) -> np.ndarray:
    """Spread ``(n, k)`` stored values over their rounding cells at hash-seeded positions.

    The hash mixes the float32 bits of every stored value and of every key column.
    """
    parts = [_bits(values[:, j]) for j in range(values.shape[1])]
    for col in key_columns:
        if np.shape(col) != (len(values),):
            msg = f"dequantisation key column has shape {np.shape(col)}, expected ({len(values)},)"
            raise ValueError(msg)
        parts.append(_bits(col))
    with np.errstate(over="ignore"):
        key = np.zeros(len(values), dtype=np.uint64)
        for j, part in enumerate(parts):
            key = _mix(key ^ (part + _GOLDEN * np.uint64(j + 1)))
        out = np.empty_like(values)
        for j in range(values.shape[1]):
            t = (_mix(key + _GOLDEN * np.uint64(j + 1)) >> np.uint64(11)).astype(np.float64)
            lo, hi = rounding_cell(values[:, j], mantissa_bits)
            out[:, j] = lo + t * 2.0**-53 * (hi - lo)
    return out


def _refuse_unknown(name: str, unknown: Mapping[str, Any]) -> None:
    if unknown:
        msg = f"adapter {name!r} got unknown options {sorted(unknown)}"
        raise TypeError(msg)


#: registry name -> builder taking keyword options.
ADAPTERS: dict[str, Callable[..., TaggerAdapter]] = {
    "deepjet": _trio("deepjet", "btagDeepFlav"),
    "upart": _trio("upart", "btagUParTAK4"),
    "pnet": _trio("pnet", "btagPNet"),
    "robustpart": _trio("robustpart", "btagRobustParTAK4"),
    "gn2": _probabilities("gn2", ("GN2v01_pb", "GN2v01_pc", "GN2v01_pu")),
    "dl1d": _probabilities("dl1d", ("DL1dv01_pb", "DL1dv01_pc", "DL1dv01_pu")),
    "generic": _probabilities("generic", None),
}


def get_adapter(name: str, **options: Any) -> TaggerAdapter:
    """Build a tagger adapter by name (see :data:`ADAPTERS`).

    Arguments:
        name: one of ``deepjet``, ``upart``, ``pnet``, ``robustpart``, ``gn2``, ``dl1d``,
            ``generic``.
        **options: ``columns=[...]`` overrides the column names; the probability family
            also takes ``classes=[...]`` and ``kind`` (``generic`` with ``kind="trio"``
            reads any B/CvL/CvB trio); all take ``tolerance``, ``mantissa_bits``,
            ``dequantise`` and ``key_columns``.

    Returns:
        The adapter.
    """
    try:
        builder = ADAPTERS[name.lower()]
    except KeyError:
        msg = f"unknown tagger adapter {name!r}; known adapters: {sorted(ADAPTERS)}"
        raise ValueError(msg) from None
    return builder(**options)
