"""Verdicts over the measured rows: the regime map (ReDi vs plain per cell) and the pre-declared goals."""
from __future__ import annotations

import dataclasses

from benchmarks import metrics as M
from benchmarks.claims.config import Config
from benchmarks.claims.experiments import CondKey, Guard, acc_not_worse, acc_verdict, fd_not_worse, fd_verdict
from benchmarks.claims.rows import Table

_NUMBERS = ("fd", "acc", "geo_err", "mse_mean", "mse_p95")


@dataclasses.dataclass
class RegimeCell:
    """ReDi (H = h_claim, guard off) against plain at one equal-NFE budget: a verdict per metric."""

    sampler: str
    protocol: str
    nfe: int
    fd: str
    acc: str
    mse_mean: str
    mse_p95: str
    geo_err: str
    numbers: dict                # {"redi": {metric: value}, "plain": {metric: value}}


def regime_map(cfg: Config, table: Table) -> list[RegimeCell]:
    """ReDi vs plain at equal NFE: win / tie / loss per metric, budget, protocol and sampler."""
    out = []
    for sampler in cfg.samplers:
        for protocol in ("fixed", "foreign"):
            for n in cfg.budgets:
                r = table.redi(sampler, protocol, cfg.key_step, cfg.value_step(n), cfg.h_claim)
                p = table.plain(sampler, protocol, n)
                if r is None or p is None:
                    continue
                q, qp = r.quality, p.quality
                out.append(RegimeCell(sampler=sampler, protocol=protocol, nfe=n, fd=fd_verdict(q, qp),
                                      acc=acc_verdict(q, qp), mse_mean=M.paired_verdict(q.mse, qp.mse),
                                      mse_p95=M.percentile_verdict(q.mse, qp.mse), geo_err=M.paired_verdict(q.geo, qp.geo),
                                      numbers={"redi": {k: getattr(q, k) for k in _NUMBERS},
                                               "plain": {k: getattr(qp, k) for k in _NUMBERS}}))
    return out


def goals(cfg: Config, table: Table, cond: CondKey | None, guard: Guard | None) -> dict:
    """The four pre-declared goals, each with its claim, whether it is met and the numbers behind it."""
    c = cfg
    g: dict = {}
    # G1: equal NFE, FD and accuracy at least as good (within noise), >= 2 of 3 samplers
    per = {}
    for sampler in c.samplers:
        checks = []
        for n in c.budgets:
            r = table.redi(sampler, "fixed", c.key_step, c.value_step(n), c.h_claim)
            p = table.plain(sampler, "fixed", n)
            if r is None or p is None:
                continue
            q, qp = r.quality, p.quality
            checks.append({"nfe": n, "redi_fd": q.fd, "plain_fd": qp.fd, "redi_acc": q.acc, "plain_acc": qp.acc,
                           "fd_not_worse": fd_not_worse(q, qp), "acc_not_worse": acc_not_worse(q, qp),
                           "strict_fd": q.fd <= qp.fd, "strict_acc": q.acc >= qp.acc})
        if checks:
            full = table.plain(sampler, "fixed", c.steps)
            per[sampler] = {"budgets": checks,
                            "budgets_passing": [x["nfe"] for x in checks if x["fd_not_worse"] and x["acc_not_worse"]],
                            "plain_full_fd": full.quality.fd if full else None,
                            "plain_fd_by_nfe": {str(x["nfe"]): x["plain_fd"] for x in checks},
                            "passes": all(x["fd_not_worse"] and x["acc_not_worse"] for x in checks),
                            "passes_strict": all(x["strict_fd"] and x["strict_acc"] for x in checks)}
    passing = [s for s, v in per.items() if v["passes"]]
    lowest = [v for v in per.values() if v["plain_full_fd"] is not None]
    fd_falls_not = sum(1 for v in lowest if v["budgets"][0]["plain_fd"] > v["plain_full_fd"])
    g["equal_nfe_fd_acc_2_of_3"] = {
        "claim": "ReDi at equal NFE with FD and accuracy at least as good as plain for >= 2 of 3 samplers (fixed seed, "
                 f"H={c.h_claim}, every budget {list(c.budgets)}; 'as good' = not worse beyond 2 combined sd)",
        "met": len(passing) >= 2, "samplers_passing": passing, "samplers_tested": list(per),
        "samplers_passing_strict": [s for s, v in per.items() if v["passes_strict"]], "per_sampler": per,
        "fd_reading": (f"the plain sampler's FD at the lowest budget is above its own {c.steps}-step FD for {fd_falls_not} of "
                       f"{len(lowest)} samplers in the fixed-seed protocol (where fewer steps cost quality, ReDi has "
                       "something to win)")}
    # G2: half NFE vs full NFE on FD
    per = {}
    for sampler in c.samplers:
        r = table.redi(sampler, "fixed", c.key_step, c.value_step(c.half_nfe), c.h_claim)
        full = table.plain(sampler, "fixed", c.steps)
        half = table.plain(sampler, "fixed", c.half_nfe)
        if r is None or full is None:
            continue
        q, qf, qh = r.quality, full.quality, half.quality if half else None
        per[sampler] = {"redi_fd": q.fd, "redi_fd_sd": q.fd_sd, "plain_full_fd": qf.fd, "redi_acc": q.acc,
                        "plain_full_acc": qf.acc, "redi_acc_not_worse": acc_not_worse(q, qf),
                        "plain_full_fd_sd": qf.fd_sd, "redi_not_worse": fd_not_worse(q, qf),
                        "redi_mse": q.mse_mean,
                        "control_plain_half_fd": qh.fd if qh else None,
                        "control_plain_half_not_worse": fd_not_worse(qh, qf) if qh else None,
                        "control_plain_half_mse": qh.mse_mean if qh else None}
    g["half_nfe_vs_full_fd"] = {
        "claim": f"ReDi at NFE {c.half_nfe} as good as plain at NFE {c.steps} on FD (fixed seed, H={c.h_claim})",
        "met": bool(per) and all(v["redi_not_worse"] for v in per.values()), "per_sampler": per,
        "informative": not all(v["control_plain_half_not_worse"] for v in per.values()) if per else None,
        "note": "control: if the plain sampler at the half NFE is also 'as good' on FD, the FD claim cannot "
                "distinguish ReDi from simply running fewer steps"}
    # G3: trajectory keys vs condition keys
    if cond is not None:
        comps = []
        for rr in cond.rows:
            t = table.redi(cond.sampler, "fixed", rr.k, rr.v, c.h_claim)
            if t is None:
                continue
            qt, qc = t.quality, rr.quality
            comps.append({"variant": rr.method, "nfe": rr.nominal_nfe, "traj_d_xv": qt.d_xv_mean,
                          "cond_d_xv": qc.d_xv_mean, "traj_fd": qt.fd, "cond_fd": qc.fd, "traj_acc": qt.acc,
                          "cond_acc": qc.acc, "traj_mse": qt.mse_mean, "cond_mse": qc.mse_mean,
                          "d_xv_better": qt.d_xv_mean < qc.d_xv_mean, "fd_not_worse": fd_not_worse(qt, qc),
                          "acc_not_worse": acc_not_worse(qt, qc)})
        g["trajectory_vs_condition_keys"] = {
            "claim": "trajectory keys better than condition-embedding keys (lower d(x_v, x_v_hat), FD and accuracy not worse)",
            "met": bool(comps) and all(x["d_xv_better"] and x["fd_not_worse"] and x["acc_not_worse"] for x in comps),
            "comparisons": comps}
    else:
        g["trajectory_vs_condition_keys"] = {"met": None, "note": "not measured (skipped)"}
    # G4: guard never worse than plain
    if guard is not None:
        verdicts = {p: guard.verdicts(p) for p in ("fixed", "foreign")}
        g["guard_never_worse"] = {
            "claim": f"ReDi with the automatic guard never worse than plain at the same nominal NFE ({c.half_nfe}) "
                     "on FD, accuracy, mean and p95 per-sample MSE, in either protocol",
            "met": all(v != M.LOSS for d in verdicts.values() if d for v in d.values()), "verdicts": verdicts,
            "worst5": {p: guard.worst5(p) for p in ("fixed", "foreign")},
            "fd": {p: {gr.role: gr.row.quality.fd for gr in guard.rows if gr.row.protocol == p} for p in ("fixed", "foreign")}}
    else:
        g["guard_never_worse"] = {"met": None, "note": "not measured (skipped)"}
    return g
