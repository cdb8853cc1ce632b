"""The demo's EM from an impure start: which side of its flat direction does the fit end on?

``bench_em_demo.py`` with one change: the initial fractions are the prior composition
shrunk towards uniform, ``pi_init = (1 - LAM) pi0 + LAM / n_flavours`` (no random
perturbation), so each region starts less pure than the MC (and the truth of the demo).
``LAM < 0`` keeps the default random start (for a side-by-side run in the same process
setup). docs/em.md ("Which way the fit slides") records the outcome.

Usage::

    python benchmarks/bench_em_impure_start.py LAM DIR '{}' [SEED]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import coffea_otcal.em as em
from coffea_otcal.em_prior import logits_from_fractions


def main() -> None:
    """Patch the EM's start, then run bench_em_demo's refit and scoring."""
    lam = float(sys.argv.pop(1))
    if lam >= 0:

        def initial_logits(pi0: np.ndarray, delta: float, rng: np.random.Generator) -> np.ndarray:
            del delta
            rng.uniform(size=3)  # as in the run of results/em_impure_start_session12.txt
            return logits_from_fractions((1 - lam) * pi0 + lam / pi0.shape[1])

        em.initial_logits = initial_logits
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_em_demo

    bench_em_demo.main()


if __name__ == "__main__":
    main()
