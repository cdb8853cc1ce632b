"""Tests of coffea_otcal.ot: exactness on Gaussian pairs, weights, context, robustness."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from coffea_otcal import ot as ot_module
from coffea_otcal.kernels import FittedMap
from coffea_otcal.ot import OTConfig, fit_ot_map, resolve_device

FAST = {"steps": 300, "batch_size": 512, "eval_every": 100, "hidden": (16, 16)}


def _gaussian_map(cov1: np.ndarray, cov2: np.ndarray) -> np.ndarray:
    def sqrtm(m):
        vals, vecs = np.linalg.eigh(m)
        return (vecs * np.sqrt(vals)) @ vecs.T

    r1 = sqrtm(cov1)
    r1i = np.linalg.inv(r1)
    return r1i @ sqrtm(r1 @ cov2 @ r1) @ r1i


def _uvp(pred: np.ndarray, truth: np.ndarray) -> float:
    return 100 * np.mean(np.sum((pred - truth) ** 2, 1)) / np.sum(np.var(truth, 0))


def _interrupt_training_at(monkeypatch: pytest.MonkeyPatch, step: int):
    """Make ``fit_ot_map`` raise KeyboardInterrupt at ``step``; returns the real train_step."""
    original = ot_module._Trainer.train_step

    def interrupted(self):
        if self.step == step:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(ot_module._Trainer, "train_step", interrupted)
    return original


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_gaussian_pair_is_exact_within_small_budget():
    rng = np.random.default_rng(0)
    cov2 = np.array([[0.6, 0.3], [0.3, 0.9]])
    mean2 = np.array([1.0, -0.5])
    a = _gaussian_map(np.eye(2), cov2)
    x = rng.normal(size=(6000, 2))
    y = mean2 + rng.normal(size=(6000, 2)) @ np.linalg.cholesky(cov2).T
    # identity start: the trainer (not the closed-form Gaussian start) must find the map
    cfg = OTConfig(**FAST, init="identity", identity_steps=20)
    fm = fit_ot_map(x, y, config=cfg, device="cpu", progress=False, name="gauss")
    xt = rng.normal(size=(4000, 2))
    uvp = _uvp(fm.transport(xt), mean2 + xt @ a.T)
    assert uvp < 1.0, uvp
    assert fm.metrics["device"] == "cpu"
    assert fm.metrics["best_step"] > 0
    # monotone map: (T(x) - T(y)) . (x - y) >= 0
    x1, x2 = rng.normal(size=(2, 500, 2)) * 3
    inner = np.sum((fm.transport(x1) - fm.transport(x2)) * (x1 - x2), 1)
    assert np.all(inner >= 0)


def test_identity_when_source_equals_target():
    rng = np.random.default_rng(1)
    k = rng.integers(0, 2, size=8000)
    x = np.where(k[:, None] == 1, 1.5, -1.5) + 0.5 * rng.normal(size=(8000, 2))
    fm = fit_ot_map(x, x[::-1].copy(), config=OTConfig(**FAST), device="cpu", progress=False)
    xt = x[:2000]
    assert _uvp(fm.transport(xt), xt) < 0.5


def test_weights_are_respected():
    rng = np.random.default_rng(2)
    n = 10_000
    shift = np.array([0.7, -0.4])
    x = rng.normal(size=(n, 2))
    # importance weights turn N(0, I) into N(shift, I)
    w = np.exp(x @ shift - 0.5 * shift @ shift)
    y = np.array([2.0, 1.0]) + 0.6 * rng.normal(size=(n, 2))
    fm = fit_ot_map(x, y, source_weight=w, config=OTConfig(**FAST), device="cpu", progress=False)
    xt = shift + rng.normal(size=(3000, 2))
    truth = np.array([2.0, 1.0]) + 0.6 * (xt - shift)
    assert _uvp(fm.transport(xt), truth) < 2.0
    unweighted = fit_ot_map(x, y, config=OTConfig(**FAST), device="cpu", progress=False)
    assert _uvp(unweighted.transport(xt), truth) > 5 * _uvp(fm.transport(xt), truth)


def test_conditional_map_follows_the_context():
    rng = np.random.default_rng(3)
    n = 8000
    c = rng.uniform(-1, 1, size=(n, 1))
    x = rng.normal(size=(n, 2))
    ct = rng.uniform(-1, 1, size=(n, 1))
    y = (1 + 0.5 * ct) * rng.normal(size=(n, 2)) + np.hstack([ct, -ct])
    cfg = OTConfig(steps=300, batch_size=512, eval_every=100, hidden=(16, 16))
    fm = fit_ot_map(
        x, y, source_context=c, target_context=ct, config=cfg, device="cpu", progress=False
    )
    assert fm.context_dim == 1
    for value in (-0.8, 0.0, 0.8):
        xt = rng.normal(size=(2000, 2))
        ctx = np.full((2000, 1), value)
        truth = (1 + 0.5 * value) * xt + np.array([value, -value])
        assert _uvp(fm.transport(xt, ctx), truth) < 3.0, value
    with pytest.raises(ValueError, match="needs a context"):
        fm.transport(np.zeros((2, 2)))


def test_minimax_reference_moves_towards_target():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4000, 2))
    y = np.array([1.0, 0.0]) + 0.8 * rng.normal(size=(4000, 2))
    cfg = OTConfig(
        method="minimax",
        steps=60,
        g_steps=4,
        batch_size=256,
        eval_every=30,
        init="identity",
        identity_steps=20,
        hidden=(16, 16),
    )
    fm = fit_ot_map(x, y, config=cfg, device="cpu", progress=False)
    xt = rng.normal(size=(2000, 2))
    truth = np.array([1.0, 0.0]) + 0.8 * xt
    assert fm.metrics["method"] == "minimax"
    assert _uvp(fm.transport(xt), truth) < 0.5 * _uvp(xt, truth)


def test_reproducible_and_resume_from_checkpoint(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2000, 2))
    y = 0.5 + rng.normal(size=(2000, 2)) * 0.7
    cfg = OTConfig(
        steps=60,
        batch_size=128,
        eval_every=20,
        checkpoint_every=20,
        identity_steps=10,
        hidden=(8, 8),
    )
    a = fit_ot_map(x, y, config=cfg, device="cpu", progress=False, seed=3)
    b = fit_ot_map(x, y, config=cfg, device="cpu", progress=False, seed=3)
    assert a.export()["potential"] == b.export()["potential"]

    original = _interrupt_training_at(monkeypatch, 45)
    with pytest.raises(KeyboardInterrupt):
        fit_ot_map(
            x,
            y,
            config=cfg,
            device="cpu",
            progress=False,
            seed=3,
            checkpoint_dir=tmp_path,
            name="b/jesUp",
        )
    assert (tmp_path / "b_jesUp.ckpt.pt").is_file()
    monkeypatch.setattr(ot_module._Trainer, "train_step", original)
    c = fit_ot_map(
        x,
        y,
        config=cfg,
        device="cpu",
        progress=False,
        seed=3,
        checkpoint_dir=tmp_path,
        name="b/jesUp",
    )
    assert c.metrics["resumed_from"] == 40
    xt = rng.normal(size=(100, 2))
    np.testing.assert_allclose(c.transport(xt), a.transport(xt), atol=1e-6)


def test_divergence_restores_last_good_state(monkeypatch, caplog):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2000, 2))
    y = 1.0 + rng.normal(size=(2000, 2))
    original = ot_module.conjugate_dual_loss
    calls = {"n": 0}

    def exploding(*args):
        calls["n"] += 1
        loss = original(*args)
        return loss * float("nan") if calls["n"] > 50 else loss

    monkeypatch.setattr(ot_module, "conjugate_dual_loss", exploding)
    cfg = OTConfig(steps=200, batch_size=128, eval_every=20, identity_steps=10, hidden=(8, 8))
    with caplog.at_level(logging.WARNING, logger="coffea_otcal.ot"):
        fm = fit_ot_map(x, y, config=cfg, device="cpu", progress=False, name="c")
    assert fm.metrics["diverged"] is True
    assert fm.metrics["steps"] == 40
    assert "map 'c': training diverged" in caplog.text
    assert np.all(np.isfinite(fm.transport(x[:100])))


def test_warm_start_from_nominal():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(4000, 2))
    y = 1.0 + 0.8 * rng.normal(size=(4000, 2))
    nominal = fit_ot_map(x, y, config=OTConfig(**FAST), device="cpu", progress=False, name="b")
    y_up = y * 1.05
    cfg = OTConfig(steps=30, batch_size=512, eval_every=10, hidden=(16, 16))
    var = fit_ot_map(
        x, y_up, config=cfg, init_from=nominal, device="cpu", progress=False, name="bUp"
    )
    assert var.shift.tolist() == nominal.shift.tolist()
    assert var.scale == nominal.scale
    cold = fit_ot_map(
        x,
        y_up,
        config=cfg.model_copy(update={"init": "identity", "identity_steps": 0}),
        device="cpu",
        progress=False,
    )
    xt = rng.normal(size=(2000, 2))
    truth = 1.05 * (1.0 + 0.8 * xt)
    assert _uvp(var.transport(xt), truth) < 1.0
    assert _uvp(var.transport(xt), truth) < 0.2 * _uvp(cold.transport(xt), truth)


def test_export_round_trip_and_json():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(500, 2))
    cfg = OTConfig(steps=20, batch_size=128, eval_every=10, identity_steps=5, hidden=(8, 8))
    fm = fit_ot_map(x, x + 1, config=cfg, device="cpu", progress=False, name="light")
    d = json.loads(json.dumps(fm.export()))
    back = FittedMap.from_export(d)
    assert back.name == "light"
    assert {"val_dual", "steps", "wall_time_s", "device", "seed", "method"} <= set(d["metrics"])
    np.testing.assert_allclose(back.transport(x), fm.transport(x), atol=1e-12)
    np.testing.assert_allclose(fm.transport_torch(x).detach().numpy(), fm.transport(x), atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": np.full((500, 2), np.nan)}, r"map 'b': source has 500 rows with NaN"),
        ({"target": np.zeros((0, 2))}, r"map 'b': target has 0 rows, fewer than min_samples=100"),
        ({"source": np.zeros((50, 2))}, r"source has 50 rows, fewer than min_samples"),
        ({"target": np.zeros((500, 3))}, "source has dimension 2 but target has 3"),
        ({"source_context": np.zeros((500, 1))}, "for both source and target"),
        ({"source_weight": -np.ones(500)}, r"source_weight sums to -500 <= 0"),
        ({"target_weight": np.ones(3)}, "target_weight has 3 entries for 500 samples"),
    ],
)
def test_bad_input_names_map_and_count(kwargs, match):
    rng = np.random.default_rng(9)
    args = {"source": rng.normal(size=(500, 2)), "target": rng.normal(size=(500, 2))} | kwargs
    src, tgt = args.pop("source"), args.pop("target")
    with pytest.raises(ValueError, match=match):
        fit_ot_map(
            src, tgt, config=OTConfig(steps=2), device="cpu", progress=False, name="b", **args
        )


def test_train_cli_writes_one_map_per_flavour(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from coffea_otcal.cli import main

    rng = np.random.default_rng(10)
    n = 1200
    flav = np.repeat([5, 0], n // 2)
    p_src = rng.dirichlet([2.0, 1.0, 1.0], size=n)
    p_tgt = rng.dirichlet([2.5, 1.0, 0.8], size=n)
    src = {
        "p_b": p_src[:, 0],
        "p_c": p_src[:, 1],
        "p_l": p_src[:, 2],
        "flav": flav,
        "logpt": rng.normal(size=n),
    }
    pq.write_table(pa.table(src), tmp_path / "src.parquet")
    np.savez(
        tmp_path / "tgt.npz",
        p_b=p_tgt[:, 0],
        p_c=p_tgt[:, 1],
        p_l=p_tgt[:, 2],
        flav=flav,
        logpt=rng.normal(size=n),
    )
    (tmp_path / "cfg.json").write_text(
        json.dumps({"batch_size": 128, "eval_every": 5, "hidden": [8, 8]})
    )
    out = tmp_path / "maps.json"
    code = main(
        [
            "train",
            "--source",
            str(tmp_path / "src.parquet"),
            "--target",
            str(tmp_path / "tgt.npz"),
            "--columns",
            "p_b",
            "p_c",
            "p_l",
            "--ilr",
            "--flavour-column",
            "flav",
            "--context-columns",
            "logpt",
            "--config",
            str(tmp_path / "cfg.json"),
            "--steps",
            "10",
            "--no-progress",
            "--device",
            "cpu",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert sorted(result["maps"]) == ["0", "5"]
    fm = FittedMap.from_export(result["maps"]["5"])
    assert fm.dim == 2
    assert fm.context_dim == 1
    assert fm.metrics["steps"] == 10
    code = main(
        [
            "train",
            "--source",
            str(tmp_path / "src.parquet"),
            "--target",
            str(tmp_path / "tgt.npz"),
            "--columns",
            "p_b",
            "nope",
            "--steps",
            "1",
            "-o",
            str(out),
        ]
    )
    assert code == 1


def test_train_maps_names_flavour_without_targets():
    from coffea_otcal.train_cli import train_maps

    rng = np.random.default_rng(11)
    src = {"z0": rng.normal(size=300), "z1": rng.normal(size=300), "f": np.repeat([5, 4], 150)}
    tgt = {"z0": rng.normal(size=300), "z1": rng.normal(size=300), "f": np.full(300, 5)}
    with pytest.raises(ValueError, match=r"flavour '4': 150 source rows but no target rows"):
        train_maps(src, tgt, columns=["z0", "z1"], flavour_column="f", progress=False)
    with pytest.raises(KeyError, match=r"columns \['zz'\] not found in source"):
        train_maps(src, tgt, columns=["zz"], progress=False)


def test_selection_last_returns_the_final_state():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1500, 2))
    y = rng.normal(size=(1500, 2)) * 0.7 + 0.5
    cfg = {**FAST, "steps": 120, "eval_every": 30}
    best = fit_ot_map(x, y, config=OTConfig(**cfg), device="cpu", progress=False, seed=2)
    last = fit_ot_map(x, y, config=OTConfig(**cfg, selection="last"), device="cpu",
                      progress=False, seed=2)
    duals = [h["val_dual"] for h in best.metrics["history"]]
    assert best.metrics["val_dual"] == min(duals)
    assert last.metrics["best_step"] == 120
    assert last.metrics["val_dual"] == last.metrics["history"][-1]["val_dual"]
    assert [h["val_dual"] for h in last.metrics["history"]] == duals  # same training
    if best.metrics["best_step"] == 120:
        np.testing.assert_array_equal(best.transport(x[:50]), last.transport(x[:50]))
    else:
        assert not np.allclose(best.transport(x[:50]), last.transport(x[:50]))


def test_checkpoint_of_another_training_is_refused(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(600, 2))
    y = 0.5 + rng.normal(size=(600, 2)) * 0.7
    cfg = OTConfig(steps=20, batch_size=128, eval_every=10, identity_steps=5, hidden=(8, 8))
    kwargs = {"config": cfg, "device": "cpu", "progress": False, "checkpoint_dir": tmp_path,
              "name": "c"}
    fit_ot_map(x, y, seed=1, **kwargs)
    again = fit_ot_map(x, y, seed=1, **kwargs)  # the same training: resumed at its end
    assert again.metrics["resumed_from"] == 20
    for change in ({"seed": 2}, {"target": y + 0.1}, {"source_weight": np.full(600, 2.0)}):
        args = {"source": x, "target": y, "seed": 1, **change}
        with pytest.raises(ValueError, match=r"map 'c': checkpoint .*c\.ckpt\.pt was written for"):
            fit_ot_map(args.pop("source"), args.pop("target"), **args, **kwargs)
    # stopping rules may change on resume
    longer = fit_ot_map(x, y, seed=1, **{**kwargs, "config": cfg.model_copy(update={"patience": 3})})
    assert longer.metrics["resumed_from"] == 20


def test_parameter_average_is_returned_and_resumes(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2000, 2))
    y = 0.5 + rng.normal(size=(2000, 2)) * 0.7
    base = {"steps": 60, "batch_size": 128, "eval_every": 20, "checkpoint_every": 20,
            "identity_steps": 10, "hidden": (8, 8), "selection": "last"}
    kwargs = {"device": "cpu", "progress": False, "seed": 3}
    plain = fit_ot_map(x, y, config=OTConfig(**base), **kwargs)
    # a vanishing decay makes the average the last iterate: the same map
    nearly = fit_ot_map(x, y, config=OTConfig(**base, ema_decay=1e-12), **kwargs)
    xt = rng.normal(size=(200, 2)) * 2
    np.testing.assert_allclose(nearly.transport(xt), plain.transport(xt), atol=1e-6)
    averaged = fit_ot_map(x, y, config=OTConfig(**base, ema_decay=0.9), **kwargs)
    assert np.max(np.abs(averaged.transport(xt) - plain.transport(xt))) > 1e-4
    # the average is a convex potential: its map is monotone
    x1, x2 = rng.normal(size=(2, 500, 2)) * 3
    inner = np.sum((averaged.transport(x1) - averaged.transport(x2)) * (x1 - x2), 1)
    assert np.all(inner >= 0)
    # the average is part of the checkpoint: an interrupted training resumes to the same map
    original = _interrupt_training_at(monkeypatch, 45)
    cfg = OTConfig(**base, ema_decay=0.9)
    with pytest.raises(KeyboardInterrupt):
        fit_ot_map(x, y, config=cfg, checkpoint_dir=tmp_path, name="b", **kwargs)
    monkeypatch.setattr(ot_module._Trainer, "train_step", original)
    resumed = fit_ot_map(x, y, config=cfg, checkpoint_dir=tmp_path, name="b", **kwargs)
    assert resumed.metrics["resumed_from"] == 40
    np.testing.assert_allclose(resumed.transport(xt), averaged.transport(xt), atol=1e-6)
