"""The on-disk format: file names, the manifest's frozen records and bytes, entries files.

Layout of a KB folder (FORMAT_VERSION 2):

    manifest.json                                         the commit point (atomic replace), signed
    shards/<seq:05d>-<rand8>.safetensors                  "step_010" -> [n, C, H, W] latents
    shards/<seq:05d>-<rand8>.entries.json                 [{"prompt": str, "seed": int}] x n
    index/step_010-<gen:06d>-<rand8>.safetensors          search structure over reduced keys
    stats-<gen:06d>-<rand8>.safetensors                   "sum_010" -> float64 [C*H*W]

The rest of the store works with the frozen records this module defines; manifest.py reads
manifest.json into them, checking every field once.
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
from .safe_json import json_kind, load_json, short
from .settings import KBSettings, thaw

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
#: The longest prompt a KB stores, in UTF-8 bytes (ComfyUI prompts are far shorter; a longer one is damage).
MAX_PROMPT_BYTES = 64 * 2**10
#: The largest magnitude a stored latent value may have: far beyond any sigma schedule times noise, and small
#: enough that squared distances over a whole latent stay finite in float32.
MAX_ABS_LATENT = 1e6

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
            # steps in order, then the sampler calibration's pointer (manifest.SAMPLER_CALIBRATION)
            "calibration": {str(k): thaw(v) for k, v in sorted(self.calibration.items(), key=lambda kv: (isinstance(kv[0], str), str(kv[0]).zfill(24)))},
            "created": self.created, "updated": self.updated,
        }


def canonical_bytes(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def manifest_checksum(d: dict) -> str:
    """The manifest's own checksum: sha256 of its canonical JSON (sorted keys, no spaces), "checksum" left out."""
    return sha256_bytes(canonical_bytes({k: v for k, v in d.items() if k != "checksum"}))


def manifest_bytes(m: Manifest) -> bytes:
    """manifest.json's content: the records plus their checksum."""
    d = m.to_json()
    d["checksum"] = manifest_checksum(d)
    return json.dumps(d, indent=1, ensure_ascii=False, allow_nan=False).encode("utf-8")


# --------------------------------------------------------------------------- entries files


def entries_bytes(pairs: list[tuple[str, int]]) -> bytes:
    return json.dumps([{"prompt": p, "seed": s} for p, s in pairs], ensure_ascii=False).encode("utf-8")


def parse_entries(data: bytes, where: str, count: int, fix: str) -> list[tuple[str, int]]:
    """An entries file's bytes -> [(prompt, seed)] of length `count`; a null or non-string prompt is refused."""
    items = load_json(data, name=where, fix=fix, max_bytes=MAX_ENTRIES_BYTES, max_depth=None, strict=False)
    if not isinstance(items, list) or len(items) != count:
        got = f"{len(items)} entries" if isinstance(items, list) else json_kind(items)
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
        raise KBError(f"{where}: entry {i} is {short(items[i])}; each entry must be {{\"prompt\": <text>, \"seed\": "
                      f"<64-bit integer>}}. {fix}")
    bad = prompt_problem(prompts)
    if bad is not None:
        raise KBError(f"{where}: entry {bad[0]}'s prompt {bad[1]}. {fix}")
    return list(zip(prompts, seeds))


def prompt_problem(prompts: list[str]) -> tuple[int, str] | None:
    """(index, problem) of the first prompt that is not valid Unicode text (a lone surrogate) or is longer than
    MAX_PROMPT_BYTES in UTF-8; None when all are fine."""
    try:
        "".join(prompts).encode("utf-8")  # one pass over all of them: a lone surrogate cannot be encoded
        if not prompts or max(map(len, prompts)) * 4 <= MAX_PROMPT_BYTES:
            return None
    except UnicodeEncodeError:
        pass
    for i, p in enumerate(prompts):
        try:
            size = len(p.encode("utf-8"))
        except UnicodeEncodeError as e:
            return i, f"is not valid Unicode text (a lone surrogate at character {e.start})"
        if size > MAX_PROMPT_BYTES:
            return i, f"is {size} bytes of UTF-8, more than the {MAX_PROMPT_BYTES} a KB stores per prompt"
    return None
