"""The on-disk format: file names, the manifest parsed once into frozen validated records, entries files.

Layout of a KB folder (FORMAT_VERSION 2):

    manifest.json                                         the commit point (atomic replace), signed
    shards/<seq:05d>-<rand8>.safetensors                  "step_010" -> [n, C, H, W] latents
    shards/<seq:05d>-<rand8>.entries.json                 [{"prompt": str, "seed": int}] x n
    index/step_010-<gen:06d>-<rand8>.safetensors          search structure over reduced keys
    stats-<gen:06d>-<rand8>.safetensors                   "sum_010" -> float64 [C*H*W]

Every field of a manifest is type- and range-checked here, once; the rest of the store
works with the frozen records this module returns. Version handling lives in one place,
`_upgrade`: older manifests are converted to the current schema before they are checked.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import KBError
from .files import sha256_bytes
from .safe_json import load_json
from .settings import KBSettings, freeze, is_int, thaw

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
INDEX_DIR = "index"
LOCK_FILE = ".writer.lock"
DTYPES = {"float16": np.float16, "float32": np.float32}
#: What a user asks for; "auto" picks flat or HNSW by the KB's size (index.py).
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")
#: What an index file holds, for each requested type.
STRUCTURES_OF = {"auto": ("flat", "hnsw"), "flat": ("flat",), "ivf": ("flat", "ivf"), "hnsw": ("hnsw",)}

MAX_MANIFEST_BYTES = 64 * 2**20
MAX_ENTRIES_BYTES = 2**31
MAX_CALIBRATION_BYTES = 64 * 2**10
MAX_SHARDS = 10**6
MAX_COUNT = 2**40
MAX_FILE_BYTES = 2**62

_STEM = r"\d{5,}-[0-9a-f]{8}"
_TAG = r"\d{6,}-[0-9a-f]{8}"
SHARD_RE = re.compile(rf"{SHARDS_DIR}/({_STEM})\.safetensors")
ENTRIES_RE = re.compile(rf"{SHARDS_DIR}/({_STEM})\.entries\.json")
INDEX_RE = re.compile(rf"{INDEX_DIR}/step_(\d{{3,}})-{_TAG}\.safetensors")
LEGACY_INDEX_RE = re.compile(rf"{INDEX_DIR}/step_(\d{{3,}})-{_TAG}\.faiss")  # version 1: FAISS files
STATS_RE = re.compile(rf"stats-{_TAG}\.safetensors")
_TMP = r"(\.tmp-\d+-[0-9a-f]{8})?"
#: Every name the store writes, per folder: cleanup deletes nothing else.
OWN_NAMES = {
    "": re.compile(rf"stats-{_TAG}\.safetensors{_TMP}|{re.escape(MANIFEST)}\.tmp-\d+-[0-9a-f]{{8}}"),
    SHARDS_DIR: re.compile(rf"{_STEM}\.(safetensors|entries\.json){_TMP}"),
    INDEX_DIR: re.compile(rf"step_\d{{3,}}-{_TAG}\.(safetensors|faiss){_TMP}"),
}


def step_name(step: int) -> str:
    """Tensor name of a stored step inside a shard, e.g. 10 -> "step_010"."""
    return f"step_{step:03d}"


def sum_name(step: int) -> str:
    """Tensor name of a step's running key sum inside the stats file."""
    return f"sum_{step:03d}"


def new_tag(generation: int) -> str:
    """Generation plus a random part: two writers never pick the same file name."""
    return f"{generation:06d}-{os.urandom(4).hex()}"


def shard_stem(seq: int) -> str:
    return f"{SHARDS_DIR}/{seq:05d}-{os.urandom(4).hex()}"


def index_file_name(step: int, tag: str) -> str:
    return f"{INDEX_DIR}/{step_name(step)}-{tag}.safetensors"


def stats_file_name(tag: str) -> str:
    return f"stats-{tag}.safetensors"


def is_own_name(folder: str, name: str) -> bool:
    """Whether `name` in `folder` ("" for the KB folder) is a name this store writes."""
    pattern = OWN_NAMES.get(folder)
    return bool(pattern and pattern.fullmatch(name))


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")  # noqa: UP017 (Python 3.10)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class FileRef:
    """A file the manifest names, relative to the KB folder, with its size and sha256."""

    file: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardRecord:
    """One shard: its latents file, its entries file and how many entries both hold."""

    data: FileRef
    entries: FileRef
    count: int

    def to_json(self) -> dict:
        return {"file": self.data.file, "entries_file": self.entries.file, "count": self.count,
                "sha256": self.data.sha256, "entries_sha256": self.entries.sha256,
                "bytes": self.data.bytes, "entries_bytes": self.entries.bytes}


@dataclass(frozen=True)
class IndexRecord:
    """The search index of one stored step: requested type, what the file holds, its file."""

    step: int
    type: str  # what the user asked for (INDEX_TYPES)
    structure: str  # what the file holds: "flat", "ivf" or "hnsw"
    reduce: int  # average-pool factor of the keys over H and W
    dim: int  # values per reduced key
    nlist: int | None  # IVF lists, for structure "ivf"
    ntotal: int
    file: FileRef
    legacy: bool = False  # a version-1 FAISS file: never read, the index is rebuilt from the shards

    def to_json(self) -> dict:
        if self.legacy:
            raise AssertionError("a version-1 index record must be rebuilt before a commit")
        return {"type": self.type, "structure": self.structure, "reduce": self.reduce, "dim": self.dim,
                "nlist": self.nlist, "ntotal": self.ntotal, "file": self.file.file, "sha256": self.file.sha256,
                "bytes": self.file.bytes}


@dataclass(frozen=True)
class Manifest:
    """One committed generation of a KB, as manifest.json describes it (validated)."""

    format_version: int  # as read; a commit always writes FORMAT_VERSION
    generation: int
    settings: KBSettings
    count: int
    dtype: str
    shards: tuple[ShardRecord, ...]
    indexes: tuple[IndexRecord, ...]  # one per stored step, in step order
    stats: FileRef
    calibration: Mapping  # {step: frozen dict}
    created: str
    updated: str

    def index(self, step: int) -> IndexRecord:
        return self.indexes[self.settings.stored_steps.index(step)]

    @property
    def index_type(self) -> str:
        return self.indexes[0].type

    @property
    def reduce(self) -> int:
        return self.indexes[0].reduce

    @property
    def legacy(self) -> bool:
        return any(i.legacy for i in self.indexes)

    def files(self) -> set[str]:
        """Every file this generation names, relative to the KB folder."""
        names = {self.stats.file}
        names.update(i.file.file for i in self.indexes)
        for s in self.shards:
            names.update((s.data.file, s.entries.file))
        return names

    def evolve(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION, "generation": self.generation, "settings": self.settings.to_dict(),
            "count": self.count, "dtype": self.dtype, "shards": [s.to_json() for s in self.shards],
            "indexes": {str(i.step): i.to_json() for i in self.indexes},
            "stats": {"file": self.stats.file, "sha256": self.stats.sha256, "bytes": self.stats.bytes},
            "calibration": {str(k): thaw(v) for k, v in sorted(self.calibration.items())},
            "created": self.created, "updated": self.updated,
        }


def _canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def manifest_checksum(d: dict) -> str:
    """The manifest's own checksum: sha256 of its canonical JSON (sorted keys, no spaces), "checksum" left out."""
    return sha256_bytes(_canonical({k: v for k, v in d.items() if k != "checksum"}))


def manifest_bytes(m: Manifest) -> bytes:
    """manifest.json's content: the records plus their checksum."""
    d = m.to_json()
    d["checksum"] = manifest_checksum(d)
    return json.dumps(d, indent=1, ensure_ascii=False, allow_nan=False).encode("utf-8")


# --------------------------------------------------------------------------- parsing


class _Fields:
    """Typed reads of a decoded JSON file; every error names the file, the field and the fix."""

    def __init__(self, where: str, fix: str):
        self.where, self.fix = where, fix

    def error(self, path: str, problem: str) -> KBError:
        return KBError(f"{self.where}: {path} {problem}. {self.fix}")

    def obj(self, value: Any, path: str, keys: set[str], optional: set[str] = frozenset()) -> dict:
        if not isinstance(value, dict):
            raise self.error(path, f"must be a JSON object, got {_kind(value)}")
        missing, unknown = keys - set(value), set(value) - keys - optional
        if missing:
            raise self.error(path, f"lacks {sorted(missing)}")
        if unknown:
            raise self.error(path, f"has unknown fields {sorted(unknown)[:5]} (written by a newer pack?)")
        return value

    def int(self, value: Any, path: str, lo: int, hi: int) -> int:
        if not is_int(value) or not lo <= value <= hi:
            raise self.error(path, f"must be an integer in [{lo}, {hi}], got {_short(value)}")
        return int(value)

    def text(self, value: Any, path: str, max_len: int = 64) -> str:
        if not isinstance(value, str) or len(value) > max_len:
            raise self.error(path, f"must be a string of at most {max_len} characters, got {_short(value)}")
        return value

    def sha(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
            raise self.error(path, f"must be a sha256 as 64 lowercase hex digits, got {_short(value)}")
        return value

    def name(self, value: Any, path: str, pattern: re.Pattern) -> re.Match:
        match = pattern.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            raise self.error(path, f"names {_short(value)}, which is not a file this store writes (expected a name "
                                   f"like {pattern.pattern!r} inside the KB folder)")
        return match

    def file(self, d: dict, path: str, pattern: re.Pattern, name_key: str = "file", bytes_key: str = "bytes",
             sha_key: str = "sha256", min_bytes: int = 8, max_bytes: int = MAX_FILE_BYTES) -> tuple[FileRef, re.Match]:
        match = self.name(d[name_key], f"{path}.{name_key}", pattern)
        ref = FileRef(d[name_key], self.int(d[bytes_key], f"{path}.{bytes_key}", min_bytes, max_bytes),
                      self.sha(d[sha_key], f"{path}.{sha_key}"))
        return ref, match


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"the number {_short(value)}" if isinstance(value, (int, float)) else type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _upgrade_v1(raw: dict) -> dict:
    """Version 1 -> 2: no checksum; index files are FAISS files, marked legacy (never parsed)."""
    out = dict(raw)
    indexes = raw.get("indexes")
    if isinstance(indexes, dict):
        out["indexes"] = {
            k: {**v, "structure": "ivf" if v.get("nlist") is not None else ("hnsw" if v.get("type") == "hnsw" else "flat"),
                "legacy": True} if isinstance(v, dict) else v
            for k, v in indexes.items()}
    return out


#: version -> function turning a manifest of that version into one of the next version.
_UPGRADES = {1: _upgrade_v1}
READABLE_VERSIONS = (*_UPGRADES, FORMAT_VERSION)


def _upgrade(raw: Any, where: str, fix: str) -> tuple[int, dict]:
    """The version a manifest was written with, and its content in the current schema (checksum checked)."""
    if not isinstance(raw, dict) or "format_version" not in raw:
        raise KBError(f"{where} has no format_version: it is not a KB manifest. {fix}")
    version = raw["format_version"]
    if is_int(version) and version > FORMAT_VERSION:
        raise KBError(f"{where} has format version {version}; this pack reads versions up to {FORMAT_VERSION}. "
                      "Upgrade the pack to open it.")
    if not is_int(version) or version not in READABLE_VERSIONS:
        raise KBError(f"{where} has unknown format version {_short(version)} (this pack reads versions "
                      f"{list(READABLE_VERSIONS)}). Rebuild the KB with this pack.")
    if version >= 2:
        if raw.get("checksum") != manifest_checksum(raw):
            raise KBError(f"{where} fails its checksum: it was edited by hand or damaged (the settings, file list and "
                          f"sizes it records cannot be trusted). {fix}")
        raw = {k: v for k, v in raw.items() if k != "checksum"}
    for v in range(version, FORMAT_VERSION):
        raw = _UPGRADES[v](raw)
    return version, raw


_MANIFEST_KEYS = {"format_version", "generation", "settings", "count", "dtype", "shards", "indexes", "stats",
                  "calibration", "created", "updated"}
_SHARD_KEYS = {"file", "entries_file", "count", "sha256", "entries_sha256", "bytes", "entries_bytes"}
_INDEX_KEYS = {"type", "structure", "reduce", "dim", "nlist", "ntotal", "file", "sha256", "bytes"}


def parse_manifest(data: bytes, root: str) -> Manifest:
    """manifest.json's bytes -> a validated Manifest, or a KBError naming the field and the fix."""
    where = os.path.join(root, MANIFEST)
    fix = "The manifest is damaged or was edited by hand. Restore manifest.json from a backup, or rebuild the KB."
    version, raw = _upgrade(load_json(data, name=where, fix=fix, max_bytes=MAX_MANIFEST_BYTES), where, fix)
    f = _Fields(where, fix)
    f.obj(raw, "the manifest", _MANIFEST_KEYS)
    try:
        settings = KBSettings.from_dict(raw["settings"])
    except KBError as e:
        raise KBError(f"{where}: settings are invalid: {e} {fix}") from None
    count = f.int(raw["count"], "count", 0, MAX_COUNT)
    dtype = raw["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise f.error("dtype", f"is {_short(dtype)}; this pack reads {list(DTYPES)}")
    shards = _parse_shards(f, raw["shards"])
    if len({s.data.file for s in shards}) != len(shards):
        raise f.error("shards", "names one file twice")
    if sum(s.count for s in shards) != count:
        raise f.error("count", f"is {count} but the shards hold {sum(s.count for s in shards)} entries")
    indexes = _parse_indexes(f, raw["indexes"], settings, count, legacy_ok=version < 2)
    stats_raw = f.obj(raw["stats"], "stats", {"file", "sha256", "bytes"})
    stats, _ = f.file(stats_raw, "stats", STATS_RE)
    named = [stats.file, *(i.file.file for i in indexes)] + [n for s in shards for n in (s.data.file, s.entries.file)]
    if len(set(named)) != len(named):
        raise f.error("the file list", "names one file twice")
    return Manifest(
        format_version=version, generation=f.int(raw["generation"], "generation", 1, 2**53), settings=settings,
        count=count, dtype=dtype, shards=shards, indexes=indexes, stats=stats,
        calibration=_parse_calibration(f, raw["calibration"], settings),
        created=f.text(raw["created"], "created"), updated=f.text(raw["updated"], "updated"))


def _parse_shards(f: _Fields, value: Any) -> tuple[ShardRecord, ...]:
    if not isinstance(value, list) or len(value) > MAX_SHARDS:
        raise f.error("shards", f"must be a list of at most {MAX_SHARDS} shard records, got {_kind(value)}")
    out = []
    for i, s in enumerate(value):
        path = f"shards[{i}]"
        f.obj(s, path, _SHARD_KEYS)
        data, stem = f.file(s, path, SHARD_RE)
        entries, entries_stem = f.file(s, path, ENTRIES_RE, "entries_file", "entries_bytes", "entries_sha256",
                                       min_bytes=2, max_bytes=MAX_ENTRIES_BYTES)
        if stem.group(1) != entries_stem.group(1):
            raise f.error(path, f"pairs latents {data.file!r} with entries {entries.file!r}: the names must share a stem")
        out.append(ShardRecord(data, entries, f.int(s["count"], f"{path}.count", 1, MAX_COUNT)))
    return tuple(out)


def _parse_indexes(f: _Fields, value: Any, settings: KBSettings, count: int, legacy_ok: bool) -> tuple[IndexRecord, ...]:
    steps = settings.stored_steps
    if not isinstance(value, dict) or set(value) != {str(s) for s in steps}:
        got = sorted(value) if isinstance(value, dict) else _kind(value)
        raise f.error("indexes", f"lists steps {_short(got)}, the settings store steps {list(steps)}")
    c, h, w = settings.latent_shape
    out = []
    for step in steps:
        path = f"indexes.{step}"
        rec = value[str(step)]
        legacy = legacy_ok and isinstance(rec, dict) and rec.get("legacy") is True
        f.obj(rec, path, _INDEX_KEYS, {"legacy"} if legacy else set())
        ref, match = f.file(rec, path, LEGACY_INDEX_RE if legacy else INDEX_RE)
        if int(match.group(1)) != step:
            raise f.error(f"{path}.file", f"names the index of step {int(match.group(1))}")
        kind, structure = rec["type"], rec["structure"]
        if kind not in INDEX_TYPES or structure not in STRUCTURES_OF[kind]:
            raise f.error(path, f"has type {_short(kind)} and structure {_short(structure)}; types are "
                                f"{list(INDEX_TYPES)} with structures {STRUCTURES_OF}")
        reduce = f.int(rec["reduce"], f"{path}.reduce", 1, max(h, w))
        if h % reduce or w % reduce:
            raise f.error(f"{path}.reduce", f"is {reduce}, which does not divide the latent's H={h} and W={w}")
        dim = f.int(rec["dim"], f"{path}.dim", 1, c * h * w)
        if dim != c * (h // reduce) * (w // reduce):
            raise f.error(f"{path}.dim", f"is {dim}; reduce {reduce} of a {[c, h, w]} latent gives {c * (h // reduce) * (w // reduce)}")
        nlist = rec["nlist"]
        if structure == "ivf":
            nlist = f.int(nlist, f"{path}.nlist", 1, max(1, count))
        elif nlist is not None:
            raise f.error(f"{path}.nlist", f"must be null for a {structure} index, got {_short(nlist)}")
        ntotal = f.int(rec["ntotal"], f"{path}.ntotal", 0, MAX_COUNT)
        if ntotal != count:
            raise f.error(f"{path}.ntotal", f"is {ntotal}, the KB holds {count} entries")
        out.append(IndexRecord(step, kind, structure, reduce, dim, nlist, ntotal, ref, legacy))
    if len({(i.type, i.reduce) for i in out}) != 1:
        raise f.error("indexes", "mix index types or reduce factors between steps")
    return tuple(out)


def _parse_calibration(f: _Fields, value: Any, settings: KBSettings) -> Mapping:
    if not isinstance(value, dict):
        raise f.error("calibration", f"must be an object, got {_kind(value)}")
    out = {}
    for key, cal in value.items():
        if not (key.isdigit() and str(int(key)) == key and int(key) in settings.stored_steps):
            raise f.error("calibration", f"has a result for {_short(key)}, which is not a stored step")
        if not isinstance(cal, dict) or len(_canonical(cal)) > MAX_CALIBRATION_BYTES:
            raise f.error(f"calibration.{key}", f"must be an object of at most {MAX_CALIBRATION_BYTES} bytes")
        out[int(key)] = freeze(cal)
    return freeze(out)


def read_manifest(root: str) -> Manifest:
    """The committed manifest of the KB folder `root`; errors say what is wrong and what to do."""
    if not os.path.isdir(root):
        raise KBError(f"No knowledge base at {root}: the directory does not exist. Check the path, or build a KB there.")
    path = os.path.join(root, MANIFEST)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise KBError(f"{root} has no {MANIFEST}: it is not a knowledge base, or its first build never "
                      "committed. Point at a KB directory, or build one.") from None
    except OSError as e:
        raise KBError(f"cannot read {path} ({e.strerror or e}). Check the folder's permissions.") from None
    return parse_manifest(data, root)


# --------------------------------------------------------------------------- entries files


def entries_bytes(pairs: list[tuple[str, int]]) -> bytes:
    return json.dumps([{"prompt": p, "seed": s} for p, s in pairs], ensure_ascii=False).encode("utf-8")


def parse_entries(data: bytes, where: str, count: int, fix: str) -> list[tuple[str, int]]:
    """An entries file's bytes -> [(prompt, seed)] of length `count`; a null or non-string prompt is refused."""
    items = load_json(data, name=where, fix=fix, max_bytes=MAX_ENTRIES_BYTES, max_depth=None, strict=False)
    if not isinstance(items, list) or len(items) != count:
        got = f"{len(items)} entries" if isinstance(items, list) else _kind(items)
        raise KBError(f"{where} holds {got}; the manifest records {count}. {fix}")
    def valid(e: Any) -> bool:
        return (type(e) is dict and len(e) == 2 and type(e.get("prompt")) is str and type(e.get("seed")) is int
                and -(2**63) <= e["seed"] < 2**64)

    # Whole-list passes first (a KB opens 10^5 entries per second this way); the entry-by-entry
    # check runs only to name the first bad entry.
    try:
        prompts, seeds = [e["prompt"] for e in items], [e["seed"] for e in items]
        ok = not items or (set(map(type, items)) == {dict} and set(map(len, items)) == {2}
                           and set(map(type, prompts)) == {str} and set(map(type, seeds)) == {int}
                           and min(seeds) >= -(2**63) and max(seeds) < 2**64)
    except (KeyError, TypeError):
        ok = False
    if not ok:
        i = next(i for i, e in enumerate(items) if not valid(e))
        raise KBError(f"{where}: entry {i} is {_short(items[i])}; each entry must be {{\"prompt\": <text>, \"seed\": "
                      f"<64-bit integer>}}. {fix}")
    return list(zip(prompts, seeds))
