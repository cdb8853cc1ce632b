r"""Control-region processor: per-jet simplex probabilities, kinematics, truth and weights.

:class:`ControlRegionProcessor` is a :class:`coffea.processor.ProcessorABC`. For each
chunk of NanoEvents it reads the tagger columns of the jet collection, converts them to
probabilities on the simplex with a tagger adapter (:mod:`coffea_otcal.adapters`; e.g.
DeepJet :math:`p_b = B,\ p_c = \mathrm{CvL}(1-B),\ p_\ell = (1-\mathrm{CvL})(1-B)`),
reads kinematics, the truth flavour (MC; -1 for data), the event weight, optional latent
coordinates (``Jet_latent_0 .. L-1``), applies a kinematic preselection and the
selection of every region the dataset belongs to, and accumulates per-(region, dataset)
arrays plus a cutflow. These are the inputs of the EM target extraction (Kim & Yang 2026,
Sec. III: several control regions r with flavour compositions :math:`\pi_{r,f}`).

Nothing is dropped silently: jets the tagger did not evaluate (``valid`` False) are
stored with their flag, and the cutflow counts events, jets, preselected, selected and
flagged jets and stored jets per flavour. The output is the same whatever the executor
and chunking: chunks are keyed by ``(file, entrystart)`` and concatenated in sorted order,
and the per-jet ``rand`` column depends only on the seed and the jet's identity.

Region selections are a Python callable ``f(events, jets) -> jet mask`` or a string
expression on jet fields evaluated by :class:`SelectionExpression`, a whitelisted
evaluator (no ``eval``).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_FLAVOUR_CODES",
    "BadInputError",
    "ControlRegionProcessor",
    "ControlRegionSchema",
    "DatasetSpec",
    "JetChunks",
    "RegionSpec",
    "SelectionExpression",
    "jet_uniforms",
]

import ast
import io
import tokenize
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import awkward as ak
import numpy as np
from coffea import processor
from coffea.nanoevents import NanoAODSchema

from coffea_otcal.adapters import TaggerAdapter, get_adapter
from coffea_otcal.input_layout import InputLayout, LayoutError, layout_jets, read_event_path
from coffea_otcal.store import JET_FIELDS

#: Default class name -> NanoAOD ``hadronFlavour`` code.
DEFAULT_FLAVOUR_CODES: dict[str, int] = {"b": 5, "c": 4, "light": 0}

_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "abs": np.abs,
    "sqrt": np.sqrt,
    "log": np.log,
    "exp": np.exp,
    "minimum": np.minimum,
    "maximum": np.maximum,
    "isfinite": np.isfinite,
}
_BINARY: dict[type, Callable[..., Any]] = {
    ast.Add: np.add,
    ast.Sub: np.subtract,
    ast.Mult: np.multiply,
    ast.Div: np.true_divide,
    ast.Pow: np.power,
    ast.Mod: np.mod,
}
_COMPARE: dict[type, Callable[..., Any]] = {
    ast.Gt: np.greater,
    ast.GtE: np.greater_equal,
    ast.Lt: np.less,
    ast.LtE: np.less_equal,
    ast.Eq: np.equal,
    ast.NotEq: np.not_equal,
}
_LOGICAL = {"&": "and", "|": "or", "~": "not"}


class BadInputError(ValueError):
    """An input file lacks what the fill needs; the message names the file and branch."""


class ControlRegionSchema(NanoAODSchema):
    """NanoAOD schema for control-region fills (pass it to ``processor.Runner(schema=...)``).

    The fill reads only the jet collection and the event weight, so it does not require
    the event-ID branches (``run``, ``luminosityBlock``, ``event``) and does not warn
    about cross-reference targets (``Electron_jetIdx => Jet`` ...) absent from skimmed
    or generated files; any flat tree with ``nJet`` and ``Jet_*`` branches is accepted.
    A collection whose four-vector branches (``pt, eta, phi, mass``) are incomplete, as
    in toy files without ``Jet_mass``, is read as a plain ``NanoCollection`` (fields
    only) instead of failing on its Lorentz-vector behaviour.
    """

    warn_missing_crossrefs = False
    event_ids: list[str] = []  # noqa: RUF012  (class attribute of coffea's schema API)

    def __init__(self, base_form: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        fields = set(base_form.get("fields", ()))
        mixins = dict(self.mixins)
        for name, mixin in self.mixins.items():
            quartet = [f"{name}_{c}" for c in ("pt", "eta", "phi", "mass")]
            incomplete = any(q not in fields and q not in self.full_like_items for q in quartet)
            if f"n{name}" in fields and mixin != "NanoCollection" and incomplete:
                mixins[name] = "NanoCollection"
        self.mixins: dict[str, str] = mixins
        super().__init__(base_form, *args, **kwargs)


class SelectionExpression:
    """A jet selection written as text, e.g. ``"pt > 30 & abs(eta) < 2.5"``.

    Names are jet fields (NanoAOD ``Jet_<name>`` without the prefix). Allowed: numbers,
    ``+ - * / ** %``, comparisons (chained too), ``&``, ``|``, ``~`` (also ``and``, ``or``,
    ``not``; all element-wise and, as in ``pandas.eval``, binding more loosely than
    comparisons, so the example means ``(pt > 30) & (abs(eta) < 2.5)``), and the
    functions ``abs, sqrt, log, exp, minimum, maximum, isfinite``. Anything else is
    refused when the expression is built; nothing is passed to ``eval``.

    Arguments:
        text: the expression.

    Example:
        >>> sel = SelectionExpression("pt > 30 & abs(eta) < 2.5")
        >>> sorted(sel.names)
        ['eta', 'pt']
        >>> sel({"pt": np.array([20.0, 40, 50]), "eta": np.array([0.0, 1, 3])}).tolist()
        [False, True, False]
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self._tree = self._parse(text)
        self.names = frozenset(self._check(self._tree.body))

    def __repr__(self) -> str:
        return f"SelectionExpression({self.text!r})"

    def __getstate__(self) -> dict[str, str]:
        return {"text": self.text}

    def __setstate__(self, state: Mapping[str, str]) -> None:
        self.__init__(state["text"])  # type: ignore[misc]

    def _fail(self, what: str) -> ValueError:
        msg = (
            f"selection {self.text!r}: {what}; use jet field names, numbers, comparisons, "
            f"& | ~, + - * / ** % and the functions {sorted(_FUNCTIONS)}"
        )
        return ValueError(msg)

    def _parse(self, text: str) -> ast.Expression:
        try:
            tokens = []
            for tok in tokenize.generate_tokens(io.StringIO(text.strip()).readline):
                if tok.type == tokenize.OP and tok.string in _LOGICAL:
                    tokens.append((tokenize.NAME, _LOGICAL[tok.string]))
                else:
                    tokens.append((tok.type, tok.string))
            return ast.parse(tokenize.untokenize(tokens), mode="eval")
        except (SyntaxError, tokenize.TokenError) as err:
            what = f"not a valid expression ({err.msg if hasattr(err, 'msg') else err})"
            raise self._fail(what) from None

    def _check(self, node: ast.AST) -> set[str]:
        if isinstance(node, ast.BoolOp):
            return set().union(*(self._check(v) for v in node.values))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
            return self._check(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return self._check(node.left) | self._check(node.right)
        if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            return set().union(self._check(node.left), *(self._check(c) for c in node.comparators))
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS):
                what = f"calls only {sorted(_FUNCTIONS)}, got {ast.unparse(node.func)!r}"
                raise self._fail(what)
            if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
                what = "function calls take positional arguments only"
                raise self._fail(what)
            return set().union(*(self._check(a) for a in node.args))
        if isinstance(node, ast.Name):
            return {node.id}
        if isinstance(node, ast.Constant) and isinstance(node.value, (bool, int, float)):
            return set()
        what = f"{ast.unparse(node)!r} ({type(node).__name__}) is not allowed"
        raise self._fail(what)

    def _eval(self, node: ast.AST, env: Mapping[str, np.ndarray]) -> Any:
        if isinstance(node, ast.BoolOp):
            combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
            out = self._eval(node.values[0], env)
            for value in node.values[1:]:
                out = combine(out, self._eval(value, env))
            return out
        if isinstance(node, ast.UnaryOp):
            operand = self._eval(node.operand, env)
            if isinstance(node.op, ast.Not):
                return np.logical_not(operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](self._eval(node.left, env), self._eval(node.right, env))
        if isinstance(node, ast.Compare):
            left, out = self._eval(node.left, env), True
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                right = self._eval(comparator, env)
                out = np.logical_and(out, _COMPARE[type(op)](left, right))
                left = right
            return out
        if isinstance(node, ast.Call):
            func = node.func
            if not isinstance(func, ast.Name):  # refused by _check: unreachable
                what = f"calls only {sorted(_FUNCTIONS)}, got {ast.unparse(func)!r}"
                raise self._fail(what)
            return _FUNCTIONS[func.id](*(self._eval(a, env) for a in node.args))
        if isinstance(node, ast.Name):
            return env[node.id]
        return node.value  # type: ignore[attr-defined]

    def __call__(self, fields: Mapping[str, np.ndarray]) -> np.ndarray:
        """Evaluate on flat per-jet arrays; returns a boolean mask of their length."""
        missing = sorted(self.names - set(fields))
        if missing:
            msg = f"selection {self.text!r} needs the jet fields {missing}"
            raise KeyError(msg)
        n = len(next(iter(fields.values()))) if fields else 0
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.asarray(self._eval(self._tree.body, fields))
        if out.dtype != np.bool_:
            msg = (
                f"selection {self.text!r} gives {out.dtype} values, not booleans; add a comparison"
            )
            raise ValueError(msg)
        return np.broadcast_to(out, (n,)).copy()


JetSelectionFn = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class RegionSpec:
    """A control region: the datasets that fill it and an optional jet selection.

    Arguments:
        datasets: dataset names whose jets enter the region.
        selection: ``None`` (all jets), an expression string (:class:`SelectionExpression`)
            or a callable ``f(events, jets) -> jet mask`` (jagged like ``jets``).
    """

    datasets: tuple[str, ...]
    selection: str | JetSelectionFn | None = None

    @property
    def selection_label(self) -> str | None:
        """Text recorded in the store: the expression or the callable's qualified name."""
        if self.selection is None or isinstance(self.selection, str):
            return self.selection
        return getattr(self.selection, "__qualname__", repr(self.selection))


@dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset.

    Arguments:
        is_data: collision data (flavour -1, unit weights) or simulation.
        weight: event-weight branch for MC (e.g. ``genWeight``); ``None`` for unit weights.
        scale: per-dataset factor multiplying every weight (e.g. xsec * lumi / sumw).
    """

    is_data: bool = False
    weight: str | None = "genWeight"
    scale: float = 1.0


@dataclass
class JetChunks(processor.AccumulatorABC):
    """Per-(region, dataset) jet arrays of each processed chunk, keyed by (file, entrystart).

    Adding two of them merges their chunk dictionaries; :meth:`concatenate` joins the
    chunks in sorted key order, so the result does not depend on the order in which an
    executor delivered them.
    """

    chunks: dict[tuple[str, str], dict[tuple[str, int], dict[str, np.ndarray]]] = field(
        default_factory=dict
    )

    def identity(self) -> JetChunks:
        """An empty accumulator."""
        return JetChunks()

    def add(self, other: JetChunks) -> None:
        """Merge ``other`` into this one (a chunk seen twice is an error)."""
        for key, per_chunk in other.chunks.items():
            mine = self.chunks.setdefault(key, {})
            twice = set(mine) & set(per_chunk)
            if twice:
                msg = f"chunks {sorted(twice)} of {key} were processed twice"
                raise ValueError(msg)
            mine.update(per_chunk)

    def concatenate(self) -> dict[str, dict[str, dict[str, np.ndarray]]]:
        """Region -> dataset -> field -> array, chunks joined in sorted order."""
        out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        for (region, dataset), per_chunk in sorted(self.chunks.items()):
            parts = [per_chunk[k] for k in sorted(per_chunk)]
            out.setdefault(region, {})[dataset] = {
                name: np.concatenate([p[name] for p in parts]) for name in JET_FIELDS
            }
        return out


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (Steele et al. 2014)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def jet_uniforms(
    seed: int, dataset: str, filename: str, entry: np.ndarray, jet_index: np.ndarray
) -> np.ndarray:
    """Uniform numbers in [0, 1) fixed by (seed, dataset, file name, entry, jet index).

    Counter-based (hash) random numbers: the same jet gets the same number whatever the
    chunking or executor, so a split ``rand < f`` is reproducible for a seed.
    """
    key = zlib.crc32(f"{dataset}\0{PurePath(filename).name}".encode())
    n = len(entry)
    h = _mix64(np.full(n, (int(seed) & 0xFFFFFFFF) << 32 | key, dtype=np.uint64))
    h = _mix64(h ^ np.asarray(entry, dtype=np.uint64))
    h = _mix64(h ^ np.asarray(jet_index, dtype=np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


class ControlRegionProcessor(processor.ProcessorABC):
    """Fill per-(region, dataset) jet arrays for the control-region store.

    Arguments:
        adapter: a tagger adapter or its registry name (``deepjet``, ``upart``, ...).
        regions: region name -> :class:`RegionSpec` (or a mapping with ``datasets`` and
            ``selection``).
        datasets: dataset name -> :class:`DatasetSpec` (or a mapping of its fields).
        adapter_options: options of :func:`coffea_otcal.adapters.get_adapter`.
        flavour_column: the truth-flavour jet field of MC (``hadronFlavour``).
        flavour_codes: class name -> truth code, default ``b: 5, c: 4, light: 0``.
        jet_collection: the NanoEvents jet collection (``Jet``; PHYSLITE ``Jets``; for a
            flat ntuple the branch prefix without ``_``, e.g. ``jet``).
        layout: how jets and tagger columns are stored (:class:`InputLayout`: ``nanoaod``
            by default, ``physlite`` or ``flat``, field renames, a PHYSLITE b-tagging link);
            the runner must read the files with its ``schema_class``.
        kinematics: jet fields stored as ``kin_*`` (``pt, eta, phi`` and any extra).
        latent_dim: number of ``latent_<i>`` jet fields to store (0: none).
        pt_min, abs_eta_max: kinematic preselection applied before the region
            selections (``None``: no cut); counted in the cutflow.
        seed: seed of the per-jet ``rand`` column.

    The output of :meth:`process` is ``{"jets": JetChunks, "cutflow": {region: {dataset:
    counts}}}``; :meth:`postprocess` replaces ``jets`` by region -> dataset -> field ->
    array with the fields of :data:`coffea_otcal.store.JET_FIELDS`.

    Example:
        >>> proc = ControlRegionProcessor(
        ...     "deepjet", {"all": RegionSpec(("ttbar",))}, {"ttbar": DatasetSpec()})
        >>> proc.classes
        ('b', 'c', 'light')
    """

    def __init__(
        self,
        adapter: str | TaggerAdapter,
        regions: Mapping[str, RegionSpec | Mapping[str, Any]],
        datasets: Mapping[str, DatasetSpec | Mapping[str, Any]],
        *,
        adapter_options: Mapping[str, Any] | None = None,
        flavour_column: str = "hadronFlavour",
        flavour_codes: Mapping[str, int] | None = None,
        jet_collection: str = "Jet",
        layout: InputLayout | Mapping[str, Any] | None = None,
        kinematics: Sequence[str] = ("pt", "eta", "phi"),
        latent_dim: int = 0,
        pt_min: float | None = None,
        abs_eta_max: float | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(adapter, str):
            adapter = get_adapter(adapter, **dict(adapter_options or {}))
        self.adapter = adapter
        self.datasets = {
            k: v if isinstance(v, DatasetSpec) else DatasetSpec(**v) for k, v in datasets.items()
        }
        self.regions: dict[str, RegionSpec] = {}
        for name, spec in regions.items():
            if not isinstance(spec, RegionSpec):
                spec = RegionSpec(tuple(spec["datasets"]), spec.get("selection"))
            unknown = [d for d in spec.datasets if d not in self.datasets]
            if unknown:
                msg = f"region {name!r} names unknown datasets {unknown}; known: {sorted(self.datasets)}"
                raise ValueError(msg)
            self.regions[name] = spec
        self._expressions = {
            name: SelectionExpression(spec.selection)
            for name, spec in self.regions.items()
            if isinstance(spec.selection, str)
        }
        self.flavour_column = flavour_column
        self.flavour_codes = dict(flavour_codes or DEFAULT_FLAVOUR_CODES)
        self.jet_collection = jet_collection
        self.layout = (
            layout if isinstance(layout, InputLayout) else InputLayout.model_validate(layout or {})
        )
        self.kinematics = tuple(kinematics)
        self.latent_dim = int(latent_dim)
        self.pt_min = pt_min
        self.abs_eta_max = abs_eta_max
        self.seed = int(seed)

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in simplex order (from the adapter)."""
        return self.adapter.classes

    def regions_of(self, dataset: str) -> list[str]:
        """Names of the regions a dataset fills."""
        return [name for name, spec in self.regions.items() if dataset in spec.datasets]

    def _jet_names(self, dataset: str) -> list[str]:
        """Every jet field a chunk of ``dataset`` reads (coffea-otcal's names)."""
        names = [*self.adapter.read_columns, *self.kinematics]
        names += [f"latent_{i}" for i in range(self.latent_dim)]
        if not self.datasets[dataset].is_data:
            names.append(self.flavour_column)
        if self.pt_min is not None:
            names.append("pt")
        if self.abs_eta_max is not None:
            names.append("eta")
        for region in self.regions_of(dataset):
            if region in self._expressions:
                names += sorted(self._expressions[region].names)
        return list(dict.fromkeys(names))

    def _field(self, collection: Any, name: str, where: str, what: str) -> np.ndarray:
        fields = collection.fields
        if name not in fields:
            prefix = "" if what == "event" else f"{self.jet_collection}_"
            msg = (
                f"branch {prefix + name!r} ({what}) is missing in {where}; check the file or "
                f"the configuration (available {what} fields: {sorted(fields)[:30]} ...)"
            )
            raise BadInputError(msg)
        values = collection[name]
        if what == "jet":
            values = ak.flatten(values, axis=1)
        return np.asarray(ak.to_numpy(values))

    def _selection_mask(
        self, region: str, events: Any, jets: Any, flat: Mapping[str, np.ndarray], where: str
    ) -> np.ndarray:
        spec = self.regions[region]
        n = int(ak.sum(ak.num(jets, axis=1)))
        if spec.selection is None:
            return np.ones(n, dtype=bool)
        if isinstance(spec.selection, str):
            expr = self._expressions[region]
            env = {
                name: flat[name] if name in flat else self._field(jets, name, where, "jet")
                for name in expr.names
            }
            return expr(env) if env else expr({"_n": np.zeros(n)})
        # a callable sees the file's whole collection when the layout has one (NanoAOD,
        # PHYSLITE), as in any coffea processor; for a flat ntuple, the jets read
        whole = events[self.jet_collection] if self.jet_collection in events.fields else jets
        mask = spec.selection(events, whole)
        mask = np.asarray(
            ak.to_numpy(ak.flatten(mask, axis=1) if mask.ndim > 1 else mask), dtype=bool
        )
        if mask.shape != (n,):
            msg = f"selection {spec.selection_label} of region {region!r} gave {mask.shape} values for {n} jets in {where}"
            raise ValueError(msg)
        return mask

    def process(self, events: Any) -> dict[str, Any]:
        """Process one chunk of NanoEvents (see the class docstring for the output)."""
        meta = dict(events.metadata or {})
        dataset = meta.get("dataset")
        filename = str(meta.get("filename", ""))
        where = f"file {filename!r} (dataset {dataset!r})"
        if dataset not in self.datasets:
            msg = f"events of dataset {dataset!r} but the processor knows only {sorted(self.datasets)}"
            raise ValueError(msg)
        regions = self.regions_of(dataset)
        if not regions:
            msg = f"dataset {dataset!r} is in no region; add it to a region's datasets"
            raise ValueError(msg)
        spec = self.datasets[dataset]
        try:
            jets = layout_jets(
                events, self.layout, self.jet_collection, self._jet_names(dataset), where,
                tagger_columns=self.adapter.columns,
            )
        except LayoutError as err:
            raise BadInputError(str(err)) from err
        counts = np.asarray(ak.to_numpy(ak.num(jets, axis=1)), dtype=np.int64)
        n_jets = int(counts.sum())
        entrystart = int(meta.get("entrystart", 0))
        entry = np.repeat(entrystart + np.arange(len(counts), dtype=np.int64), counts)
        jet_index = (np.arange(n_jets) - np.repeat(np.cumsum(counts) - counts, counts)).astype(
            np.int32
        )

        raw = {c: self._field(jets, c, where, "jet") for c in self.adapter.read_columns}
        probs, valid = self.adapter.to_simplex(raw)
        kin = {k: self._field(jets, k, where, "jet").astype(np.float64) for k in self.kinematics}
        latent = (
            np.stack(
                [self._field(jets, f"latent_{i}", where, "jet") for i in range(self.latent_dim)],
                axis=1,
            ).astype(np.float64)
            if self.latent_dim
            else np.zeros((n_jets, 0))
        )
        if spec.is_data:
            flavour = np.full(n_jets, -1, dtype=np.int32)
        else:
            flavour = self._field(jets, self.flavour_column, where, "jet").astype(np.int32)
        if spec.is_data or spec.weight is None:
            event_weight = np.ones(len(counts))
        else:
            try:
                event_weight = read_event_path(events, spec.weight, where).astype(np.float64)
            except LayoutError as err:
                raise BadInputError(str(err)) from err
        event_weight = event_weight * spec.scale
        weight = np.repeat(event_weight, counts)

        pre = np.ones(n_jets, dtype=bool)
        if self.pt_min is not None:
            pt = kin["pt"] if "pt" in kin else self._field(jets, "pt", where, "jet")
            pre &= pt > self.pt_min
        if self.abs_eta_max is not None:
            eta = kin["eta"] if "eta" in kin else self._field(jets, "eta", where, "jet")
            pre &= np.abs(eta) < self.abs_eta_max
        rand = jet_uniforms(self.seed, dataset, filename, entry, jet_index)
        columns = {
            "file": np.full(n_jets, filename, dtype=object),
            "entry": entry,
            "jet_index": jet_index,
            "valid": valid,
            "flavour": flavour,
            "weight": weight,
            "rand": rand,
            "probs": probs,
            "raw": np.stack([raw[c].astype(np.float64) for c in self.adapter.columns], axis=1),
            "kin": np.stack([kin[k] for k in self.kinematics], axis=1)
            if kin
            else np.zeros((n_jets, 0)),
            "latent": latent,
        }
        code_names = {code: name for name, code in self.flavour_codes.items()}
        out_jets = JetChunks()
        cutflow: dict[str, dict[str, dict[str, Any]]] = {}
        for region in regions:
            mask = pre & self._selection_mask(region, events, jets, kin, where)
            out_jets.chunks[(region, dataset)] = {
                (filename, entrystart): {k: v[mask] for k, v in columns.items()}
            }
            flavours: dict[str, int] = {}
            if not spec.is_data:
                codes, numbers = np.unique(flavour[mask], return_counts=True)
                for code, number in zip(codes.tolist(), numbers.tolist(), strict=True):
                    name = code_names.get(code, "other")
                    flavours[name] = flavours.get(name, 0) + number
            cutflow[region] = {
                dataset: {
                    "events": len(counts),
                    "sum_event_weights": float(event_weight.sum()),
                    "jets": n_jets,
                    "jets_preselected": int(pre.sum()),
                    "jets_selected": int(mask.sum()),
                    "jets_flagged": int((mask & ~valid).sum()),
                    "flavours": flavours,
                }
            }
        return {"jets": out_jets, "cutflow": cutflow}

    def postprocess(self, accumulator: dict[str, Any]) -> dict[str, Any]:
        """Join the chunks in sorted order: ``jets`` becomes region -> dataset -> arrays."""
        jets = accumulator["jets"]
        if isinstance(jets, JetChunks):
            accumulator["jets"] = jets.concatenate()
        return accumulator
