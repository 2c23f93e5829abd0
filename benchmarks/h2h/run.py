"""One workload of a head-to-head run: every method's settings run once, measured and scored the same way.

For each setting: sample (the method's run function) inside `Bench.measure` (NFE per item and
model counted at the forward pass, wall and CPU seconds), check the counted NFE against what
the method claims, score the output (scoring.score), and compare it with plain euler and the
oracle at the largest budget that spends no more NFE (scoring.verdicts); a learning KB's items
that jumped also by themselves, against plain euler at no more NFE than their jump.
"""
from __future__ import annotations

import numpy as np

from . import scoring
from .registry import Plan, all_methods
from .workloads import Queries


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


def run_workload(bench, regime, queries: Queries, plan: Plan, log=print) -> dict:
    """{"rows": [...], "noise_floor", "reference", ...}: every applicable method's settings on one query set."""
    ref = bench.reference(regime, queries)
    real = bench.real_features(queries)
    floor = bench.noise_floor(queries)
    n = len(queries)
    rows, qualities, done, errors = [], [], {}, []
    for method in all_methods():
        if plan.workload not in method.workloads or (plan.cfg.methods is not None and method.name not in plan.cfg.methods):
            continue
        for setting in method.settings(plan):
            key = setting.run_key
            reused = key is not None and key in done  # the same samples as an earlier setting: reported under both
            if reused:
                out, m = done[key]
            else:
                try:
                    with bench.measure(n) as m:
                        out = method.run(bench, regime, queries, setting)
                except Exception as e:  # a method that cannot run here is a result: say exactly why
                    errors.append({"workload": plan.workload, "method": method.name, "label": setting.label,
                                   "error": f"{type(e).__name__}: {e}"})
                    log(f"    {setting.label}: FAILED {type(e).__name__}: {e}", flush=True)
                    continue
                if key is not None:
                    done[key] = (out, m)
            ok, why = claim_check(out, m.nfe)
            cost = bench.cost_nfe(m)
            q = scoring.score(bench.judge, out.latents, queries.captions, real, ref.latents)
            row = {"workload": plan.workload, "method": method.name, "family": method.family, "line": setting.line,
                   "label": setting.label, "params": setting.params, "target_nfe": setting.target_nfe,
                   "nfe": float(cost.mean()), "nfe_large": float(m.nfe["large"].mean()),
                   "nfe_small": float(m.nfe["small"].mean()), "nfe_min": float(cost.min()),
                   "nfe_median": float(np.median(cost)), "nfe_max": float(cost.max()),
                   "unconditional_rows": float(m.unconditional["large"].mean()),
                   "claim_kind": out.claim_kind, "claim_ok": ok, "claim_check": why,
                   "wall_s_per_image": m.wall / n, "cpu_s_per_image": m.cpu / n, "reused_run": reused, **scoring.record_quality(q), **out.extras}
            if out.items:  # with each item's measured error, for the report's per-item statistics
                row["per_item"] = {**out.items, "mse": [float(x) for x in q.mse]}
            rows.append(row)
            qualities.append(q)
            log(f"    {setting.label}: NFE {row['nfe']:.2f} (claim {why}), FD {q.fd:.2f} +- {q.fd_sd:.2f}, acc "
                f"{q.acc:.3f}, MSE {q.mse_mean:.2e}, {m.wall / n * 1000:.0f} ms/image", flush=True)
    compare(rows, qualities)
    return {"queries": queries.description, "n": n, "noise_floor": floor,
            "reference": {"sampler": regime.sampler, "scheduler": regime.scheduler, "steps": regime.steps,
                          "wall_s_per_image": ref.measured.wall / n, "cpu_s_per_image": ref.measured.cpu / n},
            "rows": rows, "errors": errors}


def baseline_at(rows: list[dict], family: str, nfe: float) -> int | None:
    """Index of the `family` row with the largest NFE not above `nfe` (+0.01): a baseline that spends no more."""
    cands = [i for i, r in enumerate(rows) if r["family"] == family and r["nfe"] <= nfe + 0.01]
    return max(cands, key=lambda i: rows[i]["nfe"]) if cands else None


def compare(rows: list[dict], qualities: list) -> None:
    """Add to every non-plain row its verdicts against plain euler and the oracle at no more NFE (in place)."""
    for i, r in enumerate(rows):
        if r["family"] == "plain":
            continue
        # The corrected solver also against its own grid uncorrected: the correction's gain on its own.
        for family in ("plain", "oracle", *(("coarse",) if r["family"] == "corrected" else ())):
            j = baseline_at(rows, family, r["nfe"])
            if j is None or j == i:
                continue
            r[f"vs_{family}"] = {"baseline": rows[j]["label"], "baseline_nfe": rows[j]["nfe"],
                                 **scoring.verdicts(r, qualities[i], rows[j], qualities[j])}
        if r["family"] == "learning":  # most items run in full: judge the blends by themselves too
            r["blended_vs_plain"] = blended_verdict(r, qualities[i], rows, qualities)


def blended_verdict(row: dict, q, rows: list[dict], qualities: list) -> dict | None:
    """The items of a run that jumped (the others ran in full) against plain euler at no more NFE than their jump, on
    the same items (paired per-sample MSE); None when no item jumped or no plain run spends that little."""
    items = row.get("per_item") or {}
    jumped = np.asarray(items.get("accepted", []), bool)
    if not jumped.any():
        return None
    nfe = float(np.max(np.asarray(items["nfe"])[jumped]))
    j = baseline_at(rows, "plain", nfe)
    if j is None:
        return None
    mine, base = q.mse[jumped], qualities[j].mse[jumped]
    return {"baseline": rows[j]["label"], "baseline_nfe": rows[j]["nfe"], "jump_nfe": nfe, "items": int(jumped.sum()),
            "mse_mean": float(mine.mean()), "baseline_mse_mean": float(base.mean()), "worse": int((mine > base).sum()),
            "verdict": scoring.mse_verdict(mine, base)}
