r"""The closure stage: calibrate the validation and control regions, measure, plot, report.

For every region (validation first, then each control region) the MC jets are moved by
the bundle's map of their truth flavour (nominal and every variation) with the numpy
applier, and compared with the (pseudo-)data on the eq.-62 discriminants for each
:math:`\kappa`: a shape chi2 before and after calibration, the variation-band coverage,
a classifier two-sample AUC (MC vs data, before and after, on held-out jets) and the mean
Aitchison displacement. The vertical baseline reweights the same MC jets with classifier
density ratios trained on the same EM targets; its closure and its effective-sample-size
fraction :math:`\rho` (Mind the Gap eq. 5) are reported side by side. ``report.md`` (one
page) and ``report.json`` summarise; ``plots/index.md`` lists the plots.
"""

from __future__ import annotations

__all__ = [
    "band_coverage",
    "detect_mantissa_bits",
    "em_fraction_factors",
    "requantise",
    "run_closure_stage",
]

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coffea_otcal import geometry
from coffea_otcal.closure import (
    DISCRIMINANTS,
    classifier_auc,
    discriminant_values,
    mean_aitchison_displacement,
    shape_chi2,
    variation_band,
)

if TYPE_CHECKING:
    from coffea_otcal.pipeline import PipelineConfig, StageResult

logger = logging.getLogger(__name__)

#: z of the two-sided 90 % interval of a normal distribution (``band_coverage_90``).
COVERAGE_90_Z = 1.6449


def _hist(values: np.ndarray, weight: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    edges = np.linspace(0.0, 1.0, bins + 1)
    v = np.clip(values, 0.0, np.nextafter(1.0, 0.0))
    return np.histogram(v, edges, weights=weight)[0], np.histogram(v, edges, weights=weight**2)[0]


def band_coverage(
    data: tuple[np.ndarray, np.ndarray],
    nominal: tuple[np.ndarray, np.ndarray],
    variations: Mapping[str, np.ndarray],
    z: float = 1.0,
) -> tuple[int, int]:
    r"""Bins where the data lie inside the calibrated MC's total uncertainty (band (+) stat).

    All histograms are normalised to unit area. The band is the quadrature sum of the
    variations (:func:`coffea_otcal.closure.variation_band`, per side); it is combined in
    quadrature with the statistical error :math:`\sqrt{\sigma^2_{data} + \sigma^2_{MC}}` of
    the bin, and the data must lie within ``z`` times that total below or above the nominal.
    ``z = 1`` is the one-sigma coverage (a perfect calibration with honest errors covers
    68 %); ``z = 1.645`` the 90 % interval (docs/methods.md).

    Returns:
        ``(bins inside, bins with entries)``.
    """
    (d, dv), (n, nv) = data, nominal
    sums = {"data": d.sum(), "nominal": n.sum(), **{k: v.sum() for k, v in variations.items()}}
    empty = {k: float(v) for k, v in sums.items() if not v > 0}
    if empty:
        msg = f"band coverage needs histograms with a positive sum of weights; got {empty}"
        raise ValueError(msg)
    d_frac, n_frac = d / d.sum(), n / n.sum()
    down, up = variation_band(n_frac, {k: v / v.sum() for k, v in variations.items()})
    sigma2 = dv / d.sum() ** 2 + nv / n.sum() ** 2
    used = (d > 0) | (n > 0)
    r = d_frac - n_frac
    inside = np.where(r >= 0, r <= z * np.sqrt(up**2 + sigma2), -r <= z * np.sqrt(down**2 + sigma2))
    return int((inside & used).sum()), int(used.sum())


def _features(probs: np.ndarray, ctx: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(geometry.ilr(probs)), ctx], axis=1)


def _subsample(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= cap else np.sort(rng.choice(n, cap, replace=False))


def detect_mantissa_bits(raw: np.ndarray, max_bits: int = 22) -> int | None:
    """The fewest stored mantissa bits that reproduce every raw tagger value (None: full float).

    NanoAOD stores tagger scores with a reduced mantissa (10 bits for DeepJet); calibrated
    columns written back to such files are rounded the same way, so the closure compares
    like with like (otherwise a classifier sees the quantisation grid, not the calibration).
    """
    from coffea_otcal.latent_tagger import quantise_mantissa

    v = np.asarray(raw, dtype=np.float32).ravel()
    v = v[np.isfinite(v) & (v != 0)]
    if len(v) == 0:
        return None
    for bits in range(4, max_bits + 1):
        if np.array_equal(quantise_mantissa(v, bits), v):
            return bits
    return None


def requantise(
    adapter: Any, probs: np.ndarray, bits: int | None, key: Mapping[str, np.ndarray] | None = None
) -> np.ndarray:
    """Round calibrated probabilities through the tagger's own columns at ``bits`` mantissa bits.

    ``key`` holds the per-jet columns of a dequantising adapter (its ``key_columns``).
    """
    if bits is None:
        return probs
    from coffea_otcal.latent_tagger import quantise_mantissa

    cols = {k: quantise_mantissa(v, bits) for k, v in adapter.from_simplex(probs).items()}
    out, valid = adapter.to_simplex({**(key or {}), **cols})
    return np.where(valid[:, None], out, probs)


def _calibrate_region(cal: Any, probs: np.ndarray, flavour: np.ndarray,
                      kin: Mapping[str, np.ndarray], bits: int | None) -> dict[str, np.ndarray]:
    """Calibrated probabilities of every map name (jets without a map stay unchanged)."""
    from coffea_otcal.adapters import get_adapter

    adapter = get_adapter(cal.bundle.adapter.name, **cal.bundle.adapter.options)
    out = {name: probs.copy() for name in cal.bundle.map_names}
    for code in cal.bundle.flavour_codes:
        m = flavour == code
        if not m.any():
            continue
        kin_m = {k: v[m] for k, v in kin.items()}
        for name in cal.bundle.map_names:
            out[name][m] = requantise(adapter, cal.calibrate_probs(probs[m], code, kin_m, name), bits,
                                     kin_m)
    return out


def _baseline_ratios(config: PipelineConfig, targets: Any) -> tuple[dict[int, Any], bool]:
    """Vertical baseline: per flavour, a density ratio MC -> EM data target (and if it uses context)."""
    from coffea_otcal.vertical import fit_density_ratio

    codes = dict(zip(targets.meta.classes, targets.meta.flavour_codes, strict=True))
    ratios = {}
    for flav, tgt in targets.flavours.items():
        src = np.concatenate([tgt.source_x, tgt.source_context], axis=1) if tgt.source_context is not None else tgt.source_x
        y, yc, yw = tgt.target()
        dst = np.concatenate([y, yc], axis=1) if yc is not None else y
        ratios[codes[flav]] = fit_density_ratio(src, dst, tgt.source_weight, yw, seed=config.seed)
    with_context = any(t.source_context is not None for t in targets.flavours.values())
    return ratios, with_context


def em_fraction_factors(
    fractions: Sequence[Sequence[float]], regions: Sequence[str], codes: Sequence[int],
    region: str, flavour: np.ndarray, weight: np.ndarray,
) -> np.ndarray | None:
    r"""Per-jet factors giving a control region's MC the composition the EM fitted in data.

    MC jets of flavour :math:`f` in region :math:`r` get :math:`\hat\pi_{rf} / \pi^{MC}_{rf}`
    (the fitted data fraction over the MC's weighted fraction); jets of other flavours keep 1.
    ``None`` when the EM did not fit ``region`` (validation regions). Horizontal calibration
    moves jets and leaves the composition of the MC as it is, so in a control region whose data
    composition differs from the MC one, "after" mixes a composition difference with the shape
    closure; "after, EM fractions" isolates the latter (docs/methods.md).
    """
    if region not in regions:
        return None
    row = fractions[list(regions).index(region)]
    total = float(weight.sum())
    factors = np.ones(len(flavour))
    for i, code in enumerate(codes):
        m = flavour == code
        mc_fraction = float(weight[m].sum()) / total if total else 0.0
        if mc_fraction > 0:
            factors[m] = row[i] / mc_fraction
    return factors


def run_closure_stage(config: PipelineConfig, tmp: Path, results: Mapping[str, StageResult],
                      progress: bool, truth: Mapping[str, Any] | None) -> dict[str, Any]:
    """Closure metrics, plots and the report of one pipeline run."""
    from coffea_otcal.applier import Calibrator
    from coffea_otcal.bundle import Bundle
    from coffea_otcal.closure_plots import plot_discriminant_closure, plot_map_arrows
    from coffea_otcal.pipeline import context_arrays
    from coffea_otcal.store import load_store
    from coffea_otcal.variations import Targets
    from coffea_otcal.vertical import effective_sample_fraction

    store = load_store(results["fill"].folder / "store.parquet")
    bundle = Bundle.load(results["ot"].folder / "bundle.json.gz")
    cal = Calibrator(bundle)
    cc = config.closure
    rng = np.random.default_rng(config.seed)
    targets = Targets.load(results["em"].folder / "targets.npz")
    em_fit = targets.meta  # classes, codes, fitted fractions
    ratios, ratio_context = _baseline_ratios(config, targets) if cc.baseline else ({}, False)
    plots: list[Path] = []
    regions: dict[str, Any] = {}
    arrows_before: dict[str, np.ndarray] = {}
    arrows_after: dict[str, np.ndarray] = {}
    labels = {f.code: f.label for f in bundle.flavours}
    for region in [*config.validation_regions, *config.cr_names]:
        is_vr = region in config.validation_regions
        data, mc = store.select(region=region, is_data=True), store.select(region=region, is_data=False)
        kin = {n: mc.kin[:, i] for i, n in enumerate(store.kinematics)}
        kin_d = {n: data.kin[:, i] for i, n in enumerate(store.kinematics)}
        bits = detect_mantissa_bits(data.raw)
        calibrated = _calibrate_region(cal, mc.probs, mc.flavour, kin, bits)
        nominal = calibrated["nominal"]
        variations = {k: v for k, v in calibrated.items() if k != "nominal"}
        ctx_mc, ctx_d = context_arrays(config, kin), context_arrays(config, kin_d)
        s = np.ones(len(mc))
        for code, ratio in ratios.items():
            m = mc.flavour == code
            if m.any():
                ctx_m = ctx_mc[m] if ratio_context else np.zeros((int(m.sum()), 0))
                s[m] = ratio(_features(mc.probs[m], ctx_m))
        w_base = mc.weight * s
        # the reweighted MC carries the statistical power of rho N jets; at equal statistics
        # (its MC variance times rho) its chi2 is comparable with the OT one (docs/methods.md)
        rho_base = effective_sample_fraction(s) if ratios else 1.0
        postfit = em_fraction_factors(em_fit.fractions, em_fit.regions, em_fit.flavour_codes,
                                      region, mc.flavour, mc.weight)
        hists: dict[str, Any] = {}
        inside = used = inside90 = 0
        # known truth (the demo): a fresh sample of the region's true data response
        truth_probs = (truth or {}).get("validation", {}).get(region) if is_vr else None
        t_inside = t_used = t_inside90 = 0
        for name in DISCRIMINANTS:
            for k in cc.kappas:
                key = f"{name}(k={k:g})"
                hd = _hist(discriminant_values(data.probs, name, k), data.weight, cc.bins)
                hb = _hist(discriminant_values(mc.probs, name, k), mc.weight, cc.bins)
                d_nominal = discriminant_values(nominal, name, k)
                ha = _hist(d_nominal, mc.weight, cc.bins)
                hv = {n: _hist(discriminant_values(v, name, k), mc.weight, cc.bins)[0]
                      for n, v in variations.items()}
                hr = _hist(discriminant_values(mc.probs, name, k), w_base, cc.bins)
                hp = _hist(d_nominal, mc.weight * postfit, cc.bins) if postfit is not None else None
                i, u = band_coverage(hd, ha, hv)
                i90, _ = band_coverage(hd, ha, hv, z=COVERAGE_90_Z)
                inside, used, inside90 = inside + i, used + u, inside90 + i90
                truth_cov = None
                if truth_probs is not None:
                    ht = _hist(discriminant_values(truth_probs, name, k), np.ones(len(truth_probs)), cc.bins)
                    ti, tu = band_coverage(ht, ha, hv)
                    ti90, _ = band_coverage(ht, ha, hv, z=COVERAGE_90_Z)
                    t_inside, t_used, t_inside90 = t_inside + ti, t_used + tu, t_inside90 + ti90
                    truth_cov = {"band_coverage": [ti, tu], "band_coverage_90": [ti90, tu]}
                hists[key] = {
                    "before": shape_chi2(*hb, *hd).to_dict(),
                    "after": shape_chi2(*ha, *hd).to_dict(),
                    "baseline": shape_chi2(*hr, *hd).to_dict() if ratios else None,
                    "baseline_equal_stat": (shape_chi2(hr[0], hr[1] * rho_base, *hd).to_dict()
                                            if ratios else None),
                    "after_em_fractions": shape_chi2(*hp, *hd).to_dict() if hp is not None else None,
                    "band_coverage": [i, u],
                    "band_coverage_90": [i90, u],
                    "truth": truth_cov,
                }
                if is_vr or (cc.plot_control_regions and k == 1.0):
                    var_probs = {n: calibrated[n] for n in calibrated if n != "nominal"}
                    extra = {"MC (reweighted baseline)": (mc.probs, w_base)} if ratios else None
                    plots.append(plot_discriminant_closure(
                        tmp / "plots" / f"closure_{region}_{name}_k{k:g}.png", name, k,
                        (data.probs, data.weight), (mc.probs, mc.weight), (nominal, mc.weight),
                        var_probs, bins=cc.bins, experiment=cc.experiment, region=region, extra=extra,
                    ))
        sub_mc = _subsample(len(mc), cc.classifier_max_jets, rng)
        sub_d = _subsample(len(data), cc.classifier_max_jets, rng)
        f_d = _features(data.probs[sub_d], ctx_d[sub_d])
        auc = {
            "before": classifier_auc(_features(mc.probs[sub_mc], ctx_mc[sub_mc]), f_d, mc.weight[sub_mc], data.weight[sub_d], seed=config.seed),
            "after": classifier_auc(_features(nominal[sub_mc], ctx_mc[sub_mc]), f_d, mc.weight[sub_mc], data.weight[sub_d], seed=config.seed),
        }
        if ratios:
            auc["baseline"] = classifier_auc(_features(mc.probs[sub_mc], ctx_mc[sub_mc]), f_d, w_base[sub_mc], data.weight[sub_d], seed=config.seed)
        after_vals = [h["after"]["chi2_ndf"] for h in hists.values()]
        regions[region] = {
            "validation": is_vr,
            "n_data": len(data), "n_mc": len(mc),
            "histograms": hists,
            "mean_chi2_ndf": {
                "before": float(np.mean([h["before"]["chi2_ndf"] for h in hists.values()])),
                "after": float(np.mean(after_vals)),
                "baseline": float(np.mean([h["baseline"]["chi2_ndf"] for h in hists.values()])) if ratios else None,
                "baseline_equal_stat": float(np.mean(
                    [h["baseline_equal_stat"]["chi2_ndf"] for h in hists.values()])) if ratios else None,
            },
            "min_p_value_after": float(np.min([h["after"]["p_value"] for h in hists.values()])),
            "after_em_fractions": {
                "mean_chi2_ndf": float(np.mean([h["after_em_fractions"]["chi2_ndf"]
                                                for h in hists.values()])),
                "min_p_value": float(np.min([h["after_em_fractions"]["p_value"]
                                             for h in hists.values()])),
            } if postfit is not None else None,
            "band_coverage": inside / used if used else float("nan"),
            "band_coverage_90": inside90 / used if used else float("nan"),
            # the true distribution (a fresh sample) inside the band (+) MC and truth stat
            "truth_band_coverage": [t_inside / t_used, t_inside90 / t_used] if t_used else None,
            "n_truth": None if truth_probs is None else len(truth_probs),
            "classifier_auc": auc,
            "mean_aitchison_displacement": mean_aitchison_displacement(mc.probs, nominal, mc.weight),
            "rho": {"ot": 1.0, "baseline": rho_base if ratios else None},
        }
        if is_vr and not arrows_before:
            for code, label in labels.items():
                m = mc.flavour == code
                arrows_before[label] = np.asarray(geometry.ilr(mc.probs[m]))
                arrows_after[label] = np.asarray(geometry.ilr(nominal[m]))
    if arrows_before:
        for space in ("ilr", "simplex"):
            plots.append(plot_map_arrows(tmp / "plots" / f"map_{space}.png", arrows_before,
                                         arrows_after, space=space, experiment=cc.experiment))
    per_flavour = _per_flavour_truth(config, cal, truth, labels) if truth else None
    summary = _summary(config, regions, per_flavour, results)
    (tmp / "report.json").write_text(json.dumps({"summary": summary, "regions": regions,
                                                 "per_flavour_truth": per_flavour}, indent=1, default=float))
    (tmp / "report.md").write_text(_markdown(summary, regions, per_flavour))
    index = ["# Plots", ""] + [f"- [{p.name}]({p.name})" for p in plots]
    (tmp / "plots" / "index.md").write_text("\n".join(index) + "\n")
    return summary


def _per_flavour_truth(config: PipelineConfig, cal: Any, truth: Mapping[str, Any],
                       labels: Mapping[int, str]) -> dict[str, Any] | None:
    """Closure per flavour against a fresh sample of the true data response (known truth)."""
    per = truth.get("per_flavour")
    if not per:
        return None
    out = {}
    for code, sample in per.items():
        mc_probs, mc_kin, data_probs = sample["mc_probs"], sample["mc_kin"], sample["data_probs"]
        if int(code) not in cal.bundle.flavour_codes:
            continue
        bits = sample.get("mantissa_bits")
        from coffea_otcal.adapters import get_adapter

        adapter = get_adapter(cal.bundle.adapter.name, **cal.bundle.adapter.options)
        after = requantise(adapter, cal.calibrate_probs(mc_probs, int(code), mc_kin, "nominal"), bits,
                           mc_kin)
        res = {}
        for name in DISCRIMINANTS:
            hd = _hist(discriminant_values(data_probs, name, 1.0), np.ones(len(data_probs)), config.closure.bins)
            hb = _hist(discriminant_values(mc_probs, name, 1.0), np.ones(len(mc_probs)), config.closure.bins)
            ha = _hist(discriminant_values(after, name, 1.0), np.ones(len(after)), config.closure.bins)
            res[name] = {"before": shape_chi2(*hb, *hd).chi2_ndf, "after": shape_chi2(*ha, *hd).chi2_ndf}
        out[labels.get(int(code), str(code))] = res
    return out


def _summary(config: PipelineConfig, regions: Mapping[str, Any], per_flavour: Any,
             results: Mapping[str, StageResult]) -> dict[str, Any]:
    vr = [regions[r] for r in config.validation_regions]
    hist_after = [h["after"] for r in vr for h in r["histograms"].values()]
    hist_base = [h["baseline"] for r in vr for h in r["histograms"].values() if h["baseline"]]
    hist_base_eq = [h["baseline_equal_stat"] for r in vr for h in r["histograms"].values()
                    if h["baseline_equal_stat"]]
    return {
        "validation_regions": list(config.validation_regions),
        "n_data_vr": int(sum(r["n_data"] for r in vr)),
        "n_mc_vr": int(sum(r["n_mc"] for r in vr)),
        "auc_before": float(np.mean([r["classifier_auc"]["before"] for r in vr])),
        "auc_after": float(np.mean([r["classifier_auc"]["after"] for r in vr])),
        "auc_baseline": float(np.mean([r["classifier_auc"].get("baseline", np.nan) for r in vr])),
        "mean_chi2_ndf_before": float(np.mean([r["mean_chi2_ndf"]["before"] for r in vr])),
        "mean_chi2_ndf_after": float(np.mean([h["chi2_ndf"] for h in hist_after])),
        "mean_chi2_ndf_baseline": float(np.mean([h["chi2_ndf"] for h in hist_base])) if hist_base else None,
        "mean_chi2_ndf_baseline_equal_stat":
            float(np.mean([h["chi2_ndf"] for h in hist_base_eq])) if hist_base_eq else None,
        "min_p_value_after": float(np.min([h["p_value"] for h in hist_after])),
        "band_coverage": float(np.mean([r["band_coverage"] for r in vr])),
        "band_coverage_90": float(np.mean([r["band_coverage_90"] for r in vr])),
        "truth_band_coverage": ([float(np.mean([r["truth_band_coverage"][i] for r in vr])) for i in (0, 1)]
                                if all(r.get("truth_band_coverage") for r in vr) else None),
        "rho_baseline": float(np.mean([r["rho"]["baseline"] for r in vr])) if hist_base else None,
        "mean_aitchison_displacement": float(np.mean([r["mean_aitchison_displacement"] for r in vr])),
        "stage_seconds": {k: round(v.seconds, 1) for k, v in results.items()},
        # the EM's data-only goodness of fit (em/fit_quality.json), as the EM stage summarised it
        "em_fit_quality": results["em"].summary.get("fit_quality") if "em" in results else None,
    }


def _fit_quality_line(quality: Mapping[str, Any] | None) -> str:
    """The report's line on the EM's data-only goodness of fit (docs/em.md)."""
    if not quality:
        return "- EM goodness of fit on the data: n/a (EM stage written before session 15)"
    return (
        f"- EM goodness of fit on the data (no truth needed; em/fit_quality.json): largest "
        f"chi2/ndf data vs fitted mixture {quality['mixture_max']:.2f}, flow vs its EM target "
        f"{quality['component_max']:.2f}, {quality['warnings']} above 2 (blind to the "
        "fractions' flat direction, which the variation band covers)"
    )


def _truth_coverage_line(coverage: Sequence[float] | None) -> str:
    if not coverage:
        return "- the true data distribution is not known here (only the demo generates it)"
    return (f"- bins with the true data distribution (a fresh pseudo-data sample, its statistical "
            f"error included) inside the calibrated MC's one-sigma uncertainty: "
            f"{100 * coverage[0]:.1f} %; inside its 90 % interval: {100 * coverage[1]:.1f} %")


def _markdown(summary: Mapping[str, Any], regions: Mapping[str, Any], per_flavour: Any) -> str:
    def f(x: Any, nd: int = 3) -> str:
        return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{nd}f}"

    lines = [
        "# coffea-otcal closure report",
        "",
        f"Validation region(s) {', '.join(summary['validation_regions'])}: "
        f"{summary['n_data_vr']} data jets, {summary['n_mc_vr']} MC jets.",
        "",
        "| metric (validation) | uncalibrated MC | OT calibrated | reweighting baseline |",
        "| --- | --- | --- | --- |",
        f"| classifier AUC, MC vs data (0.5 = indistinguishable) | {f(summary['auc_before'])} | {f(summary['auc_after'])} | {f(summary['auc_baseline'])} |",
        f"| mean chi2/ndf over the D(k) histograms | {f(summary['mean_chi2_ndf_before'], 2)} | {f(summary['mean_chi2_ndf_after'], 2)} | {f(summary['mean_chi2_ndf_baseline'], 2)} |",
        f"| effective MC sample fraction rho (eq. 5) | 1 | 1 | {f(summary['rho_baseline'])} |",
        f"| mean chi2/ndf at equal MC statistics (baseline's MC variance x rho) | {f(summary['mean_chi2_ndf_before'], 2)} | {f(summary['mean_chi2_ndf_after'], 2)} | {f(summary.get('mean_chi2_ndf_baseline_equal_stat'), 2)} |",
        "",
        f"- smallest chi2 p-value after calibration: {summary['min_p_value_after']:.3g}",
        f"- bins with the data inside the calibrated MC's one-sigma uncertainty (variation band "
        f"(+) stat; 68 % for honest errors): {100 * summary['band_coverage']:.1f} %; inside its 90 % "
        f"interval: {100 * summary['band_coverage_90']:.1f} %",
        _truth_coverage_line(summary.get("truth_band_coverage")),
        f"- mean Aitchison displacement of the MC jets: {f(summary['mean_aitchison_displacement'])}",
        f"- stage wall times [s]: {summary['stage_seconds']}",
        _fit_quality_line(summary.get("em_fit_quality")),
        "",
        "## Per region",
        "",
        "| region | kind | AUC before | AUC after | chi2/ndf before | chi2/ndf after | min p after | band coverage 1 sigma / 90 % | chi2/ndf after, EM fractions (min p) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in regions.items():
        post = r.get("after_em_fractions")
        post_txt = f"{f(post['mean_chi2_ndf'], 2)} ({post['min_p_value']:.3g})" if post else "n/a"
        lines.append(
            f"| {name} | {'validation' if r['validation'] else 'control'} | {f(r['classifier_auc']['before'])} | "
            f"{f(r['classifier_auc']['after'])} | {f(r['mean_chi2_ndf']['before'], 2)} | "
            f"{f(r['mean_chi2_ndf']['after'], 2)} | {r['min_p_value_after']:.3g} | {100 * r['band_coverage']:.0f} / {100 * r['band_coverage_90']:.0f} % | {post_txt} |"
        )
    lines += ["", "Control regions: MC keeps its own flavour composition; the last column gives it "
              "the composition the EM fitted in data, so it tests the shapes alone.", ""]
    if per_flavour:
        lines += ["", "## Per flavour against the true data response (chi2/ndf, k = 1)", "",
                  "| flavour | " + " | ".join(f"{d} before / after" for d in DISCRIMINANTS) + " |",
                  "| --- |" + " --- |" * len(DISCRIMINANTS)]
        for flav, res in per_flavour.items():
            lines.append(f"| {flav} | " + " | ".join(f"{f(v['before'], 2)} / {f(v['after'], 2)}" for v in res.values()) + " |")
    lines += ["", "Plots: [plots/index.md](plots/index.md). What each number means: docs/methods.md.", ""]
    return "\n".join(lines)
