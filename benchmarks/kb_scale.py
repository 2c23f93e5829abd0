"""Knowledge-base scale benchmark: build, open, search and disk cost at SD1.5 latent size.

    python benchmarks/kb_scale.py                        # this checkout: 10k and 100k entries, auto/flat/ivf/hnsw
    python benchmarks/kb_scale.py --sizes 1000 --quick   # smoke run
    python benchmarks/kb_scale.py --pack OTHER_CHECKOUT --label before --indexes flat,ivf,hnsw
                                                         # the same measurements of another checkout's kb_tools
    python benchmarks/kb_scale.py --compare-with OTHER_CHECKOUT
                                                         # both, row by row: OTHER ("before") then this ("after")

Each run is stored under its --label in benchmarks/results/kb_scale.json, next to the runs
already there, so two checkouts sit side by side ("comparison"). --compare-with measures each
(size, index) row for both checkouts one right after the other, so both see about the same
machine load. Every row records the load average: latencies on a shared machine move with it,
and CPU time is recorded beside wall time to tell load from code.

Entries are synthetic but shaped like ReDi keys:
    key(prompt)   = sigma_k * z + a_k * S(prompt) + 0.1 * a_k * D(prompt)
    value(prompt) = sigma_v * z + a_v * S(prompt) + 0.1 * a_v * D(prompt)
z is ONE shared 4x64x64 noise (the official fixed-seed protocol), S a smooth prompt-dependent
field (8x8 Gaussian noise upsampled to 64x64: image layout) and D per-pixel detail. Prompt
structures are drawn around 512 "topics" (S = topic + 0.5 * own), so neighbours are
meaningfully near, as similar captions are. Queries are new prompts around the same topics:
held-out, not copies of stored entries.
Targets: 100k opens < 2 s with RSS < 1.5 GB; p50 < 10 ms at 100k with
recall@3 >= 0.95; <= 70 KB of disk per entry for one key/value pair. "flat_scan" times a
one-query FAISS flat search by KB size: where flat stops meeting the latency target is where
index_type "auto" switches to HNSW (kb_tools.store.AUTO_FLAT_MAX_ENTRIES).
To add a measurement: a function taking (kb, queries, ...) returning a dict, called in `run`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent
SHAPE = (4, 64, 64)
STEPS, KEY, VALUE = 50, 10, 20
SIGMA_K, SIGMA_V, A_K, A_V = 6.0, 2.5, 0.6, 0.85
TOPICS = 512
CHUNK = 1000
H = 3
kbmod = None  # kb_tools.store of the checkout measured (set in main: --pack)


def settings():
    sigmas = list(np.linspace(14.6, 0.03, STEPS).astype(float)) + [0.0]
    return kbmod.KBSettings(model_fingerprint={"benchmark": "synthetic"}, latent_shape=SHAPE, sampling_type="EPS",
                            sampler="euler", scheduler="normal", steps=STEPS, cfg=7.5, denoise=1.0,
                            stored_steps=[KEY, VALUE], sigmas=sigmas)


def smooth(rng: np.random.Generator, n: int) -> np.ndarray:
    low = rng.standard_normal((n, SHAPE[0], 8, 8)).astype(np.float32)
    return np.repeat(np.repeat(low, 8, axis=2), 8, axis=3)


class Generator:
    """Deterministic entries and queries (see module docstring)."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.z = rng.standard_normal(SHAPE).astype(np.float32)
        self.topics = smooth(rng, TOPICS)

    def structure(self, ids: np.ndarray, salt: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([salt, int(ids[0]), len(ids)])
        s = self.topics[ids % TOPICS] + 0.5 * smooth(rng, len(ids))
        d = rng.standard_normal((len(ids), *SHAPE)).astype(np.float32)
        return s, d

    def entries(self, start: int, n: int, salt: int = 1) -> dict[int, np.ndarray]:
        s, d = self.structure(np.arange(start, start + n), salt)
        return {KEY: SIGMA_K * self.z + A_K * (s + 0.1 * d), VALUE: SIGMA_V * self.z + A_V * (s + 0.1 * d)}

    def queries(self, n: int) -> np.ndarray:
        return self.entries(10_000_000, n, salt=2)[KEY]


def build(path: Path, n: int, index_type: str, gen: Generator) -> tuple[float, float]:
    """Wall and CPU seconds to build a KB of n entries in appends of CHUNK."""
    kb = kbmod.KnowledgeBase.create(str(path), settings(), dtype="float16", index_type=index_type)
    t, c = time.perf_counter(), time.process_time()
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        kb.append(gen.entries(start, m), [f"prompt {i}" for i in range(start, start + m)], [0] * m)
    return time.perf_counter() - t, time.process_time() - c


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def exact_top(kb, queries: np.ndarray, h: int) -> np.ndarray:
    """Brute-force top-h over the full keys, streaming the memmapped shards."""
    q = queries.reshape(len(queries), -1).astype(np.float32)
    q2 = (q * q).sum(1)
    best_d = np.full((len(q), h), np.inf, np.float32)
    best_i = np.zeros((len(q), h), np.int64)
    offset = 0
    for view in kb.shard_views(KEY):
        keys = np.asarray(view, np.float32).reshape(len(view), -1)
        d = q2[:, None] - 2 * q @ keys.T + (keys * keys).sum(1)[None, :]
        ids = np.arange(offset, offset + len(keys))[None, :].repeat(len(q), 0)
        all_d = np.concatenate([best_d, d], 1)
        all_i = np.concatenate([best_i, ids], 1)
        sel = np.argsort(all_d, 1)[:, :h]
        best_d, best_i = np.take_along_axis(all_d, sel, 1), np.take_along_axis(all_i, sel, 1)
        offset += len(keys)
    return best_i


OPEN_PROBE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
import numpy as np


def mem_mb(field):
    # /proc, not getrusage: ru_maxrss survives exec and would report the parent's peak.
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024


from kb_tools.store import KnowledgeBase
t, c = time.perf_counter(), time.process_time()
kb = KnowledgeBase.open(sys.argv[1])
t_open, c_open = time.perf_counter() - t, time.process_time() - c
rss_open, peak_open = mem_mb("VmRSS"), mem_mb("VmHWM")
q = np.asarray(kb.latents(%d, [0]), np.float32)
t = time.perf_counter()
kb.search(%d, q, 3)
t_first = time.perf_counter() - t
print(json.dumps({"open_s": t_open, "open_cpu_s": c_open, "first_search_s": t_first, "rss_mb_after_open": rss_open,
                  "peak_rss_mb_during_open": peak_open, "rss_mb_after_first_search": mem_mb("VmRSS"),
                  "peak_rss_mb_after_first_search": mem_mb("VmHWM"), "index_structure": kb.info().get("index_structure")}))
""" % (KEY, KEY)


def measure_open(path: Path, pack: Path) -> dict:
    """Open in a fresh process so RSS is the KB's, not this benchmark's."""
    out = subprocess.run([sys.executable, "-c", OPEN_PROBE, str(path), str(pack)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def latency(kb, queries: np.ndarray, batch: int, repeats: int) -> dict:
    """p50/p99 of one search of `batch` queries, wall and CPU (this thread) milliseconds."""
    wall, cpu = [], []
    for r in range(repeats):
        i = (r * batch) % (len(queries) - batch + 1)
        t, c = time.perf_counter(), time.thread_time()
        kb.search(KEY, queries[i:i + batch], H)
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append((time.thread_time() - c) * 1000)
    return {"p50_ms": float(np.percentile(wall, 50)), "p99_ms": float(np.percentile(wall, 99)),
            "cpu_p50_ms": float(np.percentile(cpu, 50)), "runs": repeats}


def recall(kb, queries: np.ndarray, exact: np.ndarray) -> float:
    found, _ = kb.search(KEY, queries, H)
    return float(np.mean([len(set(a) & set(b)) / H for a, b in zip(found, exact)]))


def run(n: int, index_type: str, gen: Generator, root: Path, queries: np.ndarray, exact: dict, repeats: int, pack: Path) -> dict:
    path = root / f"kb-{n}-{index_type}"
    load = os.getloadavg()
    build_s, build_cpu_s = build(path, n, index_type, gen)
    row = {"entries": n, "index": index_type, "loadavg_1_5_15": load, "build_s": build_s, "build_cpu_s": build_cpu_s,
           "build_entries_per_s": n / build_s, "disk_bytes_per_entry": disk_bytes(path) / n}
    row.update(measure_open(path, pack))
    kb = kbmod.KnowledgeBase.open(str(path))
    kb.search(KEY, queries[:1], H)  # load the index once
    row["latency_1"] = latency(kb, queries, 1, repeats)
    row["latency_8"] = latency(kb, queries, 8, max(10, repeats // 4))
    if n not in exact:
        exact[n] = exact_top(kb, queries, H)
    row["recall_at_3"] = recall(kb, queries, exact[n])
    del kb
    shutil.rmtree(path)
    return row


def flat_scan(sizes=(5_000, 10_000, 20_000, 40_000, 70_000, 100_000), dim=256, k=32, repeats=200) -> list[dict]:
    """One-query FAISS flat search (what "auto" uses below its threshold) by KB size, one thread."""
    import faiss

    rng = np.random.default_rng(0)
    x = rng.standard_normal((max(sizes), dim)).astype(np.float32)
    q = rng.standard_normal((repeats, dim)).astype(np.float32)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    out = []
    try:
        for n in sizes:
            index = faiss.IndexFlatL2(dim)
            index.add(x[:n])
            times = []
            for i in range(repeats):
                t = time.perf_counter()
                index.search(q[i:i + 1], k)
                times.append((time.perf_counter() - t) * 1000)
            out.append({"entries": n, "dim": dim, "k": k, "p50_ms": float(np.percentile(times, 50)),
                        "p99_ms": float(np.percentile(times, 99))})
    finally:
        faiss.omp_set_num_threads(before)
    return out


def targets(rows: list[dict]) -> list[dict]:
    checks = []
    for r in rows:
        if r["entries"] != 100_000:
            continue
        tag = f"100k {r['index']}"
        checks += [
            {"target": f"{tag}: opens in < 2 s", "value": r["open_s"], "met": r["open_s"] < 2.0},
            {"target": f"{tag}: RSS after open < 1.5 GB", "value_mb": r["rss_mb_after_open"], "met": r["rss_mb_after_open"] < 1536},
            {"target": f"{tag}: RSS after first search < 1.5 GB", "value_mb": r["rss_mb_after_first_search"], "met": r["rss_mb_after_first_search"] < 1536},
            {"target": f"{tag}: p50 retrieval (1 query, H=3) < 10 ms", "value_ms": r["latency_1"]["p50_ms"], "met": r["latency_1"]["p50_ms"] < 10},
            {"target": f"{tag}: recall@3 >= 0.95", "value": r["recall_at_3"], "met": r["recall_at_3"] >= 0.95},
            {"target": f"{tag}: <= 70 KB disk per entry", "value_kb": r["disk_bytes_per_entry"] / 1024, "met": r["disk_bytes_per_entry"] <= 70 * 1024},
        ]
    return checks


def comparison(before: dict, after: dict) -> list[dict]:
    """The rows both runs measured, side by side (after / before ratios > 1 mean slower or bigger)."""
    out = []
    fields = {"open_s": lambda r: r["open_s"], "rss_mb_after_open": lambda r: r["rss_mb_after_open"],
              "rss_mb_after_first_search": lambda r: r["rss_mb_after_first_search"],
              "p50_ms": lambda r: r["latency_1"]["p50_ms"], "p99_ms": lambda r: r["latency_1"]["p99_ms"],
              "recall_at_3": lambda r: r["recall_at_3"], "build_s": lambda r: r["build_s"]}
    for b in before["rows"]:
        a = next((r for r in after["rows"] if (r["entries"], r["index"]) == (b["entries"], b["index"])), None)
        if a is None:
            continue
        row = {"entries": b["entries"], "index": b["index"]}
        for name, get in fields.items():
            row[name] = {"before": get(b), "after": get(a), "ratio": get(a) / get(b) if get(b) else None}
        out.append(row)
    return out


def million_note(rows: list[dict]) -> dict:
    """Why 1M entries were not built, with the cost extrapolated from the largest run."""
    big = max(rows, key=lambda r: r["entries"]) if rows else None
    if big is None:
        return {"entries": 1_000_000, "reason": "not requested (--sizes)"}
    gb = big["disk_bytes_per_entry"] * 1e6 / 1e9
    minutes = 1e6 / big["build_entries_per_s"] / 60
    return {"entries": 1_000_000, "reason": f"not requested: would need about {gb:.0f} GB of disk and {minutes:.0f} minutes of "
            f"build per index type here (extrapolated from {big['entries']} entries); run with --sizes 1000000 where that fits"}


def code_version(pack: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(pack), "log", "-1", "--format=%h %s"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(pack), "status", "--porcelain", "--", "kb_tools"], capture_output=True, text=True)
        return out.stdout.strip() + (" (+ uncommitted kb_tools changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    global kbmod
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--indexes", default="auto,flat,ivf,hnsw")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--pack", default=str(HERE), help="checkout whose kb_tools is measured (default: this one)")
    p.add_argument("--label", default="after", help="name of this run in the results file (e.g. before / after)")
    p.add_argument("--workdir", default=None, help="where KBs are built (needs ~7 GB per 100k entries)")
    p.add_argument("--out", default=str(HERE / "benchmarks" / "results" / "kb_scale.json"))
    p.add_argument("--quick", action="store_true", help="few queries and repeats (smoke run)")
    p.add_argument("--compare-with", default=None, metavar="CHECKOUT",
                   help="measure CHECKOUT (label 'before') and this checkout ('after') row by row, back to back")
    p.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)  # one row of a --compare-with run
    args = p.parse_args()
    if args.quick:
        args.queries, args.repeats = 16, 20
    if args.compare_with:
        return compare(args)
    pack = Path(args.pack).resolve()
    sys.path.insert(0, str(pack))
    import kb_tools.store

    kbmod = kb_tools.store
    sizes = [int(s) for s in args.sizes.split(",")]
    gen = Generator()
    queries = gen.queries(args.queries)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="kb_scale-"))
    root.mkdir(parents=True, exist_ok=True)
    rows, skipped, exact = [], [], {}
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")  # noqa: UP017 (Python 3.10)
    for n in sizes:
        need = n * 70 * 1024 * 1.2
        free = shutil.disk_usage(root).free
        if need > free:
            skipped.append({"entries": n, "reason": f"needs about {need / 1e9:.0f} GB of disk, {free / 1e9:.0f} GB free"})
            continue
        for index_type in args.indexes.split(","):
            print(f"[{args.label}] building {n} entries, {index_type} index ...", flush=True)
            row = run(n, index_type, gen, root, queries, exact, args.repeats, pack)
            print(json.dumps(row), flush=True)
            rows.append(row)
    shutil.rmtree(root, ignore_errors=True)
    if 1_000_000 not in sizes:
        skipped.append(million_note(rows))
    this = {
        "code": code_version(pack), "started": started,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    # other work on the machine inflates latencies; recorded so readers can judge
                    "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg()},
        "rows": rows, "skipped": skipped,
    }
    if args.rows_only:
        Path(args.out).write_text(json.dumps(this))
        return 0
    this["flat_scan"] = flat_scan(repeats=args.repeats)
    write_results(Path(args.out), {args.label: this}, args.queries)
    return 0


def compare(args: argparse.Namespace) -> int:
    """Each (size, index) row for the other checkout, then at once for this one; both runs written side by side."""
    packs = {"before": Path(args.compare_with).resolve(), "after": HERE}
    runs = {label: {"code": code_version(pack), "started": None, "rows": [], "skipped": []} for label, pack in packs.items()}
    with tempfile.TemporaryDirectory(prefix="kb_scale-rows-") as tmp:
        for n in args.sizes.split(","):
            for index_type in args.indexes.split(","):
                for label, pack in packs.items():
                    if index_type == "auto" and "auto" not in probe_index_types(pack):
                        continue  # that checkout has no "auto" index
                    row_file = Path(tmp) / f"{label}.json"
                    cmd = [sys.executable, __file__, "--pack", str(pack), "--label", label, "--sizes", n, "--indexes", index_type,
                           "--queries", str(args.queries), "--repeats", str(args.repeats), "--out", str(row_file), "--rows-only"]
                    if args.workdir:
                        cmd += ["--workdir", args.workdir]
                    subprocess.run(cmd, check=True)
                    part = json.loads(row_file.read_text())
                    run = runs[label]
                    run["started"] = run["started"] or part["started"]
                    first_load = run["machine"]["loadavg_1_5_15_before"] if "machine" in run else part["machine"]["loadavg_1_5_15_before"]
                    run["machine"] = {**part["machine"], "loadavg_1_5_15_before": first_load}
                    run["rows"] += part["rows"]
                    run["skipped"] = part["skipped"]
    runs["after"]["flat_scan"] = flat_scan(repeats=args.repeats)
    write_results(Path(args.out), runs, args.queries)
    return 0


def probe_index_types(pack: Path) -> list[str]:
    code = f"import sys; sys.path.insert(0, {str(pack)!r}); import kb_tools.store as k; print(','.join(getattr(k, 'INDEX_TYPES', ())))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return out.stdout.strip().split(",")


def write_results(out: Path, new_runs: dict, queries: int) -> None:
    """Merge `new_runs` into the results file, recompute the comparison and the targets."""
    result = json.loads(out.read_text()) if out.exists() else {}
    runs = {**result.get("runs", {}), **new_runs}
    this = runs.get("after") or next(iter(new_runs.values()))
    result = {
        "benchmark": "kb_scale", "latent_shape": list(SHAPE), "stored_steps": [KEY, VALUE], "dtype": "float16", "h": H,
        "data": "synthetic fixed-seed trajectories (see benchmarks/kb_scale.py docstring)", "queries": queries,
        "runs": runs,
        "comparison": comparison(runs["before"], runs["after"]) if {"before", "after"} <= set(runs) else [],
        "targets": targets(this["rows"]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} (runs {sorted(new_runs)})")


if __name__ == "__main__":
    sys.exit(main())
