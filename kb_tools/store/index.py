"""The search index of one stored step: FAISS over average-pooled keys, stored as plain arrays.

FAISS never parses a file. An index file is a safetensors file of arrays (the reduced keys,
plus IVF centroids and list assignments or the HNSW graph); `decode` checks every array
before a FAISS object is made from it, so a damaged or forged file cannot crash the process
or make a search return an id outside the KB.

Index types: "flat" (exact), "ivf" (flat until it holds enough keys to train 4*sqrt(n)
lists), "hnsw" (graph), and "auto": flat up to AUTO_FLAT_MAX_ENTRIES entries, HNSW above,
so that the default stays within the retrieval latency target at any size measured.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence

import faiss
import numpy as np
import safetensors.numpy

from ..core.errors import KBError
from .format import IndexRecord
from .safetensors_file import tensors_from_bytes

# "auto" reduce aims the index key at <= this many dims: FAISS search stays cheap, and the
# exact re-rank on the full key restores what pooling loses.
MAX_AUTO_INDEX_DIM = 256
# FAISS k-means warns below 39 training points per centroid; train IVF only with that many.
IVF_POINTS_PER_LIST = 39
HNSW_M = 32
HNSW_EF_SEARCH = 64
#: Above this many entries HNSW searches with the wider LARGE_HNSW_EF_SEARCH beam: at 1,000,000
#: synthetic SD1.5 keys efSearch 64 left 19.5% of the exact top 3 outside the 32 candidates the
#: re-rank sees, 512 left 8.3% for +0.75 ms (retrieval_budget.json, "ef_search_sweep"); at
#: 100,000 efSearch 64 already reaches recall@3 0.99.
LARGE_HNSW_MIN_ENTRIES = 200_000
LARGE_HNSW_EF_SEARCH = 512
#: "auto" switches from flat to HNSW above this many entries. A one-query flat search costs
#: about 0.25 us per entry at 256 dims on the 2-core benchmark machine (kb_scale.json,
#: "flat_scan"): 20,000 entries stay near 5 ms, half the 10 ms target, under load.
AUTO_FLAT_MAX_ENTRIES = 20_000
#: Below this many queries FAISS searches on one thread (see faiss_threads).
SMALL_BATCH = 16


def auto_reduce(latent_shape: Sequence[int], max_dim: int = MAX_AUTO_INDEX_DIM) -> int:
    """Smallest power-of-two pool factor r dividing H and W with C*(H/r)*(W/r) <= max_dim."""
    c, h, w = latent_shape
    r = 1
    while c * (h // r) * (w // r) > max_dim and h % (2 * r) == 0 and w % (2 * r) == 0:
        r *= 2
    return r  # if no factor reaches max_dim, the coarsest that divides: odd sizes stay usable


def reduce_keys(x: np.ndarray, r: int) -> np.ndarray:
    """Index key: average-pool [n, C, H, W] by r over H and W, flattened to float32 [n, C*H/r*W/r]."""
    n, c, h, w = x.shape
    x = np.asarray(x, dtype=np.float32)
    if r > 1:
        x = x.reshape(n, c, h // r, r, w // r, r).mean(axis=(3, 5), dtype=np.float32)
    return np.ascontiguousarray(x.reshape(n, -1))


def ivf_nlist(n: int) -> int:
    """Number of IVF lists for n keys: 4*sqrt(n), the usual FAISS rule of thumb."""
    return max(1, int(4 * math.sqrt(n)))


@contextlib.contextmanager
def faiss_threads(n: int | None):
    """Run FAISS on `n` OpenMP threads inside the block (None: leave as is).

    Fanning a handful of queries out over OpenMP costs more than it gains and collapses when
    the cores are busy (100k x 256 flat search, 2 busy cores: 56 ms p50 on 2 threads, 13 ms
    on 1), and a ComfyUI process keeps its cores busy sampling.
    """
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


# --------------------------------------------------------------------------- building


def structure_of(index: faiss.Index) -> tuple[str, int | None]:
    """("flat" | "ivf" | "hnsw", IVF list count or None) of a FAISS index made here."""
    if isinstance(index, faiss.IndexIVF):
        return "ivf", int(index.nlist)
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw", None
    return "flat", None


def empty(kind: str, dim: int) -> faiss.Index:
    """A new index for a requested type; "ivf" and "auto" start flat."""
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M)
        index.hnsw.efSearch = HNSW_EF_SEARCH
        return index
    return faiss.IndexFlatL2(dim)


def _keys(index: faiss.Index) -> np.ndarray:
    n = index.ntotal
    return index.reconstruct_n(0, n) if n else np.zeros((0, index.d), np.float32)


def settle(index: faiss.Index, kind: str) -> faiss.Index:
    """Convert a still-flat "ivf" or "auto" index once its size calls for IVF or HNSW."""
    if structure_of(index)[0] != "flat":
        return index
    n = index.ntotal
    if kind == "ivf" and n >= IVF_POINTS_PER_LIST * ivf_nlist(n):
        x, nlist = _keys(index), ivf_nlist(n)
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(index.d), index.d, nlist)
        ivf.train(x)
        ivf.add(x)  # same order, so FAISS ids stay the KB's global ids
        return ivf
    if kind == "auto" and n > AUTO_FLAT_MAX_ENTRIES:
        hnsw = empty("hnsw", index.d)
        hnsw.add(_keys(index))
        return hnsw
    return index


def grow(index: faiss.Index, kind: str, keys: np.ndarray) -> faiss.Index:
    """A copy of `index` with reduced `keys` appended (ids continue), converted if its size calls for it."""
    out = faiss.clone_index(index)
    out.add(keys)
    return settle(out, kind)


def build(kind: str, dim: int, chunks: Iterable[np.ndarray]) -> faiss.Index:
    """An index of `kind` over reduced keys fed chunk by chunk, in id order."""
    index = empty(kind, dim)
    for chunk in chunks:
        index.add(chunk)
    return settle(index, kind)


# --------------------------------------------------------------------------- files


def encode(index: faiss.Index) -> bytes:
    """The arrays of an index, as the bytes of a safetensors file."""
    structure, nlist = structure_of(index)
    n, d = index.ntotal, index.d
    if structure == "ivf":
        keys, assign = np.zeros((n, d), np.float32), np.zeros(n, np.int64)
        inv = index.invlists
        for lst in range(nlist):
            size = inv.list_size(lst)
            if size:
                ids = faiss.rev_swig_ptr(inv.get_ids(lst), size).copy()
                codes = faiss.rev_swig_ptr(inv.get_codes(lst), size * inv.code_size)
                keys[ids] = np.frombuffer(codes, dtype=np.float32).reshape(size, d)
                assign[ids] = lst
        arrays = {"keys": keys, "assign": assign, "centroids": _keys(index.quantizer)}
    elif structure == "hnsw":
        g = index.hnsw
        arrays = {"keys": _keys(index.storage),
                  "levels": faiss.vector_to_array(g.levels).astype(np.int32),
                  "offsets": faiss.vector_to_array(g.offsets).astype(np.int64),
                  "neighbors": faiss.vector_to_array(g.neighbors).astype(np.int32),
                  "graph": np.array([int(faiss.vector_to_array(g.cum_nneighbor_per_level)[1]) // 2, g.entry_point,
                                     g.max_level, g.efConstruction], np.int64)}
    else:
        arrays = {"keys": _keys(index)}
    return safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in arrays.items()})


_TENSORS = {"flat": {"keys"}, "ivf": {"keys", "assign", "centroids"}, "hnsw": {"keys", "levels", "offsets", "neighbors", "graph"}}


def decode(data: bytes, rec: IndexRecord, where: str, fix: str) -> faiss.Index:
    """A FAISS index from an index file's bytes, after checking every array against the record."""
    def bad(why: str) -> KBError:
        return KBError(f"{where} is not a valid {rec.structure} index for this KB: {why}. {fix}")

    t = tensors_from_bytes(data, where, fix)
    if set(t) != _TENSORS[rec.structure]:
        raise bad(f"it holds tensors {sorted(t)}, expected {sorted(_TENSORS[rec.structure])}")
    n, d = rec.ntotal, rec.dim
    keys = t["keys"]
    if keys.dtype != np.float32 or keys.shape != (n, d):
        raise bad(f"keys are {keys.dtype} {list(keys.shape)}, expected float32 {[n, d]}")
    if not _distances_finite(keys):
        raise bad("keys hold NaN, Inf or values so large that distances to them overflow float32")
    keys = np.ascontiguousarray(keys)
    if rec.structure == "flat":
        index = faiss.IndexFlatL2(d)
        index.add(keys)
        return index
    if rec.structure == "ivf":
        return _decode_ivf(t, keys, rec, bad)
    return _decode_hnsw(t, keys, rec, bad)


def _distances_finite(x: np.ndarray) -> bool:
    """Whether FAISS can compute float32 distances to every row (finite values, squared norms in range)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.einsum("ij,ij->i", x, x)).all()) if len(x) else True


def _decode_ivf(t: dict, keys: np.ndarray, rec: IndexRecord, bad) -> faiss.Index:
    n, d, nlist = rec.ntotal, rec.dim, rec.nlist
    centroids, assign = t["centroids"], t["assign"]
    if centroids.dtype != np.float32 or centroids.shape != (nlist, d) or not _distances_finite(centroids):
        raise bad(f"centroids are {centroids.dtype} {list(centroids.shape)}, expected finite float32 {[nlist, d]}")
    if assign.dtype != np.int64 or assign.shape != (n,) or (n and (assign.min() < 0 or assign.max() >= nlist)):
        raise bad(f"list assignments must be {n} int64 values in [0, {nlist})")
    quantizer = faiss.IndexFlatL2(d)
    quantizer.add(np.ascontiguousarray(centroids))
    index = faiss.IndexIVFFlat(quantizer, d, nlist)
    index.is_trained = True
    assign = np.ascontiguousarray(assign)
    index.add_core(n, faiss.swig_ptr(keys), None, faiss.swig_ptr(assign))  # ids 0..n-1, the KB's own
    return index


def _decode_hnsw(t: dict, keys: np.ndarray, rec: IndexRecord, bad) -> faiss.Index:
    n, d = rec.ntotal, rec.dim
    graph, levels, offsets, neighbors = t["graph"], t["levels"], t["offsets"], t["neighbors"]
    if graph.dtype != np.int64 or graph.shape != (4,):
        raise bad("graph parameters must be 4 int64 values (M, entry point, max level, efConstruction)")
    m, entry, max_level, ef_construction = (int(v) for v in graph)
    if not 2 <= m <= 512 or not 1 <= ef_construction <= 4096:
        raise bad(f"M={m} or efConstruction={ef_construction} is out of range")
    index = faiss.IndexHNSWFlat(d, m)  # its level table follows from M alone
    cum = faiss.vector_to_array(index.hnsw.cum_nneighbor_per_level).astype(np.int64)
    top = len(cum) - 1
    if levels.dtype != np.int32 or levels.shape != (n,) or (n and (levels.min() < 1 or levels.max() > top)):
        raise bad(f"levels must be {n} int32 values in [1, {top}]")
    if offsets.dtype != np.int64 or offsets.shape != (n + 1,) or offsets[0] != 0 \
            or not np.array_equal(np.diff(offsets), cum[levels]):
        raise bad("neighbour-list offsets do not match the node levels")
    if neighbors.dtype != np.int32 or neighbors.shape != (int(offsets[-1]),):
        raise bad(f"neighbour lists must be {int(offsets[-1])} int32 values")
    if neighbors.size and (neighbors.min() < -1 or neighbors.max() >= n):
        raise bad(f"a neighbour id is outside [0, {n}): a search could return an entry the KB does not have")
    # A node listed as a level-l neighbour must itself reach level l, or FAISS reads past its list.
    for lo in range(0, n, 16384):
        hi = min(n, lo + 16384)
        a, b = int(offsets[lo]), int(offsets[hi])
        slot_node = np.repeat(np.arange(lo, hi), np.diff(offsets[lo:hi + 1]))
        slot_level = np.searchsorted(cum, np.arange(a, b) - offsets[slot_node], side="right") - 1
        nb = neighbors[a:b]
        if not ((nb < 0) | (levels[np.maximum(nb, 0)] > slot_level)).all():
            raise bad("a neighbour list links to a node that does not reach that level")
    if (entry, max_level) != ((-1, -1) if n == 0 else (entry, int(levels.max()) - 1)) \
            or (n and not (0 <= entry < n and levels[entry] - 1 == max_level)):
        raise bad(f"entry point {entry} at level {max_level} is not a top-level node")
    index.storage.add(keys)
    g = index.hnsw
    faiss.copy_array_to_vector(np.ascontiguousarray(levels), g.levels)
    faiss.copy_array_to_vector(np.ascontiguousarray(offsets).astype(np.uint64), g.offsets)
    faiss.copy_array_to_vector(np.ascontiguousarray(neighbors), g.neighbors)
    g.entry_point, g.max_level, g.efConstruction, g.efSearch = entry, max_level, ef_construction, default_ef_search(n)
    index.ntotal = n
    return index


# --------------------------------------------------------------------------- searching


def default_ef_search(n: int) -> int:
    """HNSW efSearch for an index of n entries when the session sets none (see LARGE_HNSW_MIN_ENTRIES)."""
    return LARGE_HNSW_EF_SEARCH if n > LARGE_HNSW_MIN_ENTRIES else HNSW_EF_SEARCH


def apply_params(index: faiss.Index, nprobe: int | None, ef_search: int | None) -> None:
    """Session search parameters: IVF lists probed (default nlist/8), HNSW efSearch (default by size, default_ef_search)."""
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(index.nlist, nprobe or max(1, index.nlist // 8))
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = ef_search or default_ef_search(index.ntotal)


def widen(index: faiss.Index, c: int) -> None:
    """Search parameters that find `c` candidates whenever the index holds them."""
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = index.nlist
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = max(index.hnsw.efSearch, 4 * c)


def candidates(index: faiss.Index, rq: np.ndarray, c: int, nprobe: int | None, ef_search: int | None) -> np.ndarray:
    """FAISS's top-`c` ids per reduced query, int64 [B, c] (-1 where it found fewer); rows it
    came up short on are searched again with widened parameters. Not thread-safe: callers lock."""
    with faiss_threads(1 if len(rq) < SMALL_BATCH else None):
        _, cand = index.search(rq, c)
        short = np.flatnonzero((cand >= 0).sum(axis=1) < min(c, index.ntotal))
        if short.size:  # IVF probed too few lists / HNSW too small a beam
            widen(index, c)
            try:
                _, cand[short] = index.search(rq[short], c)
            finally:
                apply_params(index, nprobe, ef_search)
    return cand


def rerank(q: np.ndarray, cand: np.ndarray, uniq: np.ndarray, full: np.ndarray, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-h per query among its candidates: ids int64 [B, h], Euclidean distances float32 [B, h].

    q: float32 [B, D]; cand: int64 [B, c] (-1 = none); uniq: the sorted distinct candidate
    ids; full: their full keys float32 [len(uniq), D], a scratch copy (overwritten).
    """
    ids = np.empty((len(q), h), np.int64)
    dist = np.empty((len(q), h), np.float32)
    for b in range(len(q)):
        rows = np.searchsorted(uniq, np.unique(cand[b][cand[b] >= 0]))  # sorted ids: ties -> lower id
        # One query owns every row: subtract in `full` itself (a 2 MB copy less per SD1.5 query).
        diff = full if len(q) == 1 else full[rows]
        np.subtract(diff, q[b], out=diff)
        # Summed in float32 (SIMD, half the cost of a float64 sum): relative error ~1e-6 here,
        # far below the gaps between neighbours; exact duplicates still tie exactly.
        d2 = np.einsum("ij,ij->i", diff, diff)
        top = np.argsort(d2, kind="stable")[:h]
        ids[b], dist[b] = uniq[rows[top]], np.sqrt(d2[top])
    return ids, dist
