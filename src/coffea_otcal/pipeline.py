"""The end-to-end chain: fill -> EM -> OT (nominal + variations) -> export -> closure.

:func:`run_pipeline` runs the stages of a :class:`PipelineConfig` in order. Each stage writes
its outputs into ``OUT/<stage>/`` through a temporary folder that is renamed into place only
when the stage has finished, together with a ``manifest.json`` holding the hash of the stage's
configuration and of its inputs. A rerun skips every stage whose manifest matches (so an
interrupted run resumes where it stopped) and never reuses a half-written stage; a changed
setting reruns that stage and everything after it.
"""

from __future__ import annotations

__all__ = ["STAGES", "ContextSpec", "PipelineConfig", "PipelineResult", "load_pipeline_config", "run_pipeline"]

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from coffea_otcal.clib_export import ExportGrid
from coffea_otcal.config import read_config_file
from coffea_otcal.em import EMConfig
from coffea_otcal.fill import FillConfig
from coffea_otcal.ot import OTConfig

logger = logging.getLogger(__name__)

#: stage names in execution order
STAGES: tuple[str, ...] = ("fill", "em", "ot", "export", "closure")
MANIFEST = "manifest.json"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContextSpec(_Model):
    """A kinematic conditioning variable of the flows and the maps (recorded in the bundle)."""

    name: str = Field(description="variable name, e.g. 'log_pt'")
    column: str = Field(description="store kinematic column / Jet field, e.g. 'pt'")
    transform: Literal["identity", "log", "abs"] = Field(
        default="identity", description="transform"
    )
    low: float = Field(description="validity range low edge (physical units)")
    high: float = Field(description="validity range high edge (physical units)")


def _default_context() -> list[ContextSpec]:
    return [
        ContextSpec(name="log_pt", column="pt", transform="log", low=20.0, high=1000.0),
        ContextSpec(name="abs_eta", column="eta", transform="abs", low=0.0, high=2.5),
    ]


class TargetsConfig(_Model):
    """How OT targets are built from the EM fit (see :func:`coffea_otcal.variations.build_targets`)."""

    method: Literal["flow", "responsibility"] = "flow"
    samples_per_source: int = Field(default=1, ge=1)


class OTStageConfig(_Model):
    """OT training of the nominal maps and the warm-started variation maps."""

    nominal: OTConfig = Field(
        default_factory=lambda: OTConfig(steps=1000, patience=None, batch_size=4096,
                                         init="minibatch_ot", pretrain_steps=6000, lr=0.002,
                                         selection="last"),
        description=(
            "nominal maps; large batches resolve the sharp structures of b-jet scores; the "
            "minibatch-OT start (least squares on exact block OT plans) then 1000 semi-dual "
            "steps closed better than 2500 steps from the identity start, in three seeds of "
            "the demo (docs/ot.md, 'Pipeline nominal: minibatch-OT start'); the final "
            "annealed state closed better than the one of lowest held-out dual"
        ),
    )
    flavour_nominal: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description=(
            "per flavour label, OTConfig fields that replace the nominal's for that flavour's "
            "first-stage map (and its training variation), e.g. {b: {steps: 5000}}: b-jet "
            "scores spread widest and their map needs the most steps (docs/ot.md); variation "
            "fine-tuning is unchanged"
        ),
    )
    max_variations: int | None = Field(
        default=None,
        ge=0,
        description="train maps for the N variations of largest variance (None: all)",
    )
    variation_steps: int = Field(
        default=300, ge=1, description="fine-tuning steps of a variation map"
    )
    variation_lr: float = Field(
        default=2e-3, gt=0, description="peak learning rate of variation fine-tuning"
    )
    variation_batch_size: int | None = Field(
        default=None, ge=2, description="batch size of variation fine-tuning (None: the nominal's)"
    )
    common_fine_tune: bool = Field(
        default=True,
        description="publish as nominal the first-stage map fine-tuned exactly as its "
        "variations are (same steps, seed and batches, the nominal target), so that a "
        "variation map differs from the nominal only through the variation's weights; a "
        "variation that leaves a flavour's target unchanged then gets the nominal map "
        "without training (docs/ot.md, 'Variation maps')",
    )
    training_variation: bool = Field(
        default=False,
        description="add the variation 'ot_training': up is the map of a second first stage "
        "trained from another seed (seed + 1: initial weights, validation split and batches), "
        "fine-tuned like the nominal; down is the nominal (one-sided). Its spread is the "
        "map's own training uncertainty, which the EM variations do not contain; it costs one "
        "more first-stage map per flavour (docs/ot.md, 'Variation maps')",
    )
    max_source: int | None = Field(
        default=200_000,
        ge=100,
        description="subsample each flavour's source to at most this many jets",
    )
    workers: int | None = Field(
        default=None, ge=1,
        description="processes that train maps side by side, the CPUs shared out as torch "
        "threads (None: one per CPU, at most 8; 1: one map after the other in this process; "
        "on CUDA always 1); not part of the stage's cache key",
    )

    @model_validator(mode="after")
    def _check_flavour_nominal(self) -> OTStageConfig:
        for flavour in self.flavour_nominal:
            self.nominal_for(flavour)  # unknown or invalid fields fail here, at load time
        return self

    def nominal_for(self, flavour: str) -> OTConfig:
        """The nominal OT settings of one flavour (``nominal`` with ``flavour_nominal``)."""
        over = self.flavour_nominal.get(flavour)
        if not over:
            return self.nominal
        try:
            return OTConfig.model_validate({**self.nominal.model_dump(), **over})
        except ValidationError as err:
            msg = f"ot.flavour_nominal[{flavour!r}] = {over!r} is not valid OTConfig settings: {err}"
            raise ValueError(msg) from err


class ClosureConfig(_Model):
    """Closure histograms, metrics and plots."""

    kappas: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0])
    bins: int = Field(default=20, ge=2)
    experiment: Literal["CMS", "ATLAS"] | None = "CMS"
    plot_control_regions: bool = Field(
        default=True, description="closure plots in each control region too"
    )
    classifier_max_jets: int = Field(
        default=200_000, ge=100, description="per sample, for the AUC test"
    )
    baseline: bool = Field(default=True, description="run the vertical (reweighting) baseline")


class PipelineConfig(_Model):
    """``coffea-otcal run`` configuration (YAML or TOML)."""

    fill: FillConfig = Field(description="the fill configuration (datasets, regions, adapter)")
    control_regions: list[str] | None = Field(
        default=None, description="regions used by EM (default: all but the validation regions)"
    )
    validation_regions: list[str] = Field(default_factory=lambda: ["vr"])
    context: list[ContextSpec] = Field(
        default_factory=_default_context,
        description="default: log pt in 20-1000 GeV (20000-1e6 MeV for PHYSLITE input) and |eta| < 2.5",
    )
    em: EMConfig = Field(
        default_factory=lambda: EMConfig(shape_warmup=5),
        description="EM settings; the pipeline holds the fractions for 5 shape-only iterations",
    )
    em_conditional: bool = Field(
        default=False,
        description="condition the EM flows (and so the OT maps) on the context; off by default: "
        "on the generated samples conditioning let the fractions slide further (docs/em.md) and "
        "closed worse (docs/methods.md)",
    )
    targets: TargetsConfig = Field(default_factory=TargetsConfig)
    ot: OTStageConfig = Field(default_factory=OTStageConfig)
    export: ExportGrid = Field(default_factory=ExportGrid)
    closure: ClosureConfig = Field(default_factory=ClosureConfig)
    seed: int = 0
    device: str = "auto"

    @model_validator(mode="after")
    def _check_regions(self) -> PipelineConfig:
        if "context" not in self.model_fields_set and self.fill.input.format == "physlite":
            # PHYSLITE stores momenta in MeV: the default pt validity range follows
            self.context = [
                c.model_copy(update={"low": c.low * 1e3, "high": c.high * 1e3})
                if c.column == "pt" else c
                for c in self.context
            ]
        regions = set(self.fill.regions)
        problems = [
            f"validation_regions: {r!r} is not a fill region {sorted(regions)}"
            for r in self.validation_regions
            if r not in regions
        ]
        problems += [
            f"control_regions: {r!r} is not a fill region {sorted(regions)}"
            for r in self.control_regions or []
            if r not in regions
        ]
        overlap = set(self.control_regions or []) & set(self.validation_regions)
        if overlap:
            problems.append(f"regions {sorted(overlap)} are both control and validation regions")
        if len(self.cr_names) < 2:
            problems.append(f"EM needs >= 2 control regions, got {self.cr_names}")
        for region in self.cr_names + list(self.validation_regions):
            if region not in regions:
                continue
            kinds = {self.fill.datasets[d].is_data for d in self.fill.regions[region].datasets if d in self.fill.datasets}
            if kinds != {True, False}:
                problems.append(f"region {region!r} needs both data and MC datasets, has {'only data' if kinds == {True} else 'only MC' if kinds == {False} else 'none'}")
        missing_kin = [c.column for c in self.context if c.column not in self.fill.kinematics]
        if missing_kin:
            problems.append(f"context columns {missing_kin} are not in fill.kinematics {self.fill.kinematics}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def cr_names(self) -> list[str]:
        """The control regions fed to EM."""
        if self.control_regions is not None:
            return list(self.control_regions)
        return [r for r in self.fill.regions if r not in self.validation_regions]


def load_pipeline_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> PipelineConfig:
    """Read and validate a pipeline config; every problem is listed before any work starts.

    Relative file paths in ``fill.datasets`` resolve against the config file's folder, and
    every input file must exist.
    """
    from coffea_otcal.fill import load_config

    if isinstance(source, Mapping):
        raw, base = dict(source), Path.cwd()
    else:
        raw, base = read_config_file(source, "pipeline configuration"), Path(source).parent
    fill_raw = dict(raw.get("fill") or {})
    fill_raw.setdefault("output", "store.parquet")
    problems: list[str] = []
    try:
        fill = load_config(fill_raw, base_dir=base)
    except ValueError as err:
        problems.append(f"fill: {err}")
        fill = None
    if fill is not None:
        files = {name: ds.files for name, ds in fill.datasets.items()}
        raw = {**raw, "fill": fill.model_dump()}
    else:  # still check the files and the regions of the raw fill section
        ds_value = fill_raw.get("datasets")
        ds_raw: Mapping[str, Any] = ds_value if isinstance(ds_value, Mapping) else {}
        files = {name: [str(base / f) for f in ds.get("files") or [] if isinstance(f, str)
                        and not any(c in f for c in "*?[")]
                 for name, ds in ds_raw.items() if isinstance(ds, Mapping)}
        raw = {**raw, "fill": fill_raw}
    for name, names in files.items():
        problems += [
            f"fill.datasets.{name}.files: {f} does not exist"
            for f in names
            if "://" not in f and not Path(f).exists()
        ]
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as err:
        problems += [f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors()
                     if fill is not None or not e["loc"] or e["loc"][0] != "fill"]
        config = None
    if problems or config is None:
        msg = "pipeline configuration problems:\n  " + "\n  ".join(problems)
        raise ValueError(msg)
    return config


# ----------------------------------------------------------------------------- caching


def _hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


@dataclass
class StageResult:
    """A finished stage: its folder, its hash and whether it came from the cache."""

    name: str
    folder: Path
    digest: str
    cached: bool
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


def _run_stage(
    name: str,
    out: Path,
    digest: str,
    work: Callable[[Path], dict[str, Any]],
    force: bool,
) -> StageResult:
    """Run ``work(tmpdir)`` unless ``out/name`` holds a finished stage with this digest."""
    folder = out / name
    manifest = _read_manifest(folder)
    if not force and manifest and manifest.get("digest") == digest and manifest.get("complete"):
        logger.info("stage %s: cached (%s)", name, folder)
        return StageResult(name, folder, digest, True, float(manifest.get("seconds", 0.0)),
                           manifest.get("summary", {}))
    for stale in out.glob(f".{name}.tmp-*"):  # left by an interrupted run: never reused
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out / f".{name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    summary = work(tmp)
    seconds = time.perf_counter() - start
    (tmp / MANIFEST).write_text(
        json.dumps({"stage": name, "digest": digest, "complete": True, "seconds": seconds,
                    "finished": time.time_ns(), "summary": summary}, indent=1, default=str)
    )
    if folder.exists():
        old = out / f".{name}.old-{os.getpid()}"
        folder.replace(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.replace(folder)
    logger.info("stage %s: done in %.1f s", name, seconds)
    return StageResult(name, folder, digest, False, seconds, summary)


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` produced."""

    out: Path
    stages: dict[str, StageResult]

    @property
    def bundle(self) -> Path:
        """The calibration bundle."""
        return self.stages["ot"].folder / "bundle.json.gz"

    @property
    def correctionlib(self) -> Path:
        """The correctionlib export."""
        return self.stages["export"].folder / "correctionlib.json.gz"

    @property
    def report(self) -> Path:
        """The closure report (markdown)."""
        return self.stages["closure"].folder / "report.md"


def run_pipeline(
    config: PipelineConfig,
    out: str | os.PathLike[str],
    *,
    stages: Sequence[str] | None = None,
    force: Sequence[str] = (),
    progress: bool = True,
    truth: Mapping[str, Any] | None = None,
) -> PipelineResult:
    """Run the chain (or the named ``stages``; earlier ones must be cached or are run).

    Arguments:
        config: the validated configuration.
        out: output folder (stage folders are created below it).
        stages: run up to the last named stage (default: all of :data:`STAGES`).
        force: stages to rerun even when their cache is valid (later ones follow).
        progress: progress bars.
        truth: optional known truth for the report (the demo passes the generator's).

    Returns:
        The :class:`PipelineResult`.
    """
    from coffea_otcal import stages as st

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    wanted = list(stages or STAGES)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        msg = f"unknown stages {unknown}; stages are {list(STAGES)}"
        raise ValueError(msg)
    last = max(STAGES.index(s) for s in wanted)
    results: dict[str, StageResult] = {}
    upstream = ""
    forced = False
    for name in STAGES[: last + 1]:
        section = st.stage_config(config, name)
        digest = _hash(name, section, upstream)
        forced = forced or name in force

        def work(tmp: Path, name: str = name) -> dict[str, Any]:
            return st.STAGE_FUNCTIONS[name](config, tmp, results, progress, truth)

        results[name] = _run_stage(name, out, digest, work, forced)
        # a rerun upstream stage (new "finished" stamp) invalidates everything after it
        manifest = _read_manifest(results[name].folder) or {}
        upstream = f"{digest}:{manifest.get('finished', '')}"
    return PipelineResult(out, results)


def context_arrays(config: PipelineConfig, kin: Mapping[str, np.ndarray]) -> np.ndarray:
    """The transformed, clamped context (as the applier computes it) from raw kinematics."""
    from coffea_otcal.applier import transform_context
    from coffea_otcal.bundle import ContextVariable

    spec = [ContextVariable(**c.model_dump()) for c in config.context]
    ctx, _, bad = transform_context(spec, kin)
    if bad.any():
        msg = f"{int(bad.sum())} jets have non-finite kinematics {[c.column for c in config.context]}"
        raise ValueError(msg)
    return ctx
