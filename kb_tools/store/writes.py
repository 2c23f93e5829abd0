"""The writing half of KnowledgeBase (create, append, rebuild_indexes, set_calibration), as a mixin.

Every change is one transaction (transaction.py): a crash at any point leaves the KB as it was.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.numpy

from ..core.errors import KBError
from . import arguments as args
from . import index as ix
from .commits import derive_from_shards, empty_manifest, new_kb_folder, stage_derived
from .format import (
    DTYPES, INDEX_TYPES, MAX_ABS_LATENT, MAX_CALIBRATION_BYTES, ShardRecord, entries_bytes, prompt_problem, shard_stem, step_name,
)
from .generation import Generation
from .integrity import bad_rows, check_legacy_indexes
from .safe_json import load_json
from .safetensors_file import MappedFile
from .settings import KBSettings, freeze, is_int
from .transaction import transaction

if TYPE_CHECKING:
    from .knowledge_base import KnowledgeBase


class KnowledgeBaseWrites:
    """create, append, rebuild_indexes and set_calibration of KnowledgeBase (knowledge_base.py)."""

    _path: str
    _gen: Generation
    _lock: threading.RLock
    _nprobe: int | None
    _ef_search: int | None

    @classmethod
    def create(cls, path: str, settings: KBSettings, *, dtype: str = "float16", index_type: str = "auto",
               reduce: int | str = "auto", exist_ok: bool = False) -> KnowledgeBase:
        """Make an empty KB (count 0) at `path` and commit its manifest.

        index_type: "auto" (flat up to index.AUTO_FLAT_MAX_ENTRIES entries, HNSW above),
        "flat" (exact), "ivf" (trains itself once big enough) or "hnsw".
        """
        if not isinstance(settings, KBSettings):
            raise KBError(f"settings must be a KBSettings, got {type(settings).__name__}. Build one with KBSettings(...).")
        if dtype not in DTYPES:
            raise KBError(f"dtype {args.short(dtype)} is not supported; use one of {list(DTYPES)}.")
        if index_type not in INDEX_TYPES:
            raise KBError(f"index_type {args.short(index_type)} is unknown; use one of {list(INDEX_TYPES)}.")
        c, h, w = settings.latent_shape
        if reduce == "auto":
            r = ix.auto_reduce(settings.latent_shape)
        elif is_int(reduce) and reduce >= 1 and h % reduce == 0 and w % reduce == 0:
            r = int(reduce)
        else:
            raise KBError(f"reduce={args.short(reduce)} does not divide the latent's H={h} and W={w}. "
                          "Use 'auto' or a positive int dividing both.")
        root = new_kb_folder(path, exist_ok)
        dim = c * (h // r) * (w // r)
        with transaction(root, None) as txn:
            indexes = {st: ix.empty(index_type, dim) for st in settings.stored_steps}
            sums = {st: np.zeros(c * h * w, np.float64) for st in settings.stored_steps}
            txn.commit(stage_derived(txn, empty_manifest(settings, dtype), indexes, sums, index_type, r))
        return cls.open(root, verify="size")

    def append(self, latents: dict[int, Any], prompts: Sequence[str], seeds: Sequence[int], *,
               _before_commit: Callable[[], None] | None = None) -> None:
        """Add n entries: latents {step: [n, C, H, W]} for every stored step, one prompt and seed each.

        Writes a new shard, new index and stats files, then commits the manifest; a crash at
        any point leaves the KB as it was. `_before_commit` is a test hook, called after
        every file is written and before the commit.
        """
        prompts, seeds = list(prompts), list(seeds)
        if len(prompts) != len(seeds):
            raise KBError(f"append got {len(prompts)} prompts and {len(seeds)} seeds; pass one seed per prompt.")
        if not all(isinstance(p, str) for p in prompts) or not all(is_int(s) and -(2**63) <= s < 2**64 for s in seeds):
            raise KBError("prompts must be strings and seeds 64-bit ints. Convert them before appending.")
        seeds = [int(s) for s in seeds]
        if not prompts:
            return
        bad = prompt_problem(prompts)
        if bad is not None:
            raise KBError(f"prompt {bad[0]} of this append {bad[1]}. Pass prompts as plain text (ComfyUI prompts).")
        pairs = list(zip(prompts, seeds))
        with self._lock:
            g = self._gen
            have, seen = g.ids_by_pair(), set()
            for p in pairs:
                if p in have or p in seen:
                    raise KBError(f"prompt {args.short(p[0])} with seed {p[1]} is already in the KB at "
                                  f"{self._path}{'' if p in have else ' (twice in this append)'}. Append only new "
                                  "pairs: filter them with kb.missing(pairs) first.")
                seen.add(p)
            arrays = args.check_latents(latents, prompts, seeds, self.settings.stored_steps, self.latent_shape, self.dtype)
            huge = next(((st, int(r[0])) for st, a in arrays.items() if len(r := bad_rows(a))), None)
            if huge is not None:
                raise KBError(f"latents of step {huge[0]} of entry {huge[1]} hold values beyond +-{MAX_ABS_LATENT:g}, which "
                              "no diffusion latent reaches: drop or regenerate that entry, then append again.")
            m = g.manifest
            if m.legacy:
                check_legacy_indexes(g, "full")  # this commit signs the manifest: it must be a genuine version-1 KB
            with transaction(self._path, m) as txn:
                stem = shard_stem(len(m.shards))
                shard = ShardRecord(txn.write(stem + ".safetensors", safetensors.numpy.save({step_name(st): a for st, a in arrays.items()})),
                                    txn.write(stem + ".entries.json", entries_bytes(pairs)), len(pairs))
                indexes = {st: ix.grow(g.index(st, self._nprobe, self._ef_search), m.index_type,
                                       ix.reduce_keys(arrays[st], m.reduce)) for st in m.settings.stored_steps}
                old = g.require_sums()
                sums = {st: old[st] + arrays[st].reshape(len(pairs), -1).sum(axis=0, dtype=np.float64) for st in old}
                new = stage_derived(txn, m.evolve(shards=(*m.shards, shard), count=m.count + len(pairs)), indexes, sums)
                if _before_commit is not None:
                    _before_commit()
                committed = txn.commit(new)
                mapped = MappedFile(txn.path(shard.data.file), "Restore the file, or rebuild the KB.")
                self._adopt(g.successor(committed, indexes, sums, (mapped, pairs)))

    def rebuild_indexes(self) -> None:
        """Rebuild every index and the stats from the shards (repairs a corrupt index or stats file;
        upgrades a version-1 KB)."""
        with self._lock:
            g = self._gen
            if g.manifest.legacy:
                check_legacy_indexes(g, "full")  # this commit signs the manifest: it must be a genuine version-1 KB
            with transaction(self._path, g.manifest) as txn:
                indexes, sums = derive_from_shards(g)
                committed = txn.commit(stage_derived(txn, g.manifest, indexes, sums))
                self._adopt(g.successor(committed, indexes, sums))

    def set_calibration(self, step: int, calibration: dict) -> None:
        """Store a calibration result for `step` in the manifest (atomic commit)."""
        step = self.check_step(step)
        if not isinstance(calibration, dict):
            raise KBError(f"calibration must be a dict (as returned by retrieval.calibrate), got {type(calibration).__name__}.")
        try:
            data = _canonical_json(calibration)
        except (TypeError, ValueError) as e:
            raise KBError(f"calibration must be a JSON-serialisable dict of finite numbers ({e}). Pass what "
                          "retrieval.calibrate returns.") from None
        cal = load_json(data, name="the calibration", fix="Pass what retrieval.calibrate returns.",
                        max_bytes=MAX_CALIBRATION_BYTES, max_depth=8)
        with self._lock:
            g = self._gen
            if g.problems:
                raise KBError(f"{next(iter(g.problems.values()))} Repair it with rebuild_indexes() before storing a calibration.")
            with transaction(self._path, g.manifest) as txn:
                m = g.manifest.evolve(calibration=freeze({**g.manifest.calibration, step: cal}))
                indexes, sums = dict(g.indexes), g.sums
                if m.legacy:  # the first commit of a version-1 KB rewrites its indexes in this version's format
                    check_legacy_indexes(g, "full")
                    indexes = {st: g.index(st, self._nprobe, self._ef_search) for st in m.settings.stored_steps}
                    m = stage_derived(txn, m, indexes, g.require_sums())
                committed = txn.commit(m)
                self._adopt(g.successor(committed, indexes, sums))

    def _adopt(self, g: Generation) -> None:
        for index in g.indexes.values():
            ix.apply_params(index, self._nprobe, self._ef_search)
        self._gen = g


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, allow_nan=False, sort_keys=True).encode("utf-8")
