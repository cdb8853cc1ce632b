"""Calibrate DeepJet inside a coffea processor and histogram the calibrated B score."""

from __future__ import annotations

__all__ = ["BTagProcessor"]

import sys
from typing import Any

import awkward as ak
import hist
from coffea import processor
from coffea.nanoevents import NanoAODSchema

from coffea_otcal.applier import Calibrator
from coffea_otcal.processors.calibration import add_calibrated_columns


class BTagProcessor(processor.ProcessorABC):
    """Fill the OT-calibrated ``Jet.btagDeepFlavB_otcal`` (MC jets moved, data jets unchanged)."""

    def __init__(self, bundle: str) -> None:
        self.calibrator = Calibrator(bundle)  # load the bundle once, reuse it for every chunk

    def process(self, events: Any) -> dict[str, Any]:
        events = add_calibrated_columns(events, self.calibrator)  # adds Jet.<column>_otcal, ...
        jets = events.Jet[(events.Jet.pt > 30) & (abs(events.Jet.eta) < 2.5)]
        h = hist.Hist.new.Reg(50, 0, 1, name="b", label="DeepJet B (OT calibrated)").Weight()
        h.fill(b=ak.flatten(jets.btagDeepFlavB_otcal))
        return {events.metadata["dataset"]: h}

    def postprocess(self, accumulator: Any) -> Any:
        return accumulator


if __name__ == "__main__":  # python calibrate_in_processor.py BUNDLE NANOAOD.root
    fileset = {"ttbar": {"files": {sys.argv[2]: "Events"}, "metadata": {"is_data": False}}}
    run = processor.Runner(processor.IterativeExecutor(), schema=NanoAODSchema)
    out = run(fileset, processor_instance=BTagProcessor(sys.argv[1]))
    sys.stdout.write(f"{out['ttbar']}\n")
