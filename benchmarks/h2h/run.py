"""The resumable run: for each (regime, workload, method, setting), the items the results store does not have, in chunks.

Order: the headline cells first (plain euler, the oracle, EasyCache and each pack method at its
default: `Setting.default`), up to `Config.queries` items; the wider settings after, up to
`Config.wider_items`. Within a phase the items grow in rounds of one chunk for every regime,
workload and cell, so every cell fills at the same pace and a run stopped at any time leaves a
balanced table. Each chunk is sampled, scored (scoring.py against converged.py's references) and
committed in one transaction (store.py): a stopped or killed run loses at most the chunk in flight,
and nothing stored is recomputed.

A method whose items depend on the earlier ones (a learning KB: `Method.sequential`) runs its
items in generation order against state on disk (Bench.learning_folder). Its progress file says
how many items that state has seen and whether a chunk was in flight; where it disagrees with the
store (a run stopped between the KB's update and the commit), the state is rebuilt
deterministically by replaying the stored items, whose results are discarded.

Every method's counted NFE is checked against what it claims; a method that miscounts or fails is
reported (the `failures` table) and skipped for the rest of the run, never stored.
"""
from __future__ import annotations

import datetime as _dt
import json
import shutil
import time
import traceback

import numpy as np

from . import oracle, scoring, workloads
from .registry import Pending, Plan, all_methods
from .store import Row

_FAILURES = """CREATE TABLE IF NOT EXISTS failures (run_id INTEGER, regime TEXT, workload TEXT, method TEXT, setting TEXT,
first_item INTEGER, error TEXT, date TEXT)"""
#: One-time costs a run found or paid (the oracle's grid, a KB's build), so the CPU hours include them.
PREPARATIONS_TABLE = """CREATE TABLE IF NOT EXISTS preparations (regime TEXT, what TEXT, wall_seconds REAL, cpu_seconds REAL,
PRIMARY KEY (regime, what))"""
#: Each item's converged reference's doubling gap (MSE between its N- and 2N-step outputs): the reference's own error.
_GAPS = """CREATE TABLE IF NOT EXISTS converged_gaps (regime TEXT, workload TEXT, item INTEGER, gap REAL,
PRIMARY KEY (regime, workload, item))"""
#: Families that sample without the regime's prebuilt KB.
NO_KB_FAMILIES = ("plain", "oracle", "cache", "tstitch", "learning")
#: What the report needs to know of a cell beyond its rows (written for the whole plan when a run starts).
_SETTINGS = """CREATE TABLE IF NOT EXISTS settings (regime TEXT, workload TEXT, method TEXT, setting TEXT, family TEXT,
line TEXT, is_default INTEGER, params TEXT, PRIMARY KEY (regime, workload, method, setting))"""


def claim_check(out, counted: dict[str, np.ndarray]) -> tuple[bool, str]:
    """(ok, what differs): the method's claimed NFE per item and role against the forward-pass count."""
    if out.claim is None:
        return True, "no claim"
    problems = []
    for role, claimed in out.claim.items():
        got = counted[role]
        bad = got != claimed if out.claim_kind == "exact" else got > claimed
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            problems.append(f"{role}: item {i} counted {int(got[i])}, claimed {'' if out.claim_kind == 'exact' else '<= '}"
                            f"{int(claimed[i])}")
    return not problems, "; ".join(problems) or "ok"


class Runner:
    """One run over a store: call `run(regimes, workloads)`; `computed` items were sampled by it, `stopped` says whether
    the deadline ended it before everything asked for was stored."""

    def __init__(self, bench, store, run_id: int, cfg, deadline: float | None = None, log=print):
        self.bench, self.store, self.run_id, self.cfg, self.deadline, self.log = bench, store, run_id, cfg, deadline, log
        self.computed = 0
        self.chunks = 0
        self.stopped = False
        self.failed: set[tuple] = set()
        self.pending: set[tuple] = set()
        self._oracles: dict[str, dict] = {}
        self._queries: dict[tuple, workloads.Queries] = {}
        self._memo: dict[tuple, tuple] = {}
        store.db.execute(_FAILURES)
        store.db.execute(_SETTINGS)
        store.db.execute(PREPARATIONS_TABLE)
        store.db.execute(_GAPS)

    # ------------------------------------------------------------------ what to run
    def oracle(self, regime) -> dict:
        if regime.name not in self._oracles:
            got = oracle.select(self.bench, self.cfg, regime, self.bench.scratch, self.log)
            self._oracles[regime.name] = got
            self._prepared(regime, "oracle grid", got["wall_seconds"], got["cpu_seconds"])
        return self._oracles[regime.name]

    def _prepared(self, regime, what: str, wall: float, cpu: float) -> None:
        with self.store.db:
            self.store.db.execute("INSERT OR IGNORE INTO preparations VALUES (?, ?, ?, ?)", (regime.name, what, wall, cpu))

    def queries(self, regime, workload: str) -> workloads.Queries:
        key = (regime.name, workload)
        if key not in self._queries:
            self._queries[key] = workloads.make(self.cfg, regime, workload)
        return self._queries[key]

    def cells(self, regime, workload: str, phase: str) -> list[tuple]:
        """(method, setting) of one phase ("headline": the defaults; "wider": the others) on one workload."""
        plan = Plan(self.cfg, regime, workload, tuple(regime.budgets), "smoke" if self.cfg.smoke else "full",
                    self.oracle(regime)["winners"])
        out = []
        for method in all_methods():
            if workload not in method.workloads or (self.cfg.methods is not None and method.name not in self.cfg.methods):
                continue
            for setting in method.settings(plan):
                if setting.default == (phase == "headline"):
                    out.append((method, setting))
        return out

    # ------------------------------------------------------------------ running
    def run(self, regimes, workload_names) -> None:
        phases = (("headline", self.cfg.queries), ("wider", min(self.cfg.wider_items, self.cfg.queries)))
        for regime in regimes:  # the whole plan up front, so the report's progress counts the cells not started yet
            for workload in workload_names:
                for phase, _ in phases:
                    for method, setting in self.cells(regime, workload, phase):
                        self._register(regime, workload, method, setting)
        for phase, target in phases:
            for start in range(0, target, self.cfg.chunk):
                items = list(range(start, min(start + self.cfg.chunk, target)))
                for regime in regimes:
                    for workload in workload_names:
                        if self.chunks and not self._time_left():  # no new preparation (an oracle grid) past the deadline
                            self.stopped = True
                            return
                        self._memo.clear()
                        for method, setting in self.cells(regime, workload, phase):
                            if not self.chunk(regime, workload, method, setting, items):
                                return

    def _register(self, regime, workload: str, method, setting) -> None:
        with self.store.db:
            self.store.db.execute("INSERT OR IGNORE INTO settings VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                  (regime.name, workload, method.name, setting.label, method.family, setting.line,
                                   int(setting.default), json.dumps(setting.params, sort_keys=True, default=str)))

    def _time_left(self) -> bool:
        return self.deadline is None or time.monotonic() < self.deadline

    def chunk(self, regime, workload: str, method, setting, items: list[int]) -> bool:
        """Sample, score and commit the missing items of one cell's chunk. False: the run must stop (deadline)."""
        cell = (regime.name, workload, method.name, setting.label)
        if cell in self.failed or cell in self.pending:
            return True
        done = self.store.done([(*cell, i) for i in items])
        missing = [i for i in items if (*cell, i) not in done]
        if not missing:
            return True
        if self.chunks and not self._time_left():  # every run computes at least one chunk (--minutes 0: exactly one)
            self.stopped = True
            return False
        queries = self.queries(regime, workload)
        if method.sequential:
            missing = list(range(missing[0], items[-1] + 1))
            self._prepare_state(regime, workload, method, setting, missing[0], queries)
        sub = queries.subset(missing)
        t0 = time.perf_counter()
        try:
            if method.family not in NO_KB_FAMILIES:
                kb = self.bench.kb(regime)  # built (or loaded) outside the counting session: no item pays for it
                self._prepared(regime, f"KB {kb.name}", kb.build_wall_seconds, kb.build_cpu_seconds)
            out, m = self._sample(regime, workload, method, setting, sub, tuple(missing))
            ok, why = claim_check(out, m.nfe)
            if not ok:
                raise RuntimeError(f"counted NFE differs from the method's claim: {why}")
        except Pending as e:  # its preparation has its own command: skip, say so once
            self.pending.add(cell)
            self.log(f"  {' '.join(cell)}: skipped, {e}", flush=True)
            return True
        except Exception as e:  # a method that cannot run here is a result: say exactly why, store nothing
            self._fail(cell, missing[0], e)
            return True
        converged = self.bench.converged(regime, sub)
        conv = converged.latents
        with self.store.db:
            self.store.db.executemany("INSERT OR IGNORE INTO converged_gaps VALUES (?, ?, ?, ?)",
                                      [(regime.name, workload, i, float(g)) for i, g in zip(missing, converged.gaps)])
        full = self.bench.full_step(regime, sub)
        sc = scoring.score(self.bench.judge, out.latents, conv, full)
        nfe = self.bench.cost_nfe(m)
        rows = [Row(*cell, item=i, nfe=float(nfe[j]), mse_converged=float(sc.mse_converged[j]),
                    mse_full_step=float(sc.mse_full_step[j]), feature_distance=float(sc.feature_distance[j]))
                for j, i in enumerate(missing)]
        added = self.store.add(rows, self.run_id)
        if method.sequential:
            self._write_state(regime, workload, method, setting, missing[-1] + 1, clean=True)
        self.computed += len(missing)
        self.chunks += 1
        self.log(f"  {regime.name} {workload} {method.name} [{setting.label}] items {missing[0]}-{missing[-1]}: "
                 f"NFE {float(nfe.mean()):.2f}, MSE to converged {float(np.mean(sc.mse_converged)):.3g} "
                 f"({added} stored, {time.perf_counter() - t0:.0f} s)", flush=True)
        return True

    def _sample(self, regime, workload, method, setting, sub, items: tuple):
        """(Output, Measured) of one chunk; settings with one run_key sample once per chunk."""
        key = (regime.name, workload, setting.run_key, items) if setting.run_key is not None else None
        if key is not None and key in self._memo:
            return self._memo[key]
        with self.bench.measure(len(sub)) as m:
            out = method.run(self.bench, regime, sub, setting)
        if key is not None:
            self._memo[key] = (out, m)
        return out, m

    def _fail(self, cell: tuple, first_item: int, e: Exception) -> None:
        self.failed.add(cell)
        text = f"{type(e).__name__}: {e}"
        self.log(f"  {' '.join(cell)}: FAILED {text}\n{traceback.format_exc(limit=3)}", flush=True)
        with self.store.db:
            self.store.db.execute("INSERT INTO failures VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                  (self.run_id, *cell, first_item, text,
                                   _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")))

    # ------------------------------------------------------------------ learning state
    def _progress(self, regime, workload, method, setting):
        return self.bench.learning_folder(regime, workload, method.name, setting.label) / "progress.json"

    def _write_state(self, regime, workload, method, setting, items: int, clean: bool) -> None:
        path = self._progress(regime, workload, method, setting)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"items": items, "clean": clean}))
        tmp.replace(path)

    def _prepare_state(self, regime, workload, method, setting, first: int, queries) -> None:
        """Make the method's on-disk state the one after items 0..first-1 (as stored), then mark a chunk in flight."""
        folder = self.bench.learning_folder(regime, workload, method.name, setting.label)
        path = self._progress(regime, workload, method, setting)
        state = json.loads(path.read_text()) if path.is_file() else None
        if state != {"items": first, "clean": True}:
            shutil.rmtree(folder, ignore_errors=True)
            if first:
                self.log(f"  {regime.name} {workload} {method.name}: rebuilding its state from the {first} stored items "
                         f"(found {state})", flush=True)
                for s in range(0, first, self.cfg.chunk):
                    with self.bench.measure(min(self.cfg.chunk, first - s)):
                        method.run(self.bench, regime, queries.subset(range(s, min(s + self.cfg.chunk, first))), setting)
        self._write_state(regime, workload, method, setting, first, clean=False)
