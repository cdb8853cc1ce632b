r"""Closure of a latent calibration: discriminator AUCs at z, z', outputs and output chi2 (Mind the Gap Sec. 5).

Discriminators :math:`\mathcal{D}_L` (Algren et al. 2025, Sec. 5.1) are trained to tell source
from target and calibrated from target at the latent :math:`z`, the penultimate layer
:math:`z'` and the outputs (ILR of the head probabilities, equal to the logits up to their
common offset), on held-out jets; the output discriminants of Kim & Yang eq. 62 are compared
with :func:`coffea_otcal.closure.shape_chi2`. Numpy and scikit-learn only (no torch).
"""

from __future__ import annotations

__all__ = ["LAYERS", "LatentClosure", "TwoSampleResult", "latent_closure", "two_sample_test"]

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coffea_otcal.closure import DISCRIMINANTS, fill_discriminant, shape_chi2, weighted_auc
from coffea_otcal.geometry import ilr

logger = logging.getLogger(__name__)

#: Latent layers compared by :func:`latent_closure`, in the order of the table.
LAYERS: tuple[str, ...] = ("z", "z_prime", "outputs")
_LABELS = {5: "b", 4: "c", 0: "light", 15: "tau"}


@dataclass(frozen=True)
class TwoSampleResult:
    """Held-out discriminator result: AUC and a (thinned) ROC curve (label 1 = second sample)."""

    auc: float
    fpr: np.ndarray
    tpr: np.ndarray


def two_sample_test(
    features_a: np.ndarray,
    features_b: np.ndarray,
    weight_a: np.ndarray | None = None,
    weight_b: np.ndarray | None = None,
    *,
    test_fraction: float = 0.5,
    seed: int = 0,
    max_iter: int = 200,
    roc_points: int = 200,
) -> TwoSampleResult:
    r"""Discriminator :math:`\mathcal{D}_L` of Mind the Gap Sec. 5: held-out AUC and ROC.

    Same classifier and weighting as :func:`coffea_otcal.closure.classifier_auc`
    (scikit-learn histogram gradient boosting, classes at equal total weight) and also
    returns the ROC curve for plotting. AUC 0.5: the samples cannot be told apart.

    Arguments:
        features_a: ``(n_a, k)`` features of sample a (e.g. MC or calibrated MC).
        features_b: ``(n_b, k)`` features of sample b (e.g. data).
        weight_a: optional weights of a.
        weight_b: optional weights of b.
        test_fraction: fraction held out for the AUC.
        seed: seed of the split and the classifier.
        max_iter: boosting iterations (early stopping usually ends sooner).
        roc_points: points kept on the ROC curve.

    Returns:
        The :class:`TwoSampleResult`.
    """
    from sklearn.metrics import roc_curve

    from coffea_otcal.closure import classifier_scores

    try:
        scores, labels, w = classifier_scores(
            features_a, features_b, weight_a, weight_b,
            test_fraction=test_fraction, seed=seed, max_iter=max_iter,
        )
    except ValueError as err:
        msg = str(err).replace("classifier two-sample test", "two-sample test")
        raise ValueError(msg) from None
    auc = weighted_auc(scores, labels, w)
    fpr, tpr, _ = roc_curve(labels, scores, sample_weight=w)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(roc_points, len(fpr))).astype(int))
    return TwoSampleResult(auc=auc, fpr=fpr[keep], tpr=tpr[keep])


@dataclass
class LatentClosure:
    """Result of :func:`latent_closure`.

    Attributes:
        aucs: layer (``z``, ``z_prime``, ``outputs``) -> ``{"source_vs_target": auc,
            "calibrated_vs_target": auc}``.
        rocs: same keys -> :class:`TwoSampleResult`.
        chi2: ``"<D>(k=<kappa>)"`` -> ``{"source": chi2/ndf, "calibrated": chi2/ndf}``.
        probs: ``"source"``, ``"target"``, ``"calibrated"`` -> head probabilities.
        aucs_by_flavour: flavour label -> output-layer AUCs of the jets of that truth
            flavour only (when flavours were given; pseudo-data truth, benchmarks only).
    """

    aucs: dict[str, dict[str, float]]
    rocs: dict[str, dict[str, TwoSampleResult]]
    chi2: dict[str, dict[str, float]]
    probs: dict[str, np.ndarray]
    aucs_by_flavour: dict[str, dict[str, float]] = field(default_factory=dict)

    def table(self) -> str:
        """Markdown table of the discriminator AUCs per layer."""
        lines = [
            "| layer | AUC source vs target | AUC calibrated vs target |",
            "| --- | --- | --- |",
        ]
        for layer, row in self.aucs.items():
            lines.append(
                f"| {layer} | {row['source_vs_target']:.4f} | {row['calibrated_vs_target']:.4f} |"
            )
        return "\n".join(lines)

    def chi2_table(self) -> str:
        """Markdown table of the output-discriminant shape chi2/ndf."""
        lines = ["| discriminant | chi2/ndf source | chi2/ndf calibrated |", "| --- | --- | --- |"]
        for key, row in self.chi2.items():
            lines.append(f"| {key} | {row['source']:.2f} | {row['calibrated']:.2f} |")
        return "\n".join(lines)

    def flavour_table(self) -> str:
        """Markdown table of the per-flavour output AUCs (empty without flavours)."""
        lines = ["| flavour | outputs AUC source vs target | outputs AUC calibrated vs target |"]
        lines.append("| --- | --- | --- |")
        for label, row in self.aucs_by_flavour.items():
            lines.append(
                f"| {label} | {row['source_vs_target']:.4f} | {row['calibrated_vs_target']:.4f} |"
            )
        return "\n".join(lines) if self.aucs_by_flavour else ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (AUCs and chi2)."""
        return {"aucs": self.aucs, "chi2": self.chi2, "aucs_by_flavour": self.aucs_by_flavour}


def latent_closure(
    source: np.ndarray,
    target: np.ndarray,
    calibrated: np.ndarray,
    head: Any,
    *,
    source_weight: np.ndarray | None = None,
    target_weight: np.ndarray | None = None,
    source_flavour: np.ndarray | None = None,
    target_flavour: np.ndarray | None = None,
    kappas: Sequence[float] = (0.5, 1.0, 2.0),
    bins: int = 20,
    seed: int = 0,
    test_fraction: float = 0.5,
    max_iter: int = 200,
) -> LatentClosure:
    r"""Closure of a latent calibration at :math:`z`, :math:`z'` and the outputs (Sec. 5).

    Use held-out jets (not used to fit the maps). ``head`` must provide ``head(z) -> probs``
    and ``head.penultimate(z) -> z'`` (e.g. :func:`coffea_otcal.generator.latent_head`);
    the output layer is represented by the ILR of the probabilities.

    Arguments:
        source: ``(n, d)`` MC latents before calibration.
        target: ``(m, d)`` data latents.
        calibrated: ``(n, d)`` the same MC latents after calibration.
        head: the frozen head.
        source_weight: MC weights (also used for the calibrated jets).
        target_weight: data weights.
        source_flavour: optional MC truth codes; with ``target_flavour`` (pseudo-data truth)
            the output-layer AUCs are also computed per flavour. A mixture-level AUC cannot
            see jets moved towards the wrong flavour's target; this can.
        target_flavour: optional pseudo-data truth codes.
        kappas: the :math:`\kappa` values of the eq.-62 discriminants.
        bins: histogram bins on [0, 1] of each discriminant.
        seed: seed of the discriminators.
        test_fraction: held-out fraction of each discriminator.
        max_iter: boosting iterations of each discriminator.

    Returns:
        The :class:`LatentClosure` (AUC table, ROC curves, chi2/ndf, probabilities).
    """
    layer_fns: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "z": lambda z: np.asarray(z, dtype=np.float64),
        "z_prime": lambda z: np.asarray(head.penultimate(z), dtype=np.float64),
        "outputs": lambda z: np.asarray(ilr(np.asarray(head(z), dtype=np.float64))),
    }
    samples = {"source": source, "target": target, "calibrated": calibrated}
    aucs: dict[str, dict[str, float]] = {}
    rocs: dict[str, dict[str, TwoSampleResult]] = {}
    for layer, fn in layer_fns.items():
        feats = {k: fn(v) for k, v in samples.items()}
        before, after = (
            two_sample_test(
                feats[side],
                feats["target"],
                source_weight,
                target_weight,
                test_fraction=test_fraction,
                seed=seed,
                max_iter=max_iter,
            )
            for side in ("source", "calibrated")
        )
        rocs[layer] = {"source_vs_target": before, "calibrated_vs_target": after}
        aucs[layer] = {"source_vs_target": before.auc, "calibrated_vs_target": after.auc}
        logger.info("latent closure %s: AUC %.4f -> %.4f", layer, before.auc, after.auc)
    probs = {k: np.asarray(head(v), dtype=np.float64) for k, v in samples.items()}
    by_flavour: dict[str, dict[str, float]] = {}
    if source_flavour is not None and target_flavour is not None:
        sf, tf = np.asarray(source_flavour), np.asarray(target_flavour)
        ws = np.ones(len(sf)) if source_weight is None else np.asarray(source_weight)
        wt = np.ones(len(tf)) if target_weight is None else np.asarray(target_weight)
        out_t = np.asarray(ilr(probs["target"]))
        for code in sorted(set(np.unique(sf).tolist()) & set(np.unique(tf).tolist())):
            s_sel, t_sel = sf == code, tf == code
            row = {}
            for side in ("source", "calibrated"):
                row[f"{side}_vs_target"] = two_sample_test(
                    np.asarray(ilr(probs[side][s_sel])),
                    out_t[t_sel],
                    ws[s_sel],
                    wt[t_sel],
                    test_fraction=test_fraction,
                    seed=seed,
                    max_iter=max_iter,
                ).auc
            by_flavour[_LABELS.get(int(code), f"f{code}")] = row
    chi2: dict[str, dict[str, float]] = {}
    for name in DISCRIMINANTS:
        for kappa in kappas:
            ht = fill_discriminant(probs["target"], name, kappa, target_weight, bins)
            row = {}
            for side in ("source", "calibrated"):
                hs = fill_discriminant(probs[side], name, kappa, source_weight, bins)
                res = shape_chi2(hs.values(), hs.variances(), ht.values(), ht.variances())
                row[side] = res.chi2_ndf
            chi2[f"{name}(k={kappa:g})"] = row
    return LatentClosure(aucs=aucs, rocs=rocs, chi2=chi2, probs=probs, aucs_by_flavour=by_flavour)
