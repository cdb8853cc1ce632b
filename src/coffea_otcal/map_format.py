"""The JSON layout of one exported transport map (potential, preprocessing), shared by kernels and bundle."""

from __future__ import annotations

__all__ = [
    "FITTED_MAP_FORMAT",
    "FITTED_MAP_VERSION",
    "FittedMapExport",
    "ICNNPotential",
    "PICNNPotential",
    "Potential",
    "Preprocessing",
    "check_finite",
    "parse_potential",
]

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

#: ``format`` tag and version of ``kernels.FittedMap.export()``.
FITTED_MAP_FORMAT = "coffea-otcal.fitted-map"
FITTED_MAP_VERSION = 1


class _Model(BaseModel):
    """Unknown fields are refused, instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_finite(value: Any, where: str) -> None:
    """Raise if a (nested) list of numbers holds NaN or inf, naming ``where``."""
    if isinstance(value, list):
        for item in value:
            check_finite(item, where)
    elif isinstance(value, float) and not math.isfinite(value):
        msg = f"{where} holds a non-finite number {value!r}; exports store finite numbers only"
        raise ValueError(msg)


class _PotentialExport(_Model):
    """Fields of an exported potential: constructor keywords and effective parameters."""

    config: dict[str, Any] = Field(description="constructor keywords of the potential")
    params: dict[str, Any] = Field(description="parameter name -> nested list of floats")

    @model_validator(mode="after")
    def _params_finite(self) -> _PotentialExport:
        for key, value in self.params.items():
            check_finite(value, f"{self.kind} parameter {key!r}")  # type: ignore[attr-defined]
        return self


class ICNNPotential(_PotentialExport):
    """An exported input-convex network (``coffea_otcal.potentials.ICNN.export()``)."""

    kind: Literal["icnn"] = Field(description="potential family")


class PICNNPotential(_PotentialExport):
    """An exported partially input-convex network conditioned on the context variables."""

    kind: Literal["picnn"] = Field(description="potential family")


Potential = Annotated[ICNNPotential | PICNNPotential, Field(discriminator="kind")]
_POTENTIAL = TypeAdapter(Potential)


def parse_potential(
    export: Mapping[str, Any] | ICNNPotential | PICNNPotential,
) -> ICNNPotential | PICNNPotential:
    """Validate a potential export ``{"kind", "config", "params"}`` (models pass through)."""
    if isinstance(export, ICNNPotential | PICNNPotential):
        return export
    return _POTENTIAL.validate_python(dict(export))


class Preprocessing(_Model):
    r"""Standardisation around the potential.

    The map is :math:`T(z \mid c) = m + s\, \nabla_x g\big((z - m)/s,\ (c - c_m)/c_s\big)`
    with a common isotropic shift ``m`` (d entries) and scale ``s`` of the transported
    coordinates, and per-variable context shift ``c_m`` and scale ``c_s`` (null without
    context).
    """

    shift: list[float] = Field(description="m: common shift, one entry per coordinate")
    scale: float = Field(gt=0, description="s: common isotropic scale")
    context_shift: list[float] | None = Field(default=None, description="c_m per context variable")
    context_scale: list[float] | None = Field(default=None, description="c_s per context variable")

    @model_validator(mode="after")
    def _check(self) -> Preprocessing:
        cshift, cscale = self.context_shift or [], self.context_scale or []
        check_finite([*self.shift, self.scale, *cshift, *cscale], "preprocessing")
        if len(cshift) != len(cscale):
            msg = (
                f"preprocessing: context_shift has {len(cshift)} entries but context_scale "
                f"has {len(cscale)}"
            )
            raise ValueError(msg)
        if any(s <= 0 for s in cscale):
            msg = f"preprocessing: context_scale must be > 0, got {cscale}"
            raise ValueError(msg)
        return self

    @property
    def n_context(self) -> int:
        """The number of context variables the map standardises."""
        return len(self.context_shift or [])


class FittedMapExport(_Model):
    """Versioned JSON layout of one fitted transport map (see ``docs/ot.md``)."""

    format: Literal["coffea-otcal.fitted-map"] = Field(description="format tag")
    version: Literal[1] = Field(description="layout version")
    name: str = Field(default="", description="free label, e.g. 'b' or 'b/comp_up'")
    potential: Potential = Field(description="the convex potential g (discriminated on kind)")
    preprocessing: Preprocessing = Field(description="standardisation of x and context")
    metrics: dict[str, Any] = Field(default_factory=dict, description="training metrics")
