"""EM fit results: region arrays, the fitted model and its npz file format."""

from __future__ import annotations

__all__ = [
    "RESULT_SCHEMA_VERSION",
    "EMResult",
    "RegionData",
    "atomic_savez",
    "fractions_from_logits",
    "load_npz_with_meta",
    "logits_from_fractions",
    "responsibilities",
    "writer_info",
]

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coffea_otcal.atomic import atomic_path
from coffea_otcal.versions import package_versions

if TYPE_CHECKING:
    from coffea_otcal.em import EMConfig

RESULT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RegionData:
    """Jets of one control region as plain arrays.

    Attributes:
        x: ILR coordinates of the tagger output, ``(n, D-1)``.
        context: kinematic context (e.g. ``log pt, eta``), ``(n, k)``, or ``None``.
        weight: event weights ``(n,)``; ``None`` means unit weights.
        flavour: truth flavour code per jet (``hadronFlavour`` 5/4/0) for MC, else ``None``.
    """

    x: np.ndarray
    context: np.ndarray | None = None
    weight: np.ndarray | None = None
    flavour: np.ndarray | None = None

    @property
    def weight_array(self) -> np.ndarray:
        """The event weights as float64, unit weights when ``weight`` is ``None``."""
        if self.weight is None:
            return np.ones(len(self.x))
        return np.asarray(self.weight, dtype=np.float64)


def fractions_from_logits(a: np.ndarray) -> np.ndarray:
    r"""Mixture fractions from free logits, eq. 20: :math:`\pi_{r,j} = e^{a_{r,j}} / D_r(a)`."""
    a = np.asarray(a, dtype=np.float64)
    full = np.concatenate([a, np.zeros((*a.shape[:-1], 1))], axis=-1)
    full = full - full.max(axis=-1, keepdims=True)
    e = np.exp(full)
    return e / e.sum(axis=-1, keepdims=True)


def logits_from_fractions(pi: np.ndarray) -> np.ndarray:
    r"""Free logits of eq. 19, :math:`a_{r,j} = \log(\pi_{r,j} / \pi_{r,K})`."""
    pi = np.asarray(pi, dtype=np.float64)
    return np.log(pi[..., :-1]) - np.log(pi[..., -1:])


@dataclass
class EMResult:
    r"""The converged EM fit: flows :math:`\hat q_f`, logits :math:`\hat a`, prior, trace.

    ``data`` holds the data regions with weights rescaled per region to the Kish effective
    sample size, :math:`\sum_i w_i = (\sum w)^2 / \sum w^2`, the scale at which the
    likelihood of eq. 23 is balanced against the logit prior.
    """

    classes: tuple[str, ...]
    regions: tuple[str, ...]
    config: EMConfig
    flows: Any
    pretrained_state: dict[str, np.ndarray]
    logits: np.ndarray
    prior_logits: np.ndarray
    prior_cov: np.ndarray
    initial_logits: np.ndarray
    enriched: tuple[str, ...]
    data: dict[str, RegionData]
    trace: list[dict[str, Any]] = field(default_factory=list)
    converged: bool = False
    n_iterations: int = 0
    seed: int = 0
    elapsed_s: float = 0.0
    restarts: list[dict[str, Any]] = field(default_factory=list)
    #: the final fit of the flows on the frozen responsibilities (``em.final_fit``), or None
    final_fit: dict[str, Any] | None = None

    @property
    def fractions(self) -> np.ndarray:
        r"""Fitted composition matrix :math:`\hat\Pi` ``(R, F)`` (eq. 20)."""
        return fractions_from_logits(self.logits)

    @property
    def prior_fractions(self) -> np.ndarray:
        r"""Prior centre :math:`\pi^0` ``(R, F)``."""
        return fractions_from_logits(self.prior_logits)

    @property
    def initial_fractions(self) -> np.ndarray:
        """Randomly perturbed starting fractions ``(R, F)``."""
        return fractions_from_logits(self.initial_logits)

    @property
    def conditional(self) -> bool:
        """Whether the flows are conditioned on kinematics."""
        return bool(self.flows.n_context)

    def log_prob(self, x: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
        r""":math:`\log \hat q_f(x \mid c)` for all flavours, ``(n, F)``."""
        return self.flows.log_prob_numpy(np.asarray(x), context)

    def pretrained_flows(self) -> Any:
        """A copy of the flows as they were after MC pretraining (:math:`q_f^{MC}`)."""
        from coffea_otcal.flows import FlavourFlows, state_from_numpy

        flows = FlavourFlows(
            self.flows.n_features, self.flows.n_context, self.classes, self.config.flow
        )
        flows.load_state_dict(state_from_numpy(self.pretrained_state))
        return flows.eval()

    def responsibilities(self, region: str, log_q: np.ndarray | None = None) -> np.ndarray:
        r"""E-step responsibilities :math:`\hat\gamma_{r,i,k}` of eq. 17 / 36, ``(n, F)``."""
        r = self.regions.index(region)
        d = self.data[region]
        if log_q is None:
            log_q = self.log_prob(d.x, d.context)
        return responsibilities(log_q, np.log(self.fractions[r]))[0]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result to an ``.npz`` (arrays + JSON metadata; no pickle), atomically."""
        from coffea_otcal.flows import state_to_numpy

        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "logits": self.logits,
            "prior_logits": self.prior_logits,
            "prior_cov": self.prior_cov,
            "initial_logits": self.initial_logits,
        }
        for k, v in state_to_numpy(self.flows).items():
            arrays[f"flow/{k}"] = v
        for k, v in self.pretrained_state.items():
            arrays[f"pretrained/{k}"] = v
        for name, d in self.data.items():
            arrays[f"data/{name}/x"] = d.x
            arrays[f"data/{name}/weight"] = d.weight_array
            if d.context is not None:
                arrays[f"data/{name}/context"] = d.context
        meta = {
            "schema": "coffea-otcal-em-result",
            "schema_version": RESULT_SCHEMA_VERSION,
            "writer_info": writer_info(),
            "classes": list(self.classes),
            "regions": list(self.regions),
            "enriched": list(self.enriched),
            "config": self.config.model_dump(mode="json"),
            "n_features": self.flows.n_features,
            "n_context": self.flows.n_context,
            "trace": self.trace,
            "converged": self.converged,
            "n_iterations": self.n_iterations,
            "seed": self.seed,
            "elapsed_s": self.elapsed_s,
            "restarts": self.restarts,
            "final_fit": self.final_fit,
        }
        arrays["meta"] = np.array(json.dumps(meta))
        atomic_savez(path, arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EMResult:
        """Read a result written by :meth:`save`; refuses other schemas or versions."""
        from coffea_otcal.flows import FlavourFlows, state_from_numpy

        path = Path(path)
        arrays, meta = load_npz_with_meta(path, "an EM result file")
        if meta.get("schema") != "coffea-otcal-em-result":
            msg = f"{path} has schema {meta.get('schema')!r}, expected 'coffea-otcal-em-result'"
            raise ValueError(msg)
        if meta.get("schema_version") != RESULT_SCHEMA_VERSION:
            msg = (
                f"{path} has EM result schema_version {meta.get('schema_version')}; this "
                f"coffea-otcal reads version {RESULT_SCHEMA_VERSION}: refit with this version"
            )
            raise ValueError(msg)
        from coffea_otcal.em import EMConfig

        config = EMConfig.model_validate(meta["config"])
        final = meta.get("final_fit")
        flow_config = config.flow if not final else config.flow.model_copy(
            update={"bins": int(final["bins_used"])})
        flows = FlavourFlows(meta["n_features"], meta["n_context"], meta["classes"], flow_config)
        flow_state = {k[5:]: v for k, v in arrays.items() if k.startswith("flow/")}
        flows.load_state_dict(state_from_numpy(flow_state))
        data = {}
        for name in meta["regions"]:
            ctx = arrays.get(f"data/{name}/context")
            data[name] = RegionData(
                x=arrays[f"data/{name}/x"], context=ctx, weight=arrays[f"data/{name}/weight"]
            )
        return cls(
            classes=tuple(meta["classes"]),
            regions=tuple(meta["regions"]),
            config=config,
            flows=flows.eval(),
            pretrained_state={k[11:]: v for k, v in arrays.items() if k.startswith("pretrained/")},
            logits=arrays["logits"],
            prior_logits=arrays["prior_logits"],
            prior_cov=arrays["prior_cov"],
            initial_logits=arrays["initial_logits"],
            enriched=tuple(meta["enriched"]),
            data=data,
            trace=meta["trace"],
            converged=meta["converged"],
            n_iterations=meta["n_iterations"],
            seed=meta["seed"],
            elapsed_s=meta["elapsed_s"],
            restarts=meta.get("restarts", []),
            final_fit=final,
        )


def writer_info() -> dict[str, str]:
    """Versions of the packages that wrote a file."""
    return package_versions("torch", "numpy")


def atomic_savez(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write an uncompressed ``.npz`` through a temporary file and an atomic rename."""
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]


def load_npz_with_meta(path: Path, what: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read an ``.npz`` written with :func:`atomic_savez` and parse its JSON ``meta`` entry."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    if "meta" not in arrays:
        msg = f"{path} is not {what} (no 'meta' entry)"
        raise ValueError(msg)
    return arrays, json.loads(str(arrays["meta"]))


def responsibilities(log_q: np.ndarray, log_pi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Eq. 17: :math:`\gamma_k = \pi_k q_k / \sum_j \pi_j q_j`; also returns log p_r."""
    joint = log_q + log_pi
    m = joint.max(axis=-1, keepdims=True)
    log_p = (m + np.log(np.exp(joint - m).sum(axis=-1, keepdims=True)))[..., 0]
    return np.exp(joint - log_p[..., None]), log_p
