"""Optimal-transport calibration of jet-tagger outputs for coffea columnar analyses."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
