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
    return _ratio(_residual_norm(q, k, weights), _check_spread(spread))


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


def _real_array(x, name: str) -> np.ndarray:
    """`x` as a numpy array of real numbers (float or int), not yet copied to float64."""
    try:
        a = np.asarray(x)
    except (ValueError, TypeError, RuntimeError) as e:
        raise KBError(f"{name} must be one numeric array; numpy cannot convert the {type(x).__name__} given ({e}). "
                      "Pass numpy arrays (for a torch tensor: t.float().cpu().numpy()).") from None
    if a.dtype.kind not in "fiu":
        raise KBError(f"{name} has dtype {a.dtype}, not a real number type. Pass float32 or float64 latents.")
    return a


def _check_spread(spread: object) -> float:
    """A finite spread >= 0. Zero is a real state (a KB of one entry, or of identical keys), not an error: the
    centered residual is then 0 for an exact match and +inf otherwise, so a guard accepts exact matches only."""
    if isinstance(spread, (bool, np.bool_)) or not isinstance(spread, (int, float, np.integer, np.floating)) \
            or not math.isfinite(spread) or spread < 0:
        raise KBError(f"spread must be a finite number >= 0, got {spread!r}. Pass kb.key_spread(key_step), the RMS "
                      "distance of the KB's keys from their mean.")
    return float(spread)


def _check_batch(query, keys) -> tuple[np.ndarray, np.ndarray]:
    """query [B, D] and keys [B, H, D] (B, H, D >= 1), finite: checked once, left in their own dtype."""
    q, k = _real_array(query, "query"), _real_array(keys, "keys")
    if q.ndim != 2 or k.ndim != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[1] or 0 in k.shape:
        raise KBError(f"fit_weights needs queries [B, D] and their keys [B, H, D] with the same B and D, each >= 1; "
                      f"got {list(q.shape)} and {list(k.shape)}. Pass kb.as_queries(latents) and "
                      "nearest_keys(kb, query, ...).keys.")
    for name, a in (("query", q), ("keys", k)):
        bad = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
        if bad.any():
            raise KBError(f"{name} {int(np.argmax(bad))} of the batch contains NaN/Inf: the latents diverged. "
                          "Check the model, cfg and input latent, or use an earlier key step.")
    return q, k


def fit_weights(query: np.ndarray, keys: np.ndarray, spread: float, mode: str = "lstsq",
                ridge: float = 1e-2) -> WeightFit:
    """w* = argmin_w d(q, sum_i w_i key_i) per query [B, D] and its keys [B, H, D] (line 7), in float64.

    spread: the KB's key spread (finite, >= 0; at 0 the centered residual is 0 or +inf, see _check_spread).
    Returns weights [B, H] and residuals [B], finite otherwise:
    a fit that overflows float64 (values far beyond a latent's range) is refused with a KBError.
    """
    q_all, k_all = _check_batch(query, keys)
    spread = _check_spread(spread)
    _check_mode(mode, ridge)
    w, rel, cen = np.empty(k_all.shape[:2]), np.empty(len(q_all)), np.empty(len(q_all))
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for b in range(len(q_all)):  # one float64 copy per item, shared by the solve and the residuals
                q, k = q_all[b].astype(np.float64), k_all[b].astype(np.float64)
                w[b] = _solve(q, k, mode, ridge)
                r = _residual_norm(q, k, w[b])
                rel[b], cen[b] = _ratio(r, _norm(q)), _ratio(r, spread)
        # cen is +inf by design where the spread is 0 and the match inexact (see _check_spread); never NaN.
        ok = np.isfinite(w).all() and np.isfinite(rel).all() and not np.isnan(cen).any() and (spread == 0 or np.isfinite(cen).all())
    except np.linalg.LinAlgError:
        ok = False
    if not ok:
        top = max(float(np.abs(q_all).max()), float(np.abs(k_all).max()))
        raise KBError(f"the least-squares fit overflowed float64 (query and keys hold values up to {top:.3g}, spread "
                      f"{spread:.3g}, mode {mode!r}): no finite weights exist at this scale. A diffusion latent is of "
                      "order 1 to 100; check what was connected (an image instead of a latent?) and the spread.")
    return WeightFit(mode, w, rel, cen)


def check_value_step(key_step: int, value_step: int) -> None:
    """A value step before the key step would repeat steps: refuse it with the rule."""
    if value_step < key_step:
        raise KBError(f"value step {value_step} is before the key step {key_step}: the value step "
                      "must be at or after the key step (steps count from the start; v > k skips v - k "
                      "steps). Choose a value step >= the key step.")


