"""The benchmarks' metrics, decision rules and report helpers, on inputs whose answers are known."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from benchmarks import metrics as M
from benchmarks.report import flatten, optional, private, record, replace_block, to_json


def _gaussian(n: int, d: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) * scale


# --------------------------------------------------------------------------- Frechet distance

def test_frechet_distance_of_a_set_with_itself_is_zero_and_it_is_symmetric():
    a, b = _gaussian(300, 8, 0), _gaussian(300, 8, 1, scale=1.5)
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert M.frechet_distance(a, b) == pytest.approx(M.frechet_distance(b, a), rel=1e-9)
    assert M.frechet_distance(a, b) > 0.5


def test_frechet_distance_closed_forms():
    a = _gaussian(200, 6, 2)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    # Same covariance, shifted mean: FD = ||shift||^2.
    assert M.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    # Scaled copy: S_b = s^2 S_a, so Tr(S_a + S_b - 2 (S_a S_b)^1/2) = (1 - s)^2 Tr(S_a).
    s = 3.0
    centered = a - a.mean(0)
    expected = (1 - s) ** 2 * np.trace(np.cov(a, rowvar=False))
    assert M.frechet_distance(centered, s * centered) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_diagonal_gaussians():
    """Sample sets with exactly diagonal covariances: FD = ||mu_a - mu_b||^2 + sum (sd_a - sd_b)^2."""
    def cross(sds, mean):  # points +-sd on each axis: mean `mean`, covariance diag(2 sd^2 / (2d - 1))
        d = len(sds)
        pts = np.concatenate([np.diag(sds), -np.diag(sds)]) + mean
        return pts, np.sqrt(2 * np.asarray(sds, float) ** 2 / (2 * d - 1))

    a, sd_a = cross([1.0, 2.0, 0.5], np.array([0.0, 0.0, 0.0]))
    b, sd_b = cross([3.0, 1.0, 0.5], np.array([1.0, 0.0, -1.0]))
    expected = 2.0 + float(((sd_a - sd_b) ** 2).sum())
    assert M.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_with_fewer_samples_than_dimensions_is_finite():
    """Rank-deficient covariances (the smoke's 20 samples in 128 dimensions) give a finite, non-negative FD."""
    a, b = _gaussian(20, 128, 3), _gaussian(20, 128, 4)
    fd = M.frechet_distance(a, b)
    assert math.isfinite(fd) and fd > 0


# --------------------------------------------------------------------------- noise floor and bootstrap

def test_fd_bootstrap_sd_is_deterministic_and_shrinks_with_more_samples():
    ref = _gaussian(2000, 4, 5)
    small, large = _gaussian(30, 4, 6), _gaussian(600, 4, 7)
    assert M.fd_bootstrap_sd(small, ref) == M.fd_bootstrap_sd(small, ref)
    assert M.fd_bootstrap_sd(small, ref, seed=1) != M.fd_bootstrap_sd(small, ref, seed=2)
    assert M.fd_bootstrap_sd(large, ref, draws=30) < M.fd_bootstrap_sd(small, ref, draws=30) / 2
    # A set of identical samples resamples to itself: no spread at all.
    same = np.ones((40, 4))
    assert M.fd_bootstrap_sd(same, ref) == pytest.approx(0.0, abs=1e-12)


def test_fd_noise_floor_measures_fresh_draws_of_the_reference_distribution():
    ref = _gaussian(400, 4, 8)
    rng = np.random.default_rng(9)
    floor = M.fd_noise_floor(lambda: rng.normal(size=(400, 4)), ref, draws=8)
    assert floor["draws"] == 8 and 0 < floor["mean"] < 0.5 and floor["sd"] > 0
    exact = M.fd_noise_floor(lambda: ref, ref, draws=3)
    assert exact["mean"] == pytest.approx(0.0, abs=1e-9) and exact["sd"] == pytest.approx(0.0, abs=1e-9)
    # A generator off by a unit shift is far outside the floor.
    off = M.frechet_distance(_gaussian(400, 4, 10) + 1.0, ref)
    assert off > floor["mean"] + 10 * floor["sd"]


# --------------------------------------------------------------------------- per-sample errors

def test_per_sample_errors():
    a = np.zeros((3, 2, 2))
    b = np.stack([np.zeros((2, 2)), np.ones((2, 2)), 2 * np.ones((2, 2))])
    np.testing.assert_allclose(M.per_sample_mse(a, b), [0.0, 1.0, 4.0])
    np.testing.assert_allclose(M.l2_per_sample(a, b), [0.0, 2.0, 4.0])
    assert M.mean_se(np.array([1.0, 2.0, 3.0])) == pytest.approx((2.0, 1.0 / math.sqrt(3)))
    assert M.worst_mean(np.arange(40.0)) == pytest.approx(38.5)      # the largest 2 of 40
    assert M.worst_mean(np.arange(10.0)) == pytest.approx(9.0)       # at least one


def test_luminance_correlation():
    x = np.random.default_rng(11).uniform(-1, 1, size=(4, 3, 5, 5))
    np.testing.assert_allclose(M.luminance_correlation(x, x), 1.0, atol=1e-9)
    np.testing.assert_allclose(M.luminance_correlation(x, -x), -1.0, atol=1e-9)
    np.testing.assert_allclose(M.luminance_correlation(x, 2 * x + 0.3), 1.0, atol=1e-9)


def test_power_law_fit_recovers_the_law():
    n = np.array([100.0, 200.0, 400.0, 800.0])
    a, b = M.power_law_fit(n, 3.0 * n ** -0.5)
    assert a == pytest.approx(3.0, rel=1e-9) and b == pytest.approx(0.5, rel=1e-9)


# --------------------------------------------------------------------------- verdicts

def test_interval_verdict_and_not_worse():
    # lower is better (FD): 2 combined sd = 2 * hypot(1, 1) = 2.83
    assert M.interval_verdict(10.0, 1.0, 14.0, 1.0, higher_is_better=False) == M.WIN
    assert M.interval_verdict(14.0, 1.0, 10.0, 1.0, higher_is_better=False) == M.LOSS
    assert M.interval_verdict(11.0, 1.0, 12.0, 1.0, higher_is_better=False) == M.TIE
    # higher is better (accuracy)
    assert M.interval_verdict(0.9, 0.01, 0.8, 0.01, higher_is_better=True) == M.WIN
    assert M.interval_verdict(0.8, 0.01, 0.9, 0.01, higher_is_better=True) == M.LOSS
    assert M.not_worse(12.0, 1.0, 10.0, 1.0, higher_is_better=False)
    assert not M.not_worse(13.0, 1.0, 10.0, 1.0, higher_is_better=False)
    assert M.not_worse(0.8, 0.05, 0.9, 0.05, higher_is_better=True)
    assert not M.not_worse(0.7, 0.01, 0.9, 0.01, higher_is_better=True)


def test_paired_verdicts():
    rng = np.random.default_rng(12)
    base = rng.uniform(1, 2, size=200)
    noise = rng.normal(0, 0.01, size=200)
    assert M.paired_verdict(base - 0.1 + noise, base) == M.WIN
    assert M.paired_verdict(base + 0.1 + noise, base) == M.LOSS
    assert M.paired_verdict(base + noise, base) == M.TIE
    # paired: a constant offset far below the spread across samples is still detected
    assert M.paired_verdict(base + 0.001, base) == M.LOSS
    # p95: only the tail differs
    tail = base.copy()
    tail[np.argsort(tail)[-20:]] += 5.0
    assert M.percentile_verdict(base, tail) == M.WIN
    assert M.percentile_verdict(tail, base) == M.LOSS
    assert M.percentile_verdict(base, base) == M.TIE


def test_head_to_head_mse_verdict_ignores_float_rounding_only():
    """The same sampler on a batch of one and on a batch of n differs by ~1e-14: a tie, not a loss; 1e-6 is a loss."""
    from benchmarks.h2h.scoring import mse_verdict
    base = np.zeros(8)
    assert M.paired_verdict(base + 2e-14, base) == M.LOSS  # the plain paired rule alone calls it a loss
    assert mse_verdict(base + 2e-14, base) == M.TIE
    assert mse_verdict(base + 1e-6, base) == M.LOSS and mse_verdict(base + 1e-6, base + 1e-3) == M.WIN


# --------------------------------------------------------------------------- report helpers

@dataclasses.dataclass
class _Inner:
    x: float
    per_sample: np.ndarray = private(default=None)
    maybe: float | None = optional()


@dataclasses.dataclass
class _Row:
    name: str
    inner: _Inner = flatten()
    after: int = 0


def test_record_and_json_keep_public_fields_in_order():
    row = _Row("a", _Inner(1.23456789, np.arange(3)), 7)
    assert record(row) == {"name": "a", "x": 1.23456789, "after": 7}
    assert list(record(row)) == ["name", "x", "after"]
    row.inner.maybe = 2.0
    assert list(record(row)) == ["name", "x", "maybe", "after"]
    out = to_json({"rows": [row], "_hidden": 1, 3: np.float32(0.5), "bad": float("nan"), "arr": np.array([1.0, 2.0])})
    assert out == {"rows": [{"name": "a", "x": 1.2346, "maybe": 2.0, "after": 7}], "3": 0.5, "bad": None, "arr": [1.0, 2.0]}


def test_replace_block():
    text = "head\n<!-- s -->\nold\n<!-- e -->\ntail"
    assert replace_block(text, "<!-- s -->", "<!-- e -->", "new") == "head\n<!-- s -->\nnew\n<!-- e -->\ntail"
    assert replace_block("no markers", "<!-- s -->", "<!-- e -->", "new") is None
