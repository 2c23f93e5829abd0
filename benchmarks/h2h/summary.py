"""What a workload's rows say: the quality-versus-NFE frontier, where each line reaches full-step quality, and each
accelerating family's verdict and losses against plain euler and the oracle at no more NFE.

Plain functions over the JSON rows of `run.run_workload` (no models). "Within noise" is the
benchmarks' decision rule: not worse than the plain full-step run by more than 2 combined sd
on FD (bootstrap sd) and on source accuracy (binomial se).
"""
from __future__ import annotations

import numpy as np

from benchmarks import metrics as M
from kb_tools.calibration.blend_error import spearman


def full_step(rows: list[dict]) -> dict:
    """The plain reference at T: the plain row with the most NFE."""
    return max((r for r in rows if r["family"] == "plain"), key=lambda r: r["nfe"])


def within_noise(row: dict, full: dict) -> bool:
    """FD and accuracy not worse than the full-step run by more than 2 combined sd."""
    return (M.not_worse(row["fd"], row["fd_sd"], full["fd"], full["fd_sd"], higher_is_better=False)
            and M.not_worse(row["acc"], row["acc_se"], full["acc"], full["acc_se"], higher_is_better=True))


def first_full_quality(rows: list[dict]) -> dict[str, float | None]:
    """{line: the least mean NFE at which it is within noise of plain at T (None: never)}."""
    full = full_step(rows)
    out: dict[str, float | None] = {}
    for r in rows:
        best = out.get(r["line"])
        if within_noise(r, full) and (best is None or r["nfe"] < best):
            out[r["line"]] = r["nfe"]
        else:
            out.setdefault(r["line"], None)
    return out


def frontier(rows: list[dict], budgets) -> list[dict]:
    """Per budget: the row with the lowest FD and the one with the lowest MSE among rows spending at most that NFE,
    and every row whose FD is within 2 combined sd of the best (FD cannot separate those)."""
    out = []
    for b in budgets:
        fits = [r for r in rows if r["nfe"] <= b + 0.01]
        if not fits:
            continue
        best = min(fits, key=lambda r: r["fd"])
        tied = sorted({r["label"] for r in fits if M.not_worse(r["fd"], r["fd_sd"], best["fd"], best["fd_sd"],
                                                                 higher_is_better=False)})
        low = min(fits, key=lambda r: r["mse_mean"])
        out.append({"budget": b, "best_fd": best["label"], "best_fd_value": best["fd"], "best_fd_nfe": best["nfe"],
                    "within_noise_of_best_fd": tied, "best_mse": low["label"], "best_mse_value": low["mse_mean"],
                    "best_mse_nfe": low["nfe"]})
    return out


#: The families under test: each gets a loss list and a verdict against plain euler and the oracle at no more NFE.
VERDICT_FAMILIES = ("redi", "learning", "any_seed", "corrected")


def family_verdict(rows: list[dict], family: str) -> dict | None:
    """How a family's rows fared against plain euler and the oracle at no more NFE (None: no row of it here).

    Per baseline: rows compared, rows that lost on at least one metric (FD, accuracy, MSE), rows that won on at least
    one and lost on none, and win / tie / loss counts per metric."""
    mine = [r for r in rows if r["family"] == family]
    if not mine:
        return None
    out: dict = {"rows": len(mine)}
    for base in ("plain", "oracle"):
        got = [r[f"vs_{base}"] for r in mine if r.get(f"vs_{base}")]
        each = [(v["fd"], v["acc"], v["mse"]) for v in got]
        out[base] = {"compared": len(got), "rows_lost": sum(M.LOSS in t for t in each),
                     "rows_won": sum(M.WIN in t and M.LOSS not in t for t in each),
                     **{m: {x: sum(v[m] == x for v in got) for x in (M.WIN, M.TIE, M.LOSS)} for m in ("fd", "acc", "mse")}}
    return out


def losses(rows: list[dict], family: str = "redi") -> list[dict]:
    """Every comparison a `family` row lost against plain euler or the oracle at no more NFE (FD, accuracy or MSE)."""
    out = []
    for r in rows:
        if r["family"] != family:
            continue
        for base in ("vs_plain", "vs_oracle", "vs_coarse"):
            v = r.get(base)
            if not v:
                continue
            lost = [m for m in ("fd", "acc", "mse") if v[m] == M.LOSS]
            if lost:
                out.append({"workload": r["workload"], "row": r["label"], "nfe": r["nfe"], "against": v["baseline"],
                            "against_nfe": v["baseline_nfe"], "lost_on": lost})
    return out


def rank_correlation(row: dict) -> dict | None:
    """Spearman of each item's predicted blend error against its measured per-sample MSE, over all items and over
    the items that jumped (None where the row has no predicted errors or fewer than 3 such items)."""
    items = row.get("per_item") or {}
    if "predicted_error" not in items:
        return None
    pred, mse, jumped = (np.asarray(items[k], np.float64) for k in ("predicted_error", "mse", "accepted"))
    fin = np.isfinite(pred)  # inf: beyond the calibrated range

    def rho(sel):
        return spearman(pred[sel], mse[sel]) if sel.sum() >= 3 else None
    return {"all": rho(fin), "jumped": rho(fin & (jumped > 0)), "n": int(fin.sum()), "n_jumped": int((fin & (jumped > 0)).sum())}


def _guard_off_twin(rows: list[dict], r: dict) -> dict | None:
    """The ReDi row with the guard off at the same key step, H, weight mode and (ceiling) value step."""
    p = r["params"]
    return next((o for o in rows if o["family"] == "redi" and o["params"].get("guard") == "off"
                 and all(o["params"].get(x) == p.get(x) for x in ("k", "h", "mode", "v"))), None)


def error_guard(rows: list[dict]) -> dict:
    """The error guard's rows against the guard off at the same nominal setting (worst 5% of samples), against plain
    euler and the oracle at no more mean NFE (mean MSE by paired se, p95 as measured), and their rank correlations."""
    by_label = {r["label"]: r for r in rows}
    out, never_worse = [], {"plain": {"mean": True, "p95": True}, "oracle": {"mean": True, "p95": True}}
    by_tolerance: dict[str, dict] = {}  # the same verdict per tolerance: "plain" is the one the default promises
    for r in rows:
        if r["family"] == "redi":
            r["rank_correlation"] = rank_correlation(r)
        if r["method"] != "redi_error_guard" or r["params"].get("tolerance") is None:
            continue
        off = _guard_off_twin(rows, r)
        nfe = r.get("per_item", {}).get("nfe", [])
        entry = {"label": r["label"], "tolerance": r["params"]["tolerance"], "skip": r["params"]["skip"], "v": r["params"]["v"],
                 "nfe_mean": r["nfe"], "nfe_min": r["nfe_min"], "nfe_median": r.get("nfe_median"), "nfe_max": r["nfe_max"],
                 "nfe_histogram": {str(int(v)): int(c) for v, c in zip(*np.unique(nfe, return_counts=True))},
                 "accepted": r.get("accepted"), "mse_mean": r["mse_mean"], "mse_p95": r["mse_p95"],
                 "rank_correlation": r["rank_correlation"],
                 "guard_off": off and {"label": off["label"], "nfe": off["nfe"], "mse_mean": off["mse_mean"],
                                       "mse_p95": off["mse_p95"], "rank_correlation": off.get("rank_correlation")}}
        for fam in ("plain", "oracle"):
            v = r.get(f"vs_{fam}")
            if not v:
                entry[f"vs_{fam}"] = None
                continue
            base = by_label[v["baseline"]]
            p95_ok = r["mse_p95"] <= base["mse_p95"]
            entry[f"vs_{fam}"] = {"baseline": v["baseline"], "baseline_nfe": v["baseline_nfe"], "mean_verdict": v["mse"],
                                  "baseline_mse_mean": base["mse_mean"], "baseline_mse_p95": base["mse_p95"],
                                  "p95_not_worse": p95_ok}
            tol = by_tolerance.setdefault(str(entry["tolerance"]), {f: {"mean": True, "p95": True} for f in ("plain", "oracle")})
            for verdict in (never_worse[fam], tol[fam]):
                verdict["mean"] &= v["mse"] != M.LOSS
                verdict["p95"] &= p95_ok
        out.append(entry)
    return {"rows": out, "never_worse_than": never_worse if out else None, "never_worse_by_tolerance": by_tolerance}


def summarize(rows: list[dict], budgets) -> dict:
    return {"error_guard": error_guard(rows), "first_full_quality_nfe": first_full_quality(rows), "frontier": frontier(rows, budgets),
            **{f"{f}_losses": losses(rows, f) for f in VERDICT_FAMILIES},
            "family_verdicts": {f: v for f in VERDICT_FAMILIES if (v := family_verdict(rows, f)) is not None},
            "redi_wins": [{"row": r["label"], "against": r[b]["baseline"], "won_on": w}
                          for r in rows if r["family"] == "redi" for b in ("vs_plain", "vs_oracle") if r.get(b)
                          for w in [[m for m in ("fd", "acc", "mse") if r[b][m] == M.WIN]] if w]}
