"""Checks of what callers pass in (steps, queries, ids, latents): every refusal a KBError naming the value and the fix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..core.errors import KBError
from .format import DTYPES
from .settings import is_int


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Sampling seeds run 0..2**64-1 (ComfyUI's seed range); numpy's generators refuse negative ones.
MAX_SEED = 2**64 - 1
#: Upper bound of nprobe / ef_search: FAISS takes a C int, and beyond this an IVF probe (capped at
#: the list count anyway) or an HNSW beam visits more keys than a flat scan of any KB this pack builds.
MAX_SEARCH_PARAM = 100_000


def check_seed(seed: Any, what: str = "seed") -> int:
    """`seed` as an int in 0..MAX_SEED, else a KBError naming the value and the range."""
    if not is_int(seed) or not 0 <= int(seed) <= MAX_SEED:
        raise KBError(f"{what} must be an integer from 0 to 2**64-1, got {short(seed)}. Pass a non-negative seed, e.g. 0.")
    return int(seed)


def check_search_param(name: str, value: Any) -> int | None:
    """nprobe / ef_search: None (the default) or an int in 1..MAX_SEARCH_PARAM, else a KBError."""
    if value is None:
        return None
    if not is_int(value) or not 1 <= int(value) <= MAX_SEARCH_PARAM:
        raise KBError(f"{name} must be a positive int or None (the default), at most {MAX_SEARCH_PARAM:,}, got "
                      f"{short(value)}. Pass e.g. {name}=64, or None; for exact search use index_type='flat'.")
    return int(value)


def to_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy array or torch tensor (torch is never imported here)."""
    if hasattr(x, "detach"):
        t = x.detach().cpu()
        if t.is_floating_point():
            t = t.float()  # bfloat16 has no numpy dtype
        return t.numpy()
    return np.asarray(x)


def check_step(step: Any, stored_steps: Sequence[int], root: str, what: str = "step") -> int:
    """`step` as an int if the KB at `root` stores it, else a KBError naming the stored steps."""
    steps = list(stored_steps)
    if not is_int(step):
        raise KBError(f"the {what} must be an integer step index, got {short(step)}. Use one of the stored steps {steps}.")
    if int(step) not in steps:
        raise KBError(f"KB at {root} has no {what} {int(step)}; it stores steps {steps}. Choose one of "
                      f"those, or rebuild the KB with stored steps including {int(step)}.")
    return int(step)


def as_queries(queries: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """Queries [B, C, H, W] or [B, D] for latents of `shape` -> float32 [B, D]; every refusal names the fix."""
    try:
        q = to_numpy(queries)
    except (ValueError, TypeError) as e:
        raise KBError(f"queries must be one array [B, C, H, W] or [B, D] of floats; got {type(queries).__name__} "
                      f"that numpy cannot stack ({e}). Stack the latents into one array.") from None
    d = math.prod(shape)
    if not np.issubdtype(q.dtype, np.floating):
        raise KBError(f"query dtype {q.dtype} is not a floating-point type. Pass the latent as float32 "
                      "(for a torch tensor: latent.float()).")
    if q.ndim == 4 and tuple(q.shape[1:]) != shape:
        raise KBError(f"query latent shape {list(q.shape[1:])} differs from the KB's {list(shape)}: the KB "
                      "was built for a different latent size (image size or model family). Use a KB built "
                      "for this latent size, or build one.")
    if q.ndim == 2 and q.shape[1] != d:
        raise KBError(f"flat query has {q.shape[1]} values per item, the KB's keys have {d} "
                      f"({list(shape)}): the KB was built for a different latent size. Use a matching KB.")
    if q.ndim not in (2, 4):
        raise KBError(f"query must be [B, C, H, W] or [B, D], got shape {list(q.shape)}. Add the batch dimension.")
    if q.shape[0] == 0:
        raise KBError("the query batch is empty. Pass at least one latent.")
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.ascontiguousarray(q.reshape(q.shape[0], -1), dtype=np.float32)
        bad = ~np.isfinite(q).all(axis=1)
        if bad.any():
            raise KBError(f"query {int(np.argmax(bad))} of the batch contains NaN/Inf: sampling diverged before "
                          "the key step. Check the model, cfg and input latent, or use an earlier key step.")
        norms = np.einsum("ij,ij->i", q, q)  # float32, as FAISS computes distances
    if not np.isfinite(norms).all():
        i = int(np.argmax(~np.isfinite(norms)))
        raise KBError(f"query {i} has values up to {float(np.abs(q[i]).max()):.3g}: its squared length overflows "
                      "float32, so no distance to it can be computed. A diffusion latent is of order 1 to 100; "
                      "check what was connected (an image instead of a latent?) or the sampler's output.")
    return q


def check_ids(ids: Any, n: int, root: str) -> np.ndarray:
    """Entry ids as int64 [k], each in [0, n)."""
    try:
        a = np.asarray(to_numpy(ids))
    except (ValueError, TypeError):
        raise KBError("ids must be a 1-D sequence of ints. Pass entry ids as returned by search().") from None
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise KBError(f"ids must be a 1-D sequence of ints, got {a.dtype} {list(a.shape)}. Pass entry ids as "
                      "returned by search().")
    a = a.astype(np.int64)
    bad = a[(a < 0) | (a >= n)]
    if bad.size:
        raise KBError(f"id {int(bad[0])} is out of range: KB at {root} has {n} entries "
                      f"(ids 0..{n - 1}). Use ids returned by search().")
    return a


def check_latents(latents: Any, prompts: list[str], seeds: list[int], stored_steps: Sequence[int],
                  shape: tuple[int, int, int], dtype: str) -> dict[int, np.ndarray]:
    """An append's latents {step: [n, C, H, W]}, checked and cast to the storage dtype."""
    n, steps = len(prompts), list(stored_steps)
    if not isinstance(latents, dict):
        raise KBError("latents must be a dict {step: array [n, C, H, W]}, one array per stored step.")
    if not all(is_int(k) or (isinstance(k, str) and k.isdigit()) for k in latents):
        raise KBError(f"latents keys must be step numbers, got {sorted(map(str, latents))[:6]}.")
    got = sorted(int(k) for k in latents)
    if got != steps:
        raise KBError(f"append got latents for steps {got}, the KB stores steps {steps}. Pass exactly one "
                      "array per stored step.")
    want = (n, *shape)
    out = {}
    for st in steps:
        try:
            a = to_numpy(latents[st] if st in latents else latents[str(st)])
        except (ValueError, TypeError):
            raise KBError(f"latents for step {st} are not an array. Pass one array [n, C, H, W] per step.") from None
        if tuple(a.shape) != want:
            raise KBError(f"latents for step {st} have shape {list(a.shape)}, expected {list(want)} "
                          f"({n} entries of latent shape {list(shape)}). "
                          "Pass latents of the KB's latent size, one row per prompt.")
        if not np.issubdtype(a.dtype, np.floating):
            raise KBError(f"latents for step {st} have dtype {a.dtype}; pass floating-point latents.")
        with np.errstate(over="ignore"):  # overflow becomes Inf, reported just below
            stored = np.ascontiguousarray(a, dtype=DTYPES[dtype])
        bad = ~np.isfinite(stored.reshape(n, -1)).all(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            overflow = bool(np.isfinite(np.asarray(a[i])).all())
            why = (f"overflow {dtype} (values beyond its range); rebuild the KB with dtype='float32'"
                   if overflow else "contain NaN/Inf: the sampler diverged for this entry; drop or "
                   "regenerate it (e.g. lower cfg), then append again")
            raise KBError(f"latents for step {st}, entry {i} (prompt {short(prompts[i])}, seed {seeds[i]}) {why}.")
        out[st] = stored
    return out
