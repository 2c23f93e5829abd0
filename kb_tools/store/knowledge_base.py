"""The knowledge base: open, read and search stored trajectories (writes.py: create, append; merge.py: merge).

ReDi (paper Algorithm 1) stores, for each (prompt, seed), the latent x_k at a key step and
x_v at a value step; Algorithm 2 retrieves the keys nearest to a query's x_k and blends
their values. A KB stores several steps per entry, so any stored pair (k, v) with k <= v
can be used without rebuilding. Step indices count sampler steps from the start (0 = pure
noise, `steps` = clean). The files are described in format.py; every change goes through
transaction.py; what one open generation holds is generation.py.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..core.errors import KBError, KBMismatchError
from ..core.records import Difference, describe_differences, differences
from . import arguments as args
from . import index as ix
from .files import check_kb_path
from .format import FORMAT_VERSION, MANIFEST
from .gc import linked_outside
from .integrity import check_legacy_indexes
from .generation import VERIFY_MODES, FileVanished, Generation
from .manifest import read_manifest
from .settings import KBSettings, is_int, thaw
from .verify import verify as verify_generation
from .writes import KnowledgeBaseWrites

log = logging.getLogger(__name__)

#: A reader that finds a named file gone re-reads the manifest and starts over this many times.
OPEN_ATTEMPTS = 10
_WARNED_LEGACY: set[str] = set()  # KB folders already warned about (log once per process)


class KnowledgeBase(KnowledgeBaseWrites):
    """One open knowledge base; create with `create`, `open` or `open_or_create`.

    The object answers from the generation it opened (or last committed itself), whatever
    other processes commit meanwhile; reopen to see their changes.
    """

    def __init__(self, root: str, generation: Generation):
        # Private: use KnowledgeBase.open / create.
        self._path = root
        self._gen = generation
        self._lock = threading.RLock()  # one writer per object; readers take self._gen once per call
        self._nprobe: int | None = None
        self._ef_search: int | None = None

    # ------------------------------------------------------------ construction

    @classmethod
    def open(cls, path: str, verify: str = "auto") -> KnowledgeBase:
        """Open a committed KB; checks files and checksums (see `verify`), maps latents lazily.

        verify: "full" hashes every file; "auto" does so when shards + indexes total
        <= 512 MiB, else only checks sizes of shards and indexes; "size" checks sizes only
        and opens a KB whose index or stats files are damaged so that rebuild_indexes() can
        repair them (entries and stats are always hashed: they are read anyway). An index's
        checksum is always checked when it is loaded, before its arrays are used.
        """
        if verify not in VERIFY_MODES:
            raise KBError(f"verify={args.short(verify)} is unknown; use one of {list(VERIFY_MODES)}.")
        root = check_kb_path(path)
        try:
            return cls(root, _load(root, verify))
        except OSError as e:
            raise KBError(f"cannot read the KB at {root}: {e.strerror or e} ({getattr(e, 'filename', '')}). "
                          "Check the disk and the folder's permissions.") from None

    # ------------------------------------------------------------ properties

    def __len__(self) -> int:
        return len(self._gen.entries)

    def __repr__(self) -> str:
        return f"KnowledgeBase({self._path!r}, count={len(self)}, steps={self.stored_steps})"

    @property
    def path(self) -> str:
        return self._path

    @property
    def settings(self) -> KBSettings:
        return self._gen.manifest.settings  # frozen: no copy needed

    @property
    def generation(self) -> int:
        """The manifest generation this object answers from (each commit adds one)."""
        return self._gen.manifest.generation

    @property
    def dtype(self) -> str:
        return self._gen.manifest.dtype

    @property
    def stored_steps(self) -> list[int]:
        return list(self.settings.stored_steps)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.settings.latent_shape

    @property
    def index_type(self) -> str:
        """The index type asked for at creation ("auto", "flat", "ivf" or "hnsw")."""
        return self._gen.manifest.index_type

    @property
    def reduce(self) -> int:
        return self._gen.manifest.reduce

    @property
    def entries(self) -> list[tuple[str, int]]:
        """(prompt, seed) per entry, in id order."""
        return list(self._gen.entries)

    def has_entry(self, prompt: str, seed: int) -> bool:
        return is_int(seed) and (prompt, int(seed)) in self._gen.ids_by_pair()

    def missing(self, pairs: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """The (prompt, seed) pairs not yet stored, in input order, each once."""
        have, out, seen = self._gen.ids_by_pair(), [], set()
        for prompt, seed in pairs:
            if not isinstance(prompt, str) or not is_int(seed):
                raise KBError(f"pairs must be (prompt text, int seed), got ({args.short(prompt)}, {args.short(seed)}).")
            p = (prompt, int(seed))
            if p not in have and p not in seen:
                seen.add(p)
                out.append(p)
        return out

    # ------------------------------------------------------------ checking arguments

    def check_step(self, step: Any, what: str = "step") -> int:
        """`step` as an int if the KB stores it, else a KBError naming the stored steps."""
        return args.check_step(step, self.settings.stored_steps, self._path, what)

    def as_queries(self, queries: Any) -> np.ndarray:
        """Validate queries [B, C, H, W] or [B, D] -> float32 [B, D]; every refusal names the fix."""
        return args.as_queries(queries, self.latent_shape)

    # ------------------------------------------------------------ reading

    def latents(self, step: int, ids: Any) -> np.ndarray:
        """Stored latents x_step of entries `ids` (any order, repeats allowed): float32 [len(ids), C, H, W]."""
        g = self._gen  # one generation per call, even if another thread commits meanwhile
        return g.gather(self.check_step(step), args.check_ids(ids, len(g.entries), self._path))

    def keys_flat(self, step: int, ids: Any) -> np.ndarray:
        """Full (unreduced) keys: float32 [len(ids), D], D = C*H*W."""
        return self.latents(step, ids).reshape(-1, self._gen.D)

    def mean_key(self, step: int) -> np.ndarray:
        """Mean of the KB's keys at `step`, float32 [D] (what the centered residual subtracts)."""
        step, g = self.check_step(step), self._gen
        if not g.entries:
            raise KBError(f"KB at {self._path} is empty, it has no mean key. Build or append entries first.")
        mean = g.fact(("mean", step), lambda: (g.require_sums()[step] / len(g.entries)).astype(np.float32))
        return mean.copy()

    def key_spread(self, step: int, sample: int = 256, seed: int = 0) -> float:
        """RMS distance ||key_i - mean key|| over a fixed random sample of the keys at `step` (cached per generation)."""
        step, g = self.check_step(step), self._gen
        if not is_int(sample) or sample < 1:
            raise KBError(f"sample must be an integer >= 1, got {args.short(sample)}. Pass how many keys to sample, e.g. 256.")
        seed = args.check_seed(seed)
        n = len(g.entries)
        if n == 0:
            raise KBError(f"the KB at {self._path} is empty; build or append entries first.")

        def compute() -> float:
            ids = np.sort(np.random.default_rng(seed).choice(n, size=min(int(sample), n), replace=False))
            keys = g.gather(step, ids).reshape(len(ids), -1).astype(np.float64)
            mean = (g.require_sums()[step] / n).astype(np.float32).astype(np.float64)
            return float(np.sqrt(np.mean(np.sum((keys - mean) ** 2, axis=1))))

        return g.fact(("spread", step, int(sample), seed), compute)

    def shard_views(self, step: int) -> list[np.ndarray]:
        """The memory-mapped [n, C, H, W] arrays of `step`, one per shard (read-only)."""
        return list(self._gen.views[self.check_step(step)])

    def calibration(self, step: int) -> dict | None:
        """The calibration stored for `step` by set_calibration, or None."""
        cal = self._gen.manifest.calibration.get(self.check_step(step))
        return None if cal is None else thaw(cal)

    # ------------------------------------------------------------ searching

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """IVF lists probed / HNSW efSearch for this session (defaults nlist//8, and 64 or 512 above 200,000 entries).

        Each is None or an int in 1..args.MAX_SEARCH_PARAM (FAISS takes a C int; nprobe is capped at the list count).
        """
        nprobe, ef_search = args.check_search_param("nprobe", nprobe), args.check_search_param("ef_search", ef_search)
        g = self._gen
        with g.lock:
            self._nprobe, self._ef_search = nprobe, ef_search
            for index in g.indexes.values():
                ix.apply_params(index, nprobe, ef_search)

    def search(self, step: int, queries: Any, h: int, *, candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-h neighbours per query (Algorithm 2): FAISS on reduced keys, exact L2 re-rank on full keys.

        queries: [B, C, H, W] or [B, D] float. Returns ids int64 [B, h] and Euclidean
        distances float32 [B, h], ascending, exact among the `candidates` (default
        max(4h, 32)) that the reduced-key search proposes.
        """
        step, g = self.check_step(step), self._gen
        n = len(g.entries)
        if n == 0:
            raise KBError(f"KB at {self._path} is empty: build or append entries first.")
        if not is_int(h) or h < 1:
            raise KBError(f"h (number of neighbours) must be an int >= 1, got {args.short(h)}. Use H between 1 and {n}.")
        h = int(h)
        if h > n:
            raise KBError(f"KB at {self._path} has only {n} entries; lower H to at most {n}, or add entries.")
        if candidates is not None and (not is_int(candidates) or candidates < 1):
            raise KBError(f"candidates must be an int >= 1, or None for max(4H, 32); got {args.short(candidates)}.")
        q = self.as_queries(queries)
        c = min(max(max(4 * h, 32) if candidates is None else int(candidates), h), n)
        rq = ix.reduce_keys(q.reshape(-1, *self.latent_shape), self.reduce)
        index = g.index(step, self._nprobe, self._ef_search)
        with g.lock:  # search parameters live on the shared index object
            cand = ix.candidates(index, rq, c, self._nprobe, self._ef_search)
        if (cand >= n).any() or ((cand >= 0).sum(axis=1) < c).any():
            raise KBError(f"the index of step {step} returned ids outside the KB or fewer than the {c} candidates asked for. "
                          f"Repair it with KnowledgeBase.open({self._path!r}, verify='size').rebuild_indexes().")
        uniq = np.unique(cand[cand >= 0])
        return ix.rerank(q, cand, uniq, g.gather(step, uniq).reshape(len(uniq), -1), h)

    # ------------------------------------------------------------ checks

    def verify(self, full: bool = False) -> list[str]:
        """Check the generation this object holds ([] if sound); see verify.py for the list.

        full=False searches a sample of entries per step for their own key; full=True checks every entry: each
        index holds every entry's key as stored in its shard row and finds it as itself (python -m kb_tools verify).
        """
        if not isinstance(full, bool):
            raise KBError(f"full must be True or False, got {args.short(full)}.")
        return verify_generation(self._gen, self._nprobe, self._ef_search, full=full)

    def info(self) -> dict:
        """A JSON-friendly summary of the KB."""
        m = self._gen.manifest
        first = m.indexes[0]
        return {
            "path": self._path, "format_version": m.format_version, "generation": m.generation, "count": len(self),
            "dtype": m.dtype, "latent_shape": list(self.latent_shape), "stored_steps": self.stored_steps,
            "steps": m.settings.steps, "sampler": m.settings.sampler, "scheduler": m.settings.scheduler,
            "index_type": first.type, "index_structure": first.structure, "reduce": first.reduce,
            "index_dim": first.dim, "ivf_nlist": first.nlist, "shards": len(m.shards),
            "bytes": sum(s.data.bytes for s in m.shards), "calibrated_steps": sorted(k for k in m.calibration if isinstance(k, int)),
            "sampler_calibration": "sampler" in m.calibration,
            "created": m.created, "updated": m.updated,
            "folders_linked_outside": linked_outside(self._path),
        }


# --------------------------------------------------------------------------- module helpers


def _load(root: str, verify: str) -> Generation:
    """Load the committed generation; if a file vanished because a writer committed meanwhile, start over."""
    for _ in range(OPEN_ATTEMPTS):
        m = read_manifest(root)
        try:
            g = Generation.load(root, m, verify)
        except FileVanished as e:
            if read_manifest(root).generation != m.generation:
                continue  # a writer committed and collected the files of the generation we had read
            if e.derived and verify == "size":
                g = Generation.load(root, m, verify, tolerate_derived=True)
            else:
                raise KBError(f"KB at {root} is missing {e.rel} (named in manifest.json): it was deleted or the KB "
                              "was copied incompletely. Restore the file, or rebuild the KB.") from None
        if m.legacy:
            check_legacy_indexes(g, verify)  # what shows that an unsigned version-1 manifest is one
        if m.legacy and root not in _WARNED_LEGACY:
            _WARNED_LEGACY.add(root)
            log.warning("ReDi KB %s has format version %d: it opens, but its FAISS index files are not read (this "
                        "version never parses FAISS files); each step's index is rebuilt in memory from the stored "
                        "latents when first searched, which takes time on big KBs. Its next change upgrades it to "
                        "version %d; to upgrade now run: python -m kb_tools upgrade %s", root, m.format_version,
                        FORMAT_VERSION, root)
        return g
    raise KBError(f"KB at {root} changed {OPEN_ATTEMPTS} times while it was being opened: a writer commits faster "
                  "than this reader can open it. Retry, or open it between writes.")


def open_or_create(path: str, settings: KBSettings, *, dtype: str | None = None, index_type: str | None = None,
                   reduce: int | str | None = None, verify: str = "auto") -> KnowledgeBase:
    """Open the KB at `path` if its settings match `settings`, else create it.

    dtype, index_type and reduce apply to a new KB (defaults "float16", "auto", "auto"); for
    an existing KB a value other than None or "auto" must match what it was built with.
    """
    if not isinstance(settings, KBSettings):
        raise KBError(f"settings must be a KBSettings, got {type(settings).__name__}. Build one with KBSettings(...).")
    root = check_kb_path(path)
    if not os.path.isfile(os.path.join(root, MANIFEST)):
        try:
            return KnowledgeBase.create(root, settings, dtype=dtype or "float16", index_type=index_type or "auto",
                                        reduce="auto" if reduce is None else reduce, exist_ok=True)
        except KBError:
            if not os.path.isfile(os.path.join(root, MANIFEST)):
                raise
            # another process created it meanwhile: open it and compare, as if it had been there
    kb = KnowledgeBase.open(root, verify=verify)
    diffs = differences(kb.settings.to_dict(), settings.to_dict())
    for name, have, want in (("dtype", kb.dtype, dtype), ("index_type", kb.index_type, index_type), ("reduce", kb.reduce, reduce)):
        if want is not None and want != "auto" and want != have:
            diffs.append(Difference(name, have, want))
    if diffs:
        raise KBMismatchError(f"KB at {root} was built with different settings: {describe_differences(diffs, 'KB', 'request')}. "
                              "Use a new KB path for these settings, or change them to match the KB.")
    return kb
