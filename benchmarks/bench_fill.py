"""Fill throughput (jets/s) of the control-region processor, eager and on the futures executor.

Generates a toy sample with ``coffea_otcal.generator`` (270k jets at the default
``--scale 0.75``: four regions, MC and pseudo-data), then runs ``run_fill`` with the
iterative executor and with the futures executor (2 worker processes, then 2 threads) and
prints a table. The ``run_fill`` wall time includes the input checks, worker start-up and
writing the parquet store. The last row runs the processor through ``processor.Runner``
on an already started process pool (second of two runs; no store written): the
steady-state rate once worker start-up is paid.

    python benchmarks/bench_fill.py [--scale 0.75] [--workers 2] [--chunksize 20000]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from coffea_otcal.fill import load_config, run_fill
from coffea_otcal.generator import GeneratorConfig, generate
from coffea_otcal.store import load_store


def _warm_pool_row(datasets, regions, args):
    """Futures executor on an already started process pool: the steady-state rate."""
    from coffea import processor
    from loky import ProcessPoolExecutor

    from coffea_otcal.processors.control_region import ControlRegionProcessor, ControlRegionSchema

    proc = ControlRegionProcessor(
        "deepjet",
        regions,
        {k: {"is_data": v["is_data"]} for k, v in datasets.items()},
        seed=args.seed,
    )
    fileset = {k: v["files"] for k, v in datasets.items()}
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        executor = processor.FuturesExecutor(workers=args.workers, pool=pool, status=False)
        runs = []
        for _ in range(2):  # the first run starts the workers and imports coffea in them
            runner = processor.Runner(
                executor, schema=ControlRegionSchema, chunksize=args.chunksize, metadata_cache={}
            )
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # coffea's bars ignore status=False
                out = runner(fileset, proc, treename="Events")
            runs.append(time.perf_counter() - t0)
    n = sum(len(a["valid"]) for per in out["jets"].values() for a in per.values())
    return (f"futures ({args.workers} proc., warm)", n, runs[-1], n / runs[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.75)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunksize", type=int, default=20_000, help="events per chunk")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="bench_fill_") as tmp:
        base = Path(tmp)
        t0 = time.perf_counter()
        sample = generate(
            GeneratorConfig(seed=args.seed, scale=args.scale), base / "gen", progress=False
        )
        t_gen = time.perf_counter() - t0
        files = [f.path for f in sample.files]
        datasets = {f.dataset: {"files": [f.path], "is_data": f.is_data} for f in sample.files}
        regions: dict[str, dict[str, list[str]]] = {}
        for f in sample.files:
            regions.setdefault(f.region, {"datasets": []})["datasets"].append(f.dataset)
        rows = []
        for label, executor in (
            ("iterative (eager)", {"kind": "iterative"}),
            (f"futures ({args.workers} processes)", {"kind": "futures", "workers": args.workers}),
            (
                f"futures ({args.workers} threads)",
                {"kind": "futures", "workers": args.workers, "pool": "threads"},
            ),
        ):
            config = load_config(
                {
                    "datasets": datasets,
                    "regions": regions,
                    "adapter": {"name": "deepjet"},
                    "output": str(base / f"cr_{executor['kind']}_{len(rows)}.parquet"),
                    "executor": {**executor, "chunksize": args.chunksize},
                    "seed": args.seed,
                }
            )
            report = run_fill(config, progress=False)
            n = len(load_store(report.output).weight(flagged=None))
            rows.append((label, n, report.seconds, n / report.seconds))
        rows.append(_warm_pool_row(datasets, regions, args))

    n_events = sum(f.n_events for f in sample.files)
    print(
        f"# bench_fill  python {platform.python_version()}  cpus={os.cpu_count()}  "
        f"load={os.getloadavg()[0]:.2f}  chunksize={args.chunksize} events"
    )
    print(f"# sample: {len(files)} files, {n_events} events, generated in {t_gen:.2f} s")
    print(f"{'executor':<26} {'jets':>9} {'wall [s]':>9} {'jets/s':>10}")
    for label, n, seconds, rate in rows:
        print(f"{label:<26} {n:>9} {seconds:>9.2f} {rate:>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
