"""How every head-to-head item is scored, the same way for every method: plain numpy over latents and judge features.

Per item (shapes: latents [N, C, H, W], results [N] float64):
- MSE to the converged reference of the same prompt and noise (converged.py): every verdict rests on it;
- MSE to the user's own full-step run (euler/normal at T from the same noise): a secondary column;
- the judge's feature distance to the converged sample (L2 between their 128-d judge features): perceptual.
A non-finite output scores +inf on all three (the store keeps it as NULL and counts the item).
Verdicts: paired per-item differences beyond 2 paired standard errors (win / tie / loss).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from benchmarks import metrics as M


@dataclasses.dataclass
class ItemScores:
    """Per-item scores of one output set, in item order."""

    mse_converged: np.ndarray    # [N]
    mse_full_step: np.ndarray    # [N]
    feature_distance: np.ndarray  # [N]


def score(judge, latents, converged, full_step) -> ItemScores:
    """Scores of latents [N, ...] against the converged references and the full-step runs of the same items."""
    x = np.asarray(latents, np.float64)
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    safe = np.where(finite[:, None, None, None], x, 0.0).astype(np.float32)
    conv = np.asarray(converged, np.float32)
    mse_c = M.per_sample_mse(safe, conv).astype(np.float64)
    mse_f = M.per_sample_mse(safe, np.asarray(full_step, np.float32)).astype(np.float64)
    dist = np.linalg.norm(judge.features(safe).astype(np.float64) - judge.features(conv).astype(np.float64), axis=1)
    bad = ~finite
    for a in (mse_c, mse_f, dist):
        a[bad] = np.inf
    return ItemScores(mse_c, mse_f, dist)


#: Per-sample MSE differences this small are float rounding, not a verdict: the same sampler run on a batch of one
#: and on a whole batch differs in the last bits (about 1e-14 here).
MSE_ROUNDING = 1e-9


def mse_verdict(mse: np.ndarray, base: np.ndarray) -> str:
    """Paired per-sample MSE verdict (2 se); a tie where every item's difference is float rounding."""
    if len(mse) < 2 or np.abs(np.asarray(mse) - np.asarray(base)).max() <= MSE_ROUNDING:
        return M.TIE
    return M.paired_verdict(mse, base)


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """a vs b on the same items (lower is better): n, mean difference, its paired standard error and the verdict."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    n = len(d)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n >= 2 else None
    return {"n": n, "mean_diff": float(d.mean()) if n else None, "se": se,
            "verdict": mse_verdict(np.asarray(a), np.asarray(b)) if n >= 2 else None}
