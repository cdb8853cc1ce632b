"""W2 benchmark (Korotin et al. 2021, Mix3toMix10): L2-UVP of the trained forward map.

Usage: python benchmarks/bench_w2.py --dims 2 4 8 16 [--method conjugate] [--steps N]
       [--out results.jsonl]
Trains on 100k unpaired source / target samples (model selection by the held-out dual
only), scores L2-UVP (%) on 4096 fresh source samples against the known optimal map.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from coffea_otcal.ot import OTConfig, fit_ot_map
from coffea_otcal.w2bench import load_w2_pair

MMV2 = {2: 0.1, 4: 0.68, 8: 2.2, 16: 3.1, 32: 5.3, 64: 10.1, 128: 3.2}
BEST = {2: 0.1, 4: 0.3, 8: 0.7, 16: 1.4, 32: 2.8, 64: 3.2, 128: 2.0}
LINEAR = {2: 14.1, 4: 14.9, 8: 27.3, 16: 41.6, 32: 55.3, 64: 63.9, 128: 63.6}


def bench_hidden(dim: int) -> tuple[int, ...]:
    # the benchmark's own potential widths (Korotin et al. DenseICNN sizes)
    return (max(2 * dim, 64), max(2 * dim, 64), max(dim, 32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--method", default="conjugate", choices=["conjugate", "minimax"])
    parser.add_argument("--steps", type=int, default=None, help="default: per dimension")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--n", type=int, default=100_000, help="training samples per side")
    parser.add_argument("--hidden", type=int, nargs="+", default=None)
    parser.add_argument("--activation", default="smooth_relu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="append one JSON line per run")
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument(
        "--eval-n", type=int, default=131072,
        help="fresh source samples of the precise L2-UVP (the paper's 4096 is also reported)",
    )
    parser.add_argument("--save-map", default=None, help="write the fitted map JSON here")
    parser.add_argument(
        "--config", default="{}", help="extra OTConfig fields as JSON, e.g. '{\"weight_decay\": 1e-3}'"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for dim in args.dims:
        pair = load_w2_pair(dim)
        x = pair.sample_source(args.n, 1)
        y = pair.sample_target(args.n, 2)
        steps = args.steps or (5000 if dim <= 16 else 3000)
        hidden = tuple(args.hidden) if args.hidden else bench_hidden(dim)
        cfg = OTConfig(
            method=args.method,
            steps=steps,
            batch_size=args.batch,
            hidden=hidden,
            activation=args.activation,
            eval_every=args.eval_every or max(steps // 10, 1),
            g_steps=10,
            dtype=args.dtype,
            **json.loads(args.config),
        )
        start, cpu0 = time.perf_counter(), time.process_time()
        fm = fit_ot_map(
            x, y, config=cfg, device=args.device, seed=args.seed, progress=False, name=f"w2-{dim}"
        )
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
        uvp = pair.l2_uvp(fm.transport, n=4096)
        uvp_precise = pair.l2_uvp(fm.transport, n=args.eval_n, seed=54321)
        if args.save_map:
            Path(args.save_map).write_text(json.dumps(fm.export()))
        row = {
            "dim": dim,
            "seed": args.seed,
            "method": args.method,
            "uvp": uvp,
            "uvp_precise": uvp_precise,
            "eval_n": args.eval_n,
            "mmv2": MMV2[dim],
            "best": BEST[dim],
            "wall_s": wall,
            "cpu_s": cpu,
            "device": fm.metrics["device"],
            "steps": fm.metrics["steps"],
            "best_step": fm.metrics["best_step"],
            "val_dual": fm.metrics["val_dual"],
            "hidden": list(hidden),
            "batch": args.batch,
            "n": args.n,
            "threads": args.threads,
            "activation": args.activation,
            "dtype": args.dtype,
            "config": json.loads(args.config),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with Path(args.out).open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
    print()
    print(
        "| D | L2-UVP % (ours) | L2-UVP % (--eval-n) | MMv2 | best published | linear "
        "| CPU time [s] | wall time [s] | device | steps (best) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        precise = "-" if r.get("uvp_precise") is None else f"{r['uvp_precise']:.4f}"
        print(
            f"| {r['dim']} | {r['uvp']:.4f} | {precise} | {r['mmv2']} | {r['best']} | "
            f"{LINEAR[r['dim']]} | "
            f"{r['cpu_s']:.0f} | {r['wall_s']:.0f} | {r['device']} ({r['threads']} thread) | {r['steps']} ({r['best_step']}) |"
        )


if __name__ == "__main__":
    main()
