"""How well one flavour's component flow can model that flavour's TRUE data density.

Supervised (no EM): fresh pseudo-data jets of the demo generator (seed 1, as
``coffea-otcal demo``), read through the demo's adapter as the fill stage reads them
(``run_cli._truth``), of one flavour, split 70/30; a one-flavour ``FlavourFlows`` is
trained on the 70 % with the EM flow settings of a finished demo run (``DIR/pipeline.yaml``)
plus JSON overrides, and flow samples are compared with the held-out 30 %: 40-bin chi2/ndf on each ILR coordinate (range: 0.5-99.5 % quantiles of the
held-out jets, under/overflow included) and 20-bin chi2/ndf of D_bc, D_cl, D_hfl
(kappa = 1), plus the held-out NLL. This bounds what the EM can extract for that flavour.

Extra keys besides ``FlowConfig`` fields: ``steps`` (Adam steps, default the config's
pretrain_steps), ``standardise`` (``common``: from all control-region jets, data and MC,
as the EM of the run did, read from ``DIR/em/em_result.npz``; ``own``: from this
flavour's jets), ``lr_end`` (cosine decay to this
learning rate; default constant), ``jets`` (generated per flavour, default 60000).

Usage::

    python benchmarks/bench_flow_fit.py DIR b '{"steps": 2000}'
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from bench_em_demo import density_chi2  # benchmarks/ is on sys.path when run as a script

from coffea_otcal import geometry
from coffea_otcal.flows import FlavourFlows, FlowConfig, train_component
from coffea_otcal.pipeline import PipelineConfig
from coffea_otcal.run_cli import _truth, demo_generator_config, read_run_configuration


def main() -> None:
    """Train and score one flavour's flow (arguments: run folder, flavour, JSON overrides)."""
    torch.set_num_threads(1)
    run, flav = Path(sys.argv[1]), sys.argv[2]
    over = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    config = PipelineConfig.model_validate(read_run_configuration(run))
    code = config.em.flavour_codes[config.em.classes.index(flav)]
    sample = SimpleNamespace(config=demo_generator_config(seed=1))
    x = geometry.ilr(_truth(sample, seed=7, n=int(over.pop("jets", 60_000)))["per_flavour"][code][
        "data_probs"])
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    cut = int(0.7 * len(x))
    train, test = x[perm[:cut]], x[perm[cut:]]
    steps = int(over.pop("steps", config.em.flow.pretrain_steps))
    standardise = over.pop("standardise", "common")
    lr_end = over.pop("lr_end", None)
    flow_cfg = FlowConfig(**{**config.em.flow.model_dump(), **over})
    torch.manual_seed(0)
    flows = FlavourFlows(x.shape[1], 0, (flav,), flow_cfg)
    flows.fit_standardisation(x)
    if standardise == "common":
        em = np.load(run / "em" / "em_result.npz")
        flows.x_mean.copy_(torch.as_tensor(em["flow/x_mean"]))
        flows.x_scale.copy_(torch.as_tensor(em["flow/x_scale"]))
    u = flows.standardise(torch.as_tensor(train, dtype=torch.float32))
    opt = torch.optim.Adam(flows.flows[0].parameters(), lr=flow_cfg.learning_rate)
    start = time.perf_counter()
    chunk = 100
    for done in range(0, steps, chunk):
        if lr_end is not None:  # cosine from the config's rate to lr_end
            t = done / max(steps, 1)
            lr = lr_end + 0.5 * (flow_cfg.learning_rate - lr_end) * (1 + math.cos(math.pi * t))
            for g in opt.param_groups:
                g["lr"] = lr
        train_component(flows, 0, u, None, np.ones(len(train)), min(chunk, steps - done), opt, rng)
    wall = time.perf_counter() - start
    nll = float(-flows.log_prob_numpy(test)[:, 0].mean())
    sample = flows.sample(0, n=len(test), seed=1)
    chi2 = density_chi2(sample, test)
    print(f"| {flav} | {json.dumps(json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})} | "
          f"{len(train)} | {wall:.1f} | {nll:.4f} | " + " | ".join(str(c) for c in chi2) + " |")


if __name__ == "__main__":
    main()
