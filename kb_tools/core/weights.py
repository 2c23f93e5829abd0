"""ReDi's least-squares weights and blend (Algorithm 2, lines 7-8) as pure numpy functions, no KB and no ComfyUI.

Shapes: B batch items, H neighbours, D = C*H*W values of a flattened latent.
Steps count sampler steps from the start (0 = pure noise, `steps` = clean): the query
stops at key step k, sampling resumes at value step v >= k, skipping v - k steps.
Linear algebra runs in float64: keys are close to each other (shared noise), so the
least-squares problem is ill-conditioned in float32. Products over D go through einsum, not
BLAS: OpenBLAS spreads a 16,384-long dot over its threads, and on busy cores the hand-off
costs milliseconds (3.4 ms per norm measured on this 2-core machine) where one core takes
0.02 ms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import KBError

WEIGHT_MODES = ("lstsq", "affine", "ridge")


def _check_problem(query: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q = np.asarray(query, dtype=np.float64)
    k = np.asarray(keys, dtype=np.float64)
    if q.ndim != 1 or k.ndim != 2 or k.shape[1] != q.shape[0] or k.shape[0] < 1:
        raise KBError(f"weights need query [D] and keys [H, D] with H >= 1, got {list(q.shape)} and "
                      f"{list(k.shape)}. Flatten latents to [D] per item.")
    if not (np.isfinite(q).all() and np.isfinite(k).all()):
        raise KBError("query or keys contain NaN/Inf; the latents diverged. Check the sampler settings.")
    return q, k


# Normal equations square the condition number of the keys; in float64 a Gram matrix with
# condition below this keeps about 8 correct digits in the weights. Worse ones go to SVD.
GRAM_COND_MAX = 1e8


def least_squares(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin_w ||w @ a - y|| for rows a float64 [H, D] (H << D) and y float64 [D], minimum-norm.

    Solved through the H x H Gram matrix (0.05 ms at SD1.5 size) instead of an SVD of the
    D x H matrix (1-2 ms, most of a query's budget); near-dependent rows, where squaring the
    condition number would cost accuracy, take numpy's SVD least squares as before.
    """
    evals, evecs = np.linalg.eigh(np.einsum("id,jd->ij", a, a))
    if evals[0] > evals[-1] / GRAM_COND_MAX:
        return evecs @ ((evecs.T @ np.einsum("id,d->i", a, y)) / evals)
    return np.linalg.lstsq(a.T, y, rcond=None)[0]


def _solve(q: np.ndarray, k: np.ndarray, mode: str, ridge: float) -> np.ndarray:
    if mode == "lstsq":
        return least_squares(k, q)
    if mode == "affine":
        if len(k) == 1:
            return np.ones(1)
        rest = least_squares(k[:-1] - k[-1], q - k[-1])
        return np.append(rest, 1.0 - rest.sum())
    gram = np.einsum("id,jd->ij", k, k)
    lam = ridge * float(np.mean(np.diag(gram)))
    try:
        return np.linalg.solve(gram + lam * np.eye(len(k)), np.einsum("id,d->i", k, q))
    except np.linalg.LinAlgError:  # ridge=0 with dependent keys: fall back to least squares
        return np.linalg.lstsq(k.T, q, rcond=None)[0]


def _check_mode(mode: str, ridge: float) -> None:
    if mode not in WEIGHT_MODES:
        raise KBError(f"unknown weight mode {mode!r}; valid modes are {list(WEIGHT_MODES)}.")
    if mode == "ridge" and (isinstance(ridge, bool) or not isinstance(ridge, (int, float, np.integer, np.floating))
                            or not np.isfinite(ridge) or ridge < 0):
        raise KBError(f"ridge must be a finite number >= 0, got {ridge!r}. Pass e.g. ridge=0.01 (0 = plain least squares).")


def solve_weights(query: np.ndarray, keys: np.ndarray, mode: str = "lstsq", ridge: float = 1e-2) -> np.ndarray:
    """Blend weights w [H] with sum_i w_i key_i ~ query [D] (Algorithm 2, w* <- argmin_w d(q, sum w key)).

    lstsq: unconstrained least squares, as the paper and its code (minimum-norm on rank deficiency).
    affine: least squares subject to sum(w) = 1 (solved by substituting w_H = 1 - sum of the others).
    ridge: (K K^T + ridge * mean(diag(K K^T)) I)^-1 K q; the penalty scales with the keys.
    """
    q, k = _check_problem(query, keys)
    _check_mode(mode, ridge)
    return _solve(q, k, mode, ridge)


def _norm(x: np.ndarray) -> float:
    return math.sqrt(float(np.einsum("d,d->", x, x)))


def _residual_norm(q: np.ndarray, k: np.ndarray, weights: np.ndarray) -> float:
    """||q - sum_i w_i k_i|| for q float64 [D], k float64 [H, D]."""
    return _norm(q - np.einsum("i,id->d", np.asarray(weights, np.float64), k))


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else float("inf")


def relative_residual(query: np.ndarray, keys: np.ndarray, weights: np.ndarray) -> float:
    """||q - sum w key|| / ||q||: the observable d(q, key) of the paper's Theorem 5.3, relative."""
    q, k = _check_problem(query, keys)
    return _ratio(_residual_norm(q, k, weights), _norm(q))


def centered_residual(query: np.ndarray, keys: np.ndarray, weights: np.ndarray, spread: float) -> float:
    """||q - sum w key|| / spread, where spread is the RMS distance of the KB's keys from their mean.

    With one shared seed q is dominated by the shared noise sigma_k * z, so ||r|| / ||q|| looks
    small even for poor matches. Measured against what actually
    varies between entries it is informative: about 0 for a stored trajectory, below 1 for a
    query the KB covers, and far above 1 for a query whose starting noise is not in the KB.
    """
    q, k = _check_problem(query, keys)
    return _ratio(_residual_norm(q, k, weights), float(spread))


def blend(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_i w_i value_i over values [H, ...] (Algorithm 2, x_v_hat), float64 [...]."""
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or v.shape[:1] != w.shape:
        raise KBError(f"blend needs values [H, ...] and weights [H], got {list(v.shape)} and {list(w.shape)}.")
    return np.einsum("h,h...->...", w, v)


# --------------------------------------------------------------------------- Algorithm 2, lines 6-8


@dataclass(frozen=True)
class WeightFit:
    """The blend weights of each query (Algorithm 2, line 7) and how well they rebuild it."""

    mode: str
    weights: np.ndarray  # float64 [B, H]
    residual: np.ndarray  # float64 [B], ||q - sum w key|| / ||q||
    centered_residual: np.ndarray  # float64 [B], ||q - sum w key|| / key spread


def fit_weights(query: np.ndarray, keys: np.ndarray, spread: float, mode: str = "lstsq",
                ridge: float = 1e-2) -> WeightFit:
    """w* = argmin_w d(q, sum_i w_i key_i) per query [B, D] and its keys [B, H, D] (line 7), in float64."""
    _check_mode(mode, ridge)
    w, rel, cen = np.empty(np.shape(keys)[:2]), np.empty(len(query)), np.empty(len(query))
    for b, (query_b, keys_b) in enumerate(zip(query, keys)):
        q, k = _check_problem(query_b, keys_b)  # one float64 copy per item, shared by the solve and the residuals
        w[b] = _solve(q, k, mode, ridge)
        r = _residual_norm(q, k, w[b])
        rel[b], cen[b] = _ratio(r, _norm(q)), _ratio(r, float(spread))
    return WeightFit(mode, w, rel, cen)


def check_value_step(key_step: int, value_step: int) -> None:
    """A value step before the key step would repeat steps: refuse it with the rule."""
    if value_step < key_step:
        raise KBError(f"value step {value_step} is before the key step {key_step}: the value step "
                      "must be at or after the key step (steps count from the start; v > k skips v - k "
                      "steps). Choose a value step >= the key step.")


