"""The pure parts of benchmarks/converged_validity.py: the oracle's pick, the paired FD bootstrap and the validity rule."""
from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import converged_validity as V
from benchmarks import metrics as M


def _row(sampler, schedule, nfe, mse):
    return {"sampler": sampler, "schedule": schedule, "steps": nfe, "nfe": nfe, "mse": mse}


def test_oracle_winner_skips_non_finite_and_over_budget_choices():
    grid = [_row("deis", "karras", 10, float("nan")), _row("heun", "karras", 11, 1e-6), _row("euler", "normal", 10, 3e-3),
            _row("dpmpp_2m", "karras", 10, None), _row("uni_pc", "beta", 9, 1e-3), _row("lms", "simple", 10, float("inf"))]
    assert V.oracle_winner(grid, 10)["sampler"] == "uni_pc"
    assert V.oracle_winner(grid, 11)["sampler"] == "heun"
    assert V.oracle_winner([_row("deis", "karras", 10, float("nan"))], 10) is None


def test_paired_bootstrap_sees_pairing():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 4))
    assert V.paired_fd_bootstrap_sd(a, a) == pytest.approx(0.0, abs=1e-9)  # the same items: FD 0 in every draw
    shifted = a + 0.5
    sd = V.paired_fd_bootstrap_sd(shifted, a, draws=30)
    assert 0 < sd < 0.5  # FD ~ 4 * 0.25 = 1; its spread over item resamples is small at 200 items
    with pytest.raises(ValueError):
        V.paired_fd_bootstrap_sd(a, a[:10])


def test_split_separation_is_zero_for_one_distribution_and_large_for_another():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(400, 4))
    same = V.split_fd_separation(ref + rng.normal(0, 0.3, ref.shape) / 10, ref)  # per-item noise, same distribution
    assert abs(same["diff"]) < 3 * same["sd"] and same["n_half"] == 200
    other = V.split_fd_separation(ref * 1.5 + 0.5, ref)  # another mean and spread
    assert other["diff"] > 3 * other["sd"] > 0
    # FD over the same items (shared seeds) lacks the small-sample bias an independent floor holds: it falls below it
    assert M.frechet_distance(ref + rng.normal(0, 0.03, ref.shape), ref) < same["floor"]
    with pytest.raises(ValueError):
        V.split_fd_separation(ref, ref[:10])


def test_fd_alone_does_not_decide_validity():
    v = _figures(fd=(3.0, 1.0, 2.0, 1.0))  # FD 0.7 sd above its floor: reported, KID still separates
    assert v["fd_separation_sd"] < 3 and v["passed"]


def test_paired_kid_is_zero_for_one_distribution_and_uses_the_pairing():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(300, 8))
    twin = 0.99 * ref + math.sqrt(1 - 0.99**2) * rng.normal(size=ref.shape)  # the same N(0, I), item by item close
    same = M.paired_kid(twin, ref)
    assert abs(same["kid"]) < 3 * same["sd"] and same["n"] == 300
    shifted = M.paired_kid(twin + 0.15, ref)  # a small shift of the mean: paired, it stands out
    assert shifted["kid"] > 3 * shifted["sd"] > 0
    # Unpaired (another item's twin), the same shift is lost in the spread between items
    unpaired = M.paired_kid(twin[::-1] + 0.15, ref)
    assert unpaired["sd"] > 5 * shifted["sd"]
    with pytest.raises(ValueError):
        M.paired_kid(ref, ref[:10])


def test_separation_is_in_combined_sd():
    assert V.separation_sd(10.0, 3.0, 2.0, 4.0) == pytest.approx(8 / 5)
    assert V.separation_sd(1.0, 0.0, 0.5, 0.0) == math.inf
    assert V.separation_sd(0.5, 0.0, 0.5, 0.0) == 0.0


def _figures(euler10=2e-3, euler40=2e-4, oracle=5e-4, gap=5e-6, fd=(10.0, 1.0, 2.0, 1.0), kid=(0.2, 0.05)):
    return V.validity_figures({6: 6e-3, 10: euler10, 40: euler40}, oracle, gap,
                              dict(zip(("euler6", "euler6_sd", "floor", "floor_sd"), fd)), dict(zip(("kid", "sd"), kid)))


def test_validity_passes_when_every_figure_holds():
    v = _figures()
    assert set(v) == {"euler10_over_euler40", "oracle10", "oracle10_over_gap", "fd_euler6", "fd_euler6_sd", "fd_floor",
                      "fd_separation_sd", "kid_euler6", "kid_euler6_sd", "kid_separation_sd",
                      "gap_share_of_smallest_error", "passed"}
    assert v["kid_separation_sd"] == pytest.approx(4.0)
    assert v["euler10_over_euler40"] == pytest.approx(10) and v["oracle10_over_gap"] == pytest.approx(100)
    assert v["gap_share_of_smallest_error"] == pytest.approx(5e-6 / 2e-4)  # euler-40 is the smallest error compared
    assert v["passed"] and V.shortfalls(v) == {}


# The oracle is one of the errors compared, so an oracle within 20x of the gap also breaks the 1/20 gap rule.
@pytest.mark.parametrize("kw, figures", [({"euler40": 5e-4}, ["euler10_over_euler40"]),
                                         ({"gap": 5e-5}, ["oracle10_over_gap", "gap_share_of_smallest_error"]),
                                         ({"kid": (0.1, 0.05)}, ["kid_separation_sd"]),
                                         ({"gap": 2e-5, "euler40": 3e-4, "euler10": 3e-3}, ["gap_share_of_smallest_error"])])
def test_each_figure_fails_on_its_own_and_says_by_how_much(kw, figures):
    v = _figures(**kw)
    assert not v["passed"]
    missed = V.shortfalls(v)
    assert list(missed) == figures
    assert all("x" in text for text in missed.values())
