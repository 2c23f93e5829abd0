"""Algorithm 2, lines 6 and 8 on a stored KB: the top-H nearest keys of each query, and the blend of their values."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import KBError
from ..core.weights import blend
from .knowledge_base import KnowledgeBase


@dataclass(frozen=True)
class NearestKeys:
    """The top-H stored keys of each query at `key_step` (Algorithm 2, line 6)."""

    key_step: int
    ids: np.ndarray  # int64 [B, H], nearest first
    distances: np.ndarray  # float32 [B, H], Euclidean on the full keys, ascending
    keys: np.ndarray  # float32 [B, H, D]



def nearest_keys(kb: KnowledgeBase, query: np.ndarray, key_step: int, h: int,
                 candidates: int | None = None) -> NearestKeys:
    """Top-h neighbours j_1..j_h of each query [B, D] or [B, C, H, W] among the KB's keys at `key_step` (line 6).

    kb.search checks every argument (step, h, candidates, the queries' shape, dtype and finiteness).
    """
    ids, dist = kb.search(key_step, query, h, candidates=candidates)
    keys = kb.keys_flat(key_step, ids.reshape(-1)).reshape(*ids.shape, -1)
    return NearestKeys(int(key_step), ids, dist, keys)



def blend_entries(kb: KnowledgeBase, ids: np.ndarray, weights: np.ndarray, value_step: int) -> np.ndarray:
    """x_v_hat = sum_i w_i val^(j_i) at `value_step` for ids [B, H] and weights [B, H] (line 8): float32 [B, C, H, W].

    Any ids and weights will do (a condition-embedding retrieval, uniform weights...): this is
    the blend on its own. Weights must be finite (a least-squares fit's may be large); a blend
    that overflows float32 is refused with a KBError naming the weights' size.
    """
    try:
        ids, weights = np.asarray(ids), np.asarray(weights, dtype=np.float64)
    except (ValueError, TypeError):
        raise KBError("blend needs ids [B, H] (ints) and weights [B, H] (numbers) as arrays. Pass "
                      "nearest_keys(...).ids and fit_weights(...).weights.") from None
    if ids.ndim != 2 or weights.shape != ids.shape or ids.shape[1] < 1:
        raise KBError(f"blend needs ids [B, H] and weights [B, H] of one shape, H >= 1, got {list(ids.shape)} and "
                      f"{list(weights.shape)}. Pass nearest_keys(...).ids and fit_weights(...).weights.")
    if not np.isfinite(weights).all():
        raise KBError(f"blend weights contain NaN/Inf (first at {np.argwhere(~np.isfinite(weights))[0].tolist()}). "
                      "Pass the finite weights fit_weights returns.")
    value_step = kb.check_step(value_step, "value step")
    b, h = ids.shape
    if b == 0:
        return np.zeros((0, *kb.latent_shape), np.float32)
    values = kb.latents(value_step, ids.reshape(-1)).reshape(b, h, *kb.latent_shape)
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.stack([blend(v, w) for v, w in zip(values, weights)]).astype(np.float32)
    if not np.isfinite(out).all():
        raise KBError(f"the blend overflows float32: weights up to {float(np.abs(weights).max()):.3g} in size times "
                      "the stored values exceed its range. Pass weights of a sensible size (fit_weights gives "
                      "ones that rebuild the query), or check the KB's latents with kb.verify().")
    return out
