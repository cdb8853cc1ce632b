"""How far each variation map moves the calibrated D(k) shapes, against how far its target moved.

Reads a finished pipeline run (``coffea-otcal demo --out DIR``): the per-flavour MC source,
nominal target and variation weights (``DIR/em/targets.npz``) and the bundle
(``DIR/ot/bundle.json.gz``). For every flavour it histograms D_bc, D_cl and D_hfl
(kappa = 1, 20 bins on [0, 1] each, unit-normalised) of

- the nominal target and each variation target (the same EM-flow sample, varied weights),
- the MC source moved by the nominal map and by each variation map,

and prints, per variation and direction, the L2 norm (over the 60 bins) of the target's
change ``|d target|``, of the calibrated MC's change ``|d map|``, the projection
``(d map . d target) / |d target|^2`` (1: the map follows its target exactly) and the
residual ``|d map - d target|``. A variation that leaves a flavour's target unchanged
(``|d target| = 0``) should not move that flavour's map at all: any ``|d map|`` there is
training noise that the variation band would report as a systematic.

Usage::

    python benchmarks/bench_variation_maps.py DIR
"""
from __future__ import annotations

import sys

import numpy as np

from coffea_otcal.bundle import Bundle
from coffea_otcal.geometry import d_bc, d_cl, d_hfl, ilr_inv
from coffea_otcal.kernels import FittedMap
from coffea_otcal.variations import Targets

EDGES = np.linspace(0.0, 1.0, 21)


def shapes(z: np.ndarray, w: np.ndarray) -> np.ndarray:
    p = ilr_inv(z)
    return np.concatenate(
        [np.histogram(fn(p), EDGES, weights=w)[0] / w.sum() for fn in (d_bc, d_cl, d_hfl)]
    )


def main(run: str) -> None:
    targets = Targets.load(f"{run}/em/targets.npz")
    bundle = Bundle.load(f"{run}/ot/bundle.json.gz")
    maps = {(m.flavour, m.variation): FittedMap(m.map.model_dump(mode="json")) for m in bundle.maps}
    zero_moves, real = [], []
    for flav, code in zip(targets.meta.classes, targets.meta.flavour_codes, strict=True):
        tgt = targets.flavours[flav]
        x, cx, wx = tgt.source_x, tgt.source_context, tgt.source_weight
        y, _, wy = tgt.target()
        h_target = shapes(y, wy)
        h_nominal = shapes(maps[(code, "nominal")].transport(x, cx), wx)
        print(f"== {flav}: |nominal map - nominal target| {np.linalg.norm(h_nominal - h_target):.4f}")
        for var, (w_up, w_down) in tgt.variation_weights.items():
            for direction, wv in (("up", w_up), ("down", w_down)):
                varied = maps.get((code, f"{var}_{direction}"))
                if varied is None:
                    continue
                dt = shapes(y, wv) - h_target
                dm = shapes(varied.transport(x, cx), wx) - h_nominal
                nt, nm = np.linalg.norm(dt), np.linalg.norm(dm)
                moved = nt > 1e-9 * np.linalg.norm(h_target)  # not rounding of the weights
                proj = f"{dm @ dt / (dt @ dt):+.2f}" if moved else "  n/a"
                print(f"  {var:30s} {direction:4s} |d target| {nt:.4f} |d map| {nm:.4f} "
                      f"proj {proj} resid {np.linalg.norm(dm - dt):.4f}")
                (real if moved else zero_moves).append(nm)
    if zero_moves:
        print(f"variations with an unchanged target: {len(zero_moves)}, |d map| max "
              f"{max(zero_moves):.4f}, mean {np.mean(zero_moves):.4f}")
    if real:
        print(f"variations with a moved target: {len(real)}, |d map| range "
              f"{min(real):.4f}-{max(real):.4f}")


if __name__ == "__main__":
    main(sys.argv[1])
