"""One committed generation of a KB as a reader holds it, and the facts derived from it.

Loading reads what the manifest names: it opens the generation's own files first (the index
and stats files, which the next commits replace) and keeps them open, then reads the entries
and memory-maps the shards (never replaced, only added). On POSIX an open or mapped file
stays readable after a writer's cleanup unlinks its name; on Windows the cleanup cannot
delete it and retries at a later commit. So a loaded generation answers the same way
whatever writers commit meanwhile. Derived facts (loaded FAISS indexes, mean keys, key
spreads, the entry lookup) are computed once per generation and live here, never in
module-level caches.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import BinaryIO

import faiss
import numpy as np

from ..core.errors import KBError
from . import index as ix
from .files import open_regular, read_handle, sha256_bytes, sha256_stream
from .format import DTYPES, FileRef, Manifest, parse_entries, step_name, sum_name
from .safetensors_file import MappedFile, tensors_from_bytes

# verify="auto" hashes every shard and index at open up to this total size; above it only
# sizes are checked (hashing hundreds of GB at each open would make big KBs unusable).
AUTO_VERIFY_MAX_BYTES = 512 * 2**20
VERIFY_MODES = ("auto", "full", "size")
CHUNK = 4096


# torch copies a tensor on several threads from 32,768 values up; on busy cores the thread
# hand-off costs far more than the copy (32 SD1.5 keys: 7.9 ms wall instead of 0.25 ms), so
# float16 is widened in pieces that stay on the calling thread.
_WIDEN_CHUNK = 2**15 - 1


def as_float32(x: np.ndarray) -> np.ndarray:
    """A float32 copy of stored latents (any shape).

    float16 widens through torch (a pack dependency), whose cast is vectorized: numpy 2.4
    converts float16 one value at a time, 1.2 ms for the 32 SD1.5 keys of one re-rank
    against 0.25 ms, most of a query's budget.
    """
    if x.dtype != np.float16:
        return x.astype(np.float32)
    import torch  # imported on first read: opening a KB stays torch-free

    if not (x.flags.writeable and x.flags.c_contiguous):
        x = x.copy()  # torch wraps only writable arrays (a read-only memmap slice: copy, a quarter of the cost)
    out = np.empty(x.shape, np.float32)
    src, dst = torch.from_numpy(x.reshape(-1)), torch.from_numpy(out.reshape(-1))
    for lo in range(0, src.numel(), _WIDEN_CHUNK):
        dst[lo:lo + _WIDEN_CHUNK].copy_(src[lo:lo + _WIDEN_CHUNK])
    return out


class FileVanished(Exception):
    """A file the manifest names is missing; the opener decides whether a writer's commit explains it."""

    def __init__(self, rel: str, derived: bool):
        super().__init__(rel)
        self.rel, self.derived = rel, derived


class Generation:
    """The files and facts of one committed generation, as this process holds them (see module doc)."""

    def __init__(self, root: str, manifest: Manifest):
        self.root, self.manifest = root, manifest
        c, h, w = manifest.settings.latent_shape
        self.D = c * h * w
        self.entries: list[tuple[str, int]] = []
        self.starts = np.zeros(0, np.int64)
        self.maps: list[MappedFile] = []
        self.views: dict[int, list[np.ndarray]] = {st: [] for st in manifest.settings.stored_steps}
        self.index_files: dict[int, BinaryIO | None] = {}
        self.stats_file: BinaryIO | None = None
        self.sums: dict[int, np.ndarray] | None = None
        self.problems: dict[object, str] = {}  # damaged derived files (opened with verify="size")
        self.lock = threading.RLock()  # guards the lazily filled caches below and FAISS search parameters
        self.indexes: dict[int, faiss.Index] = {}
        self._facts: dict[tuple, object] = {}
        self._id_of: dict[tuple[str, int], int] | None = None

    # ------------------------------------------------------------ loading

    def path(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/"))

    def size_error(self, rel: str, size: int, expected: int) -> KBError:
        return KBError(f"KB file {rel} at {self.root} is {size} bytes, the manifest records {expected}: it is truncated "
                       "or was overwritten (incomplete copy, full disk). Restore the file, or rebuild the KB.")

    def checksum_error(self, rel: str, kind: str, fix: str) -> KBError:
        return KBError(f"KB file {rel} at {self.root} fails its sha256 checksum: the {kind} is corrupt "
                       f"(damaged disk or an edited file). {fix}")

    def repair_fix(self) -> str:
        return f"Repair it with KnowledgeBase.open({self.root!r}, verify='size').rebuild_indexes(), or rebuild the KB."

    def _open_derived(self, ref: FileRef, key: object, tolerate: bool) -> BinaryIO | None:
        """Open an index or stats file and check its size; in tolerate mode a problem is recorded, not raised."""
        try:
            f = open_regular(self.path(ref.file), f"KB file {ref.file}")
        except FileNotFoundError:
            if not tolerate:
                raise FileVanished(ref.file, derived=True) from None
            self.problems[key] = (f"KB at {self.root} is missing {ref.file} (named in manifest.json). {self.repair_fix()}")
            return None
        size = os.fstat(f.fileno()).st_size
        if size != ref.bytes:
            f.close()
            if not tolerate:
                raise self.size_error(ref.file, size, ref.bytes)
            self.problems[key] = f"{self.size_error(ref.file, size, ref.bytes)} {self.repair_fix()}"
            return None
        return f

    @classmethod
    def load(cls, root: str, m: Manifest, verify: str, tolerate_derived: bool = False) -> Generation:
        """Open every file `m` names and check it (hashing per `verify`, see KnowledgeBase.open)."""
        g = cls(root, m)
        big = sum(s.data.bytes for s in m.shards) + sum(i.file.bytes for i in m.indexes)
        full = verify == "full" or (verify == "auto" and big <= AUTO_VERIFY_MAX_BYTES)
        tolerate = tolerate_derived and verify == "size"
        # Generation-specific files first: the next commits replace them, so open them before anything slow.
        for rec in m.indexes:
            if not rec.legacy:  # a version-1 FAISS file is never read: the index is rebuilt from the shards
                g.index_files[rec.step] = g._open_derived(rec.file, rec.step, tolerate)
        g.stats_file = g._open_derived(m.stats, "stats", tolerate)
        if full:
            for rec in m.indexes:  # before FAISS ever sees the arrays
                f = g.index_files.get(rec.step)
                if f is not None and sha256_stream(f) != rec.file.sha256:
                    raise g.checksum_error(rec.file.file, "index", g.repair_fix())
        if g.stats_file is not None:
            try:
                g.sums = g._read_stats()
            except KBError as e:
                if verify != "size":
                    raise
                g.problems["stats"] = str(e)  # derived data: open anyway so that rebuild_indexes() can recompute it
        starts = []
        for s in m.shards:
            starts.append(len(g.entries))
            g.entries.extend(g._read_entries(s.entries, s.count))
            g._map_shard(s.data, s.count, full)
        g.starts = np.asarray(starts, dtype=np.int64)
        return g

    def _read_stats(self) -> dict[int, np.ndarray]:
        ref, fix = self.manifest.stats, self.repair_fix()
        data = read_handle(self.stats_file, ref.bytes, f"KB stats file {ref.file}")
        if sha256_bytes(data) != ref.sha256:
            raise self.checksum_error(ref.file, "stats file", fix)
        tensors = tensors_from_bytes(data, self.path(ref.file), fix)
        steps = self.manifest.settings.stored_steps
        if set(tensors) != {sum_name(st) for st in steps}:
            raise KBError(f"KB stats file {ref.file} holds {sorted(tensors)[:8]}, expected {[sum_name(st) for st in steps]}. {fix}")
        sums = {}
        for st in steps:
            a = tensors[sum_name(st)]
            if a.dtype != np.float64 or a.shape != (self.D,) or not np.isfinite(a).all():
                raise KBError(f"KB stats file {ref.file} has {sum_name(st)} {a.dtype} {list(a.shape)}, expected finite "
                              f"float64 [{self.D}]. {fix}")
            sums[st] = a.copy()
        return sums

    def _read_entries(self, ref: FileRef, count: int) -> list[tuple[str, int]]:
        fix = "Restore the file from a backup, or rebuild the KB."
        try:
            with open_regular(self.path(ref.file), f"KB entries file {ref.file}") as f:
                size = os.fstat(f.fileno()).st_size
                if size != ref.bytes:
                    raise self.size_error(ref.file, size, ref.bytes)
                data = f.read(size + 1)
        except FileNotFoundError:
            raise FileVanished(ref.file, derived=False) from None
        if len(data) != ref.bytes:
            raise self.size_error(ref.file, len(data), ref.bytes)
        if sha256_bytes(data) != ref.sha256:
            raise self.checksum_error(ref.file, "entries file (prompts and seeds)", fix)
        return parse_entries(data, self.path(ref.file), count, fix)

    def _map_shard(self, ref: FileRef, count: int, hash_it: bool) -> None:
        """Memory-map one shard (no values read) and check its tensors' names, shapes and dtype."""
        fix = "Restore the file from a backup, or rebuild the KB."
        path = self.path(ref.file)
        try:
            with open_regular(path, f"KB shard {ref.file}") as f:
                size = os.fstat(f.fileno()).st_size
                if size != ref.bytes:
                    raise self.size_error(ref.file, size, ref.bytes)
                if hash_it and sha256_stream(f) != ref.sha256:
                    raise self.checksum_error(ref.file, "shard (stored latents)", fix)
            mapped = MappedFile(path, fix)
        except FileNotFoundError:
            raise FileVanished(ref.file, derived=False) from None
        if mapped.size != ref.bytes:
            raise self.size_error(ref.file, mapped.size, ref.bytes)
        self.add_map(mapped, ref.file, count)

    def add_map(self, mapped: MappedFile, rel: str, count: int) -> None:
        m = self.manifest
        want, dtype = (count, *m.settings.latent_shape), np.dtype(DTYPES[m.dtype])
        steps = m.settings.stored_steps
        if set(mapped.tensors) != {step_name(st) for st in steps}:
            raise KBError(f"KB shard {rel} holds tensors {sorted(mapped.tensors)[:8]}, expected "
                          f"{[step_name(st) for st in steps]}: it does not belong to this KB. Restore it, or rebuild the KB.")
        for st in steps:
            v = mapped.tensors[step_name(st)]
            if v.shape != want or v.dtype != dtype:
                raise KBError(f"KB shard {rel} has {step_name(st)} {v.dtype} {list(v.shape)}, expected {m.dtype} "
                              f"{list(want)}: it does not belong to this KB. Restore it, or rebuild the KB.")
            self.views[st].append(v)
        self.maps.append(mapped)

    def successor(self, m: Manifest, indexes: dict[int, faiss.Index], sums: dict[int, np.ndarray],
                  new_shard: tuple[MappedFile, list[tuple[str, int]]] | None = None) -> Generation:
        """The generation this process just committed on top of this one (shards shared, files reopened)."""
        g = Generation(self.root, m)
        g.entries, g.starts, g.maps = list(self.entries), self.starts, list(self.maps)
        g.views = {st: list(v) for st, v in self.views.items()}
        if new_shard is not None:
            mapped, pairs = new_shard
            g.starts = np.append(self.starts, len(self.entries)).astype(np.int64)
            g.entries.extend(pairs)
            g.add_map(mapped, m.shards[-1].data.file, len(pairs))
            if self._id_of is not None:  # move the lookup on rather than rebuild it (appends come in loops)
                g._id_of, self._id_of = self._id_of, None
                g._id_of.update((p, len(self.entries) + i) for i, p in enumerate(pairs))
        else:
            g._id_of, self._id_of = self._id_of, None
        for rec in m.indexes:  # written by us under the writer lock: present
            g.index_files[rec.step] = open_regular(g.path(rec.file.file), f"KB file {rec.file.file}")
        g.stats_file = open_regular(g.path(m.stats.file), f"KB file {m.stats.file}")
        g.indexes, g.sums = dict(indexes), sums
        return g

    # ------------------------------------------------------------ reading

    def check_mapped(self, s: int) -> None:
        """Refuse to read a shard truncated since it was mapped: touching the lost pages is SIGBUS."""
        mapped, expected = self.maps[s], self.manifest.shards[s].data.bytes
        size = mapped.current_size()
        if size < expected:
            raise KBError(f"KB shard {self.manifest.shards[s].data.file} at {self.root} was truncated to {size} bytes "
                          f"after the KB was opened (the manifest records {expected}). Restore the file, or rebuild the KB.")

    def gather(self, step: int, ids: np.ndarray) -> np.ndarray:
        """Rows of the memmaps for global ids -> float32 [len(ids), C, H, W]."""
        # Copy the rows in the stored dtype first and widen once: the widening is most of the cost.
        raw = np.empty((len(ids), *self.manifest.settings.latent_shape), DTYPES[self.manifest.dtype])
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        for s in np.unique(shard):
            self.check_mapped(int(s))
        views = self.views[step]
        # Row by row: a query's candidates lie in as many shards as there are candidates, where one
        # fancy index per shard costs 4x more (32 ids over 100 shards: 0.75 ms vs 0.17 ms).
        for j, (s, row) in enumerate(zip(shard.tolist(), (ids - self.starts[shard]).tolist())):
            raw[j] = views[s][row]
        return as_float32(raw)

    def key_chunks(self, step: int, first_shard: int = 0) -> Iterator[np.ndarray]:
        """Every stored latent of `step` in id order from shard `first_shard` on, float32 chunks [<=4096, C, H, W]
        (bounded memory)."""
        for s, v in enumerate(self.views[step]):
            if s < first_shard:
                continue
            self.check_mapped(s)
            for lo in range(0, len(v), CHUNK):
                yield as_float32(np.asarray(v[lo:lo + CHUNK]))

    def require_sums(self) -> dict[int, np.ndarray]:
        if self.sums is None:
            raise KBError(f"{self.problems.get('stats')} (KB opened with verify='size' despite it)")
        return self.sums

    def index(self, step: int, nprobe: int | None, ef_search: int | None) -> faiss.Index:
        """The FAISS index of `step`, made once per generation (its file's checksum checked first)."""
        with self.lock:
            if step in self.indexes:
                return self.indexes[step]
            rec = self.manifest.index(step)
            if rec.legacy:
                index = ix.build(rec.type, rec.dim, (ix.reduce_keys(c, rec.reduce) for c in self.key_chunks(step)))
            else:
                if step in self.problems:
                    raise KBError(self.problems[step])
                data = read_handle(self.index_files[step], rec.file.bytes, f"KB index {rec.file.file}")
                if sha256_bytes(data) != rec.file.sha256:
                    raise self.checksum_error(rec.file.file, "index", self.repair_fix())
                index = ix.decode(data, rec, self.path(rec.file.file), self.repair_fix())
            ix.apply_params(index, nprobe, ef_search)
            self.indexes[step] = index
            return index

    def ids_by_pair(self) -> dict[tuple[str, int], int]:
        with self.lock:
            if self._id_of is None:
                self._id_of = {p: i for i, p in enumerate(self.entries)}
            return self._id_of

    def fact(self, key: tuple, compute) -> object:
        """A derived value of this generation (mean key, key spread, ...), computed once."""
        with self.lock:
            if key not in self._facts:
                self._facts[key] = compute()
            return self._facts[key]
