"""``coffea-otcal run CONFIG`` and ``coffea-otcal demo``: the whole chain from ROOT files."""

from __future__ import annotations

__all__ = [
    "add_arguments", "add_demo_arguments", "demo_config", "demo_generator_config", "run", "run_demo",
]

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from coffea_otcal.pipeline import STAGES, PipelineConfig, load_pipeline_config, run_pipeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``coffea-otcal run``."""
    parser.add_argument("config", type=Path, help="pipeline configuration (YAML or TOML)")
    parser.add_argument("-o", "--out", type=Path, default=Path("otcal-run"), help="output folder")
    parser.add_argument("--stages", nargs="+", choices=STAGES, help="run up to these stages")
    parser.add_argument("--force", nargs="+", default=[], choices=STAGES, help="rerun these stages")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _print_result(result: Any) -> None:
    lines = [f"output folder: {result.out}"]
    for name, stage in result.stages.items():
        how = "cached" if stage.cached else f"{stage.seconds:.1f} s"
        lines.append(f"  {name:<8} {how:>9}  {stage.folder}")
    quality = result.stages["em"].summary.get("fit_quality") if "em" in result.stages else None
    if quality:  # EM stages written before session 15 have none
        lines.append(
            f"EM fit on the data: largest chi2/ndf data vs mixture {quality['mixture_max']:.2f}, "
            f"flow vs its EM target {quality['component_max']:.2f} "
            f"({quality['warnings']} above 2; em/fit_quality.json)"
        )
    if "ot" in result.stages:
        lines.append(f"bundle:        {result.bundle}")
    if "export" in result.stages:
        lines.append(f"correctionlib: {result.correctionlib}")
    if "closure" in result.stages:
        lines.append(f"report:        {result.report}")
        lines.append(f"plots:         {result.report.parent / 'plots' / 'index.md'}")
        summary = result.stages["closure"].summary
        lines.append(
            "validation: AUC(MC vs data) {:.3f} -> {:.3f}; mean chi2/ndf {:.2f} -> {:.2f}; "
            "min p {:.3g}; data inside the band (+) stat: {:.0f} % at one sigma, {} at 90 %".format(
                summary["auc_before"], summary["auc_after"], summary["mean_chi2_ndf_before"],
                summary["mean_chi2_ndf_after"], summary["min_p_value_after"],
                100 * summary["band_coverage"],
                # reports written before session 12 have no 90 % coverage
                f"{100 * summary['band_coverage_90']:.0f} %" if "band_coverage_90" in summary else "n/a",
            )
        )
        truth = summary.get("truth_band_coverage")
        if truth:  # the demo: the generator's true distribution of the validation region
            lines.append(f"validation, true distribution inside the band (+) stat: "
                         f"{100 * truth[0]:.0f} % at one sigma, {100 * truth[1]:.0f} % at 90 %")
    sys.stdout.write("\n".join(lines) + "\n")


def run(args: argparse.Namespace) -> int:
    """Run ``coffea-otcal run``."""
    config = load_pipeline_config(args.config)
    result = run_pipeline(config, args.out, stages=args.stages, force=args.force,
                          progress=not args.no_progress)
    _print_result(result)
    return 0


# ----------------------------------------------------------------------------- demo


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``coffea-otcal demo``."""
    parser.add_argument("--out", type=Path, default=Path("otcal-demo"), help="output folder")
    parser.add_argument("--scale", type=float, default=1.0, help="scale the generated sample")
    parser.add_argument("--seed", type=int, default=1, help="seed of the sample and the training")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def demo_config(sample: Any, seed: int) -> PipelineConfig:
    """The pipeline configuration of the demo on a generated sample."""
    physlite = sample.config.layout == "physlite"
    weight = "EventInfo.mcEventWeights[0]" if physlite else "genWeight"
    datasets = {f.dataset: {"files": [f.path], "is_data": f.is_data, "tree": sample.config.tree,
                            "weight": None if f.is_data else weight} for f in sample.files}
    regions: dict[str, dict[str, Any]] = {}
    for f in sample.files:
        regions.setdefault(f.region, {"datasets": []})["datasets"].append(f.dataset)
    fill: dict[str, Any] = {
        "datasets": datasets, "regions": regions, "adapter": demo_adapter(sample.config),
        "output": "store.parquet", "kinematics": ["pt", "eta"],
    }
    if physlite:  # the generator's PHYSLITE layout: scores in the linked BTagging container
        fill |= {"input": {"format": "physlite", "btagging": {}},
                 "flavour_column": "HadronConeExclTruthLabelID"}
    raw = {
        "fill": fill,
        "validation_regions": ["vr"],
        "seed": seed,
        # the demo's budget: a few minutes on a 2-core CPU (docs/methods.md lists what a
        # production run changes: more EM iterations, longer OT training, all variations)
        # the adapter dequantises rounded scores (float32 ones have no point masses), so the
        # flows need no extra jitter (docs/em.md, "Flow jitter")
        "em": {"max_iterations": 20, "shape_warmup": 5, "flow": {"dequantize_sigma": 0.0}},
        # nominal maps: the pipeline's defaults (OTStageConfig.nominal); variation maps at
        # half the nominal's batch: the 36 of them were a third of the OT stage's work
        # (docs/methods.md, session 4)
        "ot": {"variation_steps": 100, "variation_batch_size": 2048},
    }
    return load_pipeline_config(raw)


def demo_adapter(gen_config: Any) -> dict[str, Any]:
    """The adapter spec of a generated sample: its tagger, dequantised when it is stored rounded."""
    if not gen_config.quantise:
        return {"name": gen_config.tagger}
    return {"name": gen_config.tagger,
            "options": {"mantissa_bits": gen_config.mantissa_bits, "dequantise": True}}


def _truth(sample: Any, seed: int, n: int = 40_000) -> dict[str, Any]:
    """Fresh samples of the true MC and data responses: per flavour, and the validation region's."""
    from coffea_otcal.generator import simulate_jets

    rng = np.random.default_rng(seed + 1000)
    cfg = sample.config
    mc = simulate_jets(cfg, "vr", 3 * n, False, rng)
    data = simulate_jets(cfg, "vr", 3 * n, True, rng)
    from coffea_otcal.adapters import get_adapter
    from coffea_otcal.report import requantise

    spec = demo_adapter(cfg)
    adapter = get_adapter(spec["name"], **spec.get("options", {}))
    bits = cfg.mantissa_bits if cfg.quantise else None
    # the stored columns read through the pipeline's adapter, as the fill stage reads them
    mc_probs = requantise(adapter, mc["probs_raw"], bits, {"pt": mc["pt"], "eta": mc["eta"]})
    data_probs = requantise(adapter, data["probs_raw"], bits, {"pt": data["pt"], "eta": data["eta"]})
    per = {}
    for code in (5, 4, 0):
        m, d = mc["flavour"] == code, data["flavour"] == code
        per[code] = {"mc_probs": mc_probs[m], "mc_kin": {"pt": mc["pt"][m], "eta": mc["eta"][m]},
                     "data_probs": data_probs[d],
                     "mantissa_bits": cfg.mantissa_bits if cfg.quantise else None}
    # the validation region's true data distribution: the fresh pseudo-data, all flavours
    return {"per_flavour": per, "validation": {"vr": data_probs}}


def demo_generator_config(seed: int, scale: float = 1.0) -> Any:
    """The demo sample: Kim & Yang Table 1 control regions of 30k jets, a 30k-jet 1:1:1 VR.

    The mismodelling is 1.3 times the generator default, so that a classifier tells the
    uncalibrated MC from the pseudo-data with an AUC of about 0.59 in the validation region
    (the default strength gives 0.556).
    """
    from coffea_otcal.generator import GeneratorConfig, MismodellingConfig, default_regions

    regions = {
        name: region.model_copy(update={"n_jets": 30_000})
        for name, region in default_regions().items()
    }
    return GeneratorConfig(seed=seed, scale=scale, regions=regions,
                           mismodelling=MismodellingConfig(strength=1.3))


def run_demo(out: Path, scale: float = 1.0, seed: int = 1, progress: bool = True) -> Any:
    """Generate a sample with known truth and run the whole chain on it."""
    from coffea_otcal.generator import GeneratedSample, generate

    sample_dir = out / "sample"
    gen_cfg = demo_generator_config(seed, scale)
    try:
        sample = GeneratedSample.load(sample_dir)
        if sample.config != gen_cfg:
            raise ValueError
    except (FileNotFoundError, ValueError):
        sample = generate(gen_cfg, sample_dir, progress=progress)
    config = demo_config(sample, seed)
    write_pipeline_config(config, out / "pipeline.yaml")
    return run_pipeline(config, out, progress=progress, truth=_truth(sample, seed))


def read_run_configuration(run: str | Path) -> dict[str, Any]:
    """The configuration mapping of a finished ``coffea-otcal demo`` / ``run`` folder.

    Reads ``RUN/pipeline.yaml`` (the demo writes it; for a ``run``, copy its configuration
    there) or ``RUN/pipeline.json``, which older versions of the demo wrote.
    """
    from coffea_otcal.config import read_config_file

    run = Path(run)
    if (run / "pipeline.yaml").is_file():
        return read_config_file(run / "pipeline.yaml", "pipeline configuration")
    if (run / "pipeline.json").is_file():
        return dict(json.loads((run / "pipeline.json").read_text()))
    msg = f"{run} holds no pipeline.yaml (nor pipeline.json): not a coffea-otcal demo folder"
    raise FileNotFoundError(msg)


def write_pipeline_config(config: PipelineConfig, path: Path) -> Path:
    """Write ``config`` as a YAML file that ``coffea-otcal run`` / :func:`load_pipeline_config` read back.

    Every setting is written out (defaults included), so the file records the run exactly
    and reruns it: ``coffea-otcal run DIR/pipeline.yaml -o DIR`` reuses every cached stage.
    """
    import yaml

    from coffea_otcal.atomic import atomic_write_text

    header = (
        "# coffea-otcal pipeline configuration, every setting written out.\n"
        f"# rerun or change a setting and run: coffea-otcal run {path.name} -o <folder>\n"
    )
    body = yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False)
    return atomic_write_text(path, header + body)


def run_demo_cli(args: argparse.Namespace) -> int:
    """Run ``coffea-otcal demo``."""
    start = time.perf_counter()
    result = run_demo(args.out, args.scale, args.seed, not args.no_progress)
    _print_result(result)
    sys.stdout.write(f"demo finished in {time.perf_counter() - start:.0f} s\n")
    return 0
