"""Named up/down variations of the extracted densities and the OT targets built from them."""

from __future__ import annotations

__all__ = [
    "TARGETS_SCHEMA_VERSION",
    "FlavourTarget",
    "Targets",
    "TargetsMeta",
    "VariationInfo",
    "build_targets",
    "make_variations",
    "variation_weights",
]

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from coffea_otcal.em_diagnostics import EMDiagnostics, logit_jacobian, proxy_delta_log_q
from coffea_otcal.em_result import (
    EMResult,
    RegionData,
    atomic_savez,
    load_npz_with_meta,
    writer_info,
)

logger = logging.getLogger(__name__)

TARGETS_SCHEMA_VERSION = 1


class VariationInfo(BaseModel):
    """One named up/down variation of the extracted densities (Kim & Yang eq. 49, 57, 61)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="stable identifier, em_stable_<i> or em_prior_<i>")
    kind: Literal["stable", "prior"] = Field(
        description="stable: data-constrained channel of G V0 G^T; prior: prior-dominated"
    )
    index: int = Field(ge=1, description="rank by variance within its kind (1 = largest)")
    sigma: float = Field(ge=0, description="1-sigma length of the logit shift |delta a|")
    meaning: str = Field(description="human-readable description of the shift")
    delta_logits: list[float] = Field(description="delta a (up), region-major free logits")
    delta_fractions: list[list[float]] = Field(description="delta pi = J delta a, (R, F)")


def _describe(
    kind: str, index: int, dpi: np.ndarray, regions: Sequence[str], classes: Sequence[str]
) -> str:
    flat = [(abs(dpi[r, f]), r, f) for r in range(dpi.shape[0]) for f in range(dpi.shape[1])]
    flat.sort(reverse=True)
    parts = [f"pi[{regions[r]}, {classes[f]}] {dpi[r, f]:+.4f}" for _, r, f in flat[:3] if _ > 1e-6]
    origin = (
        "data-constrained eigen-direction of P_st G V0 G^T P_st"
        if kind == "stable"
        else "prior-dominated eigen-direction of P_pr V_prior P_pr"
    )
    return f"{origin} #{index} (Kim & Yang eq. 61); Up shifts " + ", ".join(parts)


def make_variations(diagnostics: EMDiagnostics, rel_cut: float = 1e-6) -> list[VariationInfo]:
    r"""Eigen-directions of the effective covariance (eq. 61) as named variations.

    The two terms of :math:`V_a^{eff}` live on orthogonal subspaces (:math:`P_{st}`,
    :math:`P_{pr}`), so each is diagonalised separately: every eigenpair
    :math:`(\lambda, e)` gives :math:`\delta a = \sqrt\lambda\, e` (sign fixed so the
    largest component is positive), :math:`\delta\pi = J \delta a` (eq. 52) and, through
    eq. 49, :math:`\delta\log q_f(x)`; "Up" applies :math:`+\delta a`, "Down"
    :math:`-\delta a`. Names are ``em_stable_<i>`` and ``em_prior_<i>``, ranked by
    variance; directions with variance below ``rel_cut`` times the largest are dropped.
    """
    g, v0 = diagnostics.g, diagnostics.v_stat
    p_st, p_pr = diagnostics.p_stable, diagnostics.p_prior
    terms = {
        "stable": p_st @ g @ v0 @ g.T @ p_st,
        "prior": p_pr @ diagnostics.v_prior @ p_pr,
    }
    jac = logit_jacobian(diagnostics.fractions)
    shape = diagnostics.fractions.shape
    lam_max = max(float(np.linalg.eigvalsh(0.5 * (t + t.T)).max()) for t in terms.values())
    out: list[VariationInfo] = []
    for kind, term in terms.items():
        lam, vec = np.linalg.eigh(0.5 * (term + term.T))
        order = np.argsort(-lam)
        index = 0
        for i in order:
            if lam[i] <= rel_cut * max(lam_max, 1e-300):
                continue
            index += 1
            e = vec[:, i]
            e = e * np.sign(e[np.argmax(np.abs(e))])
            da = np.sqrt(lam[i]) * e
            dpi = (jac @ da).reshape(shape)
            out.append(
                VariationInfo(
                    name=f"em_{kind}_{index}",
                    kind=kind,  # type: ignore[arg-type]
                    index=index,
                    sigma=float(np.sqrt(lam[i])),
                    meaning=_describe(kind, index, dpi, diagnostics.regions, diagnostics.classes),
                    delta_logits=da.tolist(),
                    delta_fractions=dpi.tolist(),
                )
            )
    return out


def variation_weights(
    log_q: np.ndarray,
    flavour: int,
    variations: Sequence[VariationInfo],
    enriched: Sequence[int],
    base_weight: np.ndarray | None = None,
    max_abs_log: float = 2.0,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    r"""Per-sample weights :math:`w^\pm = w\,\exp(\pm\delta\log q_f(y))` of each variation.

    :math:`\delta\log q_f` is the linear proxy of eq. 49; it is clipped to
    ``+-max_abs_log`` (the proxy is first order, and the ratio :math:`q_h/q_f` can be
    huge where :math:`q_f` is tiny), then each weight vector is normalised to the total
    of ``base_weight``. Returns the weights and the fraction of clipped samples.
    """
    base = np.ones(len(log_q)) if base_weight is None else np.asarray(base_weight, np.float64)
    total = base.sum()
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    clipped = 0
    for var in variations:
        dlog = proxy_delta_log_q(log_q, np.asarray(var.delta_fractions), list(enriched))[:, flavour]
        clipped += int((np.abs(dlog) > max_abs_log).sum())
        dlog = np.clip(dlog, -max_abs_log, max_abs_log)
        pair = []
        for sign in (1.0, -1.0):
            w = base * np.exp(sign * dlog)
            pair.append(w * (total / w.sum()))
        out[var.name] = (pair[0], pair[1])
    frac = clipped / max(1, len(log_q) * max(1, len(variations)))
    return out, frac


class TargetsMeta(BaseModel):
    """Metadata of a targets file."""

    model_config = ConfigDict(extra="forbid")

    schema_name: Literal["coffea-otcal-targets"] = "coffea-otcal-targets"
    schema_version: Literal[1] = 1
    classes: list[str] = Field(description="flavour class order")
    flavour_codes: list[int] = Field(description="truth flavour code of each class")
    method: Literal["flow", "responsibility"] = Field(description="how targets were built")
    n_context: int = Field(ge=0, description="context features (0: unconditional)")
    variations: list[VariationInfo] = Field(description="variations, in file order")
    fractions: list[list[float]] = Field(description="fitted composition matrix")
    regions: list[str] = Field(description="data control regions")
    clipped_fraction: dict[str, float] = Field(
        description="per flavour, share of clipped delta log q"
    )
    seed: int = Field(description="seed of the target sampling")
    writer_info: dict[str, str] = Field(description="package versions")


@dataclass
class FlavourTarget:
    """Source (MC of this flavour) and target (extracted data density) of one OT problem."""

    flavour: str
    source_x: np.ndarray
    source_context: np.ndarray | None
    source_weight: np.ndarray
    target_y: np.ndarray
    target_context: np.ndarray | None
    target_weight: np.ndarray
    variation_weights: dict[str, tuple[np.ndarray, np.ndarray]]

    def target(
        self, variation: str | None = None, direction: Literal["up", "down"] = "up"
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """``(y, context, weight)`` of the nominal target or of one variation."""
        if variation is None:
            return self.target_y, self.target_context, self.target_weight
        if variation not in self.variation_weights:
            msg = f"unknown variation {variation!r}; available: {sorted(self.variation_weights)}"
            raise KeyError(msg)
        pair = self.variation_weights[variation]
        return self.target_y, self.target_context, pair[0] if direction == "up" else pair[1]


@dataclass
class Targets:
    """Per-flavour OT inputs: MC source, nominal target and weighted variation targets."""

    meta: TargetsMeta
    flavours: dict[str, FlavourTarget]

    def variation_names(self) -> list[str]:
        """Names of the variations (each has ``Up`` and ``Down``)."""
        return [v.name for v in self.meta.variations]

    def tables(
        self, variation: str | None = None, direction: Literal["up", "down"] = "up"
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Flat ``(source, target)`` column tables for ``coffea-otcal train``.

        Columns: ``z1 .. z{D-1}`` (ILR), ``c1 .. c{k}`` (context), ``weight`` and
        ``flavour`` (the truth code of each flavour's map), all flavours stacked.
        """
        codes = dict(zip(self.meta.classes, self.meta.flavour_codes, strict=True))
        out = []
        for side in ("source", "target"):
            xs, cs, ws, fs = [], [], [], []
            for name, t in self.flavours.items():
                if side == "source":
                    x, c, w = t.source_x, t.source_context, t.source_weight
                else:
                    x, c, w = t.target(variation, direction)
                xs.append(x)
                ws.append(w)
                fs.append(np.full(len(x), codes[name]))
                if c is not None:
                    cs.append(c)
            x = np.concatenate(xs)
            table = {f"z{k + 1}": x[:, k] for k in range(x.shape[1])}
            if cs:
                c = np.concatenate(cs)
                table.update({f"c{k + 1}": c[:, k] for k in range(c.shape[1])})
            table["weight"] = np.concatenate(ws)
            table["flavour"] = np.concatenate(fs)
            out.append(table)
        return out[0], out[1]

    def write_tables(self, outdir: str | os.PathLike[str]) -> list[Path]:
        """Write ``source.npz``, ``target.npz`` and ``target_<name>Up/Down.npz`` tables."""
        outdir = Path(outdir)
        source, target = self.tables()
        paths = [outdir / "source.npz", outdir / "target.npz"]
        atomic_savez(paths[0], source)
        atomic_savez(paths[1], target)
        for name in self.variation_names():
            for direction, tag in (("up", "Up"), ("down", "Down")):
                _, t = self.tables(name, direction)  # type: ignore[arg-type]
                path = outdir / f"target_{name}{tag}.npz"
                atomic_savez(path, t)
                paths.append(path)
        return paths

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write an ``.npz`` (arrays + validated JSON metadata, no pickle), atomically."""
        arrays: dict[str, np.ndarray] = {"meta": np.array(self.meta.model_dump_json())}
        for name, t in self.flavours.items():
            arrays[f"{name}/source_x"] = t.source_x
            arrays[f"{name}/source_weight"] = t.source_weight
            arrays[f"{name}/target_y"] = t.target_y
            arrays[f"{name}/target_weight"] = t.target_weight
            if t.source_context is not None:
                arrays[f"{name}/source_context"] = t.source_context
            if t.target_context is not None:
                arrays[f"{name}/target_context"] = t.target_context
            for var, (up, down) in t.variation_weights.items():
                arrays[f"{name}/var/{var}/up"] = up
                arrays[f"{name}/var/{var}/down"] = down
        path = Path(path)
        atomic_savez(path, arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Targets:
        """Read a file written by :meth:`save`; refuses other schemas and versions."""
        path = Path(path)
        arrays, raw = load_npz_with_meta(path, "a coffea-otcal targets file")
        if raw.get("schema_version") != TARGETS_SCHEMA_VERSION:
            msg = (
                f"{path}: targets schema_version {raw.get('schema_version')!r} is not "
                f"{TARGETS_SCHEMA_VERSION}; rerun `coffea-otcal em` with this version"
            )
            raise ValueError(msg)
        meta = TargetsMeta.model_validate(raw)
        flavours = {}
        for name in meta.classes:
            var = {
                v.name: (arrays[f"{name}/var/{v.name}/up"], arrays[f"{name}/var/{v.name}/down"])
                for v in meta.variations
            }
            flavours[name] = FlavourTarget(
                flavour=name,
                source_x=arrays[f"{name}/source_x"],
                source_context=arrays.get(f"{name}/source_context"),
                source_weight=arrays[f"{name}/source_weight"],
                target_y=arrays[f"{name}/target_y"],
                target_context=arrays.get(f"{name}/target_context"),
                target_weight=arrays[f"{name}/target_weight"],
                variation_weights=var,
            )
        return cls(meta=meta, flavours=flavours)


def build_targets(
    result: EMResult,
    mc: Mapping[str, RegionData],
    variations: Sequence[VariationInfo] = (),
    method: Literal["flow", "responsibility"] = "flow",
    samples_per_source: int = 1,
    seed: int = 0,
    max_abs_log: float = 2.0,
) -> Targets:
    r"""Build per-flavour OT sources and targets from an EM fit.

    ``method="flow"`` (default): the nominal target of flavour :math:`f` is a sample
    :math:`y_i \sim \hat q_f(\cdot \mid c_i)` drawn at the contexts :math:`c_i` of the MC
    source jets of that flavour (``samples_per_source`` per jet, carrying the source
    weight), so source and target share their kinematic distribution and the conditional
    OT problem is well posed; without context, as many unit-weight samples as source jets.
    The fitted flow is the extracted density itself — it pools all regions with the
    responsibilities, is free of the other flavours' contamination that responsibility
    weights carry where classes overlap, and gives any sample size.
    ``method="responsibility"``: the pooled data jets with weights :math:`w_i\gamma_{r,i,f}`
    (eq. 17), no sampling noise but only as many points as data jets and no pairing of
    contexts.

    Every variation re-weights the same target points by
    :math:`\exp(\pm\delta\log q_f(y))` (eq. 49 with :math:`\delta\pi = J\delta a`), see
    :func:`variation_weights`.
    """
    classes = result.classes
    codes = result.config.flavour_codes
    enriched = [result.regions.index(r) for r in result.enriched]
    n_ctx = result.flows.n_context
    flav = {}
    clipped = {}
    for i, name in enumerate(classes):
        xs, cs, ws = [], [], []
        for region, d in mc.items():
            if d.flavour is None:
                msg = f"MC region {region!r} has no flavour labels; the OT source needs them"
                raise ValueError(msg)
            sel = np.asarray(d.flavour) == codes[i]
            xs.append(np.asarray(d.x, dtype=np.float64)[sel])
            ws.append(np.ones(int(sel.sum())) if d.weight is None else np.asarray(d.weight)[sel])
            if n_ctx:
                if d.context is None:
                    msg = f"MC region {region!r} has no context but the flows are conditional"
                    raise ValueError(msg)
                cs.append(np.asarray(d.context, dtype=np.float64).reshape(len(d.x), -1)[sel])
        src_x = np.concatenate(xs)
        if len(src_x) == 0:
            msg = f"flavour {name!r} has no MC jets; no OT source can be built"
            raise ValueError(msg)
        src_w = np.concatenate(ws).astype(np.float64)
        src_c = np.concatenate(cs) if n_ctx else None
        if method == "flow":
            if n_ctx:
                tgt_c = np.repeat(np.asarray(src_c), samples_per_source, axis=0)
                tgt_w = np.repeat(src_w, samples_per_source) / samples_per_source
                y = result.flows.sample(i, context=tgt_c, seed=seed + 7919 * i)
            else:
                tgt_c = None
                n = len(src_x) * samples_per_source
                tgt_w = np.full(n, src_w.sum() / n)
                y = result.flows.sample(i, n=n, seed=seed + 7919 * i)
        elif method == "responsibility":
            ys, tcs, tws = [], [], []
            for region in result.regions:
                d = result.data[region]
                ys.append(d.x)
                tws.append(d.weight_array * result.responsibilities(region)[:, i])
                if n_ctx:
                    tcs.append(np.asarray(d.context))
            y = np.concatenate(ys)
            tgt_w = np.concatenate(tws)
            tgt_c = np.concatenate(tcs) if n_ctx else None
        else:
            msg = f"unknown target method {method!r}; use 'flow' or 'responsibility'"
            raise ValueError(msg)
        log_q = result.log_prob(y, tgt_c)
        weights, clipped[name] = variation_weights(
            log_q, i, variations, enriched, tgt_w, max_abs_log
        )
        flav[name] = FlavourTarget(
            flavour=name,
            source_x=src_x,
            source_context=src_c,
            source_weight=src_w,
            target_y=y,
            target_context=tgt_c,
            target_weight=tgt_w,
            variation_weights=weights,
        )
    meta = TargetsMeta(
        classes=list(classes),
        flavour_codes=list(codes),
        method=method,
        n_context=n_ctx,
        variations=list(variations),
        fractions=result.fractions.tolist(),
        regions=list(result.regions),
        clipped_fraction=clipped,
        seed=seed,
        writer_info=writer_info(),
    )
    return Targets(meta=meta, flavours=flav)
