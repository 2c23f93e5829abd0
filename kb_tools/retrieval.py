"""ReDi retrieval and blending (paper Algorithm 2), as pure functions over a KnowledgeBase.

Shapes: B batch items, H neighbours, D = C*H*W values of a flattened latent.
Steps count sampler steps from the start (0 = pure noise, `steps` = clean): the query
stops at key step k, sampling resumes at value step v >= k, skipping v - k steps.
Linear algebra runs in float64: keys are close to each other (shared noise), so the
least-squares problem is ill-conditioned in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import KBError
from .kb import KnowledgeBase

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


def solve_weights(query: np.ndarray, keys: np.ndarray, mode: str = "lstsq", ridge: float = 1e-2) -> np.ndarray:
    """Blend weights w [H] with sum_i w_i key_i ~ query [D] (Algorithm 2, w* <- argmin_w d(q, sum w key)).

    lstsq: unconstrained least squares, as the paper and its code (minimum-norm on rank deficiency).
    affine: least squares subject to sum(w) = 1 (solved by substituting w_H = 1 - sum of the others).
    ridge: (K K^T + ridge * mean(diag(K K^T)) I)^-1 K q; the penalty scales with the keys.
    """
    q, k = _check_problem(query, keys)
    if mode == "lstsq":
        return np.linalg.lstsq(k.T, q, rcond=None)[0]
    if mode == "affine":
        if len(k) == 1:
            return np.ones(1)
        rest = np.linalg.lstsq((k[:-1] - k[-1]).T, q - k[-1], rcond=None)[0]
        return np.append(rest, 1.0 - rest.sum())
    if mode == "ridge":
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float, np.integer, np.floating)) or not np.isfinite(ridge) or ridge < 0:
            raise KBError(f"ridge must be a finite number >= 0, got {ridge!r}. Pass e.g. ridge=0.01 (0 = plain least squares).")
        gram = k @ k.T
        lam = ridge * float(np.mean(np.diag(gram)))
        try:
            return np.linalg.solve(gram + lam * np.eye(len(k)), k @ q)
        except np.linalg.LinAlgError:  # ridge=0 with dependent keys: fall back to least squares
            return np.linalg.lstsq(k.T, q, rcond=None)[0]
    raise KBError(f"unknown weight mode {mode!r}; valid modes are {list(WEIGHT_MODES)}.")


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else float("inf")


def relative_residual(query: np.ndarray, keys: np.ndarray, weights: np.ndarray) -> float:
    """||q - sum w key|| / ||q||: the observable d(q, key) of the paper's Theorem 5.3, relative."""
    q, k = _check_problem(query, keys)
    return _ratio(float(np.linalg.norm(q - np.asarray(weights, np.float64) @ k)), float(np.linalg.norm(q)))


def centered_residual(query: np.ndarray, keys: np.ndarray, weights: np.ndarray, spread: float) -> float:
    """||q - sum w key|| / spread, where spread is the RMS distance of the KB's keys from their mean.

    With one shared seed q is dominated by the shared noise sigma_k * z, so ||r|| / ||q`` looks
    small even for poor matches (anchors.md, "Measured here"). Measured against what actually
    varies between entries it is informative: about 0 for a stored trajectory, below 1 for a
    query the KB covers, and far above 1 for a query whose starting noise is not in the KB.
    """
    q, k = _check_problem(query, keys)
    return _ratio(float(np.linalg.norm(q - np.asarray(weights, np.float64) @ k)), float(spread))


def key_spread(kb: KnowledgeBase, step: int, sample: int = 256, seed: int = 0) -> float:
    """RMS distance ||key_i - mean key|| over (a fixed random sample of) the KB's keys at `step`."""
    return kb.key_spread(step, sample=sample, seed=seed)


def blend(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_i w_i value_i over values [H, ...] (Algorithm 2, x_v_hat), float64 [...]."""
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or v.shape[:1] != w.shape:
        raise KBError(f"blend needs values [H, ...] and weights [H], got {list(v.shape)} and {list(w.shape)}.")
    return np.tensordot(w, v, axes=1)


@dataclass
class Neighbours:
    """What ReDiRetrieve outputs: the top-H keys of each query at `key_step` and their weights."""

    key_step: int
    ids: np.ndarray  # int64 [B, H]
    distances: np.ndarray  # float32 [B, H], Euclidean, ascending
    query: np.ndarray  # float32 [B, D]
    keys: np.ndarray  # float32 [B, H, D]
    mean_key: np.ndarray  # float32 [D]
    key_spread: float  # RMS distance of the KB's keys from mean_key (normalises centered_residual)
    weights: np.ndarray  # float64 [B, H], lstsq
    residual: np.ndarray  # float64 [B], relative
    centered_residual: np.ndarray  # float64 [B]

    def summary(self) -> str:
        """One line for logs: batch, H, nearest distance, residuals."""
        b, h = self.ids.shape
        return (f"ReDi retrieve: step {self.key_step}, {b} quer{'y' if b == 1 else 'ies'}, H={h}, "
                f"nearest id {int(self.ids[0, 0])} at {float(self.distances[0, 0]):.4g}, residual "
                f"{float(self.residual.max()):.3g} (centered {float(self.centered_residual.max()):.3g}, worst item)")


def _weights_and_residuals(query: np.ndarray, keys: np.ndarray, spread: float, mode: str,
                           ridge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per batch item: weights [B, H], relative residual [B], centered residual [B]."""
    w = np.stack([solve_weights(q, k, mode, ridge) for q, k in zip(query, keys)])
    rel = np.array([relative_residual(q, k, wi) for q, k, wi in zip(query, keys, w)])
    cen = np.array([centered_residual(q, k, wi, spread) for q, k, wi in zip(query, keys, w)])
    return w, rel, cen


def retrieve(kb: KnowledgeBase, query: Any, key_step: int, h: int, candidates: int | None = None) -> Neighbours:
    """Top-h neighbours of each query latent [B, C, H, W] among the KB's keys at `key_step`."""
    q = kb.as_queries(query)  # validated here too: the error should name the query, not FAISS
    ids, dist = kb.search(key_step, q, h, candidates=candidates)
    keys = kb.keys_flat(key_step, ids.reshape(-1)).reshape(len(q), h, -1)
    mean = kb.mean_key(key_step)
    spread = key_spread(kb, key_step)
    w, rel, cen = _weights_and_residuals(q, keys, spread, "lstsq", 0.0)
    return Neighbours(int(key_step), ids, dist, q, keys, mean, spread, w, rel, cen)


def blend_values(kb: KnowledgeBase, neighbours: Neighbours, value_step: int, mode: str = "lstsq",
                 ridge: float = 1e-2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x_v_hat = sum_i w_i val_i at `value_step` (Algorithm 2): latent float32 [B, C, H, W], weights, residuals."""
    kb.check_step(value_step, "value step")
    if value_step < neighbours.key_step:
        raise KBError(f"value step {value_step} is before the key step {neighbours.key_step}: the value step "
                      "must be at or after the key step (steps count from the start; v > k skips v - k "
                      "steps). Choose a value step >= the key step.")
    if mode not in WEIGHT_MODES:
        raise KBError(f"unknown weight mode {mode!r}; valid modes are {list(WEIGHT_MODES)}.")
    w, rel, cen = _weights_and_residuals(neighbours.query, neighbours.keys, neighbours.key_spread, mode, ridge)
    b, h = neighbours.ids.shape
    values = kb.latents(value_step, neighbours.ids.reshape(-1)).reshape(b, h, *kb.latent_shape)
    latent = np.stack([blend(v, wi) for v, wi in zip(values, w)]).astype(np.float32)
    return latent, w, rel, cen


def calibrate(kb: KnowledgeBase, step: int, h: int, *, sample: int = 256, mode: str = "lstsq",
              seed: int = 0) -> dict:
    """Leave-one-out residual percentiles: each sampled entry's key queried against all the others.

    A guard threshold on the residual means little in absolute terms (anchors.md); these
    percentiles say what residual a query that does match the KB's distribution gets.
    """
    n = len(kb)
    if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1:
        raise KBError(f"H (neighbours) must be an integer >= 1, got {h!r}. Pass the H the guard will use, e.g. 3.")
    if n < h + 1:
        raise KBError(f"calibration with H={h} needs at least {h + 1} entries, the KB at {kb.path} has {n}. "
                      "Add entries, or lower H.")
    if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or sample < 1:
        raise KBError(f"sample must be an integer >= 1, got {sample!r}. Pass how many entries to calibrate on, e.g. 256.")
    ids = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    q = kb.keys_flat(step, ids)
    found, _ = kb.search(step, q, h + 1)
    # Drop the entry itself; if exact duplicates pushed it out of the top h+1, drop the farthest.
    nbr = np.stack([np.array([j for j in row if j != i][:h]) for i, row in zip(ids, found)])
    keys = kb.keys_flat(step, nbr.reshape(-1)).reshape(len(ids), h, -1)
    _, rel, cen = _weights_and_residuals(q, keys, key_spread(kb, step), mode, 1e-2)
    out = {"step": int(step), "h": int(h), "n": len(ids), "mode": mode, "kb_count": n,
           "centered_mean": float(cen.mean()), "relative_mean": float(rel.mean())}
    for p in (50, 90, 95):
        out[f"centered_p{p}"] = float(np.percentile(cen, p))
        out[f"relative_p{p}"] = float(np.percentile(rel, p))
    return out
