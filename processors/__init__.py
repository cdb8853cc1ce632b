"""coffea processors of coffea-otcal (installed as ``coffea_otcal.processors``)."""

from __future__ import annotations
