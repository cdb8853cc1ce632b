"""Model selection of ILR maps: held-out dual vs closure at every evaluation of one training.

Reads a finished pipeline run (``coffea-otcal demo --out DIR``): the flavour's MC source and
nominal EM target (``DIR/em/targets.npz``), the EM flows (``DIR/em/em_result.npz``) and the
nominal OT settings (``DIR/pipeline.yaml``), overridden by the JSON argument. It fits the map
on one CPU thread, keeps the potential at every evaluation (the parameter average with
``ema_decay``: what would be returned), and prints per evaluation: step,
held-out dual (what ``selection="dual"`` ranks by), the 20-bin shape chi2/ndf of D_bc, D_cl,
D_hfl (kappa = 1) and the classifier AUC between the moved source and a FRESH sample of the
EM flow of that flavour (not the training target). The first line names the step the
held-out dual selects.

Usage::

    python benchmarks/bench_ot_selection.py DIR b '{"batch_size": 8192}'
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from coffea_otcal import ot as ot_module
from coffea_otcal.closure import classifier_auc
from coffea_otcal.em_result import EMResult
from coffea_otcal.kernels import FittedMap
from coffea_otcal.potentials import potential_from_export
from coffea_otcal.run_cli import read_run_configuration
from coffea_otcal.variations import Targets

sys.path.insert(0, str(Path(__file__).parent))
from bench_ilr_maps import discriminant_chi2


def main():
    torch.set_num_threads(1)
    run, flav = sys.argv[1], sys.argv[2]
    over = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    snaps = []
    evaluate = ot_module._Trainer.evaluate

    def keep(trainer):
        dual = evaluate(trainer)
        snaps.append((trainer.step, dual, copy.deepcopy(trainer.eval_net.state_dict())))
        return dual

    ot_module._Trainer.evaluate = keep
    flows = EMResult.load(f"{run}/em/em_result.npz").flows
    tgt = Targets.load(f"{run}/em/targets.npz").flavours[flav]
    x = tgt.source_x
    y, _, yw = tgt.target()
    fresh = flows.sample(flav, n=len(x), seed=99)
    settings = read_run_configuration(run)["ot"]["nominal"]
    settings.update(over)
    fitted = ot_module.fit_ot_map(x, y, source_weight=tgt.source_weight, target_weight=yw,
                                  config=ot_module.OTConfig(**settings), progress=False, seed=1)
    export = fitted.export()
    g = potential_from_export(export["potential"])
    print(flav, json.dumps(over), "selected step", export["metrics"]["best_step"])
    print("step | held-out dual | chi2/ndf D_bc, D_cl, D_hfl vs fresh | AUC vs fresh")
    for step, dual, state in snaps:
        g.load_state_dict(state)
        at_step = copy.deepcopy(export)
        at_step["potential"] = g.export()
        moved = FittedMap(at_step).transport(x)
        print(step, round(dual, 5), discriminant_chi2(moved, fresh),
              round(classifier_auc(moved, fresh, seed=1), 4), flush=True)


if __name__ == "__main__":
    main()
