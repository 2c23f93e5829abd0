"""Head to head, scored against the converged solution: the pack's methods against the best plain sampler a user has.

    source scripts/env.sh
    $REDI_PYTHON benchmarks/head_to_head.py run --minutes 80 --threads 1   # add items to the store; stops cleanly
    $REDI_PYTHON benchmarks/head_to_head.py report                        # tables, plots, summary.json from the store

`run` adds, for each (regime, workload, method, setting), the items the results store
(benchmarks/results/head_to_head/results.sqlite) does not have, in chunks committed one at a time:
headline cells first (plain euler, the oracle, EasyCache, each pack method at its default), the
wider settings after. `--minutes N` stops after the chunk in flight once N minutes have passed;
Ctrl-C loses at most that chunk; the next run continues where it stopped. `report` renders
head_to_head.md, the frontier plots and summary.json from whatever has accumulated. `calibrate`
computes the KB-calibrated sampler's calibration per regime (resumable; its cells are skipped until
it is stored).

Regimes (benchmarks/h2h/config.py): the shipped large model at T = 20, cfg 3 and cfg 7.5. Workloads
(workloads.py): fresh seeds, the artist's loop, prompt reuse, the paper's protocol. Methods
(benchmarks/h2h/methods/, registry.py). Scoring (scoring.py): per item, MSE to the converged
reference (converged.py), MSE to the user's own euler/normal T run, the judge's feature distance;
NFE counted at the diffusion model's forward pass and checked against each method's claim.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent
if str(PACK) not in sys.path:  # run as a script: benchmarks/ and embedded/ are packages of the pack root
    sys.path.insert(0, str(PACK))

from benchmarks.h2h.config import WORKLOADS, Config  # noqa: E402

RESULTS = PACK / "benchmarks" / "results" / "head_to_head"
SCRATCH = PACK / ".scratch" / "head_to_head"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="add the missing items to the results store, headline cells first")
    run.add_argument("--regimes", default=None, help="comma-separated regime names (default: cfg3,cfg7.5)")
    run.add_argument("--workloads", default=None, help=f"comma-separated subset of {','.join(WORKLOADS)}")
    run.add_argument("--methods", default=None, help="comma-separated registry methods (default: all)")
    run.add_argument("--items", type=int, default=None, help="items per headline cell (default 200)")
    run.add_argument("--wider-items", type=int, default=None, help="items per wider cell (default 64)")
    run.add_argument("--minutes", type=float, default=None, help="stop after the chunk in flight once this much wall "
                     "time has passed (0: after one chunk)")
    run.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default 1: the machine is shared)")
    run.add_argument("--smoke", action="store_true", help="tiny sizes: one T = 6 regime, every method once (CI)")
    cal = sub.add_parser("calibrate", help="compute the KB-calibrated sampler's calibration per regime (resumable)")
    cal.add_argument("--regimes", default=None, help="comma-separated regime names (default: cfg3,cfg7.5)")
    cal.add_argument("--minutes", type=float, default=None, help="stop (finished teachers kept) after this much wall time")
    cal.add_argument("--threads", type=int, default=1)
    cal.add_argument("--smoke", action="store_true")
    for q in (run, cal, sub.add_parser("report", help="render the tables, plots and summary.json from the store")):
        q.add_argument("--out", type=Path, default=RESULTS, help="results folder (holds results.sqlite)")
    for q in (run, cal):
        q.add_argument("--scratch", type=Path, default=SCRATCH, help="KBs, oracle choices, learning KBs (gitignored)")
        q.add_argument("--converged-cache", type=Path, default=None, help="converged references (default benchmarks/.cache)")
    return p


def _subset(text: str | None, known, what: str) -> tuple:
    if text is None:
        return tuple(known)
    got = tuple(x for x in text.split(",") if x)
    unknown = sorted(set(got) - set(known))
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {list(known)}")
    return got


def config_from(a) -> Config:
    if a.smoke and a.out.resolve() == RESULTS.resolve():
        raise SystemExit("--smoke writes tiny, meaningless results: give it --out (a scratch folder), never the "
                         f"committed store in {RESULTS}")
    cfg = Config.smoke_config() if a.smoke else Config()
    cfg.regimes = tuple(r for r in cfg.regimes if r.name in _subset(a.regimes, [r.name for r in cfg.regimes], "regime(s)"))
    if a.command == "calibrate":
        return cfg
    cfg.workloads = _subset(a.workloads, cfg.workloads, "workload(s)")
    if a.items is not None:
        cfg.queries = a.items
    if a.wider_items is not None:
        cfg.wider_items = a.wider_items
    if a.methods is not None:
        cfg.methods = tuple(x for x in a.methods.split(",") if x)
    return cfg


def run(a, argv) -> dict:
    import time

    cfg = config_from(a)
    from embedded.models import cpu_has_fast_bf16, setup_comfy

    setup_comfy(a.threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(a.threads, user_api="blas")
    # ComfyUI (through kb_tools) only from here on: setup_comfy has configured it.
    from benchmarks.h2h.bench import Bench
    from benchmarks.h2h.registry import all_methods
    from benchmarks.h2h.run import Runner
    from benchmarks.h2h.store import RunClock, Store

    if cfg.methods is not None:
        _subset(",".join(cfg.methods), [m.name for m in all_methods()], "method(s)")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("ReDi").setLevel(logging.ERROR)
    clock = RunClock()
    deadline = None if a.minutes is None else time.monotonic() + 60 * a.minutes
    a.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/head_to_head.py " + " ".join(shlex.quote(x) for x in argv)
    with Store(a.out / "results.sqlite") as store:
        run_id = store.start_run(command)
        store.db.execute("CREATE TABLE IF NOT EXISTS run_machine (run_id INTEGER PRIMARY KEY, cores INTEGER, "
                         "bf16 INTEGER, torch_threads INTEGER, loadavg_before TEXT)")
        with store.db:
            store.db.execute("INSERT INTO run_machine VALUES (?, ?, ?, ?, ?)", (run_id, os.cpu_count(),
                             int(cpu_has_fast_bf16()), a.threads, json.dumps([round(x, 2) for x in os.getloadavg()])))
        bench = Bench(cfg, a.scratch / "smoke" if a.smoke else a.scratch, a.converged_cache)
        runner = Runner(bench, store, run_id, cfg, deadline)
        try:
            runner.run(cfg.regimes, cfg.workloads)
        finally:
            wall, cpu = clock.seconds()
            store.finish_run(run_id, wall, cpu)
            store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # one file to commit
            done = {"run_id": run_id, "items_computed": runner.computed, "chunks": runner.chunks,
                    "stopped_by_deadline": runner.stopped, "failed_cells": sorted(" ".join(c) for c in runner.failed),
                    "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}
            print("RUN " + json.dumps(done), flush=True)
    return done


def calibrate(a) -> None:
    """The calibrated sampler's calibration of each regime's KB, stored with it (`run` then samples its cells)."""
    import time

    cfg = config_from(a)
    from embedded.models import setup_comfy

    setup_comfy(a.threads)
    from benchmarks.h2h.bench import Bench
    from benchmarks.h2h.methods import calibrated

    if not calibrated.AVAILABLE:
        raise SystemExit("this kb_tools has no calibrate_sampler: the calibrated sampler's cells cannot run yet")
    from benchmarks.h2h.run import PREPARATIONS_TABLE
    from benchmarks.h2h.store import Store

    deadline = None if a.minutes is None else time.monotonic() + 60 * a.minutes
    bench = Bench(cfg, a.scratch / "smoke" if a.smoke else a.scratch, a.converged_cache)
    for regime in cfg.regimes:
        t0, c0 = time.perf_counter(), time.process_time()
        done = calibrated.calibration(bench, regime, cfg.calibrated_teachers, compute=True,
                                      should_stop=None if deadline is None else lambda: time.monotonic() > deadline)
        # Its cost counts in the benchmark's CPU hours like the oracle grid's and the KBs' (one row per calibrate run).
        with Store(a.out / "results.sqlite") as store, store.db:
            store.db.execute(PREPARATIONS_TABLE)
            store.db.execute("INSERT OR IGNORE INTO preparations VALUES (?, ?, ?, ?)",
                             (regime.name, f"sampler calibration run of {time.strftime('%Y-%m-%d %H:%M:%S')}",
                              time.perf_counter() - t0, time.process_time() - c0))
        print(f"{regime.name}: " + ("stopped; run again to resume" if done is None else "\n".join(
            done.summary().splitlines())), flush=True)
        if done is None:
            break


def report(a) -> dict:
    from benchmarks.h2h.store import Store
    from benchmarks.h2h.writers import write_all

    path = a.out / "results.sqlite"
    if not path.is_file():
        raise SystemExit(f"no results store at {path}; run `head_to_head.py run` first")
    with Store(path) as store:
        return write_all(store, a.out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parser().parse_args(argv)
    if a.command == "calibrate":
        return calibrate(a)
    return run(a, argv) if a.command == "run" else report(a)


if __name__ == "__main__":
    main()
