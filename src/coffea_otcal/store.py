"""The versioned parquet control-region store: per-jet arrays the trainers read.

One parquet file holds every stored jet of every (region, dataset) pair as one row. The
columns and the JSON metadata (key ``coffea_otcal.store`` of the parquet schema) are
documented in ``docs/store.md``; :data:`schema_version` is written into every file and a
reader refuses files with a newer or unknown version, with missing columns, or with
metadata it does not understand.

Per-jet columns (``D`` classes, ``k`` kinematic columns, ``L`` latent dimensions):

* ``region``, ``dataset``, ``file`` (dictionary-encoded strings), ``entry`` (event number
  in the file), ``jet_index`` (position of the jet in the event's collection);
* ``is_data``, ``valid`` (False: the tagger did not evaluate the jet), ``flavour`` (truth
  code, -1 for data), ``weight`` (event weight times the dataset scale), ``rand`` (a
  uniform number in [0, 1) fixed by the fill seed and the jet's identity, for splits);
* ``p_<class>`` simplex probabilities in class order (the uniform point 1/D on flagged
  jets), ``raw_<column>`` the tagger's own columns exactly as read, ``kin_<name>``
  kinematics, ``latent_<i>`` latent coordinates.

Example:
    >>> store = load_store("cr.parquet")                        # doctest: +SKIP
    >>> z = store.ilr(region="b_enriched", is_data=True)        # doctest: +SKIP
    >>> p_b = store.probs(is_data=False, flavour="b")           # doctest: +SKIP
"""

from __future__ import annotations

__all__ = [
    "JET_FIELDS",
    "METADATA_KEY",
    "BadFile",
    "ControlRegionStore",
    "Cutflow",
    "DatasetInfo",
    "RegionInfo",
    "StoreMetadata",
    "StoreSelection",
    "load_store",
    "schema_version",
    "write_store",
    "writer_info",
]

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coffea_otcal import geometry
from coffea_otcal.atomic import atomic_path
from coffea_otcal.versions import package_versions

#: Version of the store layout written by this module (``docs/store.md``).
schema_version = 1

#: Key of the JSON metadata in the parquet schema metadata.
METADATA_KEY = b"coffea_otcal.store"

#: Per-(region, dataset) array fields produced by the control-region processor, with the
#: number of dimensions of each (1: one value per jet; 2: one row per jet).
JET_FIELDS: dict[str, int] = {
    "file": 1,
    "entry": 1,
    "jet_index": 1,
    "valid": 1,
    "flavour": 1,
    "weight": 1,
    "rand": 1,
    "probs": 2,
    "raw": 2,
    "kin": 2,
    "latent": 2,
}

_SCALAR_TYPES: dict[str, pa.DataType] = {
    "entry": pa.int64(),
    "jet_index": pa.int32(),
    "is_data": pa.bool_(),
    "valid": pa.bool_(),
    "flavour": pa.int32(),
    "weight": pa.float64(),
    "rand": pa.float64(),
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegionInfo(_Model):
    """How a control region was defined."""

    datasets: list[str] = Field(description="datasets whose jets fill the region")
    selection: str | None = Field(
        default=None, description="jet selection: the expression text or the callable's name"
    )


class DatasetInfo(_Model):
    """Provenance of one dataset."""

    is_data: bool = Field(description="collision data (True) or simulation (False)")
    files: list[str] = Field(description="input files as given in the fill configuration")
    tree: str = Field(default="Events", description="name of the event tree")
    weight: str | None = Field(description="event-weight branch (MC), or None for unit weights")
    scale: float = Field(default=1.0, description="per-dataset factor (e.g. xsec * lumi / sumw)")


class Cutflow(_Model):
    """Jet counts of one (region, dataset) pair: nothing is dropped silently."""

    events: int = Field(default=0, description="events read")
    sum_event_weights: float = Field(default=0.0, description="sum of event weights read")
    jets: int = Field(default=0, description="jets in the events read")
    jets_preselected: int = Field(default=0, description="jets passing the kinematic preselection")
    jets_selected: int = Field(default=0, description="jets passing the region selection: stored")
    jets_flagged: int = Field(default=0, description="stored jets the tagger did not evaluate")
    flavours: dict[str, int] = Field(
        default_factory=dict, description="stored jets per truth class name ('other': unmapped)"
    )


class BadFile(_Model):
    """A file that was skipped (``skip_bad_files``), with the reason."""

    dataset: str
    file: str
    reason: str


class StoreMetadata(_Model):
    """The JSON metadata of a control-region store (``docs/store.md``)."""

    schema_version: Literal[1] = Field(default=1, description="store layout version")
    classes: list[str] = Field(description="class names in simplex order, e.g. b, c, light")
    adapter: dict[str, Any] = Field(description="tagger adapter {name, options}")
    raw_columns: list[str] = Field(description="the tagger's own Jet columns, as read")
    kinematics: list[str] = Field(description="kinematic Jet columns, in kin_* order")
    latent_dim: int = Field(default=0, ge=0, description="number of latent_* columns")
    flavour_column: str = Field(description="truth-flavour Jet column of MC")
    flavour_codes: dict[str, int] = Field(description="class name -> truth code, e.g. b: 5")
    regions: dict[str, RegionInfo]
    datasets: dict[str, DatasetInfo]
    preselection: dict[str, float | None] = Field(default_factory=dict)
    cutflow: dict[str, dict[str, Cutflow]] = Field(description="region -> dataset -> counts")
    bad_files: list[BadFile] = Field(default_factory=list)
    seed: int = Field(default=0, description="seed of the per-jet rand column")
    writer_info: dict[str, str] = Field(default_factory=dict)


def writer_info() -> dict[str, str]:
    """Versions of the packages that wrote a file (recorded in every store)."""
    return package_versions("coffea", "uproot", "awkward", "pyarrow", "numpy")


def _column_names(meta: StoreMetadata) -> dict[str, list[str]]:
    return {
        "probs": [f"p_{c}" for c in meta.classes],
        "raw": [f"raw_{c}" for c in meta.raw_columns],
        "kin": [f"kin_{k}" for k in meta.kinematics],
        "latent": [f"latent_{i}" for i in range(meta.latent_dim)],
    }


def _required_columns(meta: StoreMetadata) -> list[str]:
    names = ["region", "dataset", "file", *_SCALAR_TYPES]
    for group in _column_names(meta).values():
        names.extend(group)
    return names


def _region_table(
    region: str,
    dataset: str,
    is_data: bool,
    arrays: Mapping[str, np.ndarray],
    meta: StoreMetadata,
) -> pa.Table:
    n = len(arrays["valid"])
    groups = _column_names(meta)
    cols: dict[str, pa.Array] = {
        "region": pa.array(np.full(n, region, dtype=object), pa.string()),
        "dataset": pa.array(np.full(n, dataset, dtype=object), pa.string()),
        "file": pa.array(np.asarray(arrays["file"], dtype=object), pa.string()),
        "is_data": pa.array(np.full(n, is_data), pa.bool_()),
    }
    for name, typ in _SCALAR_TYPES.items():
        if name != "is_data":
            cols[name] = pa.array(np.asarray(arrays[name]), typ)
    for group, names in groups.items():
        block = np.asarray(arrays[group], dtype=np.float64).reshape(n, len(names))
        for i, name in enumerate(names):
            cols[name] = pa.array(block[:, i], pa.float64())
    return pa.table(cols)


def write_store(
    path: str | os.PathLike[str],
    jets: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
    metadata: StoreMetadata,
) -> Path:
    """Write the control-region store atomically (temporary file, then ``os.replace``).

    Arguments:
        path: the parquet file to write (parent folders are created).
        jets: region -> dataset -> field -> array with the fields of :data:`JET_FIELDS`
            (``probs (n, D)``, ``raw (n, C)``, ``kin (n, k)``, ``latent (n, L)``, the rest
            ``(n,)``), as the control-region processor returns them.
        metadata: the store metadata; its region / dataset / class lists must match
            ``jets``.

    Returns:
        The written path.
    """
    path = Path(path)
    tables = []
    for region, per_dataset in jets.items():
        if region not in metadata.regions:
            msg = f"region {region!r} has jets but is not in the store metadata {sorted(metadata.regions)}"
            raise ValueError(msg)
        for dataset, arrays in per_dataset.items():
            missing = sorted(set(JET_FIELDS) - set(arrays))
            if missing:
                msg = f"jets of ({region!r}, {dataset!r}) lack the fields {missing}"
                raise ValueError(msg)
            info = metadata.datasets[dataset]
            tables.append(_region_table(region, dataset, info.is_data, arrays, metadata))
    if tables:
        table = pa.concat_tables(tables)
    else:
        table = pa.schema(
            [pa.field(n, pa.string()) for n in ("region", "dataset", "file")]
            + [pa.field(n, t) for n, t in _SCALAR_TYPES.items()]
            + [pa.field(n, pa.float64()) for g in _column_names(metadata).values() for n in g]
        ).empty_table()
    table = table.replace_schema_metadata({METADATA_KEY: metadata.model_dump_json().encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, use_dictionary=["region", "dataset", "file"])
    return path


def _read_metadata(path: Path, schema: pa.Schema) -> StoreMetadata:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        msg = (
            f"{path} is not a coffea-otcal control-region store: its parquet metadata has no "
            f"{METADATA_KEY.decode()!r} entry; write it with `coffea-otcal fill`"
        )
        raise ValueError(msg)
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as err:
        msg = f"{path}: the store metadata is not valid JSON ({err}); re-create the store"
        raise ValueError(msg) from None
    version = doc.get("schema_version") if isinstance(doc, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        msg = f"{path}: the store metadata has no integer schema_version (got {version!r})"
        raise ValueError(msg)
    if version > schema_version:
        msg = (
            f"{path} has store schema_version {version}, newer than the {schema_version} this "
            f"coffea-otcal understands; upgrade coffea-otcal"
        )
        raise ValueError(msg)
    if version != schema_version:
        msg = (
            f"{path} has unknown store schema_version {version}; this reader knows {schema_version}"
        )
        raise ValueError(msg)
    try:
        return StoreMetadata.model_validate(doc)
    except ValidationError as err:
        msg = f"{path}: the store metadata does not follow schema {schema_version}:\n{err}"
        raise ValueError(msg) from None


@dataclass(frozen=True)
class StoreSelection:
    """Arrays of the jets one selection of a :class:`ControlRegionStore` picks.

    Attributes:
        probs: ``(n, D)`` probabilities in class order.
        kin: ``(n, k)`` kinematics in ``kinematics`` order.
        latent: ``(n, L)`` latent coordinates (``L = 0`` when none were stored).
        raw: ``(n, C)`` the tagger's own columns.
        flavour, weight, valid, is_data, rand: ``(n,)`` per-jet values.
        region, dataset: ``(n,)`` string arrays.
    """

    probs: np.ndarray
    kin: np.ndarray
    latent: np.ndarray
    raw: np.ndarray
    flavour: np.ndarray
    weight: np.ndarray
    valid: np.ndarray
    is_data: np.ndarray
    rand: np.ndarray
    region: np.ndarray
    dataset: np.ndarray

    def __len__(self) -> int:
        return len(self.weight)

    def ilr(self, eps: float = geometry.DEFAULT_EPS) -> np.ndarray:
        """ILR coordinates ``z = H log p`` of the probabilities (Kim & Yang eq. 8)."""
        return np.asarray(geometry.ilr(self.probs, eps=eps)).reshape(len(self), -1)


class ControlRegionStore:
    """A loaded control-region store (use :func:`load_store`).

    Every accessor takes the same selection keywords:

    Arguments:
        region: a region name or a sequence of names (default: all).
        dataset: a dataset name or a sequence of names (default: all).
        is_data: True for data jets, False for MC jets, None for both.
        flavour: a class name (``"b"``), a truth code (5) or a sequence of them (MC only).
        flagged: False (default) keeps jets the tagger evaluated, True keeps only the
            flagged ones, None keeps both.
    """

    def __init__(self, path: Path, metadata: StoreMetadata, table: pa.Table) -> None:
        self.path = path
        self.metadata = metadata
        self._table = table
        self._columns: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self._table.num_rows

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in simplex order."""
        return tuple(self.metadata.classes)

    @property
    def regions(self) -> tuple[str, ...]:
        """Region names."""
        return tuple(self.metadata.regions)

    @property
    def datasets(self) -> tuple[str, ...]:
        """Dataset names."""
        return tuple(self.metadata.datasets)

    @property
    def kinematics(self) -> tuple[str, ...]:
        """Kinematic column names, in ``kin`` order."""
        return tuple(self.metadata.kinematics)

    @property
    def cutflow(self) -> dict[str, dict[str, Cutflow]]:
        """Region -> dataset -> :class:`Cutflow` counts of the fill."""
        return self.metadata.cutflow

    def column(self, name: str) -> np.ndarray:
        """One parquet column as a numpy array (cached)."""
        if name not in self._columns:
            col = self._table.column(name)
            if pa.types.is_dictionary(col.type) or pa.types.is_string(col.type):
                self._columns[name] = np.asarray(col.to_pylist(), dtype=object)
            else:
                self._columns[name] = col.to_numpy()
        return self._columns[name]

    def _block(self, group: str, mask: np.ndarray) -> np.ndarray:
        names = _column_names(self.metadata)[group]
        if not names:
            return np.zeros((int(mask.sum()), 0))
        return np.stack([self.column(n)[mask] for n in names], axis=1)

    def _flavour_codes(self, flavour: str | int | Sequence[str | int]) -> list[int]:
        items = [flavour] if isinstance(flavour, (str, int)) else list(flavour)
        codes = []
        for item in items:
            if isinstance(item, str):
                if item not in self.metadata.flavour_codes:
                    msg = (
                        f"unknown flavour {item!r}; the store knows "
                        f"{self.metadata.flavour_codes} (class name -> truth code)"
                    )
                    raise ValueError(msg)
                codes.append(self.metadata.flavour_codes[item])
            else:
                codes.append(int(item))
        return codes

    def _names(self, value: str | Sequence[str], known: Sequence[str], what: str) -> list[str]:
        names = [value] if isinstance(value, str) else list(value)
        unknown = [n for n in names if n not in known]
        if unknown:
            msg = f"unknown {what} {unknown} in {self.path}; the store has {list(known)}"
            raise ValueError(msg)
        return names

    def mask(
        self,
        region: str | Sequence[str] | None = None,
        dataset: str | Sequence[str] | None = None,
        is_data: bool | None = None,
        flavour: str | int | Sequence[str | int] | None = None,
        flagged: bool | None = False,
    ) -> np.ndarray:
        """Boolean row mask of a selection (keywords as in the class docstring)."""
        mask = np.ones(len(self), dtype=bool)
        if region is not None:
            names = self._names(region, self.regions, "region")
            mask &= np.isin(self.column("region"), names)
        if dataset is not None:
            names = self._names(dataset, self.datasets, "dataset")
            mask &= np.isin(self.column("dataset"), names)
        if is_data is not None:
            mask &= self.column("is_data") == bool(is_data)
        if flavour is not None:
            mask &= np.isin(self.column("flavour"), self._flavour_codes(flavour))
        if flagged is not None:
            mask &= self.column("valid") != bool(flagged)
        return mask

    def select(self, **selection: Any) -> StoreSelection:
        """All arrays of a selection as a :class:`StoreSelection`."""
        m = self.mask(**selection)
        return StoreSelection(
            probs=self._block("probs", m),
            kin=self._block("kin", m),
            latent=self._block("latent", m),
            raw=self._block("raw", m),
            flavour=self.column("flavour")[m],
            weight=self.column("weight")[m],
            valid=self.column("valid")[m],
            is_data=self.column("is_data")[m],
            rand=self.column("rand")[m],
            region=self.column("region")[m],
            dataset=self.column("dataset")[m],
        )

    def probs(self, **selection: Any) -> np.ndarray:
        """``(n, D)`` simplex probabilities of the selected jets."""
        return self._block("probs", self.mask(**selection))

    def ilr(self, eps: float = geometry.DEFAULT_EPS, **selection: Any) -> np.ndarray:
        """``(n, D-1)`` ILR coordinates of the selected jets (Kim & Yang eq. 8)."""
        probs = self.probs(**selection)
        return np.asarray(geometry.ilr(probs, eps=eps)).reshape(len(probs), -1)

    def kin(self, names: Sequence[str] | None = None, **selection: Any) -> np.ndarray:
        """``(n, k)`` kinematics of the selected jets (all, or the given ``names``)."""
        m = self.mask(**selection)
        names = list(self.kinematics if names is None else names)
        self._names(names, self.kinematics, "kinematic column")
        if not names:
            return np.zeros((int(m.sum()), 0))
        return np.stack([self.column(f"kin_{n}")[m] for n in names], axis=1)

    def latent(self, **selection: Any) -> np.ndarray:
        """``(n, L)`` latent coordinates of the selected jets."""
        if self.metadata.latent_dim == 0:
            msg = f"{self.path} holds no latent columns; fill it with `latent` set"
            raise ValueError(msg)
        return self._block("latent", self.mask(**selection))

    def flavour(self, **selection: Any) -> np.ndarray:
        """Truth-flavour codes (-1 for data) of the selected jets."""
        return self.column("flavour")[self.mask(**selection)]

    def weight(self, **selection: Any) -> np.ndarray:
        """Event weights (times the dataset scale) of the selected jets."""
        return self.column("weight")[self.mask(**selection)]

    def valid(self, **selection: Any) -> np.ndarray:
        """Validity flags of the selected jets (pass ``flagged=None`` to see both)."""
        return self.column("valid")[self.mask(**selection)]


def load_store(path: str | os.PathLike[str]) -> ControlRegionStore:
    """Read a control-region store, refusing what this version does not understand.

    Arguments:
        path: a parquet file written by :func:`write_store`.

    Returns:
        The loaded :class:`ControlRegionStore`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not a store, unknown or newer ``schema_version``, invalid metadata,
            or missing columns; the message names the problem.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"control-region store {path} does not exist; write it with `coffea-otcal fill`"
        raise FileNotFoundError(msg)
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        msg = (
            f"{path} is not a readable parquet file ({err}); re-create it with `coffea-otcal fill`"
        )
        raise ValueError(msg) from None
    meta = _read_metadata(path, schema)
    missing = [n for n in _required_columns(meta) if n not in schema.names]
    if missing:
        msg = f"{path} lacks the store columns {missing} required by schema {schema_version}"
        raise ValueError(msg)
    table = pq.read_table(path)
    return ControlRegionStore(path, meta, table)
