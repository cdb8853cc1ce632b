"""Tests of coffea_otcal.ot_pool: maps trained in worker processes equal those trained here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coffea_otcal.kernels import FittedMap
from coffea_otcal.ot import OTConfig
from coffea_otcal.ot_pool import MapJob, fit_map_job, resolve_workers, train_maps

CFG = OTConfig(steps=40, batch_size=256, eval_every=20, hidden=(8, 8), identity_steps=10,
               init="identity").model_dump()


def _jobs(bad_target: bool = False) -> list[MapJob]:
    rng = np.random.default_rng(3)
    jobs = []
    for code, shift in ((5, 1.0), (0, -0.5)):
        x = rng.normal(size=(600, 2))
        y = rng.normal(size=(600, 2)) * 0.8 + shift
        if bad_target and code == 0:
            y[7, 1] = np.nan
        fit = {"source": x, "target": y, "config": CFG, "device": "cpu", "seed": 1,
               "name": f"f{code}", "progress": False}
        var_cfg = {**CFG, "steps": 10, "identity_steps": 0, "warmup_steps": 0}
        variations = [
            MapJob((code, f"v_{d}"), {**fit, "target": y + sign * 0.1, "config": var_cfg,
                                      "name": f"f{code}/v_{d}"})
            for d, sign in (("up", 1.0), ("down", -1.0))
        ]
        jobs.append(MapJob((code, "nominal"), fit, variations))
    return jobs


def test_workers_give_the_maps_of_one_process():
    # workers run one torch thread each (2 CPUs here); one thread here too, so that only the
    # process layout differs (the thread count changes float32 rounding during training)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = train_maps(_jobs(), workers=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    pooled = train_maps(_jobs(), workers=2, progress=False)
    keys = [(5, "nominal"), (5, "v_up"), (5, "v_down"), (0, "nominal"), (0, "v_up"), (0, "v_down")]
    assert list(here) == keys
    assert list(pooled) == keys
    pts = np.random.default_rng(0).normal(size=(500, 2)) * 2
    for key in keys:
        a, b = FittedMap(here[key]).transport(pts), FittedMap(pooled[key]).transport(pts)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9, err_msg=str(key))
    # each variation starts from its own flavour's nominal map, not from scratch: with 10 steps
    # at the nominal's learning rate it stays close to it and far from the identity
    for code, shift in ((5, 1.0), (0, -0.5)):
        nominal = FittedMap(pooled[(code, "nominal")]).transport(pts)
        up = FittedMap(pooled[(code, "v_up")]).transport(pts)
        assert np.abs(up - nominal).mean() < 0.5 * np.abs(nominal - pts).mean()
        moved = float(np.mean(nominal - pts))  # 40 steps: part of the way to the target
        assert moved * shift > 0.3 * shift**2, (code, moved)


def test_variation_job_is_warm_started_from_the_returned_nominal():
    jobs = _jobs()
    pooled = train_maps(jobs, workers=2, progress=False)
    again = fit_map_job(jobs[0].variations[0].fit, pooled[(5, "nominal")])
    pts = np.random.default_rng(1).normal(size=(300, 2))
    np.testing.assert_allclose(FittedMap(again).transport(pts),
                               FittedMap(pooled[(5, "v_up")]).transport(pts), atol=1e-4)


def test_error_in_a_worker_names_the_map():
    with pytest.raises(ValueError, match=r"f0.*NaN|NaN.*f0"):
        train_maps(_jobs(bad_target=True), workers=2, progress=False)


def test_resolve_workers(monkeypatch):
    from coffea_otcal import ot_pool

    monkeypatch.setattr(ot_pool, "_cpus", lambda: 8)
    assert resolve_workers(None, 39, "cpu") == (8, 1)
    assert resolve_workers(None, 3, "cpu") == (3, 2)
    assert resolve_workers(2, 39, "cpu") == (2, 4)
    assert resolve_workers(1, 39, "cpu") == (1, 8)
    assert resolve_workers(None, 39, "cuda")[0] == 1
    monkeypatch.setattr(ot_pool, "_cpus", lambda: 64)
    assert resolve_workers(None, 39, "cpu") == (8, 8)  # capped: each process holds torch
    assert resolve_workers(16, 39, "cpu") == (16, 4)


def test_script_without_main_guard_gets_a_clear_error(tmp_path):
    """'spawn' re-imports the calling script: an unguarded one is told what to do."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_ot_pool import _jobs\n"
        "from coffea_otcal.ot_pool import train_maps\n"
        "train_maps(_jobs(), workers=2, progress=False)\n"
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode != 0
    assert 'guard its entry point with `if __name__ == "__main__":`' in run.stderr
