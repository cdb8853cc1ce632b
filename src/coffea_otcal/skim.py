"""``coffea-otcal apply``: calibrate ROOT files with a bundle and write skims atomically.

NanoAOD by default; ATLAS PHYSLITE and flat analysis ntuples with ``--input`` (and
``--btagging``, ``--field``; :mod:`coffea_otcal.input_layout`).

``coffea-otcal apply BUNDLE FILES... -o OUT`` runs
:class:`coffea_otcal.processors.calibration.CalibrationProcessor` over the files in chunks
of ``--chunksize`` events (bounded memory) with coffea's executors: ``iterative`` (eager,
in process), ``futures`` (``--workers N`` processes) or ``dask`` (coffea's ``DaskExecutor``
on a ``distributed`` cluster at ``--scheduler ADDRESS`` or a ``LocalCluster`` of
``--workers N``). Each chunk becomes one part file ``OUT/<dataset>__<file>__<start>-<stop>``
(``.parquet`` or ``.root``) holding ``run``, ``luminosityBlock``, ``event`` and the jets
with their original and calibrated columns (``docs/bundle.md``).

Atomicity: parts are written into a hidden staging folder ``.OUT.partial-<id>`` next to
``OUT``; the manifest ``otcal_skim.json`` (inputs, bundle digest, parts, per-status jet
counts) is written last and the folder is renamed to ``OUT`` only when every chunk
succeeded. An interrupted or failed skim leaves no ``OUT``.

Dask workers: distributed's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in every worker.
Any fixed value also switches off glibc's dynamic mmap threshold, so every large buffer of
uproot/awkward is mmap-ed and unmapped again: opening the real ``nano_tt_v15.root`` with
NanoEvents took 6.1 s per open on a LocalCluster worker with 65536 (5.6 s with 128 MiB)
and 2.2 s with the variable unset (``benchmarks/bench_apply.py`` section 4, loaded
machine; 12.0-12.4 / 13.3 / 3.6-4.8 s in a more loaded run). LocalCluster skims therefore
unset it by default (``--malloc-trim-threshold unset``); pass bytes or ``distributed`` to
choose otherwise.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_MALLOC_TRIM_THRESHOLD",
    "SKIM_MANIFEST",
    "add_arguments",
    "run",
    "run_skim",
]

import argparse
import contextlib
import fnmatch
import io
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from coffea_otcal.applier import Calibrator
from coffea_otcal.bundle import WriterInfo
from coffea_otcal.input_layout import BTaggingLink, InputLayout, stored_jet_fields
from coffea_otcal.processors.calibration import DEFAULT_JET_FIELDS

logger = logging.getLogger(__name__)

#: name of the manifest that marks a complete skim.
SKIM_MANIFEST = "otcal_skim.json"
#: ``MALLOC_TRIM_THRESHOLD_`` given to dask workers (bytes); None keeps distributed's 65536.
DEFAULT_MALLOC_TRIM_THRESHOLD: int | Literal["unset"] | None = "unset"

Executor = Literal["iterative", "futures", "dask"]
MallocTrim = int | Literal["unset"] | None
_TRIM = "MALLOC_TRIM_THRESHOLD_"


def _spellings(
    field: str, tagger: bool, collection: str, layout: InputLayout | None
) -> tuple[str, ...]:
    """The branch names that can store a jet field (NanoAOD also ``Jet.x``, ``Jet/x``)."""
    if layout is None:
        return tuple(f"{collection}{sep}{field}" for sep in ("_", ".", "/"))
    from coffea_otcal.input_layout import jet_branch_candidates, tagger_branch_candidates

    find = tagger_branch_candidates if tagger else jet_branch_candidates
    return find(layout, collection, field)


def _has_any(branches: set[str], names: Sequence[str]) -> bool:
    return any(n in branches for n in names)


def _per_jet_number(branch: Any) -> bool:
    """Whether a branch holds one number per jet (a singly jagged numeric interpretation)."""
    import uproot

    try:
        interp = branch.interpretation
    except Exception:
        return False
    return isinstance(interp, uproot.AsJagged) and isinstance(interp.content, uproot.AsDtype)


def _check_inputs(
    files: Sequence[str | os.PathLike[str]],
    calibrator: Calibrator,
    treename: str,
    collection: str,
    is_data: bool | None,
    data_glob: str | None,
    layout: InputLayout | None = None,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Open every file once: tree and tagger branches present; decide data/MC; fileset.

    Returns the fileset and the jet fields every file stores (``Jet_<f>``), in file order.
    """
    import uproot

    fileset: dict[str, dict[str, Any]] = {}
    common: list[str] | None = None
    for name in files:
        path = Path(name)
        if not path.is_file():
            msg = f"input file {str(path)!r} not found"
            raise FileNotFoundError(msg)
        with uproot.open(path) as handle:
            if treename not in handle:
                msg = f"{str(path)!r} has no tree {treename!r}; keys: {handle.keys()[:20]}"
                raise ValueError(msg)
            tree = handle[treename]
            names = list(tree.keys())
            branches = set(names)
            # PHYSLITE and flat ntuples mix per-jet numbers with links, nested vectors and
            # per-event scalars under the same prefix: "all" keeps the per-jet numbers
            keepable = names if layout is None else [n for n in names if _per_jet_number(tree[n])]
        stored = stored_jet_fields(keepable, layout or InputLayout(), collection)
        tagger = set(calibrator.adapter.columns)
        spell = {
            f: _spellings(f, f in tagger, collection, layout)
            for f in (*calibrator.data_columns, calibrator.flavour_column)
        }
        has = {f: _has_any(branches, names_) for f, names_ in spell.items()}
        common = stored if common is None else [f for f in common if f in set(stored)]
        missing = [c for c in calibrator.data_columns if not has[c]]
        if missing:
            msg = (
                f"columns {[spell[c][0] for c in missing]} read by adapter "
                f"{calibrator.adapter.name!r} are missing from {str(path)!r}; choose the bundle "
                f"that matches the file's tagger, or the file's layout (--input)"
            )
            raise ValueError(msg)
        if is_data is False and not has[calibrator.flavour_column]:
            msg = (
                f"{str(path)!r} is declared MC but has no truth-flavour branch "
                f"{spell[calibrator.flavour_column][0]!r}; drop --mc for data files"
            )
            raise KeyError(msg)
        data = is_data
        if data is None and data_glob is not None and fnmatch.fnmatch(path.name, data_glob):
            data = True
        if data is None:
            data = not has[calibrator.flavour_column]
        dataset = path.name.split(".")[0]
        while dataset in fileset:
            dataset += "_"
        fileset[dataset] = {
            "files": {str(path.resolve()): treename},
            "metadata": {"is_data": bool(data)},
        }
    if not fileset:
        msg = "no input files given"
        raise ValueError(msg)
    return fileset, common or []


@contextlib.contextmanager
def _executor(
    kind: Executor,
    workers: int,
    scheduler: str | None,
    progress: bool,
    malloc_trim_threshold: MallocTrim,
) -> Iterator[Any]:
    """Yield a coffea executor; a dask client / LocalCluster is closed on exit."""
    from coffea import processor

    if kind == "iterative":
        yield processor.IterativeExecutor(status=progress)
    elif kind == "futures":
        yield processor.FuturesExecutor(workers=max(1, workers), status=progress)
    elif kind == "dask":
        import dask
        from distributed import Client, LocalCluster

        if scheduler is not None:
            with Client(scheduler) as client:
                yield processor.DaskExecutor(client=client, status=progress)
            return
        environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
        # A LocalCluster's nannies run here and copy pre-spawn-environ into os.environ,
        # which then overrides the config for later clusters: set it and restore it.
        saved = os.environ.get(_TRIM)
        if malloc_trim_threshold == "unset":
            environ[_TRIM] = None
            os.environ.pop(_TRIM, None)
        elif malloc_trim_threshold is not None:
            environ[_TRIM] = int(malloc_trim_threshold)
            os.environ[_TRIM] = str(int(malloc_trim_threshold))
        try:
            with (
                dask.config.set({"distributed.nanny.pre-spawn-environ": environ}),
                LocalCluster(
                    n_workers=max(1, workers),
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    silence_logs=logging.WARNING,
                ) as cluster,
                Client(cluster) as client,
            ):
                yield processor.DaskExecutor(client=client, status=progress)
        finally:
            if saved is None:
                os.environ.pop(_TRIM, None)
            else:
                os.environ[_TRIM] = saved
    else:
        msg = f"unknown executor {kind!r}; use 'iterative', 'futures' or 'dask'"
        raise ValueError(msg)


def run_skim(
    bundle: Any,
    files: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    fmt: Literal["parquet", "root"] = "parquet",
    executor: Executor = "iterative",
    workers: int = 1,
    scheduler: str | None = None,
    chunksize: int = 100_000,
    treename: str = "Events",
    collection: str | None = None,
    is_data: bool | None = None,
    data_glob: str | None = None,
    variations: Sequence[str] | None = None,
    calibrate: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    malloc_trim_threshold: MallocTrim = DEFAULT_MALLOC_TRIM_THRESHOLD,
    precision: Literal["float64", "float32"] = "float32",
    probabilities: bool = False,
    jet_fields: Sequence[str] | Literal["all"] = DEFAULT_JET_FIELDS,
    event_fields: Sequence[str] | None = None,
    layout: InputLayout | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Calibrate ``files`` with ``bundle`` and write a skim folder ``output`` atomically.

    Arguments:
        bundle: a Bundle, Calibrator or bundle path.
        files: ROOT files (NanoAOD; PHYSLITE or flat ntuples with ``layout``).
        output: the skim folder (must not exist unless ``overwrite``).
        fmt: ``"parquet"`` or ``"root"`` part files.
        executor: ``"iterative"``, ``"futures"`` or ``"dask"``.
        workers: processes (futures) or LocalCluster workers (dask without scheduler).
        scheduler: address of a running dask scheduler (dask executor).
        chunksize: events per chunk (bounds the memory of a task).
        treename: the events tree.
        collection: the jet collection (default: the layout's, ``Jet`` for NanoAOD).
        is_data: force data (True) or MC (False) for every file; None decides per file.
        data_glob: file-name pattern marking data files (e.g. ``"data_*"``); files without
            the flavour branch are data too.
        variations: variation names (None: all).
        calibrate: False writes the same skim without calibrated columns (reference).
        progress: show coffea's progress bars.
        overwrite: replace an existing ``output``.
        malloc_trim_threshold: ``MALLOC_TRIM_THRESHOLD_`` of LocalCluster workers: bytes,
            ``"unset"`` (glibc's dynamic thresholds) or None (distributed's 65536).
        precision: float precision of the potential evaluation and of the written
            columns (``Calibrator`` ``dtype``; default float32, the precision NanoAOD stores
            tagger scores in: about 2x faster than float64 and within 1e-5 of it); ignored
            for a Calibrator.
        probabilities: also write the calibrated probabilities ``p_<class>_otcal`` and
            ``OTCAL_<v>.up/down.p_<class>``; by default the skim holds the tagger's own
            calibrated columns, from which the adapter recovers them exactly.
        jet_fields: jet fields kept besides the tagger, flavour and calibrated columns
            (default ``pt, eta, phi, mass``), or ``"all"``: every ``Jet_*`` branch that every
            input file stores (an analysis skim of the whole jet collection).
        event_fields: event-level branches or paths kept when present (default
            ``run, luminosityBlock, event``; PHYSLITE ``EventInfo.runNumber``,
            ``EventInfo.lumiBlock``, ``EventInfo.eventNumber``; flat ``runNumber``,
            ``eventNumber``).
        layout: the files' layout (:class:`~coffea_otcal.input_layout.InputLayout` or its
            mapping, e.g. ``{"format": "physlite", "btagging": {}}``); None: NanoAOD.

    Returns:
        The manifest written to ``output/otcal_skim.json``.
    """
    from coffea import processor

    from coffea_otcal.processors.calibration import CalibrationProcessor

    calibrator = bundle if isinstance(bundle, Calibrator) else Calibrator(bundle, dtype=precision)
    out = Path(output)
    if out.exists() and not overwrite:
        msg = f"skim output {str(out)!r} exists; remove it or pass --overwrite"
        raise FileExistsError(msg)
    from coffea_otcal.input_layout import default_collection, default_event_fields, schema_class

    if layout is not None and not isinstance(layout, InputLayout):
        layout = InputLayout.model_validate(layout)
    if layout is not None and layout.format == "nanoaod" and not layout.fields:
        layout = None  # the NanoAOD route, as without a layout
    plain = InputLayout() if layout is None else layout
    collection = collection or default_collection(plain)
    if event_fields is None:
        event_fields = default_event_fields(plain)
    fileset, stored = _check_inputs(
        files, calibrator, treename, collection, is_data, data_glob, layout
    )
    kept = stored if jet_fields == "all" else list(jet_fields)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir(parents=True)
    start = time.perf_counter()
    try:
        proc = CalibrationProcessor(
            calibrator,
            output_dir=staging.resolve(),
            fmt=fmt,
            collection=collection,
            variations=variations,
            calibrate=calibrate,
            probabilities=probabilities,
            jet_fields=kept,
            event_fields=list(event_fields),
            layout=layout,
            data_datasets=[name for name, e in fileset.items() if e["metadata"]["is_data"]],
        )
        # coffea's rich bars render their final state even when disabled: swallow them.
        quiet = contextlib.nullcontext() if progress else contextlib.redirect_stdout(io.StringIO())
        with quiet, _executor(executor, workers, scheduler, progress, malloc_trim_threshold) as ex:
            runner = processor.Runner(
                executor=ex,
                # NanoAOD: the fill's lenient NanoAOD schema (no event IDs or cross-reference
                # targets required, so any tree with nJet + Jet_* branches is read)
                schema=schema_class(plain),
                chunksize=chunksize,
                metadata_cache={},
            )
            result = runner(fileset, processor_instance=proc, treename=treename)
        manifest = {
            "format": "coffea-otcal-skim",
            "version": 1,
            "writer_info": WriterInfo.current().model_dump(mode="json"),
            "bundle_digest": calibrator.bundle.content_digest(),
            "calibrated": calibrate,
            "skim_format": fmt,
            "executor": executor,
            "precision": calibrator.dtype.name,
            "inputs": {
                name: {"files": list(entry["files"]), **entry["metadata"]}
                for name, entry in fileset.items()
            },
            "variations": list(variations) if variations is not None else calibrator.variations,
            "jet_fields": kept,
            "event_fields": list(event_fields),
            "layout": plain.model_dump(mode="json"),
            "collection": collection,
            "events": int(result.get("events", 0)),
            "jets": int(result.get("jets", 0)),
            "status": dict(result.get("status", {})),
            "clamped": int(result.get("clamped", 0)),
            "parts": sorted(result.get("parts", [])),
            "bytes": int(result.get("bytes", 0)),
            "wall_seconds": round(time.perf_counter() - start, 3),
        }
        (staging / SKIM_MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
            out.rename(trash)
            staging.rename(out)
            shutil.rmtree(trash)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        "skim %s: %d events, %d jets, status %s, %d clamped, %.1f s",
        out,
        manifest["events"],
        manifest["jets"],
        manifest["status"],
        manifest["clamped"],
        manifest["wall_seconds"],
    )
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``apply`` options."""
    parser.add_argument("bundle", help="bundle file (.json or .json.gz)")
    parser.add_argument("files", nargs="+", help="ROOT files (NanoAOD, or see --input)")
    parser.add_argument("-o", "--output", required=True, help="skim folder to create")
    parser.add_argument("--format", dest="fmt", choices=["parquet", "root"], default="parquet")
    parser.add_argument(
        "--executor",
        choices=["iterative", "futures", "dask"],
        default=None,
        help="default: dask with --scheduler or --workers > 1, else iterative",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes / LocalCluster workers")
    parser.add_argument("--scheduler", default=None, help="dask scheduler address (dask executor)")
    parser.add_argument("--chunksize", type=int, default=100_000, help="events per chunk")
    parser.add_argument("--treename", default="Events")
    parser.add_argument(
        "--collection", default=None, help="jet collection (default Jet; PHYSLITE Jets; flat jet)"
    )
    parser.add_argument(
        "--input",
        dest="input_format",
        choices=["nanoaod", "physlite", "flat"],
        default="nanoaod",
        help="file layout (docs/store.md): NanoAOD, ATLAS PHYSLITE or a flat ntuple",
    )
    parser.add_argument(
        "--btagging",
        default=None,
        metavar="CONTAINER[:LINK]",
        help="PHYSLITE: read the tagger columns from this b-tagging container through the "
        "jets' ElementLink (default link btaggingLink), e.g. BTagging_AntiKt4EMPFlow",
    )
    parser.add_argument(
        "--field",
        action="append",
        default=[],
        metavar="NAME=FILE_FIELD",
        help="read the bundle's jet field NAME from FILE_FIELD (repeatable), e.g. pt=pt_NOSYS",
    )
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--data",
        dest="is_data",
        action="store_true",
        default=None,
        help="every file is data (jets are not moved)",
    )
    kind.add_argument("--mc", dest="is_data", action="store_false", help="every file is MC")
    parser.add_argument(
        "--data-glob", default=None, help="file-name pattern of data files, e.g. 'data_*'"
    )
    parser.add_argument(
        "--variations",
        default=None,
        help="comma-separated variation names (default: all; '' nominal only)",
    )
    parser.add_argument(
        "--no-calibration",
        dest="calibrate",
        action="store_false",
        help="write the skim without calibrated columns (reference)",
    )
    parser.add_argument(
        "--precision",
        choices=["float64", "float32"],
        default="float32",
        help="float precision of the map evaluation and the written columns (default float32, "
        "as NanoAOD stores tagger scores; float64: bit-equal to Calibrator(bundle))",
    )
    parser.add_argument(
        "--probabilities",
        action="store_true",
        help="also write the calibrated probabilities p_<class> (default: the tagger's own "
        "calibrated columns only, from which the adapter recovers them)",
    )
    parser.add_argument(
        "--keep-jet",
        default=None,
        help="comma-separated jet fields kept besides the tagger, flavour and calibrated ones "
        "(default: pt,eta,phi,mass), or 'all': every Jet_* branch of the inputs",
    )
    parser.add_argument(
        "--keep-event",
        default=None,
        help="comma-separated event branches kept (default: run,luminosityBlock,event)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument(
        "--malloc-trim-threshold",
        type=_trim_option,
        default=DEFAULT_MALLOC_TRIM_THRESHOLD,
        help="MALLOC_TRIM_THRESHOLD_ of LocalCluster workers: bytes, 'unset' (glibc's "
        "dynamic default) or 'distributed' (65536, distributed's setting); default: "
        f"{DEFAULT_MALLOC_TRIM_THRESHOLD or 'distributed'}",
    )


def _layout_option(args: argparse.Namespace) -> InputLayout | None:
    fields = {}
    for item in args.field:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            msg = f"--field takes NAME=FILE_FIELD, got {item!r}"
            raise SystemExit(msg)
        fields[name.strip()] = value.strip()
    btagging = None
    if args.btagging:
        container, _, link = args.btagging.partition(":")
        btagging = BTaggingLink(collection=container, link=link or "btaggingLink")
    if args.input_format == "nanoaod" and not fields and btagging is None:
        return None
    try:
        return InputLayout(format=args.input_format, fields=fields, btagging=btagging)
    except ValueError as err:
        msg = f"--input/--btagging/--field: {err}"
        raise SystemExit(msg) from None


def _fields_option(text: str | None, default: Sequence[str] | None, allow_all: bool) -> Any:
    if text is None:
        return None if default is None else list(default)
    if text.strip() == "all":
        if not allow_all:
            msg = "--keep-event takes field names, not 'all'"
            raise SystemExit(msg)
        return "all"
    return [f.strip() for f in text.split(",") if f.strip()]


def _trim_option(text: str) -> MallocTrim:
    if text in ("unset", "distributed"):
        return None if text == "distributed" else "unset"
    try:
        return int(text)
    except ValueError:
        msg = f"--malloc-trim-threshold takes bytes, 'unset' or 'distributed', got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def run(args: argparse.Namespace) -> int:
    """Run ``coffea-otcal apply``; prints a one-line summary."""
    executor = args.executor
    if executor is None:
        executor = "dask" if (args.scheduler or args.workers > 1) else "iterative"
    variations = None
    if args.variations is not None:
        variations = [v for v in args.variations.split(",") if v]
    manifest = run_skim(
        args.bundle,
        args.files,
        args.output,
        fmt=args.fmt,
        executor=executor,
        workers=args.workers,
        scheduler=args.scheduler,
        chunksize=args.chunksize,
        treename=args.treename,
        collection=args.collection,
        is_data=args.is_data,
        data_glob=args.data_glob,
        variations=variations,
        calibrate=args.calibrate,
        progress=args.progress,
        overwrite=args.overwrite,
        precision=args.precision,
        probabilities=args.probabilities,
        malloc_trim_threshold=args.malloc_trim_threshold,
        jet_fields=_fields_option(args.keep_jet, DEFAULT_JET_FIELDS, allow_all=True),
        event_fields=_fields_option(args.keep_event, None, allow_all=False),
        layout=_layout_option(args),
    )
    sys.stdout.write(
        f"{args.output}: {len(manifest['parts'])} parts, {manifest['events']} events, "
        f"{manifest['jets']} jets {manifest['status']}, {manifest['clamped']} clamped, "
        f"{manifest['wall_seconds']} s\n"
    )
    return 0
