r"""Jet physics of the toy generator: kinematics, tagger features, Bayes tagger, frozen latent network.

Physics model (all in numpy; no torch needed):

* **Kinematics** (:func:`sample_kinematics`): :math:`p_T = p_T^{\min} + \Gamma(k, \theta_f)`
  truncated at :math:`p_T^{\max}` with a flavour-dependent scale (b jets from top decays
  are harder), a truncated-Gaussian :math:`\eta`, uniform :math:`\phi`, and
  :math:`m \approx 0.14\,p_T`; events hold :math:`1 + \mathrm{Poisson}(\bar n - 1)` jets
  (:func:`sample_event_sizes`).

* **Features.** Each jet carries ``K = 6`` standardised "discriminating features" named in
  :data:`FEATURE_NAMES` (impact-parameter significances of the two leading tracks,
  secondary-vertex mass and flight significance, displaced-track multiplicity, soft-lepton
  activity). Given the truth flavour :math:`f \in \{b, c, \ell\}` they follow a Gaussian
  mixture over physical sub-populations :math:`k` (b with / without a reconstructed
  secondary vertex, c with / without, prompt light and light with a fake vertex from
  :math:`K^0_S` / conversions), see :data:`COMPONENTS`:

  .. math:: x \mid f, p_T, \eta \sim \sum_{k \in f} w_k\,
            \mathcal{N}\big(s(p_T, \eta)\,\mu_k,\ \mathrm{diag}\,\sigma^2\big),

  with a *tagging strength* :math:`s` (:func:`tagger_strength`) that grows from 20 GeV to
  :math:`p_T \approx 100` GeV (longer B flight, better track resolution) and degrades at
  high :math:`p_T` (track merging in the dense jet core) and forward :math:`|\eta|`.
* **Bayes tagger.** The nominal tagger (:func:`bayes_log_probs`) is the Bayes posterior of
  the *simulated* mixture under fixed training priors, i.e. the ideal classifier trained on
  MC: :math:`p(f \mid x, p_T, \eta) \propto \pi^{\rm train}_f \sum_{k \in f} w_k
  \mathcal{N}(x; s\mu_k, \sigma^2)`. It knows :math:`p_T, \eta` like a real tagger.
* **Mismodelling** (:func:`smear_features`): pseudo-data features are smeared by an extra
  Gaussian resolution :math:`\sigma_{\rm smear}(p_T)` and lose their secondary vertex
  with a small probability, the toy analogue of the impact-parameter smearing and
  track dropout used by Kim & Yang (2026, Sec. VI) and Algren et al. (2025, Sec. 3). The
  same tagger applied to them is less discriminating, as in real data.
* **Latent network** (:class:`TaggerNetwork`, :func:`build_network`): a frozen, seeded
  network in the layout of Algren et al. (2025, Fig. 2): inputs -> latent :math:`z`
  (default 128 dimensions, the calibration target :math:`z_{128}`) -> one GELU layer of
  the same width (the penultimate layer :math:`z'_{128}`) -> 3 logits -> softmax. Its
  weights are constructed, not trained, so that the head reproduces the Bayes tagger
  (to ~1e-5 in probability for ``latent_dim >= 64``); the latent mode and the default
  mode therefore share one true response.
* **Storage** (:func:`quantise_mantissa`): scores are rounded to NanoAOD's 10 stored
  mantissa bits, which makes point masses at 0.99951171875 and exactly 1.
"""

from __future__ import annotations

__all__ = [
    "COMPONENTS",
    "FEATURE_NAMES",
    "FEATURE_WIDTHS",
    "FLAVOUR_CODES",
    "TRAINING_LOG_PRIOR",
    "FeatureComponent",
    "TaggerNetwork",
    "bayes_log_probs",
    "build_network",
    "gelu",
    "quantise_mantissa",
    "sample_event_sizes",
    "sample_features",
    "sample_kinematics",
    "smear_features",
    "tagger_scores",
    "tagger_strength",
]

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from coffea_otcal.generator import KinematicsConfig

#: Truth hadron-flavour codes in class order (b, c, light).
FLAVOUR_CODES: tuple[int, int, int] = (5, 4, 0)

#: Names of the tagger input features (columns of the ``features`` arrays).
FEATURE_NAMES: tuple[str, ...] = (
    "ip_sig_1",
    "ip_sig_2",
    "sv_mass",
    "sv_flight_sig",
    "n_displaced",
    "soft_lepton",
)

#: Per-feature Gaussian resolution :math:`\sigma_j` of the nominal simulation.
FEATURE_WIDTHS = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])

#: Indices of the secondary-vertex features that are lost when no vertex is reconstructed.
_SV_FEATURES = np.array([2, 3])
#: Indices of the track- and vertex-based features smeared in pseudo-data.
_SMEARED_FEATURES = np.array([0, 1, 2, 3, 4])


@dataclass(frozen=True)
class FeatureComponent:
    r"""One physical sub-population of jets of a flavour.

    Arguments:
        flavour: class index (0 = b, 1 = c, 2 = light).
        name: what the sub-population is.
        weight: its fraction among jets of that flavour.
        mean: feature means :math:`\mu_k` at tagging strength :math:`s = 1`.
    """

    flavour: int
    name: str
    weight: float
    mean: tuple[float, ...]


#: The feature mixture (weights sum to one per flavour); tuned so that the Bayes tagger's
#: B, CvL, CvB resemble DeepJet in real ttbar NanoAOD (see ``benchmarks/bench_generator.py``).
COMPONENTS: tuple[FeatureComponent, ...] = (
    FeatureComponent(0, "b with secondary vertex", 0.75, (2.8, 2.3, 2.4, 2.7, 2.3, 0.5)),
    FeatureComponent(0, "b without secondary vertex", 0.25, (1.3, 0.9, 0.0, 0.0, 0.6, 0.3)),
    FeatureComponent(1, "c with secondary vertex", 0.40, (1.3, 1.0, 1.7, 2.1, 1.1, 0.1)),
    FeatureComponent(1, "c without secondary vertex", 0.60, (0.5, 0.3, 0.0, 0.0, 0.2, 0.05)),
    FeatureComponent(2, "prompt light", 0.97, (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)),
    FeatureComponent(2, "light with fake vertex", 0.03, (0.5, 0.3, 0.9, 1.4, 0.4, 0.0)),
)

#: Log of the class priors of the tagger's training sample (b, c, light).
TRAINING_LOG_PRIOR = np.log(np.array([0.2, 0.1, 0.7]))

_MEANS = np.array([c.mean for c in COMPONENTS])  # (C, K)
_LOG_WEIGHTS = np.log(np.array([c.weight for c in COMPONENTS]))
_COMP_FLAVOUR = np.array([c.flavour for c in COMPONENTS])
for _constant in (FEATURE_WIDTHS, TRAINING_LOG_PRIOR, _MEANS, _LOG_WEIGHTS, _COMP_FLAVOUR):
    _constant.flags.writeable = False  # the toy's physics is fixed: no hidden mutable state


def tagger_strength(pt: np.ndarray, eta: np.ndarray) -> np.ndarray:
    r"""Tagging strength :math:`s(p_T, \eta)` that scales the flavour separation.

    .. math:: s = \big(1 - a_\pm \ln^2(p_T / 100\,\mathrm{GeV})\big)\,(1 - 0.06|\eta|),

    with :math:`a_- = 0.09` below and :math:`a_+ = 0.05` above 100 GeV, clipped to
    ``[0.35, 1]``: best near 100 GeV, worse for soft, very hard and forward jets.

    Arguments:
        pt: jet transverse momenta in GeV, shape ``(n,)``.
        eta: jet pseudorapidities, shape ``(n,)``.

    Returns:
        The strength per jet, shape ``(n,)``.
    """
    log_ratio = np.log(np.maximum(np.asarray(pt, dtype=np.float64), 1.0) / 100.0)
    slope = np.where(log_ratio < 0.0, 0.09, 0.05)
    s = (1.0 - slope * log_ratio**2) * (1.0 - 0.06 * np.abs(np.asarray(eta, dtype=np.float64)))
    return np.clip(s, 0.35, 1.0)


def sample_features(
    flavour_index: np.ndarray, pt: np.ndarray, eta: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    r"""Draw the nominal (simulation) features of jets with known flavour.

    Arguments:
        flavour_index: class index per jet (0 = b, 1 = c, 2 = light), shape ``(n,)``.
        pt: jet :math:`p_T` in GeV, shape ``(n,)``.
        eta: jet :math:`\eta`, shape ``(n,)``.
        rng: the random generator (consumed deterministically: ``n`` uniforms, then
            ``n * K`` normals).

    Returns:
        Features, shape ``(n, K)`` float64, columns as :data:`FEATURE_NAMES`.
    """
    flav = np.asarray(flavour_index, dtype=np.int64)
    n = flav.shape[0]
    u = np.asarray(rng.random(size=n))
    comp = np.empty(n, dtype=np.int64)
    for f in range(3):
        idx = np.flatnonzero(f == _COMP_FLAVOUR)
        cum = np.cumsum(np.exp(_LOG_WEIGHTS[idx]))
        cum[-1] = 1.0
        sel = flav == f
        comp[sel] = idx[np.searchsorted(cum, u[sel], side="right").clip(max=idx.size - 1)]
    s = tagger_strength(pt, eta)
    noise = rng.standard_normal((n, len(FEATURE_NAMES))) * FEATURE_WIDTHS
    return s[:, None] * _MEANS[comp] + noise


def smear_features(
    features: np.ndarray,
    pt: np.ndarray,
    rng: np.random.Generator,
    sigma: float,
    pt_slope: float,
    pt_ref: float,
    sv_dropout: float,
) -> np.ndarray:
    r"""Apply the pseudo-data mismodelling to simulated features.

    Track- and vertex-based features get an extra Gaussian resolution

    .. math:: \sigma_{\rm smear}(p_T) = \sigma\,\max\big(0,\ 1 + \beta
              \ln(p_T / p_T^{\rm ref})\big),

    and with probability ``sv_dropout`` a jet loses its secondary vertex (the vertex
    features are replaced by their no-vertex distribution, pure resolution noise).

    Arguments:
        features: simulated features ``(n, K)``.
        pt: jet :math:`p_T` in GeV ``(n,)``.
        rng: the random generator (always consumes ``n * K + n + n * 2`` numbers).
        sigma: smearing width :math:`\sigma` at :math:`p_T^{\rm ref}` (in feature units).
        pt_slope: :math:`\beta`, the logarithmic pT dependence of the smearing.
        pt_ref: :math:`p_T^{\rm ref}` in GeV.
        sv_dropout: probability to lose the secondary vertex.

    Returns:
        The smeared features, a new ``(n, K)`` array.
    """
    x = np.array(features, dtype=np.float64, copy=True)
    n = x.shape[0]
    width = sigma * np.maximum(0.0, 1.0 + pt_slope * np.log(np.asarray(pt) / pt_ref))
    noise = rng.standard_normal((n, x.shape[1]))
    x[:, _SMEARED_FEATURES] += width[:, None] * noise[:, _SMEARED_FEATURES]
    lost = np.asarray(rng.random(size=n)) < sv_dropout
    fresh = rng.standard_normal((n, _SV_FEATURES.size)) * FEATURE_WIDTHS[_SV_FEATURES]
    x[np.ix_(lost, _SV_FEATURES)] = fresh[lost]
    return x


def bayes_log_probs(features: np.ndarray, pt: np.ndarray, eta: np.ndarray) -> np.ndarray:
    r"""Log-probabilities of the nominal tagger, the Bayes posterior of the simulated mixture.

    .. math:: \log p_f = \log\pi^{\rm train}_f + \operatorname{LSE}_{k \in f}
              \Big[\log w_k + s\,\mu_k^\top \Sigma^{-1} x
              - \tfrac{s^2}{2}\mu_k^\top\Sigma^{-1}\mu_k\Big] - \log Z,

    (the term :math:`-\tfrac12 x^\top\Sigma^{-1}x` is common to all classes and cancels).

    Arguments:
        features: ``(n, K)`` features (simulated or smeared).
        pt: jet :math:`p_T` ``(n,)``.
        eta: jet :math:`\eta` ``(n,)``.

    Returns:
        ``(n, 3)`` log-probabilities in class order (b, c, light).
    """
    s = tagger_strength(pt, eta)[:, None]
    inv_var = 1.0 / FEATURE_WIDTHS**2
    lin = (np.asarray(features) * inv_var) @ _MEANS.T  # (n, C)
    quad = 0.5 * np.sum(_MEANS**2 * inv_var, axis=1)  # (C,)
    comp_ll = s * lin - s**2 * quad + _LOG_WEIGHTS
    class_ll = np.empty((comp_ll.shape[0], 3))
    for f in range(3):
        part = comp_ll[:, f == _COMP_FLAVOUR]
        top = part.max(axis=1, keepdims=True)
        class_ll[:, f] = top[:, 0] + np.log(np.exp(part - top).sum(axis=1))
    class_ll += TRAINING_LOG_PRIOR
    top = class_ll.max(axis=1, keepdims=True)
    return class_ll - (top + np.log(np.exp(class_ll - top).sum(axis=1, keepdims=True)))


def gelu(x: np.ndarray) -> np.ndarray:
    r"""GELU activation in its tanh form (identical to ``torch.nn.GELU(approximate="tanh")``).

    .. math:: \mathrm{GELU}(x) = \tfrac12 x\big(1 + \tanh[\sqrt{2/\pi}(x + 0.044715x^3)]\big)

    Arguments:
        x: any array.

    Returns:
        The activation, same shape.
    """
    x = np.asarray(x)
    inner = x * x
    inner *= 0.044715
    inner += 1.0
    inner *= x
    inner *= math.sqrt(2.0 / math.pi)
    np.tanh(inner, out=inner)
    inner += 1.0
    inner *= x
    inner *= 0.5
    return inner


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True, eq=False)
class TaggerNetwork:
    r"""A frozen toy tagger network: inputs -> latent ``z`` -> penultimate ``z'`` -> probabilities.

    .. math::
        u &= \big(s\,x,\ s^2,\ \ln(p_T/50),\ |\eta|\big),\qquad
        z = A u + B\,\mathrm{GELU}(W_1 u + b_1) + b_2, \\
        z' &= \mathrm{GELU}(W_3 z + b_3),\qquad \ell = W_4 z' + b_4,\qquad
        p = \mathrm{softmax}(\ell),

    with :math:`s = s(p_T, \eta)` the tagging strength (:func:`tagger_strength`), the
    network's learned pT dependence. The encoder is a one-hidden-layer MLP with a skip
    connection whose output is rotated by a random orthogonal matrix :math:`[A\ B]`, so
    :math:`z` spans all ``latent_dim`` directions. Calling the network on latents applies
    the head, ``net(z) -> p``: the frozen head through which calibrated latents are pushed
    (Algren et al. 2025, Sec. 5); :meth:`penultimate` is :math:`z'`.

    Arguments:
        w_skip, w1, b1, w_hidden, b2: encoder (:math:`A, W_1, b_1, B, b_2`; ``W x`` convention).
        w3, b3, w4, b4: head (``w3`` is ``(d, d)``, ``w4`` is ``(3, d)``).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> net = build_network(32, seed=3)
        >>> pt, eta = np.full(3, 60.0), np.zeros(3)
        >>> x = sample_features(np.array([0, 1, 2]), pt, eta, rng)
        >>> z = net.encode(x, pt, eta)
        >>> z.shape, net(z).shape, bool(np.allclose(net(z), np.exp(bayes_log_probs(x, pt, eta)), atol=0.02))
        ((3, 32), (3, 3), True)
    """

    w_skip: np.ndarray
    w1: np.ndarray
    b1: np.ndarray
    w_hidden: np.ndarray
    b2: np.ndarray
    w3: np.ndarray
    b3: np.ndarray
    w4: np.ndarray
    b4: np.ndarray

    @property
    def latent_dim(self) -> int:
        """Dimension of the latent ``z``."""
        return int(self.b2.shape[0])

    @staticmethod
    def raw_inputs(features: np.ndarray, pt: np.ndarray, eta: np.ndarray) -> np.ndarray:
        r"""The network inputs :math:`u = (s x, s^2, \ln(p_T/50), |\eta|)`, shape ``(n, K + 3)``."""
        pt = np.asarray(pt, dtype=np.float64)
        eta = np.asarray(eta, dtype=np.float64)
        s = tagger_strength(pt, eta)[:, None]
        extra = [s**2, np.log(pt / 50.0)[:, None], np.abs(eta)[:, None]]
        return np.concatenate([s * np.asarray(features, dtype=np.float64), *extra], axis=1)

    def encode(self, features: np.ndarray, pt: np.ndarray, eta: np.ndarray) -> np.ndarray:
        """Latent representation ``z`` of jets, shape ``(n, latent_dim)`` float64."""
        u = self.raw_inputs(features, pt, eta)
        return u @ self.w_skip.T + gelu(u @ self.w1.T + self.b1) @ self.w_hidden.T + self.b2

    def penultimate(self, z: np.ndarray) -> np.ndarray:
        """The penultimate layer ``z' = GELU(W_3 z + b_3)``, shape ``(n, latent_dim)``."""
        return gelu(np.asarray(z, dtype=np.float64) @ self.w3.T + self.b3)

    def logits(self, z: np.ndarray) -> np.ndarray:
        """Output logits ``(n, 3)`` of latents ``z``."""
        return self.penultimate(z) @ self.w4.T + self.b4

    def __call__(self, z: np.ndarray) -> np.ndarray:
        """The frozen head: latents ``(n, d)`` -> probabilities ``(n, 3)`` (b, c, light)."""
        return _softmax(self.logits(z))

    def to_torch(self) -> Any:
        """The head as a ``torch.nn.Sequential`` (float64, frozen), for gradient-based users.

        Returns:
            ``Sequential(Linear(d, d), GELU("tanh"), Linear(d, 3))`` giving logits; apply
            ``softmax`` for probabilities. Imports torch lazily.
        """
        import torch

        d = self.latent_dim
        hidden = torch.nn.Linear(d, d, dtype=torch.float64)
        output = torch.nn.Linear(d, self.w4.shape[0], dtype=torch.float64)
        with torch.no_grad():
            hidden.weight.copy_(torch.from_numpy(self.w3))
            hidden.bias.copy_(torch.from_numpy(self.b3))
            output.weight.copy_(torch.from_numpy(self.w4))
            output.bias.copy_(torch.from_numpy(self.b4))
        head = torch.nn.Sequential(hidden, torch.nn.GELU(approximate="tanh"), output)
        head.requires_grad_(False)
        return head


#: Offset that keeps a GELU unit in its linear regime (GELU(v) = v for v > ~5 in float64).
_LINEAR_OFFSET = 200.0


def build_network(latent_dim: int, seed: int, n_reference: int = 20_000) -> TaggerNetwork:
    r"""Build the frozen toy tagger network for a seed (deterministic, no training loop).

    The weights are *constructed* so that the head implements the Bayes tagger: with
    :math:`[A\ B] = Q\,\mathrm{diag}(a, b)` (:math:`Q` random orthogonal) the inputs are
    exactly linear in the latent, :math:`u = a^{-1} Q_u^\top (z - b_2)`, hence so is every
    component log-likelihood :math:`\ell_k(z)` of :func:`bayes_log_probs`. For each class
    with components :math:`k_1, k_2` the penultimate layer holds the linear units
    :math:`\mathrm{GELU}(\ell_{k_1} + C)`, :math:`\mathrm{GELU}(\delta + C)` and GELU
    "knots" :math:`\mathrm{GELU}(\alpha(\delta - \beta_j))` of
    :math:`\delta = \ell_{k_2} - \ell_{k_1}`; since
    :math:`\log\sum_k e^{\ell_k} = \ell_{k_1} + \mathrm{softplus}(\delta)`, the output
    layer (fitted by least squares to the centred Bayes log-probabilities on a seeded
    reference sample, half of it smeared) reproduces the tagger closely. The remaining
    penultimate units are random GELU projections of :math:`z` that the output ignores.

    Arguments:
        latent_dim: dimension of ``z`` and ``z'`` (>= 16; the fidelity grows with it).
        seed: seed of the weights and of the reference sample.
        n_reference: size of the reference sample of the output-layer fit.

    Returns:
        The network.
    """
    n_in = len(FEATURE_NAMES) + 3
    n_comp_per_class = np.bincount(_COMP_FLAVOUR, minlength=3)
    knots = (latent_dim - 3 * 2) // 3
    if latent_dim < 16 or knots < 2 or np.any(n_comp_per_class != 2):
        msg = f"latent_dim must be >= 16 (and 2 feature components per class), got {latent_dim}"
        raise ValueError(msg)
    rng = np.random.default_rng([seed, 0x7A66])
    hidden = latent_dim - n_in
    q, r = np.linalg.qr(rng.standard_normal((latent_dim, latent_dim)))
    q *= np.sign(np.diag(r))
    scale_in, scale_hidden = 0.5, 1.0
    w_skip = q[:, :n_in] * scale_in
    w_hidden = q[:, n_in:] * scale_hidden
    w1 = rng.standard_normal((hidden, n_in)) * math.sqrt(2.0 / n_in)
    b1 = rng.standard_normal(hidden) * 0.5
    b2 = rng.standard_normal(latent_dim) * 0.1
    recover = q[:, :n_in].T / scale_in  # u = recover @ (z - b2)

    # component log-likelihoods as affine functions of z: ell = z @ lin.T + off
    inv_var = 1.0 / FEATURE_WIDTHS**2
    coef_u = np.concatenate(
        [_MEANS * inv_var, -0.5 * np.sum(_MEANS**2 * inv_var, axis=1)[:, None]], axis=1
    )  # (C, K + 1) acting on (s x, s^2)
    lin = coef_u @ recover[: n_in - 2]
    off = _LOG_WEIGHTS - lin @ b2
    rows: list[np.ndarray] = []
    biases: list[float | np.ndarray] = []
    beta = np.linspace(-8.0, 8.0, knots)
    alpha = 1.5 / (beta[1] - beta[0])
    for f in range(3):
        k1, k2 = np.flatnonzero(f == _COMP_FLAVOUR)
        d_row, d_off = lin[k2] - lin[k1], off[k2] - off[k1]
        rows += [lin[k1], d_row, *(alpha * d_row for _ in beta)]
        biases += [off[k1] + _LINEAR_OFFSET, d_off + _LINEAR_OFFSET, *(alpha * (d_off - beta))]
    n_struct = len(rows)
    w3 = np.concatenate(
        [
            np.array(rows),
            rng.standard_normal((latent_dim - n_struct, latent_dim)) * math.sqrt(2.0 / latent_dim),
        ]
    )
    b3 = np.concatenate([np.array(biases), rng.standard_normal(latent_dim - n_struct) * 0.1])
    structured = np.arange(n_struct)

    flav = rng.integers(0, 3, n_reference)
    pt = np.exp(rng.uniform(np.log(20.0), np.log(1000.0), n_reference))
    eta = rng.uniform(-2.5, 2.5, n_reference)
    feats = sample_features(flav, pt, eta, rng)
    half = n_reference // 2
    feats[half:] = smear_features(feats[half:], pt[half:], rng, 1.0, 0.3, 50.0, 0.1)
    target = bayes_log_probs(feats, pt, eta)
    target -= target.mean(axis=1, keepdims=True)
    net = TaggerNetwork(
        w_skip, w1, b1, w_hidden, b2, w3, b3, np.zeros((3, latent_dim)), np.zeros(3)
    )
    z = net.encode(feats, pt, eta).astype(np.float32).astype(np.float64)
    design = np.concatenate([net.penultimate(z)[:, structured], np.ones((n_reference, 1))], axis=1)
    gram = design.T @ design
    gram[np.diag_indices_from(gram)] += 1e-9 * np.trace(gram) / gram.shape[0]
    coef = np.linalg.solve(gram, design.T @ target)  # (n_struct + 1, 3)
    w4 = np.zeros((3, latent_dim))
    w4[:, structured] = coef[:-1].T
    return TaggerNetwork(w_skip, w1, b1, w_hidden, b2, w3, b3, w4, coef[-1].copy())


def tagger_scores(
    features: np.ndarray,
    pt: np.ndarray,
    eta: np.ndarray,
    network: TaggerNetwork | None = None,
    chunk: int = 65_536,
) -> tuple[np.ndarray, np.ndarray | None]:
    r"""Tagger probabilities of jets, from the Bayes tagger or from a latent network.

    With a network the latent is rounded to float32 (as stored in files) *before* the head
    is applied, so ``network(stored_latent)`` reproduces the returned probabilities.

    Arguments:
        features: ``(n, K)`` tagger inputs.
        pt: jet :math:`p_T` ``(n,)``.
        eta: jet :math:`\eta` ``(n,)``.
        network: ``None`` for the Bayes tagger (:func:`bayes_log_probs`), else the network.
        chunk: jets per block when evaluating the network (bounds the memory).

    Returns:
        ``(probs (n, 3) float64, latent (n, d) float32 or None)``.
    """
    if network is None:
        return np.exp(bayes_log_probs(features, pt, eta)), None
    n = features.shape[0]
    latent = np.empty((n, network.latent_dim), dtype=np.float32)
    probs = np.empty((n, 3))
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        latent[sl] = network.encode(features[sl], pt[sl], eta[sl])
        probs[sl] = network(latent[sl].astype(np.float64))
    return probs, latent


def quantise_mantissa(values: Any, mantissa_bits: int = 10) -> np.ndarray:
    """Round float32 values to ``mantissa_bits`` stored mantissa bits, as NanoAOD does.

    NanoAOD stores tagger scores with ``precision=10``: 10 explicit (11 significant) bits,
    rounded to nearest (CMSSW ``MiniFloatConverter::reduceMantissaToNbitsRounding``), so the
    largest value below 1 is :math:`1 - 2^{-11} = 0.99951171875` and values above it round
    to exactly 1.

    Arguments:
        values: array-like of floats.
        mantissa_bits: stored mantissa bits (1-23; 23 leaves float32 unchanged).

    Returns:
        A float32 array of the same shape.
    """
    x = np.array(values, dtype=np.float32)
    shift = 23 - int(mantissa_bits)
    if shift <= 0:
        return x.copy()
    bits = x.view(np.uint32).astype(np.uint64)
    mask = np.uint64((0xFFFFFFFF >> shift) << shift)
    rounded = ((bits + np.uint64(1 << (shift - 1))) & mask).astype(np.uint32)
    out = rounded.view(np.float32)
    return np.where(np.isfinite(x), out, x)


def _truncated(draw: Any, low: float, high: float, n: int) -> np.ndarray:
    values = draw(n)
    bad = (values < low) | (values > high)
    while bad.any():
        values[bad] = draw(int(bad.sum()))
        bad = (values < low) | (values > high)
    return values


def sample_kinematics(
    flavour_index: np.ndarray,
    rng: np.random.Generator,
    kinematics: KinematicsConfig,
    pt: np.ndarray | None = None,
    eta: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    r"""Draw jet four-momenta (float32, as NanoAOD stores them).

    .. math:: p_T = p_T^{\min} + \theta_f\,u,\quad u \sim \Gamma(k, 1)
              \text{ truncated to } p_T \le p_T^{\max},\qquad
              \eta \sim \mathcal{N}(0, w^2)|_{|\eta| < \eta_{\max}},\qquad
              m = p_T\,(0.04 + \Gamma(4, 0.025)).

    Arguments:
        flavour_index: class index per jet (0 = b, 1 = c, 2 = light), ``(n,)``.
        rng: the random generator.
        kinematics: the spectrum parameters (:class:`~coffea_otcal.generator.KinematicsConfig`).
        pt: optional fixed :math:`p_T` values ``(n,)`` in GeV.
        eta: optional fixed :math:`\eta` values ``(n,)``.

    Returns:
        ``pt``, ``eta``, ``phi``, ``mass`` float32 arrays of shape ``(n,)``.
    """
    kin = kinematics
    flav = np.asarray(flavour_index, dtype=np.int64)
    n = flav.shape[0]
    if pt is None:
        scales = np.array([kin.pt_scale_b, kin.pt_scale_c, kin.pt_scale_light])[flav]
        excess = kin.pt_max - kin.pt_min
        u = np.asarray(rng.gamma(kin.pt_shape, 1.0, size=n))
        too_high = u * scales > excess
        while too_high.any():
            u[too_high] = rng.gamma(kin.pt_shape, 1.0, int(too_high.sum()))
            too_high = u * scales > excess
        pt = kin.pt_min + u * scales
    if eta is None:
        eta = _truncated(lambda m: rng.normal(0.0, kin.eta_width, m), -kin.eta_max, kin.eta_max, n)
    pt32 = np.asarray(pt, dtype=np.float32)
    eta32 = np.asarray(eta, dtype=np.float32)
    if pt32.shape != (n,) or eta32.shape != (n,):
        msg = f"pt and eta must have shape ({n},), got {pt32.shape} and {eta32.shape}"
        raise ValueError(msg)
    phi = np.asarray(rng.uniform(-np.pi, np.pi, size=n), dtype=np.float32)
    mass = (pt32 * (0.04 + np.asarray(rng.gamma(4.0, 0.025, size=n)))).astype(np.float32)
    return {"pt": pt32, "eta": eta32, "phi": phi, "mass": mass}


def sample_event_sizes(
    n_jets: int, rng: np.random.Generator, mean: float, maximum: int
) -> np.ndarray:
    r"""Jets per event, :math:`\min(1 + \mathrm{Poisson}(\bar n - 1), n_{\max})`, summing to ``n_jets``.

    Arguments:
        n_jets: total number of jets to distribute (the last event takes the remainder).
        rng: the random generator.
        mean: mean jets per event :math:`\bar n \ge 1` (before the cap).
        maximum: the cap :math:`n_{\max}`.

    Returns:
        Positive int64 counts per event with ``counts.sum() == n_jets``.
    """
    sizes: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    total = 0
    while total < n_jets:
        m = int((n_jets - total) / mean) + 16
        draw = np.minimum(1 + rng.poisson(mean - 1.0, m), maximum)
        sizes.append(draw)
        total += int(draw.sum())
    counts = np.concatenate(sizes)
    if n_jets <= 0:
        return counts
    ends = np.cumsum(counts)
    last = int(np.searchsorted(ends, n_jets))
    counts = counts[: last + 1].copy()
    counts[-1] -= int(ends[last] - n_jets)
    return counts
