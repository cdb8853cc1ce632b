"""Speed of the numpy map kernel (points per CPU-second, one thread) for exported ICNN / PICNN potentials.

Usage: python benchmarks/bench_map_speed.py [--n 2000000]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import functools
import time

import numpy as np
import torch

from coffea_otcal.kernels import FittedMap
from coffea_otcal.potentials import ICNN, PICNN, ICNNConfig, PICNNConfig


def fitted(net, dim: int, context_dim: int) -> dict:
    pre = {"shift": [0.1] * dim, "scale": 1.3}
    if context_dim:
        pre |= {"context_shift": [0.0] * context_dim, "context_scale": [1.0] * context_dim}
    return {
        "format": "coffea-otcal.fitted-map",
        "version": 1,
        "name": "bench",
        "potential": net.export(),
        "preprocessing": pre,
        "metrics": {},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    cases = [
        ("icnn d=2 [32,32] (default)", ICNN(ICNNConfig(dim=2, hidden=(32, 32))), 2, 0),
        ("icnn d=2 [16,16]", ICNN(ICNNConfig(dim=2, hidden=(16, 16))), 2, 0),
        (
            "picnn d=2 c=2 [16,16] trunk [8,8] (default)",
            PICNN(PICNNConfig(dim=2, context_dim=2, hidden=(16, 16), context_hidden=(8, 8))),
            2,
            2,
        ),
        (
            "picnn d=2 c=2 [32,32] trunk [32,32]",
            PICNN(PICNNConfig(dim=2, context_dim=2, hidden=(32, 32))),
            2,
            2,
        ),
        ("icnn d=128 [256,256,128]", ICNN(ICNNConfig(dim=128, hidden=(256, 256, 128))), 128, 0),
    ]
    print(
        f"# bench_map_speed ({time.strftime('%Y-%m-%d %H:%M:%S')}, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, n = {args.n:,})"
    )
    print("| potential | dtype | call | points / CPU-second (1 thread) |")
    print("| --- | --- | --- | --- |")
    for label, net, dim, kdim in cases:
        n = args.n if dim <= 4 else args.n // 100
        x = rng.normal(size=(n, dim))
        c = rng.normal(size=(n, kdim)) if kdim else None
        for dtype in (np.float64, np.float32):
            fm = FittedMap.from_export(fitted(net, dim, kdim), dtype=dtype)
            xs, cs = x.astype(dtype), None if c is None else c.astype(dtype)
            calls = (
                ("potential.grad (standardised)", fm.potential.grad, xs, cs),
                ("FittedMap.transport", fm.transport, x, c),
            )
            for call, func, xa, ca in calls:
                fn = functools.partial(func, xa, ca)
                best = min(_timed(fn) for _ in range(args.repeat))
                print(f"| {label} | {np.dtype(dtype).name} | {call} | {n / best:.3g} |", flush=True)


def _timed(fn) -> float:
    # CPU time of this single-threaded process: robust to other jobs sharing the cores
    t = time.process_time()
    fn()
    return time.process_time() - t


if __name__ == "__main__":
    main()
