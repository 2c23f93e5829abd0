"""The ReDi knowledge base: stored trajectory latents, their FAISS indexes and statistics.

ReDi (paper Algorithm 1) stores, for each (prompt, seed), the latent x_k at a key step and
x_v at a value step; Algorithm 2 retrieves the keys nearest to a query's x_k and blends
their values. A KB here stores several steps per entry, so any stored pair (k, v) with
k <= v can be used without rebuilding.

Layout of a KB directory (FORMAT_VERSION 1):

    manifest.json                                   the commit point (atomic replace)
    shards/<seq:05d>-<rand8>.safetensors            "step_010" -> [n, C, H, W] latents
    shards/<seq:05d>-<rand8>.entries.json           [{"prompt": str, "seed": int}] x n
    index/step_010-<gen>.faiss                      FAISS index over reduced keys
    stats-<gen>.safetensors                         "sum_010" -> float64 [C*H*W]

Only files named by manifest.json are part of the KB. Every change writes new files under
new names, then replaces manifest.json; so a crash at any point leaves the previous
manifest and everything it names intact. Unnamed files are garbage, removed at the next
commit. Step indices count sampler steps from the start (0 = pure noise, `steps` = clean).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import faiss
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from .errors import KBError, KBMismatchError
from .records import Recipe
from .safetensors_mmap import open_memmaps

try:  # POSIX: serialise writers of one KB across processes; released if the process dies.
    import fcntl
except ImportError:  # Windows: writers rely on the generation check in _commit alone.
    fcntl = None

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
INDEX_DIR = "index"
LOCK_FILE = ".writer.lock"
DTYPES = {"float16": np.float16, "float32": np.float32}
INDEX_TYPES = ("flat", "ivf", "hnsw")
VERIFY_MODES = ("auto", "full", "size")
SEED_POLICIES = ("fixed", "per_entry")
# verify="auto" hashes every shard and index at open up to this total size; above it only
# sizes are checked (hashing hundreds of GB at each open would make big KBs unusable).
AUTO_VERIFY_MAX_BYTES = 512 * 2**20
# "auto" reduce aims the index key at <= this many dims: FAISS search stays cheap, and the
# exact re-rank on the full key restores what pooling loses.
MAX_AUTO_INDEX_DIM = 256
# FAISS k-means warns below 39 training points per centroid; train IVF only with that many.
IVF_POINTS_PER_LIST = 39
HNSW_M = 32
HNSW_EF_SEARCH = 64


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")  # noqa: UP017 (Python 3.10)


def step_name(step: int) -> str:
    """Tensor name of a stored step inside a shard, e.g. 10 -> "step_010"."""
    return f"step_{step:03d}"


def sum_name(step: int) -> str:
    """Tensor name of a step's running key sum inside the stats file."""
    return f"sum_{step:03d}"


# --------------------------------------------------------------------------- settings


@dataclass
class KBSettings:
    """What a KB was built with; a query must match it for the stored trajectories to apply."""

    model_fingerprint: dict
    latent_shape: tuple[int, int, int]
    sampling_type: str
    sampler: str
    scheduler: str
    steps: int
    cfg: float
    denoise: float
    stored_steps: list[int]
    sigmas: list[float]
    key_model_fingerprint: dict | None = None  # the model that made the keys (T-Stitch)
    latent_space: str = "comfy_latent"
    seed_policy: str = "fixed"
    negative_prompt: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(what: str, fix: str) -> KBError:
            return KBError(f"Invalid KB settings: {what}. {fix}")

        for name in ("model_fingerprint", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise bad(f"{name} must be a dict, got {type(getattr(self, name)).__name__}",
                          f"Pass {name} as a dict.")
        if self.key_model_fingerprint is not None and not isinstance(self.key_model_fingerprint, dict):
            raise bad("key_model_fingerprint must be a dict or None", "Pass a dict, or None if one model made the keys.")
        for name in ("sampling_type", "latent_space", "sampler", "scheduler", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise bad(f"{name} must be a string, got {getattr(self, name)!r}", f"Pass {name} as a string.")
        shape = list(self.latent_shape) if isinstance(self.latent_shape, (list, tuple)) else None
        if shape is None or len(shape) != 3 or not all(_is_int(s) and s > 0 for s in shape):
            raise bad(f"latent_shape must be 3 positive ints [C, H, W], got {self.latent_shape!r}",
                      "Pass the latent's shape without the batch dimension.")
        self.latent_shape = tuple(int(s) for s in shape)
        if not _is_int(self.steps) or self.steps < 1:
            raise bad(f"steps must be a positive int, got {self.steps!r}", "Pass the sampler's step count.")
        self.steps = int(self.steps)
        for name in ("cfg", "denoise"):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v):
                raise bad(f"{name} must be a finite number, got {v!r}", f"Pass {name} as a float.")
            setattr(self, name, float(v))
        if not 0.0 < self.denoise <= 1.0:
            raise bad(f"denoise must be in (0, 1], got {self.denoise}", "Pass the sampler's denoise value.")
        steps = list(self.stored_steps) if isinstance(self.stored_steps, (list, tuple)) else None
        if not steps or not all(_is_int(s) for s in steps):
            raise bad(f"stored_steps must be a non-empty list of ints, got {self.stored_steps!r}",
                      "List the step indices whose latents the KB stores.")
        outside = [int(s) for s in steps if not 0 <= s < self.steps]
        if outside:
            raise bad(f"stored_steps {outside} are outside [0, {self.steps}) for steps={self.steps}",
                      f"Store steps between 0 (pure noise) and {self.steps - 1}.")
        self.stored_steps = sorted({int(s) for s in steps})  # order and repeats carry no meaning
        sig = list(self.sigmas) if isinstance(self.sigmas, (list, tuple)) else None
        if sig is None or len(sig) != self.steps + 1:
            raise bad(f"sigmas must list steps + 1 = {self.steps + 1} values, got "
                      f"{'no list' if sig is None else len(sig)}", "Pass the full schedule, final 0 included.")
        if not all(_is_number(s) and math.isfinite(s) and s >= 0 for s in sig):
            raise bad("sigmas must be finite non-negative numbers", "Pass the sampler's sigma schedule.")
        self.sigmas = [float(s) for s in sig]
        if self.seed_policy not in SEED_POLICIES:
            raise bad(f"seed_policy {self.seed_policy!r} is unknown", f"Use one of {list(SEED_POLICIES)}.")
        try:
            json.dumps(self.to_dict(), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise bad(f"settings are not JSON-serialisable ({e})",
                      "Use only str, int, float, bool, None, lists and dicts in fingerprints and extra.") from None

    @property
    def recipe(self) -> Recipe:
        """The sampling recipe a query must follow (sampler, scheduler, steps, cfg)."""
        return Recipe(self.sampler, self.scheduler, self.steps, self.cfg)

    def to_dict(self) -> dict:
        """Plain JSON types, as stored in manifest.json."""
        d = asdict(self)
        d["latent_shape"] = list(self.latent_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> KBSettings:
        """Inverse of to_dict; refuses missing or unknown keys (a typo must not pass silently)."""
        if not isinstance(d, dict):
            raise KBError(f"KB settings must be a dict, got {type(d).__name__}. Pass KBSettings.to_dict() output.")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise KBError(f"KB settings have unknown keys {unknown}; valid keys are {names}. "
                          "Remove them, or upgrade the pack if a newer version wrote these settings.")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        absent = [k for k in required if k not in d]
        if absent:
            raise KBError(f"KB settings lack required keys {absent}. Provide them (see KBSettings).")
        return cls(**d)


SETTING_KEYS = tuple(f.name for f in fields(KBSettings))


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _values_match(a: Any, b: Any) -> bool:
    """Equality for settings values: floats to 1e-6 relative, lists elementwise, dicts by key."""
    if _is_number(a) and _is_number(b):
        if _is_int(a) and _is_int(b):
            return int(a) == int(b)
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_values_match(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_values_match(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def compare_settings(kb_settings: KBSettings | dict, query_settings: KBSettings | dict,
                     keys: Iterable[str] | None = None) -> list[tuple[str, Any, Any]]:
    """(key, kb_value, query_value) for every compared setting that differs; [] if all match."""
    a = kb_settings.to_dict() if isinstance(kb_settings, KBSettings) else dict(kb_settings)
    b = query_settings.to_dict() if isinstance(query_settings, KBSettings) else dict(query_settings)
    keys = SETTING_KEYS if keys is None else tuple(keys)
    unknown = [k for k in keys if k not in SETTING_KEYS]
    if unknown:
        raise KBError(f"Cannot compare unknown settings {unknown}; valid keys are {list(SETTING_KEYS)}.")
    return [(k, a.get(k), b.get(k)) for k in keys if not _values_match(a.get(k), b.get(k))]


def _short(v: Any, limit: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def describe_mismatch(diffs: list[tuple[str, Any, Any]], a: str = "KB", b: str = "request") -> str:
    """'sampler: KB has 'euler', request has 'dpmpp_2m'' for the first difference, + a count of the rest."""
    key, va, vb = diffs[0]
    more = f" (and {len(diffs) - 1} more: {', '.join(d[0] for d in diffs[1:])})" if len(diffs) > 1 else ""
    return f"{key}: {a} has {_short(va)}, {b} has {_short(vb)}{more}"


# --------------------------------------------------------------------------- keys


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


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy array or torch tensor (torch is never imported here)."""
    if hasattr(x, "detach"):
        t = x.detach().cpu()
        if t.is_floating_point():
            t = t.float()  # bfloat16 has no numpy dtype
        return t.numpy()
    return np.asarray(x)


# --------------------------------------------------------------------------- files


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    """Make renames in `path` durable (POSIX); Windows cannot open directories, skip there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> None:
    """Write to a temporary name, fsync, then rename: a reader never sees a partial file."""
    tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass  # garbage left behind is removed by the next commit


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link src to dst (no data rewritten); copy where links are impossible (other disk)."""
    try:
        os.link(src, dst)
    except OSError:
        tmp = f"{dst}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)


class _WriterLock:
    """Exclusive lock on <kb>/.writer.lock for one write transaction (no-op without fcntl)."""

    def __init__(self, root: str):
        self.path = os.path.join(root, LOCK_FILE)
        self.f = None

    def __enter__(self) -> _WriterLock:  # noqa: PYI034
        if fcntl is not None:
            self.f = open(self.path, "a+b")
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self.f is not None:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_UN)
            self.f.close()


# --------------------------------------------------------------------------- indexes


#: Below this many queries FAISS searches on one thread (see _faiss_threads).
SMALL_BATCH = 16


@contextlib.contextmanager
def _faiss_threads(n: int | None):
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


def _empty_index(kind: str, dim: int) -> faiss.Index:
    """A new index; "ivf" starts flat and is converted once enough keys exist to train it."""
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M)
        index.hnsw.efSearch = HNSW_EF_SEARCH
        return index
    return faiss.IndexFlatL2(dim)


def ivf_nlist(n: int) -> int:
    """Number of IVF lists for n keys: 4*sqrt(n), the usual FAISS rule of thumb."""
    return max(1, int(4 * math.sqrt(n)))


def _maybe_train_ivf(index: faiss.Index, info: dict) -> faiss.Index:
    """Convert a still-flat "ivf" index to IndexIVFFlat once it holds 39*nlist keys."""
    if info["type"] != "ivf" or info.get("nlist") is not None:
        return index
    n = index.ntotal
    nlist = ivf_nlist(n)
    if n < IVF_POINTS_PER_LIST * nlist:
        return index
    x = index.reconstruct_n(0, n)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(index.d), index.d, nlist)
    ivf.train(x)
    ivf.add(x)  # same order, so FAISS ids stay the KB's global ids
    ivf.nprobe = max(1, nlist // 8)
    info["nlist"] = nlist
    return ivf


def _serialize_index(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


@dataclass
class _Staged:
    """Files written by a transaction that is not committed yet."""

    paths: list[str] = field(default_factory=list)

    def discard(self) -> None:
        for p in self.paths:
            _remove_quietly(p)


# --------------------------------------------------------------------------- the KB


class KnowledgeBase:
    """One open knowledge base; create with `create`, `open` or `open_or_create`."""

    def __init__(self, path: str, manifest: dict, verify: str):
        # Private: use KnowledgeBase.open / create. Loads and checks everything but latents.
        self._path = os.path.abspath(path)
        self._lock = threading.RLock()
        self._index_cache: dict[int, faiss.Index] = {}
        self._nprobe: int | None = None
        self._ef_search: int | None = None
        self._id_of: dict[tuple[str, int], int] | None = None
        self._load(manifest, verify)

    # ------------------------------------------------------------ construction

    @classmethod
    def create(cls, path: str, settings: KBSettings, *, dtype: str = "float16", index_type: str = "flat",
               reduce: int | str = "auto", exist_ok: bool = False) -> KnowledgeBase:
        """Make an empty KB (count 0) at `path` and commit its manifest."""
        if not isinstance(settings, KBSettings):
            raise KBError(f"settings must be a KBSettings, got {type(settings).__name__}. Build one with KBSettings(...).")
        if dtype not in DTYPES:
            raise KBError(f"dtype {dtype!r} is not supported; use one of {list(DTYPES)}.")
        if index_type not in INDEX_TYPES:
            raise KBError(f"index_type {index_type!r} is unknown; use one of {list(INDEX_TYPES)}.")
        c, h, w = settings.latent_shape
        if reduce == "auto":
            r = auto_reduce(settings.latent_shape)
        elif _is_int(reduce) and reduce >= 1 and h % reduce == 0 and w % reduce == 0:
            r = int(reduce)
        else:
            raise KBError(f"reduce={reduce!r} does not divide the latent's H={h} and W={w}. "
                          "Use 'auto' or a positive int dividing both.")
        path = os.path.abspath(path)
        if os.path.exists(os.path.join(path, MANIFEST)):
            raise KBError(f"{path} already holds a knowledge base. Open it with KnowledgeBase.open "
                          "(or open_or_create), or choose another path.")
        if os.path.exists(path) and not exist_ok:
            raise KBError(f"{path} already exists. Choose a new path, or pass exist_ok=True to use this folder.")
        for d in (path, os.path.join(path, SHARDS_DIR), os.path.join(path, INDEX_DIR)):
            os.makedirs(d, exist_ok=True)
        dim = c * (h // r) * (w // r)
        manifest = {
            "format_version": FORMAT_VERSION, "generation": 0, "settings": settings.to_dict(),
            "count": 0, "dtype": dtype, "shards": [], "indexes": {}, "stats": None,
            "calibration": {}, "created": _now(), "updated": _now(),
        }
        with _WriterLock(path):
            if os.path.exists(os.path.join(path, MANIFEST)):  # lost a race with another creator
                raise KBError(f"{path} already holds a knowledge base. Open it instead.")
            indexes = {s: _empty_index(index_type, dim) for s in settings.stored_steps}
            infos = {s: {"type": index_type, "reduce": r, "dim": dim, "nlist": None} for s in settings.stored_steps}
            sums = {s: np.zeros(c * h * w, np.float64) for s in settings.stored_steps}
            staged = _Staged()
            try:
                _stage_indexes_and_stats(path, manifest, indexes, infos, sums, 1, staged)
                _commit_manifest(path, manifest, 1)
            except BaseException:
                staged.discard()
                raise
        return cls(path, manifest, "size")

    @classmethod
    def open(cls, path: str, verify: str = "auto") -> KnowledgeBase:
        """Open a committed KB; checks files and checksums (see `verify`), maps latents lazily.

        verify: "full" hashes every file; "auto" does so when shards + indexes total
        <= 512 MiB, else only checks sizes of shards and indexes; "size" checks sizes only
        (entries and stats are always hashed: they are read anyway). An index's checksum is
        always checked when it is loaded, before FAISS parses it.
        """
        if verify not in VERIFY_MODES:
            raise KBError(f"verify={verify!r} is unknown; use one of {list(VERIFY_MODES)}.")
        return cls(path, _read_manifest(os.path.abspath(path)), verify)

    # ------------------------------------------------------------ loading

    def _file(self, rel: str) -> str:
        """Absolute path of a manifest-relative file name; refuses names escaping the KB."""
        parts = rel.split("/") if isinstance(rel, str) else [""]
        if not rel or rel.startswith("/") or any(p in ("", ".", "..") or "\\" in p or ":" in p for p in parts):
            raise KBError(f"manifest.json of {self._path} names file {rel!r} outside the KB directory: "
                          "it is damaged or hand-edited. Restore it, or rebuild the KB.")
        return os.path.join(self._path, *parts)

    def _check_size(self, rel: str, expected: int) -> str:
        p = self._file(rel)
        if not os.path.isfile(p):
            raise KBError(f"KB at {self._path} is missing {rel} (named in manifest.json): it was deleted or "
                          "the KB was copied incompletely. Restore the file, or rebuild the KB.")
        size = os.path.getsize(p)
        if size != expected:
            raise KBError(f"KB file {rel} at {self._path} is {size} bytes, the manifest records {expected}: "
                          "it is truncated or was overwritten (incomplete copy, full disk). Restore the file, "
                          "or rebuild the KB.")
        return p

    def _checksum_error(self, rel: str, kind: str, fix: str) -> KBError:
        return KBError(f"KB file {rel} at {self._path} fails its sha256 checksum: the {kind} is corrupt "
                       f"(damaged disk or an edited file). {fix}")

    def _read_checked(self, rel: str, size: int, sha: str, kind: str, fix: str) -> bytes:
        p = self._check_size(rel, size)
        with open(p, "rb") as f:
            data = f.read()
        if len(data) != size:
            raise KBError(f"KB file {rel} changed while being read. Close other writers and reopen the KB.")
        if _sha256_bytes(data) != sha:
            raise self._checksum_error(rel, kind, fix)
        return data

    def _load(self, m: dict, verify: str) -> None:
        """Check the manifest against the files and set up the in-memory state."""
        try:
            self._settings = KBSettings.from_dict(m["settings"])
            self._dtype = m["dtype"]
            count, shards, indexes, stats = int(m["count"]), list(m["shards"]), dict(m["indexes"]), m["stats"]
            int(m["generation"])
        except KBError as e:
            raise KBError(f"manifest.json of {self._path} has invalid settings: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise KBError(f"manifest.json of {self._path} is incomplete or malformed ({e!r}): it is damaged "
                          "or hand-edited. Restore it from a backup, or rebuild the KB.") from None
        if self._dtype not in DTYPES:
            raise KBError(f"manifest.json of {self._path} has dtype {self._dtype!r}; this pack reads "
                          f"{list(DTYPES)}. Upgrade the pack, or rebuild the KB.")
        steps = self._settings.stored_steps
        if sorted(int(k) for k in indexes) != steps or not isinstance(stats, dict):
            raise KBError(f"manifest.json of {self._path} lists indexes for steps {sorted(indexes)} but the "
                          f"settings store steps {steps}: it is damaged. Rebuild the KB.")
        if sum(int(s["count"]) for s in shards) != count:
            raise KBError(f"manifest.json of {self._path} says count {count} but its shards hold "
                          f"{sum(int(s['count']) for s in shards)} entries: it is damaged. Rebuild the KB.")
        self._manifest = m
        c, h, w = self._settings.latent_shape
        self._D = c * h * w

        # Sizes first: a truncated or missing file is the most common damage, and is cheap to see.
        for s in shards:
            self._check_size(s["file"], int(s["bytes"]))
            self._check_size(s["entries_file"], int(s["entries_bytes"]))
        for info in indexes.values():
            self._check_size(info["file"], int(info["bytes"]))
        big = sum(int(s["bytes"]) for s in shards) + sum(int(i["bytes"]) for i in indexes.values())
        full = verify == "full" or (verify == "auto" and big <= AUTO_VERIFY_MAX_BYTES)
        if full:
            for info in indexes.values():  # hash before FAISS ever parses the file
                if _sha256_file(self._file(info["file"])) != info["sha256"]:
                    raise self._checksum_error(info["file"], "index",
                                               f"Repair it with KnowledgeBase.open({self._path!r}, "
                                               "verify='size').rebuild_indexes(), or rebuild the KB.")
            for s in shards:
                if _sha256_file(self._file(s["file"])) != s["sha256"]:
                    raise self._checksum_error(s["file"], "shard (stored latents)",
                                               "Restore the file from a backup, or rebuild the KB.")

        try:
            self._sums, self._stats_error = self._load_stats(stats), None
        except KBError as e:
            if verify != "size":
                raise
            # Derived data: open anyway so that rebuild_indexes() can recompute it.
            self._sums, self._stats_error = None, str(e)

        self._entries: list[tuple[str, int]] = []
        self._views: dict[int, list[np.ndarray]] = {st: [] for st in steps}
        starts = []
        for s in shards:
            starts.append(len(self._entries))
            self._entries.extend(self._load_entries(s))
            self._map_shard(s)
        self._starts = np.asarray(starts, dtype=np.int64)

    def _load_stats(self, stats: dict) -> dict[int, np.ndarray]:
        fix = f"Repair it with KnowledgeBase.open({self._path!r}, verify='size').rebuild_indexes()."
        data = self._read_checked(stats["file"], int(stats["bytes"]), stats["sha256"], "stats file", fix)
        try:
            loaded = safetensors.numpy.load(data)
        except (SafetensorError, ValueError) as e:
            raise KBError(f"KB stats file {stats['file']} is unreadable ({e}). {fix}") from None
        sums = {}
        for st in self._settings.stored_steps:
            a = loaded.get(sum_name(st))
            if a is None or a.shape != (self._D,):
                raise KBError(f"KB stats file {stats['file']} lacks {sum_name(st)} [{self._D}]. {fix}")
            sums[st] = a.astype(np.float64)
        return sums

    def _require_stats(self) -> dict[int, np.ndarray]:
        if self._sums is None:
            raise KBError(f"{self._stats_error} (KB opened with verify='size' despite it)")
        return self._sums

    def _load_entries(self, s: dict) -> list[tuple[str, int]]:
        data = self._read_checked(s["entries_file"], int(s["entries_bytes"]), s["entries_sha256"],
                                  "entries file (prompts and seeds)",
                                  "Restore the file from a backup, or rebuild the KB.")
        try:
            items = json.loads(data.decode("utf-8"))
            pairs = [(str(e["prompt"]), int(e["seed"])) for e in items]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise KBError(f"KB entries file {s['entries_file']} is malformed ({e}). Rebuild the KB.") from None
        if len(pairs) != int(s["count"]):
            raise KBError(f"KB entries file {s['entries_file']} lists {len(pairs)} entries, the manifest "
                          f"records {s['count']}. Rebuild the KB.")
        return pairs

    def _map_shard(self, s: dict) -> None:
        """Memory-map one shard's latents (no values are read) and check names, shapes, dtype."""
        views = open_memmaps(self._file(s["file"]))
        want = (int(s["count"]), *self._settings.latent_shape)
        for st in self._settings.stored_steps:
            v = views.get(step_name(st))
            if v is None or v.shape != want or v.dtype != np.dtype(self._dtype):
                got = "missing" if v is None else f"{v.dtype} {list(v.shape)}"
                raise KBError(f"KB shard {s['file']} has {step_name(st)} {got}, expected {self._dtype} "
                              f"{list(want)}: it does not belong to this KB. Restore it, or rebuild the KB.")
            self._views[st].append(v)

    # ------------------------------------------------------------ properties

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"KnowledgeBase({self._path!r}, count={len(self)}, steps={self.stored_steps})"

    @property
    def path(self) -> str:
        return self._path

    @property
    def settings(self) -> KBSettings:
        return KBSettings.from_dict(self._settings.to_dict())  # a copy: edits must not leak in

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def stored_steps(self) -> list[int]:
        return list(self._settings.stored_steps)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self._settings.latent_shape

    @property
    def index_type(self) -> str:
        return next(iter(self._manifest["indexes"].values()))["type"]

    @property
    def reduce(self) -> int:
        return int(next(iter(self._manifest["indexes"].values()))["reduce"])

    @property
    def entries(self) -> list[tuple[str, int]]:
        """(prompt, seed) per entry, in id order."""
        return list(self._entries)

    def _ids_by_pair(self) -> dict[tuple[str, int], int]:
        if self._id_of is None:
            self._id_of = {p: i for i, p in enumerate(self._entries)}
        return self._id_of

    def has_entry(self, prompt: str, seed: int) -> bool:
        return (prompt, int(seed)) in self._ids_by_pair()

    def missing(self, pairs: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """The (prompt, seed) pairs not yet stored, in input order, each once."""
        have, out, seen = self._ids_by_pair(), [], set()
        for prompt, seed in pairs:
            p = (prompt, int(seed))
            if p not in have and p not in seen:
                seen.add(p)
                out.append(p)
        return out

    # ------------------------------------------------------------ reading

    def _check_step(self, step: int, what: str = "step") -> int:
        if not _is_int(step) or int(step) not in self._settings.stored_steps:
            raise KBError(f"KB at {self._path} has no {what} {step!r}; it stores steps "
                          f"{self._settings.stored_steps}. Choose one of those, or rebuild the KB with "
                          f"stored steps including {step}.")
        return int(step)

    def check_step(self, step: int, what: str = "step") -> int:  # public alias until the kb/ package lands
        return self._check_step(step, what)

    def _check_ids(self, ids: Any) -> np.ndarray:
        a = np.asarray(_to_numpy(ids))
        if a.size == 0:
            return np.zeros(0, np.int64)
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise KBError(f"ids must be a 1-D sequence of ints, got {a.dtype} {list(a.shape)}. Pass entry ids.")
        a = a.astype(np.int64)
        bad = a[(a < 0) | (a >= len(self))]
        if bad.size:
            raise KBError(f"id {int(bad[0])} is out of range: KB at {self._path} has {len(self)} entries "
                          f"(ids 0..{len(self) - 1}). Use ids returned by search().")
        return a

    def _gather(self, step: int, ids: np.ndarray) -> np.ndarray:
        """Rows of the memmaps for global ids -> float32 [len(ids), C, H, W]."""
        out = np.empty((len(ids), *self._settings.latent_shape), np.float32)
        shard = np.searchsorted(self._starts, ids, side="right") - 1
        for s in np.unique(shard):
            self._check_mapped(int(s))
            sel = shard == s
            rows = ids[sel] - self._starts[s]
            out[sel] = self._views[step][s][rows]
        return out

    def _check_mapped(self, s: int) -> None:
        """Refuse to read a shard truncated since it was mapped: touching the lost pages is SIGBUS."""
        rec = self._manifest["shards"][s]
        try:
            size = os.path.getsize(self._file(rec["file"]))
        except OSError:
            return  # deleted or replaced: the mapping still holds the old, complete file
        if size < int(rec["bytes"]):
            raise KBError(f"KB shard {rec['file']} at {self._path} was truncated to {size} bytes after the KB was "
                          f"opened (the manifest records {rec['bytes']}). Restore the file, or rebuild the KB.")

    def latents(self, step: int, ids: Any) -> np.ndarray:
        """Stored latents x_step of entries `ids` (any order, repeats allowed): float32 [len(ids), C, H, W]."""
        return self._gather(self._check_step(step), self._check_ids(ids))

    def keys_flat(self, step: int, ids: Any) -> np.ndarray:
        """Full (unreduced) keys: float32 [len(ids), D], D = C*H*W."""
        return self.latents(step, ids).reshape(-1, self._D)

    def mean_key(self, step: int) -> np.ndarray:
        """Mean of the KB's keys at `step`, float32 [D] (what the centered residual subtracts)."""
        step = self._check_step(step)
        if len(self) == 0:
            raise KBError(f"KB at {self._path} is empty, it has no mean key. Build or append entries first.")
        return (self._require_stats()[step] / len(self)).astype(np.float32)

    def shard_views(self, step: int) -> list[np.ndarray]:
        """The memory-mapped [n, C, H, W] arrays of `step`, one per shard (read-only)."""
        return list(self._views[self._check_step(step)])

    def calibration(self, step: int) -> dict | None:
        """The calibration stored for `step` by set_calibration, or None."""
        return self._manifest.get("calibration", {}).get(str(self._check_step(step)))

    # ------------------------------------------------------------ indexes

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """IVF lists probed / HNSW efSearch for this session (defaults nlist//8 and 64)."""
        for name, v in (("nprobe", nprobe), ("ef_search", ef_search)):
            if v is not None and (not _is_int(v) or v < 1):
                raise KBError(f"{name} must be a positive int, got {v!r}.")
        with self._lock:
            self._nprobe, self._ef_search = nprobe, ef_search
            for index in self._index_cache.values():
                self._apply_params(index)

    def _apply_params(self, index: faiss.Index) -> None:
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = min(index.nlist, self._nprobe or max(1, index.nlist // 8))
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efSearch = self._ef_search or HNSW_EF_SEARCH

    def _index(self, step: int) -> faiss.Index:
        """The FAISS index of `step`, loaded once; its checksum is checked before FAISS parses it."""
        with self._lock:
            if step in self._index_cache:
                return self._index_cache[step]
            info = self._manifest["indexes"][str(step)]
            if not os.path.exists(self._file(info["file"])):
                raise KBError(f"KB index {info['file']} is gone: another process changed the KB at "
                              f"{self._path} since it was opened. Reopen the KB.")
            data = self._read_checked(info["file"], int(info["bytes"]), info["sha256"], "index",
                                      f"Repair it with KnowledgeBase.open({self._path!r}, "
                                      "verify='size').rebuild_indexes(), or rebuild the KB.")
            try:
                index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
            except RuntimeError as e:
                raise KBError(f"KB index {info['file']} cannot be read by FAISS ({e}). Repair it with "
                              "rebuild_indexes(), or upgrade faiss.") from None
            if index.ntotal != len(self) or index.d != int(info["dim"]):
                raise KBError(f"KB index {info['file']} holds {index.ntotal} keys of {index.d} dims, expected "
                              f"{len(self)} of {info['dim']}. Repair it with rebuild_indexes().")
            self._apply_params(index)
            self._index_cache[step] = index
            return index

    def _as_queries(self, queries: Any) -> np.ndarray:
        """Validate queries [B, C, H, W] or [B, D] -> float32 [B, D]."""
        q = _to_numpy(queries)
        shape = self._settings.latent_shape
        if not np.issubdtype(q.dtype, np.floating):
            raise KBError(f"query dtype {q.dtype} is not a floating-point type. Pass the latent as float32 "
                          "(for a torch tensor: latent.float()).")
        if q.ndim == 4 and tuple(q.shape[1:]) != shape:
            raise KBError(f"query latent shape {list(q.shape[1:])} differs from the KB's {list(shape)}: the KB "
                          "was built for a different latent size (image size or model family). Use a KB built "
                          "for this latent size, or build one.")
        if q.ndim == 2 and q.shape[1] != self._D:
            raise KBError(f"flat query has {q.shape[1]} values per item, the KB's keys have {self._D} "
                          f"({list(shape)}): the KB was built for a different latent size. Use a matching KB.")
        if q.ndim not in (2, 4):
            raise KBError(f"query must be [B, C, H, W] or [B, D], got shape {list(q.shape)}. Add the batch dimension.")
        q = np.ascontiguousarray(q.reshape(q.shape[0], -1), dtype=np.float32)
        bad = ~np.isfinite(q).all(axis=1)
        if bad.any():
            raise KBError(f"query {int(np.argmax(bad))} of the batch contains NaN/Inf: sampling diverged before "
                          "the key step. Check the model, cfg and input latent, or use an earlier key step.")
        return q

    def as_queries(self, queries: Any) -> np.ndarray:  # public alias until the kb/ package lands
        return self._as_queries(queries)

    def key_spread(self, step: int) -> float:  # alias until the kb/ package lands (cached per generation there)
        from .retrieval import sampled_key_spread; return sampled_key_spread(self, step)  # noqa: E702

    def search(self, step: int, queries: Any, h: int, *,
               candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-h neighbours per query (Algorithm 2): FAISS on reduced keys, exact L2 re-rank on full keys.

        queries: [B, C, H, W] or [B, D] float. Returns ids int64 [B, h] and Euclidean
        distances float32 [B, h], ascending, exact among the `candidates` (default
        max(4h, 32)) that the reduced-key search proposes.
        """
        step = self._check_step(step)
        n = len(self)
        if n == 0:
            raise KBError(f"KB at {self._path} is empty: build or append entries first.")
        if not _is_int(h) or h < 1:
            raise KBError(f"h (number of neighbours) must be an int >= 1, got {h!r}.")
        h = int(h)
        if h > n:
            raise KBError(f"KB at {self._path} has only {n} entries; lower H to at most {n}, or add entries.")
        q = self._as_queries(queries)
        c = max(4 * h, 32) if candidates is None else int(candidates)
        c = min(max(c, h), n)
        rq = reduce_keys(q.reshape(-1, *self._settings.latent_shape), self.reduce)
        index = self._index(step)
        with self._lock, _faiss_threads(1 if len(rq) < SMALL_BATCH else None):  # search params are per index object
            _, cand = index.search(rq, c)
            short = np.flatnonzero((cand >= 0).sum(axis=1) < h)
            if short.size:  # IVF probed too few lists / HNSW too small a beam: widen for those rows
                self._widen(index, c)
                _, cand[short] = index.search(rq[short], c)
                self._apply_params(index)
        if ((cand >= 0).sum(axis=1) < h).any():
            raise KBError(f"the index of step {step} returned fewer than {h} candidates. Repair it with "
                          "rebuild_indexes().")
        uniq = np.unique(cand[cand >= 0])
        full = self._gather(step, uniq).reshape(len(uniq), -1)
        ids = np.empty((len(q), h), np.int64)
        dist = np.empty((len(q), h), np.float32)
        for b in range(len(q)):
            rows = np.searchsorted(uniq, np.unique(cand[b][cand[b] >= 0]))  # sorted ids: ties -> lower id
            diff = full[rows] - q[b]  # float32 differences are exact enough to rank; squares summed in float64
            d2 = np.einsum("ij,ij->i", diff, diff, dtype=np.float64)
            top = np.argsort(d2, kind="stable")[:h]
            ids[b], dist[b] = uniq[rows[top]], np.sqrt(d2[top])
        return ids, dist

    @staticmethod
    def _widen(index: faiss.Index, c: int) -> None:
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = index.nlist
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efSearch = max(index.hnsw.efSearch, 4 * c)

    # ------------------------------------------------------------ writing

    def _check_latents(self, latents: dict, prompts: list[str], seeds: list[int]) -> dict[int, np.ndarray]:
        """Validate an append and cast its latents to the storage dtype."""
        n = len(prompts)
        steps = self._settings.stored_steps
        if not isinstance(latents, dict):
            raise KBError("latents must be a dict {step: array [n, C, H, W]}.")
        got = sorted(int(k) for k in latents)
        if got != steps:
            raise KBError(f"append got latents for steps {got}, the KB stores steps {steps}. Pass exactly one "
                          "array per stored step.")
        want = (n, *self._settings.latent_shape)
        out = {}
        for st in steps:
            a = _to_numpy(latents[st] if st in latents else latents[str(st)])
            if tuple(a.shape) != want:
                raise KBError(f"latents for step {st} have shape {list(a.shape)}, expected {list(want)} "
                              f"({n} entries of latent shape {list(self._settings.latent_shape)}). "
                              "Pass latents of the KB's latent size, one row per prompt.")
            if not np.issubdtype(a.dtype, np.floating):
                raise KBError(f"latents for step {st} have dtype {a.dtype}; pass floating-point latents.")
            with np.errstate(over="ignore"):  # overflow becomes Inf, reported just below
                stored = np.ascontiguousarray(a, dtype=DTYPES[self._dtype])
            bad = ~np.isfinite(stored.reshape(n, -1)).all(axis=1)
            if bad.any():
                i = int(np.argmax(bad))
                overflow = bool(np.isfinite(np.asarray(a[i])).all())
                why = (f"overflow {self._dtype} (values beyond its range); rebuild the KB with dtype='float32'"
                       if overflow else "contain NaN/Inf: the sampler diverged for this entry; drop or "
                       "regenerate it (e.g. lower cfg), then append again")
                raise KBError(f"latents for step {st}, entry {i} (prompt {_short(prompts[i], 60)}, seed "
                              f"{seeds[i]}) {why}.")
            out[st] = stored
        return out

    def append(self, latents: dict[int, Any], prompts: list[str], seeds: list[int], *,
               _before_commit: Callable[[], None] | None = None) -> None:
        """Add n entries: latents {step: [n, C, H, W]} for every stored step, one prompt and seed each.

        Writes a new shard, new index and stats files, then commits the manifest; a crash at
        any point leaves the KB as it was. `_before_commit` is a test hook, called after
        every file is written and before the commit.
        """
        prompts, seeds = list(prompts), list(seeds)
        if len(prompts) != len(seeds):
            raise KBError(f"append got {len(prompts)} prompts and {len(seeds)} seeds; pass one seed per prompt.")
        if not all(isinstance(p, str) for p in prompts) or not all(_is_int(s) for s in seeds):
            raise KBError("prompts must be strings and seeds ints. Convert them before appending.")
        seeds = [int(s) for s in seeds]
        if not prompts:
            return
        pairs = list(zip(prompts, seeds))
        have = self._ids_by_pair()
        seen: set[tuple[str, int]] = set()
        for p in pairs:
            if p in have or p in seen:
                raise KBError(f"prompt {_short(p[0], 60)} with seed {p[1]} is already in the KB at "
                              f"{self._path}{'' if p in have else ' (twice in this append)'}. Append only new "
                              "pairs: filter them with kb.missing(pairs) first.")
            seen.add(p)
        arrays = self._check_latents(latents, prompts, seeds)
        with self._lock, _WriterLock(self._path):
            self._check_not_changed()
            gen = int(self._manifest["generation"]) + 1
            m = json.loads(json.dumps(self._manifest))  # deep copy; self stays valid if we fail
            staged = _Staged()
            try:
                seq = len(m["shards"])
                m["shards"].append(self._stage_shard(arrays, pairs, seq, staged))
                indexes, infos = {}, {}
                for st in self._settings.stored_steps:
                    infos[st] = m["indexes"][str(st)]
                    index = faiss.clone_index(self._index(st))
                    index.add(reduce_keys(arrays[st], self.reduce))
                    indexes[st] = _maybe_train_ivf(index, infos[st])
                old_sums = self._require_stats()
                sums = {st: old_sums[st] + arrays[st].reshape(len(pairs), -1).sum(axis=0, dtype=np.float64)
                        for st in self._settings.stored_steps}
                m["count"] = len(self) + len(pairs)
                _stage_indexes_and_stats(self._path, m, indexes, infos, sums, gen, staged)
                if _before_commit is not None:
                    _before_commit()
                self._commit(m, gen)
            except BaseException:
                staged.discard()
                raise
            # Committed: adopt the new state, then drop what the old manifest alone referenced.
            self._manifest = m
            self._sums = sums
            self._starts = np.append(self._starts, len(self._entries)).astype(np.int64)
            self._entries.extend(pairs)
            if self._id_of is not None:
                self._id_of.update((p, len(self._entries) - len(pairs) + i) for i, p in enumerate(pairs))
            self._map_shard(m["shards"][-1])
            for st, index in indexes.items():
                self._apply_params(index)
                self._index_cache[st] = index
            self._collect_garbage()

    def _stage_shard(self, arrays: dict[int, np.ndarray], pairs: list[tuple[str, int]], seq: int,
                     staged: _Staged) -> dict:
        """Write one shard (latents + entries) under fresh names; return its manifest record."""
        stem = f"{SHARDS_DIR}/{seq:05d}-{os.urandom(4).hex()}"
        data = safetensors.numpy.save({step_name(st): a for st, a in arrays.items()})
        entries = json.dumps([{"prompt": p, "seed": s} for p, s in pairs], ensure_ascii=False).encode("utf-8")
        rec = {"file": stem + ".safetensors", "entries_file": stem + ".entries.json", "count": len(pairs),
               "sha256": _sha256_bytes(data), "entries_sha256": _sha256_bytes(entries),
               "bytes": len(data), "entries_bytes": len(entries)}
        for rel, blob in ((rec["file"], data), (rec["entries_file"], entries)):
            staged.paths.append(self._file(rel))
            _write_file(self._file(rel), blob)
        return rec

    def _check_not_changed(self) -> None:
        """Refuse to commit over a manifest another process committed after we read ours."""
        try:
            gen = int(_read_manifest(self._path)["generation"])
        except KBError:
            gen = None
        if gen != int(self._manifest["generation"]):
            raise KBError(f"KB at {self._path} was changed by another process since it was opened "
                          f"(generation {gen}, expected {self._manifest['generation']}). Reopen it and retry.")

    def _commit(self, m: dict, gen: int) -> None:
        _commit_manifest(self._path, m, gen)

    def _referenced(self) -> set[str]:
        m = self._manifest
        refs = {MANIFEST, LOCK_FILE, m["stats"]["file"]}
        refs.update(i["file"] for i in m["indexes"].values())
        for s in m["shards"]:
            refs.update((s["file"], s["entries_file"]))
        return refs

    def _collect_garbage(self) -> None:
        """Remove files no committed manifest names (leftovers of crashed or superseded writes)."""
        refs = self._referenced()
        for d in (SHARDS_DIR, INDEX_DIR):
            folder = os.path.join(self._path, d)
            for name in os.listdir(folder) if os.path.isdir(folder) else []:
                if f"{d}/{name}" not in refs:
                    _remove_quietly(os.path.join(folder, name))
        for name in os.listdir(self._path):
            if name not in refs and (name.startswith("stats-") or ".tmp-" in name):
                _remove_quietly(os.path.join(self._path, name))

    def _keys_and_sums(self) -> tuple[dict[int, faiss.Index], dict[int, dict], dict[int, np.ndarray]]:
        """Indexes and key sums rebuilt from the shards, one shard at a time (bounded memory)."""
        c, h, w = self._settings.latent_shape
        infos, indexes, sums = {}, {}, {}
        for st in self._settings.stored_steps:
            old = self._manifest["indexes"][str(st)]
            infos[st] = {"type": old["type"], "reduce": int(old["reduce"]), "dim": int(old["dim"]), "nlist": None}
            indexes[st] = _empty_index(old["type"], int(old["dim"]))
            sums[st] = np.zeros(c * h * w, np.float64)
            for i, v in enumerate(self._views[st]):
                self._check_mapped(i)
                for lo in range(0, len(v), 4096):
                    chunk = np.asarray(v[lo:lo + 4096], dtype=np.float32)
                    indexes[st].add(reduce_keys(chunk, self.reduce))
                    sums[st] += chunk.reshape(len(chunk), -1).sum(axis=0, dtype=np.float64)
            indexes[st] = _maybe_train_ivf(indexes[st], infos[st])
        return indexes, infos, sums

    def rebuild_indexes(self) -> None:
        """Rebuild every index and the stats from the shards (repairs a corrupt index or stats file)."""
        with self._lock, _WriterLock(self._path):
            self._check_not_changed()
            gen = int(self._manifest["generation"]) + 1
            m = json.loads(json.dumps(self._manifest))
            indexes, infos, sums = self._keys_and_sums()
            staged = _Staged()
            try:
                _stage_indexes_and_stats(self._path, m, indexes, infos, sums, gen, staged)
                self._commit(m, gen)
            except BaseException:
                staged.discard()
                raise
            self._manifest, self._sums, self._stats_error = m, sums, None
            self._index_cache = {}
            for st, index in indexes.items():
                self._apply_params(index)
                self._index_cache[st] = index
            self._collect_garbage()

    def set_calibration(self, step: int, calibration: dict) -> None:
        """Store a calibration result for `step` in the manifest (atomic commit)."""
        step = self._check_step(step)
        try:
            calibration = json.loads(json.dumps(calibration, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise KBError(f"calibration must be a JSON-serialisable dict of finite numbers ({e}).") from None
        if not isinstance(calibration, dict):
            raise KBError("calibration must be a dict (as returned by retrieval.calibrate).")
        with self._lock, _WriterLock(self._path):
            self._check_not_changed()
            m = json.loads(json.dumps(self._manifest))
            m.setdefault("calibration", {})[str(step)] = calibration
            self._commit(m, int(self._manifest["generation"]) + 1)
            self._manifest = m

    # ------------------------------------------------------------ checks

    def verify(self) -> list[str]:
        """Full check (sizes, checksums, shapes, counts, duplicates, NaN/Inf, index, stats); [] if sound."""
        problems: list[str] = []

        def check(fn: Callable[[], None]) -> None:
            try:
                fn()
            except KBError as e:
                problems.append(str(e))
            except OSError as e:
                problems.append(f"cannot read a KB file: {e}")

        m = self._manifest
        files = [(s["file"], s["bytes"], s["sha256"], "shard") for s in m["shards"]]
        files += [(s["entries_file"], s["entries_bytes"], s["entries_sha256"], "entries file") for s in m["shards"]]
        files += [(i["file"], i["bytes"], i["sha256"], "index") for i in m["indexes"].values()]
        files.append((m["stats"]["file"], m["stats"]["bytes"], m["stats"]["sha256"], "stats file"))
        for rel, size, sha, kind in files:
            def one(rel=rel, size=size, sha=sha, kind=kind):
                p = self._check_size(rel, int(size))
                if _sha256_file(p) != sha:
                    raise self._checksum_error(rel, kind, "Restore it from a backup, or rebuild the KB.")
            check(one)
        # Reading a mapped file past its (new) end raises SIGBUS: scan only shards of full size.
        intact = [os.path.isfile(self._file(s["file"])) and os.path.getsize(self._file(s["file"])) == int(s["bytes"])
                  for s in m["shards"]]
        if len(set(self._entries)) != len(self._entries):
            problems.append(f"KB at {self._path} stores {len(self._entries) - len(set(self._entries))} duplicate "
                            "(prompt, seed) entries. Rebuild it.")
        if self._sums is None:
            problems.append(self._stats_error)
        for st in self._settings.stored_steps:
            total = np.zeros(self._D, np.float64)
            for s, v, ok in zip(m["shards"], self._views[st], intact):
                for lo in range(0, len(v) if ok else 0, 4096):
                    chunk = np.asarray(v[lo:lo + 4096], dtype=np.float32).reshape(-1, self._D)
                    bad = ~np.isfinite(chunk).all(axis=1)
                    if bad.any():
                        problems.append(f"shard {s['file']} step {st} entry {lo + int(np.argmax(bad))} holds "
                                        "NaN/Inf. Rebuild the KB.")
                    total += chunk.sum(axis=0, dtype=np.float64)
            if self._sums is not None and all(intact) and not np.allclose(total, self._sums[st], rtol=1e-6, atol=1e-6 * max(1.0, len(self))):
                problems.append(f"stats for step {st} do not match the stored keys. Repair with rebuild_indexes().")
            check(lambda st=st: self._verify_index(st))
        return problems

    def _verify_index(self, step: int) -> None:
        """An index must find each sampled entry's own reduced key at distance ~0."""
        index = self._index(step)
        if len(self) == 0:
            return
        ids = np.unique(np.linspace(0, len(self) - 1, num=min(8, len(self))).astype(np.int64))
        rq = reduce_keys(self._gather(step, ids), self.reduce)
        with self._lock:
            self._widen(index, 8)
            d2, _ = index.search(rq, 1)
            self._apply_params(index)
        scale = max(1.0, float(np.abs(rq).max())) ** 2 * rq.shape[1]
        if not (d2[:, 0] <= 1e-5 * scale).all():
            raise KBError(f"index of step {step} does not match the stored keys. Repair it with rebuild_indexes().")

    def info(self) -> dict:
        """A JSON-friendly summary of the KB."""
        m = self._manifest
        return {
            "path": self._path, "format_version": m["format_version"], "count": len(self),
            "dtype": self._dtype, "latent_shape": list(self._settings.latent_shape),
            "stored_steps": self.stored_steps, "steps": self._settings.steps,
            "sampler": self._settings.sampler, "scheduler": self._settings.scheduler,
            "index_type": self.index_type, "reduce": self.reduce,
            "index_dim": int(next(iter(m["indexes"].values()))["dim"]),
            "ivf_nlist": next(iter(m["indexes"].values())).get("nlist"),
            "shards": len(m["shards"]), "bytes": sum(int(s["bytes"]) for s in m["shards"]),
            "calibrated_steps": sorted(int(k) for k in m.get("calibration", {})),
            "created": m["created"], "updated": m["updated"],
        }


# --------------------------------------------------------------------------- module helpers


def _manifest_bytes(m: dict) -> bytes:
    return json.dumps(m, indent=1, allow_nan=False).encode("utf-8")


def _commit_manifest(root: str, m: dict, gen: int) -> None:
    """The commit point: fsync the new files' directories, then atomically replace manifest.json."""
    m["generation"] = gen
    m["updated"] = _now()
    for d in (SHARDS_DIR, INDEX_DIR):
        _fsync_dir(os.path.join(root, d))
    _write_file(os.path.join(root, MANIFEST), _manifest_bytes(m))
    _fsync_dir(root)


def _read_manifest(path: str) -> dict:
    """Read and version-check manifest.json; errors say what is wrong and what to do."""
    if not os.path.isdir(path):
        raise KBError(f"No knowledge base at {path}: the directory does not exist. Check the path, or build a KB there.")
    mp = os.path.join(path, MANIFEST)
    if not os.path.isfile(mp):
        raise KBError(f"{path} has no {MANIFEST}: it is not a knowledge base, or its first build never "
                      "committed. Point at a KB directory, or build one.")
    try:
        with open(mp, "rb") as f:
            m = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KBError(f"{mp} is not valid JSON ({e}): the manifest is damaged. Restore it from a backup, "
                      "or rebuild the KB.") from None
    if not isinstance(m, dict) or "format_version" not in m:
        raise KBError(f"{mp} has no format_version: it is not a KB manifest. Rebuild the KB.")
    v = m["format_version"]
    if _is_int(v) and v > FORMAT_VERSION:
        raise KBError(f"KB at {path} has format version {v}; this pack reads up to version {FORMAT_VERSION}. "
                      "Upgrade the pack to open it.")
    if v != FORMAT_VERSION:
        raise KBError(f"KB at {path} has unknown format version {v!r} (this pack reads version "
                      f"{FORMAT_VERSION}). Rebuild the KB with this pack.")
    return m


def _stage_indexes_and_stats(root: str, m: dict, indexes: dict[int, faiss.Index], infos: dict[int, dict],
                             sums: dict[int, np.ndarray], gen: int, staged: _Staged) -> None:
    """Write new index files and a new stats file tagged with `gen`; record them in manifest `m`."""
    tag = f"{gen:06d}-{os.urandom(4).hex()}"  # random part: two writers never share a file name
    for st, index in indexes.items():
        rel = f"{INDEX_DIR}/{step_name(st)}-{tag}.faiss"
        data = _serialize_index(index)
        staged.paths.append(os.path.join(root, *rel.split("/")))
        _write_file(staged.paths[-1], data)
        m["indexes"][str(st)] = {**infos[st], "file": rel, "sha256": _sha256_bytes(data), "bytes": len(data),
                                 "ntotal": int(index.ntotal)}
    rel = f"stats-{tag}.safetensors"
    data = safetensors.numpy.save({sum_name(st): s for st, s in sums.items()})
    staged.paths.append(os.path.join(root, rel))
    _write_file(staged.paths[-1], data)
    m["stats"] = {"file": rel, "sha256": _sha256_bytes(data), "bytes": len(data)}


def open_or_create(path: str, settings: KBSettings, **kw: Any) -> KnowledgeBase:
    """Open the KB at `path` if its settings match `settings`, else create it (kw as for create)."""
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        kw.pop("verify", None)
        return KnowledgeBase.create(path, settings, exist_ok=True, **{k: v for k, v in kw.items() if k != "exist_ok"})
    kb = KnowledgeBase.open(path, verify=kw.get("verify", "auto"))
    diffs = compare_settings(kb.settings, settings)
    for name, have in (("dtype", kb.dtype), ("index_type", kb.index_type), ("reduce", kb.reduce)):
        if name in kw and kw[name] != "auto" and kw[name] != have:
            diffs.append((name, have, kw[name]))
    if diffs:
        raise KBMismatchError(f"KB at {path} was built with different settings: {describe_mismatch(diffs)}. "
                              "Use a new KB path for these settings, or change them to match the KB.")
    return kb


def merge(out_path: str, sources: Sequence[str], *, exist_ok: bool = False) -> KnowledgeBase:
    """A new KB holding every entry of `sources`; shards are hard-linked, indexes and stats rebuilt."""
    if not sources:
        raise KBError("merge needs at least one source KB path.")
    kbs = [s if isinstance(s, KnowledgeBase) else KnowledgeBase.open(s) for s in sources]
    first = kbs[0]
    for kb in kbs[1:]:
        diffs = compare_settings(first.settings, kb.settings)
        if kb.dtype != first.dtype:
            diffs.append(("dtype", first.dtype, kb.dtype))
        if diffs:
            raise KBMismatchError(f"Cannot merge {kb.path} with {first.path}: they differ in "
                                  f"{describe_mismatch(diffs, first.path, kb.path)}. Merge only KBs built with "
                                  "the same settings; rebuild one of them to match.")
    owner: dict[tuple[str, int], str] = {}
    for kb in kbs:
        for p in kb.entries:
            if p in owner:
                raise KBError(f"prompt {_short(p[0], 60)} with seed {p[1]} is in both {owner[p]} and {kb.path}. "
                              "Remove it from one source (rebuild that source without it) before merging.")
            owner[p] = kb.path
    out = KnowledgeBase.create(out_path, first.settings, dtype=first.dtype, index_type=first.index_type,
                               reduce=first.reduce, exist_ok=exist_ok)
    try:
        with out._lock, _WriterLock(out._path):
            gen = int(out._manifest["generation"]) + 1
            m = json.loads(json.dumps(out._manifest))
            for kb in kbs:
                for s in kb._manifest["shards"]:
                    stem = f"{SHARDS_DIR}/{len(m['shards']):05d}-{os.urandom(4).hex()}"
                    rec = {**s, "file": stem + ".safetensors", "entries_file": stem + ".entries.json"}
                    for key in ("file", "entries_file"):
                        _link_or_copy(kb._file(s[key]), out._file(rec[key]))
                    m["shards"].append(rec)
                    m["count"] += int(s["count"])
            # Map the linked shards, then build indexes and stats from their keys.
            out._load(m, "size")
            indexes, infos, sums = out._keys_and_sums()
            _stage_indexes_and_stats(out._path, m, indexes, infos, sums, gen, _Staged())
            out._commit(m, gen)
    except BaseException:
        _discard_new_kb(out._path)
        raise
    return KnowledgeBase.open(out._path, verify="size")


def _discard_new_kb(path: str) -> None:
    """Undo a KB that `merge` created and failed to fill: manifest first, then its files."""
    _remove_quietly(os.path.join(path, MANIFEST))
    for d in (SHARDS_DIR, INDEX_DIR):
        folder = os.path.join(path, d)
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            _remove_quietly(os.path.join(folder, name))
    for name in os.listdir(path):
        if name.startswith("stats-") or name == LOCK_FILE or ".tmp-" in name:
            _remove_quietly(os.path.join(path, name))
    for d in (os.path.join(path, SHARDS_DIR), os.path.join(path, INDEX_DIR), path):
        try:
            os.rmdir(d)  # only succeeds if nothing else is there: never removes a user's files
        except OSError:
            pass
