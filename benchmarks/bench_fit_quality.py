"""The EM's data-only goodness of fit (``fit_quality``) of finished runs, and what it costs.

For each run folder (a ``coffea-otcal run`` / ``demo`` output, or any folder holding
``em/em_result.npz``) prints the table of ``coffea_otcal.em_diagnostics.fit_quality``:
data vs fitted mixture per region, each flavour's flow vs its EM target, chi2/ndf and p per
ILR coordinate, and the wall time of the call on one torch thread.

Usage::

    python benchmarks/bench_fit_quality.py RUN [RUN ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from coffea_otcal.em_diagnostics import fit_quality
from coffea_otcal.em_result import EMResult


def main() -> None:
    """Score every run folder given on the command line."""
    torch.set_num_threads(1)
    for run in sys.argv[1:]:
        path = Path(run)
        result = EMResult.load(path / "em" / "em_result.npz" if path.is_dir() else path)
        start = time.perf_counter()
        quality = fit_quality(result)
        wall = time.perf_counter() - start
        jets = sum(len(result.data[r].x) for r in result.regions)
        print(f"\n## {run}: {jets} data jets, fit_quality {wall:.1f} s (one thread)")
        print(quality.table())


if __name__ == "__main__":
    main()
