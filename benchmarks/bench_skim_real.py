"""Calibrated skim cost with real NanoAOD jet content (issue #5's 1.3x, beyond the toy files).

The generated NanoAOD stores 8 jet branches, so its skim is nearly free and any calibrated
skim costs >= 1.73x (``bench_apply.py``'s identity-map row). A CMS analysis skim keeps the
whole jet collection. This benchmark builds files with the jet content of the real
``nano_tt_v15.root`` (68 ``Jet_*`` branches, ``run``, ``luminosityBlock``, ``event``,
``genWeight``), replicated to ~1.4M jets. Each replica's float columns are jittered by up to
2^-10 relative and rounded to 10 mantissa bits, so the compressors cannot exploit exact
repeats. 10 bits compress more easily than most real NanoAOD columns, which makes the
reference skim cheaper and the ratio a little pessimistic. Half the files are read as data
(``--data-glob 'data_*'``).
It then times, interleaved, the skim that keeps the default fields (``pt, eta, phi, mass``
+ tagger + flavour) and the skim that keeps every jet branch (``--keep-jet all``). Each is
timed without and with calibration: the bench_apply bundle of 5 maps per flavour
(nominal + 2 variations), PICNN (16, 16) with trunk (8, 8) and 2 context variables, float32.

    python benchmarks/bench_skim_real.py [--replicas 880] [--files 8] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import awkward as ak
import numpy as np
import uproot

sys.path.insert(0, str(Path(__file__).parent))
from bench_apply import make_bundle, skim_dir

REAL = Path(__file__).parents[1] / "tests" / "data" / "nano_tt_v15.root"
EVENT = ("run", "luminosityBlock", "event", "genWeight")


def _round_mantissa(x: np.ndarray, bits: int) -> np.ndarray:
    m, e = np.frexp(x.astype(np.float64))
    return np.ldexp(np.round(m * 2.0**bits) / 2.0**bits, e).astype(np.float32)


def build_files(out: Path, replicas: int, n_files: int, seed: int = 0) -> list[Path]:
    """``n_files`` files (half mc_*, half data_*) of jittered replicas of the real file."""
    tree = uproot.open(REAL)["Events"]
    names = [k for k in tree.keys() if k.startswith("Jet_")]  # noqa: SIM118 (a TTree)
    jets = tree.arrays(names, how=dict)
    events = tree.arrays(list(EVENT), how=dict)
    counts = np.asarray(tree["nJet"].array())
    flat = {k[4:]: np.asarray(ak.flatten(v)) for k, v in jets.items()}
    rng = np.random.default_rng(seed)
    per_file = replicas // n_files
    files = []
    for i in range(n_files):
        cols: dict[str, list[np.ndarray]] = {k: [] for k in flat}
        ev: dict[str, list[np.ndarray]] = {k: [] for k in EVENT}
        for r in range(per_file):
            for k, v in flat.items():
                if v.dtype.kind == "f":
                    j = v * (1 + rng.uniform(-1, 1, v.shape) * 2.0**-10)
                    if k.startswith("btag"):
                        j = np.where(v >= 0, np.clip(j, 0.0, 1.0), v)
                    v = _round_mantissa(j, 10)
                cols[k].append(v)
            for k in EVENT:
                values = np.asarray(events[k])
                ev[k].append(values + (r * len(counts) if k == "event" else 0))
        n = np.tile(counts, per_file)
        record = ak.zip({k: ak.unflatten(np.concatenate(v), n) for k, v in cols.items()})
        branches = {"Jet": record, **{k: ak.Array(np.concatenate(v)) for k, v in ev.items()}}
        path = out / f"{'mc' if i < n_files // 2 else 'data'}_{i}.root"
        with uproot.recreate(path) as f:
            f.mktree("Events", {k: v.type.content for k, v in branches.items()},
                     field_name=lambda o, i: f"{o}_{i}", counter_name=lambda c: f"n{c}")
            f["Events"].extend(branches)
        files.append(path)
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=880)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--chunksize", type=int, default=100_000)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Missing cross-reference")
    print(f"# bench_skim_real  ({time.strftime('%Y-%m-%d %H:%M:%S')}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory(prefix="bench_skim_real_") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        files = build_files(tmp, args.replicas, args.files)
        n_jets = sum(int(np.sum(uproot.open(f)["Events"]["nJet"].array(library="np"))) for f in files)
        size = sum(f.stat().st_size for f in files) / 1e6
        print(f"built {len(files)} files, {n_jets:,} jets, {size:.0f} MB in "
              f"{time.perf_counter() - t0:.0f} s")
        bundle = make_bundle((16, 16), 2, ["comp", "shape"], (8, 8)).save(tmp / "b.json.gz")
        runs = {
            ("default fields", "reference"): {"calibrate": False},
            ("default fields", "calibrated"): {},
            ("all 68 jet branches", "reference"): {"calibrate": False, "jet_fields": "all"},
            ("all 68 jet branches", "calibrated"): {"jet_fields": "all"},
        }
        times: dict[tuple[str, str], list[tuple[float, float]]] = {k: [] for k in runs}
        for _ in range(args.repeat):
            for key, kw in runs.items():
                wall, cpu, man = skim_dir(files, bundle, tmp / "_".join(key).replace(" ", "_"),
                                          chunksize=args.chunksize, data_glob="data_*",
                                          precision="float32", **kw)
                times[key].append((wall, cpu))
        print(f"\nstatus counts of the last calibrated skim: {man['status']}")
        print(f"median of {args.repeat} interleaved runs, {n_jets:,} jets, eager iterative "
              "executor, parquet, 5 maps per flavour, float32")
        print("| skim keeps | reference wall [s] | calibrated wall [s] | ratio wall | ratio CPU |")
        print("| --- | --- | --- | --- | --- |")
        for keep in ("default fields", "all 68 jet branches"):
            ref = [statistics.median(x[i] for x in times[(keep, "reference")]) for i in (0, 1)]
            cal = [statistics.median(x[i] for x in times[(keep, "calibrated")]) for i in (0, 1)]
            print(f"| {keep} | {ref[0]:.2f} | {cal[0]:.2f} | {cal[0] / ref[0]:.2f} | "
                  f"{cal[1] / ref[1]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
