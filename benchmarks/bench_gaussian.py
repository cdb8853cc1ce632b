"""Closed-form Gaussian pairs: map accuracy and optimality of the transport cost.

For source N(0, S1) and target N(m, S2) (random SPD matrices) the optimal map is
T*(x) = m + A x, A = S1^-1/2 (S1^1/2 S2 S1^1/2)^1/2 S1^-1/2. Trained on n_train samples per side; we report, on n fresh
source / target samples, E||x - T(x)||^2 of the trained map against: the exact discrete
OT cost between {x_i} and {T(x_i)} (POT ot.emd2; equal iff the map's matching is optimal),
the cost of the true map T* on the same x, the exact discrete OT cost between {x_i} and
{y_j} (biased upward by the sampling noise of y), the closed-form W2^2; and L2-UVP vs T*.
Usage: python benchmarks/bench_gaussian.py [--dims 2 16 128] [--n 4000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import ot as pot
import torch

from coffea_otcal.ot import OTConfig, fit_ot_map


def sqrtm(m: np.ndarray, p: float = 0.5) -> np.ndarray:
    vals, vecs = np.linalg.eigh(m)
    return (vecs * vals**p) @ vecs.T


def random_spd(dim: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return (q * rng.uniform(0.3, 2.0, size=dim)) @ q.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 16, 128])
    parser.add_argument("--n", type=int, default=4000, help="evaluation samples (emd is O(n^3))")
    parser.add_argument("--n-train", type=int, default=50_000, help="training samples per side")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for dim in args.dims:
        rng = np.random.default_rng(dim)
        s1, s2 = random_spd(dim, rng), random_spd(dim, rng)
        mean = rng.normal(size=dim) * 0.5
        r1, r1i = sqrtm(s1), sqrtm(s1, -0.5)
        a = r1i @ sqrtm(r1 @ s2 @ r1) @ r1i
        w2_exact = float(mean @ mean + np.trace(s1 + s2 - 2 * sqrtm(r1 @ s2 @ r1)))
        x_train = rng.normal(size=(args.n_train, dim)) @ sqrtm(s1)
        y_train = mean + rng.normal(size=(args.n_train, dim)) @ sqrtm(s2)
        x = rng.normal(size=(args.n, dim)) @ sqrtm(s1)
        y = mean + rng.normal(size=(args.n, dim)) @ sqrtm(s2)
        cfg = OTConfig(steps=args.steps, batch_size=1024, eval_every=args.steps // 5)
        t0 = time.perf_counter()
        fm = fit_ot_map(
            x_train, y_train, config=cfg, device="auto", progress=False, name=f"gauss-{dim}"
        )
        wall = time.perf_counter() - t0
        tx = fm.transport(x)
        cost_map = float(np.mean(np.sum((x - tx) ** 2, 1)))
        unif = np.full(args.n, 1 / args.n)
        cost_emd = float(pot.emd2(unif, unif, pot.dist(x, y), numItermax=10_000_000))
        # optimality of the map itself: the identity matching x_i -> T(x_i) must be the
        # optimal assignment between {x_i} and {T(x_i)} (cyclical monotonicity)
        cost_emd_self = float(pot.emd2(unif, unif, pot.dist(x, tx), numItermax=10_000_000))
        truth = mean + x @ a.T
        cost_true = float(np.mean(np.sum((x - truth) ** 2, 1)))
        uvp = 100 * float(np.mean(np.sum((tx - truth) ** 2, 1))) / float(np.trace(s2))
        row = {
            "dim": dim,
            "n": args.n,
            "n_train": args.n_train,
            "cost_map": cost_map,
            "cost_emd": cost_emd,
            "cost_emd_x_tx": cost_emd_self,
            "cost_true_map": cost_true,
            "rel_gap_self_pct": 100 * (cost_map / cost_emd_self - 1),
            "rel_gap_true_pct": 100 * (cost_map / cost_true - 1),
            "w2_closed_form": w2_exact,
            "rel_gap_emd_pct": 100 * (cost_map / cost_emd - 1),
            "rel_gap_exact_pct": 100 * (cost_map / w2_exact - 1),
            "uvp": uvp,
            "wall_s": wall,
            "device": fm.metrics["device"],
            "steps": fm.metrics["steps"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with Path(args.out).open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
    print()
    print(
        "| d | n | E||x-T(x)||^2 | emd(x, T(x)) | gap | E||x-T*(x)||^2 (true map, same x) | gap "
        "| emd(x, y) | gap | closed-form W2^2 | L2-UVP % | wall [s] |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['dim']} | {r['n']} | {r['cost_map']:.4f} | {r['cost_emd_x_tx']:.4f} | "
            f"{r['rel_gap_self_pct']:+.3f}% | {r['cost_true_map']:.4f} | {r['rel_gap_true_pct']:+.2f}% | "
            f"{r['cost_emd']:.4f} | {r['rel_gap_emd_pct']:+.2f}% | {r['w2_closed_form']:.4f} | "
            f"{r['uvp']:.3f} | {r['wall_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
