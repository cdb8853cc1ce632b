"""Conditional case: a Gaussian pair whose parameters vary with a context c (like log pT).

Source x ~ N(0, I_2) for every c; target y | c ~ N(mu(c), S(c)) with mu(c) = (c, -c/2) and
S(c) = R(c) diag(1 + c, 0.5 + 0.5 c)^2 R(c)^T, R a rotation by angle c. The optimal map is
T*(x | c) = mu(c) + S(c)^1/2 x. Contexts are drawn independently on both sides from the same
U(0, 1) law. We report L2-UVP (%) per context bin for the PICNN map and for an ICNN that
ignores the context. Usage: python benchmarks/bench_conditional.py [--steps 2000]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from coffea_otcal.ot import OTConfig, fit_ot_map


def cov_sqrt(c: np.ndarray) -> np.ndarray:
    """S(c)^1/2 for each context value (n, 2, 2)."""
    cos, sin = np.cos(c), np.sin(c)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    diag = np.stack([1 + c, 0.5 + 0.5 * c], -1)
    return np.einsum("nij,nj,nkj->nik", rot, diag, rot)


def target(c: np.ndarray, z: np.ndarray) -> np.ndarray:
    mu = np.stack([c, -0.5 * c], -1)
    return mu + np.einsum("nij,nj->ni", cov_sqrt(c), z)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    cx, cy = rng.uniform(0, 1, args.n), rng.uniform(0, 1, args.n)
    x = rng.normal(size=(args.n, 2))
    y = target(cy, rng.normal(size=(args.n, 2)))
    cfg = OTConfig(steps=args.steps, eval_every=args.steps // 10)
    t0 = time.perf_counter()
    cond = fit_ot_map(
        x,
        y,
        source_context=cx[:, None],
        target_context=cy[:, None],
        config=cfg,
        device="auto",
        progress=False,
        name="conditional",
    )
    wall_c = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = fit_ot_map(x, y, config=cfg, device="auto", progress=False, name="unconditional")
    wall_p = time.perf_counter() - t0
    edges = np.linspace(0, 1, 6)
    print("| context bin | L2-UVP % PICNN T(x|c) | L2-UVP % ICNN T(x) (ignores c) |")
    print("| --- | --- | --- |")
    rows = []
    for lo, hi in itertools.pairwise(edges):
        c = rng.uniform(lo, hi, 20_000)
        xt = rng.normal(size=(20_000, 2))
        truth = target(c, xt)
        var = float(np.sum(np.var(truth, 0)))
        u_c = 100 * float(np.mean(np.sum((cond.transport(xt, c[:, None]) - truth) ** 2, 1))) / var
        u_p = 100 * float(np.mean(np.sum((plain.transport(xt) - truth) ** 2, 1))) / var
        rows.append({"bin": [lo, hi], "uvp_picnn": u_c, "uvp_icnn": u_p})
        print(f"| [{lo:.1f}, {hi:.1f}) | {u_c:.3f} | {u_p:.2f} |", flush=True)
    print(
        f"\nwall time: PICNN {wall_c:.0f} s, ICNN {wall_p:.0f} s, device {cond.metrics['device']}, "
        f"{args.steps} steps, n = {args.n}"
    )
    if args.out:
        with Path(args.out).open("a", encoding="utf-8") as fh:
            fh.write(
                json.dumps(
                    {
                        "rows": rows,
                        "wall_picnn": wall_c,
                        "wall_icnn": wall_p,
                        "steps": args.steps,
                        "n": args.n,
                    }
                )
                + "\n"
            )


if __name__ == "__main__":
    main()
