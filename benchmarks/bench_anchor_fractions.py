"""Anchor (separable-mixture) estimate of the control-region fractions: does it work here?

Tests a hypothesis of docs/em.md ("Which way the fit slides"; refuted there with this
script's output): that the EM's flat direction is one-sided and that, under the anchor
condition, the true fractions are identified by the jets in each flavour's anchor region.
This experiment estimates the fraction matrix Pi (regions x
flavours) from pseudo-data alone: for each flavour a, the anchor is the top q of the pooled
data in the tagger's own p_a; F[r, a] = share of region r's data in that anchor; then
F = Pi K diag(eps) with K[g, a] = eps_g(t_a) / eps_a(t_a) the impurity of anchor a, and the
rows of Pi summing to 1 fix eps. K is taken as the identity (pure anchors), from the MC, or
from the true pseudo-data flavours (an oracle), and the estimate is compared with the true
realised fractions of the demo sample (generator seed SEED, 30k jets per region).

Usage::

    python benchmarks/bench_anchor_fractions.py [SEED]
"""

from __future__ import annotations

import sys

import numpy as np

from coffea_otcal.generator import simulate_jets
from coffea_otcal.run_cli import demo_generator_config

REGIONS = ["cr_b", "cr_c", "cr_light"]
CODES = [5, 4, 0]


def estimate(f: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Pi from F = Pi K diag(eps) with unit row sums of Pi."""
    k_inv = np.linalg.inv(k)
    w = k_inv @ np.ones(3)
    u = np.linalg.solve(f * w[None, :], np.ones(3))
    return f @ np.diag(u) @ k_inv


def main() -> None:
    """Estimate the fractions of the demo sample from its anchors and compare with the truth."""
    cfg = demo_generator_config(seed=int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    rng = np.random.default_rng(5)
    data = {r: simulate_jets(cfg, r, 30000, True, rng) for r in REGIONS}
    mc = {r: simulate_jets(cfg, r, 30000, False, rng) for r in REGIONS}
    true = np.array([[np.mean(data[r]["flavour"] == c) for c in CODES] for r in REGIONS])
    print("true realised fractions (rows cr_b, cr_c, cr_light; columns b, c, light)")
    print(true.round(4))
    pooled_d = np.concatenate([data[r]["probs"] for r in REGIONS])
    flav_d = np.concatenate([data[r]["flavour"] for r in REGIONS])
    pooled_m = np.concatenate([mc[r]["probs"] for r in REGIONS])
    flav_m = np.concatenate([mc[r]["flavour"] for r in REGIONS])
    for q in (0.002, 0.005, 0.01, 0.02, 0.05):
        f, k_mc, k_true = np.zeros((3, 3)), np.zeros((3, 3)), np.zeros((3, 3))
        for a in range(3):
            t = np.quantile(pooled_d[:, a], 1 - q)
            for i, r in enumerate(REGIONS):
                f[i, a] = np.mean(data[r]["probs"][:, a] > t)
            eff_mc = np.array([np.mean(pooled_m[flav_m == c, a] > t) for c in CODES])
            eff_true = np.array([np.mean(pooled_d[flav_d == c, a] > t) for c in CODES])
            k_mc[:, a], k_true[:, a] = eff_mc / eff_mc[a], eff_true / eff_true[a]
        for name, k in (("pure anchors", np.eye(3)), ("MC impurity", k_mc), ("true impurity", k_true)):
            pi = estimate(f, k)
            err = pi - true
            print(f"q={q:<6} {name:14s} enriched: "
                  + " ".join(f"{pi[i, i]:.4f}({err[i, i]:+.4f})" for i in range(3))
                  + f"  max|err| {np.abs(err).max():.4f}")
        print(f"   impurity K from MC (rows flavour, columns anchor): {k_mc.round(4).tolist()}")
        print(f"   impurity K true:                                   {k_true.round(4).tolist()}")


if __name__ == "__main__":
    main()
