"""Wall time of a pipeline run's EM fit with its flavour flows trained one after the other
or side by side in threads (``fit_em(threads=...)``), and a check that both give the same fit.

Reads the control regions of a finished run (``coffea-otcal demo --out DIR``): its
``fill/store.parquet`` and ``pipeline.yaml`` (EM settings, seed). Runs on the CPU.

Usage::

    python benchmarks/bench_em_threads.py DIR [THREADS ...]   # default: 1 3
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from coffea_otcal.em import fit_em
from coffea_otcal.pipeline import PipelineConfig
from coffea_otcal.run_cli import read_run_configuration
from coffea_otcal.stages import region_data
from coffea_otcal.store import load_store


def main() -> None:
    """Fit once per thread count; print wall times and whether the fits are identical."""
    run = Path(sys.argv[1])
    counts = [int(t) for t in sys.argv[2:]] or [1, 3]
    config = PipelineConfig.model_validate(read_run_configuration(run))
    store = load_store(run / "fill" / "store.parquet")
    data = {r: region_data(config, store, r, True) for r in config.cr_names}
    mc = {r: region_data(config, store, r, False) for r in config.cr_names}
    x = np.concatenate([d.x for d in data.values()])
    print(f"torch intra-op threads outside the flow training: {torch.get_num_threads()}")
    print("| flow threads | EM wall [s] | iterations | final NLL/event | fractions |")
    print("| --- | --- | --- | --- | --- |")
    results = []
    for n in counts:
        start = time.perf_counter()
        res = fit_em(data, mc, config.em, device="cpu", seed=config.seed, progress=False,
                     threads=n)
        wall = time.perf_counter() - start
        results.append(res)
        fr = np.round(res.fractions, 4).tolist()
        print(f"| {n} | {wall:.1f} | {res.n_iterations} | {res.trace[-1]['nll']:.6f} | {fr} |")
    ref = results[0]
    for n, res in zip(counts[1:], results[1:], strict=True):
        same = np.array_equal(res.logits, ref.logits) and np.array_equal(
            res.flows.log_prob_numpy(x), ref.flows.log_prob_numpy(x)
        )
        print(f"threads {n} vs {counts[0]}: identical fit (logits and densities): {same}")


if __name__ == "__main__":
    main()
