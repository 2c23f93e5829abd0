"""A KB's leave-one-out residuals: each sampled entry's key fitted on its nearest other entries (what the guard's
threshold is calibrated on)."""
from __future__ import annotations

import numpy as np

from ..core.errors import KBError
from ..core.weights import WeightFit, fit_weights
from ..store import KnowledgeBase
from ..store.arguments import check_seed


def leave_one_out(kb: KnowledgeBase, step: int, h: int, *, sample: int, mode: str = "lstsq",
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, WeightFit]:
    """Each of `sample` random entries' key at `step` fitted on its h nearest other entries (Algorithm 2, lines 6-7).

    Returns the entries left out (int64 [n], ascending), their neighbours (int64 [n, h]) and the fit.
    seed: 0..2**64-1, picks the sample (calibrate and measure_blend_errors pass theirs here).
    """
    n = len(kb)
    if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1:
        raise KBError(f"H (neighbours) must be an integer >= 1, got {h!r}. Pass the H the guard will use, e.g. 3.")
    if n < h + 1:
        raise KBError(f"calibration with H={h} needs at least {h + 1} entries, the KB at {kb.path} has {n}. "
                      "Add entries, or lower H.")
    if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or sample < 1:
        raise KBError(f"sample must be an integer >= 1, got {sample!r}. Pass how many entries to calibrate on, e.g. 256.")
    seed = check_seed(seed)
    ids = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    q = kb.keys_flat(step, ids)
    found, _ = kb.search(step, q, h + 1)
    # Drop the entry itself; if exact duplicates pushed it out of the top h+1, drop the farthest.
    nbr = np.stack([np.array([j for j in row if j != i][:h]) for i, row in zip(ids, found)]).astype(np.int64)
    keys = kb.keys_flat(step, nbr.reshape(-1)).reshape(len(ids), h, -1)
    return ids.astype(np.int64), nbr, fit_weights(q, keys, kb.key_spread(step), mode, 1e-2)



def calibrate(kb: KnowledgeBase, step: int, h: int, *, sample: int = 256, mode: str = "lstsq",
              seed: int = 0) -> dict:
    """Leave-one-out residual percentiles: each sampled entry's key queried against all the others.

    A guard threshold on the residual means little in absolute terms; these
    percentiles say what residual a query that does match the KB's distribution gets.
    """
    ids, _, fit = leave_one_out(kb, step, h, sample=sample, mode=mode, seed=seed)
    rel, cen = fit.residual, fit.centered_residual
    out = {"step": int(step), "h": int(h), "n": len(ids), "mode": mode, "kb_count": len(kb),
           "centered_mean": float(cen.mean()), "relative_mean": float(rel.mean())}
    for p in (50, 90, 95):
        out[f"centered_p{p}"] = float(np.percentile(cen, p))
        out[f"relative_p{p}"] = float(np.percentile(rel, p))
    return out
