"""Neural optimal-transport trainers: Brenier maps T(x | c) = grad_x g(x | c) from samples."""

from __future__ import annotations

__all__ = ["FittedMap", "OTConfig", "default_hidden", "fit_ot_map", "resolve_device"]

import copy
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from coffea_otcal.kernels import FITTED_MAP_FORMAT, FITTED_MAP_VERSION, FittedMap
from coffea_otcal.ot_config import OTConfig, default_hidden, resolve_device
from coffea_otcal.ot_losses import (
    conjugate_dual_loss,
    held_out_dual,
    identity_loss,
    minimax_f_loss,
    minimax_g_loss,
    solve_conjugate,
)
from coffea_otcal.ot_prep import (
    check_array,
    check_weights,
    gaussian_w2_map,
    set_affine,
    weighted_moments,
)
from coffea_otcal.ot_pretrain import blockwise_ot_targets, fit_gradient_regression
from coffea_otcal.potentials import ICNN, PICNN, ICNNConfig, PICNNConfig, potential_from_export

logger = logging.getLogger(__name__)


class _Data:
    """Standardised, split tensors of one side (train / validation)."""

    def __init__(self, x: Tensor, c: Tensor | None, w: Tensor) -> None:
        self.x, self.c, self.w = x, c, w

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        return self.x[idx], None if self.c is None else self.c[idx], self.w[idx]


def _split(
    x: np.ndarray,
    c: np.ndarray | None,
    w: np.ndarray,
    cfg: OTConfig,
    gen: np.random.Generator,
    to: dict[str, Any],
) -> tuple[_Data, _Data]:
    perm = gen.permutation(len(x))
    n_val = min(max(1, round(cfg.validation_fraction * len(x))), cfg.max_validation)
    val, tr = perm[:n_val], perm[n_val:]
    w_tr = w[tr] / w[tr].mean()
    w_val = w[val] / w[val].mean() if w[val].sum() > 0 else w[val]

    def tensor(a: np.ndarray) -> Tensor:
        return torch.as_tensor(a, **to)

    def side(idx: np.ndarray, ww: np.ndarray) -> _Data:
        return _Data(tensor(x[idx]), None if c is None else tensor(c[idx]), tensor(ww))

    return side(tr, w_tr), side(val, w_val)


def _build(cfg: OTConfig, dim: int, context_dim: int, seed: int) -> ICNN | PICNN:
    hidden, trunk = default_hidden(dim, context_dim)
    hidden = cfg.hidden or hidden
    trunk = cfg.context_hidden or (trunk if cfg.hidden is None else None)
    if context_dim == 0:
        return ICNN(
            ICNNConfig(
                dim=dim,
                hidden=hidden,
                activation=cfg.activation,
                strong_convexity=cfg.strong_convexity,
            ),
            seed=seed,
        )
    return PICNN(
        PICNNConfig(
            dim=dim,
            context_dim=context_dim,
            hidden=hidden,
            context_hidden=trunk,
            activation=cfg.activation,
            strong_convexity=cfg.strong_convexity,
        ),
        seed=seed,
    )


def _schedule(cfg: OTConfig) -> Any:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        floor = cfg.lr_final / cfg.lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))

    return factor


class _Trainer:
    """One training run (state, steps, evaluation, checkpoints); used by :func:`fit_ot_map`."""

    def __init__(
        self,
        cfg: OTConfig,
        src: tuple[_Data, _Data],
        tgt: tuple[_Data, _Data],
        g: ICNN | PICNN,
        f: ICNN | PICNN | None,
        device: torch.device,
        seed: int,
        name: str,
    ) -> None:
        self.cfg, self.device, self.seed, self.name = cfg, device, seed, name
        (self.src, self.src_val), (self.tgt, self.tgt_val) = src, tgt
        self.g, self.f = g, f
        self.nets = [g] if f is None else [g, f]
        # Polyak averaging of g (the exported potential): a convex combination of
        # parameter sets with non-negative hidden-to-hidden weights is one too.
        self.ema = (
            None
            if cfg.ema_decay is None
            else AveragedModel(g, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
        )
        factor = _schedule(cfg)
        self.opts = [
            torch.optim.AdamW(
                n.parameters(),
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                betas=(0.5, 0.9) if cfg.method == "minimax" else (0.9, 0.999),
            )
            for n in self.nets
        ]
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in self.opts]
        self.gen = torch.Generator(device=device).manual_seed(seed)
        # Amortised conjugate: warm start per target sample (train and validation).
        self.x_hat = self.tgt.x.clone()
        self.eta = torch.ones(len(self.tgt.x), dtype=self.tgt.x.dtype, device=device)
        self.x_hat_val = self.tgt_val.x.clone()
        self.step = 0
        self.best: tuple[float, int, list[dict[str, Tensor]]] | None = None
        self.history: list[dict[str, float]] = []
        self.last_good: dict[str, Any] | None = None

    # ----------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        return copy.deepcopy(
            {
                "step": self.step,
                "nets": [n.state_dict() for n in self.nets],
                "opts": [o.state_dict() for o in self.opts],
                "scheds": [s.state_dict() for s in self.scheds],
                "gen": self.gen.get_state(),
                "x_hat": self.x_hat,
                "eta": self.eta,
                "x_hat_val": self.x_hat_val,
                "best": self.best,
                "history": self.history,
                "ema": None if self.ema is None else self.ema.state_dict(),
            }
        )

    def load(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        for n, s in zip(self.nets, state["nets"], strict=True):
            n.load_state_dict(s)
        for o, s in zip(self.opts, state["opts"], strict=True):
            o.load_state_dict(s)
        for sc, s in zip(self.scheds, state["scheds"], strict=True):
            sc.load_state_dict(s)
        self.gen.set_state(state["gen"])
        self.x_hat, self.eta, self.x_hat_val = state["x_hat"], state["eta"], state["x_hat_val"]
        self.best, self.history = state["best"], list(state["history"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    @property
    def eval_net(self) -> ICNN | PICNN:
        """The potential that is evaluated and returned: the average once one is kept."""
        if self.ema is None or int(self.ema.n_averaged) == 0:
            return self.g
        return self.ema.module  # type: ignore[return-value]

    # ----------------------------------------------------------------- steps
    def _batch(self, data: _Data) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        idx = torch.randint(
            len(data.x),
            (min(self.cfg.batch_size, len(data.x)),),
            generator=self.gen,
            device=self.device,
        )
        return (idx, *data.take(idx))

    def _update(self, net: ICNN | PICNN, opt: torch.optim.Optimizer, loss: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), self.cfg.grad_clip)
        opt.step()
        net.project()

    def pretrain_identity(self) -> None:
        for net in self.nets:
            opt = torch.optim.AdamW(net.parameters(), lr=self.cfg.lr)
            for _ in range(self.cfg.identity_steps):
                _, xs, cs, _ = self._batch(self.src)
                _, ys, ct, _ = self._batch(self.tgt)
                both = torch.cat([xs, ys])
                ctx = None if cs is None or ct is None else torch.cat([cs, ct])
                self._update(net, opt, identity_loss(net, both, ctx))

    def pretrain_minibatch_ot(self) -> dict[str, Any]:
        """Least squares of grad g on the barycentric targets of block OT plans (init='minibatch_ot')."""
        cfg = self.cfg

        def host(t: Tensor) -> np.ndarray:
            return t.detach().cpu().double().numpy()

        pairs = blockwise_ot_targets(
            host(self.src.x), host(self.tgt.x),
            x_context=None if self.src.c is None else host(self.src.c),
            y_context=None if self.tgt.c is None else host(self.tgt.c),
            x_weight=host(self.src.w), y_weight=host(self.tgt.w),
            block=cfg.pretrain_block, max_rows=cfg.pretrain_rows,
            context_cost=cfg.pretrain_context_cost,
            rng=np.random.default_rng([self.seed, 7]), name=self.name,
        )

        def tensor(a: np.ndarray) -> Tensor:
            return torch.as_tensor(a, dtype=self.src.x.dtype, device=self.device)

        start = time.perf_counter()
        loss = fit_gradient_regression(
            self.g, tensor(pairs["x"]),
            None if pairs["context"] is None else tensor(pairs["context"]),
            tensor(pairs["target"]), tensor(pairs["weight"]),
            steps=cfg.pretrain_steps, batch_size=cfg.batch_size, lr=cfg.pretrain_lr,
            lr_final=cfg.pretrain_lr * 1e-2, grad_clip=cfg.grad_clip, generator=self.gen,
        )
        return {"rows": len(pairs["x"]), "blocks": pairs["blocks"],
                "plan_seconds": pairs["seconds"], "regression_seconds": time.perf_counter() - start,
                "regression_loss": loss}

    def train_step(self) -> float:
        cfg = self.cfg
        if cfg.method == "conjugate":
            _, xs, cs, ws = self._batch(self.src)
            idx, ys, ct, wt = self._batch(self.tgt)
            x_hat, _, eta = solve_conjugate(
                self.g, ys, ct, self.x_hat[idx], cfg.conjugate_steps, self.eta[idx]
            )
            self.x_hat[idx], self.eta[idx] = x_hat, eta
            loss = conjugate_dual_loss(self.g, xs, cs, ws, x_hat, ys, ct, wt)
            self._update(self.g, self.opts[0], loss)
        else:
            assert self.f is not None
            for _ in range(cfg.g_steps):
                _, xs, cs, ws = self._batch(self.src)
                loss = minimax_g_loss(self.f, self.g, xs, cs, ws)
                self._update(self.g, self.opts[0], loss)
            _, xs, cs, ws = self._batch(self.src)
            _, ys, ct, wt = self._batch(self.tgt)
            self._update(
                self.f, self.opts[1], minimax_f_loss(self.f, self.g, xs, cs, ws, ys, ct, wt)
            )
        if self.ema is not None:
            self.ema.update_parameters(self.g)
        for s in self.scheds:
            s.step()
        self.step += 1
        return float(loss.detach())

    def evaluate(self) -> float:
        dual, self.x_hat_val, residual = held_out_dual(
            self.eval_net,
            self.src_val.x,
            self.src_val.c,
            self.src_val.w,
            self.tgt_val.x,
            self.tgt_val.c,
            self.tgt_val.w,
            self.x_hat_val,
            self.cfg.eval_conjugate_steps,
        )
        self.history.append({"step": self.step, "val_dual": dual, "conjugate_residual": residual})
        if math.isfinite(dual) and (self.best is None or dual < self.best[0]):
            nets = [self.eval_net, *self.nets[1:]]
            self.best = (dual, self.step, copy.deepcopy([n.state_dict() for n in nets]))
        return dual


def _fingerprint(arrays: tuple[Any, ...], cfg: OTConfig, seed: int,
                 init_from: FittedMap | None) -> str:
    """SHA-256 of what a training depends on: a checkpoint resumes only the same training."""
    digest = hashlib.sha256()
    for arr in arrays:
        if arr is None:
            digest.update(b"none")
            continue
        arr = np.ascontiguousarray(arr)
        digest.update(f"{arr.shape}{arr.dtype}".encode())
        digest.update(arr.tobytes())
    # stopping rules may change on resume; everything else sets the trajectory
    stopping = {"max_time_s", "patience", "checkpoint_every"}
    digest.update(cfg.model_dump_json(exclude=stopping).encode())
    digest.update(str(seed).encode())
    if init_from is not None:
        digest.update(json.dumps(init_from.export()["potential"], sort_keys=True).encode())
    return digest.hexdigest()


def _checkpoint_path(checkpoint_dir: Path | str | None, name: str) -> Path | None:
    if checkpoint_dir is None:
        return None
    folder = Path(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "map"
    return folder / f"{safe}.ckpt.pt"


def fit_ot_map(
    source: Any,
    target: Any,
    *,
    source_context: Any = None,
    target_context: Any = None,
    source_weight: Any = None,
    target_weight: Any = None,
    config: OTConfig | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: Path | str | None = None,
    init_from: FittedMap | None = None,
    name: str = "",
) -> FittedMap:
    r"""Fit the Brenier map :math:`T = \nabla_x g` from ``source`` samples to ``target`` samples.

    Minimises the semi-dual :math:`E_P[g] + E_Q[g^*]` over (P)ICNN potentials g with the
    conjugate solved by warm-started ascent (``method="conjugate"``, Amos 2023), or
    solves the Makkuva et al. minimax (Mind the Gap eq. 7, ``method="minimax"``). Data
    are standardised with one common affine map of isotropic scale (the map stays a
    gradient of a convex function in the original coordinates); context per coordinate.
    The returned map is the state with the lowest held-out dual (no ground truth used), or
    with ``selection="last"`` the final state of the schedule.

    Arguments:
        source: (n, d) source samples (e.g. MC ILR coordinates of one flavour).
        target: (m, d) target samples.
        source_context: (n, k) context (e.g. log pT, |eta|) or None for an ICNN.
        target_context: (m, k) context of the targets (same variables).
        source_weight: (n,) per-sample weights; may be negative (MC), see ``docs/ot.md``.
        target_weight: (m,) per-sample weights.
        config: hyper-parameters (:class:`OTConfig`).
        device: ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda"``, ...
        seed: seed of the initialisation, split and batch order (reproducible on CPU).
        progress: show a tqdm progress bar.
        checkpoint_dir: folder for ``<name>.ckpt.pt``; an existing checkpoint of the same
            training (inputs, settings, seed) is resumed, any other is refused.
        init_from: warm start (e.g. a variation from the nominal map); its preprocessing
            and architecture are reused and identity pre-training is skipped.
        name: label used in errors, logs and the export (e.g. ``"b"`` or ``"b/jesUp"``).

    Returns:
        The :class:`~coffea_otcal.kernels.FittedMap` (numpy evaluation, JSON export).

    Raises:
        ValueError: NaN/inf inputs, too few samples, mismatched dimensions or contexts.

    References:
        A. Makkuva et al., ICML 2020; B. Amos, ICLR 2023; Algren et al. 2025 eq. 7.
    """
    cfg = config or OTConfig()
    dev = resolve_device(device)
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    x = check_array(source, "source", name, 2, cfg.min_samples)
    y = check_array(target, "target", name, 2, cfg.min_samples)
    if x.shape[1] != y.shape[1]:
        msg = f"map {name!r}: source has dimension {x.shape[1]} but target has {y.shape[1]}"
        raise ValueError(msg)
    if (source_context is None) != (target_context is None):
        msg = f"map {name!r}: give a context for both source and target, or for neither"
        raise ValueError(msg)
    cx = cy = None
    if source_context is not None:
        cx = check_array(source_context, "source_context", name, 2, 0)
        cy = check_array(target_context, "target_context", name, 2, 0)
        if len(cx) != len(x) or len(cy) != len(y) or cx.shape[1] != cy.shape[1]:
            msg = (
                f"map {name!r}: context shapes {cx.shape} / {cy.shape} do not match the "
                f"samples {x.shape} / {y.shape}"
            )
            raise ValueError(msg)
    wx = check_weights(source_weight, len(x), "source_weight", name, cfg.negative_weights)
    wy = check_weights(target_weight, len(y), "target_weight", name, cfg.negative_weights)
    dim, kdim = x.shape[1], (0 if cx is None else cx.shape[1])

    if init_from is not None:
        if init_from.dim != dim or init_from.context_dim != kdim:
            msg = (
                f"map {name!r}: init_from has dim {init_from.dim} / context {init_from.context_dim}"
                f", data have {dim} / {kdim}"
            )
            raise ValueError(msg)
        shift, scale = init_from.shift, init_from.scale
        c_shift, c_scale = init_from.context_shift, init_from.context_scale
    else:
        mx, vx = weighted_moments(x, np.abs(wx))
        my, vy = weighted_moments(y, np.abs(wy))
        shift = 0.5 * (mx + my)
        scale = float(np.sqrt(0.5 * (vx.mean() + vy.mean() + 0.5 * np.sum((mx - my) ** 2) / dim)))
        scale = scale if scale > 0 else 1.0
        c_shift = c_scale = None
        if cx is not None and cy is not None:
            pooled = np.concatenate([cx, cy])
            c_shift, c_scale = pooled.mean(0), pooled.std(0)
            c_scale = np.where(c_scale > 0, c_scale, 1.0)
    if cx is not None and cy is not None and c_shift is not None and c_scale is not None:
        gap = np.abs(cx.mean(0) - cy.mean(0)) / c_scale
        if np.any(gap > 0.2):
            logger.warning(
                "map %r: source and target context marginals differ (standardised "
                "mean gap %s); reweight one side so they agree",
                name,
                np.round(gap, 2),
            )
        cx, cy = (cx - c_shift) / c_scale, (cy - c_shift) / c_scale
    xs, ys = (x - shift) / scale, (y - shift) / scale

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    to: dict[str, Any] = {"dtype": dtype, "device": dev}
    src = _split(xs, cx, wx, cfg, rng, to)
    tgt = _split(ys, cy, wy, cfg, rng, to)
    for label, (tr, _) in (("source", src), ("target", tgt)):
        if len(tr.x) < cfg.min_samples:
            msg = (
                f"map {name!r}: {label} keeps {len(tr.x)} training rows after the validation split"
            )
            raise ValueError(msg)

    if init_from is not None:
        g = potential_from_export(init_from.export()["potential"])
    else:
        g = _build(cfg, dim, kdim, seed)
    g = g.to(**to)
    f = _build(cfg, dim, kdim, seed + 1).to(**to) if cfg.method == "minimax" else None
    gaussian_start = init_from is None and cfg.init in ("gaussian", "minibatch_ot")
    if gaussian_start:
        a_mat, b_vec = gaussian_w2_map(xs, wx, ys, wy)
        set_affine(g, a_mat, b_vec)
        if f is not None:  # f is the target-side potential: its gradient is the inverse map
            a_inv = np.linalg.inv(a_mat)
            set_affine(f, a_inv, -a_inv @ b_vec)
    trainer = _Trainer(cfg, src, tgt, g, f, dev, seed, name)
    if gaussian_start:  # conjugate of the Gaussian start
        a_inv_t = torch.as_tensor(np.linalg.inv(a_mat), **to)
        b_t = torch.as_tensor(b_vec, **to)
        trainer.x_hat = (trainer.tgt.x - b_t) @ a_inv_t
        trainer.x_hat_val = (trainer.tgt_val.x - b_t) @ a_inv_t
    ckpt = _checkpoint_path(checkpoint_dir, name)
    fingerprint = None if ckpt is None else _fingerprint(
        (source, target, source_context, target_context, source_weight, target_weight),
        cfg, seed, init_from,
    )
    start, start_cpu = time.perf_counter(), time.process_time()
    resumed_from = 0
    pretrain: dict[str, Any] | None = None
    if ckpt is not None and ckpt.is_file():
        saved = torch.load(ckpt, map_location=dev, weights_only=False)
        if saved.get("fingerprint") != fingerprint:
            msg = (
                f"map {name!r}: checkpoint {ckpt} was written for other inputs, settings or "
                "seed (or by an older coffea-otcal); delete it or use another checkpoint_dir"
            )
            raise ValueError(msg)
        trainer.load(saved)
        resumed_from = trainer.step
        logger.info("map %r: resumed from %s at step %d", name, ckpt, trainer.step)
    elif init_from is None and cfg.init == "identity":
        trainer.pretrain_identity()
    elif init_from is None and cfg.init == "minibatch_ot":
        pretrain = trainer.pretrain_minibatch_ot()
    if trainer.step == 0:
        trainer.evaluate()
    trainer.last_good = trainer.state()
    diverged = False
    bar = tqdm(
        total=cfg.steps,
        initial=trainer.step,
        disable=not progress,
        desc=f"OT {name or 'map'}",
        leave=False,
    )
    stale = 0
    while trainer.step < cfg.steps:
        loss = trainer.train_step()
        bar.update(1)
        if not math.isfinite(loss):
            good = trainer.last_good
            assert good is not None
            trainer.load(good)
            logger.warning(
                "map %r: training diverged (loss %s) at step %d; restored the last good "
                "state (step %d) and stopped",
                name,
                loss,
                trainer.step + 1,
                good["step"],
            )
            diverged = True
            break
        over_time = cfg.max_time_s is not None and time.perf_counter() - start > cfg.max_time_s
        if trainer.step % cfg.eval_every == 0 or trainer.step == cfg.steps or over_time:
            best_before = trainer.best[0] if trainer.best else math.inf
            dual = trainer.evaluate()
            bar.set_postfix(loss=f"{loss:.4g}", val_dual=f"{dual:.5g}")
            if not math.isfinite(dual):
                trainer.load(trainer.last_good)
                logger.warning(
                    "map %r: held-out dual is %s at step %d; restored step %d and stopped",
                    name,
                    dual,
                    trainer.step,
                    trainer.last_good["step"],
                )
                diverged = True
                break
            trainer.last_good = trainer.state()
            stale = 0 if dual < best_before else stale + 1
            if cfg.patience is not None and stale >= cfg.patience:
                logger.info(
                    "map %r: early stop at step %d (no improvement in %d evaluations)",
                    name,
                    trainer.step,
                    stale,
                )
                break
            if over_time:
                logger.info(
                    "map %r: time budget %.0f s reached at step %d",
                    name,
                    cfg.max_time_s,
                    trainer.step,
                )
                break
        if ckpt is not None and trainer.step % cfg.checkpoint_every == 0:
            torch.save({**trainer.state(), "fingerprint": fingerprint}, ckpt)
    bar.close()
    if ckpt is not None and not diverged:
        torch.save({**trainer.state(), "fingerprint": fingerprint}, ckpt)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    assert trainer.best is not None
    if cfg.selection == "dual" or diverged:
        best_dual, best_step, best_states = trainer.best
        g.load_state_dict(best_states[0])
    else:  # the annealed final state, evaluated at the last step (or at an early stop)
        g.load_state_dict(trainer.eval_net.state_dict())
        best_dual, best_step = trainer.history[-1]["val_dual"], int(trainer.history[-1]["step"])
    metrics = {
        "method": cfg.method,
        "best_step": best_step,
        "val_dual": best_dual,
        "steps": trainer.step,
        "resumed_from": resumed_from,
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        "device": str(dev),
        "seed": seed,
        "diverged": diverged,
        "pretrain": pretrain,
        "n_source": len(x),
        "n_target": len(y),
        "history": trainer.history,
        "config": cfg.model_dump(mode="json"),
        "torch_version": torch.__version__,
    }
    pre = {
        "shift": [float(v) for v in shift],
        "scale": float(scale),
        "context_shift": None if c_shift is None else [float(v) for v in c_shift],
        "context_scale": None if c_scale is None else [float(v) for v in c_scale],
    }
    return FittedMap(
        {
            "format": FITTED_MAP_FORMAT,
            "version": FITTED_MAP_VERSION,
            "name": name,
            "potential": g.export(),
            "preprocessing": pre,
            "metrics": metrics,
        }
    )
