"""Tests of coffea_otcal.w2bench against the README's identity / linear baseline table."""

from __future__ import annotations

import numpy as np
import pytest

from coffea_otcal.w2bench import W2BENCH_DIMS, l2_uvp, linear_w2_map, load_w2_pair

# README table (reproduced with 131072 samples): identity and linear-map L2-UVP (%)
BASELINES = {2: (32.7, 14.0), 16: (88.9, 41.5), 128: (145.4, 63.7)}


@pytest.mark.parametrize("dim", [2, 16, 128])
def test_baselines_match_the_readme_table(dim):
    pair = load_w2_pair(dim)
    n = 16384 if dim < 128 else 4096
    x = pair.sample_source(n, seed=1)
    truth = pair.optimal_map(x)
    ident, linear = BASELINES[dim]
    assert l2_uvp(x, truth) == pytest.approx(ident, rel=0.03)
    lin = linear_w2_map(x, pair.sample_target(n, seed=2))
    assert l2_uvp(lin(x), truth) == pytest.approx(linear, rel=0.05)


def test_pair_properties():
    pair = load_w2_pair(4)
    x = pair.sample_source(20000, seed=3)
    assert x.shape == (20000, 4)
    # source: mean 0, tr Cov = D (README scaling)
    assert np.abs(x.mean(0)).max() < 0.05
    assert np.trace(np.cov(x, rowvar=False)) == pytest.approx(4.0, rel=0.03)
    y = pair.optimal_map(x)
    assert np.abs(y.mean(0)).max() < 0.05
    assert np.var(y, 0).mean() == pytest.approx(1.0, rel=0.05)
    # the optimal map is monotone (gradient of a convex potential)
    a, b = x[:5000], x[5000:10000]
    assert np.all(np.sum((pair.optimal_map(a) - pair.optimal_map(b)) * (a - b), 1) >= -1e-9)
    # reproducible sampling, unpaired targets
    np.testing.assert_array_equal(pair.sample_source(10, 7), pair.sample_source(10, 7))
    assert not np.allclose(pair.sample_target(10, 7), pair.optimal_map(pair.sample_source(10, 7)))
    assert pair.l2_uvp(pair.optimal_map, n=512) < 1e-10


def test_bad_dimension_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="dimension 3 is not available"):
        load_w2_pair(3)
    with pytest.raises(FileNotFoundError, match="COFFEA_OTCAL_W2BENCH"):
        load_w2_pair(2, root=tmp_path)
    assert W2BENCH_DIMS[-1] == 128
