"""Versions of the packages that write a file: every file coffea-otcal writes records them."""

from __future__ import annotations

__all__ = ["installed_version", "package_versions"]

from importlib import metadata


def installed_version(name: str) -> str | None:
    """The installed version of distribution ``name``, read without importing it (None if absent).

    Example:
        >>> installed_version("numpy") is not None
        True
    """
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_versions(*names: str) -> dict[str, str]:
    """``{"coffea_otcal": ..., name: version, ...}`` for the named distributions.

    Distributions that are not installed are left out (e.g. torch on an analysis node).

    Example:
        >>> sorted(package_versions("numpy"))
        ['coffea_otcal', 'numpy']
    """
    from coffea_otcal import __version__

    found = {name: installed_version(name) for name in names}
    return {"coffea_otcal": __version__, **{k: v for k, v in found.items() if v is not None}}
