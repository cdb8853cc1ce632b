r"""Where the jets and the tagger live in an input file: NanoAOD, PHYSLITE or a flat ntuple.

The fill (:class:`coffea_otcal.processors.control_region.ControlRegionProcessor`) and the
in-processor applier (:func:`coffea_otcal.processors.calibration.add_calibrated_columns`)
see jets as one jagged record per event whose fields carry the names coffea-otcal uses
(``pt``, ``eta``, the adapter's tagger columns, the flavour column). An
:class:`InputLayout` says how to build that record from the file:

* ``nanoaod`` (default): coffea's NanoAOD layout, ``nJet`` and ``Jet_<field>`` branches
  (CMS NanoAOD, the generator's files, any flat tree written that way). Collection ``Jet``.
* ``physlite``: ATLAS DAOD_PHYSLITE read with coffea's ``PHYSLITESchema``: branches
  ``AnalysisJetsAuxDyn.<field>`` become the collection ``Jets`` (coffea drops the
  ``Analysis`` prefix). PHYSLITE stores momenta in MeV: set the preselection in MeV too.
  The tagger scores are either jet decorations (``AnalysisJetsAuxDyn.GN2v01_pb``) or, as
  in the derivations, fields of a b-tagging container reached through an ElementLink
  (``btagging: {collection: BTagging_AntiKt4EMPFlow, link: btaggingLink}``): each jet's
  scores are the container's entry ``m_persIndex`` of its link in the same event, and a
  jet whose link points nowhere gets NaN scores, so the adapter flags it (counted, never
  calibrated). Event weights are paths such as ``EventInfo.mcEventWeights[0]``.
* ``flat``: an ntuple of per-event vector branches with a common prefix, as ATLAS
  analysis frameworks write (``jet_pt_NOSYS``, ``jet_eta``, ``jet_GN2v01_pb``,
  ``weight_mc_NOSYS``), read with coffea's ``BaseSchema``. The collection name is the
  prefix without its underscore (``jet``): field ``f`` is branch ``jet_f``.

``fields`` renames: ``{pt: pt_NOSYS}`` reads the file's ``pt_NOSYS`` wherever coffea-otcal
asks for ``pt`` (kinematics, preselection, selections, calibration context), so the store
and the bundle keep the plain names and the same bundle applies to files of any layout.

Tested on files written with uproot in each layout (``tests/test_input_layout.py``); no real
PHYSLITE file was available to this project, so the PHYSLITE layout follows coffea's
``PHYSLITESchema`` and the derivation's branch names, not a file read here.
"""

from __future__ import annotations

__all__ = [
    "BTaggingLink",
    "InputLayout",
    "LayoutError",
    "available_jet_fields",
    "default_collection",
    "default_event_fields",
    "event_branch_candidates",
    "jet_branch_candidates",
    "layout_jets",
    "link_branch_candidates",
    "read_event_path",
    "schema_class",
    "stored_jet_fields",
    "tagger_branch_candidates",
]

import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

LayoutName = Literal["nanoaod", "physlite", "flat"]

#: the collection a layout reads when the configuration names none
_DEFAULT_COLLECTION: dict[str, str] = {"nanoaod": "Jet", "physlite": "Jets", "flat": "jet"}
#: an ElementLink index that points nowhere (``uint32`` -1)
_INVALID_LINK = 2**32 - 1
_PATH = re.compile(r"^([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)(?:\[(\d+)\])?$")


class LayoutError(ValueError):
    """The events lack what the layout needs; the message names the field and the file."""


class BTaggingLink(BaseModel):
    """PHYSLITE: tagger scores in a b-tagging container linked from each jet."""

    model_config = ConfigDict(extra="forbid")

    collection: str = Field(
        default="BTagging_AntiKt4EMPFlow", description="the b-tagging container (coffea name)"
    )
    link: str = Field(default="btaggingLink", description="the jets' ElementLink field")


class InputLayout(BaseModel):
    """How jets and tagger columns are stored in the input files (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    format: LayoutName = Field(default="nanoaod", description="nanoaod, physlite or flat")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="coffea-otcal field name -> jet field in the file, e.g. {pt: pt_NOSYS}",
    )
    btagging: BTaggingLink | None = Field(
        default=None, description="physlite: read the tagger columns through this link"
    )

    @model_validator(mode="after")
    def _btagging_needs_physlite(self) -> InputLayout:
        if self.btagging is not None and self.format != "physlite":
            msg = f"btagging applies to the physlite format only, not {self.format!r}"
            raise ValueError(msg)
        return self

    def file_field(self, name: str) -> str:
        """The jet field in the file that holds coffea-otcal's ``name``."""
        return self.fields.get(name, name)


def default_collection(layout: InputLayout) -> str:
    """The jet collection of a layout: ``Jet``, ``Jets`` (PHYSLITE) or ``jet`` (flat)."""
    return _DEFAULT_COLLECTION[layout.format]


def default_event_fields(layout: InputLayout) -> tuple[str, ...]:
    """Event identifiers a skim keeps by default (when present)."""
    if layout.format == "physlite":
        return ("EventInfo.runNumber", "EventInfo.lumiBlock", "EventInfo.eventNumber")
    if layout.format == "flat":
        return ("runNumber", "eventNumber")
    return ("run", "luminosityBlock", "event")


def _canonical(layout: InputLayout, file_field: str) -> str:
    """coffea-otcal's name of a file's jet field (the inverse of ``layout.fields``)."""
    inverse = {v: k for k, v in layout.fields.items()}
    return inverse.get(file_field, file_field)


def stored_jet_fields(branches: Sequence[str], layout: InputLayout, collection: str) -> list[str]:
    """The jet fields (coffea-otcal's names) that a file's ``branches`` store, in file order."""
    if layout.format == "physlite":
        prefixes = _physlite_prefixes(collection)
        found = [b.split(".", 1)[1] for b in branches if b.startswith(prefixes)]
        found = [f for f in found if "." not in f]  # ElementLink members
    else:
        prefix = f"{collection}_"
        found = [b[len(prefix) :] for b in branches if b.startswith(prefix)]
    return list(dict.fromkeys(_canonical(layout, f) for f in found))


def available_jet_fields(
    events: Any, layout: InputLayout, collection: str, tagger_columns: Sequence[str] = ()
) -> set[str]:
    """The jet fields (coffea-otcal's names) that :func:`layout_jets` can read from ``events``."""
    if layout.format == "flat":
        prefix = f"{collection}_"
        present = {f[len(prefix) :] for f in events.fields if f.startswith(prefix)}
    elif collection in events.fields:
        present = set(events[collection].fields)
    else:
        present = set()
    names = {_canonical(layout, f) for f in present}
    if layout.btagging is not None and layout.btagging.collection in events.fields:
        in_btag = set(events[layout.btagging.collection].fields)
        names |= {c for c in tagger_columns if layout.file_field(c) in in_btag}
    return names


def schema_class(layout: InputLayout) -> type:
    """The coffea NanoEvents schema class that reads the layout."""
    if layout.format == "physlite":
        from coffea.nanoevents import PHYSLITESchema

        return PHYSLITESchema
    if layout.format == "flat":
        from coffea.nanoevents import BaseSchema

        return BaseSchema
    from coffea_otcal.processors.control_region import ControlRegionSchema

    return ControlRegionSchema


def _physlite_prefixes(container: str) -> tuple[str, ...]:
    """``AnalysisJetsAuxDyn.`` and the other branch prefixes PHYSLITESchema maps to ``Jets``."""
    return tuple(f"{s}{aux}." for s in (f"Analysis{container}", container) for aux in ("AuxDyn", "Aux"))


def _physlite_branches(container: str, field: str) -> tuple[str, ...]:
    """``AnalysisJetsAuxDyn.pt`` and the other spellings PHYSLITESchema maps to ``Jets.pt``."""
    return tuple(prefix + field for prefix in _physlite_prefixes(container))


def jet_branch_candidates(layout: InputLayout, collection: str, name: str) -> tuple[str, ...]:
    """Raw branch names that can hold the jet field ``name`` (any one of them suffices)."""
    field = layout.file_field(name)
    if layout.format == "physlite":
        return _physlite_branches(collection, field)
    return (f"{collection}_{field}",)


def tagger_branch_candidates(layout: InputLayout, collection: str, name: str) -> tuple[str, ...]:
    """Raw branch names of a tagger column (in the b-tagging container when linked)."""
    if layout.format == "physlite" and layout.btagging is not None:
        return _physlite_branches(layout.btagging.collection, layout.file_field(name))
    return jet_branch_candidates(layout, collection, name)


def link_branch_candidates(layout: InputLayout, collection: str) -> tuple[str, ...]:
    """Raw branch names of the jets' b-tagging ElementLink index (physlite with btagging)."""
    assert layout.btagging is not None
    link = layout.btagging.link
    return tuple(
        name for sub in (".m_persIndex", "") for name in _physlite_branches(collection, link + sub)
    )


def parse_event_path(text: str) -> tuple[tuple[str, ...], int | None]:
    """``"EventInfo.mcEventWeights[0]"`` -> ``(("EventInfo", "mcEventWeights"), 0)``."""
    match = _PATH.match(text.strip())
    if match is None:
        msg = (
            f"event field {text!r} is not a field path: use a branch name (genWeight), a "
            f"dotted path (EventInfo.mcEventWeights) and optionally one index ([0])"
        )
        raise LayoutError(msg)
    index = match.group(2)
    return tuple(match.group(1).split(".")), None if index is None else int(index)


def event_branch_candidates(layout: InputLayout, text: str) -> tuple[str, ...]:
    """Raw branch names that can hold the event field path ``text``."""
    parts, _ = parse_event_path(text)
    if layout.format == "physlite" and len(parts) > 1:
        head, rest = parts[0], ".".join(parts[1:])
        return _physlite_branches(head, rest)
    return (".".join(parts),) if len(parts) == 1 else ("_".join(parts), ".".join(parts))


def read_event_path(events: Any, text: str, where: str) -> np.ndarray:
    """One number per event from a field path such as ``EventInfo.mcEventWeights[0]``."""
    import awkward as ak

    parts, index = parse_event_path(text)
    value = events
    for depth, part in enumerate(parts):
        fields = getattr(value, "fields", [])
        if part not in fields:
            at = ".".join(parts[:depth]) or "the events"
            msg = (
                f"event field {text!r}: {at} has no field {part!r} in {where} "
                f"(available: {sorted(fields)[:30]})"
            )
            raise LayoutError(msg)
        value = value[part]
    if index is not None:
        if getattr(value, "ndim", 1) < 2:
            msg = f"event field {text!r}: {'.'.join(parts)} is one number per event in {where}; drop the index [{index}]"
            raise LayoutError(msg)
        counts = np.asarray(ak.to_numpy(ak.num(value, axis=1)))
        short = np.flatnonzero(counts <= index)
        if short.size:
            msg = (
                f"event field {text!r}: {short.size} events have no entry [{index}] "
                f"(first: event {int(short[0])} with {int(counts[short[0]])}) in {where}"
            )
            raise LayoutError(msg)
        value = value[:, index]
    out = np.asarray(ak.to_numpy(value))
    if out.ndim != 1:
        msg = f"event field {text!r} is not one number per event in {where} (type {ak.type(value)}); index it, e.g. {text}[0]"
        raise LayoutError(msg)
    return out


def _flat_collection(events: Any, collection: str, names: Sequence[str], where: str) -> Any:
    import awkward as ak

    prefix = f"{collection}_"
    columns = {}
    for name in names:
        branch = prefix + name
        if branch not in events.fields:
            found = sorted(f for f in events.fields if f.startswith(prefix))[:30]
            msg = (
                f"jet branch {branch!r} is missing in {where}; branches with prefix {prefix!r}: "
                f"{found}. Set input.fields to map the name, or the jet collection prefix"
            )
            raise LayoutError(msg)
        columns[name] = events[branch]
    counts = None
    for name, values in columns.items():
        if values.ndim != 2:
            msg = f"branch {prefix + name!r} in {where} is not one value per jet (type {ak.type(values)})"
            raise LayoutError(msg)
        n = np.asarray(ak.to_numpy(ak.num(values, axis=1)))
        if counts is None:
            counts, first = n, name
        elif not np.array_equal(n, counts):
            bad = int(np.flatnonzero(n != counts)[0])
            msg = (
                f"branches {prefix + first!r} and {prefix + name!r} in {where} hold different "
                f"numbers of jets (event {bad}: {int(counts[bad])} and {int(n[bad])})"
            )
            raise LayoutError(msg)
    return ak.zip(columns, depth_limit=2)


def _linked(events: Any, jets: Any, layout: InputLayout, names: Sequence[str], where: str) -> dict[str, Any]:
    """Tagger columns of each jet read through its b-tagging ElementLink (NaN when unlinked)."""
    import awkward as ak

    assert layout.btagging is not None
    coll, link = layout.btagging.collection, layout.btagging.link
    if coll not in events.fields:
        msg = f"b-tagging container {coll!r} (input.btagging.collection) is missing in {where}; events have {sorted(events.fields)[:30]}"
        raise LayoutError(msg)
    if link not in jets.fields:
        msg = f"jet ElementLink {link!r} (input.btagging.link) is missing in {where}; jets have {sorted(jets.fields)[:30]}"
        raise LayoutError(msg)
    target = events[coll]
    ref = jets[link]
    ref = ref["m_persIndex"] if "m_persIndex" in getattr(ref, "fields", []) else ref
    n_jets = np.asarray(ak.to_numpy(ak.num(ref, axis=1)))
    n_tag = np.asarray(ak.to_numpy(ak.num(target, axis=1)))
    local = np.asarray(ak.to_numpy(ak.flatten(ref, axis=1))).astype(np.int64)
    ok = (local >= 0) & (local < np.repeat(n_tag, n_jets)) & (local != _INVALID_LINK)
    start = np.repeat(np.cumsum(n_tag) - n_tag, n_jets)
    flat_index = np.where(ok, start + local, 0)
    out = {}
    for name in names:
        field = layout.file_field(name)
        if field not in target.fields:
            msg = f"b-tagging field {field!r} is missing from {coll!r} in {where}; it has {sorted(target.fields)[:30]}"
            raise LayoutError(msg)
        values = np.asarray(ak.to_numpy(ak.flatten(target[field], axis=1)), dtype=np.float64)
        picked = values[flat_index] if values.size else np.zeros(len(local))
        out[name] = ak.unflatten(np.where(ok, picked, np.nan), n_jets)
    return out


def layout_jets(
    events: Any,
    layout: InputLayout,
    collection: str,
    names: Sequence[str],
    where: str,
    tagger_columns: Sequence[str] = (),
) -> Any:
    """The jets as a jagged record with coffea-otcal's field ``names``.

    Arguments:
        events: NanoEvents read with :func:`schema_class` of the layout.
        layout: the input layout.
        collection: the jet collection (:func:`default_collection` for the usual one).
        names: the fields wanted, by coffea-otcal's names (``layout.fields`` renames).
        where: the file or dataset, for error messages.
        tagger_columns: the adapter's columns among ``names``; with ``layout.btagging``
            they are read through the jets' ElementLink.

    Returns:
        ``events x jets`` records with exactly the fields ``names``.

    Raises:
        LayoutError: a field, branch, container or link is missing, or flat branches
            disagree on the number of jets; the message names it and the file.
    """
    import awkward as ak

    names = list(dict.fromkeys(names))
    linked = [n for n in names if n in tagger_columns] if layout.btagging is not None else []
    plain = [n for n in names if n not in linked]
    if not names:
        msg = f"no jet field requested from collection {collection!r} in {where}"
        raise LayoutError(msg)
    if layout.format == "flat":
        flat = _flat_collection(events, collection, [layout.file_field(n) for n in names], where)
        return ak.zip({n: flat[layout.file_field(n)] for n in names}, depth_limit=2)
    if collection not in events.fields:
        branches = {"nanoaod": f"{collection}_*", "physlite": f"Analysis{collection}AuxDyn.*"}[layout.format]
        msg = (
            f"jet collection {collection!r} (branches {branches}) is missing in {where}; "
            f"collections: {sorted(events.fields)[:30]}"
        )
        raise LayoutError(msg)
    jets = events[collection]
    columns: dict[str, Any] = {}
    for name in plain:
        field = layout.file_field(name)
        if field not in jets.fields:
            branch = jet_branch_candidates(layout, collection, name)[0]
            extra = "" if field == name else f"; input.fields maps {name!r} to {field!r}"
            msg = (
                f"branch {branch!r} (jet) is missing in {where}{extra}; fields of collection "
                f"{collection!r}: {sorted(jets.fields)[:30]} ..."
            )
            raise LayoutError(msg)
        columns[name] = jets[field]
    if linked:
        columns.update(_linked(events, jets, layout, linked, where))
    return ak.zip({n: columns[n] for n in names}, depth_limit=2)
