"""Retrieval budget: what one whole ReDi query costs (search, exact re-rank, weights, blend, guard), at
SD1.5 latent size, next to a GPU model step (20-50 ms for SD1.5), so it can stay a rounding error.

    python benchmarks/retrieval_budget.py                      # 10k and 100k KBs, 1M index-only
    python benchmarks/retrieval_budget.py --sizes 2000 --million 50000 --quick    # smoke run

Part 1 (10k, 100k): a real KB on disk, built by benchmarks/kb_scale.py's synthetic generator with
index_type "auto" (what a user gets), queried through the pack's own functions in the order
Algorithm 2 runs them: retrieval.nearest_keys (FAISS on reduced keys + exact re-rank on the full
keys), retrieval.fit_weights, retrieval.blend_entries, guard.resolve_guard(...).accepts. Each part
is timed on its own, one query (B=1) at a time; recall@3 is against brute force on the full keys.
On the same KB's reduced keys, flat / IVF / HNSW indexes are also timed index-only with the same
re-rank, so the auto choice can be checked against the others.

Part 2 (1M, index-only): 1,000,000 reduced keys (the 256-d average-pooled keys the index holds)
drawn from the same distribution as the KB's (kb_scale.Generator reduced analytically: its smooth
field is constant on 8x8 blocks, its detail averages to N(0, 1/64)), indexed flat, IVF and HNSW
with kb_tools.store.index's own constructors (IVF above 300k keys trained on 64 keys per list). The full keys and values the re-rank and the blend
read are synthetic: entry i uses the full latents of pool entry i % 2048, its key plus 1% of pool
entry (i // 2048) % 2048's so that no two ids share a key (two real gathers from a 128 MB array,
as a KB gathers from its page-cached memmap, and one add). Recall@3 at 1M is against an exact
(flat) search of the same reduced keys: there are no full keys to be exact on.

FAISS runs on one thread for single queries (as the pack does: kb_tools.store.index.candidates).
Wall and CPU (this thread) milliseconds are recorded side by side with the load average: the
machine is shared. Results: benchmarks/results/retrieval_budget.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "benchmarks"))

import faiss  # noqa: E402

import kb_scale  # noqa: E402  (the synthetic KB generator and brute force shared with the scale benchmark)
from kb_scale import A_K, H, KEY, SIGMA_K, TOPICS, VALUE, Generator  # noqa: E402

import kb_tools.store as kbmod  # noqa: E402
from kb_tools.calibration.guard import GUARD_AUTO, resolve_guard  # noqa: E402
from kb_tools.store import index as ix  # noqa: E402
from kb_tools.core.weights import blend, fit_weights  # noqa: E402
from kb_tools.store.retrieval import blend_entries, nearest_keys  # noqa: E402

kb_scale.kbmod = kbmod
POOL = 2048
IVF_FULL_TRAIN_MAX = 300_000
GPU_STEP_MS = (20.0, 50.0)  # an SD1.5 UNet step on a GPU (the reference step time)
EF_SWEEP = (64, 128, 256, 512)  # HNSW efSearch values tried at 1M (64 is kb_tools' default)


def faiss_build_info() -> dict:
    """Which FAISS build and SIMD level run here (faiss-cpu >= 1.12 wheels dispatch per CPU at run time)."""
    info = {"faiss_version": faiss.__version__, "compile_options": faiss.get_compile_options().split()}
    cfg = getattr(faiss, "SIMDConfig", None)
    if cfg is not None:
        info["dynamic_dispatch"] = bool(cfg.has_dynamic_dispatch())
        info["simd_level_in_use"] = cfg.get_level_name()
    for name in ("swigfaiss_avx512", "swigfaiss_avx2"):
        try:
            __import__(f"faiss.{name}")
            info[f"{name}_module"] = "loads"
        except ImportError:
            info[f"{name}_module"] = "absent (one library, dispatched at run time)" if info.get("dynamic_dispatch") else "absent"
    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":")[1].split())
                break
    except OSError:
        pass
    info["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx2", "avx512f", "avx512_vpopcntdq", "fma")))
    return info


def pct(times: list[float]) -> dict:
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


class Timer:
    """Per-part wall and thread-CPU milliseconds over many runs."""

    def __init__(self):
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}
        self._t = self._c = 0.0

    def start(self) -> None:
        self._t, self._c = time.perf_counter(), time.thread_time()

    def lap(self, part: str) -> None:
        t, c = time.perf_counter(), time.thread_time()
        self.wall.setdefault(part, []).append((t - self._t) * 1000)
        self.cpu.setdefault(part, []).append((c - self._c) * 1000)
        self._t, self._c = t, c

    def summary(self) -> dict:
        parts = list(self.wall)
        total_wall = np.sum([self.wall[p] for p in parts], axis=0)
        total_cpu = np.sum([self.cpu[p] for p in parts], axis=0)
        out = {p: {**pct(self.wall[p]), "cpu_p50_ms": float(np.percentile(self.cpu[p], 50))} for p in parts}
        out["total"] = {**pct(list(total_wall)), "cpu_p50_ms": float(np.percentile(total_cpu, 50)), "runs": len(total_wall)}
        return out


def full_query_through_the_pack(kb, queries: np.ndarray, repeats: int) -> tuple[dict, np.ndarray]:
    """Algorithm 2's retrieval half for one query at a time, through the functions the sampler calls."""
    spread = kb.key_spread(KEY)  # computed once per KB generation, as in a run
    guard = resolve_guard(kb.calibration(KEY), KEY, H, GUARD_AUTO)
    timer, found = Timer(), []
    for r in range(repeats):
        q = queries[r % len(queries)].reshape(1, -1)
        timer.start()
        near = nearest_keys(kb, q, KEY, H)
        timer.lap("search_and_rerank")
        fit = fit_weights(q, near.keys, spread)
        timer.lap("weights")
        blend_entries(kb, near.ids, fit.weights, VALUE)
        timer.lap("blend")
        guard.accepts(fit.centered_residual)
        timer.lap("guard")
        if r < len(queries):
            found.append(near.ids[0])
    return timer.summary(), np.array(found)


def index_query(index, rq: np.ndarray, q: np.ndarray, full_keys, values, spread: float, repeats: int) -> tuple[dict, np.ndarray]:
    """The same query on a given FAISS index: kb_tools' candidates + rerank, then weights, blend, guard."""
    guard = resolve_guard(None, KEY, H, GUARD_AUTO)
    c = max(4 * H, 32)
    timer, found = Timer(), []
    for r in range(repeats):
        i = r % len(q)
        timer.start()
        cand = ix.candidates(index, rq[i:i + 1], c, None, None)
        timer.lap("index_search")
        uniq = np.unique(cand[cand >= 0])
        ids, _ = ix.rerank(q[i:i + 1], cand, uniq, full_keys(uniq), H)
        timer.lap("rerank")
        keys = full_keys(ids[0])[None]
        fit = fit_weights(q[i:i + 1], keys, spread)
        timer.lap("weights")
        blend(values(ids[0]), fit.weights[0])
        timer.lap("blend")
        guard.accepts(fit.centered_residual)
        timer.lap("guard")
        if r < len(q):
            found.append(ids[0])
    return timer.summary(), np.array(found)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / H for a, b in zip(found, exact)]))


def make_index(kind: str, keys: np.ndarray) -> tuple[faiss.Index, float, float]:
    """kb_tools.store.index's index of `kind` over `keys` (as a KB of that type holds it); build wall and CPU s."""
    t, c = time.perf_counter(), time.process_time()
    if kind == "ivf" and len(keys) > IVF_FULL_TRAIN_MAX:
        # kb_tools trains k-means on every key (FAISS's default cap of 256 per list); at 1M that is
        # most of an hour on one busy core, so here the lists are trained on 64 keys per list.
        nlist = ix.ivf_nlist(len(keys))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(keys.shape[1]), keys.shape[1], nlist)
        index.cp.max_points_per_centroid = 64
        index.train(keys)
        index.add(keys)
    else:
        index = ix.build(kind, keys.shape[1], (keys[i:i + 100_000] for i in range(0, len(keys), 100_000)))
    if kind == "ivf" and ix.structure_of(index)[0] != "ivf":
        raise SystemExit(f"{len(keys)} keys are too few for an IVF index here")
    ix.apply_params(index, None, None)
    return index, time.perf_counter() - t, time.process_time() - c


def kb_part(n: int, gen: Generator, root: Path, queries: np.ndarray, repeats: int, kinds: list[str]) -> dict:
    path = root / f"kb-{n}"
    load = os.getloadavg()
    build_s, build_cpu_s = kb_scale.build(path, n, "auto", gen)
    kb = kbmod.KnowledgeBase.open(str(path))
    exact = kb_scale.exact_top(kb, queries, H)
    kb.search(KEY, queries[:1], H)  # load the index once, as the first query of a session does
    row = {"entries": n, "loadavg_1_5_15": load, "build_s": build_s, "build_cpu_s": build_cpu_s,
           "auto_index": kb.info()["index_structure"], "index_dim": kb.info()["index_dim"]}
    row["full_query"], found = full_query_through_the_pack(kb, queries, repeats)
    row["full_query"]["recall_at_3"] = recall(found, exact)
    # The same KB's reduced keys under each index type, index-only with the same re-rank.
    keys = np.concatenate([ix.reduce_keys(c, kb.reduce) for c in kb._gen.key_chunks(KEY)])
    q = queries.reshape(len(queries), -1).astype(np.float32)
    rq = ix.reduce_keys(queries, kb.reduce)
    spread = kb.key_spread(KEY)
    row["by_index"] = {}
    for kind in kinds:
        if kind == "ivf" and n < ix.IVF_POINTS_PER_LIST * ix.ivf_nlist(n):
            continue
        index, bs, bc = make_index(kind, keys)
        summary, found = index_query(index, rq, q, lambda ids: kb.keys_flat(KEY, ids), lambda ids: kb.latents(VALUE, ids),
                                     spread, repeats)
        row["by_index"][kind] = {"build_s": bs, "build_cpu_s": bc, **summary, "recall_at_3": recall(found, exact)}
        del index
    kb = None  # release the maps before the folder goes
    shutil.rmtree(path)
    return row


def reduced_entries(gen: Generator, n: int, reduce: int, seed: int = 7) -> np.ndarray:
    """n reduced keys distributed as kb_scale.Generator's entries after reduce_keys (see module docstring)."""
    rz = ix.reduce_keys(gen.z[None], reduce)[0]
    topics = ix.reduce_keys(gen.topics, reduce)
    rng = np.random.default_rng(seed)
    out = np.empty((n, rz.size), np.float32)
    per_block = reduce * reduce
    for lo in range(0, n, 100_000):
        m = min(100_000, n - lo)
        own = rng.standard_normal((m, rz.size), dtype=np.float32)
        detail = rng.standard_normal((m, rz.size), dtype=np.float32) / np.sqrt(per_block)
        out[lo:lo + m] = SIGMA_K * rz + A_K * (topics[np.arange(lo, lo + m) % TOPICS] + 0.5 * own + 0.1 * detail)
    return out


def million_part(n: int, gen: Generator, queries: np.ndarray, repeats: int, kinds: list[str]) -> dict:
    reduce = kbmod.auto_reduce(kb_scale.SHAPE)
    load = os.getloadavg()
    t = time.perf_counter()
    keys = reduced_entries(gen, n, reduce)
    row = {"entries": n, "loadavg_1_5_15": load, "synthesis_s": time.perf_counter() - t, "index_dim": keys.shape[1],
           "auto_index_would_be": "flat" if n <= kbmod.AUTO_FLAT_MAX_ENTRIES else "hnsw"}
    pool = gen.entries(0, POOL)
    pool_keys = pool[KEY].reshape(POOL, -1).astype(np.float32)
    pool_values = pool[VALUE].reshape(POOL, -1).astype(np.float32)
    spread = float(np.sqrt(((pool_keys - pool_keys.mean(0)) ** 2).sum(1).mean()))
    q = queries.reshape(len(queries), -1).astype(np.float32)
    rq = ix.reduce_keys(queries, reduce)

    def synthetic_keys(ids: np.ndarray) -> np.ndarray:
        # Pool entry ids % POOL plus 1% of entry ids // POOL: every id below POOL**2 gets its own
        # key. With ids % POOL alone, candidates that collide modulo POOL repeat a key, a
        # degenerate least-squares problem no real KB poses (it sent the weights to the SVD path).
        return pool_keys[ids % POOL] + 0.01 * pool_keys[(ids // POOL) % POOL]

    flat = faiss.IndexFlatL2(keys.shape[1])
    flat.add(keys)
    with ix.faiss_threads(None):
        _, exact = flat.search(rq, H)  # exact in the reduced space (all there is at 1M)
    row["by_index"] = {}
    for kind in kinds:
        index, bs, bc = (flat, 0.0, 0.0) if kind == "flat" else make_index(kind, keys)
        summary, _ = index_query(index, rq, q, synthetic_keys, lambda ids: pool_values[ids % POOL], spread, repeats)
        with ix.faiss_threads(1):
            _, approx = index.search(rq, H)
        # What the re-rank can recover: the exact reduced-space top-3 among the candidates it is given.
        cand = ix.candidates(index, rq, max(4 * H, 32), None, None)
        row["by_index"][kind] = {"build_s": bs, "build_cpu_s": bc, **summary,
                                 "recall_at_3_vs_exact_reduced_search": recall(approx, exact),
                                 "exact_top3_among_candidates": recall(cand, exact)}
        if kind == "hnsw":
            row["by_index"][kind]["ef_search_sweep"] = ef_sweep(index, rq, q, synthetic_keys, pool_values, spread,
                                                                repeats, exact)
        print(f"  1M {kind}: p50 {summary['total']['p50_ms']:.2f} ms", flush=True)
        if index is not flat:
            del index
    return row


def ef_sweep(index, rq, q, full_keys, pool_values, spread: float, repeats: int, exact: np.ndarray) -> dict:
    """The same whole query at larger HNSW beams: what a wider search buys in recall and costs in time."""
    out = {}
    for ef in EF_SWEEP:
        index.hnsw.efSearch = ef
        summary, _ = index_query(index, rq, q, full_keys, lambda ids: pool_values[ids % POOL], spread, repeats)
        cand = ix.candidates(index, rq, max(4 * H, 32), None, ef)
        out[str(ef)] = {**summary, "exact_top3_among_candidates": recall(cand, exact)}
        print(f"  1M hnsw efSearch {ef}: p50 {summary['total']['p50_ms']:.2f} ms, "
              f"top 3 among candidates {out[str(ef)]['exact_top3_among_candidates']:.3f}", flush=True)
    ix.apply_params(index, None, None)
    return out


def goals(rows: list[dict], million: dict | None) -> list[dict]:
    out = []
    for r in rows:
        if r["entries"] == 100_000:
            fq = r["full_query"]
            out.append({"goal": "100k, auto index: full query p50 < 2 ms", "value_ms": fq["total"]["p50_ms"], "met": fq["total"]["p50_ms"] < 2})
            out.append({"goal": "100k, auto index: recall@3 >= 0.95", "value": fq["recall_at_3"], "met": fq["recall_at_3"] >= 0.95})
    if million:
        kind = million["auto_index_would_be"]
        v = million["by_index"].get(kind, {}).get("total", {}).get("p50_ms")
        if v is not None:
            out.append({"goal": f"1M, auto index ({kind}): full query p50 < 5 ms (index-only run, synthetic full keys)",
                        "value_ms": v, "met": v < 5})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--million", type=int, default=1_000_000, help="entries of the index-only run (0: skip)")
    p.add_argument("--indexes", default="flat,ivf,hnsw")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--repeats", type=int, default=500)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=str(HERE / "benchmarks" / "results" / "retrieval_budget.json"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--keep-kb-rows", action="store_true",
                   help="keep the KB rows (10k, 100k) already in --out, measured by an earlier run, and its 1M rows of the "
                        "index types --indexes leaves out; measure only --million")
    args = p.parse_args()
    if args.quick:
        args.queries, args.repeats = 16, 40
    faiss.omp_set_num_threads(1)
    kinds = args.indexes.split(",")
    gen = Generator()
    queries = gen.queries(args.queries)
    root = Path(tempfile.mkdtemp(prefix="budget-", dir=args.workdir))
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "faiss": faiss_build_info(), "gpu_step_ms_reference": GPU_STEP_MS, "h": H, "key_step": KEY,
              "value_step": VALUE, "queries": args.queries, "repeats": args.repeats, "kb": [], "million": None}
    out = Path(args.out)
    earlier = json.loads(out.read_text()) if args.keep_kb_rows and out.is_file() else None
    if earlier:
        result["kb"] = [{**row, "from_run_of": earlier["date"], "queries": earlier["queries"], "repeats": earlier["repeats"]}
                        for row in earlier.get("kb", [])]
    try:
        for n in (int(s) for s in args.sizes.split(",") if s):
            print(f"KB of {n} entries ...", flush=True)
            result["kb"].append(kb_part(n, gen, root, queries, args.repeats, kinds))
            out.write_text(json.dumps(result, indent=1))
        if args.million:
            print(f"index-only run at {args.million} entries ...", flush=True)
            result["million"] = million_part(args.million, gen, queries, args.repeats, kinds)
            for kind, row in ((earlier or {}).get("million") or {}).get("by_index", {}).items():
                if kind not in result["million"]["by_index"]:  # index types this run did not measure again
                    result["million"]["by_index"][kind] = {**row, "from_run_of": earlier["date"]}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["goals"] = goals(result["kb"], result["million"])
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["goals"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
