"""Latent-calibration plots: PCA corner plots and discriminator ROC curves (Mind the Gap Fig. 3-5).

Every function writes one PNG atomically and returns its path. The principal components are
those of the target (data) latents, so source, target and calibrated jets are shown in the
same projection (Algren et al. 2025, Sec. 5.1: the five leading components of :math:`z`).
"""

from __future__ import annotations

__all__ = ["pca_projection", "plot_latent_corner", "plot_latent_rocs", "plot_output_discriminants"]

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coffea_otcal.atomic import atomic_path
from coffea_otcal.closure_plots import plot_discriminant_closure, style_context
from coffea_otcal.latent_eval import LatentClosure

#: Colours of the paper: target black, source blue, calibrated red.
_COLOURS = {"target": "black", "source": "tab:blue", "calibrated": "tab:red"}


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=100)
    return path


def pca_projection(reference: np.ndarray, n_components: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(d,)`` and leading principal axes ``(d, k)`` of ``reference`` latents ``(n, d)``."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.ndim != 2 or ref.shape[1] < n_components or len(ref) < 2:
        msg = f"PCA of {n_components} components needs (n >= 2, d >= {n_components}) latents, got {ref.shape}"
        raise ValueError(msg)
    mean = ref.mean(axis=0)
    _, vecs = np.linalg.eigh(np.cov(ref - mean, rowvar=False))
    return mean, np.ascontiguousarray(vecs[:, ::-1][:, :n_components])


def _levels(h: np.ndarray, fractions: Sequence[float]) -> list[float]:
    """Density thresholds enclosing the given probability fractions of a 2-D histogram."""
    flat = np.sort(h.ravel())[::-1]
    cum = np.cumsum(flat) / max(flat.sum(), 1e-300)
    idx = np.minimum(np.searchsorted(cum, np.asarray(fractions, dtype=np.float64)), len(flat) - 1)
    out = sorted({float(v) for v in flat[idx]})
    return [lv for lv in out if lv > 0]


def plot_latent_corner(
    path: str | Path,
    samples: Mapping[str, np.ndarray],
    *,
    reference: str = "target",
    n_components: int = 5,
    bins: int = 30,
    contours: Sequence[float] = (0.5, 0.8, 0.9, 0.95),
    title: str = "",
) -> Path:
    """Corner plot of the leading principal components of latents (Mind the Gap Fig. 3).

    Diagonal: normalised 1-D histograms; below it: 2-D contours enclosing ``contours``
    fractions of each sample.

    Arguments:
        path: output PNG.
        samples: name (``source``, ``target``, ``calibrated`` or any) -> ``(n, d)`` latents.
        reference: the sample whose PCA defines the projection.
        n_components: number of leading components shown.
        bins: histogram bins per axis.
        contours: probability fractions of the 2-D contours.
        title: figure title.

    Returns:
        The path written.
    """
    if reference not in samples:
        msg = f"reference sample {reference!r} not in samples {sorted(samples)}"
        raise KeyError(msg)
    mean, axes = pca_projection(samples[reference], n_components)
    proj = {k: (np.asarray(v, dtype=np.float64) - mean) @ axes for k, v in samples.items()}
    ref = proj[reference]
    lo, hi = np.percentile(ref, 0.5, axis=0), np.percentile(ref, 99.5, axis=0)
    pad = 0.15 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    k = n_components
    with style_context(None) as plt:
        fig, grid = plt.subplots(k, k, figsize=(2.2 * k, 2.2 * k), squeeze=False)
        for i in range(k):
            for j in range(k):
                ax = grid[i, j]
                if j > i:
                    ax.set_visible(False)
                    continue
                for name, p in proj.items():
                    colour = _COLOURS.get(name)
                    if i == j:
                        edges = np.linspace(lo[i], hi[i], bins + 1)
                        h, _ = np.histogram(p[:, i], bins=edges, density=True)
                        ax.stairs(h, edges, color=colour, label=name)
                    else:
                        ex = np.linspace(lo[j], hi[j], bins + 1)
                        ey = np.linspace(lo[i], hi[i], bins + 1)
                        h, _, _ = np.histogram2d(p[:, j], p[:, i], bins=(ex, ey))
                        levels = _levels(h, contours)
                        if len(levels) >= 2:
                            cx, cy = 0.5 * (ex[1:] + ex[:-1]), 0.5 * (ey[1:] + ey[:-1])
                            ax.contour(cx, cy, h.T, levels=levels, colors=colour, linewidths=0.8)
                if i == k - 1:
                    ax.set_xlabel(f"PC{j + 1}")
                else:
                    ax.set_xticklabels([])
                if j == 0 and i > 0:
                    ax.set_ylabel(f"PC{i + 1}")
                ax.tick_params(labelsize=6)
        grid[0, 0].legend(fontsize=7, loc="upper right", frameon=False)
        if title:
            fig.suptitle(title, fontsize="medium")
        fig.tight_layout()
        try:
            return _save(fig, Path(path))
        finally:
            plt.close(fig)


def plot_latent_rocs(path: str | Path, closure: LatentClosure, title: str = "") -> Path:
    """ROC curves of the discriminators at z, z' and the outputs (Mind the Gap Fig. 4a).

    Solid: source vs target; dashed: calibrated vs target; AUCs in the legend.

    Arguments:
        path: output PNG.
        closure: a :class:`~coffea_otcal.latent_eval.LatentClosure`.
        title: figure title.

    Returns:
        The path written.
    """
    colours = {"z": "tab:blue", "z_prime": "tab:orange", "outputs": "tab:green"}
    with style_context(None) as plt:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for layer, pair in closure.rocs.items():
            colour = colours.get(layer)
            for key, style in (("source_vs_target", "-"), ("calibrated_vs_target", "--")):
                res = pair[key]
                label = f"{layer}, {key.split('_')[0]} (AUC {res.auc:.3f})"
                ax.plot(res.fpr, res.tpr, style, color=colour, label=label)
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=7, loc="lower right")
        if title:
            ax.set_title(title, fontsize="small")
        fig.tight_layout()
        try:
            return _save(fig, Path(path))
        finally:
            plt.close(fig)


def plot_output_discriminants(
    outdir: str | Path,
    closure: LatentClosure,
    kappas: Sequence[float] = (1.0,),
    prefix: str = "latent",
) -> list[Path]:
    r"""Output discriminants (eq. 62) of target, source and calibrated jets (Fig. 5).

    Arguments:
        outdir: folder of the PNGs ``<prefix>_<D>_k<kappa>.png``.
        closure: a :class:`~coffea_otcal.latent_eval.LatentClosure` (holds the probabilities).
        kappas: the :math:`\kappa` values drawn.
        prefix: file-name prefix.

    Returns:
        The paths written.
    """
    out = Path(outdir)
    probs = closure.probs
    paths = []
    for name in ("D_bc", "D_cl", "D_hfl"):
        for kappa in kappas:
            paths.append(
                plot_discriminant_closure(
                    out / f"{prefix}_{name}_k{kappa:g}.png",
                    name,
                    kappa,
                    (probs["target"], None),
                    (probs["source"], None),
                    (probs["calibrated"], None),
                    experiment=None,
                    region="latent calibration",
                )
            )
    return paths
