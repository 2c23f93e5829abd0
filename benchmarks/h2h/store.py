"""The results store of the converged-reference benchmark: per-item results in SQLite, for runs that resume and accumulate.

One row per (regime, workload, method, setting, item) holds the item's counted NFE and its metrics
(MSE to the converged reference, MSE to the full-step plain run, a feature distance; each nullable),
and the run that wrote it. A run records its command, commit, date, machine cores and, when it ends,
its wall and CPU seconds in the `runs` table.

A run asks `done(keys)` which items exist and skips them; `add(rows)` commits one batch in one
transaction, so a killed run loses at most the batch in flight and the next run continues where it
stopped. A row that exists is never written twice (the key is the primary key; a second add of it
is ignored and not counted). The database is in WAL mode: a report can read while a run writes.

`cells()` aggregates per (regime, workload, method, setting, nfe): n, mean and p95 of the MSE to
converged (numpy's linear-interpolated percentile) and the means of the other metrics;
`paired_se(a, b, ...)` is the standard error of the per-item differences between two
(method, setting) pairs on the items both have.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

KEY = ("regime", "workload", "method", "setting", "item")
METRICS = ("mse_converged", "mse_full_step", "feature_distance")
COLUMNS = KEY + ("nfe",) + METRICS

#: The default database (benchmarks/.cache ignores itself in git).
DEFAULT_PATH = Path(__file__).resolve().parents[1] / ".cache" / "h2h_results.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    command TEXT NOT NULL,
    git_commit TEXT,
    started TEXT NOT NULL,
    cores INTEGER,
    wall_seconds REAL,
    cpu_seconds REAL,
    finished TEXT
);
CREATE TABLE IF NOT EXISTS results (
    regime TEXT NOT NULL,
    workload TEXT NOT NULL,
    method TEXT NOT NULL,
    setting TEXT NOT NULL,
    item INTEGER NOT NULL,
    nfe REAL NOT NULL,
    mse_converged REAL,
    mse_full_step REAL,
    feature_distance REAL,
    run_id INTEGER REFERENCES runs(run_id),
    PRIMARY KEY (regime, workload, method, setting, item)
);
"""


@dataclasses.dataclass(frozen=True)
class Row:
    """One item's result under one method setting."""

    regime: str
    workload: str
    method: str
    setting: str
    item: int
    nfe: float
    mse_converged: float | None = None
    mse_full_step: float | None = None
    feature_distance: float | None = None

    @property
    def key(self) -> tuple:
        return (self.regime, self.workload, self.method, self.setting, int(self.item))


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The checkout's HEAD commit, or None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _float(v) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


class Store:
    """The results database at `path` (created on first use), one connection, WAL mode."""

    def __init__(self, path: str | Path | None = None, *, timeout: float = 30.0):
        self.path = Path(path) if path is not None else DEFAULT_PATH
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if path is None:
            from .converged import ignore_cache

            ignore_cache(self.path.parent)
        self.db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)  # transactions made explicit
        self.journal_mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        self.db.execute("PRAGMA synchronous=NORMAL")  # in WAL: a committed batch survives a killed process
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ runs
    def start_run(self, command: str, *, commit: str | None = None, cores: int | None = None) -> int:
        """Record a run's command, commit (default: HEAD), date and cores; its id for `add` and `finish_run`."""
        commit = git_commit() if commit is None else commit
        with self.db:
            cur = self.db.execute("INSERT INTO runs (command, git_commit, started, cores) VALUES (?, ?, ?, ?)",
                                  (command, commit, _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                   os.cpu_count() if cores is None else int(cores)))
        return int(cur.lastrowid)

    def finish_run(self, run_id: int, wall_seconds: float, cpu_seconds: float) -> None:
        with self.db:
            self.db.execute("UPDATE runs SET wall_seconds = ?, cpu_seconds = ?, finished = ? WHERE run_id = ?",
                            (float(wall_seconds), float(cpu_seconds),
                             _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), int(run_id)))

    def runs(self) -> list[dict]:
        cur = self.db.execute("SELECT * FROM runs ORDER BY run_id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    # ------------------------------------------------------------------ results
    def done(self, keys: Iterable[Sequence]) -> set[tuple]:
        """The keys (regime, workload, method, setting, item) among `keys` that have a row."""
        keys = [(str(k[0]), str(k[1]), str(k[2]), str(k[3]), int(k[4])) for k in keys]
        found: set[tuple] = set()
        for group in {k[:4] for k in keys}:
            rows = self.db.execute("SELECT item FROM results WHERE regime = ? AND workload = ? AND method = ? AND setting = ?",
                                   group).fetchall()
            found.update((*group, r[0]) for r in rows)
        return found & set(keys)

    def add(self, rows: Iterable[Row], run_id: int | None = None) -> int:
        """Commit one batch of rows in one transaction; rows whose key exists are left as they are. Returns rows added."""
        values = [(r.regime, r.workload, r.method, r.setting, int(r.item), float(r.nfe), _float(r.mse_converged),
                   _float(r.mse_full_step), _float(r.feature_distance), run_id) for r in rows]
        with self.db:
            before = self.db.total_changes
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(f"INSERT INTO results ({', '.join(COLUMNS)}, run_id) VALUES ({', '.join('?' * 10)}) "
                                "ON CONFLICT DO NOTHING", values)
            return self.db.total_changes - before

    def rows(self, **where) -> list[Row]:
        """Every row, or those matching column = value for each keyword (regime=..., method=...)."""
        bad = set(where) - set(COLUMNS)
        if bad:
            raise ValueError(f"unknown columns {sorted(bad)}")
        clause = " AND ".join(f"{k} = ?" for k in where)
        sql = f"SELECT {', '.join(COLUMNS)} FROM results" + (f" WHERE {clause}" if clause else "") + " ORDER BY " + ", ".join(KEY)
        return [Row(*r) for r in self.db.execute(sql, tuple(where.values())).fetchall()]

    # ------------------------------------------------------------------ aggregates
    def cells(self) -> list[dict]:
        """Per (regime, workload, method, setting, nfe): n, n_scored (rows with an MSE to converged), its mean and p95,
        and the means of the MSE to the full-step run and of the feature distance (None where no row has one)."""
        groups: dict[tuple, list[Row]] = {}
        for r in self.rows():
            groups.setdefault((r.regime, r.workload, r.method, r.setting, r.nfe), []).append(r)
        out = []
        for (regime, workload, method, setting, nfe), rs in sorted(groups.items()):
            mse = np.array([r.mse_converged for r in rs if r.mse_converged is not None], dtype=np.float64)

            def mean(name):
                v = [getattr(r, name) for r in rs if getattr(r, name) is not None]
                return float(np.mean(v)) if v else None

            out.append({"regime": regime, "workload": workload, "method": method, "setting": setting, "nfe": nfe,
                        "n": len(rs), "n_scored": int(mse.size),
                        "mse_converged_mean": float(mse.mean()) if mse.size else None,
                        "mse_converged_p95": float(np.percentile(mse, 95)) if mse.size else None,
                        "mse_full_step_mean": mean("mse_full_step"), "feature_distance_mean": mean("feature_distance")})
        return out

    def paired_se(self, a: Sequence[str], b: Sequence[str], *, regime: str, workload: str,
                  metric: str = "mse_converged") -> dict:
        """a, b: (method, setting). On the items both scored: n, the mean of a - b, and its standard error
        (sample SD of the per-item differences / sqrt(n); None below 2 items)."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}")

        def values(ms):
            rows = self.db.execute(f"SELECT item, {metric} FROM results WHERE regime = ? AND workload = ? AND method = ? "
                                   f"AND setting = ? AND {metric} IS NOT NULL", (regime, workload, ms[0], ms[1])).fetchall()
            return dict(rows)

        va, vb = values(a), values(b)
        items = sorted(set(va) & set(vb))
        d = np.array([va[i] - vb[i] for i in items], dtype=np.float64)
        return {"n": len(items), "items": items, "mean_diff": float(d.mean()) if len(d) else None,
                "se": float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) >= 2 else None}


class RunClock:
    """Wall and CPU seconds since creation, for `Store.finish_run`."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def seconds(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, time.process_time() - self.cpu0
