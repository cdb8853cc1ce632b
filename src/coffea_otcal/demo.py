"""``coffea-otcal demo``: generate a sample with known truth and run the whole chain on it."""

from __future__ import annotations

__all__ = ["add_arguments", "run"]

import argparse

from coffea_otcal.run_cli import add_demo_arguments, run_demo_cli


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``coffea-otcal demo``."""
    add_demo_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run the demo."""
    return run_demo_cli(args)
