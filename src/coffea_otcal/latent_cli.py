"""The ``coffea-otcal latent`` command: latent-space maps from a generated sample, bundle and report.

Reads one region's MC and pseudo-data ROOT files of a sample written by ``coffea-otcal
generate --latent`` (Jet fields ``latent_<i>``, ``hadronFlavour`` and the tagger columns),
splits the jets into a training and a held-out half, fits one latent map per flavour
(:func:`coffea_otcal.latent_calib.fit_latent_maps`), writes the bundle, the closure tables
(``report.md``, ``report.json``) and the plots of :mod:`coffea_otcal.latent_plots`.

Target modes: ``responsibility`` (default; data jets weighted by the tagger posterior with
the region's flavour fractions given by ``--fractions`` or, for a generated sample, its
configured MC fractions) or ``truth`` (pseudo-data truth from ``truth_jets.parquet``).
"""

from __future__ import annotations

__all__ = ["add_arguments", "read_region", "run"]

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def read_region(sample_dir: Path, region: str, is_data: bool) -> dict[str, np.ndarray]:
    """Flat jet arrays of one generated file: ``latent`` (n, d), ``flavour``, ``probs``, ``columns``.

    Arguments:
        sample_dir: the ``coffea-otcal generate`` output folder.
        region: the region name.
        is_data: the pseudo-data or the MC file.

    Returns:
        ``latent`` (float32), ``flavour`` (truth codes; for data from ``truth_jets.parquet``),
        ``probs`` (tagger probabilities via the sample's adapter) and ``columns`` (names).
    """
    import awkward as ak
    import pyarrow.parquet as pq
    import uproot

    from coffea_otcal.adapters import get_adapter
    from coffea_otcal.generator import GeneratedSample

    sample = GeneratedSample.load(sample_dir)
    cfg = sample.config
    if not cfg.latent.enabled:
        msg = f"sample {sample_dir} has no latents; generate it with --latent"
        raise ValueError(msg)
    info = sample.file(region, is_data)
    prefix = cfg.latent.branch_prefix
    names = [f"{prefix}_{i}" for i in range(cfg.latent.latent_dim)]
    adapter = get_adapter(cfg.tagger)
    branches = [f"Jet_{n}" for n in (*names, *adapter.columns)]
    if not is_data:
        branches.append("Jet_hadronFlavour")
    with uproot.open(info.path) as fh:
        arrays = fh["Events"].arrays(branches, library="ak")
    flat = {b[4:]: ak.to_numpy(ak.flatten(arrays[b])) for b in branches}
    latent = np.stack([flat[n] for n in names], axis=1)
    probs, _ = adapter.to_simplex({c: flat[c] for c in adapter.columns})
    if is_data:
        truth = pq.read_table(sample.jet_truth_path, columns=["file", "flavour"]).to_pandas()
        flavour = truth.loc[truth["file"] == Path(info.path).name, "flavour"].to_numpy()
    else:
        flavour = flat["hadronFlavour"]
    if len(flavour) != len(latent):
        msg = f"{info.path}: {len(latent)} jets but {len(flavour)} truth rows in the sidecar"
        raise ValueError(msg)
    return {
        "latent": latent,
        "flavour": flavour.astype(np.int64),
        "probs": probs,
        "columns": np.array(names),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``coffea-otcal latent``."""
    parser.add_argument(
        "sample", type=Path, help="folder written by `coffea-otcal generate --latent`"
    )
    parser.add_argument("outdir", type=Path, help="output folder (bundle, report, plots)")
    parser.add_argument("--region", default="vr", help="region to calibrate (default vr)")
    parser.add_argument("--mode", choices=("responsibility", "truth"), default="responsibility")
    parser.add_argument("--fractions", type=float, nargs=3, help="region fractions b c light")
    parser.add_argument("--components", type=int, default=32, help="principal directions k")
    parser.add_argument("--steps", type=int, default=1500, help="OT optimiser steps per map")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64], help="ICNN widths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-iter", type=int, default=200, help="discriminator iterations")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run ``coffea-otcal latent``; prints the AUC table and the written paths."""
    from coffea_otcal import latent_tagger as lt
    from coffea_otcal.generator import GeneratedSample, latent_head
    from coffea_otcal.latent_calib import (
        LatentCalibConfig,
        fit_latent_maps,
        latent_closure,
        tagger_responsibilities,
    )
    from coffea_otcal.ot import OTConfig

    sample = GeneratedSample.load(args.sample)
    mc = read_region(args.sample, args.region, is_data=False)
    data = read_region(args.sample, args.region, is_data=True)
    rng = np.random.default_rng(args.seed)
    mc_train = rng.random(len(mc["latent"])) < 0.5
    data_train = rng.random(len(data["latent"])) < 0.5
    ot = OTConfig(hidden=tuple(args.hidden), steps=args.steps)
    cfg = LatentCalibConfig(n_components=args.components, target_mode=args.mode, ot=ot)
    kwargs: dict[str, Any] = {}
    if args.mode == "truth":
        kwargs["data_flavour"] = data["flavour"][data_train]
    else:
        fractions = (
            np.asarray(args.fractions)
            if args.fractions
            else sample.config.region(args.region).mc_fractions.as_array()
        )
        resp = tagger_responsibilities(data["probs"], fractions, np.exp(lt.TRAINING_LOG_PRIOR))
        kwargs["data_flavour_weights"] = resp[data_train]
    maps = fit_latent_maps(
        mc["latent"][mc_train],
        mc["flavour"][mc_train],
        data["latent"][data_train],
        columns=[str(c) for c in mc["columns"]],
        config=cfg,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
        **kwargs,
    )
    args.outdir.mkdir(parents=True, exist_ok=True)
    bundle = maps.to_bundle(
        adapter=sample.config.tagger,
        provenance={"seed": args.seed, "command": " ".join(["coffea-otcal", *sys.argv[1:]])},
    )
    bundle_path = bundle.save(args.outdir / "latent_bundle.json.gz")
    ev, de = mc["latent"][~mc_train], data["latent"][~data_train]
    calibrated = maps.transport(ev, mc["flavour"][~mc_train])
    res = latent_closure(
        ev,
        de,
        calibrated,
        latent_head(sample.config),
        source_flavour=mc["flavour"][~mc_train],
        target_flavour=data["flavour"][~data_train],
        seed=args.seed,
        max_iter=args.max_iter,
    )
    report = (
        f"# Latent calibration of region {args.region} ({args.mode} targets)\n\n"
        f"{res.table()}\n\nPer truth flavour (pseudo-data truth):\n\n{res.flavour_table()}\n\n"
        f"{res.chi2_table()}\n"
    )
    (args.outdir / "report.md").write_text(report)
    summary = {**res.to_dict(), "maps": maps.metrics, "bundle": str(bundle_path)}
    (args.outdir / "report.json").write_text(json.dumps(summary, indent=1) + "\n")
    if not args.no_plots:
        from coffea_otcal.latent_plots import (
            plot_latent_corner,
            plot_latent_rocs,
            plot_output_discriminants,
        )

        plot_latent_corner(args.outdir / "corner_before.png", {"target": de, "source": ev})
        plot_latent_corner(
            args.outdir / "corner_after.png", {"target": de, "calibrated": calibrated}
        )
        plot_latent_rocs(args.outdir / "roc.png", res)
        plot_output_discriminants(args.outdir, res)
    sys.stdout.write(f"{res.table()}\nbundle: {bundle_path}\nreport: {args.outdir / 'report.md'}\n")
    return 0
