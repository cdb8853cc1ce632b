"""EM extraction of flavour-conditional data densities with a Gaussian logit prior."""

from __future__ import annotations

__all__ = [
    "CompositionWarning",
    "EMConfig",
    "EMResult",
    "FinalFitConfig",
    "RegionData",
    "check_composition",
    "final_fit",
    "final_fit_candidate",
    "fit_em",
    "fractions_from_logits",
    "logits_from_fractions",
    "mixture_nll",
    "prior_logit_covariance",
]

import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from coffea_otcal.atomic import atomic_path
from coffea_otcal.em_prior import (
    CompositionWarning,
    check_composition,
    check_region,
    flavour_index,
    initial_logits,
    map_logits,
    prior_fractions,
    prior_logit_covariance,
)
from coffea_otcal.em_result import (
    EMResult,
    RegionData,
    fractions_from_logits,
    logits_from_fractions,
    responsibilities,
)
from coffea_otcal.flows import FlowConfig

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "em_checkpoint.pt"


class FinalFitConfig(BaseModel):
    r"""A last M-step for the flows on the converged responsibilities (``EMConfig.final_fit``).

    After the iterations stop, fresh flows (``bins`` spline bins, the EM's standardisation
    and other hyper-parameters) are fitted for ``steps`` Adam steps per flavour to the
    pooled responsibility-weighted likelihood of eq. 23, with the responsibilities of
    eq. 17 held at their converged values and the fractions unchanged (their M-step of
    eq. 22 is already solved for those responsibilities); the learning rate follows a
    cosine from ``FlowConfig.learning_rate`` to ``final_learning_rate``; with
    ``candidates`` > 1 the flows are fitted from that many seeds and the set of lowest NLL
    (eq. 23) is kept. It separates the
    two roles a flow's capacity plays: during the iterations a flexible flow lets the
    fractions slide along the weakly constrained direction (Kim & Yang Sec. VIII.1), so
    the EM iterates with the modest ``EMConfig.flow``; once the responsibilities are fixed
    a flexible flow can only describe them better. Measured on Kim & Yang's Table 1
    (docs/em.md, "A final fit with frozen responsibilities"): the flows then fit their
    targets better (b z2: chi2/ndf 1.7-2.4 -> 1.3-1.8), but the extracted densities come no
    nearer the true ones, whose distance is set by the targets (the fitted fractions), so
    it is off by default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(default=6000, ge=1, description="Adam steps per flavour flow")
    bins: int | None = Field(
        default=24, ge=2,
        description="spline bins of the refitted flows (None: EMConfig.flow.bins)",
    )
    final_learning_rate: float = Field(
        default=1e-4, gt=0, description="end of the cosine learning-rate schedule"
    )
    candidates: int = Field(
        default=1, ge=1,
        description="fits from different seeds; the one of lowest NLL per event (eq. 23) is kept",
    )


class EMConfig(BaseModel):
    """Settings of the EM fit (Kim & Yang Sec. III.1 and VII); defaults follow the paper."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    classes: tuple[str, ...] = Field(default=("b", "c", "light"), description="flavour class order")
    flavour_codes: tuple[int, ...] = Field(
        default=(5, 4, 0), description="truth flavour code of each class (NanoAOD hadronFlavour)"
    )
    flow: FlowConfig = Field(default_factory=FlowConfig, description="component flows")
    prior_fractions: dict[str, tuple[float, ...]] | None = Field(
        default=None,
        description="prior centre pi^0_r per region (class order); default: the weighted MC "
        "flavour composition of the region with the same name",
    )
    prior_width: float = Field(
        default=0.3,
        gt=0,
        description="Gaussian prior width on each background-to-signal log-ratio "
        "log(pi_f'/pi_f) in the region enriched in f (paper: 0.3)",
    )
    region_prior_widths: dict[str, float] | None = Field(
        default=None, description="per-region override of prior_width"
    )
    enriched_regions: dict[str, str] | None = Field(
        default=None,
        description="flavour -> region enriched in it (r_j of eq. 49); default: the region "
        "with the largest prior fraction of that flavour",
    )
    init_perturbation: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="max relative change of each initial fraction (paper 20 %)",
    )
    max_iterations: int = Field(default=25, ge=1, description="maximum EM iterations")
    min_iterations: int = Field(default=4, ge=1, description="minimum EM iterations")
    shape_warmup: int = Field(
        default=0,
        ge=0,
        description=(
            "first iterations that update only the flows, with the fractions held at their "
            "initial values (the densities adapt to data before the fractions may move)"
        ),
    )
    m_steps: int = Field(
        default=200,
        ge=1,
        description=(
            "Adam steps per flavour flow in each M-step (200 with the 0.9 decay: the flows "
            "finish adapting before the fractions move; shorter M-steps let the fit slide "
            "along its weakly constrained direction and close worse, docs/em.md 'Where the EM "
            "stops' and 'Longer M-steps')"
        ),
    )
    restarts: int = Field(
        default=1,
        ge=1,
        description=(
            "independent EM fits from different seeds (flow initialisation and MC "
            "pretraining, initial fractions, minibatch streams); the fit of highest "
            "posterior (lowest final NLL + prior per event) is returned and every restart "
            "is recorded (docs/em.md, 'Restarts')"
        ),
    )
    learning_rate_decay: float = Field(
        default=0.9, gt=0, le=1, description="per-iteration decay of the M-step learning rate"
    )
    min_learning_rate: float = Field(default=1e-4, gt=0, description="floor of the decayed rate")
    tol_nll: float = Field(default=1e-3, gt=0, description="convergence: |delta NLL| per event")
    tol_logit: float = Field(default=1e-2, gt=0, description="convergence: max |delta a|")
    patience: int = Field(default=2, ge=1, description="consecutive converged iterations required")
    min_fraction: float = Field(
        default=1e-4, gt=0, lt=0.5, description="floor for prior fractions that are zero in the MC"
    )
    condition_warn: float = Field(
        default=10.0,
        gt=1,
        description="warn when the prior composition matrix's kappa exceeds this",
    )
    condition_error: float = Field(
        default=1e6, gt=1, description="refuse composition matrices with kappa above this"
    )
    final_fit: FinalFitConfig | None = Field(
        default=None,
        description=(
            "refit the flows on the converged responsibilities with more capacity, e.g. "
            "{bins: 24, steps: 6000}: the flows fit their EM targets better, but on Table 1 "
            "the extracted densities came no nearer the truth (docs/em.md, 'A final fit'); "
            "null (default): the EM's own flows are the result"
        ),
    )


def _fingerprint(
    config: EMConfig, seed: int, data: Mapping[str, RegionData], mc: Mapping[str, RegionData]
) -> str:
    # stopping rules may change on resume (e.g. more iterations); everything else may not
    # (the number of restarts does not change any one restart's trajectory either)
    stopping = {"max_iterations", "min_iterations", "tol_nll", "tol_logit", "patience",
                "restarts", "final_fit"}
    h = hashlib.sha256(config.model_dump_json(exclude=stopping).encode())
    h.update(str(seed).encode())
    for kind, regions in (("data", data), ("mc", mc)):
        for name in sorted(regions):
            d = regions[name]
            h.update(f"{kind}/{name}/{d.x.shape}".encode())
            h.update(np.ascontiguousarray(d.x).tobytes())
            h.update(np.ascontiguousarray(d.weight).tobytes())
            if d.context is not None:
                h.update(np.ascontiguousarray(d.context).tobytes())
    return h.hexdigest()


def fit_em(
    data_regions: Mapping[str, RegionData],
    mc: Mapping[str, RegionData],
    config: EMConfig | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
) -> EMResult:
    r"""Extract flavour-conditional data densities by EM (Kim & Yang Sec. III.1).

    1. Pretrain one flow :math:`q_f^{MC}` per flavour on the labelled MC pooled over
       regions (Sec. VII).
    2. Start from mixture fractions drawn within ``init_perturbation`` (relative) of the
       prior centre :math:`\pi^0_r` (the MC composition of region :math:`r`).
    3. Iterate: the E-step computes the responsibilities of eq. 17; the M-step maximises
       eq. 23 — the logits :math:`a_r` (eq. 19-20) exactly by Newton's method with the
       Gaussian prior of eq. 21, and the flows :math:`\theta_f` by ``m_steps`` Adam steps
       on the pooled responsibility-weighted likelihood (a generalised EM step, which
       still increases eq. 23). Event weights multiply every term; per region they are
       rescaled to the Kish effective sample size so the prior is balanced against the
       real statistical power.
    4. Stop when the NLL per event changes by less than ``tol_nll`` and the logits by
       less than ``tol_logit`` for ``patience`` iterations (after ``min_iterations``).
    5. Restarts: steps 1-4 run ``config.restarts`` times, independently (the first with
       ``seed`` itself, the others with seeds derived from ``(seed, k)``; restarts that
       shared the pretrained flows all ended at the same fractions on the demo's sample,
       so each restart pretrains its own), and the fit of highest posterior is returned:
       the lowest final objective, NLL per event plus the prior term of eq. 21 (the MAP
       of eq. 22-23). Every restart is recorded in :attr:`EMResult.restarts`; restart
       ``k >= 1`` checkpoints to ``checkpoint_dir/restart_<k>``. With one restart this is
       exactly one fit. The fits end in different local optima along the weakly
       constrained direction of the mixture (Sec. VIII.1); on the demo's sample the fit
       of lowest final objective closed best (docs/em.md, "Restarts").

    Arguments:
        data_regions: unlabelled data per control region.
        mc: labelled MC per region (regions named like the data give the prior centre).
        config: EM settings.
        device: torch device, ``"auto"`` picks CUDA when present.
        seed: seed of the initial perturbation, the minibatches and the flow weights.
        progress: show progress bars.
        checkpoint_dir: write ``em_checkpoint.pt`` there after every iteration and resume
            from it when it exists and matches these inputs.
        threads: flavour flows trained side by side in each M-step and in pretraining
            (:func:`coffea_otcal.flows.train_components`; ``None``: one per flavour, at
            most one per CPU plus one). The result does not depend on it.

    Returns:
        The fit (:class:`EMResult`).

    Raises:
        ValueError: empty region, NaN inputs, weights summing to <= 0, a flavour absent
            from the MC, a singular composition matrix.
    """
    config = config or EMConfig()
    runs: list[EMResult] = []
    for k in range(config.restarts):
        seed_k = seed if k == 0 else int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
        ckpt = checkpoint_dir
        if checkpoint_dir is not None and k > 0:
            ckpt = Path(checkpoint_dir) / f"restart_{k}"
        runs.append(_fit_em_once(
            data_regions, mc, config, device=device, seed=seed_k, progress=progress,
            checkpoint_dir=ckpt, threads=threads,
        ))
        logger.info("EM restart %d (seed %d): objective %.6f per event", k, seed_k,
                    runs[-1].trace[-1]["objective"])
    best = min(range(len(runs)), key=lambda k: runs[k].trace[-1]["objective"])
    result = runs[best]
    result.restarts = [
        {"restart": k, "seed": int(r.seed), "objective": float(r.trace[-1]["objective"]),
         "nll": float(r.trace[-1]["nll"]), "fractions": r.fractions.tolist(),
         "converged": bool(r.converged), "n_iterations": int(r.n_iterations),
         "selected": k == best}
        for k, r in enumerate(runs)
    ]
    if len(runs) > 1:
        logger.info("EM: restart %d of %d selected (objective %.6f; others %s)", best,
                    len(runs), result.trace[-1]["objective"],
                    [round(r.trace[-1]["objective"], 6) for r in runs])
    if config.final_fit is not None:
        final_fit(result, config.final_fit, threads=threads, progress=progress)
    return result


def final_fit(result: EMResult, settings: FinalFitConfig, *, seed: int | None = None,
              threads: int | None = None, progress: bool = False) -> EMResult:
    r"""Refit the flows of a converged fit on its frozen responsibilities (in place).

    The M-step of eq. 23 for the flows alone, with :math:`\gamma_{r,i,f}` of eq. 17
    computed once from the converged flows and fractions and then held: fresh flows of
    ``settings.bins`` spline bins (same standardisation) maximise
    :math:`\sum_{r,i} w_{r,i}\,\gamma_{r,i,f} \log q_f(x_{r,i})` per flavour
    (:func:`coffea_otcal.flows.train_components`, cosine learning rate). This is done
    ``settings.candidates`` times from different initial weights and minibatch streams
    (:func:`final_fit_candidate`, seeded from ``seed``, by default the fit's seed), and the
    set of flows with the lowest NLL per event of eq. 23 at the held fractions is kept (the
    maximum-likelihood choice; single fits of the flexible flows land in different optima,
    docs/em.md). The logits stay where the iterations left them. :attr:`EMResult.final_fit`
    records the settings, the NLL before and after (and of every candidate), and the time,
    which :attr:`EMResult.elapsed_s` includes.
    """
    t0 = time.perf_counter()
    seed = result.seed if seed is None else int(seed)
    nll_before = mixture_nll(result)
    gamma = np.concatenate([result.responsibilities(r) for r in result.regions])
    old = result.flows
    from tqdm.auto import tqdm

    candidates: list[tuple[float, Any]] = []
    with tqdm(total=len(result.classes) * settings.candidates, desc="EM final fit",
              disable=not progress, leave=False) as bar:
        for k in range(settings.candidates):
            result.flows = final_fit_candidate(result, settings, gamma, seed, k, old=old,
                                               threads=threads, on_done=lambda _i: bar.update(1))
            candidates.append((mixture_nll(result), result.flows))
    best = int(np.argmin([nll for nll, _ in candidates]))
    result.flows = candidates[best][1]
    seconds = time.perf_counter() - t0
    result.final_fit = {
        **settings.model_dump(mode="json"), "bins_used": result.flows.config.bins, "seed": seed,
        "nll_before": nll_before, "nll_after": candidates[best][0],
        "candidate_nll": [nll for nll, _ in candidates], "selected": best, "seconds": seconds,
    }
    result.elapsed_s += seconds
    logger.info("EM final fit (%d bins, %d steps per flavour, candidate %d of %d): NLL per event "
                "%.5f -> %.5f (candidates %s), %.1f s", result.flows.config.bins, settings.steps,
                best, settings.candidates, nll_before, candidates[best][0],
                [round(nll, 5) for nll, _ in candidates], seconds)
    return result


def final_fit_candidate(result: EMResult, settings: FinalFitConfig, gamma: np.ndarray, seed: int,
                        k: int, *, old: Any = None, threads: int | None = None,
                        on_done: Callable[[int], None] | None = None) -> Any:
    """Candidate ``k`` of :func:`final_fit`: fresh flows fitted to ``w * gamma`` (a new module).

    ``gamma`` are the frozen responsibilities of eq. 17, ``(n, F)`` over the regions in
    order; ``old`` the flows whose standardisation is reused (default ``result.flows``).
    """
    import torch

    from coffea_otcal.flows import FlavourFlows, train_components

    old = result.flows if old is None else old
    dev = old.x_mean.device
    regions = result.regions
    x = np.concatenate([result.data[r].x for r in regions])
    w = np.concatenate([result.data[r].weight_array for r in regions])
    c = (np.concatenate([np.asarray(result.data[r].context) for r in regions])
         if old.n_context else None)
    flow_cfg = result.config.flow if settings.bins is None else result.config.flow.model_copy(
        update={"bins": settings.bins})
    torch.manual_seed(int(np.random.SeedSequence([seed, 424242, k]).generate_state(1)[0]))
    new = FlavourFlows(old.n_features, old.n_context, result.classes, flow_cfg).to(dev)
    for name in ("x_mean", "x_scale", "c_mean", "c_scale"):
        getattr(new, name).copy_(getattr(old, name))
    u = new.standardise(torch.as_tensor(x, dtype=torch.float32, device=dev))
    cs = None if c is None else new.standardise_context(
        torch.as_tensor(c, dtype=torch.float32, device=dev))
    optimizers = [torch.optim.Adam(f.parameters(), lr=flow_cfg.learning_rate) for f in new.flows]
    seeds = np.random.SeedSequence([seed, 434343, k]).generate_state(len(result.classes))
    train_components(new, u, cs, [w * gamma[:, i] for i in range(len(result.classes))],
                     settings.steps, optimizers, seeds, threads, on_done=on_done,
                     final_lr=settings.final_learning_rate)
    return new.eval()


def mixture_nll(result: EMResult) -> float:
    """Weighted mixture NLL per event of eq. 23 at the fit's fractions (no prior term)."""
    total = weight = 0.0
    for r, region in enumerate(result.regions):
        d = result.data[region]
        log_q = result.log_prob(d.x, d.context)
        _, log_p = responsibilities(log_q, np.log(result.fractions[r]))
        w = d.weight_array
        total += float(w @ log_p)
        weight += float(w.sum())
    return -total / weight


def _fit_em_once(data_regions: Mapping[str, RegionData], mc: Mapping[str, RegionData],
                 config: EMConfig, *, device: str, seed: int, progress: bool,
                 checkpoint_dir: str | os.PathLike[str] | None, threads: int | None,
                 ) -> EMResult:
    """One EM fit with one seed (:func:`fit_em`, steps 1-4)."""
    import torch

    from coffea_otcal.flows import (
        FlavourFlows,
        default_flow_threads,
        pretrain_flows,
        resolve_device,
        state_from_numpy,
        state_to_numpy,
        train_components,
    )

    t_start = time.perf_counter()
    if len(config.flavour_codes) != len(config.classes):
        msg = f"flavour_codes {config.flavour_codes} do not match classes {config.classes}"
        raise ValueError(msg)
    if not data_regions:
        msg = "no data regions given"
        raise ValueError(msg)
    if not mc:
        msg = "no MC regions given; the flows need labelled MC for pretraining"
        raise ValueError(msg)
    data = {k: check_region(k, v, "data", False) for k, v in data_regions.items()}
    mcs = {k: check_region(k, v, "MC", True) for k, v in mc.items()}
    regions = tuple(data)
    n_f = len(config.classes)
    dims = {d.x.shape[1] for d in [*data.values(), *mcs.values()]}
    if dims != {n_f - 1}:
        msg = f"ILR dimension(s) {sorted(dims)} do not match {n_f} classes (expected {n_f - 1})"
        raise ValueError(msg)
    has_ctx = {d.context is not None for d in [*data.values(), *mcs.values()]}
    if len(has_ctx) > 1:
        msg = "either every region (data and MC) has a context or none has"
        raise ValueError(msg)
    n_ctx = 0
    if has_ctx == {True}:
        widths = {np.asarray(d.context).shape[1] for d in [*data.values(), *mcs.values()]}
        if len(widths) > 1:
            msg = f"context widths differ between regions: {sorted(widths)}"
            raise ValueError(msg)
        n_ctx = widths.pop()
    mc_index = {k: flavour_index(k, np.asarray(v.flavour), config) for k, v in mcs.items()}
    pooled_idx = np.concatenate([mc_index[k] for k in mcs])
    for i, name in enumerate(config.classes):
        if not (pooled_idx == i).any():
            msg = f"flavour {name!r} (code {config.flavour_codes[i]}) is absent from the MC regions {list(mcs)}"
            raise ValueError(msg)

    # effective-sample-size weights per data region
    for k, d in data.items():
        w = d.weight_array
        data[k] = RegionData(x=d.x, context=d.context, weight=w * w.sum() / (w**2).sum())

    pi0 = prior_fractions(regions, mcs, mc_index, config)
    kappa = check_composition(pi0, regions, config)
    logger.info("prior composition matrix condition number kappa = %.3f", kappa)
    enriched_idx = []
    for j, name in enumerate(config.classes):
        if config.enriched_regions and name in config.enriched_regions:
            region = config.enriched_regions[name]
            if region not in regions:
                msg = (
                    f"enriched_regions[{name!r}] = {region!r} is not a data region {list(regions)}"
                )
                raise ValueError(msg)
            enriched_idx.append(regions.index(region))
        else:
            enriched_idx.append(int(np.argmax(pi0[:, j])))
    a0 = logits_from_fractions(pi0)
    prior_cov = np.stack(
        [
            prior_logit_covariance(
                n_f,
                int(np.argmax(pi0[r])),
                (config.region_prior_widths or {}).get(regions[r], config.prior_width),
            )
            for r in range(len(regions))
        ]
    )
    precision = np.linalg.inv(prior_cov)

    dev = resolve_device(device)
    n_threads = default_flow_threads(n_f) if threads is None else max(1, int(threads))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    a_init = initial_logits(pi0, config.init_perturbation, rng)

    x_all = np.concatenate([data[r].x for r in regions])
    c_all = np.concatenate([data[r].context for r in regions]) if n_ctx else None
    w_all = np.concatenate([data[r].weight for r in regions])
    slices = np.cumsum([0] + [len(data[r].x) for r in regions])
    mc_x = np.concatenate([mcs[k].x for k in mcs])
    mc_c = np.concatenate([mcs[k].context for k in mcs]) if n_ctx else None
    mc_w = np.concatenate([mcs[k].weight for k in mcs])

    flows = FlavourFlows(n_f - 1, n_ctx, config.classes, config.flow).to(dev)
    flows.fit_standardisation(
        np.concatenate([x_all, mc_x]), None if not n_ctx else np.concatenate([c_all, mc_c])
    )
    optimizers = [
        torch.optim.Adam(f.parameters(), lr=config.flow.learning_rate) for f in flows.flows
    ]
    fingerprint = _fingerprint(config, seed, data, mcs)
    ckpt_path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
    state = _load_checkpoint(ckpt_path, fingerprint) if ckpt_path else None
    if state is None:
        pretrain_flows(
            flows, mc_x, pooled_idx, mc_w, mc_c, optimizers, seed=seed, progress=progress,
            threads=n_threads,
        )
        pretrained = state_to_numpy(flows)
        optimizers = [
            torch.optim.Adam(f.parameters(), lr=config.flow.learning_rate) for f in flows.flows
        ]
        a = a_init.copy()
        trace: list[dict[str, Any]] = []
        start, counter, converged = 0, 0, False
    else:
        flows.load_state_dict(state_from_numpy(state["flows"]))
        for opt, s in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)
        pretrained = {k: np.asarray(v) for k, v in state["pretrained"].items()}
        a = np.asarray(state["logits"], dtype=np.float64)
        trace = state["trace"]
        start, counter, converged = state["iteration"], state["counter"], state["converged"]
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        logger.info("resumed EM from %s at iteration %d", ckpt_path, start)

    u_all = flows.standardise(torch.as_tensor(x_all, dtype=torch.float32, device=dev))
    cs_all = None
    if n_ctx:
        cs_all = flows.standardise_context(torch.as_tensor(c_all, dtype=torch.float32, device=dev))
    w_total = w_all.sum()

    def e_step(a_cur: np.ndarray) -> tuple[np.ndarray, float, float]:
        log_q = flows.log_prob_numpy(x_all, c_all, threads=n_threads)
        gamma = np.empty_like(log_q)
        ll = 0.0
        log_pi = np.log(fractions_from_logits(a_cur))
        for r in range(len(regions)):
            sl = slice(slices[r], slices[r + 1])
            gamma[sl], log_p = responsibilities(log_q[sl], log_pi[r])
            ll += float(w_all[sl] @ log_p)
        d = a_cur - a0
        prior = 0.5 * float(np.einsum("ri,rij,rj->", d, precision, d))
        return gamma, -ll / w_total, prior / w_total

    gamma, nll, prior = e_step(a)
    if not trace:
        trace.append(_trace_entry(0, nll, prior, a))
    from tqdm.auto import tqdm

    bar = tqdm(
        total=config.max_iterations, initial=start, desc="EM", disable=not progress, leave=False
    )
    iteration = start
    while not converged and iteration < config.max_iterations:
        iteration += 1
        # M-step, logits (eq. 22-23, row-local with the prior of eq. 21)
        a_old = a.copy()
        if iteration > config.shape_warmup:  # warm-up: fractions held, flows only
            for r in range(len(regions)):
                sl = slice(slices[r], slices[r + 1])
                counts = w_all[sl] @ gamma[sl]
                a[r] = map_logits(counts, a0[r], precision[r], a[r])
        # M-step, flows (pooled over regions, weights w_i * gamma_{r,i,f})
        lr = max(
            config.flow.learning_rate * config.learning_rate_decay ** (iteration - 1),
            config.min_learning_rate,
        )
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        # one minibatch stream per flavour, drawn from the checkpointed generator
        flavour_seeds = rng.integers(0, 2**63, size=n_f)
        train_components(flows, u_all, cs_all, [w_all * gamma[:, i] for i in range(n_f)],
                         config.m_steps, optimizers, flavour_seeds, n_threads)
        nll_old = nll
        gamma, nll, prior = e_step(a)
        trace.append(_trace_entry(iteration, nll, prior, a))
        small = abs(nll - nll_old) < config.tol_nll and np.abs(a - a_old).max() < config.tol_logit
        counter = counter + 1 if small else 0
        converged = (
            counter >= config.patience
            and iteration >= max(config.min_iterations, config.shape_warmup + 1)
        )
        bar.update(1)
        bar.set_postfix(nll=f"{nll:.4f}")
        logger.info("EM iteration %d: NLL/event %.5f, prior %.5f", iteration, nll, prior)
        if ckpt_path is not None:
            _save_checkpoint(
                ckpt_path,
                {
                    "version": 1,
                    "fingerprint": fingerprint,
                    "iteration": iteration,
                    "counter": counter,
                    "converged": converged,
                    "flows": {k: torch.as_tensor(v) for k, v in state_to_numpy(flows).items()},
                    "optimizers": [opt.state_dict() for opt in optimizers],
                    "pretrained": {k: torch.as_tensor(v) for k, v in pretrained.items()},
                    "logits": a.tolist(),
                    "trace": trace,
                    "rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(),
                },
            )
    bar.close()
    if not converged:
        logger.warning(
            "EM did not converge in %d iterations (last NLL/event %.5f): if the fractions "
            "are still moving one way (the diagnostics' fraction-drift note), more "
            "iterations slide the fit further along a weakly constrained direction; see "
            "docs/em.md 'Where the EM stops'",
            config.max_iterations,
            nll,
        )
    flows.eval()
    return EMResult(
        classes=tuple(config.classes),
        regions=regions,
        config=config,
        flows=flows,
        pretrained_state=pretrained,
        logits=a,
        prior_logits=a0,
        prior_cov=prior_cov,
        initial_logits=a_init,
        enriched=tuple(regions[r] for r in enriched_idx),
        data=data,
        trace=trace,
        converged=converged,
        n_iterations=iteration,
        seed=seed,
        elapsed_s=time.perf_counter() - t_start,
    )


def _trace_entry(iteration: int, nll: float, prior: float, a: np.ndarray) -> dict[str, Any]:
    return {
        "iteration": int(iteration),
        "nll": float(nll),
        "prior": float(prior),
        "objective": float(nll + prior),
        "fractions": fractions_from_logits(a).tolist(),
    }


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    import torch

    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        msg = (
            f"checkpoint {path} was written for other inputs, config or seed; delete it or "
            "choose another checkpoint_dir"
        )
        raise ValueError(msg)
    return state
