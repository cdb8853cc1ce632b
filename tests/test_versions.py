"""Tests of coffea_otcal.versions: the writer information every file records."""

from __future__ import annotations

import sys

import numpy as np

from coffea_otcal import __version__
from coffea_otcal.versions import installed_version, package_versions


def test_versions_are_read_without_importing_and_absent_ones_left_out(monkeypatch):
    monkeypatch.delitem(sys.modules, "pyarrow", raising=False)
    info = package_versions("numpy", "pyarrow", "no-such-distribution-otcal")
    assert info["coffea_otcal"] == __version__
    assert info["numpy"] == np.__version__
    assert "no-such-distribution-otcal" not in info
    assert installed_version("no-such-distribution-otcal") is None
    assert "pyarrow" not in sys.modules  # read from the metadata, not by importing it
    assert list(info) == ["coffea_otcal", "numpy", "pyarrow"]
