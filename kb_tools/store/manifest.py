"""Reading manifest.json: every field type- and range-checked once, into the frozen records of format.py.

Version handling lives in one place, `_upgrade`: older manifests are converted to the
current schema before they are checked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from ..core.errors import KBError
from .files import open_regular
from .format import (
    DTYPES,
    ENTRIES_RE,
    FORMAT_VERSION,
    INDEX_RE,
    INDEX_TYPES,
    LEGACY_INDEX_RE,
    MANIFEST,
    MAX_CALIBRATION_BYTES,
    MAX_COUNT,
    MAX_ENTRIES_BYTES,
    MAX_FILE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_SHARDS,
    SHARD_RE,
    STATS_RE,
    STRUCTURES_OF,
    FileRef,
    IndexRecord,
    Manifest,
    ShardRecord,
    canonical_bytes,
    manifest_checksum,
)
from .integrity import check_version_1
from .safe_json import json_kind, load_json, short
from .settings import KBSettings, freeze, is_int


class _Fields:
    """Typed reads of a decoded JSON file; every error names the file, the field and the fix."""

    def __init__(self, where: str, fix: str):
        self.where, self.fix = where, fix

    def error(self, path: str, problem: str) -> KBError:
        return KBError(f"{self.where}: {path} {problem}. {self.fix}")

    def obj(self, value: Any, path: str, keys: set[str], optional: set[str] = frozenset()) -> dict:
        if not isinstance(value, dict):
            raise self.error(path, f"must be a JSON object, got {json_kind(value)}")
        missing, unknown = keys - set(value), set(value) - keys - optional
        if missing:
            raise self.error(path, f"lacks {sorted(missing)}")
        if unknown:
            raise self.error(path, f"has unknown fields {sorted(unknown)[:5]} (written by a newer pack?)")
        return value

    def int(self, value: Any, path: str, lo: int, hi: int) -> int:
        if not is_int(value) or not lo <= value <= hi:
            raise self.error(path, f"must be an integer in [{lo}, {hi}], got {short(value)}")
        return int(value)

    def text(self, value: Any, path: str, max_len: int = 64) -> str:
        if not isinstance(value, str) or len(value) > max_len:
            raise self.error(path, f"must be a string of at most {max_len} characters, got {short(value)}")
        return value

    def sha(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
            raise self.error(path, f"must be a sha256 as 64 lowercase hex digits, got {short(value)}")
        return value

    def name(self, value: Any, path: str, pattern: re.Pattern) -> re.Match:
        match = pattern.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            raise self.error(path, f"names {short(value)}, which is not a file this store writes (expected a name "
                                   f"like {pattern.pattern!r} inside the KB folder)")
        return match

    def file(self, d: dict, path: str, pattern: re.Pattern, name_key: str = "file", bytes_key: str = "bytes",
             sha_key: str = "sha256", min_bytes: int = 8, max_bytes: int = MAX_FILE_BYTES) -> tuple[FileRef, re.Match]:
        match = self.name(d[name_key], f"{path}.{name_key}", pattern)
        ref = FileRef(d[name_key], self.int(d[bytes_key], f"{path}.{bytes_key}", min_bytes, max_bytes),
                      self.sha(d[sha_key], f"{path}.{sha_key}"))
        return ref, match


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
        raise KBError(f"{where} has unknown format version {short(version)} (this pack reads versions "
                      f"{list(READABLE_VERSIONS)}). Rebuild the KB with this pack.")
    try:
        checksum = manifest_checksum(raw)
    except UnicodeEncodeError as e:
        raise KBError(f"{where} holds text that is not valid Unicode (an escaped lone surrogate, {e.object[e.start:e.end]!r}): "
                      f"no KB stores such text. {fix}") from None
    if version >= 2:
        if raw.get("checksum") != checksum:
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
    raw = load_json(data, name=where, fix=fix, max_bytes=MAX_MANIFEST_BYTES)
    if isinstance(raw, dict) and is_int(raw.get("format_version")) and raw["format_version"] == 1:
        check_version_1(raw, data, where)
    version, raw = _upgrade(raw, where, fix)
    f = _Fields(where, fix)
    f.obj(raw, "the manifest", _MANIFEST_KEYS)
    try:
        settings = KBSettings.from_dict(raw["settings"])
    except KBError as e:
        raise KBError(f"{where}: settings are invalid: {e} {fix}") from None
    count = f.int(raw["count"], "count", 0, MAX_COUNT)
    dtype = raw["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise f.error("dtype", f"is {short(dtype)}; this pack reads {list(DTYPES)}")
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
        raise f.error("shards", f"must be a list of at most {MAX_SHARDS} shard records, got {json_kind(value)}")
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
        got = sorted(value) if isinstance(value, dict) else json_kind(value)
        raise f.error("indexes", f"lists steps {short(got)}, the settings store steps {list(steps)}")
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
            raise f.error(path, f"has type {short(kind)} and structure {short(structure)}; types are "
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
            raise f.error(f"{path}.nlist", f"must be null for a {structure} index, got {short(nlist)}")
        ntotal = f.int(rec["ntotal"], f"{path}.ntotal", 0, MAX_COUNT)
        if ntotal != count:
            raise f.error(f"{path}.ntotal", f"is {ntotal}, the KB holds {count} entries")
        out.append(IndexRecord(step, kind, structure, reduce, dim, nlist, ntotal, ref, legacy))
    if len({(i.type, i.reduce) for i in out}) != 1:
        raise f.error("indexes", "mix index types or reduce factors between steps")
    return tuple(out)


#: The key of the sampler calibration's record in "calibration" (store/sampler_calibration.py); the other keys are steps.
SAMPLER_CALIBRATION = "sampler"
SAMPLER_RECORD_RE = re.compile(r"sampler_calibration/record-[0-9a-f]{16}\.json")
MAX_SAMPLER_RECORD_BYTES = 16 * 2**20


def _parse_calibration(f: _Fields, value: Any, settings: KBSettings) -> Mapping:
    if not isinstance(value, dict):
        raise f.error("calibration", f"must be an object, got {json_kind(value)}")
    out = {}
    for key, cal in value.items():
        if key == SAMPLER_CALIBRATION:  # a pointer to the record file, checked like every file the manifest names
            path = f"calibration.{key}"
            f.obj(cal, path, {"file", "bytes", "sha256"})
            ref, _ = f.file(cal, path, SAMPLER_RECORD_RE, min_bytes=2, max_bytes=MAX_SAMPLER_RECORD_BYTES)
            out[key] = freeze({"file": ref.file, "bytes": ref.bytes, "sha256": ref.sha256})
            continue
        if not (key.isdigit() and str(int(key)) == key and int(key) in settings.stored_steps):
            raise f.error("calibration", f"has a result for {short(key)}, which is not a stored step")
        if not isinstance(cal, dict) or len(canonical_bytes(cal)) > MAX_CALIBRATION_BYTES:
            raise f.error(f"calibration.{key}", f"must be an object of at most {MAX_CALIBRATION_BYTES} bytes")
        out[int(key)] = freeze(cal)
    return freeze(out)


def read_manifest(root: str) -> Manifest:
    """The committed manifest of the KB folder `root`; errors say what is wrong and what to do."""
    if not os.path.isdir(root):
        raise KBError(f"No knowledge base at {root}: the directory does not exist. Check the path, or build a KB there.")
    path = os.path.join(root, MANIFEST)
    try:
        with open_regular(path, "the KB's manifest") as f:  # a FIFO here would block a plain open forever
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise KBError(f"{root} has no {MANIFEST}: it is not a knowledge base, or its first build never "
                      "committed. Point at a KB directory, or build one.") from None
    except OSError as e:
        raise KBError(f"cannot read {path} ({e.strerror or e}). Check the folder's permissions.") from None
    return parse_manifest(data, root)
