"""``coffea-otcal fill CONFIG``: run the control-region processor and write the store.

The configuration (YAML or TOML, validated by :class:`FillConfig`) names the datasets
(files, MC or data, tree, weight), the regions (datasets and an optional jet selection),
the tagger adapter, the truth-flavour column, the executor and the output path::

    datasets:
      ttbar: {files: [nano_tt_v15.root], is_data: false, weight: genWeight}
    regions:
      all_jets: {datasets: [ttbar], selection: "pt > 30 & abs(eta) < 2.5"}
    adapter: {name: deepjet}
    flavour_column: hadronFlavour
    executor: {kind: futures, workers: 2, chunksize: 100000}
    output: cr_store.parquet

Relative file paths are resolved against the folder of the configuration file.

Executors (all through coffea's ``processor.Runner``): ``iterative`` (one process),
``futures`` (``FuturesExecutor`` on a process or thread pool) and ``dask``
(``DaskExecutor`` on a ``distributed`` cluster: ``scheduler_address``, or a
``LocalCluster`` started and closed by the fill). The dask-awkward route of coffea is not
used: in coffea 2026.9 it needs dask < 2025.4, which conflicts with current dask.

Bad input: before running, every file is opened and checked (readable, not truncated,
the tree exists and has entries, every branch the fill needs is there); all problems are
reported at once, naming file and branch. With ``skip_bad_files`` the bad files are left
out, listed in the report and in the store metadata, and coffea's ``skipbadfiles`` also
skips chunks that fail to read at run time.
"""

from __future__ import annotations

__all__ = [
    "AdapterConfig",
    "ConfigError",
    "DatasetConfig",
    "ExecutorConfig",
    "FileCheck",
    "FillConfig",
    "FillReport",
    "PreselectionConfig",
    "RegionConfig",
    "add_arguments",
    "check_file",
    "load_config",
    "required_branches",
    "run",
    "run_fill",
]

import argparse
import contextlib
import io
import logging
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from coffea_otcal.config import ConfigError, read_config_file, validate_model
from coffea_otcal.input_layout import (
    InputLayout,
    default_collection,
    event_branch_candidates,
    jet_branch_candidates,
    link_branch_candidates,
    tagger_branch_candidates,
)
from coffea_otcal.store import BadFile, Cutflow, DatasetInfo, RegionInfo, StoreMetadata

logger = logging.getLogger(__name__)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetConfig(_Model):
    """One dataset: its files and how to read them."""

    files: list[str] = Field(min_length=1, description="ROOT files (globs allowed)")
    is_data: bool = Field(default=False, description="collision data (no truth, unit weights)")
    tree: str = Field(default="Events", description="event tree name")
    weight: str | None = Field(
        default="genWeight",
        description="MC event weight: a branch, or a path such as EventInfo.mcEventWeights[0]; null: 1",
    )
    scale: float = Field(default=1.0, gt=0, description="factor on every weight (xsec*lumi/sumw)")


class RegionConfig(_Model):
    """One control region."""

    datasets: list[str] = Field(min_length=1, description="datasets filling the region")
    selection: str | None = Field(default=None, description='jet selection, e.g. "pt > 30"')


class AdapterConfig(_Model):
    """The tagger adapter (``coffea_otcal.adapters.get_adapter(name, **options)``)."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class PreselectionConfig(_Model):
    """Kinematic preselection before the region selections (counted in the cutflow)."""

    pt_min: float | None = None
    abs_eta_max: float | None = Field(default=None, gt=0)


class ExecutorConfig(_Model):
    """Where the processor runs."""

    kind: Literal["iterative", "futures", "dask"] = "iterative"
    workers: int = Field(default=2, ge=1, description="futures pool size / LocalCluster workers")
    pool: Literal["processes", "threads"] = Field(default="processes", description="futures pool")
    scheduler_address: str | None = Field(
        default=None, description="dask scheduler; null: LocalCluster"
    )
    processes: bool = Field(default=True, description="LocalCluster with worker processes")
    chunksize: int = Field(default=100_000, ge=1, description="events per chunk")
    maxchunks: int | None = Field(default=None, ge=1, description="chunks per dataset (testing)")
    retries: int = Field(default=0, ge=0, description="retries of a failed chunk")


class FillConfig(_Model):
    """The ``coffea-otcal fill`` configuration."""

    datasets: dict[str, DatasetConfig] = Field(min_length=1)
    regions: dict[str, RegionConfig] = Field(min_length=1)
    adapter: AdapterConfig
    output: str = Field(description="the parquet store to write")
    flavour_column: str = "hadronFlavour"
    flavour_codes: dict[str, int] | None = Field(default=None, description="class -> truth code")
    input: InputLayout = Field(
        default_factory=InputLayout, description="file layout: nanoaod, physlite or flat"
    )
    jet_collection: str | None = Field(
        default=None, description="jet collection (default Jet, PHYSLITE Jets, flat jet)"
    )
    kinematics: list[str] = Field(default_factory=lambda: ["pt", "eta", "phi"])
    latent: int | Literal["auto"] = Field(default=0, description="latent_<i> columns (auto: all)")
    preselection: PreselectionConfig = Field(default_factory=PreselectionConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    skip_bad_files: bool = False
    seed: int = 0

    @property
    def collection(self) -> str:
        """The jet collection read: ``jet_collection`` or the layout's default."""
        return self.jet_collection or default_collection(self.input)


def _cross_check(raw: Mapping[str, Any]) -> list[str]:
    """Problems between keys that pydantic checks one by one (run on the raw document)."""
    from coffea_otcal.adapters import get_adapter
    from coffea_otcal.processors.control_region import SelectionExpression

    problems = []
    datasets_value, regions_value = raw.get("datasets"), raw.get("regions")
    datasets: Mapping[str, Any] = datasets_value if isinstance(datasets_value, Mapping) else {}
    regions: Mapping[str, Any] = regions_value if isinstance(regions_value, Mapping) else {}
    used: set[str] = set()
    for name, region in regions.items():
        if not isinstance(region, Mapping):
            continue
        names_value = region.get("datasets")
        names: list[Any] = names_value if isinstance(names_value, list) else []
        used.update(map(str, names))
        unknown = [d for d in names if d not in datasets]
        if unknown and datasets:
            problems.append(
                f"regions.{name}.datasets: unknown datasets {unknown}; known: {sorted(datasets)}"
            )
        if isinstance(region.get("selection"), str):
            try:
                SelectionExpression(region["selection"])
            except ValueError as err:
                problems.append(f"regions.{name}.selection: {err}")
    problems.extend(
        f"datasets.{name}: in no region; add it to a region's datasets or remove it"
        for name in datasets
        if name not in used and regions
    )
    adapter = raw.get("adapter")
    if isinstance(adapter, Mapping) and isinstance(adapter.get("name"), str):
        options_value = adapter.get("options")
        options: Mapping[str, Any] = options_value if isinstance(options_value, Mapping) else {}
        try:
            built = get_adapter(adapter["name"], **options)
        except (ValueError, TypeError) as err:
            problems.append(f"adapter: {err}")
        else:
            codes = raw.get("flavour_codes")
            if isinstance(codes, Mapping) and set(codes) != set(built.classes):
                problems.append(
                    f"flavour_codes: keys {sorted(codes)} must be the adapter classes {list(built.classes)}"
                )
    return problems


def load_config(
    source: str | Path | Mapping[str, Any], base_dir: str | Path | None = None
) -> FillConfig:
    """Read and validate a fill configuration, listing every problem at once.

    Arguments:
        source: a ``.yaml`` / ``.yml`` / ``.toml`` file, or an already parsed mapping.
        base_dir: folder against which relative paths are resolved (default: the
            configuration file's folder, or the working directory for a mapping).

    Returns:
        The validated :class:`FillConfig` with absolute file and output paths.

    Raises:
        ConfigError: the file cannot be parsed or the configuration is invalid.
    """
    if isinstance(source, Mapping):
        raw, where = dict(source), "configuration"
        base = Path(base_dir or Path.cwd())
    else:
        raw = read_config_file(source, "fill configuration")
        where, base = str(source), Path(base_dir or Path(source).parent)
    config = validate_model(FillConfig, raw, where, _cross_check)
    return _resolve_paths(config, base)


def _resolve_paths(config: FillConfig, base: Path) -> FillConfig:
    problems = []
    datasets = {}
    for name, ds in config.datasets.items():
        files: list[str] = []
        for entry in ds.files:
            if "://" in entry:
                files.append(entry)
                continue
            full = Path(entry) if Path(entry).is_absolute() else base / entry
            if any(c in entry for c in "*?["):
                matched = sorted(str(p) for p in full.parent.glob(full.name))
                if not matched:
                    problems.append(
                        f"datasets.{name}.files: pattern {entry!r} matches no file in {base}"
                    )
                files.extend(matched)
            else:
                files.append(str(full))
        datasets[name] = ds.model_copy(update={"files": files})
    if problems:
        msg = "configuration problems:\n  " + "\n  ".join(problems)
        raise ConfigError(msg)
    output = Path(config.output)
    output = output if output.is_absolute() else base / output
    return config.model_copy(update={"datasets": datasets, "output": str(output)})


def required_branches(
    config: FillConfig, dataset: str, latent_dim: int = 0
) -> list[str | tuple[str, ...]]:
    """The branches a dataset's files must hold (a tuple: any one of its spellings)."""
    from coffea_otcal.adapters import get_adapter
    from coffea_otcal.processors.control_region import SelectionExpression

    ds = config.datasets[dataset]
    coll, layout = config.collection, config.input
    tagger = list(get_adapter(config.adapter.name, **config.adapter.options).columns)
    jet = config.kinematics + [f"latent_{i}" for i in range(latent_dim)]
    if not ds.is_data:
        jet.append(config.flavour_column)
    if config.preselection.pt_min is not None:
        jet.append("pt")
    if config.preselection.abs_eta_max is not None:
        jet.append("eta")
    for region in config.regions.values():
        if dataset in region.datasets and region.selection:
            jet += sorted(SelectionExpression(region.selection).names)
    branches: list[str | tuple[str, ...]] = [f"n{coll}"] if layout.format == "nanoaod" else []
    branches += [tagger_branch_candidates(layout, coll, name) for name in tagger]
    branches += [jet_branch_candidates(layout, coll, name) for name in dict.fromkeys(jet)]
    if layout.btagging is not None:
        branches.append(link_branch_candidates(layout, coll))
    if not ds.is_data and ds.weight:
        branches.append(event_branch_candidates(layout, ds.weight))
    return [b[0] if len(b) == 1 and isinstance(b, tuple) else b for b in dict.fromkeys(branches)]


class FileCheck(NamedTuple):
    """Outcome of :func:`check_file`."""

    problem: str | None
    entries: int
    branches: list[str]
    uuid: bytes | None


def check_file(path: str, tree: str, branches: Sequence[str | tuple[str, ...]]) -> FileCheck:
    """Open one input file and check it can be filled from.

    Arguments:
        path: the file (local path or URL uproot opens).
        tree: the event tree name.
        branches: branches the fill reads (:func:`required_branches`; a tuple is satisfied
            by any one of its names).

    Returns:
        A :class:`FileCheck`; its ``problem`` (None when the file is good) names the file,
        the tree or the branches and what to do.
    """
    import uproot

    try:
        with uproot.open(path) as handle:
            size = Path(path).stat().st_size if "://" not in path else None
            end = getattr(handle.file, "fEND", None)
            if size is not None and end is not None and size < end:
                return FileCheck(
                    f"{path} is truncated ({size} of {end} bytes); copy it again", 0, [], None
                )
            if tree not in handle:
                trees = [
                    k.split(";")[0] for k, c in handle.classnames().items() if c.startswith("TTree")
                ]
                return FileCheck(
                    f"{path} has no tree {tree!r} (trees: {trees}); set the dataset's tree",
                    0,
                    [],
                    None,
                )
            ttree = handle[tree]
            names = list(ttree.keys())
            if isinstance(ttree, uproot.behaviors.RNTuple.HasFields):
                # RNTuple fields are Jet.pt; coffea reads them as the TTree's Jet_pt / nJet
                # (other layouts keep the dotted names: both spellings are accepted)
                names = names + [n.replace(".", "_") for n in names] + [
                    f"n{n}"
                    for n in names
                    if "." not in n and any(m.startswith(f"{n}.") for m in names)
                ]
            present = set(names)
            missing = [
                b if isinstance(b, str) else " or ".join(b)
                for b in branches
                if (b not in present if isinstance(b, str) else not present.intersection(b))
            ]
            if missing:
                problem = (
                    f"{path}: tree {tree!r} lacks the branches {missing}; check the adapter, "
                    f"kinematics, flavour_column, weight and selections"
                )
            elif ttree.num_entries == 0:
                problem = f"{path}: tree {tree!r} is empty (0 entries); remove the file"
            else:
                problem = None
            return FileCheck(problem, ttree.num_entries, names, handle.file.fUUID)
    except FileNotFoundError:
        return FileCheck(f"{path} does not exist", 0, [], None)
    except Exception as err:  # uproot raises many types for damaged files
        problem = f"{path} cannot be read as a ROOT file ({type(err).__name__}: {err}); check or replace it"
        return FileCheck(problem, 0, [], None)


@dataclass(frozen=True)
class FillReport:
    """What a fill did: the store, the counts, the skipped files and the timing."""

    output: Path
    cutflow: dict[str, dict[str, Cutflow]]
    bad_files: list[BadFile]
    n_jets: int
    seconds: float

    def table(self) -> str:
        """The cutflow as a text table."""
        head = f"{'region':<16} {'dataset':<16} {'events':>9} {'jets':>9} {'presel':>9} {'stored':>9} {'flagged':>8}  per flavour"
        lines = [head]
        for region, per in self.cutflow.items():
            for dataset, c in per.items():
                flav = " ".join(f"{k}={v}" for k, v in sorted(c.flavours.items()))
                lines.append(
                    f"{region:<16} {dataset:<16} {c.events:>9} {c.jets:>9} {c.jets_preselected:>9} "
                    f"{c.jets_selected:>9} {c.jets_flagged:>8}  {flav}"
                )
        lines += [f"skipped {b.dataset}: {b.reason}" for b in self.bad_files]
        lines.append(f"wrote {self.n_jets} jets to {self.output} in {self.seconds:.2f} s")
        return "\n".join(lines)


def _read_errors() -> tuple[type[BaseException], ...]:
    import lzma
    import zlib

    import uproot

    return (OSError, zlib.error, lzma.LZMAError, uproot.deserialization.DeserializationError)


@contextlib.contextmanager
def _executor(cfg: ExecutorConfig, progress: bool) -> Iterator[Any]:
    from coffea import processor

    if cfg.kind == "iterative":
        yield processor.IterativeExecutor(status=progress, retries=cfg.retries)
    elif cfg.kind == "futures":
        from concurrent.futures import Executor

        pool: type[Executor]
        if cfg.pool == "threads":
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor
        else:
            from loky import ProcessPoolExecutor

            pool = ProcessPoolExecutor
        yield processor.FuturesExecutor(
            workers=cfg.workers, pool=pool, status=progress, retries=cfg.retries
        )
    else:
        import distributed

        if cfg.scheduler_address:
            with distributed.Client(cfg.scheduler_address) as client:
                yield processor.DaskExecutor(client=client, status=progress, retries=cfg.retries)
        else:
            with (
                distributed.LocalCluster(
                    n_workers=cfg.workers,
                    threads_per_worker=1,
                    processes=cfg.processes,
                    dashboard_address=None,
                ) as cluster,
                distributed.Client(cluster) as client,
            ):
                yield processor.DaskExecutor(client=client, status=progress, retries=cfg.retries)


def _first_error(err: BaseException) -> BaseException:
    from coffea_otcal.processors.control_region import BadInputError

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, BadInputError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return err


def run_fill(config: FillConfig, *, progress: bool = True) -> FillReport:
    """Check the inputs, run the control-region processor and write the store.

    Arguments:
        config: a validated configuration (:func:`load_config`).
        progress: show coffea's progress bars.

    Returns:
        The :class:`FillReport`.

    Raises:
        BadInputError: bad input files (without ``skip_bad_files``) or a processing
            failure; the message names the file and the branch.
    """
    from coffea import processor

    from coffea_otcal.input_layout import schema_class
    from coffea_otcal.processors.control_region import (
        BadInputError,
        ControlRegionProcessor,
    )
    from coffea_otcal.store import write_store, writer_info

    start = time.perf_counter()
    latent = config.latent
    if latent == "auto":  # the latent branches of the first file that opens
        names = next(
            (
                branches
                for ds in config.datasets.values()
                for path in ds.files
                if (branches := check_file(path, ds.tree, []).branches)
            ),
            [],
        )
        prefix = f"{config.collection}_latent_"
        latent = sum(1 for n in names if n.startswith(prefix) and n[len(prefix) :].isdigit())
    problems: list[BadFile] = []
    entries: dict[str, int] = {}
    fileset: dict[str, dict[str, Any]] = {}
    # the checks give what coffea's preprocessing would fetch: pre-fill its cache
    metadata_cache: dict[Any, dict[str, Any]] = {}
    for name, ds in config.datasets.items():
        required = required_branches(config, name, latent)
        good = []
        for path in ds.files:
            check = check_file(path, ds.tree, required)
            if check.problem is None:
                good.append(path)
                entries[path] = check.entries
                key = processor.executor.FileMeta(name, path, ds.tree)
                metadata_cache[key] = {"numentries": check.entries, "uuid": check.uuid}
            else:
                problems.append(BadFile(dataset=name, file=path, reason=check.problem))
        if good:
            fileset[name] = {"files": good, "treename": ds.tree}
    if problems and not config.skip_bad_files:
        msg = (
            f"{len(problems)} bad input file(s) (set skip_bad_files to leave them out):\n  "
            + "\n  ".join(f"[{p.dataset}] {p.reason}" for p in problems)
        )
        raise BadInputError(msg)
    if not fileset:
        msg = "no readable input file is left:\n  " + "\n  ".join(p.reason for p in problems)
        raise BadInputError(msg)

    proc = ControlRegionProcessor(
        config.adapter.name,
        {k: {"datasets": v.datasets, "selection": v.selection} for k, v in config.regions.items()},
        {
            k: {"is_data": v.is_data, "weight": v.weight, "scale": v.scale}
            for k, v in config.datasets.items()
        },
        adapter_options=config.adapter.options,
        flavour_column=config.flavour_column,
        flavour_codes=config.flavour_codes,
        jet_collection=config.collection,
        layout=config.input,
        kinematics=config.kinematics,
        latent_dim=latent,
        pt_min=config.preselection.pt_min,
        abs_eta_max=config.preselection.abs_eta_max,
        seed=config.seed,
    )
    ex = config.executor
    read_errors = _read_errors()  # what skip_bad_files skips at run time
    # coffea 2026.9 draws its rich progress bars on stdout even with status=False: send
    # them to stderr, or nowhere when progress is off, so stdout stays the report's.
    bars = contextlib.redirect_stdout(sys.stderr if progress else io.StringIO())
    with _executor(ex, progress) as executor, warnings.catch_warnings(record=True) as caught, bars:
        warnings.filterwarnings("always", message="Skipping bad file", category=UserWarning)
        runner = processor.Runner(
            executor,
            schema=schema_class(config.input),
            chunksize=ex.chunksize,
            maxchunks=ex.maxchunks,
            skipbadfiles=read_errors if config.skip_bad_files else False,
            metadata_cache=metadata_cache,
        )
        try:
            wrapped = runner.run(fileset, proc)
        except Exception as err:
            inner = _first_error(err)
            if isinstance(inner, BadInputError):
                raise inner from err
            msg = f"processing failed: {err}; fix or replace the file, or set skip_bad_files"
            raise BadInputError(msg) from err
    for w in caught:
        if "Skipping bad file" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    done: dict[tuple[str, str], int] = {}
    for item in wrapped["processed"]:
        done[(item.dataset, item.filename)] = done.get((item.dataset, item.filename), 0) + len(item)
    skipped = [str(w.message) for w in caught if "Skipping bad file" in str(w.message)]
    for name, spec in fileset.items():
        for path in spec["files"]:
            read = done.get((name, path), 0)
            if ex.maxchunks is None and read < entries[path]:
                why = "; ".join(m for m in skipped if path in m) or (
                    "a read error in a worker; rerun with the iterative executor to see it"
                )
                reason = f"{path}: only {read} of {entries[path]} entries could be read ({why})"
                problems.append(BadFile(dataset=name, file=path, reason=reason))
    out = wrapped["out"]
    cutflow = {
        region: {d: Cutflow(**out["cutflow"].get(region, {}).get(d, {})) for d in spec.datasets}
        for region, spec in config.regions.items()
    }
    metadata = StoreMetadata(
        classes=list(proc.classes),
        adapter={"name": proc.adapter.name, "options": dict(proc.adapter.options)},
        raw_columns=list(proc.adapter.columns),
        kinematics=list(config.kinematics),
        latent_dim=latent,
        flavour_column=config.flavour_column,
        flavour_codes=proc.flavour_codes,
        regions={
            k: RegionInfo(datasets=v.datasets, selection=v.selection)
            for k, v in config.regions.items()
        },
        datasets={
            k: DatasetInfo(
                is_data=v.is_data,
                files=v.files,
                tree=v.tree,
                weight=None if v.is_data else v.weight,
                scale=v.scale,
            )
            for k, v in config.datasets.items()
        },
        preselection=config.preselection.model_dump(),
        cutflow=cutflow,
        bad_files=problems,
        seed=config.seed,
        writer_info=writer_info(),
    )
    store_path = write_store(config.output, out["jets"], metadata)
    n_jets = sum(len(a["valid"]) for per in out["jets"].values() for a in per.values())
    for p in problems:
        logger.warning("skipped bad input [%s]: %s", p.dataset, p.reason)
    return FillReport(store_path, cutflow, problems, n_jets, time.perf_counter() - start)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``coffea-otcal fill``."""
    parser.add_argument("config", type=Path, help="fill configuration (YAML or TOML)")
    parser.add_argument("-o", "--output", help="override the output store path")
    parser.add_argument(
        "--executor", choices=["iterative", "futures", "dask"], help="override executor.kind"
    )
    parser.add_argument("--workers", type=int, help="override executor.workers")
    parser.add_argument("--chunksize", type=int, help="override executor.chunksize")
    parser.add_argument(
        "--skip-bad-files", action="store_true", help="leave out bad files and report them"
    )
    parser.add_argument("--seed", type=int, help="override the seed of the rand column")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    """Run ``coffea-otcal fill``; writes the cutflow table to stdout, returns 0."""
    config = load_config(args.config)
    updates: dict[str, Any] = {}
    executor: dict[str, Any] = {}
    if args.output:
        updates["output"] = str(Path(args.output).resolve())
    if args.skip_bad_files:
        updates["skip_bad_files"] = True
    if args.seed is not None:
        updates["seed"] = args.seed
    for key in ("executor", "workers", "chunksize"):
        value = getattr(args, key)
        if value is not None:
            executor["kind" if key == "executor" else key] = value
    if executor:
        updates["executor"] = ExecutorConfig.model_validate(
            {**config.executor.model_dump(), **executor}
        )
    config = config.model_copy(update=updates)
    report = run_fill(config, progress=not args.no_progress)
    sys.stdout.write(report.table() + "\n")
    return 0
