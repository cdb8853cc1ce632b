"""The demo's chain, unchanged, on samples it was not developed on.

Issue 6 asks that the pipeline not be tuned to the generator: it will be run on other
flavour compositions, other shapes of mismodelling and other taggers' columns. Each
variant below changes one of these in the demo's generator configuration
(``run_cli.demo_generator_config``), generates the sample and runs the demo's pipeline
configuration on it (``run_cli.demo_config``, the same settings as ``coffea-otcal demo``),
then prints the validation-region summary and the per-flavour check against the truth.

Variants:

* ``upart``: UParT's columns (``btagUParTAK4B``, ``...CvL``, ``...CvB``) instead of DeepJet's;
* ``gn2_float``: ATLAS-style GN2 probability columns (``GN2v01_pb``, ``_pc``, ``_pu``) stored as
  plain float32 (no reduced mantissa, so the adapter does not dequantise);
* ``purer_data``: pseudo-data *purer* than the MC in every control region (the demo's is less
  pure), e.g. cr_b 0.93 b in data against 0.90 in MC;
* ``low_pt_mismodelling``: the smearing grows towards low pT (slope -0.3 instead of +0.3),
  twice the secondary-vertex loss, strength 1.0;
* ``gn2_physlite``: the ``gn2_float`` sample written in the ATLAS PHYSLITE layout (MeV,
  ``AnalysisJetsAuxDyn.*``, GN2 scores in a linked ``BTagging_AntiKt4EMPFlow`` container,
  ``EventInfo.mcEventWeights``), read with ``input.format: physlite``.

Usage::

    python benchmarks/bench_unseen.py OUT [VARIANT ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from coffea_otcal.generator import generate
from coffea_otcal.generator_config import FlavourFractions, GeneratorConfig, MismodellingConfig
from coffea_otcal.pipeline import run_pipeline
from coffea_otcal.run_cli import _truth, demo_config, demo_generator_config, write_pipeline_config

SEED = 1
#: every variant, in the order of the docs' table (the default when none is named).
VARIANTS = ("upart", "gn2_float", "purer_data", "low_pt_mismodelling", "gn2_physlite")


def variant_config(name: str) -> GeneratorConfig:
    """The demo's generator configuration with one change."""
    base = demo_generator_config(seed=SEED)
    if name == "upart":
        return base.model_copy(update={"tagger": "upart"})
    if name == "gn2_float":
        return base.model_copy(update={"tagger": "gn2", "quantise": False})
    if name == "gn2_physlite":  # the same sample as gn2_float, in the PHYSLITE layout
        return base.model_copy(update={"tagger": "gn2", "quantise": False, "layout": "physlite"})
    if name == "purer_data":
        data = {"cr_b": (0.93, 0.03, 0.04), "cr_c": (0.04, 0.91, 0.05), "cr_light": (0.03, 0.07, 0.90)}
        regions = {
            r: (cfg.model_copy(update={"data_fractions": FlavourFractions(
                b=data[r][0], c=data[r][1], light=data[r][2])}) if r in data else cfg)
            for r, cfg in base.regions.items()
        }
        return base.model_copy(update={"regions": regions})
    if name == "low_pt_mismodelling":
        mis = MismodellingConfig(strength=1.0, smear_pt_slope=-0.3, sv_dropout=0.16)
        return base.model_copy(update={"mismodelling": mis})
    msg = f"unknown variant {name!r}"
    raise SystemExit(msg)


def main() -> None:
    """Generate each variant and run the demo's chain on it."""
    out = Path(sys.argv[1])
    names = sys.argv[2:] or list(VARIANTS)
    for name in names:
        gen_cfg = variant_config(name)
        run = out / name
        start = time.perf_counter()
        sample = generate(gen_cfg, run / "sample", progress=False)
        config = demo_config(sample, SEED)
        write_pipeline_config(config, run / "pipeline.yaml")
        result = run_pipeline(config, run, progress=False, truth=_truth(sample, SEED))
        wall = time.perf_counter() - start
        s = result.stages["closure"].summary
        print(f"== {name}: {wall:.0f} s (stages {s['stage_seconds']})")
        print(f"   AUC {s['auc_before']:.3f} -> {s['auc_after']:.3f} (baseline {s['auc_baseline']:.3f}); "
              f"chi2/ndf {s['mean_chi2_ndf_before']:.2f} -> {s['mean_chi2_ndf_after']:.2f} "
              f"(baseline {s['mean_chi2_ndf_baseline']:.2f}, equal stat "
              f"{s['mean_chi2_ndf_baseline_equal_stat']:.2f}, rho {s['rho_baseline']:.3f}); "
              f"smallest p {s['min_p_value_after']:.3g}; coverage {100 * s['band_coverage']:.1f} % "
              f"(1 sigma) / {100 * s['band_coverage_90']:.1f} % (90 %)", flush=True)
        report = (run / "closure" / "report.md").read_text()
        print("   " + report[report.index("## Per flavour"):].split("\n\nPlots")[0].replace("\n", "\n   "))


if __name__ == "__main__":
    main()
