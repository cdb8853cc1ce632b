"""Settings of the neural OT trainers (OTConfig), default potential widths and the device choice."""

from __future__ import annotations

__all__ = ["OTConfig", "default_hidden", "resolve_device"]

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field


class OTConfig(BaseModel):
    """Hyper-parameters of :func:`fit_ot_map` (validated; recorded in the export metrics)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["conjugate", "minimax"] = Field(
        default="conjugate",
        description="'conjugate' (semi-dual, amortised conjugate; default) or 'minimax' "
        "(Makkuva et al. two-ICNN reference)",
    )
    hidden: tuple[int, ...] | None = Field(default=None, description="ICNN widths (None: by dim)")
    context_hidden: tuple[int, ...] | None = Field(default=None, description="PICNN trunk widths")
    activation: Literal["smooth_relu", "softplus"] = "smooth_relu"
    strong_convexity: float = Field(default=1e-3, ge=0.0, description="quadratic floor mu")
    steps: int = Field(default=3000, ge=1, description="optimiser steps (minimax: f updates)")
    batch_size: int = Field(default=1024, ge=2)
    lr: float = Field(default=1e-2, gt=0.0, description="AdamW peak learning rate")
    lr_final: float = Field(default=1e-4, ge=0.0, description="end of the cosine schedule")
    warmup_steps: int = Field(default=50, ge=0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    grad_clip: float = Field(default=10.0, gt=0.0, description="max gradient norm")
    init: Literal["gaussian", "identity", "minibatch_ot"] = Field(
        default="gaussian",
        description="'gaussian': start from the closed-form W2 map between Gaussian fits of "
        "source and target (quadratic + linear terms); 'identity': identity pre-training; "
        "'minibatch_ot': the Gaussian start, then least squares of grad g on the "
        "barycentric targets of exact OT plans between blocks of rows (low dimensions; "
        "docs/ot.md)",
    )
    identity_steps: int = Field(default=200, ge=0, description="identity pre-training steps")
    pretrain_steps: int = Field(
        default=8000, ge=0, description="minibatch_ot: least-squares steps on the block targets"
    )
    pretrain_block: int = Field(
        default=2048, ge=2, description="minibatch_ot: rows per side of one exact OT problem"
    )
    pretrain_rows: int = Field(
        default=200_000, ge=2, description="minibatch_ot: rows per side paired by block plans"
    )
    pretrain_lr: float = Field(
        default=1e-2, gt=0.0, description="minibatch_ot: peak learning rate of the regression"
    )
    pretrain_context_cost: float = Field(
        default=100.0,
        ge=0.0,
        description="minibatch_ot: weight of the (standardised) context distance in the "
        "block cost, so that jets are paired within nearly equal contexts",
    )
    conjugate_steps: int = Field(default=10, ge=1, description="max ascent steps per step")
    eval_conjugate_steps: int = Field(
        default=30, ge=1, description="ascent steps for held-out dual"
    )
    g_steps: int = Field(default=10, ge=1, description="minimax: g updates per f update")
    validation_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    max_validation: int = Field(default=8192, ge=10)
    eval_every: int = Field(default=250, ge=1)
    max_time_s: float | None = Field(
        default=None,
        gt=0.0,
        description="wall-time budget: evaluate and stop at the first step after it "
        "(the schedule still follows 'steps'; not reproducible across machines)",
    )
    patience: int | None = Field(
        default=None, ge=1, description="stop after this many evaluations without improvement"
    )
    selection: Literal["dual", "last"] = Field(
        default="dual",
        description="returned state: 'dual', the evaluation with the lowest held-out dual; "
        "'last', the final state of the annealed schedule (where the held-out dual is too "
        "flat to rank states, e.g. ILR maps of b jets: docs/ot.md)",
    )
    ema_decay: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="exponential moving average of the potential's parameters with this "
        "decay per step (None: off); the average is what is evaluated, selected and "
        "returned. Averaging keeps the hidden-to-hidden weights non-negative, so the "
        "averaged potential is convex too",
    )
    checkpoint_every: int = Field(default=500, ge=1)
    min_samples: int = Field(default=100, ge=2, description="fewest jets accepted per side")
    negative_weights: Literal["keep", "clip"] = Field(
        default="keep", description="keep signed MC weights or set negative ones to 0"
    )
    dtype: Literal["float32", "float64"] = "float32"


def default_hidden(
    dim: int, context_dim: int = 0
) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Default (hidden, context_hidden) widths.

    Small for d <= 4 (ILR maps of a tagger: the numpy applier must run at >= 2e6 jets/s per
    core, see ``docs/ot.md``), the W2-benchmark sizes above.
    """
    if dim <= 4:
        return ((16, 16), (8, 8)) if context_dim else ((32, 32), None)
    return (max(2 * dim, 64), max(2 * dim, 64), max(dim, 32)), None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` if available else ``cpu``; otherwise ``torch.device(device)``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"device {device!r} requested but CUDA is not available; use device='auto' or 'cpu'"
        raise ValueError(msg)
    return dev
