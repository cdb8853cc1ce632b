"""The stage functions of :mod:`coffea_otcal.pipeline` (fill, em, ot, export; closure in report)."""

from __future__ import annotations

__all__ = ["STAGE_FUNCTIONS", "stage_config"]

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from coffea_otcal.pipeline import PipelineConfig, StageResult

logger = logging.getLogger(__name__)

#: key of a flavour's first-stage nominal map when ``ot.common_fine_tune`` is on: the map
#: its variations and its published nominal are fine-tuned from (not in the bundle)
FIRST_STAGE = "nominal_first_stage"
#: the variation of ``ot.training_variation``: a second first stage from another seed
TRAINING_VARIATION = "ot_training"
TRAINING_MEANING = (
    "OT map training: up is the map of a second training from another seed (initial "
    "weights, validation split, batches), fine-tuned like the nominal; down is the nominal "
    "(one-sided)"
)


def _file_stamps(config: PipelineConfig) -> list[list[Any]]:
    stamps = []
    for ds in config.fill.datasets.values():
        for f in ds.files:
            p = Path(f)
            stamps.append([f, p.stat().st_size, p.stat().st_mtime_ns] if p.exists() else [f])
    return stamps


def stage_config(config: PipelineConfig, name: str) -> dict[str, Any]:
    """The part of the configuration a stage depends on (hashed for the cache)."""
    common = {"seed": config.seed}
    if name == "fill":
        return {**common, "fill": config.fill.model_dump(exclude={"output", "executor"}),
                "files": _file_stamps(config)}
    if name == "em":
        return {**common, "em": config.em.model_dump(), "cond": config.em_conditional,
                "crs": config.cr_names, "context": [c.model_dump() for c in config.context],
                "targets": config.targets.model_dump()}
    if name == "ot":
        return {**common, "ot": config.ot.model_dump(exclude={"workers"})}
    if name == "export":
        return {"export": config.export.model_dump()}
    return {**common, "closure": config.closure.model_dump(), "vr": config.validation_regions}


def _store(results: Mapping[str, StageResult]) -> Any:
    from coffea_otcal.store import load_store

    return load_store(results["fill"].folder / "store.parquet")


def _checkpoint_dir(config: PipelineConfig, results: Mapping[str, StageResult], name: str,
                    previous: str) -> Path:
    """``OUT/checkpoints/<stage>/<stage digest>``: a changed setting never resumes a stale one."""
    from coffea_otcal.pipeline import _hash

    digest = _hash(name, stage_config(config, name), results[previous].digest)
    return results["fill"].folder.parent / "checkpoints" / name / digest[:16]


# ----------------------------------------------------------------------------- fill


def run_fill_stage(config: PipelineConfig, tmp: Path, results: Mapping[str, StageResult],
                   progress: bool, truth: Any) -> dict[str, Any]:
    """Fill the control-region store (``store.parquet``)."""
    from coffea_otcal.fill import run_fill

    fill = config.fill.model_copy(update={"output": str(tmp / "store.parquet")})
    report = run_fill(fill, progress=progress)
    (tmp / "cutflow.txt").write_text(report.table() + "\n")
    bits = _stored_mantissa_bits(tmp / "store.parquet")
    if bits is not None and not config.fill.adapter.options.get("dequantise"):
        logger.warning(
            "the data tagger columns are stored with %d mantissa bits (point masses in ILR "
            "coordinates that maps and flows cannot match); set fill.adapter.options to "
            "{mantissa_bits: %d, dequantise: true} (docs/methods.md, 'Quantised scores')",
            bits, bits,
        )
    return {"n_jets": report.n_jets, "bad_files": len(report.bad_files), "mantissa_bits": bits}


def _stored_mantissa_bits(path: Path) -> int | None:
    """Mantissa bits of the stored data tagger columns (None: full precision or no data)."""
    from coffea_otcal.report import detect_mantissa_bits
    from coffea_otcal.store import load_store

    data = load_store(path).select(is_data=True)
    return detect_mantissa_bits(data.raw) if len(data) else None


# ----------------------------------------------------------------------------- em


def region_data(config: PipelineConfig, store: Any, region: str, is_data: bool) -> Any:
    """ILR coordinates, context, weights (and MC flavours) of one region's valid jets."""
    from coffea_otcal.em import RegionData
    from coffea_otcal.pipeline import context_arrays

    sel = store.select(region=region, is_data=is_data)
    if len(sel) == 0:
        msg = f"region {region!r} has no {'data' if is_data else 'MC'} jets in the store"
        raise ValueError(msg)
    from coffea_otcal.geometry import ilr

    kin = {name: sel.kin[:, i] for i, name in enumerate(store.kinematics)}
    ctx = context_arrays(config, kin) if config.em_conditional else None
    return RegionData(x=np.asarray(ilr(sel.probs)), context=ctx, weight=sel.weight,
                      flavour=None if is_data else sel.flavour)


def run_em_stage(config: PipelineConfig, tmp: Path, results: Mapping[str, StageResult],
                 progress: bool, truth: Any) -> dict[str, Any]:
    """EM fit, diagnostics, variations, OT targets and the EM plots."""
    from coffea_otcal.em import fit_em
    from coffea_otcal.em_diagnostics import compute_diagnostics, fit_quality
    from coffea_otcal.em_plots import plot_em_report
    from coffea_otcal.variations import build_targets, make_variations

    store = _store(results)
    crs = config.cr_names
    data = {r: region_data(config, store, r, True) for r in crs}
    mc = {r: region_data(config, store, r, False) for r in crs}
    ckpt = _checkpoint_dir(config, results, "em", "fill")
    result = fit_em(data, mc, config.em, device=config.device, seed=config.seed,
                    progress=progress, checkpoint_dir=ckpt)
    diagnostics = compute_diagnostics(result)
    variations = make_variations(diagnostics)
    targets = build_targets(result, mc, variations, method=config.targets.method,
                            samples_per_source=config.targets.samples_per_source, seed=config.seed)
    targets.save(tmp / "targets.npz")
    result.save(tmp / "em_result.npz")
    (tmp / "diagnostics.json").write_text(json.dumps(diagnostics.to_dict(), indent=1, default=float))
    quality = fit_quality(result)
    (tmp / "fit_quality.json").write_text(json.dumps(quality.to_dict(), indent=1))
    em_truth = truth.get("em") if truth else None
    plot_em_report(result, tmp / "plots", truth=em_truth, diagnostics=diagnostics,
                   variations=variations)
    return {
        "converged": bool(result.converged),
        "iterations": int(result.n_iterations),
        "fractions": np.asarray(result.fractions).round(4).tolist(),
        "condition_number": float(diagnostics.condition_number),
        "spectral_radius": float(diagnostics.spectral_radius),
        "fraction_drift": None if diagnostics.fraction_drift is None else {
            k: v for k, v in diagnostics.fraction_drift.items() if k != "message"},
        "variations": [v.name for v in variations],
        # data-only goodness of fit (fit_quality.json): largest chi2/ndf of the mixture vs
        # each region's data and of each flavour's flow vs its EM target
        "fit_quality": {"mixture_max": round(float(quality.mixture.max()), 3),
                        "component_max": round(float(quality.component.max()), 3),
                        "warnings": len(quality.warnings)},
        "seconds_fit": float(result.elapsed_s),
        # em.final_fit: the flows refitted on the frozen responsibilities (NLL of eq. 23)
        "final_fit": None if result.final_fit is None else {
            k: round(float(result.final_fit[k]), 5)
            for k in ("bins_used", "steps", "nll_before", "nll_after", "seconds")},
        "restarts": [{k: r[k] for k in ("restart", "seed", "objective", "selected")}
                     | {"fractions": np.round(r["fractions"], 4).tolist()}
                     for r in result.restarts],
    }


# ----------------------------------------------------------------------------- ot


def _fit_kwargs(source: Mapping[str, Any], target: tuple[Any, Any, Any], cfg: Any, name: str,
                **extra: Any) -> dict[str, Any]:
    """Keyword arguments of ``fit_ot_map`` for one map (picklable: sent to OT workers)."""
    y, yc, yw = target
    return {**source, "target": y, "target_context": yc, "target_weight": yw,
            "config": cfg.model_dump(), "name": name, **extra}


def _same_weights(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two weight vectors of one target sample agree to rounding (rtol 1e-9).

    A variation whose eigen-direction has no component on a flavour leaves that flavour's
    responsibility weights unchanged up to float rounding; training it would only add noise.
    """
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-9, atol=0.0))


def _flat_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """A map's metrics with those of its minibatch-OT start (``pretrain``) as ``pretrain_<key>``."""
    pretrain = metrics.get("pretrain") or {}
    return {**metrics, **{f"pretrain_{key}": value for key, value in pretrain.items()}}


def run_ot_stage(config: PipelineConfig, tmp: Path, results: Mapping[str, StageResult],
                 progress: bool, truth: Any) -> dict[str, Any]:
    """Nominal and variation maps per flavour, assembled into ``bundle.json.gz``."""
    from coffea_otcal.bundle import Bundle
    from coffea_otcal.ot import resolve_device
    from coffea_otcal.ot_pool import MapJob, train_maps
    from coffea_otcal.variations import Targets

    store = _store(results)
    targets = Targets.load(results["em"].folder / "targets.npz")
    codes = dict(zip(targets.meta.classes, targets.meta.flavour_codes, strict=True))
    nominal_cfg = config.ot.nominal
    var_cfg = nominal_cfg.model_copy(update={
        "steps": config.ot.variation_steps, "lr": config.ot.variation_lr,
        "warmup_steps": 0, "patience": None, "eval_every": max(config.ot.variation_steps // 2, 1),
        "batch_size": config.ot.variation_batch_size or nominal_cfg.batch_size,
    })
    rng = np.random.default_rng(config.seed)
    variations = list(targets.meta.variations)
    if config.ot.max_variations is not None:
        variations = sorted(variations, key=lambda v: -v.sigma)[: config.ot.max_variations]
    unknown = sorted(set(config.ot.flavour_nominal) - set(targets.flavours))
    if unknown:
        msg = (f"ot.flavour_nominal names flavours {unknown} that the EM targets do not have; "
               f"they are {list(targets.flavours)}")
        raise ValueError(msg)
    device = str(resolve_device(config.device))
    ckpt = _checkpoint_dir(config, results, "ot", "em")
    # every published map, in bundle order, and the trained map it is (when not itself)
    jobs, alt_jobs, published, aliases, n_shared = [], [], [], {}, 0
    for flav, tgt in targets.flavours.items():
        code = codes[flav]
        src_x, src_c, src_w = tgt.source_x, tgt.source_context, tgt.source_weight
        if config.ot.max_source is not None and len(src_x) > config.ot.max_source:
            keep = np.sort(rng.choice(len(src_x), config.ot.max_source, replace=False))
            src_x, src_w = src_x[keep], src_w[keep]
            src_c = None if src_c is None else src_c[keep]
        source = {"source": src_x, "source_context": src_c, "source_weight": src_w,
                  "device": device, "seed": config.seed}
        nominal_target = tgt.target()
        nominal = (code, "nominal")
        published.append(nominal)
        var_jobs = []
        if config.ot.common_fine_tune:
            var_jobs.append(MapJob(nominal, _fit_kwargs(
                source, nominal_target, var_cfg, f"{flav}/nominal", progress=False)))
        for var in variations:
            for direction in ("up", "down"):
                key = (code, f"{var.name}_{direction}")
                published.append(key)
                target = tgt.target(var.name, direction)
                if config.ot.common_fine_tune and _same_weights(target[2], nominal_target[2]):
                    aliases[key] = nominal  # the same training: the same map
                    n_shared += 1
                    continue
                var_jobs.append(MapJob(key, _fit_kwargs(source, target, var_cfg,
                                                        f"{flav}/{key[1]}", progress=False)))
        first = (code, FIRST_STAGE) if config.ot.common_fine_tune else nominal
        flav_cfg = config.ot.nominal_for(flav)
        jobs.append(MapJob(first, _fit_kwargs(source, nominal_target, flav_cfg, flav,
                                              progress=progress, checkpoint_dir=ckpt), var_jobs))
        if config.ot.training_variation:
            alt, down = (code, f"{TRAINING_VARIATION}_up"), (code, f"{TRAINING_VARIATION}_down")
            published += [alt, down]
            aliases[down] = nominal  # one-sided
            alt_fit = _fit_kwargs({**source, "seed": config.seed + 1}, nominal_target,
                                  flav_cfg, f"{flav}/{TRAINING_VARIATION}", progress=False,
                                  checkpoint_dir=ckpt)
            if config.ot.common_fine_tune:  # fine-tuned exactly as the published nominal
                alt_jobs.append(MapJob((code, f"{TRAINING_VARIATION}_first_stage"), alt_fit, [
                    MapJob(alt, _fit_kwargs(source, nominal_target, var_cfg,
                                            f"{flav}/{alt[1]}", progress=False))]))
            else:
                alt_jobs.append(MapJob(alt, alt_fit))
    trained = train_maps(jobs + alt_jobs, config.ot.workers, device, progress)
    metrics = {f"{flav}/nominal/{key}": float(value)
               for flav, job in zip(targets.flavours, jobs, strict=True)
               for key, value in _flat_metrics(trained[job.key].get("metrics") or {}).items()
               if isinstance(value, (int, float))}
    maps = {key: trained[aliases.get(key, key)] for key in published}
    if n_shared:
        logger.info("%d variation maps equal their nominal (the variation leaves that "
                    "flavour's target unchanged)", n_shared)
    fill_meta = store.metadata
    bundle = Bundle.from_maps(
        maps,
        classes=list(targets.meta.classes),
        adapter=dict(fill_meta.adapter),
        # unconditional EM flows give unconditional targets, hence context-free maps (ICNN)
        context_spec=[c.model_dump() for c in config.context]
        if any(t.source_context is not None for t in targets.flavours.values()) else [],
        variations_meta={**{v.name: v.meaning for v in variations},
                         **({TRAINING_VARIATION: TRAINING_MEANING}
                            if config.ot.training_variation else {})},
        provenance={"seed": config.seed, "config": json.loads(config.model_dump_json()),
                    "metrics": metrics, "command": "coffea-otcal run"},
        flavour_column=config.fill.flavour_column,
    )
    bundle.save(tmp / "bundle.json.gz")
    return {"maps": len(maps), "trained": len(trained), "shared_with_nominal": n_shared,
            "variations": [v.name for v in variations]
            + ([TRAINING_VARIATION] if config.ot.training_variation else [])}


# ----------------------------------------------------------------------------- export


def run_export_stage(config: PipelineConfig, tmp: Path, results: Mapping[str, StageResult],
                     progress: bool, truth: Any) -> dict[str, Any]:
    """Export the bundle to correctionlib and measure its accuracy."""
    from coffea_otcal.export_cli import export_bundle

    res = export_bundle(results["ot"].folder / "bundle.json.gz", tmp / "correctionlib.json.gz",
                        config.export, seed=config.seed, progress=progress)
    summary = {"accuracy": res.accuracy.model_dump() if res.accuracy is not None else None}
    (tmp / "export.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _closure(config: PipelineConfig, tmp: Path, results: Mapping[str, StageResult],
             progress: bool, truth: Any) -> dict[str, Any]:
    from coffea_otcal.report import run_closure_stage

    return run_closure_stage(config, tmp, results, progress, truth)


STAGE_FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "fill": run_fill_stage,
    "em": run_em_stage,
    "ot": run_ot_stage,
    "export": run_export_stage,
    "closure": _closure,
}
