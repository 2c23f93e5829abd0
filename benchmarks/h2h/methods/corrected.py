"""The KB-corrected coarse Euler solver and its baseline, Euler on the same coarse grid.

Each budget below T gets the default grid (`kb_tools.samplers.corrected.coarse_grid`, fixed
before anything was measured): a short first and last step, the steps between evenly spread on
the KB's schedule. "coarse euler" is that grid without corrections, a plain sampler with a
custom schedule any user could build; the correction's own gain is the difference between the
two at one NFE. NFE = len(grid) - 1 per item, claimed exactly (the correction evaluates nothing).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from embedded import sampling as S
from kb_tools.core.coarse_grid import coarse_grid

from ..registry import Method, Output, Plan, Setting, register

WORKLOADS = ("heldout_fixed", "heldout_foreign", "reuse", "iterate")


def grid_setting(plan: Plan, method: str, budget: int, h: int = 3, mode: str = "lstsq") -> Setting:
    grid = coarse_grid(plan.regime.steps, budget)
    line = "coarse euler (same grid, uncorrected)" if method == "coarse_euler" else f"KB-corrected euler H{h} {mode}"
    return Setting(method, line, f"{line}, grid {','.join(map(str, grid))} ({budget} NFE)",
                   {"grid": list(grid), "h": h, "mode": mode}, budget)


def corrected_settings(plan: Plan) -> list[Setting]:
    """Every budget below T; the default (SamplerReDiCorrected's nfe 6 of 20) marked."""
    budgets = [b for b in plan.budgets if b < plan.regime.steps]
    default = plan.regime.default_corrected_nfe
    out = [dataclasses.replace(grid_setting(plan, "kb_corrected", b), default=b == default) for b in budgets]
    if plan.depth == "full" and plan.middle_budget in budgets:
        out += [grid_setting(plan, "kb_corrected", plan.middle_budget, h, mode) for h, mode in ((1, "lstsq"), (16, "affine"))]
    return out


def coarse_settings(plan: Plan) -> list[Setting]:
    return [grid_setting(plan, "coarse_euler", b) for b in plan.budgets if b < plan.regime.steps]


def run_grid(bench, regime, queries, setting: Setting) -> Output:
    p = setting.params
    kb = bench.kb(regime).kb
    out, run = S.corrected_sample(kb, bench.models["large"], list(queries.prompts), list(queries.seeds), p["grid"],
                                  h=p["h"], mode=p["mode"], correct=setting.method == "kb_corrected")
    n = len(queries)
    residuals = run.centered_residual or {}
    extras = {"segments_corrected": len(run.corrected), "grid": p["grid"]}
    if residuals:
        extras["centered_residual_median"] = float(np.median(np.concatenate(list(residuals.values()))))
    return Output(out, claim={"large": np.full(n, len(p["grid"]) - 1), "small": np.zeros(n, np.int64)}, extras=extras)


register(Method("kb_corrected", "corrected", corrected_settings, run_grid, WORKLOADS,
                description="Euler on a coarse grid, each stored segment corrected by the blended truncation error of the "
                            "query's KB neighbours (weights fitted on keys as Algorithm 2)"))
register(Method("coarse_euler", "coarse", coarse_settings, run_grid, WORKLOADS,
                description="Euler on the same coarse grid without corrections (a plain sampler with a custom schedule)"))
