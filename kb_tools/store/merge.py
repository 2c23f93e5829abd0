"""Merging KBs: `merge` makes a new KB of several, `merge_into` adds several to an existing one.

Shards are hard-linked (copied where links are impossible), indexes and stats rebuilt or grown;
a crash leaves every KB as it was.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..core.errors import KBError, KBMismatchError
from ..core.records import Difference, describe_differences, differences
from . import arguments as args
from . import index as ix
from .commits import derive_from_shards, empty_manifest, keys_and_sums, new_kb_folder, stage_derived
from .files import check_kb_path
from .format import INDEX_DIR, LOCK_FILE, SHARDS_DIR, ShardRecord, shard_stem
from .knowledge_base import KnowledgeBase
from .transaction import transaction


def _check_sources(base: KnowledgeBase, sources: Sequence[KnowledgeBase], owner: dict[tuple[str, int], str]) -> None:
    """Refuse a source built with other settings or dtype than `base`, or holding an entry `owner` already has."""
    for src in sources:
        diffs = differences(base.settings.to_dict(), src.settings.to_dict())
        if src.dtype != base.dtype:
            diffs.append(Difference("dtype", base.dtype, src.dtype))
        if diffs:
            raise KBMismatchError(f"Cannot merge {src.path} with {base.path}: they differ in "
                                  f"{describe_differences(diffs, base.path, src.path)}. Merge only KBs built with "
                                  "the same settings; rebuild one of them to match.")
        for p in src._gen.entries:
            if p in owner:
                raise KBError(f"prompt {args.short(p[0])} with seed {p[1]} is in both {owner[p]} and {src.path}. "
                              "Remove it from one source (rebuild that source without it) before merging.")
            owner[p] = src.path


def merge(out_path: str, sources: Sequence[str | KnowledgeBase], *, exist_ok: bool = False) -> KnowledgeBase:
    """A new KB holding every entry of `sources`; shards are hard-linked, indexes and stats rebuilt."""
    check_kb_path(out_path)
    if isinstance(sources, (str, bytes, os.PathLike)) or not sources:
        raise KBError("merge needs a list of at least one source KB path.")
    kbs = [s if isinstance(s, KnowledgeBase) else KnowledgeBase.open(s) for s in sources]
    first = kbs[0]
    _check_sources(first, kbs, {})
    root = new_kb_folder(out_path, exist_ok)
    made = [d for d in (root, os.path.join(root, SHARDS_DIR), os.path.join(root, INDEX_DIR)) if not os.path.exists(d)]
    gens = [kb._gen for kb in kbs]
    try:
        with transaction(root, None) as txn:
            shards = []
            for g in gens:
                for s in g.manifest.shards:
                    stem = shard_stem(len(shards))
                    shards.append(ShardRecord(txn.link(g.path(s.data.file), stem + ".safetensors", s.data),
                                              txn.link(g.path(s.entries.file), stem + ".entries.json", s.entries), s.count))
            m = empty_manifest(first.settings, first.dtype).evolve(
                shards=tuple(shards), count=sum(s.count for s in shards), indexes=gens[0].manifest.indexes)
            indexes, sums = derive_from_shards(*gens)
            txn.commit(stage_derived(txn, m, indexes, sums))
    except BaseException:
        _remove_new_folders(root, made)
        raise
    return KnowledgeBase.open(root, verify="size")


def merge_into(target: str | KnowledgeBase, sources: Sequence[str | KnowledgeBase]) -> KnowledgeBase:
    """Add every entry of `sources` to the existing KB `target` in one commit; shards hard-linked, indexes grown.

    What `merge` does for a new KB, for one that already holds entries (a distributed build's
    shards joining the KB a previous run finished). A crash leaves `target` as it was.
    """
    kb = target if isinstance(target, KnowledgeBase) else KnowledgeBase.open(target)
    if isinstance(sources, (str, bytes, os.PathLike)) or not sources:
        raise KBError("merge_into needs a list of at least one source KB path.")
    kbs = [s if isinstance(s, KnowledgeBase) else KnowledgeBase.open(s) for s in sources]
    _check_sources(kb, kbs, {p: kb.path for p in kb._gen.entries})
    with kb._lock:
        g = kb._gen
        m = g.manifest
        with transaction(kb._path, m) as txn:
            shards = list(m.shards)
            for src in kbs:
                for s in src._gen.manifest.shards:
                    stem = shard_stem(len(shards))
                    shards.append(ShardRecord(txn.link(src._gen.path(s.data.file), stem + ".safetensors", s.data),
                                              txn.link(src._gen.path(s.entries.file), stem + ".entries.json", s.entries), s.count))
            indexes, sums = {}, {}
            for st in m.settings.stored_steps:
                sums[st] = g.require_sums()[st].copy()
                chunks = (c for src in kbs for c in src._gen.key_chunks(st))
                keys = list(keys_and_sums(chunks, m.reduce, sums[st]))
                index = g.index(st, kb._nprobe, kb._ef_search)
                indexes[st] = ix.grow(index, m.index_type, np.concatenate(keys)) if keys else index
            new = m.evolve(shards=tuple(shards), count=sum(s.count for s in shards))
            txn.commit(stage_derived(txn, new, indexes, sums))
    return KnowledgeBase.open(kb._path, verify="size")


def _remove_new_folders(root: str, made: list[str]) -> None:
    """Undo the folders a failed merge created (the transaction already removed its files): only empty ones."""
    if root in made:
        try:
            os.remove(os.path.join(root, LOCK_FILE))
        except OSError:
            pass
    for d in reversed(made):
        try:
            os.rmdir(d)
        except OSError:
            pass
