"""A KB writer and a KB reader as separate processes (run by tests/test_kb_concurrency.py).

    python kb_reader_writer.py write KBDIR APPENDS PROGRESS_FILE
        appends chunk 1..APPENDS of CHUNK entries (chunk 0 is already there); before chunk c
        it waits until the reader has done 3*c opens, so commits land between and during opens
        whatever the machine's speed; prints "COMMITTED <generation> <count>" after each.
    python kb_reader_writer.py read KBDIR PROGRESS_FILE DONE_FILE MIN_OPENS
        opens the KB and searches it in a loop until the writer is done and it has opened it
        MIN_OPENS times; also searches one KB object opened at the start, all along. Every
        result is checked against brute force over the entries of the generation it came from.
        Prints one JSON summary line.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kb_crash_helper import chunk_pairs, toy_latents  # noqa: E402

from kb_tools.store import KnowledgeBase  # noqa: E402

CHUNK = 2
STEP, H = 4, 2
QUERY = toy_latents([("a query that is not stored", 1)])[STEP]


def _progress(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read() or 0)
    except (OSError, ValueError):
        return 0


def write(kbdir: str, appends: int, progress: str) -> None:
    kb = KnowledgeBase.open(kbdir)
    for c in range(1, appends + 1):
        while _progress(progress) < 3 * c:
            time.sleep(0.002)
        todo = chunk_pairs(c, CHUNK)
        kb.append(toy_latents(todo), [p for p, _ in todo], [s for _, s in todo])
        print(f"COMMITTED {kb.generation} {len(kb)}", flush=True)


def expected(n: int, cache: dict) -> tuple[list, np.ndarray, np.ndarray]:
    """Entries, top-H ids and distances of the generation holding the first n entries (brute force)."""
    if n not in cache:
        pairs = [p for c in range(n // CHUNK) for p in chunk_pairs(c, CHUNK)]
        keys = toy_latents(pairs)[STEP].reshape(n, -1).astype(np.float64)
        d = np.linalg.norm(keys - QUERY.reshape(1, -1), axis=1)
        order = np.argsort(d, kind="stable")[:H]
        cache[n] = (pairs, order, d[order])
    return cache[n]


def read(kbdir: str, progress: str, done: str, min_opens: int) -> None:
    cache: dict = {}
    held = KnowledgeBase.open(kbdir)
    opens = searches = 0
    failures: list[str] = []
    seen: set[tuple[int, int]] = set()

    def check(kb: KnowledgeBase) -> None:
        nonlocal searches
        n = len(kb)
        pairs, want_ids, want_dist = expected(n, cache)
        ids, dist = kb.search(STEP, QUERY, H)
        searches += 1
        if kb.entries != pairs or ids[0].tolist() != want_ids.tolist() or not np.allclose(dist[0], want_dist, rtol=1e-5):
            failures.append(f"generation {kb.generation} ({n} entries): result {ids[0].tolist()} is not that generation's "
                            f"{want_ids.tolist()}")
        seen.add((kb.generation, n))

    while opens < min_opens or not os.path.exists(done):
        try:
            kb = KnowledgeBase.open(kbdir)
            opens += 1
            check(kb)
            check(held)
            if opens % 50 == 0:
                for obj in (kb, held):
                    problems = obj.verify()
                    if problems:
                        failures.append(f"verify() of generation {obj.generation}: {problems}")
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported
            failures.append(f"{type(e).__name__}: {e}")
        with open(progress + ".tmp", "w") as f:
            f.write(str(opens))
        os.replace(progress + ".tmp", progress)
    print(json.dumps({"opens": opens, "searches": searches, "failures": failures[:20], "failure_count": len(failures),
                      "seen": sorted(seen), "held_generation": held.generation}), flush=True)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "write":
        write(args[0], int(args[1]), args[2])
    else:
        read(args[0], args[1], args[2], int(args[3]))
