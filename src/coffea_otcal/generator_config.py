"""Configuration of the toy NanoAOD generator: regions and their flavour fractions, kinematics, mismodelling, latent mode."""

from __future__ import annotations

__all__ = [
    "FlavourFractions",
    "GeneratorConfig",
    "KinematicsConfig",
    "LatentConfig",
    "MismodellingConfig",
    "RegionConfig",
    "default_regions",
]

import json
import os
import re
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from coffea_otcal.atomic import atomic_write_text


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FlavourFractions(_Model):
    """Flavour composition of a region (fractions of b, c and light jets).

    The three values must be in ``[0, 1]`` and sum to one within ``1e-3`` (Kim & Yang's
    Table 1 light row sums to 1.0002); they are re-closed before sampling.
    """

    b: float = Field(ge=0.0, le=1.0, description="fraction of b jets (hadronFlavour 5)")
    c: float = Field(ge=0.0, le=1.0, description="fraction of c jets (hadronFlavour 4)")
    light: float = Field(ge=0.0, le=1.0, description="fraction of light jets (hadronFlavour 0)")

    @model_validator(mode="after")
    def _sums_to_one(self) -> FlavourFractions:
        total = self.b + self.c + self.light
        if abs(total - 1.0) > 1e-3:
            msg = (
                f"flavour fractions b={self.b}, c={self.c}, light={self.light} sum to {total:.6g}; "
                f"they must sum to 1 (within 1e-3)"
            )
            raise ValueError(msg)
        return self

    def as_array(self) -> np.ndarray:
        """The re-closed fractions in class order (b, c, light)."""
        arr = np.array([self.b, self.c, self.light], dtype=np.float64)
        return arr / arr.sum()


class RegionConfig(_Model):
    """One region: its MC and pseudo-data flavour compositions and jet counts."""

    mc_fractions: FlavourFractions = Field(description="flavour fractions of the simulation")
    data_fractions: FlavourFractions | None = Field(
        default=None, description="true flavour fractions of the pseudo-data (default: as MC)"
    )
    n_jets: int = Field(default=50_000, ge=1, description="jets in the MC sample (before scale)")
    n_jets_data: int | None = Field(
        default=None, ge=1, description="jets in the pseudo-data sample (default: n_jets)"
    )

    def fractions(self, is_data: bool) -> FlavourFractions:
        """The configured fractions of the MC or the pseudo-data sample."""
        return (self.data_fractions or self.mc_fractions) if is_data else self.mc_fractions


def default_regions() -> dict[str, RegionConfig]:
    """Kim & Yang (2026) Table 1 control regions plus a 1:1:1 validation region.

    Returns:
        ``cr_b``, ``cr_c``, ``cr_light`` (50k jets each) and ``vr`` (30k jets); pseudo-data
        fractions are shifted by a few per cent from the MC ones in the control regions.
    """
    third = FlavourFractions(b=1 / 3, c=1 / 3, light=1 / 3)
    return {
        "cr_b": RegionConfig(
            mc_fractions=FlavourFractions(b=0.90, c=0.04, light=0.06),
            data_fractions=FlavourFractions(b=0.87, c=0.05, light=0.08),
        ),
        "cr_c": RegionConfig(
            mc_fractions=FlavourFractions(b=0.05, c=0.8886, light=0.0614),
            data_fractions=FlavourFractions(b=0.07, c=0.85, light=0.08),
        ),
        "cr_light": RegionConfig(
            mc_fractions=FlavourFractions(b=0.0505, c=0.0887, light=0.861),
            data_fractions=FlavourFractions(b=0.04, c=0.11, light=0.85),
        ),
        "vr": RegionConfig(mc_fractions=third, data_fractions=third, n_jets=30_000),
    }


class KinematicsConfig(_Model):
    r"""Jet kinematics and event structure (same for MC and pseudo-data, all regions).

    :math:`p_T = p_T^{\min} + \Gamma(k, \theta_f)` truncated at :math:`p_T^{\max}`, with
    a flavour-dependent scale :math:`\theta_f` (b jets from top decays are harder);
    :math:`\eta` is a Gaussian truncated to the tracker; jets per event are
    :math:`1 + \mathrm{Poisson}(\bar n - 1)` capped at ``jets_per_event_max``.
    """

    pt_min: float = Field(default=20.0, gt=0.0, description="lowest jet pT in GeV")
    pt_max: float = Field(default=1000.0, gt=0.0, description="highest jet pT in GeV")
    pt_shape: float = Field(default=1.3, gt=0.0, description="Gamma shape k of pT - pt_min")
    pt_scale_b: float = Field(default=38.0, gt=0.0, description="Gamma scale of b jets, GeV")
    pt_scale_c: float = Field(default=32.0, gt=0.0, description="Gamma scale of c jets, GeV")
    pt_scale_light: float = Field(default=28.0, gt=0.0, description="Gamma scale of light jets")
    eta_max: float = Field(default=2.5, gt=0.0, le=5.0, description="|eta| acceptance")
    eta_width: float = Field(default=1.4, gt=0.0, description="width of the eta Gaussian")
    jets_per_event_mean: float = Field(default=5.0, ge=1.0, description="mean jets per event")
    jets_per_event_max: int = Field(default=15, ge=1, description="most jets in one event")

    @model_validator(mode="after")
    def _ordered(self) -> KinematicsConfig:
        if self.pt_max <= self.pt_min:
            msg = f"pt_max={self.pt_max} must exceed pt_min={self.pt_min}"
            raise ValueError(msg)
        return self


class MismodellingConfig(_Model):
    r"""Pseudo-data mismodelling of the tagger inputs (see :func:`latent_tagger.smear_features`).

    Extra resolution :math:`\sigma(p_T) = S\,\sigma_0 \max(0, 1 + \beta\ln(p_T/p_T^{\rm ref}))`
    on the track and vertex features and a secondary-vertex loss probability
    :math:`S\,d`; ``strength`` :math:`S = 0` makes pseudo-data follow the MC response.
    """

    strength: float = Field(default=1.0, ge=0.0, le=10.0, description="global scale S")
    smear_sigma: float = Field(default=0.7, ge=0.0, description="sigma_0 at pt_ref (feature units)")
    smear_pt_slope: float = Field(default=0.3, description="beta: log-pT slope of the smearing")
    smear_pt_ref: float = Field(default=50.0, gt=0.0, description="pt_ref in GeV")
    sv_dropout: float = Field(default=0.08, ge=0.0, le=1.0, description="vertex loss probability d")


class LatentConfig(_Model):
    """Latent mode: a frozen network gives the latent ``z`` and, through its head, the scores."""

    enabled: bool = Field(default=False, description="store the latent z and use the network head")
    latent_dim: int = Field(default=128, ge=16, le=1024, description="dimension of z")
    network_seed: int = Field(default=20260, ge=0, description="seed of the frozen network")
    branch_prefix: str = Field(
        default="latent", pattern=r"^[A-Za-z][A-Za-z0-9]*$", description="Jet_<prefix>_<i>"
    )


class GeneratorConfig(_Model):
    """Everything that defines a generated sample (loadable from JSON or YAML).

    Example:
        >>> cfg = GeneratorConfig(seed=3, scale=0.01)
        >>> sorted(cfg.regions), cfg.jets("vr", is_data=True)
        (['cr_b', 'cr_c', 'cr_light', 'vr'], 300)
    """

    seed: int = Field(default=42, ge=0, description="seed of the sample (not of the tagger)")
    scale: float = Field(default=1.0, gt=0.0, description="multiplies every region's jet count")
    regions: dict[str, RegionConfig] = Field(
        default_factory=default_regions, description="region name -> region"
    )
    kinematics: KinematicsConfig = Field(default_factory=KinematicsConfig)
    mismodelling: MismodellingConfig = Field(default_factory=MismodellingConfig)
    latent: LatentConfig = Field(default_factory=LatentConfig)
    tagger: Literal["deepjet", "upart", "pnet", "robustpart", "gn2", "dl1d"] = Field(
        default="deepjet", description="adapter whose columns are written"
    )
    quantise: bool = Field(default=True, description="NanoAOD reduced precision of scores")
    mantissa_bits: int = Field(default=10, ge=1, le=23, description="stored mantissa bits")
    mc_gen_weight: float = Field(default=1.0, description="genWeight of every MC event")
    layout: Literal["nanoaod", "physlite"] = Field(
        default="nanoaod",
        description="file layout: NanoAOD (Events, Jet_*) or ATLAS PHYSLITE (CollectionTree, "
        "AnalysisJetsAuxDyn.*, MeV, scores in a linked BTagging container)",
    )

    @model_validator(mode="after")
    def _physlite_without_latent(self) -> GeneratorConfig:
        if self.layout == "physlite" and self.latent.enabled:
            msg = "the latent mode writes NanoAOD-style Jet_latent_* branches: use layout nanoaod"
            raise ValueError(msg)
        return self

    @property
    def tree(self) -> str:
        """The event tree of the layout."""
        return "CollectionTree" if self.layout == "physlite" else "Events"

    @field_validator("regions")
    @classmethod
    def _region_names(cls, regions: dict[str, RegionConfig]) -> dict[str, RegionConfig]:
        if not regions:
            msg = "at least one region is needed"
            raise ValueError(msg)
        for name in regions:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                msg = f"region name {name!r} must match [a-z][a-z0-9_]* (it names files)"
                raise ValueError(msg)
        return regions

    def jets(self, region: str, is_data: bool) -> int:
        """Number of jets of a region's MC or pseudo-data sample, after ``scale``."""
        reg = self.region(region)
        n = (reg.n_jets_data or reg.n_jets) if is_data else reg.n_jets
        return max(1, round(n * self.scale))

    def region(self, region: str) -> RegionConfig:
        """The configuration of a region; ``KeyError`` naming the known regions otherwise."""
        try:
            return self.regions[region]
        except KeyError:
            msg = f"unknown region {region!r}; configured regions: {sorted(self.regions)}"
            raise KeyError(msg) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> GeneratorConfig:
        """Load a configuration from a ``.json``, ``.yaml`` or ``.yml`` file."""
        p = Path(path)
        text = p.read_text()
        if p.suffix == ".json":
            data = json.loads(text)
        elif p.suffix in {".yaml", ".yml"}:
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            msg = f"generator config {p} must end in .json, .yaml or .yml"
            raise ValueError(msg)
        return cls.model_validate(data)

    def to_file(self, path: str | os.PathLike[str]) -> None:
        """Write the configuration as JSON (``.json``) or YAML (``.yaml``/``.yml``)."""
        p = Path(path)
        data = self.model_dump(mode="json")
        if p.suffix in {".yaml", ".yml"}:
            import yaml

            atomic_write_text(p, yaml.safe_dump(data, sort_keys=False))
        else:
            atomic_write_text(p, json.dumps(data, indent=2) + "\n")
