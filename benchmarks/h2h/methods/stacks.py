"""Stacks of two accelerations on the held-out workload: ReDi on an EasyCache'd model, T-Stitch with an EasyCache'd large model.

Each stacks the core setting of both methods (ReDi's main k and H at the middle budget, guard
off; T-Stitch's core fraction; EasyCache's default threshold). The cache can only skip
evaluations, so each claims at most what its un-cached run spends.
"""
from __future__ import annotations

import dataclasses

from ..registry import Method, Output, Plan, Setting, register
from .caches import END_PERCENT, START_PERCENT, cached_model
from .redi import budgets_for, redi_setting, run_redi
from .tstitch import run_tstitch, tstitch_settings


def _cache_params(plan: Plan) -> dict:
    return {"node": "EasyCache", "reuse_threshold": plan.cfg.cache_core_threshold, "start_percent": START_PERCENT,
            "end_percent": END_PERCENT}


def redi_cache_settings(plan: Plan) -> list[Setting]:
    r = plan.regime
    if plan.middle_budget not in budgets_for(plan, r.key_step):
        return []
    s = redi_setting(plan, r.key_step, plan.middle_budget, plan.cfg.redi_h_main, method="redi_easycache",
                     line_prefix="ReDi + EasyCache", extra=_cache_params(plan))
    return [s]


def tstitch_cache_settings(plan: Plan) -> list[Setting]:
    core = [s for s in tstitch_settings(plan) if s.params["small_fraction"] == plan.cfg.tstitch_core_fraction]
    return [dataclasses.replace(s, method="tstitch_easycache", line="T-Stitch + EasyCache", label=s.label + " + EasyCache",
                                params={**s.params, **_cache_params(plan)}, default=False) for s in core]


def run_redi_cache(bench, regime, queries, setting: Setting) -> Output:
    p = setting.params
    out = run_redi(bench, regime, queries, setting, model=cached_model(bench, p["node"], p["reuse_threshold"]))
    return dataclasses.replace(out, claim_kind="at_most")


def run_tstitch_cache(bench, regime, queries, setting: Setting) -> Output:
    p = setting.params
    out = run_tstitch(bench, regime, queries, setting, large=cached_model(bench, p["node"], p["reuse_threshold"]))
    return dataclasses.replace(out, claim_kind="at_most")


register(Method("redi_easycache", "stack", redi_cache_settings, run_redi_cache, workloads=("heldout_fixed",),
                description="ReDi (main k, H, guard off, middle budget) on ComfyUI's EasyCache'd model"))
register(Method("tstitch_easycache", "stack", tstitch_cache_settings, run_tstitch_cache, workloads=("heldout_fixed",),
                description="T-Stitch (core fraction) with ComfyUI's EasyCache on the large model"))
