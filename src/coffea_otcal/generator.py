"""Toy NanoAOD generator with known truth: b, c, light control regions, a 1:1:1 validation region.

Every region is written twice, as simulation (``mc_<region>.root``) and as pseudo-data
(``data_<region>.root``), in the NanoAOD layout that coffea's ``NanoAODSchema`` reads:
tree ``Events`` with ``run``, ``luminosityBlock``, ``event``, ``genWeight`` (1 for data),
``nJet`` and the jagged ``Jet_pt``, ``Jet_eta``, ``Jet_phi``, ``Jet_mass``, ``Jet_jetId``,
``Jet_hadronFlavour`` (MC only) and the tagger columns of the chosen adapter (DeepJet
``Jet_btagDeepFlavB``, ``Jet_btagDeepFlavCvL``, ``Jet_btagDeepFlavCvB`` by default;
``B = p_b``, ``CvL = p_c / (p_c + p_l)``, ``CvB = p_c / (p_c + p_b)``). Jets are sorted by
decreasing :math:`p_T` inside each event. In latent mode the tagger's latent ``z`` is
stored per jet as flat NanoAOD-style branches ``Jet_latent_0 ... Jet_latent_{d-1}``
(float32; ``events.Jet.latent_0`` in coffea). The files hold no other collections, so
read them with ``warn_missing_crossrefs = False`` on the NanoAODSchema (sub)class to
silence coffea's warnings about missing Electron/Muon/... cross-references.

With ``layout="physlite"`` (``--layout physlite``) the same jets are written in the ATLAS
DAOD_PHYSLITE layout instead (:func:`_write_physlite`): tree ``CollectionTree``,
``AnalysisJetsAuxDyn.*`` in MeV, the truth label ``HadronConeExclTruthLabelID``, the tagger
columns in a ``BTagging_AntiKt4EMPFlow`` container linked from each jet, and
``EventInfoAuxDyn.{runNumber, eventNumber, mcEventWeights}``: a sample with known truth for
the ``physlite`` input layout (``docs/store.md``).

Truth (all of it, also for pseudo-data) goes to sidecars, never into the data files:
``truth.json`` (configuration, configured and realised flavour fractions per region for MC
and data, counts, file list, versions) and ``truth_jets.parquet`` (one row per jet keyed by
``file, event, jet``: truth flavour 5/4/0, :math:`p_T`, unquantised probabilities).

Flavour fractions default to Kim & Yang (2026), Table 1 (b-, c- and light-enriched
regions); pseudo-data fractions default to a perturbed copy, as real compositions differ
from simulation. The tagger response model lives in :mod:`coffea_otcal.latent_tagger`.
"""

from __future__ import annotations

__all__ = [
    "FlavourFractions",
    "GeneratedFile",
    "GeneratedSample",
    "GeneratorConfig",
    "KinematicsConfig",
    "LatentConfig",
    "MismodellingConfig",
    "RegionConfig",
    "add_arguments",
    "default_regions",
    "generate",
    "latent_head",
    "quantise_mantissa",
    "run",
    "sample_response",
    "simulate_jets",
]

import argparse
import functools
import json
import logging
import os
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from coffea_otcal import latent_tagger as lt
from coffea_otcal.adapters import get_adapter
from coffea_otcal.atomic import atomic_path, atomic_write_text
from coffea_otcal.generator_config import (
    FlavourFractions,
    GeneratorConfig,
    KinematicsConfig,
    LatentConfig,
    MismodellingConfig,
    RegionConfig,
    default_regions,
)
from coffea_otcal.latent_tagger import quantise_mantissa
from coffea_otcal.versions import package_versions

logger = logging.getLogger(__name__)

CLASSES: tuple[str, str, str] = ("b", "c", "light")
_FLAVOUR_INDEX: dict[Any, int] = {"b": 0, "c": 1, "light": 2, 5: 0, 4: 1, 0: 2}
TRUTH_SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- simulation


@functools.lru_cache(maxsize=4)
def _network(latent_dim: int, seed: int) -> lt.TaggerNetwork:
    return lt.build_network(latent_dim, seed)


def latent_head(config: GeneratorConfig) -> lt.TaggerNetwork:
    """The frozen tagger network of a configuration (latent settings only matter).

    Call it on latents for probabilities, ``net(z) -> (n, 3)`` in class order (b, c, light);
    ``net.penultimate(z)`` is the last hidden layer :math:`z'`, ``net.logits(z)`` the
    logits, ``net.encode(features, pt, eta)`` the latent, ``net.to_torch()`` the head as
    a frozen torch module.

    Arguments:
        config: the generator configuration (``config.latent``).

    Returns:
        The cached :class:`~coffea_otcal.latent_tagger.TaggerNetwork`.
    """
    lat = config.latent
    return _network(lat.latent_dim, lat.network_seed)


def _response(
    config: GeneratorConfig,
    flav: np.ndarray,
    is_data: bool,
    rng: np.random.Generator,
    pt: np.ndarray | None = None,
    eta: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Simulate jets of given class indices; returns (jet arrays, tagger file columns)."""
    jets = lt.sample_kinematics(flav, rng, config.kinematics, pt, eta)
    pt64, eta64 = jets["pt"].astype(np.float64), jets["eta"].astype(np.float64)
    features = lt.sample_features(flav, pt64, eta64, rng)
    mis = config.mismodelling
    if is_data and mis.strength > 0.0:
        features = lt.smear_features(
            features,
            pt64,
            rng,
            sigma=mis.strength * mis.smear_sigma,
            pt_slope=mis.smear_pt_slope,
            pt_ref=mis.smear_pt_ref,
            sv_dropout=min(1.0, mis.strength * mis.sv_dropout),
        )
    net = latent_head(config) if config.latent.enabled else None
    raw, latent = lt.tagger_scores(features, pt64, eta64, net)
    if latent is not None:
        jets["latent"] = latent
    adapter = get_adapter(
        config.tagger, mantissa_bits=config.mantissa_bits if config.quantise else None
    )
    columns = {
        name: (
            lt.quantise_mantissa(col, config.mantissa_bits)
            if config.quantise
            else col.astype(np.float32)
        )
        for name, col in adapter.from_simplex(raw).items()
    }
    jets["probs"], _ = adapter.to_simplex(columns)
    jets["probs_raw"] = raw
    jets["features"] = features
    jets["flavour"] = np.array(lt.FLAVOUR_CODES, dtype=np.int32)[flav]
    return jets, columns


def simulate_jets(
    config: GeneratorConfig, region: str, n_jets: int, is_data: bool, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Simulate the jets of a region in memory (no ROOT involved).

    Each jet's flavour is drawn independently with the region's configured MC or
    pseudo-data fractions, then its kinematics and tagger response.

    Arguments:
        config: the generator configuration.
        region: a configured region name.
        n_jets: number of jets.
        is_data: pseudo-data (mismodelled response, data fractions) or MC.
        rng: the random generator (the result is a deterministic function of its state).

    Returns:
        ``pt, eta, phi, mass`` (float32, GeV), ``flavour`` (int32 hadron flavour 5/4/0),
        ``probs`` ((n, 3) float64 in class order b, c, light, as read back from the stored,
        quantised tagger columns), ``probs_raw`` (before quantisation), ``features``
        ((n, 6) tagger inputs, smeared for pseudo-data) and, in latent mode, ``latent``
        ((n, d) float32).
    """
    fractions = config.region(region).fractions(is_data).as_array()
    if n_jets < 0:
        msg = f"n_jets must be >= 0, got {n_jets}"
        raise ValueError(msg)
    flav = rng.choice(3, size=n_jets, p=fractions)
    jets, _ = _response(config, flav, is_data, rng)
    return jets


def sample_response(
    config: GeneratorConfig,
    flavour: str | int,
    n: int,
    is_data: bool,
    rng: np.random.Generator,
    pt: np.ndarray | None = None,
    eta: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    r"""Sample the true tagger response of one flavour (MC or pseudo-data density).

    Arguments:
        config: the generator configuration.
        flavour: ``"b"``, ``"c"``, ``"light"`` or a hadron-flavour code 5 / 4 / 0.
        n: number of jets.
        is_data: the pseudo-data (mismodelled) or the MC response.
        rng: the random generator.
        pt: optional fixed jet :math:`p_T` values ``(n,)`` (else drawn from the spectrum).
        eta: optional fixed :math:`\eta` values ``(n,)``.

    Returns:
        The same arrays as :func:`simulate_jets`, all jets of the requested flavour.
    """
    try:
        index = _FLAVOUR_INDEX[flavour]
    except (KeyError, TypeError):
        msg = f"unknown flavour {flavour!r}; use 'b', 'c', 'light' or 5, 4, 0"
        raise ValueError(msg) from None
    jets, _ = _response(config, np.full(n, index, dtype=np.int64), is_data, rng, pt, eta)
    return jets


# --------------------------------------------------------------------------- files


class GeneratedFile(_Model):
    """One written ROOT file and what is in it."""

    dataset: str = Field(description="file stem, e.g. mc_cr_b")
    region: str
    is_data: bool
    path: str = Field(description="absolute path of the ROOT file (tree Events; PHYSLITE: CollectionTree)")
    n_events: int
    n_jets: int
    flavour_counts: dict[str, int] = Field(description="truth jets per class b, c, light")
    configured_fractions: dict[str, float] = Field(description="fractions the jets were drawn with")


class GeneratedSample(_Model):
    """The result of :func:`generate`: the files and the truth sidecars."""

    outdir: str
    files: list[GeneratedFile]
    truth_path: str = Field(description="truth.json")
    jet_truth_path: str = Field(description="truth_jets.parquet (file, event, jet -> truth)")
    config: GeneratorConfig

    def file(self, region: str, is_data: bool) -> GeneratedFile:
        """The file of a region's MC or pseudo-data sample."""
        for f in self.files:
            if f.region == region and f.is_data == is_data:
                return f
        msg = f"no {'data' if is_data else 'mc'} file for region {region!r} in {self.outdir}"
        raise KeyError(msg)

    def fileset(self) -> dict[str, dict[str, Any]]:
        """A coffea fileset: ``{dataset: {"files": {path: tree}, "metadata": {...}}}``."""
        return {
            f.dataset: {
                "files": {f.path: self.config.tree},
                "metadata": {"region": f.region, "is_data": f.is_data},
            }
            for f in self.files
        }

    @classmethod
    def load(cls, outdir: str | os.PathLike[str]) -> GeneratedSample:
        """Read back the description of a generated sample from its ``truth.json``."""
        path = Path(outdir) / "truth.json"
        if not path.is_file():
            msg = f"{path} not found; run `coffea-otcal generate {outdir}` first"
            raise FileNotFoundError(msg)
        truth = json.loads(path.read_text())
        if truth.get("schema_version") != TRUTH_SCHEMA_VERSION:
            msg = (
                f"{path} has schema_version {truth.get('schema_version')!r}; this reader "
                f"understands {TRUTH_SCHEMA_VERSION}. Regenerate the sample"
            )
            raise ValueError(msg)
        base = path.parent.resolve()
        files = [GeneratedFile(**{**f, "path": str(base / f["path"])}) for f in truth["files"]]
        return cls(
            outdir=str(base),
            files=files,
            truth_path=str(path.resolve()),
            jet_truth_path=str(base / truth["jet_truth"]),
            config=GeneratorConfig.model_validate(truth["config"]),
        )


def _write_root(
    path: Path,
    jets: dict[str, np.ndarray],
    columns: dict[str, np.ndarray],
    counts: np.ndarray,
    first_event: int,
    is_data: bool,
    config: GeneratorConfig,
) -> None:
    import awkward as ak
    import uproot

    flat: dict[str, np.ndarray] = {k: jets[k] for k in ("pt", "eta", "phi", "mass")}
    flat["jetId"] = np.full(counts.sum(), 6, dtype=np.uint8)
    if not is_data:
        flat["hadronFlavour"] = jets["flavour"].astype(np.uint8)
    flat.update(columns)
    if "latent" in jets:
        prefix = config.latent.branch_prefix
        for i in range(jets["latent"].shape[1]):
            flat[f"{prefix}_{i}"] = np.ascontiguousarray(jets["latent"][:, i])
    n_events = counts.shape[0]
    event = np.arange(first_event, first_event + n_events, dtype=np.uint64)
    if config.layout == "physlite":
        _write_physlite(path, jets, columns, counts, event, is_data, config)
        return
    tree = {
        "run": np.full(n_events, 370_001 if is_data else 1, dtype=np.uint32),
        "luminosityBlock": (1 + (event - np.uint64(first_event)) // np.uint64(500)).astype(
            np.uint32
        ),
        "event": event,
        "genWeight": np.full(n_events, 1.0 if is_data else config.mc_gen_weight, dtype=np.float32),
        "Jet": ak.unflatten(ak.Array(flat), counts),
    }
    # float32 latents barely compress: skip zlib in latent mode (3x faster writing)
    compression = None if "latent" in jets else uproot.ZLIB(1)
    with atomic_path(path) as tmp, uproot.recreate(tmp, compression=compression) as out:
        out.mktree("Events", tree, title="Events")  # a TTree, as NanoAOD (not an RNTuple)


def _write_physlite(
    path: Path,
    jets: dict[str, np.ndarray],
    columns: dict[str, np.ndarray],
    counts: np.ndarray,
    event: np.ndarray,
    is_data: bool,
    config: GeneratorConfig,
) -> None:
    """The ATLAS DAOD_PHYSLITE layout that coffea's ``PHYSLITESchema`` reads.

    ``CollectionTree`` with ``AnalysisJetsAuxDyn.{pt, eta, phi, m}`` (MeV),
    ``AnalysisJetsAuxDyn.HadronConeExclTruthLabelID`` (MC), the tagger columns in the
    container ``BTagging_AntiKt4EMPFlowAuxDyn.*`` in a per-event order of their own, reached
    through ``AnalysisJetsAuxDyn.btaggingLink.m_persIndex`` (as in the derivations), and
    ``EventInfoAuxDyn.{runNumber, eventNumber, mcEventWeights}``. uproot writes jagged
    branches with a counter per collection where Athena writes ``std::vector``.
    """
    import awkward as ak
    import uproot

    rng = np.random.default_rng([config.seed, int(event[0]) % 2**32, 7])
    n = int(counts.sum())
    event_of_jet = np.repeat(np.arange(counts.shape[0]), counts)
    start = np.repeat(np.cumsum(counts) - counts, counts)
    # the b-tagging objects of an event in a random order; jet j links to its own object
    btag_order = np.lexsort((rng.random(n), event_of_jet))
    link = np.empty(n, dtype=np.uint32)
    link[btag_order] = (np.arange(n) - start).astype(np.uint32)
    ajets: dict[str, np.ndarray] = {
        "pt": (jets["pt"] * 1e3).astype(np.float32),
        "eta": jets["eta"].astype(np.float32),
        "phi": jets["phi"].astype(np.float32),
        "m": (jets["mass"] * 1e3).astype(np.float32),
        "btaggingLink.m_persKey": np.full(n, 0x2A5D3F1, dtype=np.uint32),
        "btaggingLink.m_persIndex": link,
    }
    if not is_data:
        ajets["HadronConeExclTruthLabelID"] = jets["flavour"].astype(np.int32)
    btag = {k: np.ascontiguousarray(v[btag_order]) for k, v in columns.items()}
    branches: dict[str, Any] = {
        "AnalysisJets": ak.unflatten(ak.zip(ajets), counts),
        "BTagging_AntiKt4EMPFlow": ak.unflatten(ak.zip(btag), counts),
        "EventInfoAuxDyn.runNumber": np.full(len(counts), 440_000 if is_data else 410_000, np.uint32),
        "EventInfoAuxDyn.eventNumber": event,
    }
    if not is_data:
        weights = np.full(len(counts), config.mc_gen_weight, dtype=np.float32)
        one = np.ones(len(counts), dtype=np.int64)
        branches["EventInfo"] = ak.zip({"mcEventWeights": ak.unflatten(weights, one)})
    with atomic_path(path) as tmp, uproot.recreate(tmp, compression=uproot.ZLIB(1)) as out:
        out.mktree(
            "CollectionTree",
            {k: (v.type.content if isinstance(v, ak.Array) else v.dtype) for k, v in branches.items()},
            field_name=lambda outer, inner: f"{outer}AuxDyn.{inner}",
            counter_name=lambda counted: f"n{counted}",
            title="CollectionTree",
        )
        out["CollectionTree"].extend(branches)


def _writer_info() -> dict[str, str]:
    versions = package_versions("numpy", "awkward", "uproot")
    return {
        "package": "coffea-otcal",
        "version": versions.pop("coffea_otcal"),
        **versions,
        "python": sys.version.split()[0],
    }


def generate(
    config: GeneratorConfig, outdir: str | os.PathLike[str], progress: bool = True
) -> GeneratedSample:
    """Write the ROOT files of every region (MC and pseudo-data) and the truth sidecars.

    The random stream of a (region, MC/data) sample is seeded by ``(seed, crc32(region),
    is_data)``, so its jets do not change when other regions are added or removed (event
    numbers are offset by the region's position, unique over the whole sample).
    Every file is written under a temporary name in ``outdir`` and renamed into place.

    Arguments:
        config: the generator configuration.
        outdir: output directory (created if missing).
        progress: show a progress bar over the files.

    Returns:
        The :class:`GeneratedSample` listing the files (also written to ``truth.json``).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(k, r, d) for k, r in enumerate(config.regions) for d in (False, True)]
    files: list[GeneratedFile] = []
    tables = []
    for k, region, is_data in tqdm(tasks, desc="generate", disable=not progress, unit="file"):
        info, table = _generate_file(config, out, k, region, is_data)
        files.append(info)
        tables.append(pa.table(table))
    jet_truth = out / "truth_jets.parquet"
    with atomic_path(jet_truth) as tmp:
        pq.write_table(pa.concat_tables(tables, promote_options="permissive"), tmp)
    truth_path = out / "truth.json"
    atomic_write_text(truth_path, json.dumps(_truth_document(config, files), indent=2) + "\n")
    return GeneratedSample(
        outdir=str(out.resolve()),
        files=files,
        truth_path=str(truth_path.resolve()),
        jet_truth_path=str(jet_truth.resolve()),
        config=config,
    )


def _generate_file(
    config: GeneratorConfig, out: Path, k: int, region: str, is_data: bool
) -> tuple[GeneratedFile, dict[str, Any]]:
    """Simulate and write one (region, MC/data) file; returns its description and jet truth."""
    import pyarrow as pa

    dataset = f"{'data' if is_data else 'mc'}_{region}"
    rng = np.random.default_rng([config.seed, zlib.crc32(region.encode()), int(is_data)])
    n = config.jets(region, is_data)
    fractions = config.regions[region].fractions(is_data)
    flav = rng.choice(3, size=n, p=fractions.as_array())
    jets, columns = _response(config, flav, is_data, rng)
    kin = config.kinematics
    counts = lt.sample_event_sizes(n, rng, kin.jets_per_event_mean, kin.jets_per_event_max)
    event_of_jet = np.repeat(np.arange(counts.shape[0]), counts)
    order = np.lexsort((-jets["pt"], event_of_jet))  # NanoAOD: jets by decreasing pT
    jets = {key: val[order] for key, val in jets.items()}
    columns = {key: val[order] for key, val in columns.items()}
    first_event = 1 + k * 1_000_000_000 + int(is_data) * 500_000_000
    path = out / f"{dataset}.root"
    _write_root(path, jets, columns, counts, first_event, is_data, config)
    info = GeneratedFile(
        dataset=dataset,
        region=region,
        is_data=is_data,
        path=str(path.resolve()),
        n_events=int(counts.shape[0]),
        n_jets=n,
        flavour_counts=dict(zip(CLASSES, np.bincount(flav, minlength=3).tolist(), strict=True)),
        configured_fractions=dict(zip(CLASSES, fractions.as_array().tolist(), strict=True)),
    )
    logger.info("wrote %s: %d events, %d jets, %s", path, info.n_events, n, info.flavour_counts)
    table = {
        "file": pa.array(np.full(n, path.name)).dictionary_encode(),
        "region": pa.array(np.full(n, region)).dictionary_encode(),
        "is_data": np.full(n, is_data),
        "event": (first_event + event_of_jet).astype(np.uint64),
        "jet": (np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)).astype(np.uint16),
        "flavour": jets["flavour"].astype(np.int8),
        "pt": jets["pt"],
        **{f"p_{c}_raw": jets["probs_raw"][:, i] for i, c in enumerate(CLASSES)},
    }
    return info, table


def _truth_document(config: GeneratorConfig, files: list[GeneratedFile]) -> dict[str, Any]:
    """The content of ``truth.json``."""
    adapter = get_adapter(config.tagger)
    regions: dict[str, dict[str, Any]] = {}
    for f in files:
        regions.setdefault(f.region, {})["data" if f.is_data else "mc"] = {
            "configured_fractions": f.configured_fractions,
            "realised_fractions": {c: f.flavour_counts[c] / f.n_jets for c in CLASSES},
            "flavour_counts": f.flavour_counts,
            "n_jets": f.n_jets,
            "n_events": f.n_events,
        }
    lat = config.latent
    return {
        "schema_version": TRUTH_SCHEMA_VERSION,
        "writer_info": _writer_info(),
        "config": config.model_dump(mode="json"),
        "tagger": {
            "adapter": config.tagger,
            "columns": list(adapter.columns),
            "classes": list(adapter.classes),
            "quantised": config.quantise,
            "layout": config.layout,
            "mantissa_bits": config.mantissa_bits,
        },
        "flavour_codes": dict(zip(CLASSES, lt.FLAVOUR_CODES, strict=True)),
        "features": list(lt.FEATURE_NAMES),
        "latent": {
            "enabled": lat.enabled,
            "latent_dim": lat.latent_dim,
            "branches": f"Jet_{lat.branch_prefix}_<i>, i = 0..{lat.latent_dim - 1}",
        },
        "regions": regions,
        "files": [{**f.model_dump(), "path": Path(f.path).name} for f in files],
        "jet_truth": "truth_jets.parquet",
    }


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``coffea-otcal generate``."""
    parser.add_argument("outdir", type=Path, help="output directory")
    parser.add_argument("--config", type=Path, help="generator config (.json/.yaml)")
    parser.add_argument("--seed", type=int, help="sample seed (overrides the config)")
    parser.add_argument("--jets", type=int, help="jets per region, MC and data (overrides)")
    parser.add_argument("--scale", type=float, help="multiply every region's jet count")
    parser.add_argument("--tagger", help="tagger column format: deepjet (default), gn2, ...")
    parser.add_argument("--latent", action="store_true", help="latent mode (store Jet_latent_*)")
    parser.add_argument("--latent-dim", type=int, help="latent dimension (default 128)")
    parser.add_argument("--mismodelling", type=float, help="mismodelling strength (0 = none)")
    parser.add_argument("--no-quantise", action="store_true", help="store full float32 scores")
    parser.add_argument(
        "--layout", choices=["nanoaod", "physlite"], help="file layout (default nanoaod)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``coffea-otcal generate``; prints one line per written file."""
    base = GeneratorConfig.from_file(args.config) if args.config else GeneratorConfig()
    data = base.model_dump()
    overrides = {
        "seed": args.seed, "scale": args.scale, "tagger": args.tagger, "layout": args.layout
    }
    data.update({k: v for k, v in overrides.items() if v is not None})
    if args.jets is not None:
        for reg in data["regions"].values():
            reg.update(n_jets=args.jets, n_jets_data=None)
    if args.latent:
        data["latent"]["enabled"] = True
    if args.latent_dim is not None:
        data["latent"]["latent_dim"] = args.latent_dim
    if args.mismodelling is not None:
        data["mismodelling"]["strength"] = args.mismodelling
    if args.no_quantise:
        data["quantise"] = False
    sample = generate(
        GeneratorConfig.model_validate(data), args.outdir, progress=not args.no_progress
    )
    for f in sample.files:
        sys.stdout.write(f"{f.path}: {f.n_events} events, {f.n_jets} jets, {f.flavour_counts}\n")
    sys.stdout.write(f"truth: {sample.truth_path}, {sample.jet_truth_path}\n")
    return 0
