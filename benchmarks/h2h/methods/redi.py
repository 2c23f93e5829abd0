"""ReDi (Algorithm 2 in one sampler run, `kb_tools.samplers.redi_chain.generate` through `embedded.sampling.redi_sample`) on the regime's KB: key step k, value step v, H neighbours, weight mode, guard.

NFE = k + (T - v) for an item that jumps, T for one the guard sends back to its key step.
The default (the headline cell) is the ReDiSampler node's: key step 5, value step 10 of 20, H 3,
lstsq, guard auto (the KB's stored leave-one-out calibration for that key step). The guard is
otherwise off (the paper) or auto.

The error guard (method "redi_error_guard"): an item jumps when its predicted blend
error (the KB's stored leave-one-out error model, in units of the KB's spread) is within a
tolerance fixed in advance (a number, or "plain": no worse than plain euler at equal NFE, from
the KB's plain reference), at the budget's value step ("fixed"), or with the adaptive skip at
the latest step up to the last one the KB stores where it is ("adaptive"). Every ReDi row on the
main key step and H records each item's predicted error at its value step beside its residual,
so that the report can rank-correlate it with the measured error.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from embedded import sampling as S
from embedded.captions import parse_prompt
from kb_tools.calibration.blend_error import predict_error, stored_error_model
from kb_tools.calibration.guard import GUARD_AUTO
from kb_tools.calibration.plain_reference import PLAIN

from ..registry import Method, Output, Plan, Setting, register


def redi_setting(plan: Plan, k: int, budget: int, h: int, mode: str = "lstsq", guard: str = "off",
                 method: str = "redi", line_prefix: str = "ReDi", extra: dict | None = None) -> Setting:
    """ReDi at `budget` NFE: v = k + T - budget."""
    v = k + plan.regime.steps - budget
    line = f"{line_prefix} k{k} H{h} {mode}, guard {guard}"
    return Setting(method, line, f"{line}, v{v} ({budget} NFE)",
                   {"k": k, "v": v, "h": h, "mode": mode, "guard": guard, **(extra or {})}, budget)


def budgets_for(plan: Plan, k: int) -> list[int]:
    """Budgets below T that leave a value step in k..T-1."""
    return [b for b in plan.budgets if k < b < plan.regime.steps]


def redi_settings(plan: Plan) -> list[Setting]:
    """The ReDiSampler node's defaults (key step 5, value step 10 of 20, H 3, lstsq, guard auto) first; then, wider,
    the main key step (10% of T) at every budget with the guard off (the paper) and auto, and on the paper's
    protocol and prompt reuse H, weight modes and a later key step at the middle budget."""
    cfg, r = plan.cfg, plan.regime
    k, h = r.key_step, cfg.redi_h_main
    kd = r.default_key_step
    default = dataclasses.replace(redi_setting(plan, kd, kd + r.steps - r.default_value_step, h, guard="auto"),
                                  default=True)
    budgets = budgets_for(plan, k)
    mid = plan.middle_budget
    out = [default] + [redi_setting(plan, k, b, h, guard=g) for g in ("off", "auto") for b in budgets]
    if plan.depth == "full" and mid in budgets:
        if plan.workload == "heldout_fixed":
            out += [redi_setting(plan, k, mid, hh) for hh in cfg.redi_h_extra]
            out += [redi_setting(plan, k, mid, cfg.redi_modes_h, mode) for mode in cfg.redi_modes_extra]
            if 2 * k < mid:
                out.append(redi_setting(plan, 2 * k, mid, h))
        elif plan.workload == "reuse":
            out += [redi_setting(plan, k, mid, hh) for hh in cfg.redi_h_extra if hh <= cfg.redi_modes_h]
    return out


def tolerance_name(tolerance: float | str) -> str:
    """'0.1', or 'plain' for the tolerance "no worse than plain at equal NFE" (the KB's plain reference)."""
    return tolerance if tolerance == PLAIN else f"{tolerance:g}"


def error_guard_settings(plan: Plan) -> list[Setting]:
    """The error guard at each budget's value step, and the adaptive skip up to the KB's last stored step, per tolerance."""
    cfg, r = plan.cfg, plan.regime
    k, h = r.key_step, cfg.redi_h_main
    ceiling = redi_setting(plan, k, k + 1, h, method="redi_error_guard")  # the adaptive rows' nominal setting, guard off
    out = [dataclasses.replace(ceiling, params={**ceiling.params, "skip": "none"})]
    for tol in cfg.redi_error_tolerances:
        fixed, name = {"tolerance": tol, "skip": "fixed"}, tolerance_name(tol)
        out += [redi_setting(plan, k, b, h, guard=f"error {name}", method="redi_error_guard", extra=fixed)
                for b in budgets_for(plan, k)]
        last = redi_setting(plan, k, k + 1, h, guard=f"error {name} adaptive", method="redi_error_guard",
                            extra={"tolerance": tol, "skip": "adaptive"})  # v = T - 1: the longest jump stored
        out.append(dataclasses.replace(last, label=f"{last.line}, v <= {last.params['v']} (>= {k + 1} NFE)",
                                       target_nfe=None))
    return out


def redi_output(bench, regime, queries, kb, result, k: int) -> Output:
    """Output of a ReDi run: its claimed NFE from the plan, and what the guard and retrieval did."""
    n = len(queries)
    entries = kb.entries
    same = np.array([[parse_prompt(entries[int(j)][0]).source == c.source for j in row]
                     for row, c in zip(result.neighbour_ids, queries.captions)], float)
    claim = {"large": k + regime.steps - result.start_steps, "small": np.zeros(n, np.int64)}
    g = result.guard  # the residual guard (threshold on the residual) or the error guard (tolerance on the prediction)
    residual_guard = not hasattr(g, "tolerance")
    extras = {"accepted": float(result.accepted.mean()),
              "guard_threshold": float(g.threshold) if residual_guard else g.tolerance_at(result.plan.value_step),
              "guard_source": g.source if residual_guard else "blend-error model", "kb_entries": len(kb),
              "centered_residual_median": float(np.median(result.centered_residual)),
              "neighbours_same_source": float(same.mean())}
    items = {"accepted": result.accepted.astype(int).tolist(), "nfe": claim["large"].tolist(),
             "centered_residual": [round(float(x), 4) for x in result.centered_residual]}
    predicted = result.predicted_error
    model = stored_error_model(kb, k, result.neighbour_ids.shape[1]) if kb.calibration(k) else None
    if predicted is None and model is not None:  # the residual guard: what the error model says of the same blend
        predicted = predict_error(model, result.centered_residual, result.plan.value_step)
    if predicted is not None:
        items["predicted_error"] = [float(x) for x in predicted]
    return Output(result.latent, claim=claim, extras=extras, items=items)


def run_redi(bench, regime, queries, setting: Setting, model=None) -> Output:
    """ReDi on `model` (default: the counted large model; stacks pass a cached one)."""
    p = setting.params
    kb = bench.kb(regime).kb
    result = S.redi_sample(kb, bench.models["large"] if model is None else model, list(queries.prompts),
                           list(queries.seeds), key_step=p["k"], value_step=p["v"], h=p["h"], mode=p["mode"],
                           guard=S.GUARD_OFF if p["guard"] == "off" else GUARD_AUTO, tolerance=p.get("tolerance"),
                           adaptive=p.get("skip") == "adaptive")
    return redi_output(bench, regime, queries, kb, result, p["k"])


register(Method("redi", "redi", redi_settings, run_redi,
                description="ReDi, Algorithm 2, on a KB of train-caption trajectories from one seed"))
register(Method("redi_error_guard", "redi", error_guard_settings, run_redi,
                workloads=("heldout_fixed", "heldout_foreign", "reuse", "iterate"),
                description="ReDi with the error guard (predicted blend error within a tolerance of the KB's spread) "
                            "at a fixed value step, or with the adaptive skip"))
