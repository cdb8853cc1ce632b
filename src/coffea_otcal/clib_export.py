r"""correctionlib export: a native binned + interpolated approximation of the calibration map.

correctionlib has no interpolation option and every correction returns one real number, so
the calibrated ILR coordinates (Kim & Yang eq. 7-8, :math:`z = H \log p`) are exported as
``D - 1`` corrections ``otcal_<tagger>_z1 ... otcal_<tagger>_z<D-1>``. Each one follows the
CMS BTV ``deepJet_shape`` layout analysts know::

    Category(systematic: "central", "up_<name>", "down_<name>")
      -> Category(flavor: 5 / 4 / 0)
        -> MultiBinning(pt, abseta, ..., z1, ..., z<D-1>)      flow = "clamp"
          -> FormulaRef(index=0, parameters=c)                  one leaf per bin

The leaf holds the multilinear interpolant of the exact map :math:`T_f(z \mid \kappa)` in
the ILR cell (bilinear for D = 3),

.. math::

    \tilde T_k(z) = \sum_{e \in \{0,1\}^{d}} c_{k,e} \prod_{i : e_i = 1} z_i,
    \qquad d = D - 1,

whose coefficients reproduce :math:`T_k` exactly at the :math:`2^d` cell corners, so the
export is continuous in :math:`z` and its error is :math:`O(h^2\,|\partial^2 T|)` for an
ILR cell width :math:`h`. The expression is stored once in ``generic_formulas`` (as BTV does
for its shape SFs) and each bin carries only its :math:`2^d` parameters. The kinematic
inputs are piecewise constant: the map is evaluated at each kinematic bin's centre
(geometric centre for axes with ``log_center``); outside the kinematic edges the edge bin is
used. Optionally one kinematic axis (``ExportGrid.interpolate``, e.g. pt) becomes a further
multilinear variable of the leaf, clamped to its edges with ``max``/``min`` in the edge bins
(as the applier clamps its context). Outside the ILR grid the edge cell's polynomial is
extrapolated linearly (``clamp`` selects the edge cell, the formula sees the raw input).

Flavours the bundle does not calibrate evaluate to the identity (a plain ``Formula``
returning the input coordinate); an unknown flavour or systematic is a correctionlib error,
as in the BTV files. Invalid jets (tagger defaults) must be passed through by the caller.
"""

from __future__ import annotations

__all__ = [
    "ExportGrid",
    "ExportMetadata",
    "KinematicAxis",
    "MapFunction",
    "build_correction_set",
    "correction_names",
    "load_evaluator",
    "multilinear_expression",
    "systematic_keys",
    "write_correction_set",
]

import gzip
import itertools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import correctionlib
import correctionlib.schemav2 as cs
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm.auto import tqdm

from coffea_otcal import geometry
from coffea_otcal.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

#: ``map_fn(z (n, d), context (n, k), flavour code, systematic key) -> calibrated z (n, d)``;
#: the systematic key is the correctionlib one (``central``, ``up_<name>``, ``down_<name>``).
MapFunction = Callable[[np.ndarray, np.ndarray, int, str], np.ndarray]

#: TFormula names of the first four formula variables (correctionlib supports no more).
_TFORMULA_VARIABLES = ("x", "y", "z", "t")

#: default jet-pT edges in GeV (BTV-like, log spaced), and |eta| edges (tracker acceptance).
DEFAULT_PT_EDGES = (20.0, 30.0, 50.0, 70.0, 100.0, 140.0, 200.0, 300.0, 500.0, 1000.0)
DEFAULT_ABSETA_EDGES = (0.0, 1.25, 2.5)
#: ILR range of every axis when neither the grid nor a bundle gives one.
DEFAULT_ILR_RANGE = (-8.0, 8.0)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KinematicAxis(_Model):
    """A kinematic input of the export: piecewise constant, or linear if interpolated."""

    name: str = Field(description="correction input name, e.g. 'pt' or 'abseta'")
    edges: list[float] = Field(description="bin edges, strictly increasing, at least 2")
    log_center: bool = Field(
        default=False,
        description="evaluate the map at the geometric (not arithmetic) bin centre",
    )
    description: str = Field(default="", description="shown as the input's description")

    @field_validator("edges")
    @classmethod
    def _check_edges(cls, edges: list[float]) -> list[float]:
        arr = np.asarray(edges, dtype=np.float64)
        if arr.size < 2 or not np.all(np.isfinite(arr)) or np.any(np.diff(arr) <= 0):
            msg = f"kinematic edges must be >= 2 finite, strictly increasing values, got {edges}"
            raise ValueError(msg)
        return [float(e) for e in arr]

    @model_validator(mode="after")
    def _check_log(self) -> KinematicAxis:
        if self.log_center and self.edges[0] <= 0:
            msg = f"axis {self.name!r}: log_center needs positive edges, got {self.edges[0]}"
            raise ValueError(msg)
        return self

    def centers(self) -> np.ndarray:
        """The points at which the map is evaluated, one per bin."""
        e = np.asarray(self.edges)
        return np.sqrt(e[:-1] * e[1:]) if self.log_center else 0.5 * (e[:-1] + e[1:])


def _default_kinematics() -> list[KinematicAxis]:
    return [
        KinematicAxis(name="pt", edges=list(DEFAULT_PT_EDGES), log_center=True,
                      description="jet transverse momentum [GeV]"),
        KinematicAxis(name="abseta", edges=list(DEFAULT_ABSETA_EDGES),
                      description="absolute jet pseudorapidity"),
    ]


class ExportGrid(_Model):
    """The user-selectable grid of the export (see ``docs/correctionlib.md``).

    ``None`` fields are resolved by the caller: :func:`coffea_otcal.export_cli.export_bundle`
    takes them from the bundle (context validity ranges, map standardisation), and
    :func:`build_correction_set` falls back to :data:`DEFAULT_ILR_RANGE` and pt / abseta.

    Example:
        >>> grid = ExportGrid(ilr_bins=16, ilr_range=(-6.0, 6.0))
        >>> grid.ilr_nodes(2)[0][:3].tolist()
        [-6.0, -5.25, -4.5]
    """

    ilr_bins: int = Field(default=20, ge=1, le=400, description="uniform bins per ILR axis")
    ilr_range: tuple[float, float] | list[tuple[float, float]] | None = Field(
        default=None,
        description="(low, high) for every ILR axis, or one (low, high) per axis",
    )
    kinematics: list[KinematicAxis] | None = Field(
        default=None,
        description="kinematic inputs in correction order (after systematic and flavor)",
    )
    kinematic_bins: dict[str, int] = Field(
        default_factory=dict,
        description="bins of a kinematic axis derived from a bundle context range, by name",
    )
    interpolate: list[str] = Field(
        default_factory=list,
        description="at most one kinematic axis (e.g. 'pt') interpolated linearly, not binned",
    )
    max_leaves: int = Field(
        default=2_000_000, ge=1, description="refuse grids with more FormulaRef leaves"
    )

    @field_validator("ilr_range")
    @classmethod
    def _check_range(cls, value: Any) -> Any:
        pairs = [] if value is None else [value] if isinstance(value, tuple) else value
        for lo, hi in pairs:
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                msg = f"ilr_range needs finite low < high, got ({lo}, {hi})"
                raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _check_interpolate(self) -> ExportGrid:
        # with kinematics=None the names are checked once a bundle has resolved the axes
        names = [a.name for a in self.axes()]
        unknown = self.kinematics is not None and any(n not in names for n in self.interpolate)
        if len(self.interpolate) > 1 or unknown:
            msg = (
                f"interpolate takes at most one kinematic axis out of {names}, got "
                f"{self.interpolate}"
            )
            raise ValueError(msg)
        return self

    def axes(self) -> list[KinematicAxis]:
        """The kinematic axes (default: pt and abseta, :data:`DEFAULT_PT_EDGES`)."""
        return _default_kinematics() if self.kinematics is None else list(self.kinematics)

    def ilr_ranges(self, n_ilr: int) -> list[tuple[float, float]]:
        """One ``(low, high)`` per ILR coordinate."""
        if self.ilr_range is None:
            return [DEFAULT_ILR_RANGE] * n_ilr
        if isinstance(self.ilr_range, tuple):
            return [self.ilr_range] * n_ilr
        if len(self.ilr_range) != n_ilr:
            msg = (
                f"ilr_range lists {len(self.ilr_range)} ranges but the map has {n_ilr} ILR "
                f"coordinates; give one (low, high) per coordinate or a single pair"
            )
            raise ValueError(msg)
        return list(self.ilr_range)

    def ilr_nodes(self, n_ilr: int) -> list[np.ndarray]:
        """The ``ilr_bins + 1`` node positions of every ILR axis."""
        return [np.linspace(lo, hi, self.ilr_bins + 1) for lo, hi in self.ilr_ranges(n_ilr)]

    def n_leaves(self, n_ilr: int) -> int:
        """FormulaRef leaves per (correction, systematic, flavour)."""
        kin = int(np.prod([len(a.edges) - 1 for a in self.axes()]))
        return kin * self.ilr_bins**n_ilr


class ExportMetadata(_Model):
    """Provenance written into the descriptions: points to the exact bundle."""

    tagger: str = Field(description="tagger adapter name, used in the correction names")
    classes: list[str] = Field(description="class order of the simplex, e.g. b, c, light")
    columns: list[str] = Field(default_factory=list, description="the tagger's Jet columns")
    bundle_file: str = Field(default="", description="file name of the bundle")
    bundle_sha256: str = Field(default="", description="integrity hash of the bundle")
    bundle_schema_version: str = Field(default="", description="bundle schema version")
    package_version: str = Field(default="", description="coffea-otcal version that wrote it")
    eps: float = Field(default=geometry.DEFAULT_EPS, description="ILR clipping floor")

    def text(self) -> str:
        """One line naming the bundle, its hash, versions, classes and clipping."""
        return (
            f"coffea-otcal {self.package_version or '?'} OT calibration of tagger "
            f"{self.tagger!r} (classes {', '.join(self.classes)}; columns "
            f"{', '.join(self.columns) or 'n/a'}); bundle {self.bundle_file or '?'} "
            f"integrity.digest(sha256)={self.bundle_sha256 or '?'} "
            f"schema={self.bundle_schema_version or '?'}; "
            f"ILR z = H log(max(p, {self.eps:g})) with the Helmert basis (Kim & Yang eq. 8)"
        )


# --------------------------------------------------------------------------- naming


def systematic_keys(variations: Sequence[str]) -> list[str]:
    """BTV systematic keys: ``central`` then ``up_<name>``, ``down_<name>`` per variation.

    Example:
        >>> systematic_keys(["frac_b"])
        ['central', 'up_frac_b', 'down_frac_b']
    """
    keys = ["central"]
    for name in variations:
        if not name or any(ch.isspace() for ch in name):
            msg = f"variation name {name!r} must be non-empty and contain no whitespace"
            raise ValueError(msg)
        keys += [f"up_{name}", f"down_{name}"]
    if len(set(keys)) != len(keys):
        msg = f"duplicate variation names in {list(variations)}"
        raise ValueError(msg)
    return keys


def correction_names(tagger: str, n_ilr: int) -> list[str]:
    """Names ``otcal_<tagger>_z1 .. otcal_<tagger>_z<d>`` of the exported corrections."""
    return [f"otcal_{tagger}_z{i + 1}" for i in range(n_ilr)]


def multilinear_expression(n_vars: int, names: Sequence[str] | None = None) -> str:
    r"""TFormula of the multilinear polynomial in nested (Horner) form.

    Parameter ``[j]`` multiplies the monomial whose exponents are the j-th entry of
    ``itertools.product((0, 1), repeat=n_vars)`` (C order). The nesting
    :math:`P(x_1, \dots) = P_0(x_2, \dots) + x_1 P_1(x_2, \dots)` needs
    :math:`2 (2^n - 1)` operations instead of :math:`n 2^{n-1} + 2^n - 1` and evaluates
    each variable once per level. ``names`` replaces the TFormula variables
    ``x, y, z, t`` (e.g. by ``max(x,[8])``).

    Example:
        >>> multilinear_expression(2)
        '[0]+y*[1]+x*([2]+y*[3])'
    """
    if not 1 <= n_vars <= len(_TFORMULA_VARIABLES):
        msg = (
            f"correctionlib formulas take at most {len(_TFORMULA_VARIABLES)} variables; the "
            f"export interpolates {n_vars} (ILR coordinates plus interpolated kinematics). Use "
            f"D <= 5 classes and interpolate fewer kinematic axes"
        )
        raise ValueError(msg)
    symbols = list(names) if names is not None else list(_TFORMULA_VARIABLES[:n_vars])
    if len(symbols) != n_vars:
        msg = f"need {n_vars} variable names, got {symbols}"
        raise ValueError(msg)

    def nested(variables: Sequence[str], offset: int) -> str:
        if not variables:
            return f"[{offset}]"
        rest = variables[1:]
        high = nested(rest, offset + 2 ** len(rest))
        high = high if not rest else f"({high})"
        return f"{nested(rest, offset)}+{variables[0]}*{high}"

    return nested(symbols, 0)


# --------------------------------------------------------------------------- building


def _multilinear_coefficients(
    values: np.ndarray, axes: Sequence[tuple[int, np.ndarray]]
) -> np.ndarray:
    """Monomial coefficients of the per-cell multilinear interpolant.

    Arguments:
        values: map values on the nodes of a tensor grid.
        axes: ``(array axis, node positions)`` of the m interpolated axes; the other axes
            are carried along (piecewise-constant bins).

    Returns:
        ``values`` with every interpolated axis shortened by one (nodes -> cells) and a
        trailing axis of ``2**m`` monomial coefficients (C order of the exponents). In a
        cell :math:`[a, b]` the linear interpolant :math:`(V_0 (b - x) + V_1 (x - a)) / h`
        is :math:`c_0 + c_1 x` with :math:`c_0 = (V_0 b - V_1 a)/h`,
        :math:`c_1 = (V_1 - V_0)/h`, applied axis by axis (tensor product).
    """
    ndim = values.ndim
    out = values
    for ax, x in axes:
        lo = np.take(out, np.arange(len(x) - 1), axis=ax)
        hi = np.take(out, np.arange(1, len(x)), axis=ax)
        shape = [1] * out.ndim
        shape[ax] = len(x) - 1
        a = x[:-1].reshape(shape)
        b = x[1:].reshape(shape)
        h = b - a
        out = np.stack([(lo * b - hi * a) / h, (hi - lo) / h], axis=-1)
    return out.reshape((*out.shape[:ndim], 2 ** len(axes)))


def _edges(values: Sequence[float] | np.ndarray) -> list[float] | cs.UniformBinning:
    """Uniform edges become a ``UniformBinning`` (a faster lookup than a bisection)."""
    arr = np.asarray(values, dtype=np.float64)
    step = np.diff(arr)
    if np.allclose(step, step[0], rtol=1e-12, atol=0.0):
        return cs.UniformBinning(n=len(arr) - 1, low=float(arr[0]), high=float(arr[-1]))
    return [float(v) for v in arr]


def _evaluation_points(
    grid: ExportGrid, n_ilr: int
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Context and ILR points of the tensor grid, and the points of each axis.

    A piecewise-constant kinematic axis contributes its bin centres, an interpolated one
    its edges, an ILR axis its nodes.
    """
    points = [np.asarray(a.edges) if a.name in grid.interpolate else a.centers()
              for a in grid.axes()]
    points += grid.ilr_nodes(n_ilr)
    mesh = np.meshgrid(*points, indexing="ij")
    flat = [m.reshape(-1) for m in mesh]
    k = len(points) - n_ilr
    context = np.stack(flat[:k], axis=-1) if k else np.zeros((flat[0].size, 0))
    return context, np.stack(flat[k:], axis=-1), points


def _formulas(grid: ExportGrid, ilr_names: Sequence[str]) -> list[cs.Formula]:
    """The generic formulas of a correction.

    Index 0 serves every bin; with an interpolated kinematic axis (TFormula ``x``) index 1
    serves its lowest bin (``max(x,lo)``), 2 its highest (``min(x,hi)``) and 3 a single
    bin (both), so the axis is clamped to its edges as the applier clamps its context.
    """
    interp = [a.name for a in grid.axes() if a.name in grid.interpolate]
    variables = [*interp, *ilr_names]
    n = len(variables)
    symbols = list(_TFORMULA_VARIABLES[:n])
    variants = [symbols]
    if interp:
        m = 2**n
        variants += [[f"max(x,[{m}])", *symbols[1:]], [f"min(x,[{m}])", *symbols[1:]],
                     [f"min(max(x,[{m}]),[{m + 1}])", *symbols[1:]]]
    return [cs.Formula(nodetype="formula", expression=multilinear_expression(n, v),
                       parser="TFormula", variables=variables) for v in variants]


def _leaf_rows(grid: ExportGrid, coefs: np.ndarray) -> tuple[np.ndarray, list[list[float]]]:
    """Formula index and parameters of every leaf (C order of the MultiBinning)."""
    rows = coefs.reshape(-1, coefs.shape[-1]).tolist()
    index = np.zeros(coefs.shape[:-1], dtype=np.int64)
    for ax, axis in enumerate(grid.axes()):
        if axis.name not in grid.interpolate:
            continue
        bins = np.arange(coefs.shape[ax]).reshape([-1 if i == ax else 1
                                                   for i in range(index.ndim)])
        index = index + np.where(bins == 0, 1, 0) + np.where(bins == coefs.shape[ax] - 1, 2, 0)
        lo, hi = axis.edges[0], axis.edges[-1]
        for row, code in zip(rows, index.reshape(-1).tolist(), strict=True):
            row.extend({0: [], 1: [lo], 2: [hi], 3: [lo, hi]}[code])
    return index.reshape(-1), rows


def build_correction_set(
    map_fn: MapFunction,
    *,
    n_classes: int,
    flavours: Sequence[int],
    variations: Sequence[str] = (),
    grid: ExportGrid | None = None,
    metadata: ExportMetadata,
    identity_flavours: Sequence[int] = (),
    progress: bool = False,
) -> cs.CorrectionSet:
    """Tabulate ``map_fn`` on the grid and build the validated ``CorrectionSet``.

    Arguments:
        map_fn: the exact map (see :data:`MapFunction`), called once per flavour and
            systematic with every (kinematic bin centre, ILR node) point.
        n_classes: D, the number of tagger classes (D - 1 ILR coordinates, D <= 5).
        flavours: truth flavour codes with a map (e.g. 5, 4, 0).
        variations: variation names; each gives ``up_<name>`` and ``down_<name>``.
        grid: the export grid (default :class:`ExportGrid`).
        metadata: provenance written into every description.
        identity_flavours: flavour codes that evaluate to the identity (not calibrated).
        progress: show a progress bar over flavours x systematics.

    Returns:
        The correctionlib ``CorrectionSet`` (pydantic-validated), one correction per ILR
        component, named by :func:`correction_names`.
    """
    grid = grid or ExportGrid()
    if any(n not in [a.name for a in grid.axes()] for n in grid.interpolate):
        grid = ExportGrid.model_validate({**dict(grid), "kinematics": grid.axes()})
    n_ilr = n_classes - 1
    ilr_names = [f"z{i + 1}" for i in range(n_ilr)]
    formulas = _formulas(grid, ilr_names)
    overlap = set(flavours) & set(identity_flavours)
    if overlap or not flavours:
        msg = f"flavours {list(flavours)} must be non-empty and disjoint from identity {overlap}"
        raise ValueError(msg)
    keys = systematic_keys(variations)
    total = grid.n_leaves(n_ilr) * len(keys) * len(flavours) * n_ilr
    if total > grid.max_leaves:
        msg = (
            f"the grid needs {total} FormulaRef leaves ({grid.n_leaves(n_ilr)} per correction, "
            f"systematic and flavour), above max_leaves={grid.max_leaves}; use fewer ilr_bins "
            f"or kinematic bins, or raise max_leaves"
        )
        raise ValueError(msg)
    context, z_nodes, points = _evaluation_points(grid, n_ilr)
    axes = grid.axes()
    interp_axes = [(1 + i, points[i]) for i, a in enumerate(axes) if a.name in grid.interpolate]
    interp_axes += [(1 + len(axes) + i, points[len(axes) + i]) for i in range(n_ilr)]
    edges = [_edges(a.edges) for a in axes] + [_edges(x) for x in points[len(axes):]]
    inputs = [a.name for a in axes] + ilr_names
    # leaves[component][systematic][flavour] -> MultiBinning
    leaves: list[dict[str, dict[int, Any]]] = [{k: {} for k in keys} for _ in range(n_ilr)]
    jobs = list(itertools.product(keys, flavours))
    for key, flav in tqdm(jobs, disable=not progress, desc="correctionlib export"):
        mapped = np.asarray(map_fn(z_nodes, context, int(flav), key), dtype=np.float64)
        if mapped.shape != z_nodes.shape or not np.all(np.isfinite(mapped)):
            msg = (
                f"map for flavour {flav}, systematic {key!r} returned shape {mapped.shape} "
                f"(expected {z_nodes.shape}) or non-finite values on the export grid"
            )
            raise ValueError(msg)
        values = np.moveaxis(mapped.reshape((*(len(x) for x in points), n_ilr)), -1, 0)
        coefs = _multilinear_coefficients(values, interp_axes)
        for comp in range(n_ilr):
            index, rows = _leaf_rows(grid, coefs[comp])
            # one validate call per node: pydantic-core checks every leaf without a Python
            # constructor per FormulaRef (the slow part of a large export)
            leaves[comp][key][flav] = cs.MultiBinning.model_validate({
                "nodetype": "multibinning", "inputs": inputs, "edges": edges, "flow": "clamp",
                "content": [{"nodetype": "formularef", "index": i, "parameters": row}
                            for i, row in zip(index.tolist(), rows, strict=True)],
            })
    corrections = [
        _correction(comp, leaves[comp], keys, identity_flavours, grid, metadata, formulas,
                    ilr_names)
        for comp in range(n_ilr)
    ]
    text = metadata.text()
    return cs.CorrectionSet(
        schema_version=2,
        description=(
            f"{text}. Corrections {', '.join(c.name for c in corrections)} return the "
            f"calibrated ILR coordinates; systematics: {', '.join(keys)}."
        ),
        corrections=corrections,
    )


def _correction(
    comp: int,
    leaves: Mapping[str, Mapping[int, Any]],
    keys: Sequence[str],
    identity_flavours: Sequence[int],
    grid: ExportGrid,
    metadata: ExportMetadata,
    formulas: list[cs.Formula],
    ilr_names: Sequence[str],
) -> cs.Correction:
    identity = cs.Formula(nodetype="formula", expression="x", parser="TFormula",
                          variables=[ilr_names[comp]])
    data = cs.Category(
        nodetype="category",
        input="systematic",
        content=[
            cs.CategoryItem(
                key=key,
                value=cs.Category(
                    nodetype="category",
                    input="flavor",
                    content=[cs.CategoryItem(key=int(f), value=node)
                             for f, node in leaves[key].items()]
                    + [cs.CategoryItem(key=int(f), value=identity) for f in identity_flavours],
                ),
            )
            for key in keys
        ],
    )
    ranges = grid.ilr_ranges(len(ilr_names))
    inputs = [
        cs.Variable(name="systematic", type="string",
                    description=f"one of {', '.join(keys)}"),
        cs.Variable(name="flavor", type="int",
                    description="truth hadron flavour (5 b, 4 c, 0 light); identity for "
                    f"{sorted(identity_flavours) or 'none'}"),
        *[cs.Variable(name=a.name, type="real",
                      description=a.description or f"kinematic input {a.name}")
          for a in grid.axes()],
        *[cs.Variable(name=n, type="real",
                      description=f"ILR coordinate {n} of the uncalibrated simplex point; "
                      f"grid {ranges[i][0]:g}..{ranges[i][1]:g}, linear extrapolation outside")
          for i, n in enumerate(ilr_names)],
    ]
    return cs.Correction(
        name=correction_names(metadata.tagger, len(ilr_names))[comp],
        description=(
            f"Calibrated ILR coordinate {ilr_names[comp]} (output) of {metadata.text()}. "
            f"Multilinear interpolation in the ILR cell ({grid.ilr_bins} bins per axis)"
            f"{''.join(f' and in {n} (clamped to its edges)' for n in grid.interpolate)}, "
            f"piecewise constant in "
            f"{', '.join(a.name for a in grid.axes() if a.name not in grid.interpolate) or 'nothing'}."
        ),
        version=1,
        inputs=inputs,
        output=cs.Variable(name=f"{ilr_names[comp]}_calibrated", type="real",
                           description=f"calibrated ILR coordinate {ilr_names[comp]}"),
        generic_formulas=formulas,
        data=data,
    )


# --------------------------------------------------------------------------- I/O


def write_correction_set(cset: cs.CorrectionSet, path: str | os.PathLike[str]) -> Path:
    """Validate with correctionlib's evaluator and write JSON atomically (gzip for ``.gz``).

    Arguments:
        cset: the correction set.
        path: output file; a name ending in ``.gz`` is gzip-compressed.

    Returns:
        The written path.
    """
    out = Path(path)
    text = cset.model_dump_json(exclude_unset=True)
    correctionlib.CorrectionSet.from_string(text)  # the C++ evaluator must accept it
    raw = text.encode()
    atomic_write_bytes(out, gzip.compress(raw, compresslevel=6, mtime=0)
                       if out.name.endswith(".gz") else raw)
    logger.info("wrote correctionlib export %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return out


def load_evaluator(source: str | os.PathLike[str] | cs.CorrectionSet) -> Any:
    """A correctionlib ``CorrectionSet`` evaluator from a file, or from the model itself."""
    if isinstance(source, cs.CorrectionSet):
        return correctionlib.CorrectionSet.from_string(source.model_dump_json(exclude_unset=True))
    path = Path(source)
    if not path.is_file():
        msg = f"correctionlib file {path} does not exist; write it with `coffea-otcal export`"
        raise FileNotFoundError(msg)
    return correctionlib.CorrectionSet.from_file(str(path))
