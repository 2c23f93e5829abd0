"""A knowledge base that learns from the user's own generations: append what was sampled in full, evict the oldest.

After a generation, the trajectories that ran every step from noise with the KB's recipe (a
plain run, or the ReDi items the guard refused) are appended to the KB at `path`, created on
first use; a blended trajectory never is, so retrieval only ever blends states the sampler
really reached. Then whole oldest shards are dropped until the KB fits its budget
(kb/eviction.py). No ComfyUI here: the sampling side is `redi.generate_learning`.

Other processes may append to the same KB meanwhile (two ComfyUI prompts, a build): each
learn holds the KB's writer lock from deciding which pairs are new to its last commit, reopening
the KB first where another writer committed since it was opened, so nothing is lost, no pair is
stored twice, and a writer that commits in a loop cannot starve it (it waits its turn).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..core.errors import KBChangedError, KBError
from . import KBBudget, KBSettings, KnowledgeBase, evict_oldest, open_or_create
from .transaction import writer_lock


@dataclass(frozen=True)
class LearnReport:
    """What one `learn` call did to the KB."""

    path: str
    added: int  # trajectories appended
    already_present: int  # (prompt, seed) pairs the KB held already (not appended twice)
    evicted: int  # entries dropped with the oldest shards
    count: int  # entries in the KB after this call
    budget: KBBudget

    def summary(self) -> str:
        return (f"learning KB {self.path}: learned {self.added} trajectory(ies)"
                + (f" ({self.already_present} already stored)" if self.already_present else "")
                + (f", evicted the {self.evicted} oldest" if self.evicted else "")
                + f"; {self.count} stored (budget {self.budget.describe()})")


def learn(path: str, settings: KBSettings, states: dict[int, Any], prompts: Sequence[str], seeds: Sequence[int],
          budget: KBBudget = KBBudget(), *, dtype: str = "float16") -> LearnReport:
    """Append fully sampled trajectories to the KB at `path` (created with `settings` on first use), then evict to `budget`.

    states: {stored step: [n, C, H, W]} in LATENT-dict space, one row per (prompts[i], seeds[i]),
    every row sampled in full from its seed's noise with the KB's recipe (never a blend). Pairs
    already stored are skipped. The KB must hold `settings` (else KBMismatchError naming the
    differences).
    """
    if not isinstance(budget, KBBudget):
        raise KBError(f"budget must be a KBBudget, got {type(budget).__name__}. Build one with KBBudget(max_entries=...).")
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) != len(seeds):
        raise KBError(f"learn got {len(prompts)} prompts and {len(seeds)} seeds; pass one seed per trajectory.")
    if budget.max_entries is not None and len(set(zip(prompts, seeds))) > budget.max_entries:
        raise KBError(f"one generation of {len(prompts)} trajectories exceeds the learning budget of {budget.max_entries} "
                      "entries; raise max_entries or generate smaller batches.")
    missing_steps = [st for st in settings.stored_steps if st not in states]
    if missing_steps:
        raise KBError(f"learn got no states for stored step(s) {missing_steps}; keep every stored step of the KB "
                      f"({list(settings.stored_steps)}) while sampling.")
    kb = open_or_create(path, settings, dtype=dtype)
    with writer_lock(kb.path):
        try:
            return _append_and_evict(kb, prompts, seeds, states, budget)
        except KBChangedError:
            # Another writer committed after we opened the KB and before we took the lock; none can now. Sizes only:
            # the generation we held was verified.
            return _append_and_evict(KnowledgeBase.open(kb.path, verify="size"), prompts, seeds, states, budget)


def _append_and_evict(kb: KnowledgeBase, prompts: list[str], seeds: list[int], states: dict[int, Any],
                      budget: KBBudget) -> LearnReport:
    """Append the pairs `kb` lacks, then evict to `budget` (KBChangedError where another writer committed since `kb`)."""
    rows = _new_rows(kb, list(zip(prompts, seeds)))
    if rows:
        kb.append({st: states[st][rows] for st in kb.stored_steps}, [prompts[i] for i in rows], [seeds[i] for i in rows])
    evicted = evict_oldest(kb, budget)
    return LearnReport(kb.path, len(rows), len(prompts) - len(rows), evicted, len(kb), budget)


def _new_rows(kb: KnowledgeBase, pairs: list[tuple[str, int]]) -> list[int]:
    """Indices of the pairs the KB lacks, each pair's first occurrence only."""
    todo, rows = set(kb.missing(pairs)), []
    for i, p in enumerate(pairs):
        if p in todo:
            todo.remove(p)
            rows.append(i)
    return rows
