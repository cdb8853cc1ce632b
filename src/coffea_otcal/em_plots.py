"""EM report plots with hist and mplhep (Kim & Yang Fig. 1-7)."""

from __future__ import annotations

__all__ = ["EMTruth", "plot_em_report"]

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coffea_otcal.em import EMResult, RegionData
from coffea_otcal.em_diagnostics import EMDiagnostics, compute_diagnostics, proxy_delta_log_q
from coffea_otcal.variations import VariationInfo, make_variations

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EMTruth:
    """Known truth of pseudo-data: the data regions with flavour labels and true fractions.

    Attributes:
        data: per region, the same jets as the fit's data with ``flavour`` codes filled.
        fractions: true composition matrix ``(R, F)`` (defaults to the label counts).
    """

    data: Mapping[str, RegionData]
    fractions: np.ndarray | None = None

    def true_fractions(self, regions: Sequence[str], codes: Sequence[int]) -> np.ndarray:
        """Fractions from ``fractions`` or, when absent, from the weighted labels."""
        if self.fractions is not None:
            return np.asarray(self.fractions, dtype=np.float64)
        rows = []
        for r in regions:
            d = self.data[r]
            w = np.ones(len(d.x)) if d.weight is None else np.asarray(d.weight)
            row = np.array([w[np.asarray(d.flavour) == c].sum() for c in codes])
            rows.append(row / row.sum())
        return np.array(rows)


def _edges(values: np.ndarray, n: int = 40) -> np.ndarray:
    lo, hi = np.quantile(values, [0.001, 0.999])
    pad = 0.05 * (hi - lo + 1e-9)
    return np.linspace(lo - pad, hi + pad, n + 1)


def _hist(values: np.ndarray, edges: np.ndarray, weight: np.ndarray | None = None) -> Any:
    import hist

    h = hist.Hist(hist.axis.Variable(edges, name="x"), storage=hist.storage.Weight())
    h.fill(x=values, weight=np.ones(len(values)) if weight is None else weight)
    return h


def _mixture_components(
    flows: Any, fractions: np.ndarray, d: RegionData, seed: int, n_max: int = 20000
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Flow samples of each flavour, weighted to pi_f times the region's total weight."""
    n = min(len(d.x), n_max)
    total = float(d.weight_array.sum())
    out = []
    for i in range(len(fractions)):
        if flows.n_context:
            idx = np.random.default_rng(seed + i).choice(len(d.x), size=n, replace=len(d.x) < n)
            y = flows.sample(i, context=np.asarray(d.context)[idx], seed=seed + i)
        else:
            y = flows.sample(i, n=n, seed=seed + i)
        out.append((y, np.full(len(y), fractions[i] * total / len(y))))
    return out


def _plot_outputs(result: EMResult, outdir: Path, plt: Any, mplhep: Any) -> list[Path]:
    paths = []
    pre = result.pretrained_flows()
    for r, region in enumerate(result.regions):
        d = result.data[region]
        dim = d.x.shape[1]
        fig, axes = plt.subplots(2, dim, figsize=(6 * dim, 9), squeeze=False)
        for row, (label, flows, fr) in enumerate(
            [
                ("before EM (MC pretraining, prior fractions)", pre, result.prior_fractions[r]),
                ("after EM (fitted)", result.flows, result.fractions[r]),
            ]
        ):
            comps = _mixture_components(flows, fr, d, seed=result.seed + 11)
            for k in range(dim):
                ax = axes[row, k]
                edges = _edges(d.x[:, k])
                hs = [_hist(y[:, k], edges, w) for y, w in comps]
                mplhep.histplot(
                    hs,
                    ax=ax,
                    stack=True,
                    histtype="fill",
                    alpha=0.6,
                    label=[f"{c} ({f:.3f})" for c, f in zip(result.classes, fr, strict=True)],
                )
                mplhep.histplot(
                    _hist(d.x[:, k], edges, d.weight),
                    ax=ax,
                    histtype="errorbar",
                    color="black",
                    label="data",
                )
                ax.set_xlabel(f"ILR $z_{k + 1}$")
                ax.set_ylabel("jets")
                ax.set_yscale("log")
                ax.set_title(f"{region}: {label}", fontsize=11)
                ax.legend(fontsize=9)
        fig.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.93, wspace=0.25, hspace=0.3)
        path = outdir / f"em_outputs_{region}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def _ellipse(ax: Any, centre: np.ndarray, cov: np.ndarray, **kwargs: Any) -> None:
    lam, vec = np.linalg.eigh(0.5 * (cov + cov.T))
    lam = np.clip(lam, 0.0, None)
    t = np.linspace(0, 2 * np.pi, 200)
    circle = np.stack([np.cos(t), np.sin(t)])
    pts = centre[:, None] + vec @ (np.sqrt(lam)[:, None] * circle)
    ax.plot(pts[0], pts[1], **kwargs)


def _plot_logit_planes(
    result: EMResult, diag: EMDiagnostics, truth_fr: np.ndarray | None, outdir: Path, plt: Any
) -> list[Path]:
    from coffea_otcal.em import logits_from_fractions

    paths = []
    k = len(result.classes) - 1
    ref = result.classes[-1]
    for r, region in enumerate(result.regions):
        sl = slice(r * k, r * k + 2)
        fig, ax = plt.subplots(figsize=(7, 6))
        centre = result.logits[r, :2]
        _ellipse(ax, centre, diag.v_stat[sl, sl], color="tab:blue", label="stat. (eq. 38)")
        _ellipse(ax, centre, diag.v_eff[sl, sl], color="tab:red", label="effective (eq. 61)")
        _ellipse(
            ax,
            result.prior_logits[r, :2],
            result.prior_cov[r][:2, :2],
            color="grey",
            ls=":",
            label="prior (eq. 21)",
        )
        ax.plot(*centre, "x", color="k", ms=12, mew=2, label="fitted")
        ax.plot(*result.prior_logits[r, :2], "o", color="grey", label="prior centre")
        ax.plot(*result.initial_logits[r, :2], "+", color="tab:green", ms=10, label="initial")
        if truth_fr is not None:
            ax.plot(
                *logits_from_fractions(truth_fr[r])[:2],
                "*",
                color="gold",
                ms=16,
                mec="k",
                label="truth",
            )
        ax.set_xlabel(f"$a$ = log({result.classes[0]}/{ref})")
        ax.set_ylabel(f"$a$ = log({result.classes[1]}/{ref})")
        text = [
            f"$\\rho(F)$ = {diag.spectral_radius:.3f}, $\\kappa(\\Pi)$ = {diag.condition_number:.2f}"
        ]
        for i, s in enumerate(diag.singular_values):
            proj = float(np.linalg.norm(diag.u[sl, i]))
            if proj >= 0.05:
                tag = "st" if diag.stable[i] else "pr"
                text.append(
                    f"$\\sigma_{i + 1}$={s:.2f} ({tag}), $|u_{i + 1}\\downarrow|$={proj:.2f}"
                )
        ax.text(0.02, 0.98, "\n".join(text), transform=ax.transAxes, va="top", fontsize=8)
        ax.set_title(f"mixture logits, {region}", fontsize=11)
        ax.legend(fontsize=8, loc="lower right")
        fig.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.93, wspace=0.25, hspace=0.3)
        path = outdir / f"em_logits_{region}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def _plot_extracted(
    result: EMResult,
    variations: Sequence[VariationInfo],
    truth: EMTruth | None,
    outdir: Path,
    plt: Any,
) -> list[Path]:
    codes = result.config.flavour_codes
    enriched = [result.regions.index(r) for r in result.enriched]
    dim = result.flows.n_features
    paths = []
    for i, name in enumerate(result.classes):
        ctx = None
        truth_x = truth_w = None
        if truth is not None:
            xs, ws, cs = [], [], []
            for region in result.regions:
                t = truth.data[region]
                sel = np.asarray(t.flavour) == codes[i]
                xs.append(np.asarray(t.x)[sel])
                ws.append(
                    np.ones(int(sel.sum())) if t.weight is None else np.asarray(t.weight)[sel]
                )
                if result.conditional:
                    cs.append(np.asarray(t.context)[sel])
            truth_x, truth_w = np.concatenate(xs), np.concatenate(ws)
            ctx = np.concatenate(cs) if result.conditional else None
        elif result.conditional:
            ctx = np.concatenate([result.data[r].context for r in result.regions])
        if ctx is not None and len(ctx) > 40000:
            ctx = ctx[np.random.default_rng(result.seed).choice(len(ctx), 40000, replace=False)]
        n = 40000 if ctx is None else len(ctx)
        y = result.flows.sample(i, n=n, context=ctx, seed=result.seed + 101 + i)
        log_q = result.log_prob(y, ctx)
        shifts = [
            proxy_delta_log_q(log_q, np.asarray(v.delta_fractions), enriched)[:, i]
            for v in variations
        ]
        fig, axes = plt.subplots(1, dim, figsize=(6 * dim, 5), squeeze=False)
        for k in range(dim):
            ax = axes[0, k]
            edges = _edges(y[:, k] if truth_x is None else truth_x[:, k])
            width = np.diff(edges)
            nom, _ = np.histogram(y[:, k], edges)
            nom = nom / nom.sum() / width
            band2 = np.zeros_like(nom)
            for s in shifts:
                s = np.clip(s, -2.0, 2.0)
                devs = []
                for sign in (1.0, -1.0):
                    w = np.exp(sign * s)
                    h, _ = np.histogram(y[:, k], edges, weights=w / w.sum())
                    devs.append(np.abs(h / width - nom))
                band2 += np.maximum(*devs) ** 2
            band = np.sqrt(band2)
            ax.stairs(
                nom + band,
                edges,
                baseline=nom - band,
                fill=True,
                color="tab:red",
                alpha=0.3,
                label="effective band (eq. 57/61)",
            )
            ax.stairs(nom, edges, color="tab:red", label=f"extracted $\\hat q_{{{name}}}$")
            if truth_x is not None:
                h = _hist(truth_x[:, k], edges, truth_w)
                dens = h.values() / h.values().sum() / width
                err = np.sqrt(h.variances()) / h.values().sum() / width
                centres = 0.5 * (edges[1:] + edges[:-1])
                ax.errorbar(
                    centres,
                    dens,
                    yerr=err,
                    fmt="o",
                    ms=3,
                    color="k",
                    label=f"truth $q^\\star_{{{name}}}$ (data)",
                )
            ax.set_yscale("log")
            ax.set_xlabel(f"ILR $z_{k + 1}$")
            ax.set_ylabel("density")
            ax.set_title(f"flavour {name}", fontsize=11)
            ax.legend(fontsize=9)
        fig.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.93, wspace=0.25, hspace=0.3)
        path = outdir / f"em_extracted_{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def _plot_trace(result: EMResult, outdir: Path, plt: Any) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    it = [e["iteration"] for e in result.trace]
    ax.plot(it, [e["nll"] for e in result.trace], "o-", label="NLL / event")
    ax.plot(it, [e["objective"] for e in result.trace], "s--", label="NLL + prior")
    ax.set_xlabel("EM iteration")
    ax.set_ylabel("per event")
    ax.legend()
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.93, wspace=0.25, hspace=0.3)
    path = outdir / "em_nll_trace.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_em_report(
    result: EMResult,
    outdir: str | os.PathLike[str],
    truth: EMTruth | None = None,
    diagnostics: EMDiagnostics | None = None,
    variations: Sequence[VariationInfo] | None = None,
    kinds: Sequence[str] = ("outputs", "logits", "extracted", "trace"),
) -> list[Path]:
    r"""Write the EM report PNGs and return their paths.

    ``kinds`` selects the plot families below (all by default).

    - ``em_outputs_<region>.png``: ILR tagger outputs of the data with the stacked mixture
      before EM (pretrained flows, prior fractions) and after (Fig. 1);
    - ``em_logits_<region>.png``: the free-logit plane with the statistical (eq. 38) and
      effective (eq. 61) 1-sigma ellipses, prior, fitted, initial and true values and
      the singular channels of :math:`G` that touch the region (Fig. 2-4);
    - ``em_extracted_<flavour>.png``: extracted :math:`\hat q_f` with its effective band
      against the true data density when ``truth`` is given (Fig. 5-7);
    - ``em_nll_trace.png``: the NLL per EM iteration.
    """
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    import mplhep

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    diag = diagnostics if diagnostics is not None else compute_diagnostics(result)
    var = list(variations) if variations is not None else make_variations(diag)
    truth_fr = None
    if truth is not None:
        truth_fr = truth.true_fractions(result.regions, result.config.flavour_codes)
    paths: list[Path] = []
    unknown = sorted(set(kinds) - {"outputs", "logits", "extracted", "trace"})
    if unknown:
        msg = f"unknown plot kinds {unknown}; choose from outputs, logits, extracted, trace"
        raise ValueError(msg)
    with plt.style.context("fast"):
        if "outputs" in kinds:
            paths += _plot_outputs(result, outdir, plt, mplhep)
        if "logits" in kinds:
            paths += _plot_logit_planes(result, diag, truth_fr, outdir, plt)
        if "extracted" in kinds:
            paths += _plot_extracted(result, var, truth, outdir, plt)
        if "trace" in kinds:
            paths.append(_plot_trace(result, outdir, plt))
    logger.info("wrote %d EM plots to %s", len(paths), outdir)
    return paths
