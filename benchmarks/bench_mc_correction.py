"""Could the EM's data densities be the MC densities times a rigid correction? (No.)

The idea: fit each flavour's density with plenty of capacity on labelled MC (no slide:
the labels are known), and let the EM fit only a small transform of it on the data, so
the data-side density cannot absorb other flavours' jets. This bounds the idea with truth
labels. A 24-bin flow is fitted on the Table 1 sample's MC b jets (the ``bench_em.py table1
--dequantise --seed S`` generator call). Then a small zuko transform C in front of it
(``log q(x) = log q_MC(C(x)) + log|det C'|``, MC flow frozen) is fitted on the *true* data b
jets. The printout gives the 40-bin chi2/ndf against those jets, as in the EM's density figure.

    python benchmarks/bench_mc_correction.py [SEED]
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import numpy as np
import torch
import zuko
from bench_em import REGIONS, simulate, table1_config

from coffea_otcal.adapters import get_adapter
from coffea_otcal.em_diagnostics import binned_chi2
from coffea_otcal.flows import FlavourFlows, FlowConfig, train_component


def chi2(ff: FlavourFlows, sample_u: torch.Tensor, ref_x: np.ndarray) -> list[float]:
    """40-bin chi2/ndf of a standardised flow sample against ``ref_x`` per ILR axis."""
    xs = ff.destandardise(sample_u).double().numpy()
    out = []
    for k in range(ref_x.shape[1]):
        lo, hi = np.quantile(ref_x[:, k], [0.002, 0.998])
        c, n = binned_chi2(ref_x[:, k], xs[:, k], np.linspace(lo, hi, 41))
        out.append(round(c / n, 2))
    return out


def fit_correction(ff, mcflow, ud, xd, name, corr, steps=3000, lr=3e-3) -> None:
    """Fit ``corr`` in front of the frozen MC flow on the true data jets ``ud``; print it."""
    flow = zuko.flows.Flow([corr.transform, mcflow.transform], mcflow.base)
    params = list(corr.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(1)
    t = time.time()
    for step in range(steps):
        cos = 0.5 * (1 + math.cos(math.pi * step / (steps - 1)))
        for g in opt.param_groups:
            g["lr"] = 1e-4 + (lr - 1e-4) * cos
        idx = torch.as_tensor(rng.integers(0, len(ud), 1024))
        loss = -flow().log_prob(ud[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        nll = float(-flow().log_prob(ud).mean())
        s = flow().sample((4 * len(xd),))
    print(f"{name}: {time.time() - t:.0f} s, NLL {nll:.4f}, vs data truth {chi2(ff, s, xd)}, "
          f"{len(params)} tensors, {sum(p.numel() for p in params)} parameters", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    torch.manual_seed(seed)  # the flows' initial weights
    ad = get_adapter("deepjet", mantissa_bits=10, dequantise=True)
    data, mc, truth = simulate(table1_config(), 50000, seed, False, ad)
    code = 5
    xd = np.concatenate([truth[r].x[np.asarray(truth[r].flavour) == code] for r in REGIONS])
    xm = np.concatenate([mc[r].x[np.asarray(mc[r].flavour) == code] for r in REGIONS])
    x_all = np.concatenate([data[r].x for r in REGIONS])
    ff = FlavourFlows(2, 0, ("b",), FlowConfig(bins=24, dequantize_sigma=0.0))
    ff.fit_standardisation(x_all)
    um = ff.standardise(torch.as_tensor(xm, dtype=torch.float32))
    ud = ff.standardise(torch.as_tensor(xd, dtype=torch.float32))
    t = time.time()
    opt = torch.optim.Adam(ff.flows[0].parameters(), lr=3e-3)
    train_component(ff, 0, um, None, np.ones(len(xm)), 5000, opt, np.random.default_rng(0),
                    final_lr=1e-4)
    print(f"seed {seed}: MC b flow (24 bins) trained on {len(xm)} MC b jets in "
          f"{time.time() - t:.0f} s", flush=True)
    mcflow = ff.flows[0]
    for p in mcflow.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        print("MC flow vs MC truth", chi2(ff, mcflow().sample((4 * len(xm),)), xm),
              "; vs data truth", chi2(ff, mcflow().sample((4 * len(xd),)), xd), flush=True)
    fit_correction(ff, mcflow, ud, xd, "MAF, 1 affine transform, hidden 16",
                   zuko.flows.MAF(2, transforms=1, hidden_features=(16,)))
    fit_correction(ff, mcflow, ud, xd, "NSF, 1 transform, 4 bins, hidden 16",
                   zuko.flows.NSF(2, transforms=1, bins=4, hidden_features=(16,)))
    fit_correction(ff, mcflow, ud, xd, "NSF, 1 transform, 8 bins, hidden 16x16",
                   zuko.flows.NSF(2, transforms=1, bins=8, hidden_features=(16, 16)))


if __name__ == "__main__":
    main()
