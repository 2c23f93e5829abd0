"""Metrics and decision rules shared by the benchmarks: plain numpy, no models, no ComfyUI.

Feature arrays are [N, d]; per-sample arrays are [N]; image arrays are [N, ...] (flattened
per sample). A verdict compares a method `a` with a baseline `b`: "win" / "tie" / "loss" for
`a`, where a difference counts only beyond 2 combined standard errors (2 sd for FD).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

WIN, TIE, LOSS = "win", "tie", "loss"


# --------------------------------------------------------------------------- Frechet distance

def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two feature sets [N, d].

    Tr((S_a S_b)^1/2) is computed as the sum of sqrt(eigenvalues) of the symmetric PSD matrix
    S_a^1/2 S_b S_a^1/2 (same eigenvalues as S_a S_b): exact, stable for singular covariances
    and ~100x faster than a general matrix square root.
    """
    a, b = np.asarray(feat_a, np.float64), np.asarray(feat_b, np.float64)
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(half @ sb @ half)
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2.0 * np.sqrt(np.clip(ev, 0, None)).sum())


def fd_bootstrap_sd(features: np.ndarray, reference: np.ndarray, draws: int = 10, seed: int = 0) -> float:
    """Bootstrap sd of FD(features, reference) over resamples (with replacement) of the generated set."""
    rng = np.random.default_rng(seed)
    vals = [frechet_distance(features[rng.integers(0, len(features), len(features))], reference) for _ in range(draws)]
    return float(np.std(vals, ddof=1))


def paired_kid(test: np.ndarray, reference: np.ndarray, draws: int = 200, seed: int = 0) -> dict:
    """Kernel distance (KID's MMD^2, cubic kernel) between two feature sets [N, d] whose row i shares item i's seed.

    The unbiased U-statistic (Gretton et al. 2012, Lemma 6) over pairs z_i = (test_i, reference_i):
    the mean over i != j of k(t_i, t_j) + k(r_i, r_j) - k(t_i, r_j) - k(t_j, r_i), with KID's
    kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018). Terms with i != j pair independent
    items, so it is unbiased whatever ties t_i to r_i (0 in expectation when the distributions
    agree, unlike FD, whose small-sample bias needs a floor); the shared seed only makes t_i and
    r_i nearly coincide, which cancels the between-caption spread that swamps an unpaired test.
    sd: bootstrap over items, pairs of one item drawn twice left out (their term is not 0 in
    expectation). Returns {"kid", "sd", "draws", "n"}.
    """
    t, r = np.asarray(test, np.float64), np.asarray(reference, np.float64)
    if t.shape != r.shape or len(t) < 4:
        raise ValueError(f"need the same items (at least 4) in both sets: {t.shape} vs {r.shape}")
    n, d = t.shape

    def kernel(a, b):
        return (a @ b.T / d + 1.0) ** 3

    k_tr = kernel(t, r)
    h = kernel(t, t) + kernel(r, r) - k_tr - k_tr.T

    def u_stat(idx):
        distinct = idx[:, None] != idx[None, :]
        return float(h[np.ix_(idx, idx)][distinct].mean())

    rng = np.random.default_rng(seed)
    boot = [u_stat(rng.integers(0, n, n)) for _ in range(draws)]
    return {"kid": u_stat(np.arange(n)), "sd": float(np.std(boot, ddof=1)), "draws": draws, "n": n}


def fd_noise_floor(fresh_real_features: Callable[[], np.ndarray], reference: np.ndarray, draws: int = 10) -> dict:
    """FD of `draws` fresh real feature sets against the reference: {"draws", "mean", "sd"}.

    What FD a perfect generator gets at this sample count: differences between methods smaller
    than about 2 sd of this are noise. `fresh_real_features()` renders a new real set each call.
    """
    vals = [frechet_distance(fresh_real_features(), reference) for _ in range(draws)]
    return {"draws": draws, "mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1))}


# --------------------------------------------------------------------------- per-sample errors

def per_sample_mse(latents, reference) -> np.ndarray:
    """Mean squared difference per sample [N] (same noise, same condition)."""
    a = np.asarray(latents, np.float64).reshape(len(latents), -1)
    b = np.asarray(reference, np.float64).reshape(len(reference), -1)
    return ((a - b) ** 2).mean(axis=1)


def l2_per_sample(a, b) -> np.ndarray:
    """||a_i - b_i|| per sample [N] (ReDi paper Table 3's d(x_v, x_v_hat))."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    return np.linalg.norm(a - b, axis=1)


def luminance_correlation(a, b) -> np.ndarray:
    """Per-sample Pearson correlation [N] of the luminance of two RGB image sets [N, 3, H, W] (layout similarity)."""
    w = np.array([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)
    la = (np.asarray(a, np.float64) * w).sum(1).reshape(len(a), -1)
    lb = (np.asarray(b, np.float64) * w).sum(1).reshape(len(b), -1)
    la -= la.mean(1, keepdims=True)
    lb -= lb.mean(1, keepdims=True)
    return (la * lb).sum(1) / np.sqrt((la ** 2).sum(1) * (lb ** 2).sum(1) + 1e-12)


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """(mean, standard error of the mean) of per-sample values."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v)))


def worst_mean(values: np.ndarray, one_in: int = 20) -> float:
    """Mean of the largest len // one_in per-sample values (at least one): the worst 5% by default."""
    v = np.sort(np.asarray(values, np.float64))
    return float(v[-max(1, len(v) // one_in):].mean())


def power_law_fit(n, err) -> tuple[float, float]:
    """(a, b) of err ~ a * n^-b by least squares in log-log."""
    slope, intercept = np.polyfit(np.log(np.asarray(n, float)), np.log(np.asarray(err, float)), 1)
    return float(math.exp(intercept)), float(-slope)


# --------------------------------------------------------------------------- decision rules

def interval_verdict(a: float, a_sd: float, b: float, b_sd: float, *, higher_is_better: bool) -> str:
    """a vs b beyond 2 combined sd: win / tie / loss for a."""
    tol = 2.0 * math.hypot(a_sd, b_sd)
    better, worse = (a > b + tol, a < b - tol) if higher_is_better else (a < b - tol, a > b + tol)
    return WIN if better else LOSS if worse else TIE


def not_worse(a: float, a_sd: float, b: float, b_sd: float, *, higher_is_better: bool) -> bool:
    """a is not worse than b by more than 2 combined sd."""
    tol = 2.0 * math.hypot(a_sd, b_sd)
    return a >= b - tol if higher_is_better else a <= b + tol


def paired_verdict(a: np.ndarray, b: np.ndarray) -> str:
    """Per-sample values (lower is better) of a vs b on the same samples: paired mean difference beyond 2 se."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    if d.mean() + 2 * se < 0:
        return WIN
    if d.mean() - 2 * se > 0:
        return LOSS
    return TIE


def percentile_verdict(a: np.ndarray, b: np.ndarray, q: float = 95, draws: int = 200, seed: int = 0) -> str:
    """Per-sample values (lower is better) of a vs b: paired bootstrap 95% interval of the difference of q-th percentiles."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a), np.asarray(b)
    n = len(a)
    diffs = []
    for _ in range(draws):
        idx = rng.integers(0, n, n)
        diffs.append(np.percentile(a[idx], q) - np.percentile(b[idx], q))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return WIN if hi < 0 else LOSS if lo > 0 else TIE
