"""The ``coffea-otcal em`` command: EM target extraction from a control-region store."""

from __future__ import annotations

__all__ = ["add_arguments", "from_store", "run"]

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from coffea_otcal.em_result import RegionData

logger = logging.getLogger(__name__)


def from_store(
    store: Any,
    context: Sequence[str] = (),
    log_columns: Sequence[str] = ("pt",),
) -> tuple[dict[str, RegionData], dict[str, RegionData]]:
    """Data and MC :class:`~coffea_otcal.em.RegionData` per region from a control-region store.

    Jets the tagger did not evaluate are left out (the store flags them). The context is
    built from the store's kinematic columns ``context``; those named in ``log_columns``
    enter as their logarithm (``log pt``), which makes them closer to Gaussian for the
    flows' context standardisation.

    Arguments:
        store: a :class:`coffea_otcal.store.ControlRegionStore`.
        context: kinematic columns to condition on (empty: unconditional flows).
        log_columns: which of them enter as logarithms.

    Returns:
        ``(data_regions, mc_regions)``; regions without data (or MC) jets are omitted.
    """
    from coffea_otcal.em_result import RegionData

    missing = [c for c in context if c not in store.kinematics]
    if missing:
        msg = f"context columns {missing} are not in the store {store.path}; it has {list(store.kinematics)}"
        raise ValueError(msg)
    data: dict[str, RegionData] = {}
    mc: dict[str, RegionData] = {}
    for region in store.regions:
        for is_data, target in ((True, data), (False, mc)):
            sel = {"region": region, "is_data": is_data}
            n = int(store.mask(**sel).sum())
            if n == 0:
                continue
            ctx = None
            if context:
                ctx = store.kin(list(context), **sel).astype(np.float64)
                for j, name in enumerate(context):
                    if name in log_columns:
                        if (ctx[:, j] <= 0).any():
                            msg = f"region {region!r}: column {name!r} has values <= 0; cannot take its log"
                            raise ValueError(msg)
                        ctx[:, j] = np.log(ctx[:, j])
            target[region] = RegionData(
                x=store.ilr(**sel),
                context=ctx,
                weight=store.weight(**sel).astype(np.float64),
                flavour=None if is_data else store.flavour(**sel),
            )
    return data, mc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``coffea-otcal em``."""
    parser.add_argument("store", type=Path, help="control-region store (parquet)")
    parser.add_argument("-o", "--outdir", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="EMConfig as JSON (keys of coffea_otcal.em.EMConfig)",
    )
    parser.add_argument(
        "--context",
        nargs="*",
        default=[],
        help="store kinematic columns to condition the flows on, e.g. --context pt eta",
    )
    parser.add_argument("--regions", nargs="*", default=None, help="regions to fit (default all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", default="auto", help="torch device (auto, cpu, cuda)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument(
        "--max-iterations", type=int, default=None, help="override max EM iterations"
    )
    parser.add_argument(
        "--prior-width", type=float, default=None, help="override the logit prior width"
    )
    parser.add_argument(
        "--targets",
        choices=("flow", "responsibility"),
        default="flow",
        help="how OT targets are built (see docs/em.md)",
    )
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="checkpoint/resume here")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG report")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    """Fit, diagnose, build targets; write ``targets.npz``, ``em_result.npz``, JSON, plots."""
    import torch

    from coffea_otcal.em import EMConfig, fit_em
    from coffea_otcal.em_diagnostics import compute_diagnostics, fit_quality
    from coffea_otcal.store import load_store
    from coffea_otcal.variations import build_targets, make_variations

    if args.threads:
        torch.set_num_threads(args.threads)
    store = load_store(args.store)
    raw: dict[str, Any] = {}
    if args.config is not None:
        raw = json.loads(args.config.read_text())
    raw.setdefault("classes", list(store.classes))
    raw.setdefault("flavour_codes", [store.metadata.flavour_codes[c] for c in store.classes])
    if args.max_iterations is not None:
        raw["max_iterations"] = args.max_iterations
    if args.prior_width is not None:
        raw["prior_width"] = args.prior_width
    config = EMConfig.model_validate(raw)
    data, mc = from_store(store, context=args.context)
    if args.regions:
        unknown = [r for r in args.regions if r not in data]
        if unknown:
            msg = f"regions {unknown} have no data jets in {args.store}; available: {sorted(data)}"
            raise ValueError(msg)
        data = {r: data[r] for r in args.regions}
        mc = {r: mc[r] for r in args.regions if r in mc}
    result = fit_em(
        data,
        mc,
        config,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
        checkpoint_dir=args.checkpoint_dir,
    )
    diagnostics = compute_diagnostics(result)
    quality = fit_quality(result)
    logger.info("EM goodness of fit on the data (docs/em.md, 'Goodness of fit without "
                "truth'):\n%s", quality.table())
    variations = make_variations(diagnostics)
    targets = build_targets(result, mc, variations, method=args.targets, seed=args.seed)
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    targets.save(outdir / "targets.npz")
    targets.write_tables(outdir / "ot_tables")
    result.save(outdir / "em_result.npz")
    report = {
        "converged": result.converged,
        "n_iterations": result.n_iterations,
        "elapsed_s": result.elapsed_s,
        "trace": result.trace,
        "final_fit": result.final_fit,
        "diagnostics": diagnostics.to_dict(),
        "fit_quality": quality.to_dict(),
        "variations": [v.model_dump() for v in variations],
    }
    (outdir / "em_diagnostics.json").write_text(json.dumps(report, indent=1))
    if not args.no_plots:
        from coffea_otcal.em_plots import plot_em_report

        plot_em_report(result, outdir / "plots", diagnostics=diagnostics, variations=variations)
    logger.info("EM targets written to %s", outdir)
    return 0
