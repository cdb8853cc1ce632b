"""Toy NanoAOD generator: throughput (jets/s) and realism of the tagger response.

Run:  python benchmarks/bench_generator.py [--jets 1000000] [--latent-jets 100000]

Prints four tables:
1. throughput of the in-memory API (simulate_jets) and of ROOT writing (generate), with and
   without latent mode (128-dim latent);
2. DeepJet B / CvL / CvB quantiles per truth flavour: toy MC, toy pseudo-data and the real
   CMS ttbar NanoAOD v15 file (tests/data/nano_tt_v15.root);
3. discrimination (ROC AUC) of MC vs pseudo-data, overall and in pT bins;
4. fidelity of the latent network head to the Bayes tagger.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import awkward as ak
import numpy as np
import uproot
from threadpoolctl import threadpool_limits

from coffea_otcal import latent_tagger as lt
from coffea_otcal.adapters import get_adapter
from coffea_otcal.generator import (
    GeneratorConfig,
    generate,
    latent_head,
    sample_response,
    simulate_jets,
)

REAL = Path(__file__).resolve().parents[1] / "tests" / "data" / "nano_tt_v15.root"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
DEEPJET = ("btagDeepFlavB", "btagDeepFlavCvL", "btagDeepFlavCvB")


def auc(signal, background):
    both = np.concatenate([signal, background])
    order = both.argsort(kind="stable")
    ranks = np.empty(both.size)
    ranks[order] = np.arange(1, both.size + 1)
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, weights=ranks) / counts)[inverse]
    u = ranks[: signal.size].sum() - signal.size * (signal.size + 1) / 2
    return u / (signal.size * background.size)


def timed(func):
    start = time.perf_counter()
    out = func()
    return out, time.perf_counter() - start


def throughput(n_jets: int, n_latent: int) -> None:
    print(f"\n== throughput (1 thread, machine load {os.getloadavg()[0]:.1f}) ==")
    print(f"{'what':48s} {'jets':>10s} {'seconds':>9s} {'jets/s':>12s}")
    default = GeneratorConfig()
    latent = GeneratorConfig(latent={"enabled": True})
    _, t_build = timed(lambda: latent_head(latent))
    print(f"{'build latent network (once, cached)':48s} {'-':>10s} {t_build:9.2f} {'-':>12s}")
    rows = [
        ("simulate_jets MC, default", default, n_jets, False),
        ("simulate_jets pseudo-data, default", default, n_jets, True),
        ("simulate_jets pseudo-data, latent 128", latent, n_latent, True),
    ]
    for label, cfg, n, is_data in rows:
        _, sec = timed(
            lambda cfg=cfg, n=n, d=is_data: simulate_jets(cfg, "vr", n, d, np.random.default_rng(1))
        )
        print(f"{label:48s} {n:10d} {sec:9.2f} {n / sec:12.0f}")
    per_scale = sum(default.jets(r, d) for r in default.regions for d in (False, True))
    with tempfile.TemporaryDirectory() as tmp:
        for label, cfg, n in (
            ("generate -> ROOT + sidecars, default", default, n_jets),
            ("generate -> ROOT + sidecars, latent 128", latent, n_latent),
        ):
            cfg = cfg.model_copy(update={"scale": n / per_scale})
            sample, sec = timed(lambda cfg=cfg: generate(cfg, tmp, progress=False))
            total = sum(f.n_jets for f in sample.files)
            size = sum(Path(f.path).stat().st_size for f in sample.files) / 1e6
            print(f"{label:48s} {total:10d} {sec:9.2f} {total / sec:12.0f}   ({size:.0f} MB ROOT)")


def deepjet_columns(probs):
    return get_adapter("deepjet").from_simplex(probs)


def shapes() -> None:
    print("\n== DeepJet quantiles per flavour (q = " + ", ".join(map(str, QUANTILES)) + ") ==")
    tree = uproot.open(REAL)["Events"]
    flav = ak.to_numpy(ak.flatten(tree["Jet_hadronFlavour"].array())).astype(int)
    real = {c: ak.to_numpy(ak.flatten(tree[f"Jet_{c}"].array())) for c in DEEPJET}
    cfg = GeneratorConfig()
    rng = np.random.default_rng(3)
    for code, name in ((5, "b"), (4, "c"), (0, "light")):
        mc = deepjet_columns(sample_response(cfg, name, 50_000, False, rng)["probs"])
        data = deepjet_columns(sample_response(cfg, name, 50_000, True, rng)["probs"])
        for col in DEEPJET:
            short = col.removeprefix("btagDeepFlav")
            for label, values in (
                (f"real v15 (n={int((flav == code).sum())})", real[col][flav == code]),
                ("toy MC", mc[col]),
                ("toy pseudo-data", data[col]),
            ):
                q = " ".join(f"{v:6.3f}" for v in np.quantile(values, QUANTILES))
                print(f"{name:5s} {short:4s} {label:22s} {q}")
        print()


def discrimination() -> None:
    print("== ROC AUC, toy MC vs toy pseudo-data (50k jets per flavour) ==")
    cfg = GeneratorConfig()
    print(f"{'pT bin':>12s} {'AUC b/l (B)':>22s} {'AUC c/l (CvL)':>22s} {'AUC c/b (CvB)':>22s}")
    for lo, hi in ((20, 1000), (20, 40), (40, 100), (100, 300), (300, 1000)):
        cells = []
        for is_data in (False, True):
            rng = np.random.default_rng(5)
            pt = (
                np.exp(rng.uniform(np.log(lo), np.log(hi), 50_000))
                if (lo, hi) != (20, 1000)
                else None
            )
            res = {
                f: deepjet_columns(sample_response(cfg, f, 50_000, is_data, rng, pt=pt)["probs"])
                for f in ("b", "c", "light")
            }
            cells.append(
                (
                    auc(res["b"]["btagDeepFlavB"], res["light"]["btagDeepFlavB"]),
                    auc(res["c"]["btagDeepFlavCvL"], res["light"]["btagDeepFlavCvL"]),
                    auc(res["c"]["btagDeepFlavCvB"], res["b"]["btagDeepFlavCvB"]),
                )
            )
        label = "spectrum" if (lo, hi) == (20, 1000) else f"{lo}-{hi}"
        cols = " ".join(f"{m:.3f} -> {d:.3f} ({d - m:+.3f})" for m, d in zip(*cells, strict=True))
        print(f"{label:>12s} {cols}")


def fidelity() -> None:
    print("\n== latent head vs Bayes tagger: max_f |p_head - p_Bayes| (20k jets, 1:1:1) ==")
    for dim in (16, 32, 64, 128):
        cfg = GeneratorConfig(latent={"enabled": True, "latent_dim": dim})
        for is_data in (False, True):
            jets = simulate_jets(cfg, "vr", 20_000, is_data, np.random.default_rng(2))
            bayes = np.exp(lt.bayes_log_probs(jets["features"], jets["pt"], jets["eta"]))
            dev = np.abs(jets["probs_raw"] - bayes).max(axis=1)
            kind = "pseudo-data" if is_data else "MC"
            print(
                f"latent_dim {dim:4d} {kind:12s} mean {dev.mean():.2e}  99% {np.quantile(dev, 0.99):.2e}  max {dev.max():.2e}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jets", type=int, default=1_000_000)
    parser.add_argument("--latent-jets", type=int, default=100_000)
    args = parser.parse_args()
    with threadpool_limits(1):  # frugal: one BLAS thread on a shared machine
        throughput(args.jets, args.latent_jets)
        shapes()
        discrimination()
        fidelity()


if __name__ == "__main__":
    main()
