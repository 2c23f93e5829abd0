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
    """Top-h neighbours j_1..j_h of each query float32 [B, D] among the KB's keys at `key_step` (line 6)."""
    ids, dist = kb.search(key_step, query, h, candidates=candidates)
    keys = kb.keys_flat(key_step, ids.reshape(-1)).reshape(len(query), h, -1)
    return NearestKeys(int(key_step), ids, dist, keys)



def blend_entries(kb: KnowledgeBase, ids: np.ndarray, weights: np.ndarray, value_step: int) -> np.ndarray:
    """x_v_hat = sum_i w_i val^(j_i) at `value_step` for ids [B, H] and weights [B, H] (line 8): float32 [B, C, H, W].

    Any ids and weights will do (a condition-embedding retrieval, uniform weights...): this is
    the blend on its own.
    """
    ids = np.asarray(ids)
    weights = np.asarray(weights, dtype=np.float64)
    if ids.ndim != 2 or weights.shape != ids.shape:
        raise KBError(f"blend needs ids [B, H] and weights [B, H] of one shape, got {list(ids.shape)} and "
                      f"{list(weights.shape)}.")
    kb.check_step(value_step, "value step")
    b, h = ids.shape
    values = kb.latents(value_step, ids.reshape(-1)).reshape(b, h, *kb.latent_shape)
    return np.stack([blend(v, w) for v, w in zip(values, weights)]).astype(np.float32)
