r"""Apply a latent bundle: move MC tagger latents by their flavour's map (numpy + awkward, no torch).

Horizontal calibration of a tagger latent (Algren et al. 2025, eq. 6): an MC jet of truth
flavour :math:`f` with latent :math:`z` (Jet fields ``latent_0 ... latent_{d-1}``, the
bundle's ``coordinates.columns``) gets :math:`z' = T_f(z)`, the exported Brenier map of
:mod:`coffea_otcal.latent_calib`; pushing :math:`z'` through the frozen tagger head gives
the calibrated outputs. Data jets, jets of flavours without a map and jets with a
non-finite latent are returned unchanged (bit for bit) and flagged in ``otcal_status``
with the codes of :mod:`coffea_otcal.applier`.
"""

from __future__ import annotations

__all__ = ["LatentCalibrator"]

import functools
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from coffea_otcal.adapters import get_adapter
from coffea_otcal.applier import (
    STATUS_CALIBRATED,
    STATUS_DATA,
    STATUS_INVALID_SCORE,
    STATUS_NO_MAP,
    open_bundle,
    require_fields,
    status_counts,
)
from coffea_otcal.bundle import Bundle
from coffea_otcal.kernels import FittedMap

logger = logging.getLogger(__name__)

#: A frozen tagger head: latents ``(n, d)`` -> probabilities ``(n, D)`` in bundle class order.
Head = Callable[[np.ndarray], np.ndarray]


class LatentCalibrator:
    r"""Apply the maps of a latent bundle (``coordinates.kind == "latent"``).

    Output fields of :meth:`calibrate_columns` / :meth:`calibrate_jets`: ``<col>_otcal``
    for each latent column (e.g. ``latent_0_otcal``), ``otcal_status`` and, when a
    ``head`` is given, ``p_<class>_otcal`` (head probabilities of the calibrated latent)
    and the tagger's own columns ``<tagger column>_otcal`` written by the bundle's adapter.
    The calibrator pickles as its bundle JSON (the head is passed per call), so it
    travels to dask workers.

    Arguments:
        bundle: a latent :class:`~coffea_otcal.bundle.Bundle` or a path to one.
        dtype: precision of the potential evaluation (float64 or float32).
        flavour_column: override the bundle's truth-flavour field.

    Raises:
        ValueError: the bundle's maps act in ILR coordinates (use ``applier.Calibrator``).

    Example:
        >>> cal = LatentCalibrator("latent_bundle.json.gz")  # doctest: +SKIP
        >>> out = cal.calibrate_jets(events.Jet, head=latent_head(config))  # doctest: +SKIP
        >>> out.latent_0_otcal, out.btagDeepFlavB_otcal  # doctest: +SKIP
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        *,
        dtype: type | str = np.float64,
        flavour_column: str | None = None,
    ) -> None:
        self.bundle, self.dtype = open_bundle(bundle, "latent", "LatentCalibrator", dtype)
        self.flavour_column = flavour_column or self.bundle.flavour_column
        spec = self.bundle.adapter
        self.adapter = get_adapter(spec.name, **spec.options)
        self._maps: dict[int, FittedMap] = {}

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (
            _latent_calibrator_from_json,
            (self.bundle.to_json(), self.dtype.name, self.flavour_column),
        )

    @property
    def columns(self) -> tuple[str, ...]:
        """The latent Jet fields, in coordinate order."""
        return tuple(self.bundle.coordinates.columns or ())

    @property
    def dim(self) -> int:
        """The latent dimension."""
        return len(self.columns)

    @property
    def data_columns(self) -> tuple[str, ...]:
        """Every Jet field a data jet needs (the latent columns)."""
        return self.columns

    @property
    def input_columns(self) -> tuple[str, ...]:
        """Every Jet field an MC calibration reads (latent columns and the flavour)."""
        return (*self.columns, self.flavour_column)

    def fitted_map(self, flavour: int) -> FittedMap:
        """The numpy evaluator of a flavour's nominal map (built once, then cached)."""
        code = int(flavour)
        if code not in self._maps:
            self._maps[code] = FittedMap(self.bundle.get_map(code), dtype=self.dtype.type)
        return self._maps[code]

    # ----------------------------------------------------------------- array API

    def calibrate_latent(
        self, latent: Any, flavour: Any = None, is_data: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Move MC latents ``(n, d)`` by the map of their truth flavour ``(n,)``.

        Arguments:
            latent: ``(n, d)`` latents in the bundle's column order.
            flavour: ``(n,)`` truth flavour codes (ignored for data).
            is_data: data latents are never moved.

        Returns:
            ``(calibrated (n, d) float64, otcal_status (n,) int8)``.
        """
        z = np.asarray(latent, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] != self.dim:
            msg = (
                f"latent must have shape (n, {self.dim}) for the bundle's columns "
                f"{self.columns[0]}..{self.columns[-1]}, got {z.shape}"
            )
            raise ValueError(msg)
        n = len(z)
        out = z.copy()
        if is_data:
            return out, np.full(n, STATUS_DATA, dtype=np.int8)
        if flavour is None:
            msg = f"MC latents need their truth flavour ({self.flavour_column!r}); pass is_data=True for data"
            raise ValueError(msg)
        flav = np.asarray(flavour).astype(np.int64)
        if flav.shape != (n,):
            msg = f"flavour has shape {flav.shape}, expected ({n},)"
            raise ValueError(msg)
        status = np.full(n, STATUS_NO_MAP, dtype=np.int8)
        finite = np.isfinite(z).all(axis=1)
        for code in self.bundle.flavour_codes:
            sel = (flav == code) & finite
            if sel.any():
                out[sel] = self.fitted_map(code).transport(z[sel])
            status[sel] = STATUS_CALIBRATED
        status[~finite] = STATUS_INVALID_SCORE
        return out, status

    def calibrate_columns(
        self, columns: Mapping[str, Any], is_data: bool = False, head: Head | None = None
    ) -> dict[str, np.ndarray]:
        """Calibrate flat per-jet columns ``{field: (n,) array}``; see the class docstring.

        Arguments:
            columns: the latent fields (and the flavour field for MC).
            is_data: data jets are never moved.
            head: optional frozen head ``z -> probabilities`` (class order of the bundle).

        Returns:
            ``{"<latent col>_otcal": ..., "otcal_status": ..., ["p_<class>_otcal", "<col>_otcal"]}``.
        """
        needed = self.data_columns if is_data else self.input_columns
        missing = [c for c in needed if c not in columns]
        if missing:
            msg = (
                f"jet fields {missing[:8]}{'...' if len(missing) > 8 else ''} needed by the latent "
                f"bundle are missing; available: {sorted(columns)[:40]}"
            )
            raise KeyError(msg)
        z = np.stack([np.asarray(columns[c], dtype=np.float64) for c in self.columns], axis=1)
        flav = None if is_data else np.asarray(columns[self.flavour_column])
        cal, status = self.calibrate_latent(z, flav, is_data=is_data)
        out: dict[str, np.ndarray] = {}
        for i, c in enumerate(self.columns):
            # float64 output; unchanged jets keep their stored (e.g. float32) values exactly
            out[f"{c}_otcal"] = np.where(status == STATUS_CALIBRATED, cal[:, i], z[:, i])
        out["otcal_status"] = status
        if head is not None:
            probs = np.asarray(head(cal), dtype=np.float64)
            if probs.shape != (len(cal), len(self.bundle.classes)):
                msg = (
                    f"head returned shape {probs.shape}, expected ({len(cal)}, "
                    f"{len(self.bundle.classes)}) for classes {self.bundle.classes}"
                )
                raise ValueError(msg)
            for k, name in enumerate(self.bundle.classes):
                out[f"p_{name}_otcal"] = probs[:, k]
            for name, values in self.adapter.from_simplex(probs).items():
                out[f"{name}_otcal"] = np.asarray(values)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("latent calibration of %d jets: %s", len(cal), status_counts(status))
        return out

    # ----------------------------------------------------------------- awkward API

    def calibrate_jets(self, jets: Any, is_data: bool = False, head: Head | None = None) -> Any:
        """Calibrate an awkward jet collection (flat ``n * {...}`` or jagged ``n * var * {...}``).

        Arguments:
            jets: records with the latent fields and, for MC, the flavour (``events.Jet``).
            is_data: data jets are never moved.
            head: optional frozen head for the calibrated outputs.

        Returns:
            An awkward record array with the jet structure of ``jets`` and the output fields.
        """
        import awkward as ak

        jets = jets if isinstance(jets, ak.Array) else ak.Array(jets)
        if jets.ndim not in (1, 2) or not jets.fields:
            msg = f"calibrate_jets takes flat or jagged (events x jets) records, got {jets.type}"
            raise ValueError(msg)
        needed = self.data_columns if is_data else self.input_columns
        require_fields(jets.fields, needed, "latent bundle")
        counts = ak.num(jets, axis=1) if jets.ndim == 2 else None
        cols = {}
        for c in needed:
            leaf = jets[c] if counts is None else ak.flatten(jets[c], axis=1)
            cols[c] = np.asarray(ak.to_numpy(leaf))
        out = self.calibrate_columns(cols, is_data=is_data, head=head)
        record = ak.zip(out, depth_limit=1)
        return record if counts is None else ak.unflatten(record, counts, axis=0)

    def __repr__(self) -> str:
        return (
            f"LatentCalibrator(dim={self.dim}, flavours={self.bundle.flavour_codes}, "
            f"adapter={self.adapter.name!r})"
        )


@functools.lru_cache(maxsize=4)
def _latent_calibrator_from_json(text: str, dtype: str, flavour_column: str) -> LatentCalibrator:
    """Rebuild a pickled LatentCalibrator (cached: a worker parses each bundle once)."""
    return LatentCalibrator(Bundle.from_json(text), dtype=dtype, flavour_column=flavour_column)
