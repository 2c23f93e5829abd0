"""ComfyUI's native caches, applied exactly as their nodes apply them (comfy_extras.nodes_easycache).

EasyCache and LazyCache skip model evaluations inside the model call for any seed with no
preparation. The node's execute() clones the plain model and adds its wrappers; the forward
counter is added after (innermost), so a skipped call costs nothing. Start and end percent are
the nodes' defaults; the threshold is the knob.
"""
from __future__ import annotations

import numpy as np

from benchmarks.forward_counter import counted

from ..registry import Method, Output, Plan, Setting, register

START_PERCENT, END_PERCENT = 0.15, 0.95  # the nodes' defaults


def cached_model(bench, node: str, threshold: float, role: str = "large"):
    """The plain model through the node's execute(), then counted (innermost) on the run's counter."""
    from comfy_extras import nodes_easycache

    cls = {"EasyCache": nodes_easycache.EasyCacheNode, "LazyCache": nodes_easycache.LazyCacheNode}[node]
    model = cls.execute(bench.plain_models[role], reuse_threshold=float(threshold), start_percent=START_PERCENT,
                        end_percent=END_PERCENT, verbose=False).result[0]
    return counted(model, bench.counters[role])[0]


def base_samplers(plan: Plan, thorough: bool) -> list[tuple[str, str, str, int, int]]:
    """(line suffix, sampler, scheduler, steps, NFE without a cache): the reference sampler at T, and the oracle's
    choice at T when it differs."""
    r = plan.regime
    out = [("", r.sampler, r.scheduler, r.steps, r.steps)]
    best = plan.oracle[plan.budgets[-1]]
    if thorough and (best.sampler, best.scheduler) != (r.sampler, r.scheduler):
        out.append((" (best sampler)", best.sampler, best.scheduler, best.steps, best.nfe))
    return out


def cache_settings(node: str, plan: Plan, many: bool) -> list[Setting]:
    cfg = plan.cfg
    thorough = plan.depth == "full" and plan.workload == "heldout_fixed"
    thresholds = cfg.cache_thresholds if thorough and many else (cfg.cache_core_threshold,)
    out = []
    for suffix, sampler, scheduler, steps, nfe in base_samplers(plan, thorough):
        line = f"{node} on {sampler}/{scheduler}{suffix}"
        for t in thresholds:
            out.append(Setting(node.lower(), line, f"{node} threshold {t:g}, {sampler}/{scheduler} {steps} steps",
                               {"node": node, "reuse_threshold": t, "start_percent": START_PERCENT,
                                "end_percent": END_PERCENT, "sampler": sampler, "scheduler": scheduler,
                                "steps": steps, "uncached_nfe": nfe}, None))
    return out


def run_cache(bench, regime, queries, setting: Setting) -> Output:
    p = setting.params
    model = cached_model(bench, p["node"], p["reuse_threshold"])
    out = bench.plain_run(model, queries.prompts, queries.seeds, p["sampler"], p["scheduler"], p["steps"], regime.cfg)
    return Output(out, claim={"large": np.full(len(queries), p["uncached_nfe"]), "small": np.zeros(len(queries), np.int64)},
                  claim_kind="at_most")


register(Method("easycache", "cache", lambda plan: cache_settings("EasyCache", plan, True), run_cache,
                description="ComfyUI's EasyCache node on the reference sampler (and on the best sampler at T)"))
register(Method("lazycache", "cache", lambda plan: cache_settings("LazyCache", plan, True), run_cache,
                description="ComfyUI's LazyCache node on the reference sampler (and on the best sampler at T)"))
