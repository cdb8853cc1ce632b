r"""Latent-space calibration (Algren et al. 2025, "Mind the Gap"): per-flavour OT maps of a tagger latent.

A frozen tagger maps its inputs to a latent :math:`z \in \mathbb{R}^d` and a head maps
:math:`z` to the outputs. Simulation is calibrated to data by moving each MC latent with the
Brenier map of its truth flavour :math:`\omega` (Mind the Gap eq. 6, "we restrict omega to
the label"),

.. math:: (\hat T_\omega)_\# p_{\rm sim}(z \mid \omega) = p_{\rm data}(z \mid \omega),

and pushing the calibrated latent through the frozen head. In data the flavour is unknown;
two target modes are supported:

* ``"truth"``: the pseudo-data truth labels select the target jets (the paper's setting;
  for benchmarks with known truth only);
* ``"responsibility"``: every data jet enters the target of flavour :math:`f` with weight
  :math:`w_f = P(f \mid \text{tagger output, region fractions})`, e.g. the EM responsibilities
  of :meth:`coffea_otcal.em_result.EMResult.responsibilities` or
  :func:`tagger_responsibilities`.

**Principal subspace.** A latent that is a deterministic function of a few inputs lies near
a low-dimensional manifold of :math:`\mathbb{R}^d`. Each flavour's map acts in the
:math:`k` leading principal directions :math:`V \in \mathbb{R}^{d \times k}` (orthonormal
columns) of the pooled source and target latents around their mean :math:`c`, and is the
identity in the orthogonal complement:

.. math::
    T(z) = c + (I - V V^\top)(z - c) + V\, T_k\big(V^\top (z - c)\big),
    \qquad T_k = \nabla g_k \ \text{(ICNN, :func:`coffea_otcal.ot.fit_ot_map`)},

which is the gradient of the convex :math:`G(z) = g_k(V^\top (z-c)) + \tfrac12 \|(I - V
V^\top)(z - c)\|^2 + c\cdot z` (up to the isotropic standardisation of ``fit_ot_map``): a
rotation and truncation keep the Brenier property in the ORIGINAL latent coordinates
(a per-axis whitening would not, so none is applied). :func:`embed_subspace_map` writes
:math:`G` as an ordinary :math:`d`-dimensional ICNN export, so the bundle and the numpy
applier (:mod:`coffea_otcal.latent_apply`) see a plain map of the latent columns.

**Evaluation** (Mind the Gap Sec. 5, :mod:`coffea_otcal.latent_eval`, re-exported here):
:func:`latent_closure` trains discriminators to tell
source from target and calibrated from target at the latent :math:`z`, the penultimate
layer :math:`z'` and the outputs (ILR of the head probabilities, equivalent to the logits
up to their common offset), on held-out jets, and the shape chi2 of the output
discriminants (Kim & Yang eq. 62) with :func:`coffea_otcal.closure.shape_chi2`.
"""

from __future__ import annotations

__all__ = [
    "LatentCalibConfig",
    "LatentClosure",
    "LatentMaps",
    "TwoSampleResult",
    "embed_subspace_map",
    "fit_latent_maps",
    "latent_closure",
    "principal_subspace",
    "tagger_responsibilities",
    "two_sample_test",
]

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from coffea_otcal.bundle import Bundle
from coffea_otcal.kernels import FittedMap
from coffea_otcal.latent_eval import LatentClosure, TwoSampleResult, latent_closure, two_sample_test
from coffea_otcal.ot import OTConfig, fit_ot_map

logger = logging.getLogger(__name__)


def _default_ot() -> OTConfig:
    return OTConfig(hidden=(64, 64), steps=1500, batch_size=1024, eval_every=250, lr=5e-3)


class LatentCalibConfig(BaseModel):
    """Settings of :func:`fit_latent_maps` (validated; recorded in the bundle provenance)."""

    model_config = ConfigDict(extra="forbid")

    n_components: int | None = Field(
        default=32,
        ge=1,
        description="k: leading principal directions each map acts in (None or >= d: all)",
    )
    target_mode: Literal["truth", "responsibility"] = Field(
        default="truth",
        description="'truth': data truth labels select the targets (benchmarks only); "
        "'responsibility': per-jet flavour-probability weights",
    )
    flavour_codes: tuple[int, ...] = Field(
        default=(5, 4, 0), min_length=1, description="flavours with maps, in weight-column order"
    )
    min_responsibility: float = Field(
        default=1e-4,
        ge=0.0,
        lt=1.0,
        description="responsibility mode: data jets with a smaller weight are dropped",
    )
    ot: OTConfig = Field(default_factory=_default_ot, description="OT trainer settings")


def principal_subspace(
    source: np.ndarray,
    target: np.ndarray,
    n_components: int | None,
    source_weight: np.ndarray | None = None,
    target_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    r"""Leading principal directions of the pooled source and target samples.

    Both samples enter with equal total weight: :math:`\Sigma = \tfrac12(\Sigma_s + \Sigma_t)`
    around the pooled mean :math:`c = \tfrac12(\mu_s + \mu_t)`.

    Arguments:
        source: ``(n, d)`` source latents.
        target: ``(m, d)`` target latents.
        n_components: ``k`` (None or ``>= d``: all ``d`` directions).
        source_weight: optional ``(n,)`` weights (absolute values are used).
        target_weight: optional ``(m,)`` weights.

    Returns:
        ``(c (d,), V (d, k) with orthonormal columns, explained variance fraction)``.
    """

    def moments(x: np.ndarray, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        ww = np.ones(len(x)) if w is None else np.abs(np.asarray(w, dtype=np.float64))
        ww = ww / ww.sum()
        mean = ww @ x
        return mean, (x * ww[:, None]).T @ x - np.outer(mean, mean)

    ms, cs = moments(source, source_weight)
    mt, ct = moments(target, target_weight)
    center = 0.5 * (ms + mt)
    cov = 0.5 * (cs + ct) + 0.25 * np.outer(ms - mt, ms - mt)
    vals, vecs = np.linalg.eigh(0.5 * (cov + cov.T))
    vals, vecs = vals[::-1], vecs[:, ::-1]
    d = source.shape[1]
    k = d if n_components is None else min(int(n_components), d)
    explained = float(vals[:k].sum() / vals.sum()) if vals.sum() > 0 else 1.0
    return center, np.ascontiguousarray(vecs[:, :k]), explained


def embed_subspace_map(fitted: FittedMap, center: np.ndarray, components: np.ndarray) -> FittedMap:
    r"""Lift a map fitted in principal coordinates :math:`y = V^\top (z - c)` to the latent.

    With the ``k``-dimensional map :math:`T_k(y) = m_k + s\nabla g((y - m_k)/s)`, the lifted
    map is :math:`T(z) = m + s \nabla G((z - m)/s)` with :math:`m = c + V m_k` and
    :math:`G(x) = g(V^\top x) + \tfrac12 x^\top (I - V V^\top) x`, i.e. the exported ICNN
    parameters become :math:`A_i V^\top`, :math:`V a` and :math:`V M V^\top + I - V V^\top`
    (module docstring). ``G`` is convex, so the lifted map is a Brenier map in ``z``.

    Arguments:
        fitted: an unconditional (ICNN) map of dimension ``k``.
        center: ``c``, shape ``(d,)``.
        components: ``V``, shape ``(d, k)`` with orthonormal columns.

    Returns:
        The ``d``-dimensional :class:`~coffea_otcal.kernels.FittedMap`.

    Raises:
        ValueError: a conditional (PICNN) map, or shapes that do not match.
    """
    export = fitted.export()
    pot = export["potential"]
    if pot["kind"] != "icnn":
        msg = (
            f"map {fitted.name!r}: only unconditional ICNN maps can be lifted, got {pot['kind']!r}"
        )
        raise ValueError(msg)
    v = np.asarray(components, dtype=np.float64)
    c = np.asarray(center, dtype=np.float64)
    d, k = v.shape
    if k != fitted.dim or c.shape != (d,):
        msg = (
            f"map {fitted.name!r} has dimension {fitted.dim}; components {v.shape} and center "
            f"{c.shape} must be (d, {fitted.dim}) and (d,)"
        )
        raise ValueError(msg)
    params = dict(pot["params"])
    for key in list(params):
        if key.startswith("A") and key[1:].isdigit():
            params[key] = (np.asarray(params[key]) @ v.T).tolist()
    params["linear"] = (v @ np.asarray(params["linear"])).tolist()
    quad = np.asarray(params["quadratic"])
    full = v @ quad @ v.T + np.eye(d) - v @ v.T
    params["quadratic"] = (0.5 * (full + full.T)).tolist()
    pre = export["preprocessing"]
    shift = c + v @ np.asarray(pre["shift"])
    metrics = dict(export["metrics"])
    metrics["subspace"] = {"dim": d, "components": k}
    lifted = {
        **export,
        "potential": {**pot, "config": {**pot["config"], "dim": d}, "params": params},
        "preprocessing": {**pre, "shift": shift.tolist()},
        "metrics": metrics,
    }
    return FittedMap(lifted)


def tagger_responsibilities(
    probs: np.ndarray,
    fractions: Sequence[float] | np.ndarray,
    prior: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    r"""Flavour posteriors of jets from the tagger output and a region's flavour fractions.

    A tagger trained with class priors :math:`\rho_f` estimates :math:`p_f \propto \rho_f
    q_f(x)`; in a region with fractions :math:`\pi_f` Bayes' theorem gives
    :math:`w_f = \pi_f p_f / \rho_f \,/\, \sum_j \pi_j p_j / \rho_j` (the E-step of Kim &
    Yang eq. 17 with the tagger as the density ratio).

    Arguments:
        probs: ``(n, F)`` tagger probabilities.
        fractions: the region's fractions :math:`\pi` (F entries).
        prior: the training priors :math:`\rho` (default uniform).

    Returns:
        ``(n, F)`` responsibilities, rows summing to one.
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)
    pi = np.asarray(fractions, dtype=np.float64)
    rho = np.full(p.shape[1], 1.0 / p.shape[1]) if prior is None else np.asarray(prior, float)
    if pi.shape != (p.shape[1],) or rho.shape != (p.shape[1],) or np.any(pi < 0) or pi.sum() <= 0:
        msg = (
            f"fractions {pi.tolist()} and prior {rho.tolist()} need {p.shape[1]} non-negative "
            f"entries (one per class of probs {p.shape})"
        )
        raise ValueError(msg)
    joint = p * (pi / rho)
    return joint / joint.sum(axis=1, keepdims=True)


@dataclass
class LatentMaps:
    """Fitted latent maps, one per flavour code, and how they were made.

    Attributes:
        maps: flavour code -> ``d``-dimensional :class:`~coffea_otcal.kernels.FittedMap`.
        columns: latent Jet field names in coordinate order (``latent_0`` ...).
        config: the :class:`LatentCalibConfig` used.
        metrics: per flavour label -> training metrics (sizes, time, explained variance).
    """

    maps: dict[int, FittedMap]
    columns: list[str]
    config: LatentCalibConfig
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)

    def transport(self, latent: np.ndarray, flavour: np.ndarray) -> np.ndarray:
        """Move each latent row with its flavour's map; other flavours stay unchanged."""
        z = np.asarray(latent, dtype=np.float64)
        flav = np.asarray(flavour).astype(np.int64)
        out = z.copy()
        for code, fmap in self.maps.items():
            sel = flav == code
            if sel.any():
                out[sel] = fmap.transport(z[sel])
        return out

    def to_bundle(
        self,
        classes: Sequence[str] = ("b", "c", "light"),
        adapter: str | Mapping[str, Any] = "deepjet",
        provenance: Mapping[str, Any] | None = None,
        flavour_column: str = "hadronFlavour",
    ) -> Bundle:
        """A bundle with ``coordinates.kind == "latent"`` (apply with ``LatentCalibrator``).

        Arguments:
            classes: the head's output classes in order.
            adapter: the tagger adapter that writes the head outputs as tagger columns.
            provenance: extra provenance (seed, inputs, command, ...).
            flavour_column: the Jet truth-flavour field.

        Returns:
            The validated bundle (no integrity hash until saved).
        """
        prov = dict(provenance or {})
        prov.setdefault("config", {"latent": self.config.model_dump(mode="json")})
        prov.setdefault(
            "metrics",
            {
                f"{label}_{key}": float(val)
                for label, met in self.metrics.items()
                for key, val in met.items()
                if isinstance(val, int | float)
            },
        )
        return Bundle.from_maps(
            {(code, "nominal"): m.export() for code, m in self.maps.items()},
            classes=classes,
            adapter=adapter,
            provenance=prov,
            flavour_column=flavour_column,
            coordinates={"kind": "latent", "columns": list(self.columns)},
        )


def _flavour_label(code: int) -> str:
    return {5: "b", 4: "c", 0: "light", 15: "tau"}.get(int(code), f"f{code}")


def fit_latent_maps(
    mc_latent: np.ndarray,
    mc_flavour: np.ndarray,
    data_latent: np.ndarray,
    *,
    data_flavour: np.ndarray | None = None,
    data_flavour_weights: np.ndarray | None = None,
    mc_weight: np.ndarray | None = None,
    data_weight: np.ndarray | None = None,
    columns: Sequence[str] | None = None,
    config: LatentCalibConfig | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> LatentMaps:
    r"""Fit one latent Brenier map per flavour (Mind the Gap eq. 6-7; module docstring).

    Arguments:
        mc_latent: ``(n, d)`` MC latents.
        mc_flavour: ``(n,)`` MC truth flavour codes (``hadronFlavour``).
        data_latent: ``(m, d)`` (pseudo-)data latents.
        data_flavour: ``(m,)`` data truth codes (``target_mode="truth"`` only).
        data_flavour_weights: ``(m, F)`` per-jet flavour probabilities, columns in
            ``config.flavour_codes`` order (``target_mode="responsibility"``).
        mc_weight: optional ``(n,)`` MC event weights.
        data_weight: optional ``(m,)`` data weights (e.g. prescales).
        columns: latent field names (default ``latent_0 .. latent_{d-1}``).
        config: a :class:`LatentCalibConfig`.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        seed: seed of every map (flavour ``j`` uses ``seed + j``).
        progress: show the trainers' progress bars.

    Returns:
        The :class:`LatentMaps`.

    Raises:
        ValueError: shapes that do not match, or the labels / weights the mode needs missing.
    """
    cfg = config or LatentCalibConfig()
    x = np.asarray(mc_latent, dtype=np.float64)
    y = np.asarray(data_latent, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        msg = f"mc_latent {x.shape} and data_latent {y.shape} must be (n, d) with the same d"
        raise ValueError(msg)
    d = x.shape[1]
    cols = list(columns) if columns is not None else [f"latent_{i}" for i in range(d)]
    if len(cols) != d:
        msg = f"{len(cols)} column names given for latents of dimension {d}"
        raise ValueError(msg)
    flav = np.asarray(mc_flavour).astype(np.int64)
    if flav.shape != (len(x),):
        msg = f"mc_flavour has shape {flav.shape}, expected ({len(x)},)"
        raise ValueError(msg)
    wx = np.ones(len(x)) if mc_weight is None else np.asarray(mc_weight, dtype=np.float64)
    wy = np.ones(len(y)) if data_weight is None else np.asarray(data_weight, dtype=np.float64)
    if cfg.target_mode == "truth":
        if data_flavour is None:
            msg = "target_mode='truth' needs data_flavour (pseudo-data truth codes)"
            raise ValueError(msg)
        yflav = np.asarray(data_flavour).astype(np.int64)
        if yflav.shape != (len(y),):
            msg = f"data_flavour has shape {yflav.shape}, expected ({len(y)},)"
            raise ValueError(msg)
        resp = np.stack([(yflav == c).astype(np.float64) for c in cfg.flavour_codes], axis=1)
    else:
        if data_flavour_weights is None:
            msg = (
                "target_mode='responsibility' needs data_flavour_weights (n_data, F), e.g. "
                "EMResult.responsibilities(region) or tagger_responsibilities(...)"
            )
            raise ValueError(msg)
        resp = np.asarray(data_flavour_weights, dtype=np.float64)
        if resp.shape != (len(y), len(cfg.flavour_codes)):
            msg = (
                f"data_flavour_weights has shape {resp.shape}, expected ({len(y)}, "
                f"{len(cfg.flavour_codes)}) with columns in flavour order {cfg.flavour_codes}"
            )
            raise ValueError(msg)
    maps: dict[int, FittedMap] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for j, code in enumerate(cfg.flavour_codes):
        label = _flavour_label(code)
        start = time.perf_counter()
        src_sel = flav == code
        tgt_w = wy * resp[:, j]
        tgt_sel = tgt_w > (cfg.min_responsibility if cfg.target_mode == "responsibility" else 0)
        xs, ws, yt, wt = x[src_sel], wx[src_sel], y[tgt_sel], tgt_w[tgt_sel]
        center, comps, explained = principal_subspace(xs, yt, cfg.n_components, ws, wt)
        fitted = fit_ot_map(
            (xs - center) @ comps,
            (yt - center) @ comps,
            source_weight=ws,
            target_weight=wt,
            config=cfg.ot,
            device=device,
            seed=seed + j,
            progress=progress,
            name=label,
        )
        maps[int(code)] = embed_subspace_map(fitted, center, comps)
        metrics[label] = {
            "n_source": int(src_sel.sum()),
            "n_target": int(tgt_sel.sum()),
            "target_effective": float(wt.sum() ** 2 / np.sum(wt**2)),
            "components": int(comps.shape[1]),
            "explained_variance": explained,
            "wall_time_s": time.perf_counter() - start,
            "best_step": int(fitted.metrics.get("best_step", -1)),
            "device": str(fitted.metrics.get("device", device)),
        }
        logger.info("latent map %s: %s", label, metrics[label])
    return LatentMaps(maps=maps, columns=cols, config=cfg, metrics=metrics)
