"""Eviction of whole oldest shards (kb/eviction.py) and `learning.learn` on toy trajectories: the KB stays
valid and within its budget, readers of older generations keep reading, files the KB did not write stay."""

from __future__ import annotations

import os

import numpy as np
import pytest
from kb_crash_helper import chunk_pairs, toy_latents, toy_settings

from kb_tools.core.errors import KBChangedError, KBError
from kb_tools.store import KBBudget, KnowledgeBase, evict_oldest
from kb_tools.store.eviction import shard_sizes, shards_to_drop
from kb_tools.store.learning import learn

CHUNK, STEP = 3, 4


def make_kb(path, chunks: int = 5) -> KnowledgeBase:
    kb = KnowledgeBase.create(path, toy_settings(), dtype="float32")
    for c in range(chunks):
        pairs = chunk_pairs(c, CHUNK)
        kb.append(toy_latents(pairs), [p for p, _ in pairs], [s for _, s in pairs])
    return kb


def stored_files(path) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), path) for d, _, files in os.walk(path) for f in files}


def test_shards_to_drop_counts_whole_oldest_shards():
    sizes = [(3, 300), (3, 300), (2, 200)]
    assert shards_to_drop(sizes, KBBudget()) == 0
    assert shards_to_drop(sizes, KBBudget(max_entries=8)) == 0
    assert shards_to_drop(sizes, KBBudget(max_entries=7)) == 1
    assert shards_to_drop(sizes, KBBudget(max_entries=5)) == 1
    assert shards_to_drop(sizes, KBBudget(max_entries=4)) == 2
    assert shards_to_drop(sizes, KBBudget(max_bytes=500)) == 1
    assert shards_to_drop(sizes, KBBudget(max_bytes=499)) == 2
    assert shards_to_drop(sizes, KBBudget(max_entries=7, max_bytes=300)) == 2
    assert shards_to_drop(sizes, KBBudget(max_entries=1)) == 3  # the newest shard alone is too big: all go


@pytest.mark.parametrize("bad", [{"max_entries": 0}, {"max_entries": -3}, {"max_bytes": 1.5}, {"max_entries": True}])
def test_budget_refuses_nonsense_with_the_fix(bad):
    with pytest.raises(KBError, match="positive integer or None"):
        KBBudget(**bad)


def test_eviction_keeps_the_newest_shards_valid_and_within_budget(tmp_path):
    path = tmp_path / "kb"
    kb = make_kb(path)
    # Files this pack did not write, next to and inside the KB's folders: never touched.
    foreign = {"notes.txt": b"mine", os.path.join("shards", "README"): b"also mine", os.path.join("index", "x.bin"): b"!"}
    for rel, data in foreign.items():
        with open(path / rel, "wb") as f:
            f.write(data)
    old = KnowledgeBase.open(path)  # a reader holding the generation before eviction
    old_first = old.latents(STEP, [0])
    before = stored_files(path)
    dropped = evict_oldest(kb, KBBudget(max_entries=7))
    assert dropped == 9 and len(kb) == 6  # 15 entries in shards of 3: the three oldest shards go
    kept_pairs = chunk_pairs(3, CHUNK) + chunk_pairs(4, CHUNK)
    assert kb.entries == kept_pairs
    assert kb.verify() == []
    fresh = KnowledgeBase.open(path, verify="full")
    assert fresh.entries == kept_pairs and fresh.verify() == []
    want = toy_latents(kept_pairs)
    for st in kb.stored_steps:
        np.testing.assert_array_equal(fresh.latents(st, np.arange(6)), want[st])
    ids, dist = fresh.search(STEP, want[STEP][4:5], 1)
    assert ids[0, 0] == 4 and dist[0, 0] < 1e-3  # the index was rebuilt over the kept entries, ids renumbered
    np.testing.assert_allclose(fresh.mean_key(STEP), want[STEP].reshape(6, -1).mean(0), rtol=1e-5, atol=1e-5)
    # No stored file was rewritten: the kept shards are the same files.
    assert {s for s in stored_files(path) if s.startswith("shards")} <= {s for s in before if s.startswith("shards")}
    # The next commit collects the dropped shards (the replaced generation's readers no longer need their names)...
    pairs = chunk_pairs(5, CHUNK)
    fresh.append(toy_latents(pairs), [p for p, _ in pairs], [s for _, s in pairs])
    shards_now = {s for s in stored_files(path) if s.startswith("shards") and s.endswith(".safetensors")}
    assert len(shards_now) == 3
    # ... while the old reader still reads its mapped shards, and foreign files are all there.
    np.testing.assert_array_equal(old.latents(STEP, [0]), old_first)
    for rel, data in foreign.items():
        with open(path / rel, "rb") as f:
            assert f.read() == data


def test_eviction_by_bytes_and_down_to_empty(tmp_path):
    kb = make_kb(tmp_path / "kb", chunks=4)
    sizes = shard_sizes(kb)
    evict_oldest(kb, KBBudget(max_bytes=sum(b for _, b in sizes[-2:])))
    assert len(kb) == 6 and kb.verify() == []
    assert evict_oldest(kb, KBBudget(max_bytes=1)) == 6
    assert len(kb) == 0 and kb.verify() == []
    reopened = KnowledgeBase.open(tmp_path / "kb", verify="full")
    assert len(reopened) == 0 and reopened.verify() == []
    pairs = chunk_pairs(9, CHUNK)
    reopened.append(toy_latents(pairs), [p for p, _ in pairs], [s for _, s in pairs])  # an emptied KB grows again
    assert reopened.entries == pairs and reopened.verify() == []


def test_stored_calibration_survives_eviction(tmp_path):
    kb = make_kb(tmp_path / "kb")
    kb.set_calibration(STEP, {"h": 2, "centered_p95": 0.3, "n": 15})
    evict_oldest(kb, KBBudget(max_entries=6))
    assert KnowledgeBase.open(tmp_path / "kb").calibration(STEP) == {"h": 2, "centered_p95": 0.3, "n": 15}


def test_eviction_by_a_stale_kb_object_is_refused_with_reopen(tmp_path):
    kb = make_kb(tmp_path / "kb")
    other = KnowledgeBase.open(tmp_path / "kb")
    pairs = chunk_pairs(7, CHUNK)
    other.append(toy_latents(pairs), [p for p, _ in pairs], [s for _, s in pairs])
    with pytest.raises(KBChangedError, match="Reopen it and retry"):
        evict_oldest(kb, KBBudget(max_entries=3))
    assert KnowledgeBase.open(tmp_path / "kb").verify() == []


def test_learn_creates_on_first_use_skips_stored_pairs_and_evicts(tmp_path):
    path = str(tmp_path / "learned")
    budget = KBBudget(max_entries=7)
    first = chunk_pairs(0, CHUNK)
    r = learn(path, toy_settings(), toy_latents(first), [p for p, _ in first], [s for _, s in first], budget, dtype="float32")
    assert (r.added, r.already_present, r.evicted, r.count) == (3, 0, 0, 3)
    again = first[1:] + chunk_pairs(1, CHUNK)  # two already stored, three new
    r = learn(path, toy_settings(), toy_latents(again), [p for p, _ in again], [s for _, s in again], budget, dtype="float32")
    assert (r.added, r.already_present, r.evicted, r.count) == (3, 2, 0, 6)
    third = chunk_pairs(2, CHUNK)
    r = learn(path, toy_settings(), toy_latents(third), [p for p, _ in third], [s for _, s in third], budget, dtype="float32")
    assert (r.added, r.evicted, r.count) == (3, 3, 6) and "evicted the 3 oldest" in r.summary()
    kb = KnowledgeBase.open(path, verify="full")
    assert kb.entries == chunk_pairs(1, CHUNK) + third and kb.verify() == []
    np.testing.assert_array_equal(kb.latents(STEP, np.arange(6)), toy_latents(kb.entries)[STEP])


def test_learn_refuses_what_cannot_fit_or_match(tmp_path):
    pairs = chunk_pairs(0, CHUNK)
    with pytest.raises(KBError, match="raise max_entries"):
        learn(str(tmp_path / "a"), toy_settings(), toy_latents(pairs), [p for p, _ in pairs], [s for _, s in pairs],
              KBBudget(max_entries=2))
    with pytest.raises(KBError, match="no states for stored step"):
        learn(str(tmp_path / "a"), toy_settings(), toy_latents(pairs, steps=[2, 4]), [p for p, _ in pairs],
              [s for _, s in pairs])
    learn(str(tmp_path / "a"), toy_settings(), toy_latents(pairs), [p for p, _ in pairs], [s for _, s in pairs])
    with pytest.raises(KBError, match="different settings"):
        learn(str(tmp_path / "a"), toy_settings(cfg=5.0), toy_latents(pairs), [p for p, _ in pairs], [s for _, s in pairs])


def test_a_learn_waits_for_a_writer_and_stores_after_its_commit(tmp_path):
    """The writer lock is held from learn's decision to its commit: another writer's commit meanwhile is waited for,
    never a refusal (a writer committing in a loop cannot starve a learn)."""
    import threading

    from kb_tools.store.transaction import writer_lock

    path = str(tmp_path / "learned")
    first = chunk_pairs(0, CHUNK)
    learn(path, toy_settings(), toy_latents(first), [p for p, _ in first], [s for _, s in first], dtype="float32")
    mine, theirs = chunk_pairs(1, CHUNK), chunk_pairs(2, CHUNK)
    reports = []
    other = KnowledgeBase.open(path)
    with writer_lock(path):
        thread = threading.Thread(target=lambda: reports.append(
            learn(path, toy_settings(), toy_latents(mine + theirs[:1]), [p for p, _ in mine + theirs[:1]],
                  [s for _, s in mine + theirs[:1]], dtype="float32")))
        thread.start()  # it opens the KB (most likely before the commit below), then waits for the lock
        thread.join(0.5)
        assert thread.is_alive() and not reports  # another thread waits for the lock as another process would
        with writer_lock(path):  # reentrant in this thread: the append takes it again
            other.append(toy_latents(theirs), [p for p, _ in theirs], [s for _, s in theirs])
    thread.join(600)  # a safety net, not a speed requirement
    assert len(reports) == 1 and (reports[0].added, reports[0].already_present, reports[0].count) == (3, 1, 9)
    kb = KnowledgeBase.open(path, verify="full")
    assert kb.entries == first + theirs + mine and kb.verify() == []
