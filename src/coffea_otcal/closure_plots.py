"""Closure and transport-map plots with hist + mplhep (Kim & Yang Fig. 8-12 style).

Every function writes one PNG (atomically) and returns its path. The experiment label is
selectable (``"CMS"``, ``"ATLAS"`` or ``None`` for a plain style); the text next to it
defaults to "Simulation" because the closure study runs on simulated pseudo-data.
"""

from __future__ import annotations

__all__ = ["plot_discriminant_closure", "plot_map_arrows", "style_context"]

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from coffea_otcal import geometry
from coffea_otcal.atomic import atomic_path
from coffea_otcal.closure import discriminant_values, variation_band


@contextlib.contextmanager
def style_context(experiment: str | None) -> Iterator[Any]:
    """Matplotlib (Agg) with the mplhep style of ``experiment`` for the duration."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    import mplhep

    styles = {"CMS": mplhep.style.CMS, "ATLAS": mplhep.style.ATLAS, None: {}}
    if experiment not in styles:
        msg = f"unknown plot label {experiment!r}; choose 'CMS', 'ATLAS' or None"
        raise ValueError(msg)
    with plt.style.context(styles[experiment]):
        yield plt


def _label(ax: Any, experiment: str | None, text: str, rlabel: str) -> None:
    import mplhep

    if experiment == "CMS":
        mplhep.cms.label(text, data=True, ax=ax, rlabel=rlabel, loc=0)
    elif experiment == "ATLAS":
        mplhep.atlas.label(text, data=True, ax=ax, rlabel=rlabel, loc=0)
    else:
        ax.set_title(f"{text}   {rlabel}", fontsize="small", loc="left")


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=110)
    return path


def _normalised(values: np.ndarray, weight: np.ndarray | None, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = np.ones_like(values) if weight is None else np.asarray(weight, dtype=np.float64)
    counts, _ = np.histogram(np.clip(values, edges[0], np.nextafter(edges[-1], 0)), edges, weights=w)
    var, _ = np.histogram(np.clip(values, edges[0], np.nextafter(edges[-1], 0)), edges, weights=w**2)
    total = counts.sum()
    return counts / total, np.sqrt(var) / total


def plot_discriminant_closure(
    path: str | Path,
    name: str,
    kappa: float,
    data: tuple[np.ndarray, np.ndarray | None],
    mc_before: tuple[np.ndarray, np.ndarray | None],
    mc_after: tuple[np.ndarray, np.ndarray | None],
    variations: Mapping[str, np.ndarray] | None = None,
    *,
    bins: int = 20,
    experiment: str | None = "CMS",
    text: str = "Simulation",
    region: str = "",
    extra: Mapping[str, tuple[np.ndarray, np.ndarray | None]] | None = None,
) -> Path:
    r"""Closure of one eq.-62 discriminant: data vs MC before and after calibration.

    Arguments:
        path: output PNG.
        name: ``D_bc``, ``D_cl`` or ``D_hfl``.
        kappa: the discriminant's :math:`\kappa`.
        data: ``(probs (n, 3), weights or None)`` of (pseudo-)data.
        mc_before: MC probabilities and weights before calibration.
        mc_after: the same MC jets after the nominal calibration (same weights).
        variations: calibrated MC probabilities per variation name (same jets and weights
            as ``mc_after``); the band is their quadrature sum per side around the nominal
            (:func:`coffea_otcal.closure.variation_band`, the covariance-propagated one-sigma
            band of independent eigen-directions).
        bins: regular bins on [0, 1].
        experiment: ``"CMS"``, ``"ATLAS"`` or None.
        text: label text.
        region: region name shown on the plot.
        extra: further MC curves (e.g. the reweighting baseline) as ``(probs, weights)``.

    Returns:
        The path written.
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    h_data, e_data = _normalised(discriminant_values(data[0], name, kappa), data[1], edges)
    h_before, _ = _normalised(discriminant_values(mc_before[0], name, kappa), mc_before[1], edges)
    h_after, e_after = _normalised(discriminant_values(mc_after[0], name, kappa), mc_after[1], edges)
    shapes = {v: _normalised(discriminant_values(p, name, kappa), mc_after[1], edges)[0]
              for v, p in (variations or {}).items()}
    down, up = variation_band(h_after, shapes)
    band_lo, band_hi = h_after - down, h_after + up
    with style_context(experiment) as plt:
        import mplhep

        fig, (ax, rax) = plt.subplots(
            2, 1, figsize=(8, 8), sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.05}
        )
        fig.subplots_adjust(left=0.2, right=0.96, top=0.93, bottom=0.1)
        mplhep.histplot(h_before, edges, ax=ax, label="MC (uncalibrated)", color="tab:blue", ls="--")
        mplhep.histplot(h_after, edges, ax=ax, label="MC (OT calibrated)", color="tab:red")
        for label, (probs, w) in (extra or {}).items():
            h_x, _ = _normalised(discriminant_values(probs, name, kappa), w, edges)
            mplhep.histplot(h_x, edges, ax=ax, label=label, color="tab:green", ls=":")
        if variations:
            ax.stairs(band_hi, edges, baseline=band_lo, fill=True, alpha=0.3, color="tab:red",
                      label="variations (quadrature sum)")
        ax.errorbar(centres, h_data, yerr=e_data, fmt="o", color="black", ms=4, label="data")
        ax.set_ylabel("fraction of jets")
        ax.set_yscale("log")
        ax.legend(fontsize="small")
        _label(ax, experiment, text, f"{region} {name}(k={kappa:g})".strip())
        with np.errstate(divide="ignore", invalid="ignore"):
            rax.errorbar(centres, h_data / h_after, yerr=e_data / h_after, fmt="o", color="black", ms=3)
            rax.plot(centres, h_before / h_after, drawstyle="steps-mid", color="tab:blue", ls="--")
            if variations:
                rax.fill_between(centres, band_lo / h_after, band_hi / h_after, step="mid",
                                 alpha=0.3, color="tab:red")
            rax.fill_between(centres, 1 - e_after / h_after, 1 + e_after / h_after, step="mid",
                             alpha=0.2, color="gray")
        rax.axhline(1.0, color="gray", lw=1)
        rax.set_ylim(0.5, 1.5)
        rax.set_ylabel("data / calib.")
        rax.set_xlabel(f"{name}($\\kappa$={kappa:g})")
        out = _save(fig, Path(path))
        plt.close(fig)
    return out


def _ternary(p: np.ndarray) -> np.ndarray:
    """Barycentric (b, c, light) -> plane: b at (0, 0), c at (1, 0), light at (1/2, sqrt(3)/2)."""
    return np.stack([p[:, 1] + 0.5 * p[:, 2], np.sqrt(3) / 2 * p[:, 2]], axis=-1)


def plot_map_arrows(
    path: str | Path,
    z_before: Mapping[str, np.ndarray],
    z_after: Mapping[str, np.ndarray],
    *,
    space: str = "ilr",
    max_arrows: int = 300,
    seed: int = 0,
    experiment: str | None = "CMS",
    text: str = "Simulation",
) -> Path:
    """Arrows from each jet's ILR point before to after the map (Kim & Yang Fig. 8 / 9).

    Arguments:
        path: output PNG.
        z_before: ILR coordinates per flavour name before calibration.
        z_after: the same jets after calibration.
        space: ``"ilr"`` (Fig. 8) or ``"simplex"`` (ternary view, Fig. 9).
        max_arrows: arrows drawn per flavour (a random subset).
        seed: subset seed.
        experiment: plot label style.
        text: label text.

    Returns:
        The path written.
    """
    if space not in ("ilr", "simplex"):
        msg = f"space must be 'ilr' or 'simplex', got {space!r}"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    colours = {"b": "tab:red", "c": "tab:green", "light": "tab:blue"}
    with style_context(experiment) as plt:
        fig, ax = plt.subplots(figsize=(7, 6.5))
        for i, (flav, zb) in enumerate(z_before.items()):
            za = z_after[flav]
            pick = rng.choice(len(zb), size=min(max_arrows, len(zb)), replace=False)
            a, b = zb[pick], za[pick]
            if space == "simplex":
                a, b = _ternary(geometry.ilr_inv(a)), _ternary(geometry.ilr_inv(b))
            ax.quiver(a[:, 0], a[:, 1], b[:, 0] - a[:, 0], b[:, 1] - a[:, 1], angles="xy",
                      scale_units="xy", scale=1, width=0.003, color=colours.get(flav, f"C{i}"),
                      label=f"{flav} jets", alpha=0.7)
        if space == "simplex":
            tri = np.array([[0, 0], [1, 0], [0.5, np.sqrt(3) / 2], [0, 0]])
            ax.plot(tri[:, 0], tri[:, 1], color="black", lw=1)
            for (x, y), lab in zip(tri[:3], ("b", "c", "light"), strict=True):
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(0, -12 if y == 0 else 6),
                            ha="center")
            ax.set_aspect("equal")
            ax.axis("off")
        else:
            ax.set_xlabel("ILR $z_1$ = ln($p_b/p_c$) / 1.414")
            ax.set_ylabel("ILR $z_2$ = 0.816 ln($(p_b p_c)^{1/2}/p_l$)")
        ax.legend(fontsize="small")
        _label(ax, experiment, text, "" if space == "simplex" else "OT map (ILR)")
        out = _save(fig, Path(path))
        plt.close(fig)
    return out
