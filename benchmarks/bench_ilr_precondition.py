"""Does a linear preconditioning of the potential's input help one flavour's ILR map?

The potential is parametrised as g(x) = h(P (x - m)) with the symmetric P = Sigma^-alpha
(Sigma the pooled covariance of source and target, m their mean): still convex in x, so
T(x) = m + P grad h(P (x - m)) is still the Brenier map of the ORIGINAL quadratic cost; only
the coordinates the network sees change. The semi-dual in h pairs x' = P (x - m) with
y' = P^-1 (y - m), i.e. the trainer's map runs from the whitened source towards the
"co-whitened" target (alpha = 0.5: unit source covariance, target covariance Sigma^2;
alpha = 0.25 balances the two). Prints the same row as ``bench_ilr_maps.py``.

Usage::

    python benchmarks/bench_ilr_precondition.py DIR b 0.25 '{"init": "gaussian"}'
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from bench_ilr_maps import discriminant_chi2

from coffea_otcal.closure import classifier_auc
from coffea_otcal.ot import OTConfig, fit_ot_map
from coffea_otcal.run_cli import read_run_configuration
from coffea_otcal.variations import Targets


def main() -> None:
    """Fit and score one preconditioned map (run folder, flavour, alpha, JSON overrides)."""
    torch.set_num_threads(1)
    run, flav, alpha = sys.argv[1], sys.argv[2], float(sys.argv[3])
    over = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    tgt = Targets.load(f"{run}/em/targets.npz").flavours[flav]
    settings = read_run_configuration(run)["ot"]["nominal"]
    settings.update(over)
    x = tgt.source_x.astype(np.float64)
    y, _, yw = tgt.target()
    y = np.asarray(y, dtype=np.float64)
    m = 0.5 * (x.mean(0) + y.mean(0))
    eigval, eigvec = np.linalg.eigh(0.5 * (np.cov(x.T) + np.cov(y.T)))
    p_mat = eigvec @ np.diag(eigval**-alpha) @ eigvec.T
    p_inv = eigvec @ np.diag(eigval**alpha) @ eigvec.T
    start = time.perf_counter()
    fitted = fit_ot_map((x - m) @ p_mat, (y - m) @ p_inv, source_weight=tgt.source_weight,
                        target_weight=yw, config=OTConfig(**settings), progress=False, seed=1)
    wall = time.perf_counter() - start
    moved = m + fitted.transport((x - m) @ p_mat) @ p_mat
    chi2 = discriminant_chi2(moved, y)
    print(f"| {flav} | alpha={alpha} {json.dumps(over)} | 1 | {wall:.1f} | - | "
          f"{classifier_auc(moved, y, seed=1):.4f} | {chi2[0]} | {chi2[1]} | {chi2[2]} |")


if __name__ == "__main__":
    main()
