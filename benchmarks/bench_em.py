"""Benchmark of the EM target extraction on the toy generator (known truth).

Cases (run all with ``python benchmarks/bench_em.py``, or name some):

* ``table1``   Kim & Yang Table 1 MC compositions, pseudo-data fractions shifted by a few
               per cent (generator defaults), 50k jets per region, unconditional flows.
* ``impure_c`` the c region only ~55 % pure (b 0.15, c 0.55, light 0.30).
* ``kinematics`` regions with different jet-pT spectra (b region hard, light region
               soft); the generator's tagger response depends on pT, so region-independent
               q_f(x) (eq. 13) fails for unconditional flows; compared with flows
               conditioned on (log pT, eta).

Each case prints fitted vs true fractions with the effective 1-sigma (eq. 61), the pulls,
the diagnostics (kappa, rho(F), singular values of G, stable/prior split), the binned
chi2/ndf of the extracted densities against the true data densities on each ILR
projection, the band coverage, and the wall time. For Table 1 cases it also scores the
flows and the responsibility-weighted data (the two target methods) against an independent
pseudo-data sample of the same configuration ("held-out" columns). ``--jets N`` changes the jets per
region, ``--threads T`` the torch threads (default 1; the flavours' flows still train in
threads, one intra-op thread each), ``--flow JSON`` / ``--em JSON`` override ``FlowConfig`` /
``EMConfig`` fields (e.g. ``--em '{"m_steps": 300}'``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from coffea_otcal.em import EMConfig, RegionData, fit_em
from coffea_otcal.em_diagnostics import (
    binned_chi2,
    compute_diagnostics,
    fraction_pulls,
    proxy_delta_log_q,
)
from coffea_otcal.flows import MantissaDequantizer
from coffea_otcal.generator import (
    FlavourFractions,
    GeneratorConfig,
    RegionConfig,
    sample_response,
    simulate_jets,
)
from coffea_otcal.geometry import ilr
from coffea_otcal.variations import make_variations

CODES = (5, 4, 0)
REGIONS = ("cr_b", "cr_c", "cr_light")


def _frac(b, c, light):
    return FlavourFractions(b=b, c=c, light=light)


def table1_config(impure_c: bool = False) -> GeneratorConfig:
    cfg = GeneratorConfig()
    if not impure_c:
        return cfg
    regions = dict(cfg.regions)
    regions["cr_c"] = RegionConfig(
        mc_fractions=_frac(0.15, 0.55, 0.30), data_fractions=_frac(0.17, 0.52, 0.31)
    )
    return cfg.model_copy(update={"regions": regions})


def _region(jets: dict, with_context: bool, is_mc: bool) -> RegionData:
    ctx = None
    if with_context:
        ctx = np.stack([np.log(jets["pt"].astype(np.float64)), jets["eta"]], axis=1)
    return RegionData(
        x=np.asarray(ilr(jets["probs"])),
        context=ctx,
        flavour=jets["flavour"] if is_mc else None,
    )


def _read(jets: dict, adapter: object | None) -> dict:
    """The stored columns read back through ``adapter`` (as the fill stage does; None: as is)."""
    if adapter is None:
        return jets
    from coffea_otcal.report import requantise

    key = {"pt": jets["pt"], "eta": jets["eta"]}
    return {**jets, "probs": requantise(adapter, jets["probs_raw"], 10, key)}


def simulate(cfg: GeneratorConfig, n: int, seed: int, with_context: bool, adapter=None):
    """Data (unlabelled), MC (labelled) and truth (data with labels) per region."""
    rng = np.random.default_rng(seed)
    data, mc, truth = {}, {}, {}
    for r in REGIONS:
        jd = _read(simulate_jets(cfg, r, n, True, rng), adapter)
        jm = _read(simulate_jets(cfg, r, n, False, rng), adapter)
        data[r] = _region(jd, with_context, False)
        mc[r] = _region(jm, with_context, True)
        truth[r] = RegionData(x=data[r].x, context=data[r].context, flavour=jd["flavour"])
    return data, mc, truth


#: pT scale (GeV) of the Gamma spectrum of every jet in each region (kinematics case)
PT_SCALE = {"cr_b": 90.0, "cr_c": 45.0, "cr_light": 20.0}


def simulate_kinematics(n: int, seed: int, with_context: bool, adapter=None):
    """Regions whose jets (all flavours) follow a region-specific pT spectrum."""
    cfg = GeneratorConfig()
    rng = np.random.default_rng(seed)
    data, mc, truth = {}, {}, {}
    for r in REGIONS:
        per = {}
        for is_data in (True, False):
            fr = cfg.regions[r].fractions(is_data).as_array()
            counts = rng.multinomial(n, fr)
            parts = []
            for f, k in zip(("b", "c", "light"), counts, strict=True):
                pt = 20.0 + rng.gamma(1.3, PT_SCALE[r], k)
                pt = np.minimum(pt, 999.0)
                parts.append(sample_response(cfg, f, int(k), is_data, rng, pt=pt))
            per[is_data] = _read(
                {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}, adapter
            )
        data[r] = _region(per[True], with_context, False)
        mc[r] = _region(per[False], with_context, True)
        truth[r] = RegionData(x=data[r].x, context=data[r].context, flavour=per[True]["flavour"])
    return data, mc, truth


def evaluate(name: str, data, mc, truth, config: EMConfig, seed: int, plots=None,
             heldout=None) -> dict:
    t0 = time.perf_counter()
    res = fit_em(data, mc, config, seed=seed, progress=False)
    t_fit = time.perf_counter() - t0
    diag = compute_diagnostics(res)
    variations = make_variations(diag)
    true_fr = np.array(
        [[np.mean(np.asarray(truth[r].flavour) == c) for c in CODES] for r in res.regions]
    )
    pulls = fraction_pulls(diag, true_fr)
    enriched = [res.regions.index(r) for r in res.enriched]
    print(
        f"\n=== {name}: {len(data[REGIONS[0]].x)} jets/region, "
        f"{'conditional' if res.conditional else 'unconditional'} flows ==="
    )
    print(f"EM wall time {t_fit:.1f} s, iterations {res.n_iterations}, converged {res.converged}")
    nll = np.array([e["nll"] for e in res.trace])
    fr = np.array([e["fractions"] for e in res.trace])
    print("NLL/event trace: " + " ".join(f"{v:.4f}" for v in nll))
    print("|dNLL| last 5: " + " ".join(f"{v:.1e}" for v in np.abs(np.diff(nll))[-5:]))
    print(
        "max|dpi| last 5: "
        + " ".join(f"{v:.1e}" for v in np.abs(np.diff(fr, axis=0)).max(axis=(1, 2))[-5:])
    )
    print(f"kappa(Pi_hat) = {diag.condition_number:.3f}, rho(F) = {diag.spectral_radius:.3f}")
    print("singular values of G: " + ", ".join(f"{s:.2f}" for s in diag.singular_values))
    print(
        "stable channels: "
        + str(diag.stable.astype(int).tolist())
        + "  |u.v| "
        + ", ".join(f"{a:.2f}" for a in diag.alignment)
    )
    for note in diag.warnings:
        print("  note:", note)
    print(
        f"{'region':10s} {'flav':6s} {'prior':>8s} {'fitted':>8s} {'true':>8s} "
        f"{'sig_eff':>8s} {'sig_stat':>8s} {'pull':>7s}"
    )
    for r, region in enumerate(res.regions):
        for f, cls in enumerate(res.classes):
            print(
                f"{region:10s} {cls:6s} {diag.prior_fractions[r, f]:8.4f} "
                f"{diag.fractions[r, f]:8.4f} {true_fr[r, f]:8.4f} "
                f"{diag.fraction_errors_eff[r, f]:8.4f} {diag.fraction_errors_stat[r, f]:8.4f} "
                f"{pulls[r, f]:+7.2f}"
            )
    n1 = int((np.abs(pulls) <= 1).sum())
    n2 = int((np.abs(pulls) <= 2).sum())
    print(f"within 1 sigma_eff: {n1}/{pulls.size}; within 2 sigma_eff: {n2}/{pulls.size}")
    print(
        f"{'flavour':8s} {'proj':5s} {'chi2/ndf':>9s} {'ndf':>4s} {'chi2/ndf w/ band':>17s} "
        f"{'folded chi2/ndf':>16s} {'target vs flow':>15s}"
        + (f" {'held-out: flow':>15s} {'held-out: target':>17s}" if heldout else "")
    )
    folder = MantissaDequantizer("deepjet", 10)
    # the M-step's target: every data jet weighted by its final responsibility (eq. 17);
    # "target vs flow" is how well the flow fits what the EM asks of it, "truth vs flow"
    # (the figure) adds how far that target is from the true flavour's jets
    x_data = np.concatenate([res.data[r].x for r in res.regions])
    gamma_all = np.concatenate([res.responsibilities(r) for r in res.regions])
    chi_rows = []
    for f, cls in enumerate(res.classes):
        xs = np.concatenate([truth[r].x[np.asarray(truth[r].flavour) == CODES[f]] for r in REGIONS])
        ctx = None
        if res.conditional:
            ctx = np.concatenate(
                [truth[r].context[np.asarray(truth[r].flavour) == CODES[f]] for r in REGIONS]
            )
        reps = 4
        y = res.flows.sample(
            f,
            n=reps * len(xs),
            context=None if ctx is None else np.repeat(ctx, reps, 0),
            seed=seed + 5 + f,
        )
        log_q = res.log_prob(y, None if ctx is None else np.repeat(ctx, reps, 0))
        shifts = [
            np.clip(proxy_delta_log_q(log_q, np.asarray(v.delta_fractions), enriched)[:, f], -2, 2)
            for v in variations
        ]
        # folded: both sides rounded to the stored precision (data read with dequantisation
        # are a continuous sample; without it they are already on the grid)
        y_folded, xs_folded = folder.quantise(y), folder.quantise(xs)
        for k in range(y.shape[1]):
            lo, hi = np.quantile(xs[:, k], [0.002, 0.998])
            edges = np.linspace(lo, hi, 41)
            chi2, ndf = binned_chi2(xs[:, k], y[:, k], edges)
            # band-inclusive chi2: add the variation envelope in quadrature per bin
            hx, _ = np.histogram(xs[:, k], edges)
            hy, _ = np.histogram(y[:, k], edges)
            ok = (hx >= 5) & (hy >= 5)
            px, py = hx / hx[ok].sum(), hy / hy[ok].sum()
            band2 = np.zeros(len(hx))
            for s in shifts:
                devs = []
                for sign in (1.0, -1.0):
                    w = np.exp(sign * s)
                    hv, _ = np.histogram(y[:, k], edges, weights=w)
                    devs.append(np.abs(hv / hv[ok].sum() - py))
                band2 += np.maximum(*devs) ** 2
            var = hx / hx[ok].sum() ** 2 + hy / hy[ok].sum() ** 2
            chi2b = float((((px - py) ** 2) / (var + band2))[ok].sum())
            chi2f, ndff = binned_chi2(xs_folded[:, k], y_folded[:, k], edges)
            chi2t, ndft = binned_chi2(x_data[:, k], y[:, k], edges, weight_a=gamma_all[:, f])
            chi_rows.append((cls, k + 1, chi2 / ndf, ndf, chi2b / ndf, chi2f / ndff))
            extra = ""
            if heldout:
                # an independent sample of the same true density: the flow and the
                # responsibility-weighted data (targets.method "responsibility") each against it
                xh = np.concatenate([heldout[r].x[np.asarray(heldout[r].flavour) == CODES[f]]
                                     for r in REGIONS])
                c_hf, n_hf = binned_chi2(xh[:, k], y[:, k], edges)
                c_ht, n_ht = binned_chi2(xh[:, k], x_data[:, k], edges, weight_b=gamma_all[:, f])
                extra = f" {c_hf / n_hf:15.2f} {c_ht / n_ht:17.2f}"
            print(
                f"{cls:8s} z{k + 1:<4d} {chi2 / ndf:9.2f} {ndf:4d} {chi2b / ndf:17.2f} "
                f"{chi2f / ndff:16.2f} {chi2t / ndft:15.2f}" + extra
            )
    if plots:
        from coffea_otcal.em_plots import EMTruth, plot_em_report

        out_dir = f"{plots}/{name.replace(' ', '_').replace('(', '').replace(')', '')}"
        paths = plot_em_report(
            res, out_dir, truth=EMTruth(truth), diagnostics=diag, variations=variations
        )
        print(f"wrote {len(paths)} plots to {out_dir}")
    return {"time": t_fit, "n1": n1, "n2": n2, "chi": chi_rows, "pulls": pulls, "result": res}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cases", nargs="*", default=["table1", "impure_c", "kinematics"])
    parser.add_argument("--jets", type=int, default=50_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plots", default=None, help="write the EM report PNGs here")
    parser.add_argument("--dequantise", action="store_true",
                        help="read DeepJet with mantissa_bits=10, dequantise=True (as the demo)")
    parser.add_argument("--warmup", type=int, default=0, help="EMConfig.shape_warmup")
    parser.add_argument("--flow", default="{}", help='FlowConfig overrides as JSON, e.g. {"bins": 16}')
    parser.add_argument("--em", default="{}", help='EMConfig overrides as JSON, e.g. {"m_steps": 300}')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {args.threads}; jets per region: {args.jets}; "
          f"dequantise: {args.dequantise}; shape warm-up: {args.warmup}")
    adapter = None
    if args.dequantise:
        from coffea_otcal.adapters import get_adapter

        adapter = get_adapter("deepjet", mantissa_bits=10, dequantise=True)
    config = EMConfig.model_validate({"shape_warmup": args.warmup, **json.loads(args.em)})
    config = config.model_copy(
        update={"flow": config.flow.model_copy(update=json.loads(args.flow))}
    )
    print(f"flow: {config.flow.model_dump()}")
    print(f"em: m_steps {config.m_steps}, max_iterations {config.max_iterations}, "
          f"learning_rate_decay {config.learning_rate_decay}")
    summary = []
    for case in args.cases:
        if case in ("table1", "impure_c"):
            cfg = table1_config(impure_c=case == "impure_c")
            data, mc, truth = simulate(cfg, args.jets, args.seed + 1, False, adapter)
            # an independent pseudo-data sample of the same configuration (its labels only)
            heldout = simulate(cfg, args.jets, args.seed + 101, False, adapter)[2]
            out = evaluate(case, data, mc, truth, config, args.seed, args.plots, heldout)
            summary.append((case, "uncond", out))
        elif case == "kinematics":
            for cond in (False, True):
                data, mc, truth = simulate_kinematics(args.jets, args.seed + 2, cond, adapter)
                out = evaluate(
                    f"kinematics ({'cond' if cond else 'uncond'})",
                    data,
                    mc,
                    truth,
                    config,
                    args.seed,
                )
                summary.append((case, "cond" if cond else "uncond", out))
        else:
            parser.error(f"unknown case {case!r}")
    print("\n=== summary ===")
    print(
        f"{'case':12s} {'flows':7s} {'time/s':>7s} {'1sig':>5s} {'2sig':>5s} "
        f"{'max chi2/ndf':>13s} {'max chi2/ndf w/ band':>21s} {'max folded':>11s}"
    )
    for case, kind, out in summary:
        mx = max(c[2] for c in out["chi"])
        mxb = max(c[4] for c in out["chi"])
        mxf = max(c[5] for c in out["chi"])
        print(
            f"{case:12s} {kind:7s} {out['time']:7.1f} {out['n1']:>3d}/9 {out['n2']:>3d}/9 "
            f"{mx:13.2f} {mxb:21.2f} {mxf:11.2f}"
        )


if __name__ == "__main__":
    main()
