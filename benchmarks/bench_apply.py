"""Benchmark of the exact applier and of calibrated skims (eager, Dask LocalCluster).

Run:  python benchmarks/bench_apply.py [--jets 1000000] [--scale 0.2] [--repeat 3] [--skip-dask]
      [--bundle DEMO/ot/bundle.json.gz]

Prints four tables:
1. applier throughput (1 thread) for d = 2 maps: the default PICNN with context (hidden
   (16, 16), trunk (8, 8), ``ot.default_hidden``), the default context-free ICNN (32, 32)
   of the demo, and the larger PICNN (32, 32) / trunk (32, 32) measured before: kernel only
   and the full per-jet path (adapter -> ILR -> map -> inverse ILR -> tagger columns),
   nominal only, and the cost of each extra variation (two maps: up and down);
2. skim wall time of the generated NanoAOD, calibrated (nominal + all variations) vs the
   same skim without calibration (eager iterative executor), median of --repeat
   interleaved runs, for the default PICNN and the larger PICNN maps;
3. 2-worker LocalCluster skim vs eager: identical parts and wall time;
4. MALLOC_TRIM_THRESHOLD_ of dask workers: NanoEvents file opening time on a worker.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
from threadpoolctl import threadpool_limits

REAL = Path(__file__).parents[1] / "tests" / "data" / "nano_tt_v15.root"
CONTEXT = [
    {"name": "log_pt", "column": "pt", "transform": "log", "low": 20.0, "high": 1000.0},
    {"name": "abs_eta", "column": "eta", "transform": "abs", "low": 0.0, "high": 2.5},
]


#: (label, hidden, context trunk, number of context variables) of the benchmarked maps.
MAPS = [
    ("PICNN (16, 16) trunk (8, 8), context 2 [default with context]", (16, 16), (8, 8), 2),
    ("ICNN (32, 32), no context [demo default]", (32, 32), None, 0),
    ("PICNN (32, 32) trunk (32, 32), context 2", (32, 32), (32, 32), 2),
]


def make_bundle(
    hidden: tuple[int, ...],
    n_context: int,
    variations: list[str],
    trunk: tuple[int, ...] | None = None,
):
    """A bundle of random (P)ICNN maps (speed does not depend on the weights' values)."""
    import torch

    from coffea_otcal.bundle import Bundle
    from coffea_otcal.potentials import ICNN, PICNN, ICNNConfig, PICNNConfig

    torch.set_num_threads(1)
    names = ["nominal", *(f"{v}_{d}" for v in variations for d in ("up", "down"))]
    maps = {}
    for i, code in enumerate((5, 4, 0)):
        for j, name in enumerate(names):
            pre = {"shift": [0.0, 0.0], "scale": 1.5}
            if n_context:
                net = PICNN(
                    PICNNConfig(dim=2, context_dim=n_context, hidden=hidden, context_hidden=trunk),
                    seed=10 * i + j,
                )
                pre |= {
                    "context_shift": [4.0, 1.0][:n_context],
                    "context_scale": [0.8, 0.7][:n_context],
                }
            else:
                net = ICNN(ICNNConfig(dim=2, hidden=hidden), seed=10 * i + j)
            maps[(code, name)] = {
                "format": "coffea-otcal.fitted-map",
                "version": 1,
                "name": f"{code}/{name}",
                "potential": net.export(),
                "preprocessing": pre,
            }
    return Bundle.from_maps(
        maps,
        ["b", "c", "light"],
        "deepjet",
        CONTEXT[:n_context],
        {v: f"variation {v}" for v in variations},
    )


def random_columns(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    from coffea_otcal.adapters import get_adapter

    rng = np.random.default_rng(seed)
    p = rng.dirichlet([0.6, 0.4, 0.8], n)
    cols = {k: v.astype(np.float32) for k, v in get_adapter("deepjet").from_simplex(p).items()}
    cols["hadronFlavour"] = rng.choice(np.array([0, 4, 5], dtype=np.uint8), n)
    cols["pt"] = rng.uniform(20.0, 500.0, n).astype(np.float32)
    cols["eta"] = rng.uniform(-2.4, 2.4, n).astype(np.float32)
    return cols


def best_time(func, repeat: int) -> float:
    """Best CPU time of ``repeat`` calls (process time: robust to other jobs on shared cores)."""
    times = []
    for _ in range(repeat):
        start = time.process_time()
        func()
        times.append(time.process_time() - start)
    return min(times)


def bench_applier(n_jets: int, repeat: int) -> None:
    from coffea_otcal.applier import Calibrator, transform_context
    from coffea_otcal.geometry import ilr

    print(
        f"\n## 1. Applier throughput, 1 thread, {n_jets:,} jets, per CPU-second of the "
        f"process (best of {repeat})"
    )
    print(
        "| map (d=2) | dtype | kernel only [Mjets/s] | full path, nominal [Mjets/s] | "
        "+ per extra variation (up+down) [s/Mjets] |"
    )
    print("| --- | --- | --- | --- | --- |")
    cols = random_columns(n_jets)
    for label, hidden, trunk, n_ctx in MAPS:
        bundle = make_bundle(hidden, n_ctx, ["v1", "v2"], trunk)
        for dtype in ("float64", "float32"):
            cal = Calibrator(bundle, dtype=dtype)
            fmap = cal.fitted_map(5)
            z = ilr(cal.adapter.to_simplex(cols)[0])
            ctx = transform_context(bundle.context, cols)[0] if n_ctx else None
            with threadpool_limits(1):
                t_kernel = best_time(partial(fmap.transport, z, ctx), repeat)
                t_nom = best_time(partial(cal.calibrate_columns, cols, variations=[]), repeat)
                t_two = best_time(
                    partial(cal.calibrate_columns, cols, variations=["v1", "v2"]), repeat
                )
            per_var = (t_two - t_nom) / 2 / (n_jets / 1e6)
            print(
                f"| {label} | {dtype} | {n_jets / t_kernel / 1e6:.2f} | "
                f"{n_jets / t_nom / 1e6:.2f} | {per_var:.3f} |"
            )
            sys.stdout.flush()


_BLAS_PROBE = """
import contextlib, json, sys, time
sys.path.insert(0, {bench!r})
import numpy as np
import coffea_otcal.applier as applier
from bench_apply import make_bundle, random_columns
cal = applier.Calibrator(make_bundle((16, 16), 2, ["v1", "v2"], (8, 8)))
cols = random_columns(9000)
out = {{}}
for label in ("library limit (one_blas_thread)", "OpenBLAS default threads"):
    if label.startswith("OpenBLAS"):
        applier.one_blas_thread = contextlib.nullcontext
    cal.calibrate_columns(cols)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range({reps}):
        cal.calibrate_columns(cols)
    out[label] = ((time.perf_counter() - start) / {reps}, (time.process_time() - cpu) / {reps})
print(json.dumps(out))
"""


def bench_blas_threads(reps: int) -> None:
    """Chunk of 9000 MC jets, 5 maps, in a process WITHOUT the *_NUM_THREADS variables."""
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    code = _BLAS_PROBE.format(bench=str(Path(__file__).parent), reps=reps)
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    times = json.loads(res.stdout.strip().splitlines()[-1])
    print(
        f"\n## 1b. BLAS threads: one chunk of 9,000 MC jets, 5 maps (PICNN (16, 16) trunk "
        f"(8, 8)), float64, in a process without OMP/OPENBLAS_NUM_THREADS, mean of {reps}"
    )
    print("| BLAS threads during the block products | wall [ms] per chunk | CPU [ms] per chunk |")
    print("| --- | --- | --- |")
    for label, (wall, cpu) in times.items():
        print(f"| {label} | {wall * 1e3:.1f} | {cpu * 1e3:.1f} |")
    sys.stdout.flush()


def skim_dir(files: list[Path], bundle_path: Path, out: Path, **kw) -> tuple[float, float, dict]:
    """Wall and CPU (process) time of one skim, and its manifest."""
    from coffea_otcal.skim import run_skim

    start, cpu = time.perf_counter(), time.process_time()
    manifest = run_skim(bundle_path, files, out, progress=False, overwrite=True, **kw)
    return time.perf_counter() - start, time.process_time() - cpu, manifest


def shared_maps(bundle_path: Path) -> tuple[int, int]:
    """(maps per flavour, variation maps that are copies of their flavour's nominal)."""
    from coffea_otcal.applier import Calibrator

    cal = Calibrator(bundle_path)
    codes, names = cal.bundle.flavour_codes, cal.bundle.map_names
    copies = sum(cal.map_digest(c, n) == cal.map_digest(c, "nominal")
                 for c in codes for n in names if n != "nominal")
    return len(names), copies


def _no_reuse(self, flavour: int, variation: str = "nominal") -> str:
    """A distinct digest per map: every map is evaluated (the applier before session 14)."""
    return f"{flavour}/{variation}"


class _IdentityMap:
    """Stands in for a fitted map and moves nothing: the skim's cost without the network."""

    def transport_unlimited(self, z, context=None, out=None):
        out[...] = z
        return out


def _identity_map(self, flavour: int, variation: str = "nominal") -> _IdentityMap:
    return _IdentityMap()


def bench_reuse(bundle_path: Path, n_jets: int, repeat: int) -> None:
    """calibrate_columns of a pipeline bundle: copies of the nominal reused vs every map evaluated."""
    from coffea_otcal.applier import Calibrator

    cols = random_columns(n_jets, seed=1)
    reuse = Calibrator.map_digest
    cal = Calibrator(bundle_path, dtype="float32")
    n_maps, copies = shared_maps(bundle_path)
    outputs, best = {}, {}
    for label, digest in (("every map evaluated", _no_reuse), ("copies reused", reuse)):
        Calibrator.map_digest = digest  # type: ignore[method-assign]
        outputs[label] = cal.calibrate_columns(cols)
        best[label] = best_time(partial(cal.calibrate_columns, cols), repeat)
    Calibrator.map_digest = reuse  # type: ignore[method-assign]

    def leaves(tree: dict) -> list[np.ndarray]:
        return [x for v in tree.values() for x in (leaves(v) if isinstance(v, dict) else [v])]

    same = all(np.array_equal(a, b, equal_nan=True)
               for a, b in zip(*(leaves(o) for o in outputs.values()), strict=True))
    print(f"\n## 2b. calibrate_columns with {bundle_path.name} ({n_maps} maps per flavour, {copies} "
          f"variation maps are copies of their nominal), {n_jets:,} MC jets, float32, one thread, "
          f"best of {repeat}; identical outputs: {same}")
    for label, t in best.items():
        print(f"| {label} | {t:.3f} s | {t / n_jets * 1e6:.2f} us per jet |")


def bench_skims(scale: float, repeat: int, chunksize: int, skip_dask: bool, tmp: Path,
                pipeline_bundle: Path | None = None) -> None:
    # the generator writes no cross-reference indices (Jet_muonIdx1, ...): NanoAODSchema
    # warns once per chunk, which would bury the tables
    warnings.filterwarnings("ignore", message="Missing cross-reference index")
    from coffea_otcal.applier import Calibrator
    from coffea_otcal.generator import GeneratorConfig, generate

    reuse = Calibrator.map_digest
    fitted = Calibrator.fitted_map

    sample = generate(GeneratorConfig(seed=2, scale=scale), tmp / "gen", progress=False)
    files = sorted(Path(f.path) for f in sample.files)
    n_jets = sum(f.n_jets for f in sample.files)
    bundle = make_bundle((16, 16), 2, ["comp", "shape"], (8, 8))
    bundle_path = bundle.save(tmp / "bundle.json.gz")
    big_path = make_bundle((32, 32), 2, ["comp", "shape"], (32, 32)).save(tmp / "big.json.gz")
    print(
        f"\n## 2. Skim of the generated NanoAOD: {len(files)} files, {n_jets:,} jets, "
        f"chunksize {chunksize}, eager iterative executor, {len(bundle.map_names)} maps per "
        f"flavour (nominal + {len(bundle.variations)} variations) with 2 context variables, "
        f"parquet output, median of {repeat} interleaved runs"
    )
    runs = {
        "without calibration": {"calibrate": False},
        "calibrated, float64 maps": {"precision": "float64"},
        "calibrated, float32 maps": {"precision": "float32"},
        "calibrated, float64 maps, + probabilities": {"precision": "float64", "probabilities": True},
        "calibrated, float32 maps, + probabilities": {"precision": "float32", "probabilities": True},
        # the floor of any calibrated skim: adapter, ILR, inverse ILR and every calibrated
        # column written, with maps that move nothing (no network evaluated)
        "identity maps, float32 (floor: every calibrated column written, no network)": {
            "precision": "float32", "identity_maps": True},
        "calibrated, float64 maps, PICNN (32, 32) trunk (32, 32)": {
            "precision": "float64",
            "bundle_path": big_path,
        },
        "calibrated, float32 maps, PICNN (32, 32) trunk (32, 32)": {
            "precision": "float32",
            "bundle_path": big_path,
        },
    }
    if pipeline_bundle is not None:  # a bundle of the pipeline, e.g. the demo's
        n_maps, copies = shared_maps(pipeline_bundle)
        label = (f"calibrated, float32 maps, {pipeline_bundle.name} ({n_maps} maps per flavour, "
                 f"{copies} variation maps are copies of their nominal)")
        runs[label] = {"precision": "float32", "bundle_path": pipeline_bundle}
        runs[f"{label}, every map evaluated (before session 14)"] = {
            "precision": "float32", "bundle_path": pipeline_bundle, "no_reuse": True}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    manifest: dict = {}
    for _ in range(repeat):  # interleaved so every variant sees the same machine load
        for label, kw in runs.items():
            options = dict(kw)
            path = options.pop("bundle_path", bundle_path)
            # class-level, so it reaches the calibrator the skim rebuilds from its JSON
            Calibrator.map_digest = _no_reuse if options.pop("no_reuse", False) else reuse  # type: ignore[method-assign]
            Calibrator.fitted_map = _identity_map if options.pop("identity_maps", False) else fitted  # type: ignore[method-assign,assignment]
            wall, cpu, man = skim_dir(
                files,
                path,
                tmp / "".join(ch if ch.isalnum() else "_" for ch in label),
                chunksize=chunksize,
                **options,
            )
            times[label].append((wall, cpu))
            if label == "calibrated, float64 maps":
                manifest = man
    Calibrator.map_digest = reuse  # type: ignore[method-assign]
    Calibrator.fitted_map = fitted  # type: ignore[method-assign]
    ref_wall = statistics.median(w for w, _ in times["without calibration"])
    ref_cpu = statistics.median(c for _, c in times["without calibration"])
    print("(maps: PICNN (16, 16) trunk (8, 8), the default with context, unless named)")
    print("| skim | wall [s] | CPU [s] | jets/s (wall) | ratio wall | ratio CPU |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, vals in times.items():
        wall = statistics.median(w for w, _ in vals)
        cpu = statistics.median(c for _, c in vals)
        print(
            f"| {label} | {wall:.2f} | {cpu:.2f} | {n_jets / wall:,.0f} | "
            f"{wall / ref_wall:.2f} | {cpu / ref_cpu:.2f} |"
        )
    print(f"status counts: {manifest['status']}, clamped {manifest['clamped']}")
    cal = statistics.median(w for w, _ in times["calibrated, float64 maps"])
    sys.stdout.flush()
    if skip_dask:
        return
    print("\n## 3. Dask: 2-worker LocalCluster vs eager (same files, same chunks, float64)")
    t_dask, _, man_dask = skim_dir(
        files, bundle_path, tmp / "dask", chunksize=chunksize, executor="dask", workers=2,
        precision="float64",
    )
    eager_dir = tmp / "calibrated__float64_maps"
    diffs = [compare_parts(eager_dir / p, tmp / "dask" / p) for p in manifest["parts"]]
    same = man_dask["parts"] == manifest["parts"] and all(d == 0.0 for d in diffs)
    print(f"max |eager - dask| per part over all leaf columns: {diffs}")
    print("| run | wall [s] (incl. cluster start) | parts | identical output |")
    print("| --- | --- | --- | --- |")
    print(f"| eager | {cal:.2f} | {len(manifest['parts'])} | - |")
    print(f"| dask LocalCluster(2) | {t_dask:.2f} | {len(man_dask['parts'])} | {same} |")
    sys.stdout.flush()


def compare_parts(a_path: Path, b_path: Path) -> float:
    """Largest absolute difference over every leaf column of two parquet parts (NaN == NaN)."""
    import awkward as ak

    a, b = ak.from_parquet(a_path), ak.from_parquet(b_path)
    if a.type != b.type or len(a) != len(b):
        return float("inf")
    worst = 0.0

    def leaves(x, prefix=""):
        if x.fields:
            for f in x.fields:
                yield from leaves(x[f], f"{prefix}.{f}")
        else:
            yield prefix, ak.to_numpy(ak.flatten(x, axis=None)).astype(np.float64)

    for (_, xa), (_, xb) in zip(leaves(a), leaves(b), strict=True):
        if not np.array_equal(xa, xb, equal_nan=True):
            worst = max(worst, float(np.nanmax(np.abs(xa - xb))) if xa.size else float("inf"))
    return worst


def _open_files(path: str, n: int) -> float:
    from coffea.nanoevents import NanoAODSchema, NanoEventsFactory

    start = time.perf_counter()
    for _ in range(n):
        events = NanoEventsFactory.from_root(
            {path: "Events"}, schemaclass=NanoAODSchema, mode="virtual"
        ).events()
        _ = ak_sum(events.Jet.pt)
    return (time.perf_counter() - start) / n


def ak_sum(x):
    import awkward as ak

    return float(ak.sum(x))


def bench_malloc(n_open: int) -> None:
    import dask
    from distributed import Client, LocalCluster

    print(
        f"\n## 4. MALLOC_TRIM_THRESHOLD_ of dask workers: NanoEvents open of {REAL.name} "
        f"(+ one column), mean of {n_open} opens on each of 2 workers"
    )
    print("| MALLOC_TRIM_THRESHOLD_ | s per open (worker 1, worker 2) |")
    print("| --- | --- |")
    base = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    settings = {
        "65536 (distributed default)": 65536,
        "134217728 (128 MiB)": 2**27,
        "unset (glibc dynamic)": "unset",
    }
    for label, value in settings.items():
        environ = {**base, "MALLOC_TRIM_THRESHOLD_": None if value == "unset" else value}
        saved = os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)  # nannies poison os.environ
        if value != "unset":
            os.environ["MALLOC_TRIM_THRESHOLD_"] = str(value)
        with (
            dask.config.set({"distributed.nanny.pre-spawn-environ": environ}),
            LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=40,
            ) as cluster,
            Client(cluster) as client,
        ):
            client.run(_open_files, str(REAL), 1)  # warm imports
            times = client.run(_open_files, str(REAL), n_open)
            env = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
        if saved is not None:
            os.environ["MALLOC_TRIM_THRESHOLD_"] = saved
        vals = ", ".join(f"{t:.3f}" for t in times.values())
        print(f"| {label} [worker env: {sorted(set(env.values()), key=str)}] | {vals} |")
        sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jets", type=int, default=1_000_000)
    parser.add_argument("--scale", type=float, default=0.2)
    parser.add_argument("--chunksize", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--opens", type=int, default=5)
    parser.add_argument("--skip-dask", action="store_true")
    parser.add_argument("--only", choices=["applier", "skim", "malloc"], default=None)
    parser.add_argument("--bundle", type=Path, default=None,
                        help="also skim with this bundle (e.g. the demo's export/bundle.json.gz)")
    args = parser.parse_args()
    print(
        f"# bench_apply  ({time.strftime('%Y-%m-%d %H:%M:%S')}, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    if args.only in (None, "applier"):
        bench_applier(args.jets, args.repeat)
        bench_blas_threads(20)
    if args.only in (None, "skim"):
        with tempfile.TemporaryDirectory(prefix="bench_apply_") as tmp:
            bench_skims(args.scale, args.repeat, args.chunksize, args.skip_dask, Path(tmp),
                        args.bundle)
        if args.bundle is not None:
            bench_reuse(args.bundle, 720_000, args.repeat)
    if args.only in (None, "malloc") and not args.skip_dask:
        bench_malloc(args.opens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
