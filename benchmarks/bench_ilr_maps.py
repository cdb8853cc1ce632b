"""Accuracy of one flavour's ILR map against its EM target, for OT settings given on the command line.

Reads a finished pipeline run (``coffea-otcal demo --out DIR`` or ``coffea-otcal run``):
the flavour's MC source and its nominal EM target (``DIR/em/targets.npz``) and the
nominal OT settings of the run (``DIR/pipeline.yaml``), overrides some of them, fits the
map on one CPU thread and prints the held-out classifier AUC of transported source vs
target and the 20-bin shape chi2/ndf of D_bc, D_cl and D_hfl (kappa = 1) between them.

Usage::

    python benchmarks/bench_ilr_maps.py DIR b '{"steps": 2500, "patience": null}' [SEED]

SEED (default 1) seeds the training (initial weights, validation split, batches).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from coffea_otcal import geometry
from coffea_otcal.closure import classifier_auc, discriminant_values, shape_chi2
from coffea_otcal.ot import OTConfig, fit_ot_map
from coffea_otcal.run_cli import read_run_configuration
from coffea_otcal.variations import Targets


def discriminant_chi2(moved: np.ndarray, target: np.ndarray) -> list[float]:
    """20-bin shape chi2/ndf of D_bc, D_cl, D_hfl (kappa = 1) between two ILR samples."""
    p_moved, p_target = geometry.ilr_inv(moved), geometry.ilr_inv(target)
    edges = np.linspace(0.0, 1.0, 21)
    chi2 = []
    for name in ("D_bc", "D_cl", "D_hfl"):
        a = np.histogram(np.clip(discriminant_values(p_moved, name, 1.0), 0, 1 - 1e-12), edges)[0]
        b = np.histogram(np.clip(discriminant_values(p_target, name, 1.0), 0, 1 - 1e-12), edges)[0]
        a, b = a.astype(float), b.astype(float)
        chi2.append(round(shape_chi2(a, a, b, b).chi2_ndf, 2))
    return chi2


def main() -> None:
    """Fit and score one map (arguments: run folder, flavour label, JSON overrides, seed)."""
    torch.set_num_threads(1)
    run, flav = sys.argv[1], sys.argv[2]
    over = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    tgt = Targets.load(f"{run}/em/targets.npz").flavours[flav]
    settings = read_run_configuration(run)["ot"]["nominal"]
    settings.update(over)
    y, _, yw = tgt.target()
    start = time.perf_counter()
    fitted = fit_ot_map(tgt.source_x, y, source_weight=tgt.source_weight, target_weight=yw,
                        config=OTConfig(**settings), progress=False, seed=seed)
    wall = time.perf_counter() - start
    moved = fitted.transport(tgt.source_x)
    chi2 = discriminant_chi2(moved, y)
    metrics = fitted.export()["metrics"]
    print(f"| {flav} | {json.dumps(over)} | {seed} | {wall:.1f} | {metrics['best_step']} | "
          f"{classifier_auc(moved, y, seed=1):.4f} | {chi2[0]} | {chi2[1]} | {chi2[2]} |")


if __name__ == "__main__":
    main()
