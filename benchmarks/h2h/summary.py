"""What a workload's rows say: the quality-versus-NFE frontier, where each line reaches full-step quality, ReDi's losses.

Plain functions over the JSON rows of `run.run_workload` (no models). "Within noise" is the
benchmarks' decision rule: not worse than the plain full-step run by more than 2 combined sd
on FD (bootstrap sd) and on source accuracy (binomial se).
"""
from __future__ import annotations

from benchmarks import metrics as M


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


def losses(rows: list[dict], family: str = "redi") -> list[dict]:
    """Every comparison a `family` row lost against plain euler or the oracle at no more NFE (FD, accuracy or MSE)."""
    out = []
    for r in rows:
        if r["family"] != family:
            continue
        for base in ("vs_plain", "vs_oracle"):
            v = r.get(base)
            if not v:
                continue
            lost = [m for m in ("fd", "acc", "mse") if v[m] == M.LOSS]
            if lost:
                out.append({"workload": r["workload"], "row": r["label"], "nfe": r["nfe"], "against": v["baseline"],
                            "against_nfe": v["baseline_nfe"], "lost_on": lost})
    return out


def summarize(rows: list[dict], budgets) -> dict:
    return {"first_full_quality_nfe": first_full_quality(rows), "frontier": frontier(rows, budgets),
            "redi_losses": losses(rows, "redi"),
            "redi_wins": [{"row": r["label"], "against": r[b]["baseline"], "won_on": w}
                          for r in rows if r["family"] == "redi" for b in ("vs_plain", "vs_oracle") if r.get(b)
                          for w in [[m for m in ("fd", "acc", "mse") if r[b][m] == M.WIN]] if w]}
