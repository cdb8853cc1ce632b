"""Score finished EM fits on an independent pseudo-data sample (is the objective overfitted?).

Run:  python benchmarks/bench_em_heldout.py HELDOUT_RUN CHECKPOINT [CHECKPOINT ...]

HELDOUT_RUN is a ``coffea-otcal run --stages fill`` folder of a second sample generated with
the same generator configuration and another seed (the same truth, independent jets), with
its ``pipeline.yaml`` beside the fill; each CHECKPOINT is an ``em_checkpoint.pt`` that a fit
wrote after its last iteration (``checkpoints/em/<digest>/[restart_<k>/]em_checkpoint.pt``
of a pipeline run). For every fit it prints the final training objective (NLL + prior per
event), the mixture NLL per event of the held-out control regions under the fit's flows and
fractions (eq. 17's mixture, no refit) and the fit's enriched fractions. If the flows were
overfitted, fits of lower training objective would not have lower held-out NLL.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from coffea_otcal.em_result import fractions_from_logits, responsibilities
from coffea_otcal.flows import FlavourFlows, state_from_numpy
from coffea_otcal.pipeline import load_pipeline_config
from coffea_otcal.stages import region_data
from coffea_otcal.store import load_store


def main() -> int:
    run = Path(sys.argv[1])
    config = load_pipeline_config(run / "pipeline.yaml")
    store = load_store(run / "fill" / "store.parquet")
    held = {r: region_data(config, store, r, True) for r in config.cr_names}
    n_ctx = 0 if not config.em_conditional else len(config.context)
    print(f"held-out sample: {run} ({', '.join(f'{r} {len(d.x)}' for r, d in held.items())} "
          f"data jets)")
    print("| fit | training objective | held-out NLL / event | per region | "
          f"{' / '.join(f'{r} {c}' for r, c in zip(config.cr_names, config.em.classes, strict=False))} |")
    print("| --- | --- | --- | --- | --- |")
    for ckpt in sys.argv[2:]:
        state = torch.load(ckpt, weights_only=False)
        flows = FlavourFlows(len(config.em.classes) - 1, n_ctx, config.em.classes,
                             config.em.flow)
        flows.load_state_dict(state_from_numpy(state["flows"]))
        flows.eval()
        pi = fractions_from_logits(np.asarray(state["logits"], dtype=np.float64))
        total, weight, per = 0.0, 0.0, []
        for r, name in enumerate(config.cr_names):
            d = held[name]
            _, log_p = responsibilities(flows.log_prob_numpy(d.x, d.context), np.log(pi[r]))
            nll = -float(d.weight @ log_p)
            per.append(nll / d.weight.sum())
            total, weight = total + nll, weight + d.weight.sum()
        last = state["trace"][-1]
        enriched = " / ".join(f"{pi[r, r]:.3f}" for r in range(min(pi.shape)))
        print(f"| {ckpt} | {last['objective']:.5f} | {total / weight:.5f} | "
              f"{', '.join(f'{v:.5f}' for v in per)} | {enriched} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
