"""Drop-in coffea processor that adds OT-calibrated tagger columns to ``events.Jet``.

Three ways to use a bundle inside coffea:

* one line in an existing processor::

      events = add_calibrated_columns(events, calibrator)   # events.Jet.btagDeepFlavB_otcal ...

* wrap an existing processor: ``CalibrationProcessor(bundle, inner=MyProcessor())`` calls
  :func:`add_calibrated_columns` and then ``MyProcessor.process(events)``;
* skim: ``CalibrationProcessor(bundle, output_dir=...)`` writes each chunk's events with
  the calibrated columns as a parquet or ROOT part file (written atomically) and returns
  counts (``coffea-otcal apply`` drives it).

The column convention (``docs/bundle.md``) mirrors coffea's jet corrections without
overwriting the original columns: nominal ``Jet.<col>_otcal`` and ``Jet.p_<class>_otcal``,
flags ``Jet.otcal_status`` / ``Jet.otcal_clamped``, variations ``Jet.OTCAL_<v>.up.<col>`` /
``.down.<col>``. ``replace_nominal=True`` opts in to coffea's ``pt``/``pt_orig`` pattern: the
calibrated nominal replaces ``<col>`` and the original moves to ``<col>_orig``.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_EVENT_FIELDS",
    "DEFAULT_JET_FIELDS",
    "PARQUET_OPTIONS",
    "CalibrationProcessor",
    "add_calibrated_columns",
    "skim_columns",
    "skim_record",
    "write_skim_part",
]

import os
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import awkward as ak
import numpy as np
from coffea.processor import ProcessorABC

from coffea_otcal.applier import Calibrator, status_counts
from coffea_otcal.atomic import atomic_path
from coffea_otcal.bundle import Bundle
from coffea_otcal.input_layout import InputLayout

#: event-level branches copied to skims (when present).
DEFAULT_EVENT_FIELDS = ("run", "luminosityBlock", "event")
#: Jet fields copied to skims besides the tagger, flavour and calibrated ones (when present).
DEFAULT_JET_FIELDS = ("pt", "eta", "phi", "mass")

SkimFormat = Literal["parquet", "root"]

#: ``ak.to_parquet`` options of skim parts. The calibrated float64 columns have random low
#: mantissa bits that zstd barely compresses: byte-stream-split + lz4 writes a calibrated
#: part in 0.6x the CPU time of awkward's default (zstd, extension types) at 3% fewer bytes
#: (a reference part: +6% bytes). Plain arrow types read back to the same awkward type.
PARQUET_OPTIONS: dict[str, Any] = {
    "extensionarray": False,
    "compression": "lz4",
    "parquet_byte_stream_split": True,
}


def _as_calibrator(bundle: Bundle | Calibrator | str | os.PathLike[str]) -> Calibrator:
    return bundle if isinstance(bundle, Calibrator) else Calibrator(bundle)


def _detect_is_data(
    events: Any, jet_fields: Collection[str], calibrator: Calibrator, data_datasets: Sequence[str] = ()
) -> bool:
    """Decide data/MC: listed dataset, else ``metadata["is_data"]``, else no flavour field."""
    metadata = getattr(events, "metadata", None) or {}
    if data_datasets and metadata.get("dataset") in data_datasets:
        return True
    if "is_data" in metadata:
        return bool(metadata["is_data"])
    return calibrator.flavour_column not in jet_fields


def _chunk_name(events: Any) -> str:
    """``events of 'FILE'`` for error messages."""
    metadata = dict(getattr(events, "metadata", None) or {})
    return f"events of {metadata.get('filename', 'this chunk')!r}"


def _layout_is_data(
    events: Any,
    layout: InputLayout,
    collection: str,
    calibrator: Calibrator,
    data_datasets: Sequence[str] = (),
) -> bool:
    """:func:`_detect_is_data` with the jet fields a layout provides (linked containers too)."""
    from coffea_otcal.input_layout import available_jet_fields

    return _detect_is_data(events, available_jet_fields(events, layout, collection), calibrator,
                           data_datasets)


def add_calibrated_columns(
    events: Any,
    bundle_or_calibrator: Bundle | Calibrator | str | os.PathLike[str],
    *,
    is_data: bool | None = None,
    collection: str | None = None,
    variations: Sequence[str] | None = None,
    replace_nominal: bool = False,
    layout: InputLayout | Mapping[str, Any] | None = None,
) -> Any:
    """Add the calibrated columns of a bundle to ``events[collection]`` (one line anywhere).

    Arguments:
        events: NanoEvents (eager or virtual) or any awkward array of events with a jagged
            jet collection.
        bundle_or_calibrator: a Calibrator (reuse it across chunks), a Bundle or a path.
        is_data: data jets are never moved; None reads ``events.metadata["is_data"]`` or,
            failing that, treats events without the flavour field as data.
        collection: the jet collection (default ``Jet``; with a ``layout``, its default:
            PHYSLITE ``Jets``, flat ``jet``).
        variations: variation names (None: all).
        replace_nominal: also write the calibrated nominal into ``<col>`` and keep the
            original in ``<col>_orig`` (coffea's ``pt`` / ``pt_orig`` pattern).
        layout: how the files store jets and tagger columns
            (:class:`coffea_otcal.input_layout.InputLayout`: the fill configuration's
            ``input``, e.g. ``{"format": "physlite", "btagging": {}}``); the bundle's
            field names are read through its renames and b-tagging link. For a ``flat``
            ntuple the outputs become per-event jagged fields ``<collection>_<field>``
            (``jet_GN2v01_pb_otcal``, ``jet_OTCAL_<v>``), like its input branches.

    Returns:
        The same events object with the new jet fields.
    """
    calibrator = _as_calibrator(bundle_or_calibrator)
    if layout is None:
        collection = collection or "Jet"
        jets = events[collection]
        if is_data is None:
            is_data = _detect_is_data(events, jets.fields, calibrator)
        out = calibrator.calibrate_jets(jets, is_data=is_data, variations=variations)
        originals = {c: jets[c] for c in calibrator.columns} if replace_nominal else {}
        for field in out.fields:
            events[collection, field] = out[field]
        for col, values in originals.items():
            events[collection, f"{col}_orig"] = values
            events[collection, col] = out[f"{col}_otcal"]
        return events
    from coffea_otcal.input_layout import default_collection, layout_jets

    layout = layout if isinstance(layout, InputLayout) else InputLayout.model_validate(layout)
    collection = collection or default_collection(layout)
    if is_data is None:
        is_data = _layout_is_data(events, layout, collection, calibrator)
    needed = calibrator.data_columns if is_data else calibrator.input_columns
    jets = layout_jets(
        events, layout, collection, needed, _chunk_name(events), calibrator.adapter.columns
    )
    out = calibrator.calibrate_jets(jets, is_data=is_data, variations=variations)

    def put(field: str, values: Any) -> None:
        target = layout.file_field(field) if field in calibrator.columns else field
        if layout.format == "flat":
            events[f"{collection}_{target}"] = values
        else:
            events[collection, target] = values

    if replace_nominal:
        for col in calibrator.columns:
            put(f"{layout.file_field(col)}_orig", jets[col])
            put(col, out[f"{col}_otcal"])
    for field in out.fields:
        put(field, out[field])
    return events


def _flatten_record(prefix: str, array: Any, out: dict[str, Any]) -> None:
    """Flatten nested record fields into ``a_b_c`` names (ROOT branches are flat)."""
    if array.fields:
        for field in array.fields:
            _flatten_record(f"{prefix}_{field}" if prefix else field, array[field], out)
    else:
        out[prefix] = array


def skim_record(
    events: Any,
    calibrator: Calibrator | None,
    *,
    collection: str = "Jet",
    jet_fields: Sequence[str] = DEFAULT_JET_FIELDS,
    event_fields: Sequence[str] = DEFAULT_EVENT_FIELDS,
    flat_names: bool = False,
    flavour_column: str = "hadronFlavour",
    tagger_columns: Sequence[str] = (),
    probabilities: bool = False,
) -> dict[str, Any]:
    """Select the skim's columns: event fields and one jet record (plain awkward arrays).

    Arguments:
        events: events after :func:`add_calibrated_columns` (or raw, for a reference skim).
        calibrator: gives the tagger and flavour columns; None uses ``tagger_columns``.
        collection: the jet collection.
        jet_fields: extra jet fields kept when present.
        event_fields: event-level fields kept when present.
        flat_names: flatten nested records (``OTCAL_v.up.col`` -> ``OTCAL_v_up_col``).
        flavour_column: flavour field kept when present (without a calibrator).
        tagger_columns: tagger fields kept (without a calibrator).
        probabilities: also keep the calibrated probabilities ``p_<class>_otcal`` and
            ``OTCAL_<v>.up/down.p_<class>`` (they follow from the tagger columns through the
            adapter; by default a skim keeps the tagger's own columns only).

    Returns:
        ``{event field: array, collection: jagged jet record}``.
    """
    jets = events[collection]
    if calibrator is not None:
        tagger_columns, flavour_column = calibrator.columns, calibrator.flavour_column
    base = [*jet_fields, flavour_column, *tagger_columns]
    calibrated = [
        f for f in jets.fields if f.endswith("_otcal") or f.startswith(("otcal_", "OTCAL_"))
    ]
    if not probabilities:  # only the applier's own p_<class>_otcal, never a user field
        calibrated = [f for f in calibrated if not _is_probability(f)]
    calibrated += [f"{c}_orig" for c in tagger_columns if f"{c}_orig" in jets.fields]
    keep = [f for f in dict.fromkeys([*base, *calibrated]) if f in jets.fields]
    fields: dict[str, Any] = {}
    for name in keep:
        value = ak.without_parameters(jets[name])
        if not probabilities and name.startswith("OTCAL_"):
            value = ak.zip(
                {
                    side: value[side][[f for f in value[side].fields if not _is_probability(f)]]
                    for side in value.fields
                },
                depth_limit=2,
            )
        if flat_names:
            _flatten_record(name, value, fields)
        else:
            fields[name] = value
    record = {f: ak.without_parameters(events[f]) for f in event_fields if f in events.fields}
    record[collection] = ak.zip(fields, depth_limit=2)
    return record


def skim_columns(
    events: Any,
    calibrator: Calibrator | None,
    *,
    tagger_columns: Sequence[str],
    flavour_column: str,
    is_data: bool,
    collection: str = "Jet",
    variations: Sequence[str] | None = None,
    jet_fields: Sequence[str] = DEFAULT_JET_FIELDS,
    event_fields: Sequence[str] = DEFAULT_EVENT_FIELDS,
    flat_names: bool = False,
    probabilities: bool = False,
    layout: InputLayout | None = None,
) -> tuple[dict[str, Any], dict[str, int] | None]:
    """Skim record of one chunk from flat columns: flatten once, numpy, build the layout once.

    Arguments:
        events: NanoEvents (or any events with a jagged jet collection).
        calibrator: calibrates the jets; None writes the reference skim.
        tagger_columns: the tagger fields kept.
        flavour_column: the truth-flavour field kept when present.
        is_data: data jets are never moved.
        collection: the jet collection.
        variations: variation names (None: all).
        jet_fields: extra jet fields kept when present.
        event_fields: event-level fields kept when present.
        flat_names: flatten nested records (``OTCAL_v.up.col`` -> ``OTCAL_v_up_col``).
        probabilities: also write the calibrated probabilities (see :func:`skim_record`).
        layout: how the file stores jets (:class:`~coffea_otcal.input_layout.InputLayout`;
            None: NanoAOD). Event fields may then be paths (``EventInfo.eventNumber``, kept
            as ``EventInfo_eventNumber``).

    A float32 calibrator writes its calibrated columns as float32, the precision NanoAOD
    stores tagger scores in (a float64 calibrator writes float64).

    Returns:
        ``({event field: array, collection: jagged jet record}, status counts or None)``,
        the record identical to :func:`skim_record` after :func:`add_calibrated_columns`.
    """
    from coffea_otcal.applier import jet_record, require_fields

    base = list(dict.fromkeys([*jet_fields, flavour_column, *tagger_columns]))
    needed: tuple[str, ...] = ()
    if calibrator is not None:
        needed = calibrator.data_columns if is_data else calibrator.input_columns
    if layout is None:
        jets = events[collection]
        available = set(jets.fields)
    else:
        from coffea_otcal.input_layout import available_jet_fields, layout_jets

        available = available_jet_fields(events, layout, collection, tagger_columns)
    if needed:
        require_fields(sorted(available), needed)
    wanted = [f for f in dict.fromkeys([*base, *needed]) if f in available]
    if layout is not None:
        jets = layout_jets(events, layout, collection, wanted, _chunk_name(events), tagger_columns)
    flat = {f: ak.to_numpy(ak.flatten(ak.without_parameters(jets[f]), axis=1)) for f in wanted}
    fields: dict[str, Any] = {f: flat[f] for f in base if f in flat}
    flags = None
    if calibrator is not None:
        out = calibrator.calibrate_columns(
            {c: flat[c] for c in needed}, is_data=is_data, variations=variations
        )
        flags = status_counts(out["otcal_status"], out["otcal_clamped"])
        if not probabilities:
            out = _without_probabilities(out)
        fields.update(_to_float32(out) if calibrator.dtype == np.float32 else out)
    if flat_names:
        fields = _flat_names(fields)
    if layout is None:
        record = {f: ak.without_parameters(events[f]) for f in event_fields if f in events.fields}
    else:
        from coffea_otcal.input_layout import LayoutError, read_event_path

        record = {}
        for f in event_fields:
            try:
                record[f.replace(".", "_")] = read_event_path(events, f, "this chunk")
            except LayoutError:  # kept when present, as for NanoAOD
                continue
    record[collection] = jet_record(fields, ak.to_numpy(ak.num(jets, axis=1)))
    return record, flags


def _is_probability(name: str) -> bool:
    """Whether an applier output field is a calibrated probability.

    ``p_<class>_otcal``, or ``p_<class>`` in a variation record; only ever applied to the
    applier's own fields, never to user jet fields.
    """
    return name.startswith("p_")


def _without_probabilities(fields: dict[str, Any]) -> dict[str, Any]:
    """Drop the probability leaves of a (nested) calibrated column mapping."""
    return {
        k: _without_probabilities(v) if isinstance(v, dict) else v
        for k, v in fields.items()
        if not _is_probability(k)
    }


def _to_float32(fields: dict[str, Any]) -> dict[str, Any]:
    """Cast every float64 leaf of a nested column mapping to float32 (others unchanged)."""
    return {
        k: _to_float32(v) if isinstance(v, dict)
        else v.astype(np.float32) if getattr(v, "dtype", None) == np.float64 else v
        for k, v in fields.items()
    }


def _flat_names(fields: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"OTCAL_v": {"up": {"col": a}}}`` -> ``{"OTCAL_v_up_col": a}`` (ROOT branches are flat)."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        key = f"{prefix}_{name}" if prefix else name
        if isinstance(value, dict):
            out.update(_flat_names(value, key))
        else:
            out[key] = value
    return out


def _part_name(metadata: dict[str, Any], suffix: str) -> str:
    stem = Path(str(metadata.get("filename", "chunk"))).name.split(".")[0]
    dataset = str(metadata.get("dataset", stem))
    start, stop = metadata.get("entrystart", 0), metadata.get("entrystop", 0)
    raw = f"{dataset}__{stem}__{start}-{stop}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw) + suffix


def write_skim_part(record: dict[str, Any], path: str | os.PathLike[str], fmt: SkimFormat) -> int:
    """Write one skim part atomically (temporary name in the same folder, then rename).

    Arguments:
        record: output of :func:`skim_record` (``flat_names=True`` for ROOT).
        path: destination file.
        fmt: ``"parquet"`` or ``"root"`` (tree ``Events``, branches ``Jet_<field>``, ``nJet``).

    Returns:
        The size of the written file in bytes.
    """
    path = Path(path)
    if fmt not in ("parquet", "root"):
        msg = f"unknown skim format {fmt!r}; use 'parquet' or 'root'"
        raise ValueError(msg)
    with atomic_path(path) as tmp:
        if fmt == "parquet":
            ak.to_parquet(ak.zip(record, depth_limit=1), tmp, **PARQUET_OPTIONS)
        else:
            import uproot

            branches = {
                k: v if v.ndim > 1 or v.fields else ak.to_numpy(v) for k, v in record.items()
            }
            with uproot.recreate(tmp) as out:
                out.mktree(
                    "Events",
                    branches,
                    field_name=lambda outer, inner: f"{outer}_{inner}",
                    counter_name=lambda counted: f"n{counted}",
                )
    return path.stat().st_size


class CalibrationProcessor(ProcessorABC):
    """coffea processor: calibrate the jets of every chunk; wrap a processor or write skims.

    Arguments:
        bundle: a Bundle, a Calibrator or a bundle path (pickled as the bundle JSON).
        inner: an existing processor run on the calibrated events; its output is returned
            with the counts under the key ``"otcal"`` (when it is a dict).
        output_dir: write each chunk as a skim part file into this folder.
        fmt: skim format, ``"parquet"`` or ``"root"``.
        collection: the jet collection (default: the layout's, ``Jet`` for NanoAOD).
        is_data: force data/MC; None reads ``events.metadata["is_data"]`` (set it in the
            fileset) or treats events without the flavour field as data.
        variations: variation names (None: all).
        data_datasets: dataset names whose events are data (checked before the metadata;
            coffea's Runner caches fileset metadata per file across runs unless it gets a
            fresh ``metadata_cache``).
        calibrate: False writes the same skim without calibration (the reference of the
            skim-cost benchmark).
        jet_fields: extra jet fields kept in skims.
        event_fields: event fields kept in skims (default: the layout's event identifiers,
            ``run, luminosityBlock, event`` for NanoAOD).
        probabilities: skims also keep the calibrated probabilities (default: the tagger's
            own calibrated columns only).
        layout: how the files store jets (:class:`~coffea_otcal.input_layout.InputLayout`,
            or its mapping); None: NanoAOD. The runner must read them with its schema.

    Returns (from ``process``):
        ``{"events", "jets", "status": {name: count}, "clamped", "parts": [names], "bytes"}``
        (or the inner processor's output with these under ``"otcal"``).
    """

    def __init__(
        self,
        bundle: Bundle | Calibrator | str | os.PathLike[str],
        *,
        inner: ProcessorABC | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        fmt: SkimFormat = "parquet",
        collection: str | None = None,
        is_data: bool | None = None,
        variations: Sequence[str] | None = None,
        data_datasets: Sequence[str] = (),
        calibrate: bool = True,
        jet_fields: Sequence[str] = DEFAULT_JET_FIELDS,
        event_fields: Sequence[str] | None = None,
        probabilities: bool = False,
        layout: InputLayout | Mapping[str, Any] | None = None,
    ) -> None:
        if fmt not in ("parquet", "root"):
            msg = f"unknown skim format {fmt!r}; use 'parquet' or 'root'"
            raise ValueError(msg)
        self.calibrator = _as_calibrator(bundle)
        self.inner = inner
        self.output_dir = None if output_dir is None else str(output_dir)
        self.fmt = fmt
        self.is_data = is_data
        self.variations = None if variations is None else list(variations)
        self.data_datasets = tuple(data_datasets)
        self.calibrate = calibrate
        self.jet_fields = tuple(jet_fields)
        self.probabilities = probabilities
        self.layout = (
            None if layout is None
            else layout if isinstance(layout, InputLayout) else InputLayout.model_validate(layout)
        )
        from coffea_otcal.input_layout import default_collection, default_event_fields

        self.collection = collection or default_collection(self.layout or InputLayout())
        if event_fields is None:
            event_fields = default_event_fields(self.layout or InputLayout())
        self.event_fields = tuple(event_fields)

    def process(self, events: Any) -> dict[str, Any]:
        """Calibrate one chunk; write its skim part and/or run the inner processor."""
        if self.layout is not None:
            return self._process_layout(events)
        jets = events[self.collection]
        is_data = self.is_data
        if is_data is None:
            is_data = _detect_is_data(events, jets.fields, self.calibrator, self.data_datasets)
        counts: dict[str, Any] = {"events": len(events), "jets": int(ak.sum(ak.num(jets)))}
        if self.inner is None and self.output_dir is not None:
            return self._skim(events, jets, is_data, counts)
        if self.calibrate:
            events = add_calibrated_columns(
                events,
                self.calibrator,
                is_data=is_data,
                collection=self.collection,
                variations=self.variations,
            )
            jets = events[self.collection]
            flags = status_counts(jets.otcal_status, jets.otcal_clamped)
            counts["clamped"] = flags.pop("clamped")
            counts["status"] = flags
        counts["parts"] = []
        counts["bytes"] = 0
        if self.output_dir is not None:
            record = skim_record(
                events,
                self.calibrator,
                collection=self.collection,
                jet_fields=self.jet_fields,
                event_fields=self.event_fields,
                flat_names=self.fmt == "root",
                probabilities=self.probabilities,
            )
            suffix = ".parquet" if self.fmt == "parquet" else ".root"
            name = _part_name(dict(getattr(events, "metadata", None) or {}), suffix)
            counts["bytes"] = write_skim_part(record, Path(self.output_dir) / name, self.fmt)
            counts["parts"] = [name]
        if self.inner is None:
            return counts
        result = self.inner.process(events)
        if isinstance(result, dict):
            result = {**result, "otcal": counts}
        return result

    def _process_layout(self, events: Any) -> dict[str, Any]:
        """:meth:`process` for a PHYSLITE or flat-ntuple layout."""
        from coffea_otcal.input_layout import layout_jets

        assert self.layout is not None
        is_data = self.is_data
        if is_data is None:
            is_data = _layout_is_data(
                events, self.layout, self.collection, self.calibrator, self.data_datasets
            )
        counts: dict[str, Any] = {"events": len(events)}
        if self.inner is None and self.output_dir is not None:
            return self._skim(events, None, is_data, counts)
        if self.output_dir is not None:
            msg = "a skim of a PHYSLITE or flat-ntuple layout runs without an inner processor"
            raise ValueError(msg)
        flat = self.layout.format == "flat"

        def jet_field(name: str) -> Any:
            return events[f"{self.collection}_{name}"] if flat else events[self.collection, name]

        if self.calibrate:
            events = add_calibrated_columns(
                events, self.calibrator, is_data=is_data, collection=self.collection,
                variations=self.variations, layout=self.layout,
            )
            status = jet_field("otcal_status")
            flags = status_counts(status, jet_field("otcal_clamped"))
            counts["jets"] = int(ak.sum(ak.num(status)))
            counts["clamped"] = flags.pop("clamped")
            counts["status"] = flags
        else:
            tagger = self.calibrator.columns
            jets = layout_jets(
                events, self.layout, self.collection, tagger[:1], _chunk_name(events), tagger
            )
            counts["jets"] = int(ak.sum(ak.num(jets)))
        counts["parts"], counts["bytes"] = [], 0
        assert self.inner is not None
        result = self.inner.process(events)
        if isinstance(result, dict):
            result = {**result, "otcal": counts}
        return result

    def _skim(
        self, events: Any, jets: Any, is_data: bool, counts: dict[str, Any]
    ) -> dict[str, Any]:
        """Skim-only chunk: calibrate flat columns and build the part's record directly.

        Same columns, order and types as :func:`add_calibrated_columns` followed by
        :func:`skim_record`, without one NanoEvents assignment per new field and without
        ``ak.zip`` broadcasting (:func:`~coffea_otcal.applier.jet_record`). The reference
        skim (``calibrate=False``) takes the same route, so the cost ratio compares like
        with like.
        """
        record, flags = skim_columns(
            events,
            self.calibrator if self.calibrate else None,
            tagger_columns=self.calibrator.columns,
            flavour_column=self.calibrator.flavour_column,
            is_data=is_data,
            collection=self.collection,
            variations=self.variations,
            jet_fields=self.jet_fields,
            event_fields=self.event_fields,
            flat_names=self.fmt == "root",
            probabilities=self.probabilities,
            layout=self.layout,
        )
        if flags is not None:
            counts["clamped"] = flags.pop("clamped")
            counts["status"] = flags
        counts.setdefault("jets", int(ak.sum(ak.num(record[self.collection]))))
        assert self.output_dir is not None
        suffix = ".parquet" if self.fmt == "parquet" else ".root"
        name = _part_name(dict(getattr(events, "metadata", None) or {}), suffix)
        counts["bytes"] = write_skim_part(record, Path(self.output_dir) / name, self.fmt)
        counts["parts"] = [name]
        return counts

    def postprocess(self, accumulator: Any) -> Any:
        """Sort the part names (chunks finish in any order) and pass the rest through."""
        if isinstance(accumulator, dict) and "parts" in accumulator:
            accumulator["parts"] = sorted(accumulator["parts"])
        if self.inner is not None:
            return self.inner.postprocess(accumulator)
        return accumulator
