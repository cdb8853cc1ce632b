"""EM on a demo run's control regions with changed settings, scored against the truth.

Reads a finished ``coffea-otcal demo --out DIR`` run (its ``fill/store.parquet`` and
``pipeline.yaml``), refits the EM with the run's settings updated by a JSON object
(``EMConfig`` fields; ``"flow": {...}`` updates ``FlowConfig`` fields), and prints the
EM wall time, the fitted fractions against the generator's truth, and per flavour the
chi2/ndf between samples of the fitted flow and fresh true pseudo-data jets of that
flavour (the demo generator, read as the fill stage reads it): 40 bins on each ILR
coordinate, 20 bins on D_bc, D_cl, D_hfl (kappa = 1).

Usage::

    python benchmarks/bench_em_demo.py DIR '{"m_steps": 80}' [SEED]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from coffea_otcal import geometry
from coffea_otcal.closure import discriminant_values, shape_chi2
from coffea_otcal.em import fit_em
from coffea_otcal.pipeline import PipelineConfig
from coffea_otcal.run_cli import _truth, demo_generator_config, read_run_configuration
from coffea_otcal.stages import region_data
from coffea_otcal.store import load_store


def _chi2(a: np.ndarray, b: np.ndarray, edges: np.ndarray) -> float:
    ha = np.histogram(np.clip(a, edges[0], edges[-1]), edges)[0].astype(float)
    hb = np.histogram(np.clip(b, edges[0], edges[-1]), edges)[0].astype(float)
    return round(shape_chi2(ha, ha, hb, hb).chi2_ndf, 2)


def density_chi2(sample: np.ndarray, truth: np.ndarray) -> list[float]:
    """chi2/ndf of z1, z2 (40 bins, 0.5-99.5 % of the truth) and D_bc, D_cl, D_hfl (20 bins)."""
    out = []
    for d in range(truth.shape[1]):
        lo, hi = np.quantile(truth[:, d], [0.005, 0.995])
        out.append(_chi2(sample[:, d], truth[:, d], np.linspace(lo, hi, 41)))
    p_s, p_t = geometry.ilr_inv(sample), geometry.ilr_inv(truth)
    edges = np.linspace(0.0, 1.0 - 1e-12, 21)
    for name in ("D_bc", "D_cl", "D_hfl"):
        out.append(_chi2(discriminant_values(p_s, name, 1.0), discriminant_values(p_t, name, 1.0),
                         edges))
    return out


def main() -> None:
    """Refit and score (arguments: run folder, JSON EM overrides, optional seed)."""
    run = Path(sys.argv[1])
    over = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    raw = read_run_configuration(run)
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else raw["seed"]
    flow_over = over.pop("flow", {})
    raw["em"].update(over)
    raw["em"]["flow"].update(flow_over)
    config = PipelineConfig.model_validate(raw)
    store = load_store(run / "fill" / "store.parquet")
    data = {r: region_data(config, store, r, True) for r in config.cr_names}
    mc = {r: region_data(config, store, r, False) for r in config.cr_names}
    start = time.perf_counter()
    res = fit_em(data, mc, config.em, device="cpu", seed=seed, progress=False)
    wall = time.perf_counter() - start
    truth_doc = json.loads((run / "sample" / "truth.json").read_text())
    true_fr = {r: [truth_doc["regions"][r]["data"]["realised_fractions"][c]
                   for c in config.em.classes] for r in config.cr_names}
    n_true = 60_000
    per = _truth(SimpleNamespace(config=demo_generator_config(seed=1)), seed=7, n=n_true)
    label = json.dumps({**over, **({"flow": flow_over} if flow_over else {})})
    fr = np.round(res.fractions, 4).tolist()
    print(f"overrides {label} seed {seed}: EM {wall:.1f} s, {res.n_iterations} iterations, "
          f"NLL/event {res.trace[-1]['nll']:.5f}")
    for r in res.restarts:
        print(f"  restart {r['restart']} seed {r['seed']}: objective {r['objective']:.6f}, "
              f"fractions {np.round(r['fractions'], 3).tolist()}"
              + ("  <- selected" if r["selected"] else ""))
    print(f"  fractions {fr}")
    print(f"  truth     {[[round(v, 4) for v in true_fr[r]] for r in config.cr_names]}")
    for i, (name, code) in enumerate(zip(config.em.classes, config.em.flavour_codes, strict=True)):
        truth = geometry.ilr(per["per_flavour"][code]["data_probs"])
        sample = res.flows.sample(i, n=len(truth), seed=11)
        print(f"  {name}: chi2/ndf z1, z2, D_bc, D_cl, D_hfl = {density_chi2(sample, truth)}")


if __name__ == "__main__":
    main()
