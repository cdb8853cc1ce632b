"""Band coverage of finished chains under several definitions of the variation band.

The closure stage (``report.band_coverage``) asks whether the data lie inside the envelope
(min/max) of the nominal and every variation shape, widened by one statistical standard
deviation.  The variations of the EM are the eigen-directions of the effective covariance
(Kim & Yang eq. 57/61): each is an independent one-sigma component, so the one-sigma band
of a bin propagated from the covariance is the quadrature sum of the per-direction shifts,
not their envelope.  This benchmark reruns the closure stage of each RUN (in a copy) and
records every histogram to compare:

* ``envelope + stat``   min/max over the shapes, widened linearly by sigma_stat (the report
  until session 11);
* ``quad (+) stat``     |d - n| <= sqrt(B^2 + sigma_stat^2), B the quadrature sum of the
  sources on the residual's side (``closure.variation_band``; the report since session 12);
* ``quad + stat``       |d - n| <= B + sigma_stat (a data error bar touching the band);
* ``stat only``         |d - n| <= sigma_stat (the scale: 68 % for a perfect calibration);
* the same at 1.645 sigma (a 90 % interval).

Usage::

    python benchmarks/bench_band_coverage.py RUN [RUN ...]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from coffea_otcal import report
from coffea_otcal.closure import DISCRIMINANTS, variation_band
from coffea_otcal.pipeline import load_pipeline_config, run_pipeline
from coffea_otcal.run_cli import read_run_configuration

RECORD: list[tuple] = []
_orig = report.band_coverage


def _recording(data, nominal, variations, z=1.0):
    if z == 1.0:
        RECORD.append((data, nominal, variations))
    return _orig(data, nominal, variations, z=z)


report.band_coverage = _recording


def definitions(data, nominal, variations, z=1.0):
    """Inside / used bins under each definition (``variations``: name -> counts)."""
    (d, dv), (n, nv) = data, nominal
    df, nf = d / d.sum(), n / n.sum()
    sig = z * np.sqrt(dv / d.sum() ** 2 + nv / n.sum() ** 2)
    shapes = {k: v / v.sum() for k, v in variations.items()}
    lo, hi = np.min([nf, *shapes.values()], axis=0), np.max([nf, *shapes.values()], axis=0)
    down, up = variation_band(nf, shapes)
    b = z * np.where(df >= nf, up, down)
    r = np.abs(df - nf)
    used = (d > 0) | (n > 0)
    out = {
        "envelope + stat (report until session 11)": (df >= lo - sig) & (df <= hi + sig),
        "quad (+) stat (report)": r <= np.sqrt(b**2 + sig**2),
        "quad + stat": r <= b + sig,
        "stat only": r <= sig,
    }
    res = {k: (int((v & used).sum()), int(used.sum())) for k, v in out.items()}
    assert res["quad (+) stat (report)"] == report.band_coverage(data, nominal, variations, z=z)
    return res


def pooled(records: list[tuple], z: float = 1.0) -> str:
    """Coverage of every definition pooled over the recorded histograms, as one line."""
    tot: dict[str, list[int]] = {}
    for rec in records:
        for k, (i, u) in definitions(*rec, z=z).items():
            t = tot.setdefault(k, [0, 0])
            t[0], t[1] = t[0] + i, t[1] + u
    return ", ".join(f"{k} {100 * i / u:.1f} %" for k, (i, u) in tot.items())


def main() -> None:
    """Rerun each run's closure in a copy and print the coverage under every definition."""
    for run in map(Path, sys.argv[1:]):
        config = load_pipeline_config(read_run_configuration(run))
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp) / "run"
            work.mkdir()
            for stage in ("fill", "em", "ot", "export"):
                shutil.copytree(run / stage, work / stage)
            RECORD.clear()
            run_pipeline(config, work, progress=False)
            # the closure visits the validation regions first, one histogram per (D, kappa)
            n_vr = len(config.closure.kappas) * len(DISCRIMINANTS) * len(config.validation_regions)
            for z in (1.0, 1.645):
                print(f"{run} validation, {z:g} sigma: {pooled(RECORD[:n_vr], z)}")
            print(f"{run} control regions, 1 sigma: {pooled(RECORD[n_vr:])}", flush=True)


if __name__ == "__main__":
    main()
