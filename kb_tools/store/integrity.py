"""What a KB must look like beyond its own claims: version-1 manifests, version-1 index files, stored values.

A version-1 manifest has no checksum (version 2 added it), so a manifest that says
"format_version: 1" is trusted only as far as it looks exactly like what version 1 wrote
(kb_tools/kb.py at commit 1d3c24e, the previous release):
- the top-level fields of version 2 and no "checksum";
- index records with exactly the fields type, reduce, dim, nlist, file, sha256, bytes and ntotal
  (no "structure", no "legacy"); type "flat", "ivf" or "hnsw" (never "auto"); nlist null except
  for a trained IVF index, which version 1 trained only with 39 keys per list; each index a
  FAISS file (index/step_NNN-<tag>.faiss, starting with the FAISS header of its type);
- the index files and the stats file of one commit share one tag, whose generation is at most
  the manifest's;
- shards numbered 0, 1, 2, ... in list order (version 1 never evicted or reordered a shard);
- the manifest written as ASCII JSON (version 1 escaped every other character).
Anything else is a hand edit or a newer manifest relabelled as version 1, and is refused.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..core.errors import KBError
from .files import sha256_stream
from .format import LEGACY_INDEX_RE, MAX_ABS_LATENT, SHARD_RE, STATS_RE, IndexRecord

V1_MANIFEST_KEYS = {"format_version", "generation", "settings", "count", "dtype", "shards", "indexes", "stats",
                    "calibration", "created", "updated"}
V1_INDEX_KEYS = {"type", "reduce", "dim", "nlist", "file", "sha256", "bytes", "ntotal"}
V1_INDEX_TYPES = ("flat", "ivf", "hnsw")
V1_IVF_POINTS_PER_LIST = 39
#: The first bytes of a FAISS file, per structure (faiss.serialize_index of IndexFlatL2, IndexIVFFlat, IndexHNSWFlat).
FAISS_MAGIC = {"flat": b"IxF2", "ivf": b"IwFl", "hnsw": b"IHNf"}
_TAG = re.compile(r"(\d{6,})-([0-9a-f]{8})")


def version_1_error(where: str, problem: str) -> KBError:
    return KBError(f"{where}: {problem}, which version 1 of the KB format never wrote. A version-1 manifest is not "
                   "checksummed, so it is trusted only as far as it looks exactly like what version 1 wrote: this one "
                   "was edited by hand, or a newer (checksummed) manifest was relabelled as version 1. Restore "
                   "manifest.json from a backup, or rebuild the KB; upgrade a genuine version-1 KB with "
                   "`python -m kb_tools upgrade DIR` (it is checksummed from then on).")


def check_version_1(raw: Any, data: bytes, where: str) -> None:
    """Refuse a manifest claiming format version 1 that version 1 could not have written (see module doc).

    Fields of the wrong type are left to the manifest parser, which refuses them with its own message.
    """
    def bad(problem: str) -> KBError:
        return version_1_error(where, problem)

    if not isinstance(raw, dict):
        return
    if "checksum" in raw:
        raise bad("it has a \"checksum\"")
    if not bytes(data).isascii():
        raise bad("it holds characters outside ASCII (version 1 wrote \\u escapes)")
    unknown = sorted(set(raw) - V1_MANIFEST_KEYS)
    if unknown:
        raise bad(f"it has the fields {unknown[:5]}")
    tags = set()
    indexes = raw.get("indexes")
    for step, rec in (indexes.items() if isinstance(indexes, dict) else ()):
        if not isinstance(rec, dict):
            continue
        if set(rec) != V1_INDEX_KEYS:
            raise bad(f"indexes.{step} has the fields {sorted(rec)[:10]} (version 1: {sorted(V1_INDEX_KEYS)})")
        kind, nlist, ntotal, file = rec["type"], rec["nlist"], rec["ntotal"], rec["file"]
        if kind not in V1_INDEX_TYPES:
            raise bad(f"indexes.{step}.type is {kind!r:.40}")
        if nlist is not None and (kind != "ivf" or not isinstance(nlist, int) or not isinstance(ntotal, int)
                                  or isinstance(nlist, bool) or V1_IVF_POINTS_PER_LIST * nlist > ntotal):
            raise bad(f"indexes.{step}.nlist is {nlist!r:.40} for a {kind!r:.20} index of {ntotal!r:.20} keys")
        if not isinstance(file, str) or not LEGACY_INDEX_RE.fullmatch(file):
            raise bad(f"indexes.{step}.file is {file!r:.80} (version 1 wrote FAISS files index/step_NNN-<tag>.faiss)")
        tags.add(_TAG.search(file).group(0))
    stats = raw.get("stats")
    file = stats.get("file") if isinstance(stats, dict) else None
    if isinstance(file, str) and STATS_RE.fullmatch(file):
        tags.add(_TAG.search(file).group(0))
    if len(tags) > 1:
        raise bad(f"its index and stats files carry different tags {sorted(tags)[:4]} (version 1 wrote them together)")
    generation = raw.get("generation")
    if tags and isinstance(generation, int) and int(_TAG.fullmatch(next(iter(tags))).group(1)) > generation:
        raise bad(f"its index and stats files were written at a generation after the manifest's ({generation})")
    shards = raw.get("shards")
    for i, s in enumerate(shards if isinstance(shards, list) else ()):
        match = SHARD_RE.fullmatch(s["file"]) if isinstance(s, dict) and isinstance(s.get("file"), str) else None
        if match and int(match.group(1).split("-")[0]) != i:
            raise bad(f"shards[{i}] is {s['file']!r:.80}: version 1 numbered shards 0, 1, 2, ... in list order and "
                      "never removed or reordered one")


def check_legacy_index(root: str, rec: IndexRecord, hash_it: bool) -> None:
    """A version-1 index file exists, has its recorded size, starts with the FAISS header of its structure and
    (with `hash_it`) matches its sha256; it is never parsed."""
    rel, path = rec.file.file, os.path.join(root, *rec.file.file.split("/"))
    fix = ("A version-1 KB is not checksummed, so its FAISS files are what shows it is one. Restore the file from a "
           "backup, or rebuild the KB.")
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise KBError(f"KB file {rel} at {root} is not a regular file. {fix}")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != rec.file.bytes:
                raise KBError(f"KB file {rel} at {root} is {size} bytes, the manifest records {rec.file.bytes}. {fix}")
            magic = f.read(4)
            want = FAISS_MAGIC[rec.structure]
            if magic != want:
                raise KBError(f"KB file {rel} at {root} is not a FAISS {rec.structure} index (it starts with "
                              f"{magic!r}, not {want!r}): the manifest was relabelled as version 1. {fix}")
            if hash_it:
                f.seek(0)
                if sha256_stream(f) != rec.file.sha256:
                    raise KBError(f"KB file {rel} at {root} fails its sha256 checksum. {fix}")
    except FileNotFoundError:
        raise KBError(f"KB at {root} is missing {rel} (named in manifest.json; if another process just upgraded the KB, "
                      f"open it again). {fix}") from None


def check_legacy_indexes(g, verify: str) -> None:
    """check_legacy_index for every version-1 index of a loaded generation; hashed as `verify` hashes the rest."""
    from .generation import AUTO_VERIFY_MAX_BYTES

    m = g.manifest
    big = sum(s.data.bytes for s in m.shards) + sum(i.file.bytes for i in m.indexes)
    for rec in m.indexes:
        if rec.legacy:
            check_legacy_index(g.root, rec, verify == "full" or (verify == "auto" and big <= AUTO_VERIFY_MAX_BYTES))


def bad_rows(chunk: np.ndarray) -> np.ndarray:
    """Row numbers of a [n, ...] chunk holding NaN, Inf or a value beyond +-MAX_ABS_LATENT."""
    flat = chunk.reshape(len(chunk), -1)
    ok = np.isfinite(flat).all(axis=1)
    if float(np.finfo(flat.dtype).max) > MAX_ABS_LATENT:  # a float16 KB's finite values all lie inside the bound, and
        with np.errstate(invalid="ignore"):  # casting the bound to float16 would overflow (a warning per chunk)
            ok &= (np.abs(flat) <= MAX_ABS_LATENT).all(axis=1)
    return np.flatnonzero(~ok)


def bad_entries(g, limit: int = 10) -> Iterator[tuple[str, int, int, str, int]]:
    """(shard file, row, step, prompt, seed) of stored latents no KB can hold (NaN, Inf, beyond +-MAX_ABS_LATENT),
    at most `limit`, scanning one chunk at a time."""
    from .generation import CHUNK

    found = 0
    m = g.manifest
    for st in m.settings.stored_steps:
        for s, (rec, v) in enumerate(zip(m.shards, g.views[st])):
            g.check_mapped(s)
            for lo in range(0, len(v), CHUNK):
                for row in bad_rows(np.asarray(v[lo:lo + CHUNK])):
                    prompt, seed = g.entries[int(g.starts[s]) + lo + int(row)]
                    yield rec.data.file, lo + int(row), st, prompt, seed
                    found += 1
                    if found >= limit:
                        return


def describe_bad_entries(g, found: list[tuple[str, int, int, str, int]]) -> str:
    rows = "; ".join(f"{file} row {row} (step {st}, prompt {prompt[:60]!r}, seed {seed})"
                     for file, row, st, prompt, seed in found)
    return (f"KB at {g.root} stores latents that are NaN, Inf or beyond +-{MAX_ABS_LATENT:g}: {rows}. Indexes and key "
            "sums derived from them would be unusable, so nothing was committed. Remove those entries: rebuild the KB "
            "without them (python -m kb_tools build re-adds every other entry), or evict their shards.")


class BadValues(KBError):
    """Stored latents no KB can hold met while deriving indexes and sums (derive_from_shards names the entries)."""

    def __init__(self) -> None:
        super().__init__("stored latents hold NaN, Inf or values beyond +-1e6, so no index or key sum is derived from "
                         "them. Find them with python -m kb_tools verify, and rebuild the KB without them.")
