"""Keep a KB within a size budget by dropping its oldest shards whole: no stored file is rewritten.

Every append writes one new shard at the end of the manifest's list, so the first shards hold
the oldest entries. Eviction commits a manifest without them (indexes and key sums rebuilt
from the shards that stay, entry ids renumbered from 0) through the one write path
(transaction.py); the dropped files are then deleted by the cleanup after the commit (gc.py:
own names only, and only files that neither the new generation nor the one it replaced
names), so a reader that still holds an older generation keeps reading its mapped shards.

The budget counts the stored trajectories: a shard's latents file plus its entries file (what
`KnowledgeBase.info()["bytes"]` reports, plus the small entries files). The index and stats
files are derived from those entries and shrink with them.

Stored calibrations (the residual guard's percentile, the blend-error model) are kept as they
are: they were measured on the entries of their time and say how many (`n` / `kb_count`);
recalibrate a KB that changed a lot (`python -m kb_tools calibrate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import KBError
from . import index as ix
from .commits import keys_and_sums, stage_derived
from .generation import Generation
from .knowledge_base import KnowledgeBase
from .settings import is_int
from .transaction import transaction


@dataclass(frozen=True)
class KBBudget:
    """The most a KB may hold: entries and/or bytes of stored trajectories (None: no limit)."""

    max_entries: int | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_entries", "max_bytes"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 1):
                raise KBError(f"{name} must be a positive integer or None (no limit), got {v!r}. "
                              f"Give e.g. {name}={10_000 if name == 'max_entries' else 2**30}.")

    def allows(self, entries: int, nbytes: int) -> bool:
        return (self.max_entries is None or entries <= self.max_entries) and \
            (self.max_bytes is None or nbytes <= self.max_bytes)

    def describe(self) -> str:
        parts = ([f"{self.max_entries} entries"] if self.max_entries is not None else []) + \
            ([f"{self.max_bytes / 2**20:.4g} MiB"] if self.max_bytes is not None else [])
        return " and ".join(parts) if parts else "no limit"


def shards_to_drop(sizes: list[tuple[int, int]], budget: KBBudget) -> int:
    """How many of the first shards (sizes: (entries, bytes) per shard, oldest first) to drop to fit `budget`."""
    entries, nbytes = sum(n for n, _ in sizes), sum(b for _, b in sizes)
    drop = 0
    while drop < len(sizes) and not budget.allows(entries, nbytes):
        entries, nbytes = entries - sizes[drop][0], nbytes - sizes[drop][1]
        drop += 1
    return drop


def shard_sizes(kb: KnowledgeBase) -> list[tuple[int, int]]:
    """(entries, bytes of latents + entries file) of each shard of the generation `kb` holds, oldest first."""
    return [(s.count, s.data.bytes + s.entries.bytes) for s in kb._gen.manifest.shards]


def evict_oldest(kb: KnowledgeBase, budget: KBBudget) -> int:
    """Drop the oldest shards of `kb` in one commit until it fits `budget`; returns the entries dropped.

    `kb` then answers from the new generation. A KB whose newest shard alone exceeds the budget
    ends up empty. Raises KBChangedError when another process committed since `kb` was opened
    (reopen and retry).
    """
    if not isinstance(budget, KBBudget):
        raise KBError(f"budget must be a KBBudget, got {type(budget).__name__}. Build one with KBBudget(max_entries=...).")
    with kb._lock:
        g = kb._gen
        m = g.manifest
        drop = shards_to_drop(shard_sizes(kb), budget)
        if drop == 0:
            return 0
        keep = m.shards[drop:]
        rec = m.indexes[0]
        with transaction(kb.path, m) as txn:
            indexes, sums = {}, {}
            for st in m.settings.stored_steps:
                sums[st] = np.zeros(g.D, np.float64)
                indexes[st] = ix.build(m.index_type, rec.dim, keys_and_sums(g.key_chunks(st, drop), m.reduce, sums[st]))
            new = stage_derived(txn, m.evolve(shards=keep, count=sum(s.count for s in keep)), indexes, sums)
            committed = txn.commit(new)
            # Map the kept shards afresh under the writer lock (their ids start at 0 now); the
            # indexes and sums just built are this generation's.
            fresh = Generation.load(kb.path, committed, "size")
            fresh.indexes, fresh.sums = dict(indexes), sums
        kb._adopt(fresh)
        return sum(s.count for s in m.shards[:drop])

