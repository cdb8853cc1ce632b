r"""Apply a bundle: move MC jets by the transport map of their truth flavour (numpy + awkward).

This is horizontal calibration (Algren et al. 2025, Sec. 2): jets are *moved*, events are
never reweighted. For a jet of truth flavour :math:`f` with tagger probabilities :math:`p`
and context :math:`c` (e.g. :math:`\\log p_T`), the calibrated probabilities are

.. math::
    p' = \\mathrm{ilr}^{-1}\\big(T_f(\\mathrm{ilr}(p) \\mid c)\\big), \\qquad
    T_f(z \\mid c) = m + s\\,\\nabla_x g_f\\big((z - m)/s \\mid (c - c_m)/c_s\\big),

with the ILR of Kim & Yang eq. 7-8 and the Brenier map :math:`\\nabla g_f` of a (P)ICNN
potential (Kim & Yang Sec. II.2; ATLAS slides: one map per flavour and per variation,
conditioned on :math:`p_T`). The gradient is evaluated by ``coffea_otcal.kernels`` in plain
numpy with its closed-form backward pass; torch and dask are never imported here.

Per-jet status (``otcal_status``, int8; see :data:`STATUS_NAMES`):

* 0 ``calibrated`` -- moved by its flavour's map;
* 1 ``data`` -- a data jet, never moved;
* 2 ``invalid_score`` -- the tagger did not evaluate the jet (defaults -1, NaN, inf):
  tagger columns pass through unchanged, probabilities are NaN;
* 3 ``no_map`` -- the truth flavour has no map in the bundle (e.g. tau): unchanged;
* 4 ``bad_context`` -- a context variable is NaN/inf: unchanged.

Context outside the bundle's validity range ``[low, high]`` is clamped to the range, the jet
is calibrated with the clamped value and flagged in ``otcal_clamped``. Unchanged jets keep
their tagger columns bit for bit.
"""

from __future__ import annotations

__all__ = [
    "STATUS_BAD_CONTEXT",
    "STATUS_CALIBRATED",
    "STATUS_DATA",
    "STATUS_INVALID_SCORE",
    "STATUS_NAMES",
    "STATUS_NO_MAP",
    "Calibrator",
    "jet_record",
    "status_counts",
    "transform_context",
]

import functools
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from coffea_otcal.adapters import TaggerAdapter, get_adapter
from coffea_otcal.bundle import Bundle, ContextVariable
from coffea_otcal.geometry import helmert_basis, ilr, ilr_inv
from coffea_otcal.gradient_kernels import one_blas_thread
from coffea_otcal.kernels import FittedMap

logger = logging.getLogger(__name__)

STATUS_CALIBRATED = 0
STATUS_DATA = 1
STATUS_INVALID_SCORE = 2
STATUS_NO_MAP = 3
STATUS_BAD_CONTEXT = 4
#: status code -> name (module docstring).
STATUS_NAMES: dict[int, str] = {
    STATUS_CALIBRATED: "calibrated",
    STATUS_DATA: "data",
    STATUS_INVALID_SCORE: "invalid_score",
    STATUS_NO_MAP: "no_map",
    STATUS_BAD_CONTEXT: "bad_context",
}


def status_counts(status: Any, clamped: Any = None) -> dict[str, int]:
    """Count jets per status name (and clamped jets) from flat or jagged status arrays.

    Arguments:
        status: ``otcal_status`` values (numpy or awkward, any nesting).
        clamped: optional ``otcal_clamped`` flags.

    Returns:
        ``{"calibrated": n0, "data": n1, ..., "clamped": k}`` (every name present).
    """
    flat = _flat_numpy(status).astype(np.int64)
    counts = np.bincount(flat, minlength=len(STATUS_NAMES))
    out = {name: int(counts[code]) for code, name in STATUS_NAMES.items()}
    if clamped is not None:
        out["clamped"] = int(np.count_nonzero(_flat_numpy(clamped)))
    return out


def _flat_numpy(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values.ravel()
    import awkward as ak

    return ak.to_numpy(ak.flatten(values, axis=None))


def _lookup(kin: Mapping[str, Any], var: ContextVariable) -> np.ndarray:
    for key in (var.column, var.name):
        if key in kin:
            return np.asarray(kin[key], dtype=np.float64)
    msg = (
        f"context variable {var.name!r} needs the jet column {var.column!r}, which is missing; "
        f"available: {sorted(kin)[:40]}"
    )
    raise KeyError(msg)


def transform_context(
    spec: Sequence[ContextVariable], kin: Mapping[str, Any] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn raw kinematics into the maps' context (abs, clamp to the range, log).

    Arguments:
        spec: the bundle's context variables.
        kin: ``{column or name: (n,) array}`` of raw physical values, or an ``(n, k)`` array
            in ``spec`` order.

    Returns:
        ``(context (n, k) float64, clamped (n,) bool, bad (n,) bool)``: ``bad`` marks
        non-finite inputs (their context row is set to the range's low edge).
    """
    if isinstance(kin, Mapping):
        cols = [_lookup(kin, var) for var in spec]
        n = len(cols[0]) if cols else 0
        raw = np.stack(cols, axis=-1) if cols else np.empty((n, 0))
    else:
        raw = np.asarray(kin, dtype=np.float64)
        if raw.ndim == 1 and len(spec) == 1:
            raw = raw[:, None]
        if raw.ndim != 2 or raw.shape[1] != len(spec):
            msg = (
                f"context array has shape {raw.shape}; expected (n, {len(spec)}) with columns "
                f"{[v.column for v in spec]}"
            )
            raise ValueError(msg)
    n = raw.shape[0]
    out = np.empty((n, len(spec)), dtype=np.float64)
    clamped = np.zeros(n, dtype=bool)
    bad = np.zeros(n, dtype=bool)
    for j, var in enumerate(spec):
        value = raw[:, j]
        if var.transform == "abs":
            value = np.abs(value)
        finite = np.isfinite(value)
        bad |= ~finite
        value = np.where(finite, value, var.low)
        clamped |= finite & ((value < var.low) | (value > var.high))
        value = np.clip(value, var.low, var.high)
        out[:, j] = np.log(value) if var.transform == "log" else value
    return out, clamped, bad


class Calibrator:
    """Evaluate a bundle's maps on numpy and (flat or jagged) awkward jets.

    Arguments:
        bundle: a :class:`~coffea_otcal.bundle.Bundle` or a path to one.
        dtype: precision of the potential evaluation (float64 default; float32 is faster
            and agrees to ~1e-6 relative).
        flavour_column: override the bundle's truth-flavour field.

    Output fields of :meth:`calibrate_jets` / :meth:`calibrate_columns` (``docs/bundle.md``):
    ``<col>_otcal`` (nominal tagger columns, e.g. ``btagDeepFlavB_otcal``), ``p_<class>_otcal``
    (nominal probabilities), ``otcal_status``, ``otcal_clamped`` and, for every variation
    ``v``, a record ``OTCAL_<v>`` with ``up`` and ``down`` records holding ``<col>`` and
    ``p_<class>`` (coffea's ``Jet.JES_<src>.up.pt`` convention).

    A Calibrator pickles as its bundle JSON, so it travels to dask workers.

    Example:
        >>> cal = Calibrator("bundle.json.gz")  # doctest: +SKIP
        >>> out = cal.calibrate_jets(events.Jet, is_data=False)  # doctest: +SKIP
        >>> out.OTCAL_comp.up.btagDeepFlavB  # doctest: +SKIP
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        *,
        dtype: type | str = np.float64,
        flavour_column: str | None = None,
    ) -> None:
        self.bundle, self.dtype = open_bundle(bundle, "ilr", "Calibrator", dtype)
        self.flavour_column = flavour_column or self.bundle.flavour_column
        spec = self.bundle.adapter
        self.adapter: TaggerAdapter = get_adapter(spec.name, **spec.options)
        if tuple(self.adapter.classes) != tuple(self.bundle.classes):
            msg = (
                f"bundle classes {self.bundle.classes} differ from the classes "
                f"{list(self.adapter.classes)} of its adapter {spec.name!r}; fix the adapter "
                f"options in the bundle"
            )
            raise ValueError(msg)
        self._maps: dict[tuple[int, str], FittedMap] = {}
        self._digests: dict[tuple[int, str], str] = {}

    # ----------------------------------------------------------------- serialization

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (
            _calibrator_from_json,
            (self.bundle.to_json(), self.dtype.name, self.flavour_column),
        )

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in simplex order."""
        return tuple(self.bundle.classes)

    @property
    def columns(self) -> tuple[str, ...]:
        """The tagger's Jet columns."""
        return tuple(self.adapter.columns)

    @property
    def variations(self) -> list[str]:
        """The bundle's variation names."""
        return self.bundle.variation_names

    @property
    def data_columns(self) -> tuple[str, ...]:
        """Every Jet field a data jet needs: the tagger columns (and the dequantisation key)."""
        return self.adapter.read_columns

    @property
    def input_columns(self) -> tuple[str, ...]:
        """Every Jet field an MC calibration reads (tagger, key, flavour, context columns)."""
        ctx = tuple(v.column for v in self.bundle.context)
        return tuple(dict.fromkeys((*self.data_columns, self.flavour_column, *ctx)))

    def fitted_map(self, flavour: int, variation: str = "nominal") -> FittedMap:
        """The numpy evaluator of one map (built once, then cached)."""
        key = (int(flavour), variation)
        if key not in self._maps:
            # the bundle's map model is the kernels' one: no dump and re-validation
            self._maps[key] = FittedMap(self.bundle.get_map(*key), dtype=self.dtype.type)
        return self._maps[key]

    def map_digest(self, flavour: int, variation: str = "nominal") -> str:
        """SHA-256 of a map's potential and preprocessing (its free label excluded).

        Maps with equal digests compute the same transport: the pipeline publishes a
        variation's map as a copy of the nominal one where the variation leaves that
        flavour's target unchanged, and :meth:`calibrate_columns` evaluates such maps once.
        """
        key = (int(flavour), variation)
        if key not in self._digests:
            dump = self.bundle.get_map(*key).model_dump_json(
                include={"potential", "preprocessing"})
            self._digests[key] = hashlib.sha256(dump.encode()).hexdigest()
        return self._digests[key]

    def _map_names(self, variations: Sequence[str] | None) -> list[str]:
        if variations is None:
            return self.bundle.map_names
        unknown = [v for v in variations if v not in self.bundle.variation_names]
        if unknown:
            msg = f"unknown variations {unknown}; the bundle has {self.bundle.variation_names}"
            raise KeyError(msg)
        return ["nominal", *(f"{v}_{d}" for v in variations for d in ("up", "down"))]

    # ----------------------------------------------------------------- array API

    def calibrate_ilr(
        self,
        z: Any,
        flavour: int,
        context_raw: Mapping[str, Any] | np.ndarray | None = None,
        variation: str = "nominal",
    ) -> np.ndarray:
        r"""Apply :math:`T_f(z \\mid c)` to ILR coordinates.

        Arguments:
            z: ``(n, d)`` ILR coordinates.
            flavour: the truth-flavour code of every row.
            context_raw: raw physical context (see :func:`transform_context`); clamped to
                the validity range. None only for bundles without context.
            variation: map name, ``"nominal"``, ``"<v>_up"`` or ``"<v>_down"``.

        Returns:
            ``(n, d)`` float64 calibrated coordinates.

        Raises:
            ValueError: wrong shapes, missing or non-finite context.
        """
        zz = np.asarray(z, dtype=np.float64)
        if zz.ndim != 2 or zz.shape[1] != self.bundle.dim:
            msg = f"z must have shape (n, {self.bundle.dim}), got {zz.shape}"
            raise ValueError(msg)
        fmap = self.fitted_map(flavour, variation)
        if not self.bundle.context:
            return fmap.transport(zz, None).astype(np.float64)
        if context_raw is None:
            msg = f"this bundle needs context {[v.column for v in self.bundle.context]}"
            raise ValueError(msg)
        ctx, _, bad = transform_context(self.bundle.context, context_raw)
        if bad.any():
            msg = f"{int(bad.sum())} context rows are NaN/inf; calibrate_jets passes them through"
            raise ValueError(msg)
        return fmap.transport(zz, ctx).astype(np.float64)

    def calibrate_probs(
        self,
        p: Any,
        flavour: int,
        kin: Mapping[str, Any] | np.ndarray | None = None,
        variation: str = "nominal",
    ) -> np.ndarray:
        r"""Calibrate simplex probabilities: :math:`\\mathrm{ilr}^{-1} T_f(\\mathrm{ilr}(p))`.

        Arguments:
            p: ``(n, D)`` probabilities in the bundle's class order.
            flavour: the truth-flavour code of every row.
            kin: raw context (see :meth:`calibrate_ilr`).
            variation: map name.

        Returns:
            ``(n, D)`` calibrated probabilities, each in (0, 1), rows summing to one.
        """
        z = ilr(np.asarray(p, dtype=np.float64), eps=self.bundle.coordinates.eps)
        return ilr_inv(self.calibrate_ilr(z, flavour, kin, variation))

    def calibrate_columns(
        self,
        columns: Mapping[str, Any],
        *,
        is_data: bool = False,
        variations: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Calibrate flat per-jet columns (the kernel every other entry point uses).

        Arguments:
            columns: ``{Jet field: (n,) array}`` with the tagger columns and, for MC, the
                flavour column and the context columns (:attr:`input_columns`).
            is_data: data jets are never moved (status 1).
            variations: variation names to evaluate (None: all; ``[]``: nominal only).

        Returns:
            A nested dict of flat numpy arrays with the output fields of the class docstring.
        """
        with one_blas_thread():
            return self._calibrate_columns(columns, is_data, self._map_names(variations))

    def _calibrate_columns(
        self, columns: Mapping[str, Any], is_data: bool, names: list[str]
    ) -> dict[str, Any]:
        """:meth:`calibrate_columns` for the map ``names`` (BLAS already on one thread).

        Per-jet work is shared by every map and done once (adapter, status, context, rows
        grouped by flavour, ILR); each map adds only its transport of its flavour's
        contiguous slice, the inverse ILR and the tagger columns.
        """
        probs, valid = self.adapter.to_simplex(columns)
        n = probs.shape[0]
        status = np.full(n, STATUS_CALIBRATED, dtype=np.int8)
        clamped = np.zeros(n, dtype=bool)
        ctx = None
        flav = None
        if is_data:
            status[:] = STATUS_DATA
            status[~valid] = STATUS_INVALID_SCORE
        else:
            flav = self._flavours(columns, n)
            has_map = np.isin(flav, self.bundle.flavour_codes)
            status[~has_map] = STATUS_NO_MAP
            status[~valid] = STATUS_INVALID_SCORE
            if self.bundle.context:
                ctx, clamped, bad = transform_context(self.bundle.context, columns)
                status[(status == STATUS_CALIBRATED) & bad] = STATUS_BAD_CONTEXT
        calibrated = status == STATUS_CALIBRATED
        clamped &= calibrated
        probs[~valid] = np.nan
        originals = {c: np.asarray(columns[c], dtype=np.float64) for c in self.columns}
        base_p = [np.ascontiguousarray(probs[:, i]) for i in range(len(self.classes))]
        # Work shared by every map, done once: rows grouped by flavour (contiguous slices),
        # their ILR coordinates and their context in the evaluation dtype.
        rows, slices = self._group_rows(flav, calibrated)
        basis = helmert_basis(len(self.classes))
        z = _ilr_rows(probs, rows, basis, self.bundle.coordinates.eps) if rows.size else None
        ctx_rows = None if ctx is None or z is None else ctx[rows].astype(self.dtype)
        result: dict[str, Any] = {}
        # Maps with equal content (a variation that leaves a flavour's target unchanged is
        # published as a copy of its nominal map) are evaluated once: per flavour slice, and
        # per map name when every slice repeats an earlier name (then its columns are copied).
        moved: dict[tuple[int, str], np.ndarray] = {}
        done: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
        for name in names:
            fields: dict[str, np.ndarray] = {}
            digests = tuple(self.map_digest(code, name) for code, _ in slices)
            if z is None:
                fields.update({c: v.copy() for c, v in originals.items()})
                fields.update(
                    {f"p_{k}": v.copy() for k, v in zip(self.classes, base_p, strict=True)}
                )
            elif digests in done:
                fields = {c: v.copy() for c, v in done[digests].items()}
            else:
                zt = np.empty_like(z)
                for (code, sl), digest in zip(slices, digests, strict=True):
                    if (code, digest) in moved:
                        zt[sl] = moved[code, digest]
                        continue
                    c_rows = None if ctx_rows is None else ctx_rows[sl]
                    fmap = self.fitted_map(code, name)
                    fmap.transport_unlimited(z[sl], c_rows, out=zt[sl])
                    moved[code, digest] = zt[sl]
                pm = _ilr_inv_rows(zt, basis)
                for c, v in self.adapter.from_simplex(pm.T).items():
                    fields[c] = _scatter(originals[c], rows, v)
                for i, k in enumerate(self.classes):
                    fields[f"p_{k}"] = _scatter(base_p[i], rows, pm[i])
                done[digests] = fields
            if name == "nominal":
                result.update({f"{k}_otcal": v for k, v in fields.items()})
                result["otcal_status"] = status
                result["otcal_clamped"] = clamped
            else:
                var, direction = name.rsplit("_", 1)
                result.setdefault(f"OTCAL_{var}", {})[direction] = fields
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("calibrated %d jets: %s", n, status_counts(status, clamped))
        return result

    def _group_rows(
        self, flav: np.ndarray | None, calibrated: np.ndarray
    ) -> tuple[np.ndarray, list[tuple[int, slice]]]:
        """Indices of the jets to move, grouped by flavour, and each flavour's slice of them."""
        if flav is None or not calibrated.any():
            return np.empty(0, dtype=np.int64), []
        rows_by_code = [
            (code, np.flatnonzero(calibrated & (flav == code)))
            for code in self.bundle.flavour_codes
        ]
        rows = np.concatenate([r for _, r in rows_by_code])
        bounds = np.cumsum([0, *(r.size for _, r in rows_by_code)])
        slices = [
            (code, slice(int(bounds[i]), int(bounds[i + 1])))
            for i, (code, r) in enumerate(rows_by_code)
            if r.size
        ]
        return rows, slices

    def _flavours(self, columns: Mapping[str, Any], n: int) -> np.ndarray:
        if self.flavour_column not in columns:
            msg = (
                f"truth-flavour column {self.flavour_column!r} is missing from the MC jets "
                f"(available: {sorted(columns)[:40]}); pass is_data=True for data or set "
                f"flavour_column"
            )
            raise KeyError(msg)
        flav = np.asarray(columns[self.flavour_column])
        if flav.shape != (n,):
            msg = f"flavour column {self.flavour_column!r} has shape {flav.shape}, expected ({n},)"
            raise ValueError(msg)
        return flav.astype(np.int64)

    # ----------------------------------------------------------------- awkward API

    def calibrate_jets(
        self,
        jets: Any,
        is_data: bool = False,
        variations: Sequence[str] | None = None,
    ) -> Any:
        """Calibrate an awkward jet collection (flat ``n * {...}`` or jagged ``n * var * {...}``).

        Arguments:
            jets: records with the tagger, flavour and context fields (e.g. ``events.Jet``).
            is_data: data jets are never moved.
            variations: variation names (None: all).

        Returns:
            An awkward record array with the same jet structure and the output fields of
            the class docstring.
        """
        import awkward as ak

        jets = ak.Array(jets) if not isinstance(jets, ak.Array) else jets
        depth = jets.ndim
        if depth not in (1, 2):
            msg = f"calibrate_jets takes flat or jagged (events x jets) jets, got type {jets.type}"
            raise ValueError(msg)
        needed = self.data_columns if is_data else self.input_columns
        require_fields(jets.fields, needed)
        counts = None if depth == 1 else np.asarray(ak.to_numpy(ak.num(jets, axis=1)))
        cols = {}
        for c in dict.fromkeys(needed):
            leaf = jets[c] if counts is None else ak.flatten(jets[c], axis=1)
            cols[c] = np.asarray(ak.to_numpy(leaf))
        out = self.calibrate_columns(cols, is_data=is_data, variations=variations)
        return jet_record(out, counts)

    def __repr__(self) -> str:
        return (
            f"Calibrator(adapter={self.adapter.name!r}, flavours={self.bundle.flavour_codes}, "
            f"context={[v.name for v in self.bundle.context]}, variations={self.variations})"
        )


def _ilr_rows(probs: np.ndarray, rows: np.ndarray, basis: np.ndarray, eps: float) -> np.ndarray:
    r"""ILR of the selected rows, :math:`z = H \\log \\max(p, \\epsilon)` (Kim & Yang eq. 8).

    ``geometry.ilr`` also re-closes the floored vector before the log; the closure adds
    the same constant to every log-component, which :math:`H` (rows summing to zero)
    removes, so only float rounding differs. Class-major temporaries keep every pass
    contiguous. Returns ``(len(rows), D-1)``.
    """
    logp = np.maximum(probs[rows].T, eps)
    np.log(logp, out=logp)
    return (basis @ logp).T


def _ilr_inv_rows(z: np.ndarray, basis: np.ndarray) -> np.ndarray:
    r"""Inverse ILR, class-major: :math:`p = \\mathcal{C}(\\exp(H^\\top z - \\max))`, shape (D, n).

    The maths of ``geometry.ilr_inv`` (below Kim & Yang eq. 11) with the log-sum-exp
    replaced by a max shift and one division, in place on contiguous class rows.
    """
    y = basis.T @ z.T
    top = y.max(axis=0)
    y -= top
    np.exp(y, out=y)
    y /= y.sum(axis=0)
    return y


def _scatter(base: np.ndarray, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A copy of ``base`` with ``values`` at ``rows`` (no copy of ``base`` when every row moves)."""
    out = np.empty_like(base) if rows.size == base.size else base.copy()
    out[rows] = values
    return out


def open_bundle(
    bundle: Bundle | str | os.PathLike[str], kind: str, reader: str, dtype: type | str
) -> tuple[Bundle, np.dtype]:
    """Load a bundle (or take one), check its coordinates ``kind`` and the evaluation dtype."""
    loaded = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    loaded.require_coordinates(kind, reader)
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float64), np.dtype(np.float32)):
        msg = f"{reader} dtype must be float64 or float32, got {dt}"
        raise ValueError(msg)
    return loaded, dt


def require_fields(available: Sequence[str], needed: Sequence[str], what: str = "bundle") -> None:
    """Raise ``KeyError`` naming the jet fields in ``needed`` that ``available`` lacks."""
    missing = [c for c in dict.fromkeys(needed) if c not in available]
    if missing:
        more = "..." if len(missing) > 8 else ""
        msg = (
            f"jet fields {missing[:8]}{more} needed by the {what} are missing; available: "
            f"{sorted(available)[:60]}"
        )
        raise KeyError(msg)


def jet_record(fields: Mapping[str, Any], counts: np.ndarray | None = None) -> Any:
    """Build an awkward jet record from flat numpy columns without broadcasting.

    Arguments:
        fields: ``{name: (n,) array or nested mapping}`` (nested mappings become records,
            e.g. ``OTCAL_<v>.up.<col>``), every leaf of the same length n.
        counts: jets per event for a jagged ``events * var * {...}`` result; None for flat.

    Returns:
        The awkward array, built directly from its layout (``RecordArray`` of
        ``NumpyArray`` inside one ``ListOffsetArray``): no ``ak.zip`` / ``ak.unflatten``.
    """
    import awkward as ak

    record = _record_layout(fields)
    if counts is None:
        return ak.Array(record)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    if offsets[-1] != record.length:
        msg = f"counts add up to {int(offsets[-1])} jets, the columns hold {record.length}"
        raise ValueError(msg)
    return ak.Array(ak.contents.ListOffsetArray(ak.index.Index64(offsets), record))


def _record_layout(fields: Mapping[str, Any]) -> Any:
    import awkward as ak

    contents = [
        _record_layout(v) if isinstance(v, Mapping) else ak.contents.NumpyArray(np.asarray(v))
        for v in fields.values()
    ]
    length = min((c.length for c in contents), default=0)
    if any(c.length != length for c in contents):
        msg = f"record fields have different lengths: {[c.length for c in contents]}"
        raise ValueError(msg)
    return ak.contents.RecordArray(contents, list(fields), length=length)


@functools.lru_cache(maxsize=4)
def _calibrator_from_json(text: str, dtype: str, flavour_column: str) -> Calibrator:
    """Rebuild a pickled Calibrator; cached so a worker parses each bundle once per process."""
    return Calibrator(Bundle.from_json(text), dtype=dtype, flavour_column=flavour_column)
