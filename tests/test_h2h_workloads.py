"""The head-to-head workloads (benchmarks/h2h/workloads.py): the artist's loop ("iterate") is sessions of small
prompt changes, each from one fixed seed of the user's (never the KB's, never another workload's), in generation order.
Item i is the same query whatever the number of items (the results store keys items by index). Pure captions and
seeds, no model."""
from __future__ import annotations

import dataclasses

from benchmarks.h2h import workloads
from benchmarks.h2h.config import WORKLOADS, Config, Regime


def test_iterate_is_sessions_of_nudges_from_the_users_own_seeds():
    cfg, regime = Config(queries=30), Regime("T20")
    q = workloads.make(cfg, regime, "iterate")
    assert "iterate" in WORKLOADS and q.workload == "iterate" and len(q) == 30
    assert q.prompts == tuple(c.prompt() for c in q.captions)
    sessions = [list(range(s, min(s + cfg.iterate_session, 30))) for s in range(0, 30, cfg.iterate_session)]
    assert [len(s) for s in sessions] == [12, 12, 6]
    seeds = [q.seeds[s[0]] for s in sessions]
    assert len(set(seeds)) == 3 and all(q.seeds[i] == seed for s, seed in zip(sessions, seeds) for i in s)
    foreign = set(workloads.make(cfg, regime, "heldout_foreign").seeds) | set(workloads.selection(cfg).seeds)
    assert regime.kb_seed not in seeds and not foreign & set(seeds)
    for s in sessions:
        for a, b in zip(s, s[1:]):  # each generation is the previous caption changed a little
            prev, cur = q.captions[a], q.captions[b]
            assert cur.source == prev.source and cur != prev
            assert abs(cur.cx - prev.cx) <= cfg.reuse_shift + 0.011 and abs(cur.cy - prev.cy) <= cfg.reuse_shift + 0.011
            assert abs(cur.sepia - prev.sepia) <= cfg.reuse_sepia + 1e-9
    starts = {q.captions[s[0]] for s in sessions}  # new held-out captions, not the held-out workloads' own
    assert not starts & set(workloads.make(cfg, regime, "heldout_fixed").captions)


def test_iterate_grows_in_order_and_the_learning_benchmark_uses_the_same_loop():
    cfg, regime = Config(queries=30), Regime("T20")
    longer = workloads.make(dataclasses.replace(cfg, queries=40), regime, "iterate")
    assert longer.prompts[:30] == workloads.make(cfg, regime, "iterate").prompts  # more queries only append sessions
    from benchmarks.learning_kb import iterate_workload
    prompts, seeds = iterate_workload(25, 10, cfg, 7)
    assert prompts == [c.prompt() for c in workloads.artist_loop(25, 10, cfg, "train")] and seeds == [7] * 25


def test_item_i_is_the_same_query_whatever_the_number_of_items():
    """The results store keys an item by its index: a longer query set only appends, on every workload."""
    regime = Regime("cfg3")
    for name in WORKLOADS:
        short, longer = (workloads.make(Config(queries=n), regime, name) for n in (20, 45))
        assert longer.prompts[:20] == short.prompts and longer.seeds[:20] == short.seeds, name
        sub = longer.subset([3, 1, 40])
        assert sub.prompts == tuple(longer.prompts[i] for i in (3, 1, 40)) and sub.seeds[2] == longer.seeds[40]
    selection = set(workloads.selection(Config()).prompts)
    for name in WORKLOADS:  # the oracle's selection captions are never evaluation queries
        assert not selection & set(workloads.make(Config(queries=60), regime, name).prompts), name
