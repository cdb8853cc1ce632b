"""Latent-space calibration (Mind the Gap) on the toy tagger's 128-dim latent: AUCs, chi2, time.

Run:  python benchmarks/bench_latent.py [--jets 60000] [--eval-jets 30000] [--outdir DIR]

MC and pseudo-data jets of the 1:1:1 validation region (``GeneratorConfig`` defaults, latent
mode) are simulated in memory; one map per truth flavour is fitted in each target mode
(``truth``: pseudo-data labels; ``responsibility``: every data jet weighted by the tagger
posterior P(f | output) with the region fractions), applied to independent held-out MC jets
and compared with held-out pseudo-data by discriminators at z, z' and the outputs, and by the
shape chi2 of the output discriminants. The truth-mode bundle is exported, reloaded and
applied with ``LatentCalibrator`` (numpy) to check it reproduces the fitted maps.
Prints markdown tables; writes PNGs (corner plots, ROCs, discriminants), the bundle and
``latent.json`` to ``--outdir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from coffea_otcal import latent_tagger as lt
from coffea_otcal.generator import GeneratorConfig, latent_head, simulate_jets
from coffea_otcal.latent_apply import LatentCalibrator
from coffea_otcal.latent_calib import (
    LatentCalibConfig,
    fit_latent_maps,
    latent_closure,
    tagger_responsibilities,
)
from coffea_otcal.latent_plots import (
    plot_latent_corner,
    plot_latent_rocs,
    plot_output_discriminants,
)
from coffea_otcal.ot import OTConfig, resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jets", type=int, default=60_000, help="training jets, MC and data each")
    parser.add_argument("--eval-jets", type=int, default=30_000, help="held-out jets, each side")
    parser.add_argument("--dim", type=int, default=128, help="latent dimension")
    parser.add_argument("--components", type=int, default=32, help="principal directions k")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--max-iter", type=int, default=200, help="discriminator iterations")
    parser.add_argument("--modes", nargs="+", default=["truth", "responsibility"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outdir", type=Path, default=Path("benchmarks/results/latent"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    args.outdir.mkdir(parents=True, exist_ok=True)

    gen = GeneratorConfig(latent={"enabled": True, "latent_dim": args.dim})
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    mc = simulate_jets(gen, "vr", args.jets, False, rng)
    data = simulate_jets(gen, "vr", args.jets, True, rng)
    mc_eval = simulate_jets(gen, "vr", args.eval_jets, False, rng)
    data_eval = simulate_jets(gen, "vr", args.eval_jets, True, rng)
    head = latent_head(gen)
    fractions = gen.region("vr").fractions(is_data=True).as_array()
    device = str(resolve_device("auto"))
    print(
        f"latent d={args.dim}, k={args.components}, {args.jets} training + {args.eval_jets} "
        f"held-out jets per side (VR fractions {np.round(fractions, 3).tolist()}), "
        f"simulated in {time.perf_counter() - t0:.1f} s; device {device}, 1 thread\n"
    )

    ot = OTConfig(hidden=tuple(args.hidden), steps=args.steps, eval_every=250, lr=args.lr)
    results: dict[str, dict] = {}
    closures = {}
    for mode in args.modes:
        cfg = LatentCalibConfig(n_components=args.components, target_mode=mode, ot=ot)
        kwargs: dict = {}
        if mode == "truth":
            kwargs["data_flavour"] = data["flavour"]
        else:
            prior = np.exp(lt.TRAINING_LOG_PRIOR)
            kwargs["data_flavour_weights"] = tagger_responsibilities(
                data["probs"], fractions, prior
            )
        start = time.perf_counter()
        maps = fit_latent_maps(
            mc["latent"],
            mc["flavour"],
            data["latent"],
            config=cfg,
            device=device,
            seed=args.seed,
            progress=False,
            **kwargs,
        )
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        cal = maps.transport(mc_eval["latent"], mc_eval["flavour"])
        apply_s = time.perf_counter() - start
        start = time.perf_counter()
        res = latent_closure(
            mc_eval["latent"],
            data_eval["latent"],
            cal,
            head,
            source_flavour=mc_eval["flavour"],
            target_flavour=data_eval["flavour"],
            max_iter=args.max_iter,
            seed=args.seed,
        )
        eval_s = time.perf_counter() - start
        closures[mode] = res
        results[mode] = {
            **res.to_dict(),
            "fit_s": fit_s,
            "apply_s": apply_s,
            "eval_s": eval_s,
            "maps": maps.metrics,
        }
        tag = f"latent_{mode}"
        plot_latent_corner(
            args.outdir / f"{tag}_corner_before.png",
            {"target": data_eval["latent"], "source": mc_eval["latent"]},
            title="PCA of z: target vs source",
        )
        plot_latent_corner(
            args.outdir / f"{tag}_corner_after.png",
            {"target": data_eval["latent"], "calibrated": cal},
            title=f"PCA of z: target vs calibrated ({mode})",
        )
        plot_latent_rocs(args.outdir / f"{tag}_roc.png", res, title=f"target mode: {mode}")
        plot_output_discriminants(args.outdir, res, prefix=tag)
        if mode == "truth":
            path = maps.to_bundle(provenance={"seed": args.seed}).save(
                args.outdir / "latent_bundle.json.gz"
            )
            applier = LatentCalibrator(path)
            start = time.perf_counter()
            z_app, _ = applier.calibrate_latent(mc_eval["latent"], mc_eval["flavour"])
            results[mode]["applier_s"] = time.perf_counter() - start
            results[mode]["applier_max_abs_diff"] = float(np.max(np.abs(z_app - cal)))
            results[mode]["bundle_bytes"] = path.stat().st_size

    print("| target mode | layer | AUC source vs target | AUC calibrated vs target |")
    print("| --- | --- | --- | --- |")
    for mode, res in closures.items():
        for layer, row in res.aucs.items():
            print(
                f"| {mode} | {layer} | {row['source_vs_target']:.4f} | "
                f"{row['calibrated_vs_target']:.4f} |"
            )
    print("\nPer truth flavour (held-out pseudo-data truth), output layer:")
    print("| target mode | flavour | AUC source vs target | AUC calibrated vs target |")
    print("| --- | --- | --- | --- |")
    for mode, res in closures.items():
        for label, row in res.aucs_by_flavour.items():
            print(
                f"| {mode} | {label} | {row['source_vs_target']:.4f} | "
                f"{row['calibrated_vs_target']:.4f} |"
            )
    print("\n| target mode | discriminant | chi2/ndf source | chi2/ndf calibrated |")
    print("| --- | --- | --- | --- |")
    for mode, res in closures.items():
        for key, row in res.chi2.items():
            print(f"| {mode} | {key} | {row['source']:.2f} | {row['calibrated']:.2f} |")
    print("\n| target mode | fit wall s | maps (best step, n_target_eff) | apply s | eval s |")
    print("| --- | --- | --- | --- | --- |")
    for mode, r in results.items():
        per = ", ".join(
            f"{k}: {m['best_step']}/{m['target_effective']:.0f}" for k, m in r["maps"].items()
        )
        print(f"| {mode} | {r['fit_s']:.1f} | {per} | {r['apply_s']:.2f} | {r['eval_s']:.1f} |")
    if "truth" in results:
        r = results["truth"]
        print(
            f"\nexported bundle: {r['bundle_bytes'] / 1e3:.0f} kB; LatentCalibrator on "
            f"{args.eval_jets} jets {r['applier_s']:.2f} s, max |diff| to the fitted maps "
            f"{r['applier_max_abs_diff']:.2e}"
        )
    (args.outdir / "latent.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(f"\nplots and latent.json in {args.outdir}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
