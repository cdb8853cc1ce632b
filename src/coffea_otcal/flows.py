"""Per-flavour neural-spline-flow component densities on standardised ILR coordinates."""

from __future__ import annotations

__all__ = [
    "FlavourFlows",
    "FlowConfig",
    "MantissaDequantizer",
    "pretrain_flows",
    "resolve_device",
    "state_from_numpy",
    "state_to_numpy",
    "train_component",
    "train_components",
]

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import zuko
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return ``cuda`` when ``device="auto"`` and a GPU is present, else the named device."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class FlowConfig(BaseModel):
    """Hyper-parameters of the component flows and of their (pre)training."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transforms: int = Field(default=2, ge=1, description="number of autoregressive RQS transforms")
    hidden_features: tuple[int, ...] = Field(
        default=(32, 32), description="MADE hidden layer widths"
    )
    bins: int = Field(default=12, ge=2, description="spline bins K per transform")
    bound: float = Field(default=5.0, gt=0, description="zuko spline domain [-bound, bound]")
    margin: float = Field(
        default=0.5, ge=0, description="standardised inputs are kept within +-(bound - margin)"
    )
    dequantize_sigma: float = Field(
        default=0.02,
        ge=0,
        description="std of the Gaussian jitter added to standardised inputs while training "
        "(dequantisation of the point masses of quantised tagger scores)",
    )
    dequantize_adapter: str | None = Field(
        default=None,
        description="tagger adapter whose columns were stored with a truncated mantissa; when "
        "set, training inputs are dequantised uniformly within each column's rounding cell",
    )
    dequantize_mantissa_bits: int = Field(
        default=10, ge=1, le=23, description="stored mantissa bits (NanoAOD tagger scores: 10)"
    )
    pretrain_steps: int = Field(
        default=500, ge=0, description="Adam steps per flavour in pretraining"
    )
    pretrain_final_lr: float | None = Field(
        default=None,
        gt=0,
        description="anneal the pretraining learning rate from learning_rate to this value on "
        "a cosine (None: constant rate). A supervised fit of the demo's b jets gains from it "
        "(500 annealed steps fit like 2000 constant ones), the demo's EM did not (docs/em.md)",
    )
    batch_size: int = Field(default=1024, ge=16, description="minibatch size")
    learning_rate: float = Field(default=3e-3, gt=0, description="Adam learning rate")


class MantissaDequantizer:
    r"""Uniform dequantisation of tagger scores stored with a truncated mantissa.

    NanoAOD keeps 10 mantissa bits of each tagger column (rounded to nearest), so the
    scores are point masses on a grid that is dense in the bulk and coarse near the
    vertices of the simplex (exact 1 and :math:`1 - 2^{-11}`). A flow fitted to the
    ILR image of such atoms would grow spikes. Each call maps ILR points back to the
    tagger's own columns (through the adapter), draws each value uniformly over its
    rounding cell (:func:`coffea_otcal.adapters.rounding_cell`, truncated to [0, 1]) and
    returns the
    ILR coordinates: a sample of the continuous density that quantises to the data
    (dequantisation, Theis et al. 2016). :meth:`quantise` is the inverse operation
    (forward folding), used to compare a flow with quantised data like with like.

    Arguments:
        adapter: tagger adapter name (see :func:`coffea_otcal.adapters.get_adapter`).
        mantissa_bits: stored mantissa bits.
    """

    def __init__(self, adapter: str = "deepjet", mantissa_bits: int = 10) -> None:
        from coffea_otcal.adapters import get_adapter

        self.adapter = get_adapter(adapter)
        self.mantissa_bits = int(mantissa_bits)

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Dequantise ILR points ``(n, D-1)``; returns new ILR points."""
        from coffea_otcal.adapters import rounding_cell
        from coffea_otcal.geometry import ilr, ilr_inv

        cols = self.adapter.from_simplex(np.asarray(ilr_inv(np.asarray(x, dtype=np.float64))))
        out = {}
        for name, v in cols.items():
            lo, hi = rounding_cell(v, self.mantissa_bits)
            out[name] = lo + rng.uniform(0.0, 1.0, size=lo.shape) * (hi - lo)
        probs, _ = self.adapter.to_simplex(out)
        return np.asarray(ilr(probs)).reshape(len(probs), -1)

    def quantise(self, x: np.ndarray) -> np.ndarray:
        """Round ILR points to the stored precision of the tagger columns (forward folding)."""
        from coffea_otcal.geometry import ilr, ilr_inv
        from coffea_otcal.latent_tagger import quantise_mantissa

        cols = self.adapter.from_simplex(np.asarray(ilr_inv(np.asarray(x, dtype=np.float64))))
        out = {k: quantise_mantissa(v, self.mantissa_bits).astype(np.float64) for k, v in cols.items()}
        probs, _ = self.adapter.to_simplex(out)
        return np.asarray(ilr(probs)).reshape(len(probs), -1)


class FlavourFlows(nn.Module):
    r"""One conditional neural spline flow per flavour, :math:`q_f(x \mid c)`.

    The flows model the ILR coordinates :math:`x` of the tagger output (Kim & Yang eq. 7-8)
    after a common affine standardisation :math:`u = (x - \mu) / s` that is shared by all
    flavours ("common normalisation" of Sec. III.1). The scale :math:`s` is the standard
    deviation, enlarged where needed so that every training point lies inside
    :math:`[-(B - m), B - m]` with the zuko spline bound :math:`B` and margin :math:`m`:
    the splines then act on all of the data and the map stays affine, so its inverse is
    defined everywhere. Densities are returned in :math:`x` space,

    .. math:: \log q_f(x \mid c) = \log q^u_f(u \mid \tilde c) - \sum_d \log s_d ,

    with the standardised context :math:`\tilde c`. Quantised tagger scores put point
    masses at a few ILR values; a Gaussian jitter of ``dequantize_sigma`` (standardised
    units) is added to the inputs while training so that no density diverges.

    Arguments:
        n_features: ILR dimension :math:`D - 1`.
        n_context: number of context (jet kinematic) features, 0 for none.
        classes: flavour names, one flow each.
        config: hyper-parameters.

    Example:
        >>> flows = FlavourFlows(2, 0, ("b", "c", "light"))
        >>> flows.log_prob(torch.zeros(4, 2)).shape
        torch.Size([4, 3])

    References:
        | Neural Spline Flows (Durkan et al., 2019), https://arxiv.org/abs/1906.04032
        | Kim & Yang (2026), Sec. III.1 and VI.
    """

    x_mean: torch.Tensor
    x_scale: torch.Tensor
    c_mean: torch.Tensor
    c_scale: torch.Tensor

    def __init__(
        self,
        n_features: int,
        n_context: int,
        classes: Sequence[str],
        config: FlowConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or FlowConfig()
        self.n_features = int(n_features)
        self.n_context = int(n_context)
        self.classes = tuple(classes)
        self.flows = nn.ModuleList(
            zuko.flows.NSF(
                features=self.n_features,
                context=self.n_context,
                transforms=self.config.transforms,
                bins=self.config.bins,
                hidden_features=tuple(self.config.hidden_features),
            )
            for _ in self.classes
        )
        self.dequantizer = None
        if self.config.dequantize_adapter is not None:
            self.dequantizer = MantissaDequantizer(
                self.config.dequantize_adapter, self.config.dequantize_mantissa_bits
            )
        self.register_buffer("x_mean", torch.zeros(self.n_features, dtype=torch.float32))
        self.register_buffer("x_scale", torch.ones(self.n_features, dtype=torch.float32))
        self.register_buffer("c_mean", torch.zeros(self.n_context, dtype=torch.float32))
        self.register_buffer("c_scale", torch.ones(self.n_context, dtype=torch.float32))

    # -- preprocessing -------------------------------------------------------------------
    def fit_standardisation(self, x: np.ndarray, context: np.ndarray | None = None) -> None:
        """Set the common affine standardisation from pooled inputs (see class docstring)."""
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        limit = self.config.bound - self.config.margin
        reach = np.abs(x - mean).max(axis=0) / scale
        scale = scale * np.maximum(1.0, reach / limit)
        self.x_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.x_scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
        if self.n_context:
            if context is None:
                msg = f"the flows are conditional on {self.n_context} context features but no context was given"
                raise ValueError(msg)
            c = np.asarray(context, dtype=np.float64)
            c_scale = c.std(axis=0)
            self.c_mean.copy_(torch.as_tensor(c.mean(axis=0), dtype=torch.float32))
            self.c_scale.copy_(
                torch.as_tensor(np.where(c_scale > 0, c_scale, 1.0), dtype=torch.float32)
            )

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Map ILR coordinates to the flows' standardised inputs :math:`u`."""
        return (x - self.x_mean) / self.x_scale

    def destandardise(self, u: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`standardise`."""
        return u * self.x_scale + self.x_mean

    def standardise_context(self, context: torch.Tensor | None) -> torch.Tensor | None:
        """Standardise the context features (``None`` passes through for unconditional flows)."""
        if not self.n_context:
            return None
        if context is None:
            msg = f"the flows are conditional on {self.n_context} context features; pass context"
            raise ValueError(msg)
        return (context - self.c_mean) / self.c_scale

    def log_jacobian(self) -> torch.Tensor:
        r""":math:`-\sum_d \log s_d`, the log-Jacobian of the standardisation."""
        return -torch.log(self.x_scale).sum()

    # -- densities -----------------------------------------------------------------------
    def component_log_prob(
        self, index: int, u: torch.Tensor, context_std: torch.Tensor | None
    ) -> torch.Tensor:
        """Log-density of flavour ``index`` in standardised space (training objective)."""
        dist = self.flows[index](context_std)
        return dist.log_prob(u)

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        r""":math:`\log q_f(x \mid c)` for every flavour: shape ``(n, n_flavours)``."""
        u = self.standardise(x)
        c = self.standardise_context(context)
        logs = [self.component_log_prob(i, u, c) for i in range(len(self.classes))]
        return torch.stack(logs, dim=-1) + self.log_jacobian()

    @torch.no_grad()
    def log_prob_numpy(
        self,
        x: np.ndarray,
        context: np.ndarray | None = None,
        batch_size: int = 65536,
        threads: int | None = None,
    ) -> np.ndarray:
        """Batched, gradient-free :meth:`log_prob` on numpy arrays (float64 out).

        With ``threads`` (> 1), the flavours are evaluated side by side in threads, each on
        one intra-op torch thread (the values do not depend on the thread count).
        """
        device = self.x_mean.device
        n_f = len(self.classes)
        if len(x) == 0:
            return np.zeros((0, n_f))
        u = self.standardise(torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device))
        c = None
        if self.n_context:
            if context is None:
                msg = f"the flows are conditional on {self.n_context} context features; pass context"
                raise ValueError(msg)
            c = self.standardise_context(
                torch.as_tensor(np.asarray(context), dtype=torch.float32, device=device)
            )
        out = np.empty((len(x), n_f))
        jac = float(self.log_jacobian())

        def job(i: int) -> None:
            with torch.no_grad():  # grad mode is thread-local
                for start in range(0, len(x), batch_size):
                    cb = None if c is None else c[start : start + batch_size]
                    lp = self.component_log_prob(i, u[start : start + batch_size], cb)
                    out[start : start + batch_size, i] = lp.double().cpu().numpy() + jac

        if threads is None or threads <= 1 or device.type != "cpu":
            for i in range(n_f):
                job(i)
        else:
            with _one_intraop_thread(), ThreadPoolExecutor(min(threads, n_f)) as pool:
                list(pool.map(job, range(n_f)))
        return out

    @torch.no_grad()
    def sample(
        self,
        flavour: int | str,
        n: int | None = None,
        context: np.ndarray | None = None,
        seed: int = 0,
        batch_size: int = 65536,
    ) -> np.ndarray:
        """Draw ILR samples of one flavour: ``n`` of them, or one per context row.

        Samples are clipped to the standardised domain :math:`[-B, B]` (the data lie within
        :math:`B - m`), which keeps them inside the ILR range of clipped probabilities.
        """
        index = self.classes.index(flavour) if isinstance(flavour, str) else int(flavour)
        device = self.x_mean.device
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            if self.n_context:
                if context is None:
                    msg = "conditional flows need one context row per sample; pass context"
                    raise ValueError(msg)
                out = []
                for start in range(0, len(context), batch_size):
                    cb = torch.as_tensor(
                        context[start : start + batch_size], dtype=torch.float32, device=device
                    )
                    dist = self.flows[index](self.standardise_context(cb))
                    out.append(dist.sample())
                u = torch.cat(out) if out else torch.zeros(0, self.n_features)
            else:
                if n is None:
                    n = 0 if context is None else len(context)
                u = self.flows[index]().sample((int(n),))
        finally:
            torch.random.set_rng_state(gen_state)
        bound = self.config.bound
        u = u.clamp(-bound, bound)
        return self.destandardise(u).double().cpu().numpy()


def train_component(
    flows: FlavourFlows,
    index: int,
    u: torch.Tensor,
    context_std: torch.Tensor | None,
    weight: np.ndarray,
    steps: int,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    final_lr: float | None = None,
) -> float:
    r"""Maximise :math:`\sum_i w_i \log q_f(u_i)` for one flavour by minibatch Adam.

    Minibatches are drawn with probability :math:`\propto |w_i|` (importance sampling), so
    the mean of :math:`-\mathrm{sign}(w_i) \log q_f(u_i)` over a batch is an unbiased
    estimate of the normalised weighted NLL; this makes an M-step on responsibilities
    :math:`\gamma_{r,i,f} w_i` (Kim & Yang eq. 23) cost the same for every flavour however
    small its share. With ``final_lr``, the learning rate follows a cosine from the
    optimizer's current rate (step 0) to ``final_lr`` (last step); the optimizer is left at
    its starting rate. Returns the mean loss of the last 10 steps.
    """
    if steps <= 0:
        return float("nan")
    absw = np.abs(weight)
    total = absw.sum()
    if not np.isfinite(total) or total <= 0:
        msg = f"weights of flavour {flows.classes[index]!r} sum to {total}; cannot train its flow"
        raise ValueError(msg)
    # inverse-CDF draws, the very algorithm (and random stream) of
    # rng.choice(n, size, p=absw / total), without its O(n) cumsum and checks per step
    cdf = np.cumsum(absw / total)
    cdf /= cdf[-1]
    sign = torch.as_tensor(np.sign(weight), dtype=torch.float32, device=u.device)
    batch = flows.config.batch_size
    sigma = flows.config.dequantize_sigma
    component = flows.flows[index]
    component.train()  # this component only: other flavours may train in other threads
    losses = []
    lr0 = [group["lr"] for group in optimizer.param_groups]
    for step in range(steps):
        if final_lr is not None:
            cos = 0.5 * (1.0 + math.cos(math.pi * step / max(steps - 1, 1)))
            for group, start in zip(optimizer.param_groups, lr0, strict=True):
                group["lr"] = final_lr + (start - final_lr) * cos
        idx_np = cdf.searchsorted(rng.random(batch), side="right")
        idx = torch.as_tensor(idx_np, device=u.device)
        ub = u[idx]
        if flows.dequantizer is not None:
            xb = flows.destandardise(ub).double().cpu().numpy()
            xb = flows.dequantizer(xb, rng)
            ub = flows.standardise(torch.as_tensor(xb, dtype=ub.dtype, device=ub.device))
        if sigma > 0:
            noise = torch.as_tensor(
                rng.normal(0.0, sigma, size=ub.shape), dtype=ub.dtype, device=ub.device
            )
            ub = ub + noise
        cb = None if context_std is None else context_std[idx]
        loss = -(sign[idx] * flows.component_log_prob(index, ub, cb)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    for group, start in zip(optimizer.param_groups, lr0, strict=True):
        group["lr"] = start
    component.eval()
    return float(np.mean(losses[-10:]))


@contextmanager
def _one_intraop_thread() -> Iterator[None]:
    """Run torch CPU ops on one intra-op thread inside the block, then restore the count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def default_flow_threads(n_flavours: int) -> int:
    """Threads for the flavour flows: one per flavour, at most one per CPU core plus one.

    torch releases the GIL in its kernels, so a third thread on two cores still gains
    (docs/em.md, "Flavour flows in threads").
    """
    return max(1, min(int(n_flavours), (os.cpu_count() or 1) + 1))


def train_components(
    flows: FlavourFlows,
    u: torch.Tensor,
    context_std: torch.Tensor | None,
    weights: Sequence[np.ndarray],
    steps: int,
    optimizers: Sequence[torch.optim.Optimizer],
    seeds: Sequence[int] | np.ndarray,
    threads: int | None = None,
    on_done: Callable[[int], None] | None = None,
    final_lr: float | None = None,
) -> list[float]:
    """Train every flavour's flow (:func:`train_component`), the flavours side by side.

    The flavours' flows, optimizers and minibatch streams are independent (flavour ``i``
    draws from ``numpy.random.default_rng(seeds[i])``), so they run in ``threads`` Python
    threads (torch releases the GIL in its kernels). Every flow trains on one intra-op
    torch thread whatever ``threads`` is, which makes the result identical for any
    thread count (``threads=1``: one flavour after the other). ``None``:
    :func:`default_flow_threads`. ``on_done(i)`` is called when flavour ``i`` has
    finished (e.g. to advance a progress bar). Returns the final losses per flavour.
    """
    n = len(flows.classes)
    if not (len(weights) == len(optimizers) == len(seeds) == n):
        msg = f"need one weight array, optimizer and seed per flavour ({n})"
        raise ValueError(msg)

    def job(i: int) -> float:
        rng = np.random.default_rng(int(seeds[i]))
        loss = train_component(
            flows, i, u, context_std, weights[i], steps, optimizers[i], rng, final_lr
        )
        if on_done is not None:
            on_done(i)
        return loss

    n_threads = default_flow_threads(n) if threads is None else max(1, min(int(threads), n))
    with _one_intraop_thread():
        if n_threads == 1 or u.device.type != "cpu":
            return [job(i) for i in range(n)]
        with ThreadPoolExecutor(n_threads, thread_name_prefix="otcal-flow") as pool:
            return list(pool.map(job, range(n)))


def pretrain_flows(
    flows: FlavourFlows,
    x: np.ndarray,
    flavour_index: np.ndarray,
    weight: np.ndarray,
    context: np.ndarray | None = None,
    optimizers: Sequence[torch.optim.Optimizer] | None = None,
    seed: int = 0,
    progress: bool = True,
    threads: int | None = None,
) -> list[float]:
    """MC-supervised pretraining of :math:`q_f^{MC}` on labelled jets (Kim & Yang Sec. VII).

    Each flavour's flow maximises the weighted likelihood of the MC jets of that flavour;
    the pretrained flows initialise EM and fix the flavour-label semantics (Sec. III.1,
    "practical identifiability"). The standardisation must already be set
    (:meth:`FlavourFlows.fit_standardisation`).

    Arguments:
        flows: the component flows (trained in place).
        x: ILR coordinates ``(n, D-1)``.
        flavour_index: class index of each jet, ``(n,)`` integers in ``[0, n_flavours)``.
        weight: event weights ``(n,)``.
        context: ``(n, k)`` kinematic context for conditional flows.
        optimizers: one optimizer per flavour (created with the config's learning rate
            when omitted).
        seed: random seed of the minibatch sampling (one stream per flavour is drawn
            from it).
        progress: show a progress bar.
        threads: flavours trained side by side (:func:`train_components`; the result does
            not depend on it).

    Returns:
        The final mean training loss per flavour.
    """
    device = flows.x_mean.device
    u = flows.standardise(torch.as_tensor(x, dtype=torch.float32, device=device))
    c = None
    if flows.n_context:
        c = flows.standardise_context(torch.as_tensor(context, dtype=torch.float32, device=device))
    if optimizers is None:
        optimizers = [
            torch.optim.Adam(f.parameters(), lr=flows.config.learning_rate) for f in flows.flows
        ]
    for i, name in enumerate(flows.classes):
        if not (flavour_index == i).any():
            msg = f"flavour {name!r} is absent from the MC; its component flow cannot be pretrained"
            raise ValueError(msg)
    seeds = np.random.default_rng(seed).integers(0, 2**63, size=len(flows.classes))
    weights = [np.where(flavour_index == i, weight, 0.0) for i in range(len(flows.classes))]
    with tqdm(
        total=len(flows.classes), desc="pretrain flows", disable=not progress, leave=False
    ) as bar:
        losses = train_components(
            flows, u, c, weights, flows.config.pretrain_steps, optimizers, seeds, threads,
            on_done=lambda _i: bar.update(1), final_lr=flows.config.pretrain_final_lr,
        )
    for name, loss in zip(flows.classes, losses, strict=True):
        logger.info("pretrained flow %s: final NLL %.4f (standardised units)", name, loss)
    return losses


def state_to_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    """Copy a module's state dict to numpy arrays (for npz files, no pickle).

    Copies, not views: ``Tensor.numpy()`` shares the parameters' memory, so a view taken
    after pretraining would follow every later optimiser step.
    """
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def state_from_numpy(arrays: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`state_to_numpy`."""
    return {k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()}
