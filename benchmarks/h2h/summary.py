"""What the accumulated results say: per cell its n, NFE and error to converged, its verdict against the oracle at no
more NFE (paired per item, 2 paired SE), and the oracle NFE that matches its quality.

Plain functions over the results store's rows (no models). A cell is one (regime, workload, method,
setting); its NFE is the counted mean per item. Only finite outputs are scored; a cell with a
non-finite item loses to the oracle whatever its finite items say. A verdict is resolved (`reference_resolves`)
where the converged reference's own doubling gap g (mean over the paired items) is below 1/20 of the
smaller mean error compared (converged.GAP_SHARE, the issue's rule), or, for a win or a loss, where
the margin is wider than the reference's error could move it: with g as the reference's squared error
(an overestimate: a second-order solver's 2N output is about 1/9 of g from the truth), each mean MSE
moves by at most g + 2 sqrt(mse g) (Cauchy-Schwarz). Elsewhere the report prints it as unresolved.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from benchmarks import metrics as M

#: Families whose cells are the pack's (they get nfe_ratio_at_equal_quality); the others are the plain alternatives.
BASELINE_FAMILIES = ("plain", "oracle", "cache", "coarse")
VALIDITY = Path(__file__).resolve().parents[1] / "results" / "converged_validity" / "validity.json"


def settings_meta(store) -> dict[tuple, dict]:
    """(regime, workload, method, setting) -> family, line, default, params (the runner's `settings` table)."""
    try:
        rows = store.db.execute("SELECT regime, workload, method, setting, family, line, is_default, params "
                                "FROM settings").fetchall()
    except Exception:  # a store no run has written to yet
        return {}
    return {tuple(r[:4]): {"family": r[4], "line": r[5], "default": bool(r[6]), "params": json.loads(r[7])} for r in rows}


def raw_cells(store) -> list[dict]:
    """Per cell: items, NFE and the three metrics per item (None where the output was not finite)."""
    meta = settings_meta(store)
    groups: dict[tuple, list] = {}
    for r in store.rows():
        groups.setdefault((r.regime, r.workload, r.method, r.setting), []).append(r)
    out = []
    for key, rs in sorted(groups.items()):
        m = meta.get(key, {"family": key[2], "line": key[2], "default": False, "params": {}})
        out.append({"key": key, **m, "items": [r.item for r in rs], "nfe": np.array([r.nfe for r in rs], np.float64),
                    "mse": {r.item: r.mse_converged for r in rs},
                    "full": [r.mse_full_step for r in rs if r.mse_full_step is not None],
                    "feat": [r.feature_distance for r in rs if r.feature_distance is not None]})
    return out


def oracle_at(cells: list[dict], regime: str, workload: str, nfe: float) -> dict | None:
    """The oracle cell with the most NFE not above `nfe` (+0.01): the strongest plain choice that spends no more."""
    cands = [c for c in cells if c["key"][:2] == (regime, workload) and c["key"][2] == "oracle"
             and c["nfe"].mean() <= nfe + 0.01]
    return max(cands, key=lambda c: c["nfe"].mean()) if cands else None


def frontier(cells: list[dict], regime: str, workload: str, methods=("oracle",)) -> list[tuple[float, float]]:
    """The oracle's frontier (or the lower envelope of `methods`' cells together): (NFE, mean MSE to converged) per
    budget, lower envelope (more NFE never reads worse)."""
    pts = []
    for c in cells:
        if c["key"][:2] == (regime, workload) and c["key"][2] in methods:
            v = [x for x in c["mse"].values() if x is not None]
            if len(v) >= 2:
                pts.append((float(c["nfe"].mean()), float(np.mean(v))))
    out, best = [], math.inf
    for n, e in sorted(pts):
        best = min(best, e)
        out.append((n, best))
    return out


def nfe_at_quality(front: list[tuple[float, float]], mse: float) -> float | None:
    """The least oracle NFE whose mean MSE equals `mse` (log-MSE linear between budgets); None outside the frontier:
    better than the oracle's best, or no worse than its cheapest budget (the frontier does not go lower)."""
    if len(front) < 2 or not math.isfinite(mse) or mse <= 0:
        return None
    if mse >= front[0][1] or mse < front[-1][1]:
        return None
    for (n0, e0), (n1, e1) in zip(front, front[1:]):
        if e0 > mse >= e1:
            t = (math.log(e0) - math.log(mse)) / (math.log(e0) - math.log(e1))
            return n0 + t * (n1 - n0)
    return None


def item_gaps(store) -> dict[tuple, float]:
    """(regime, workload, item) -> the doubling gap of that item's converged reference ({} before any run stored one)."""
    try:
        return {(r[0], r[1], r[2]): r[3] for r in store.db.execute("SELECT regime, workload, item, gap FROM converged_gaps")}
    except Exception:
        return {}


def resolves(gap_mean: float, a_mean: float, b_mean: float, verdict: str) -> bool:
    """Whether a reference this far from converged (mean doubling gap) decides `verdict` between errors of these means."""
    from .converged import GAP_SHARE

    if not np.isfinite(gap_mean):
        return False
    if gap_mean < GAP_SHARE * min(a_mean, b_mean):
        return True
    reach = sum(gap_mean + 2 * math.sqrt(m * gap_mean) for m in (a_mean, b_mean))
    return verdict in (M.WIN, M.LOSS) and abs(a_mean - b_mean) > reach


def cell_summary(c: dict, cells: list[dict], gaps: dict | None = None) -> dict:
    regime, workload, method, setting = c["key"]
    gaps = gaps or {}
    scored = np.array([v for v in c["mse"].values() if v is not None], np.float64)
    nonfinite = len(c["mse"]) - len(scored)
    nfe = float(c["nfe"].mean())
    out = {"regime": regime, "workload": workload, "method": method, "family": c["family"], "setting": setting,
           "default": c["default"], "nfe": nfe, "n": len(c["items"]), "n_nonfinite": nonfinite, "reference": "converged",
           "mse_converged_mean": float(scored.mean()) if len(scored) else None,
           "mse_converged_se": float(scored.std(ddof=1) / math.sqrt(len(scored))) if len(scored) >= 2 else None,
           "mse_converged_p95": float(np.percentile(scored, 95)) if len(scored) else None,
           "mse_full_step_mean": float(np.mean(c["full"])) if c["full"] else None,
           "feature_distance_mean": float(np.mean(c["feat"])) if c["feat"] else None,
           "oracle_baseline": None, "paired_mean_diff_vs_oracle": None, "paired_se_vs_oracle": None,
           "paired_n_vs_oracle": 0, "verdict_vs_oracle": None, "reference_gap_mean": None, "reference_resolves": None}
    if method != "oracle":
        base = oracle_at(cells, regime, workload, nfe)
        if base is not None:
            common = sorted(i for i in c["mse"] if c["mse"][i] is not None and base["mse"].get(i) is not None)
            a = np.array([c["mse"][i] for i in common])
            b = np.array([base["mse"][i] for i in common])
            d = a - b
            out["oracle_baseline"] = {"setting": base["key"][3], "nfe": float(base["nfe"].mean())}
            out["paired_n_vs_oracle"] = len(common)
            if len(common) >= 2:
                out["paired_mean_diff_vs_oracle"] = float(d.mean())
                out["paired_se_vs_oracle"] = float(d.std(ddof=1) / math.sqrt(len(d)))
                from .scoring import mse_verdict

                out["verdict_vs_oracle"] = M.LOSS if nonfinite else mse_verdict(a, b)
                g = [gaps[(regime, workload, i)] for i in common if (regime, workload, i) in gaps]
                if len(g) == len(common):
                    out["reference_gap_mean"] = float(np.mean(g))
                    out["reference_resolves"] = resolves(out["reference_gap_mean"], float(a.mean()), float(b.mean()),
                                                     out["verdict_vs_oracle"])
    if c["family"] not in BASELINE_FAMILIES:
        at = nfe_at_quality(frontier(cells, regime, workload), out["mse_converged_mean"] or math.nan)
        out["nfe_ratio_at_equal_quality"] = None if at is None or nonfinite else at / nfe
        # The same against the envelope of the oracle and plain euler together: where the oracle's choice for a budget
        # (picked on selection captions) does worse on the evaluation items than plain euler, this is the fairer ratio.
        # Read on the merged points and on the oracle's own (log-linear reading between knots can favour either).
        merged = nfe_at_quality(frontier(cells, regime, workload, ("oracle", "plain")), out["mse_converged_mean"] or math.nan)
        readings = [x for x in (at, merged) if x is not None]
        out["nfe_ratio_vs_oracle_or_plain"] = None if not readings or nonfinite else min(readings) / nfe
    return out


def validity(names) -> dict:
    """Each regime's validity figures from benchmarks/results/converged_validity/validity.json (None where absent)."""
    try:
        data = json.loads(VALIDITY.read_text())
    except (OSError, ValueError):
        return {n: None for n in names}
    return {n: (data.get("regimes", {}).get(n) or {}).get("validity") for n in names}


def gap_check(item_gap: dict[tuple, float], regime: str, cells: list[dict]) -> dict | None:
    """The regime's stored items' doubling gaps (item_gaps) against the smallest mean error a verdict compares
    (converged.gap_ok: below 1/20 of it)."""
    from .converged import GAP_SHARE

    gaps = np.array([g for key, g in item_gap.items() if key[0] == regime])
    errors = [float(np.mean(v)) for c in cells if c["key"][0] == regime
              for v in [[x for x in c["mse"].values() if x is not None]] if v and np.mean(v) > 0]
    if not len(gaps) or not errors:
        return None
    smallest = min(errors)
    return {"items": int(len(gaps)), "mean": float(gaps.mean()), "max": float(gaps.max()), "smallest_cell_error": smallest,
            "max_over_smallest": float(gaps.max() / smallest), "gap_ok": bool(gaps.max() < GAP_SHARE * smallest)}


def summarize(store) -> dict:
    """{"regimes": {name: settings + validity}, "cells": [...], "runs": [...], "failures": [...], "preparations": [...]}
    from the store; cpu_hours: every run's CPU seconds plus the one-time preparations (oracle grid, KB builds)."""
    from .config import Config

    cells = raw_cells(store)
    names = sorted({c["key"][0] for c in cells})
    known = {r.name: r for r in (*Config().regimes, *Config.smoke_config().regimes)}
    valid = validity(names)
    gaps = item_gaps(store)
    regimes = {n: {**(known[n].settings() if n in known else {}), "validity": valid[n],
                   "converged_gap": gap_check(gaps, n, cells)} for n in names}
    runs = store.runs()
    try:
        machine = {r[0]: {"cores": r[1], "bf16": bool(r[2]), "torch_threads": r[3], "loadavg_before": json.loads(r[4])}
                   for r in store.db.execute("SELECT * FROM run_machine").fetchall()}
        failures = [dict(zip(("run_id", "regime", "workload", "method", "setting", "first_item", "error", "date"), r))
                    for r in store.db.execute("SELECT * FROM failures").fetchall()]
        preparations = [dict(zip(("regime", "what", "wall_seconds", "cpu_seconds"), r))
                        for r in store.db.execute("SELECT * FROM preparations").fetchall()]
    except Exception:
        machine, failures, preparations = {}, [], []
    for r in runs:
        r["machine"] = machine.get(r["run_id"])
    summaries = [cell_summary(c, cells, gaps) for c in cells]
    for name, r in regimes.items():
        if r["converged_gap"] is not None:
            judged = [c for c in summaries if c["regime"] == name and c["reference_resolves"] is not None]
            r["converged_gap"]["verdicts"] = len(judged)
            r["converged_gap"]["verdicts_unresolved"] = sum(not c["reference_resolves"] for c in judged)
    return {"benchmark": "head_to_head", "reference": "converged", "regimes": regimes,
            "cells": summaries, "runs": runs, "failures": failures,
            "preparations": preparations,
            "cpu_hours": round((sum(r["cpu_seconds"] or 0.0 for r in runs)
                                + sum(p["cpu_seconds"] or 0.0 for p in preparations)) / 3600, 3),
            "wall_hours": round(sum(r["wall_seconds"] or 0.0 for r in runs) / 3600, 3)}
