"""What limits the semi-dual trainer on the W2 benchmark pair (Korotin et al. 2021, Mix3toMix10, d = 2).

Diagnostics behind docs/ot.md, "W2 pair d = 2: what limited the semi-dual". Each mode prints
one JSON line; L2-UVP is measured on 131072 fresh source samples (seed 54321).

    python benchmarks/bench_w2_diagnose.py regress-true OUT.json [--steps 16000]
        least squares of grad g on the TRUE map (ground truth: a capacity check only, never a
        training method): the floor of the architecture and schedule.
    python benchmarks/bench_w2_diagnose.py finetune MAP.json OUT.json '{"lr": 1e-4, ...}'
        continue the semi-dual from a saved map (bench_w2.py --save-map) with OTConfig
        overrides (batch size, learning rate, conjugate steps, ...): noise or conjugate
        accuracy or basin?
    python benchmarks/bench_w2_diagnose.py units MAP.json [MAP.json ...]
        per hidden layer: units never active on the source (dead), and the median fraction
        of source points in the curved part 0 < a < 1 of the smooth ReLU.
    python benchmarks/bench_w2_diagnose.py blocks OUT.json --block 2048 [--steps 8000]
        least squares of grad g on the barycentric targets of exact OT plans between blocks
        of source and target rows (the regression stage of init="minibatch_ot" alone).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from coffea_otcal.kernels import FITTED_MAP_FORMAT, FITTED_MAP_VERSION, FittedMap
from coffea_otcal.ot import OTConfig, fit_ot_map
from coffea_otcal.ot_pretrain import blockwise_ot_targets, fit_gradient_regression
from coffea_otcal.potentials import ICNN, ICNNConfig, potential_from_export
from coffea_otcal.w2bench import load_w2_pair

HIDDEN = (64, 64, 32)


def precise_uvp(pair, fitted: FittedMap) -> float:
    return pair.l2_uvp(fitted.transport, n=131072, seed=54321)


def fitted_map(g: ICNN, shift: np.ndarray, scale: float, name: str) -> FittedMap:
    pre = {"shift": [float(v) for v in shift], "scale": scale,
           "context_shift": None, "context_scale": None}
    return FittedMap({"format": FITTED_MAP_FORMAT, "version": FITTED_MAP_VERSION, "name": name,
                      "potential": g.float().export(), "preprocessing": pre, "metrics": {}})


def regress(pair, x: np.ndarray, target: np.ndarray, steps: int, name: str) -> FittedMap:
    """Least squares of grad g on (x, target) in the trainer's standardisation (ICNN 64-64-32)."""
    shift = 0.5 * (x.mean(0) + target.mean(0))
    scale = float(np.sqrt(0.5 * (x.var(0).mean() + target.var(0).mean())))
    g = ICNN(ICNNConfig(dim=2, hidden=HIDDEN), seed=0)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((a - shift) / scale, dtype=torch.float32)

    fit_gradient_regression(g, tensor(x), None, tensor(target), torch.ones(len(x)), steps=steps,
                            batch_size=2048, lr=1e-2, lr_final=1e-4, grad_clip=10.0,
                            generator=torch.Generator().manual_seed(0))
    return fitted_map(g, shift, scale, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["regress-true", "finetune", "units", "blocks"])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--steps", type=int, default=16000)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--n", type=int, default=200_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pair = load_w2_pair(2)
    cpu0 = time.process_time()
    row: dict = {"mode": args.mode}
    if args.mode == "regress-true":
        x = pair.sample_source(2_000_000, 1)
        fm = regress(pair, x, pair.optimal_map(x), args.steps, "regress-true")
        Path(args.paths[0]).write_text(json.dumps(fm.export()))
        row.update(steps=args.steps, uvp=precise_uvp(pair, fm))
    elif args.mode == "finetune":
        start = FittedMap.from_export(json.loads(Path(args.paths[0]).read_text()))
        over = json.loads(args.paths[2]) if len(args.paths) > 2 else {}
        cfg = OTConfig(**{"warmup_steps": 0, "selection": "last", **over})
        x, y = pair.sample_source(400_000, 1), pair.sample_target(400_000, 2)
        fm = fit_ot_map(x, y, config=cfg, init_from=start, progress=False, seed=5)
        Path(args.paths[1]).write_text(json.dumps(fm.export()))
        row.update(overrides=over, uvp_start=precise_uvp(pair, start), uvp=precise_uvp(pair, fm))
    elif args.mode == "units":
        x = pair.sample_source(100_000, 3)
        for path in args.paths:
            d = json.loads(Path(path).read_text())
            g = potential_from_export(d["potential"]).double()
            pre = d["preprocessing"]
            xs = torch.as_tensor((x - np.array(pre["shift"])) / pre["scale"])
            with torch.no_grad():
                acts, _ = g._forward_layers(xs)
            layers = []
            for a in acts:
                a = a.numpy()
                curved = ((a > 0) & (a < 1)).mean(0)
                layers.append({"width": a.shape[1], "dead": int((a.max(0) <= 0).sum()),
                               "median_curved_fraction": round(float(np.median(curved)), 3)})
            print(json.dumps({"mode": "units", "map": path, "layers": layers}))
        return
    else:
        x, y = pair.sample_source(args.n, 1), pair.sample_target(args.n, 2)
        pairs = blockwise_ot_targets(x, y, block=args.block, max_rows=args.n)
        fm = regress(pair, pairs["x"], pairs["target"], args.steps, f"blocks-{args.block}")
        Path(args.paths[0]).write_text(json.dumps(fm.export()))
        row.update(block=args.block, n=args.n, steps=args.steps, plan_seconds=pairs["seconds"],
                   uvp=precise_uvp(pair, fm))
    row["cpu_s"] = round(time.process_time() - cpu0, 1)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
