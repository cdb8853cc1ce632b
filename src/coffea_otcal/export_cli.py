"""``coffea-otcal export``: write a bundle's correctionlib export and measure its accuracy."""

from __future__ import annotations

__all__ = [
    "AccuracyReport",
    "ExportResult",
    "add_arguments",
    "annotate_accuracy",
    "bundle_grid",
    "bundle_map_function",
    "bundle_metadata",
    "columns_from_ilr",
    "evaluate_export",
    "export_bundle",
    "ilr_from_columns",
    "measure_accuracy",
    "parse_grid",
    "run",
    "sample_validation_jets",
]

import argparse
import itertools
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import correctionlib.schemav2 as cs
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from coffea_otcal import geometry
from coffea_otcal.bundle import Bundle
from coffea_otcal.clib_export import (
    ExportGrid,
    ExportMetadata,
    KinematicAxis,
    MapFunction,
    build_correction_set,
    correction_names,
    load_evaluator,
    systematic_keys,
    write_correction_set,
)

logger = logging.getLogger(__name__)

#: default bins of a kinematic axis derived from a bundle context variable, by transform.
DEFAULT_CONTEXT_BINS = {"log": 8, "abs": 2, "identity": 2}
#: default ILR half-width in units of the maps' isotropic scale ``s`` around their shift.
ILR_RANGE_SCALES = 4.0
#: the NanoAOD hadronFlavour codes a BTV-style file answers for.
STANDARD_FLAVOURS = (5, 4, 0)


class AccuracyReport(BaseModel):
    """Export minus exact map on a set of jets (one entry per ILR component)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_jets: int = Field(description="number of jets compared")
    max_abs: list[float] = Field(description="max |z_export - z_exact| per ILR component")
    rms: list[float] = Field(description="RMS of z_export - z_exact per ILR component")
    max_abs_prob: float = Field(description="max |p_export - p_exact| over all classes")
    rms_prob: float = Field(description="RMS of p_export - p_exact over all classes")

    def text(self) -> str:
        """A compact one-line summary."""
        comps = ", ".join(
            f"z{i + 1}: max {m:.2e} rms {r:.2e}"
            for i, (m, r) in enumerate(zip(self.max_abs, self.rms, strict=True))
        )
        return (
            f"accuracy vs the exact map on {self.n_jets} held-out jets: {comps}; "
            f"probabilities: max {self.max_abs_prob:.2e} rms {self.rms_prob:.2e}"
        )


def annotate_accuracy(cset: cs.CorrectionSet, accuracy: AccuracyReport) -> cs.CorrectionSet:
    """A copy whose set and correction descriptions quote the measured accuracy."""
    note = f" {accuracy.text()}."
    corrections = [
        c.model_copy(update={"description": (c.description or "") + note})
        for c in cset.corrections
    ]
    return cset.model_copy(
        update={"description": (cset.description or "") + note, "corrections": corrections}
    )


def ilr_from_columns(
    adapter: Any, columns: Mapping[str, Any], eps: float = geometry.DEFAULT_EPS
) -> tuple[np.ndarray, np.ndarray]:
    """The export's score inputs: ``(z (n, D-1), valid (n,))`` from the tagger columns.

    ``z = H log(clip(p))`` (Kim & Yang eq. 8) with ``p`` from the adapter; invalid jets get
    the ILR of the uniform point (zero) and must be passed through by the caller.
    """
    probs, valid = adapter.to_simplex(columns)
    return np.asarray(geometry.ilr(probs, eps=eps)), valid


def columns_from_ilr(adapter: Any, z: np.ndarray) -> dict[str, np.ndarray]:
    """The tagger's own columns of calibrated ILR coordinates (``ilr_inv`` then adapter)."""
    return adapter.from_simplex(geometry.ilr_inv(np.asarray(z, dtype=np.float64)))


def evaluate_export(
    evaluator: Any,
    tagger: str,
    systematic: str,
    flavour: Any,
    kinematics: Sequence[Any],
    z: np.ndarray,
) -> np.ndarray:
    """Evaluate every ``otcal_<tagger>_z<k>`` correction: the calibrated ``z`` (n, d).

    Arguments:
        evaluator: a correctionlib ``CorrectionSet`` evaluator (:func:`load_evaluator`).
        tagger: the tagger name used in the correction names.
        systematic: ``central``, ``up_<name>`` or ``down_<name>``.
        flavour: truth flavour codes (int array or scalar).
        kinematics: the kinematic inputs in the correction's order (e.g. pt, abseta).
        z: uncalibrated ILR coordinates ``(n, d)``.
    """
    z = np.asarray(z, dtype=np.float64)
    names = correction_names(tagger, z.shape[-1])
    held = set(evaluator)  # `in` raises IndexError on correctionlib's CorrectionSet
    missing = [n for n in names if n not in held]
    if missing:
        msg = f"corrections {missing} not in the correctionlib file; it holds {list(evaluator)}"
        raise KeyError(msg)
    flav = np.asarray(flavour).astype(np.int64) if np.ndim(flavour) else int(flavour)
    args = [np.asarray(k, dtype=np.float64) for k in kinematics]
    cols = [np.ascontiguousarray(z[:, i]) for i in range(z.shape[-1])]
    return np.stack(
        [evaluator[n].evaluate(systematic, flav, *args, *cols) for n in names], axis=-1
    )


def sample_validation_jets(
    grid: ExportGrid, n_ilr: int, n_jets: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out points uniform inside the grid box: ``(z (n, d), context (n, k))``.

    Kinematic axes with ``log_center`` are sampled uniformly in the logarithm. None of the
    points is a grid node, so the comparison measures the interpolation error.
    """
    rng = np.random.default_rng(seed)
    kin = []
    for axis in grid.axes():
        lo, hi = axis.edges[0], axis.edges[-1]
        if axis.log_center:
            kin.append(np.exp(rng.uniform(np.log(lo), np.log(hi), n_jets)))
        else:
            kin.append(rng.uniform(lo, hi, n_jets))
    z = np.stack([rng.uniform(lo, hi, n_jets) for lo, hi in grid.ilr_ranges(n_ilr)], axis=-1)
    context = np.stack(kin, axis=-1) if kin else np.zeros((n_jets, 0))
    return z, context


def measure_accuracy(
    evaluator: Any,
    map_fn: MapFunction,
    *,
    tagger: str,
    z: np.ndarray,
    context: np.ndarray,
    flavours: Sequence[int],
    systematics: Sequence[str] = ("central",),
) -> AccuracyReport:
    """Compare the export with the exact map on given jets, for each flavour and systematic.

    Arguments:
        evaluator: correctionlib evaluator of the export.
        map_fn: the exact map.
        tagger: the tagger name in the correction names.
        z: uncalibrated ILR coordinates ``(n, d)`` (held-out jets).
        context: their kinematics ``(n, k)`` in the correction's kinematic order.
        flavours: flavour codes to compare (each jet is evaluated as every flavour).
        systematics: systematic keys to compare.
    """
    z = np.asarray(z, dtype=np.float64)
    context = np.asarray(context, dtype=np.float64)
    diffs, pdiffs = [], []
    for key, flav in itertools.product(systematics, flavours):
        exact = np.asarray(map_fn(z, context, int(flav), key), dtype=np.float64)
        approx = evaluate_export(evaluator, tagger, key, flav, list(context.T), z)
        diffs.append(approx - exact)
        pdiffs.append(np.asarray(geometry.ilr_inv(approx)) - np.asarray(geometry.ilr_inv(exact)))
    diff = np.concatenate(diffs)
    pdiff = np.concatenate(pdiffs)
    return AccuracyReport(
        n_jets=len(z),
        max_abs=np.abs(diff).max(axis=0).tolist(),
        rms=np.sqrt(np.mean(diff**2, axis=0)).tolist(),
        max_abs_prob=float(np.abs(pdiff).max()),
        rms_prob=float(np.sqrt(np.mean(pdiff**2))),
    )


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_bundle` produced.

    Attributes:
        correction_set: the correctionlib ``CorrectionSet`` model.
        path: the written file (None when no output was asked for).
        grid: the resolved grid.
        accuracy: export vs exact map on held-out jets (None if not measured).
    """

    correction_set: Any
    path: Path | None
    grid: ExportGrid
    accuracy: AccuracyReport | None


def _axis_name(column: str, transform: str) -> str:
    return f"abs{column}" if transform == "abs" else column


def bundle_grid(bundle: Bundle, grid: ExportGrid | None = None) -> ExportGrid:
    r"""Resolve the ``None`` fields of ``grid`` from the bundle.

    Kinematic axes follow ``bundle.context`` (one per variable, in order): the name is the
    Jet column (``abs<column>`` for an ``abs`` transform), the edges span the validity
    range ``[low, high]`` with :data:`DEFAULT_CONTEXT_BINS` bins (log-spaced for a ``log``
    transform; override per name with ``grid.kinematic_bins``). The ILR range is the union
    over all maps of :math:`m_i \pm 4 s` (the maps' standardisation, ``docs/ot.md``),
    capped at the clipping bound :math:`\sqrt2 \ln(1/\epsilon)`.
    """
    grid = grid or ExportGrid()
    update: dict[str, Any] = {}
    names = [_axis_name(v.column, v.transform) for v in bundle.context]
    unknown = sorted(set(grid.kinematic_bins) - set(names))
    if unknown:
        msg = f"kinematic_bins names {unknown} are not context axes of the bundle: {names}"
        raise ValueError(msg)
    if grid.kinematics is None:
        axes = []
        for var in bundle.context:
            name = _axis_name(var.column, var.transform)
            nbins = grid.kinematic_bins.get(name, DEFAULT_CONTEXT_BINS[var.transform])
            if var.transform == "log":
                edges = np.geomspace(var.low, var.high, nbins + 1)
            else:
                edges = np.linspace(var.low, var.high, nbins + 1)
            axes.append(KinematicAxis(
                name=name, edges=edges.tolist(), log_center=var.transform == "log",
                description=f"jet {var.column}" + (" (absolute value)" if var.transform == "abs"
                                                    else "") + f", valid {var.low:g}..{var.high:g}",
            ))
        update["kinematics"] = axes
    elif len(grid.kinematics) != len(bundle.context):
        msg = (
            f"the grid has {len(grid.kinematics)} kinematic axes but the bundle conditions on "
            f"{len(bundle.context)} context variables {[v.column for v in bundle.context]}; "
            f"give one axis per context variable, in order"
        )
        raise ValueError(msg)
    if grid.ilr_range is None:
        bound = math.sqrt(2.0) * math.log(1.0 / bundle.coordinates.eps)
        lo = np.full(bundle.dim, np.inf)
        hi = np.full(bundle.dim, -np.inf)
        for entry in bundle.maps:
            pre = entry.map.preprocessing
            shift = np.asarray(pre.shift)
            lo = np.minimum(lo, shift - ILR_RANGE_SCALES * pre.scale)
            hi = np.maximum(hi, shift + ILR_RANGE_SCALES * pre.scale)
        update["ilr_range"] = [
            (float(max(a, -bound)), float(min(b, bound))) for a, b in zip(lo, hi, strict=True)
        ]
    return ExportGrid.model_validate({**dict(grid), **update}) if update else grid


def bundle_map_function(bundle: Bundle) -> MapFunction:
    """The exact map of the bundle as a :data:`~coffea_otcal.clib_export.MapFunction`.

    It calls :meth:`coffea_otcal.applier.Calibrator.calibrate_ilr`, so the export tabulates
    exactly what the Python applier computes (context clamped to the validity range).
    Systematic keys map to bundle map names: ``central`` -> ``nominal``,
    ``up_<v>`` -> ``<v>_up``, ``down_<v>`` -> ``<v>_down``.
    """
    from coffea_otcal.applier import Calibrator

    calibrator = Calibrator(bundle)

    def map_fn(z: np.ndarray, context: np.ndarray, flavour: int, systematic: str) -> np.ndarray:
        if systematic == "central":
            name = "nominal"
        else:
            direction, _, variation = systematic.partition("_")
            name = f"{variation}_{direction}"
        ctx = context if bundle.context else None
        return calibrator.calibrate_ilr(z, flavour, ctx, name)

    return map_fn


def bundle_metadata(bundle: Bundle, bundle_file: str | os.PathLike[str] | None) -> ExportMetadata:
    """Provenance of the export: bundle file, integrity hash, versions, tagger."""
    from coffea_otcal import __version__
    from coffea_otcal.adapters import get_adapter

    adapter = get_adapter(bundle.adapter.name, **bundle.adapter.options)
    digest = bundle.integrity.digest if bundle.integrity else bundle.content_digest()
    return ExportMetadata(
        tagger=bundle.adapter.name,
        classes=list(bundle.classes),
        columns=list(adapter.columns),
        bundle_file=Path(bundle_file).name if bundle_file else "",
        bundle_sha256=digest,
        bundle_schema_version=str(bundle.schema_version),
        package_version=__version__,
        eps=bundle.coordinates.eps,
    )


def export_bundle(
    bundle: Bundle | str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    grid: ExportGrid | None = None,
    *,
    n_validation: int = 10_000,
    seed: int = 0,
    progress: bool = False,
) -> ExportResult:
    """Export a bundle to a correctionlib ``CorrectionSet`` and measure its accuracy.

    Arguments:
        bundle: a bundle or the path of one (its file name is recorded).
        output: JSON file to write (``.gz``: gzip); None to only build.
        grid: the export grid; ``None`` fields come from the bundle (:func:`bundle_grid`).
        n_validation: held-out jets, uniform inside the grid box, on which the export is
            compared with the exact map for every flavour and systematic (0: skip).
        seed: seed of the held-out jets.
        progress: show progress bars.

    Returns:
        An :class:`ExportResult`; the accuracy is also quoted in the file's descriptions.
    """
    path = None if isinstance(bundle, Bundle) else Path(bundle)
    bndl = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    resolved = bundle_grid(bndl, grid)
    map_fn = bundle_map_function(bndl)
    identity = [f for f in STANDARD_FLAVOURS if f not in bndl.flavour_codes]
    cset = build_correction_set(
        map_fn,
        n_classes=len(bndl.classes),
        flavours=bndl.flavour_codes,
        variations=bndl.variation_names,
        grid=resolved,
        metadata=bundle_metadata(bndl, path),
        identity_flavours=identity if bndl.flavour_column == "hadronFlavour" else [],
        progress=progress,
    )
    accuracy = None
    if n_validation > 0:
        z, ctx = sample_validation_jets(resolved, bndl.dim, n_validation, seed=seed)
        accuracy = measure_accuracy(
            load_evaluator(cset), map_fn, tagger=bndl.adapter.name, z=z, context=ctx,
            flavours=bndl.flavour_codes, systematics=systematic_keys(bndl.variation_names),
        )
        logger.info("%s", accuracy.text())
        cset = annotate_accuracy(cset, accuracy)
    written = write_correction_set(cset, output) if output is not None else None
    return ExportResult(correction_set=cset, path=written, grid=resolved, accuracy=accuracy)


# --------------------------------------------------------------------------- command line


def parse_grid(text: str | None) -> ExportGrid:
    """An :class:`ExportGrid` from a JSON file path or an inline JSON object (None: default)."""
    if not text:
        return ExportGrid()
    source = text
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            msg = f"--grid {text!r} is neither a JSON object nor an existing JSON file"
            raise FileNotFoundError(msg)
        source = path.read_text()
    try:
        raw = json.loads(source)
    except json.JSONDecodeError as err:
        msg = f"--grid {text!r} is not valid JSON ({err})"
        raise ValueError(msg) from None
    if isinstance(raw.get("ilr_range"), list) and raw["ilr_range"] and not isinstance(
        raw["ilr_range"][0], list
    ):
        raw["ilr_range"] = tuple(raw["ilr_range"])
    elif isinstance(raw.get("ilr_range"), list):
        raw["ilr_range"] = [tuple(pair) for pair in raw["ilr_range"]]
    return ExportGrid.model_validate(raw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``coffea-otcal export``."""
    parser.add_argument("bundle", help="bundle file (.json or .json.gz)")
    parser.add_argument("-o", "--output", required=True,
                        help="correctionlib JSON to write (.json or .json.gz)")
    parser.add_argument("--grid", default=None,
                        help='grid as a JSON file or inline JSON, e.g. \'{"ilr_bins": 24, '
                        '"ilr_range": [-8, 8], "kinematic_bins": {"pt": 10}}\' '
                        "(see docs/correctionlib.md)")
    parser.add_argument("--ilr-bins", type=int, default=None,
                        help="uniform bins per ILR axis (overrides --grid)")
    parser.add_argument("--ilr-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        default=None, help="ILR range of every axis (overrides --grid)")
    parser.add_argument("--interpolate", metavar="AXIS", default=None,
                        help="interpolate one kinematic axis (e.g. pt) linearly instead of "
                        "binning it (more accurate, ~1.4x slower to evaluate)")
    parser.add_argument("--validation-jets", type=int, default=10_000,
                        help="held-out jets for the accuracy measurement (0: skip)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out jets")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    """Run ``coffea-otcal export``: returns 0 on success."""
    grid = parse_grid(args.grid)
    update: dict[str, Any] = {}
    if args.ilr_bins is not None:
        update["ilr_bins"] = args.ilr_bins
    if args.ilr_range is not None:
        update["ilr_range"] = tuple(args.ilr_range)
    if args.interpolate is not None:
        update["interpolate"] = [args.interpolate]
    if update:
        grid = ExportGrid.model_validate({**grid.model_dump(exclude_unset=True), **update})
    result = export_bundle(
        args.bundle, args.output, grid, n_validation=args.validation_jets, seed=args.seed,
        progress=not args.no_progress,
    )
    names = ", ".join(c.name for c in result.correction_set.corrections)
    size = result.path.stat().st_size / 1e6 if result.path else 0.0
    sys.stdout.write(f"wrote {result.path} ({size:.1f} MB): {names}\n")
    if result.accuracy is not None:
        sys.stdout.write(result.accuracy.text() + "\n")
    return 0
