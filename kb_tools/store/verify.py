"""KnowledgeBase.verify: every check the files allow, as a list of problems ([] when sound).

It checks the generation the KB object holds, through the files it keeps open, so a writer
committing meanwhile causes no false problem:
- every file's size and sha256 (shards and entries by name: they are never replaced; index
  and stats files through the handles opened with the generation);
- duplicate (prompt, seed) entries; NaN/Inf in stored latents; the stats' key sums against
  the stored keys;
- each index: it loads (arrays consistent, every id it can return inside the KB), holds one
  key per entry, and on a sample of entries per step a search for an entry's own reduced key
  finds that entry (or one with a bit-identical key). A shard list reordered after the index
  was built, or an index mapping keys to the wrong entries, shows here.
full=True (python -m kb_tools verify) does the last check for every entry, one chunk at a time:
each index holds every entry's key exactly as its shard row reduces to, and (IVF, HNSW) a
search for it finds it; so index keys shuffled or shard rows swapped outside the sample show.
Stored values beyond +-MAX_ABS_LATENT count as damage, as NaN/Inf do; a version-1 KB's FAISS
files are hashed and their headers checked (they are what shows it is one).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from ..core.errors import KBError
from . import index as ix
from .files import open_regular, sha256_stream
from .generation import CHUNK, Generation
from .integrity import bad_rows, check_legacy_index

#: Entries per stored step whose own key is searched for.
OWN_ID_SAMPLE = 16


def verify(g: Generation, nprobe: int | None, ef_search: int | None, full: bool = False) -> list[str]:
    problems: list[str] = []

    def check(fn: Callable[[], None]) -> None:
        try:
            fn()
        except KBError as e:
            problems.append(str(e))
        except OSError as e:
            problems.append(f"cannot read a file of the KB at {g.root}: {e}. Check the disk and permissions.")

    m = g.manifest
    for s in m.shards:
        for ref, kind in ((s.data, "shard (stored latents)"), (s.entries, "entries file")):
            check(lambda ref=ref, kind=kind: _check_named_file(g, ref, kind))
    problems.extend(g.problems.values())
    for rec in m.indexes:
        f = g.index_files.get(rec.step)
        if f is not None:
            check(lambda f=f, rec=rec: _check_open_file(g, f, rec.file, "index"))
        if rec.legacy:
            check(lambda rec=rec: check_legacy_index(g.root, rec, hash_it=True))
    if g.stats_file is not None:
        check(lambda: _check_open_file(g, g.stats_file, m.stats, "stats file"))
    duplicates = len(g.entries) - len(set(g.entries))
    if duplicates:
        problems.append(f"KB at {g.root} stores {duplicates} duplicate (prompt, seed) entries. Rebuild it.")
    # Reading a mapped file past its (new) end raises SIGBUS: scan only shards of full size.
    intact = [mapped.current_size() >= s.data.bytes for mapped, s in zip(g.maps, m.shards)]
    for st in m.settings.stored_steps:
        total = np.zeros(g.D, np.float64)
        for s, v, ok in zip(m.shards, g.views[st], intact):
            for lo in range(0, len(v) if ok else 0, CHUNK):
                chunk = np.asarray(v[lo:lo + CHUNK], dtype=np.float32).reshape(-1, g.D)
                bad = bad_rows(chunk)
                if len(bad):
                    row = lo + int(bad[0])
                    prompt, seed = g.entries[int(g.starts[m.shards.index(s)]) + row]
                    problems.append(f"shard {s.data.file} step {st} entry {row} (prompt {prompt[:60]!r}, seed {seed}) "
                                    "holds NaN/Inf or a value beyond +-1e6. Remove it: rebuild the KB without it.")
                total += chunk.sum(axis=0, dtype=np.float64)
        if g.sums is not None and all(intact) and not np.allclose(total, g.sums[st], rtol=1e-6, atol=1e-6 * max(1.0, len(g.entries))):
            problems.append(f"stats for step {st} do not match the stored keys. Repair with rebuild_indexes().")
        if all(intact):
            check(lambda st=st: (_check_index_full if full else _check_index)(g, st, nprobe, ef_search))
    return problems


def _check_named_file(g: Generation, ref, kind: str) -> None:
    try:
        f = open_regular(g.path(ref.file), f"KB {kind} {ref.file}")  # a FIFO is refused, never waited on
    except FileNotFoundError:
        raise KBError(f"KB at {g.root} is missing {ref.file} (named in manifest.json): it was deleted or the KB was "
                      "copied incompletely. Restore the file, or rebuild the KB.") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size != ref.bytes:
            raise g.size_error(ref.file, size, ref.bytes)
        if sha256_stream(f) != ref.sha256:
            raise g.checksum_error(ref.file, kind, "Restore it from a backup, or rebuild the KB.")


def _check_open_file(g: Generation, f, ref, kind: str) -> None:
    size = os.fstat(f.fileno()).st_size
    if size != ref.bytes:
        raise g.size_error(ref.file, size, ref.bytes)
    if sha256_stream(f) != ref.sha256:
        raise g.checksum_error(ref.file, kind, g.repair_fix())


def _check_index(g: Generation, step: int, nprobe: int | None, ef_search: int | None) -> None:
    """The index answers for the right entries: own keys found, no id outside the KB."""
    index = g.index(step, nprobe, ef_search)
    n = len(g.entries)
    fix = "Repair it with rebuild_indexes()."
    if index.ntotal != n:
        raise KBError(f"index of step {step} holds {index.ntotal} keys, the KB has {n} entries. {fix}")
    if n == 0:
        return
    ids = np.unique(np.linspace(0, n - 1, num=min(OWN_ID_SAMPLE, n)).astype(np.int64))
    _check_own_ids(g, index, step, ids, ix.reduce_keys(g.gather(step, ids), g.manifest.reduce), nprobe, ef_search)


def _check_index_full(g: Generation, step: int, nprobe: int | None, ef_search: int | None) -> None:
    """Every entry: the index holds its key as its shard row reduces to, and (IVF, HNSW) finds it as itself."""
    index = g.index(step, nprobe, ef_search)
    n, fix = len(g.entries), "Repair it with rebuild_indexes()."
    if index.ntotal != n:
        raise KBError(f"index of step {step} holds {index.ntotal} keys, the KB has {n} entries. {fix}")
    lo = 0
    for chunk in g.key_chunks(step):
        rq = ix.reduce_keys(chunk, g.manifest.reduce)
        try:
            with g.lock:
                held = index.reconstruct_n(lo, len(rq))
        except RuntimeError:  # an IVF index keeps no id -> key map: the search below checks it
            held = None
        if held is not None and (differ := np.flatnonzero((held != rq).any(axis=1))).size:
            raise KBError(f"index of step {step} holds for entry {lo + int(differ[0])} a key other than the one its shard "
                          f"row gives ({differ.size} such entries among ids {lo}..{lo + len(rq) - 1}): the index's keys "
                          f"were reordered, or shard rows were swapped or edited after indexing. {fix}")
        if ix.structure_of(index)[0] != "flat":  # a flat index searches exactly the keys just compared
            _check_own_ids(g, index, step, np.arange(lo, lo + len(rq)), rq, nprobe, ef_search)
        lo += len(rq)


def _check_own_ids(g: Generation, index, step: int, ids: np.ndarray, rq: np.ndarray, nprobe: int | None,
                   ef_search: int | None) -> None:
    n, fix = len(g.entries), "Repair it with rebuild_indexes()."
    k = min(n, OWN_ID_SAMPLE)
    with g.lock:
        ix.widen(index, k)
        try:
            d2, found = index.search(rq, k)
        finally:
            ix.apply_params(index, nprobe, ef_search)
    if (found >= n).any() or (found < -1).any():
        raise KBError(f"index of step {step} returned id {int(found.max())} although the KB has {n} entries. {fix}")
    tol = 1e-5 * max(1.0, float(np.abs(rq).max())) ** 2 * rq.shape[1]
    for i, row, dist, key in zip(ids, found, d2.astype(np.float64), rq):
        exact = row[(row >= 0) & (dist <= tol)]
        if i in exact:
            continue
        if len(exact):
            # Another entry answers exactly: fine only if its stored key is the same as entry i's.
            if (ix.reduce_keys(g.gather(step, exact), g.manifest.reduce) == key).all(axis=1).any():
                continue
            raise KBError(f"index of step {step} answers entry {int(i)}'s key with entry {int(exact[0])}: it maps keys "
                          f"to the wrong entries, e.g. after the shard list was reordered. {fix}")
        raise KBError(f"index of step {step} holds no key equal to entry {int(i)}'s stored one: that entry's latents "
                      f"changed after they were indexed (an edited or damaged shard), or the index is damaged. {fix}")
