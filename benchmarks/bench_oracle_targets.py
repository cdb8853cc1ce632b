"""Oracle targets: the pipeline's OT, export and closure with the TRUE per-flavour data.

Splits the validation mis-closure of a demo run into the part the EM leaves (extracted
densities, fractions) and the part the OT maps leave: the EM targets of ``RUN/em`` are
replaced by fresh true pseudo-data jets of each flavour (the demo generator, read as the
fill stage reads them; an independent seed from the per-flavour closure check), without
variations, and the rest of the chain is run unchanged on ``RUN``'s fill and configuration.
The closure report in ``OUT/closure`` is then what a perfect EM would give with these maps.

Usage::

    python benchmarks/bench_oracle_targets.py RUN OUT [N_PER_FLAVOUR]

``RUN`` is a finished ``coffea-otcal demo`` (or ``run`` of the demo configuration) folder
with ``pipeline.yaml`` or ``pipeline.json``, ``fill/`` and ``em/``; ``OUT`` must not exist.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from coffea_otcal import geometry
from coffea_otcal.pipeline import load_pipeline_config, run_pipeline
from coffea_otcal.run_cli import (
    _truth,
    demo_generator_config,
    read_run_configuration,
    write_pipeline_config,
)
from coffea_otcal.variations import Targets


def main() -> None:
    """Replace the EM targets by the truth and rerun OT, export and closure."""
    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 60_000
    if out.exists():
        msg = f"{out} exists; give a new folder"
        raise SystemExit(msg)
    config = load_pipeline_config(read_run_configuration(run))
    out.mkdir(parents=True)
    write_pipeline_config(config, out / "pipeline.yaml")
    for stage in ("fill", "em"):
        shutil.copytree(run / stage, out / stage)
    gen = SimpleNamespace(config=demo_generator_config(seed=1))
    oracle = _truth(gen, seed=7, n=n)["per_flavour"]
    targets = Targets.load(out / "em" / "targets.npz")
    codes = dict(zip(targets.meta.classes, targets.meta.flavour_codes, strict=True))
    if any(t.source_context is not None for t in targets.flavours.values()):
        msg = "conditional targets: this benchmark handles the unconditional demo only"
        raise SystemExit(msg)
    for name, tgt in targets.flavours.items():
        y = np.asarray(geometry.ilr(oracle[codes[name]]["data_probs"]))
        tgt.target_y = y
        tgt.target_weight = np.full(len(y), tgt.source_weight.sum() / len(y))
        tgt.variation_weights = {}
        print(f"{name}: source {len(tgt.source_x)} MC jets, oracle target {len(y)} true data jets")
    targets.meta = targets.meta.model_copy(update={"variations": [], "method": "flow"})
    targets.save(out / "em" / "targets.npz")
    truth = _truth(gen, seed=config.seed)  # the per-flavour check of the demo
    start = time.perf_counter()
    result = run_pipeline(config, out, progress=False, truth=truth)
    print(f"OT + export + closure with oracle targets: {time.perf_counter() - start:.0f} s")
    report = json.loads(result.report.with_suffix(".json").read_text())
    s = report["summary"]
    print(f"validation: AUC {s['auc_before']:.3f} -> {s['auc_after']:.3f}, mean chi2/ndf "
          f"{s['mean_chi2_ndf_before']:.2f} -> {s['mean_chi2_ndf_after']:.2f}, smallest p "
          f"{s['min_p_value_after']:.2g}")
    for region, r in report["regions"].items():
        vals = ", ".join(f"{k} {h['after']['chi2_ndf']:.2f}" for k, h in r["histograms"].items())
        print(f"{region}: AUC after {r['classifier_auc']['after']:.3f}; {vals}")
    for flav, res in (report.get("per_flavour_truth") or {}).items():
        print(f"per-flavour truth {flav}: " + ", ".join(
            f"{k} {v['before']:.2f} -> {v['after']:.2f}" for k, v in res.items()))


if __name__ == "__main__":
    main()
