"""ComfyUI's native caches, applied exactly as their nodes apply them (comfy_extras.nodes_easycache), on the oracle's choice.

EasyCache and LazyCache skip model evaluations inside the model call for any seed with no
preparation. The node's execute() clones the plain model and adds its wrappers; the forward
counter is added after (innermost), so a skipped call costs nothing. Start and end percent are
the nodes' defaults; the threshold is the knob. They run on top of the oracle's choice at T (the
headline: EasyCache at the node's default threshold) and, as wider settings, at the middle budget
and on the user's own euler/normal at T.
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


def base_samplers(plan: Plan) -> list[tuple[str, str, str, int, int]]:
    """(base name, sampler, schedule, steps, NFE without a cache): the oracle's choice at T (first: the headline),
    at the middle budget, and the user's own sampler at T."""
    r = plan.regime
    out = []
    for b, name in ((r.steps, "oracle at T"), (plan.middle_budget, "oracle at the middle budget")):
        c = plan.oracle.get(b)
        if c is not None:
            out.append((name, c.sampler, c.scheduler, c.steps, c.nfe))
    out.append(("user's own sampler at T", r.sampler, r.scheduler, r.steps, r.steps))
    return out


def cache_settings(node: str, plan: Plan) -> list[Setting]:
    cfg = plan.cfg
    out = []
    for i, (base, sampler, scheduler, steps, nfe) in enumerate(base_samplers(plan)):
        line = f"{node} on {base}"
        thresholds = cfg.cache_thresholds if i == 0 else (cfg.cache_core_threshold,)
        for t in sorted(set(thresholds) | {cfg.cache_core_threshold}):
            out.append(Setting(node.lower(), line, f"{node} threshold {t:g}, {sampler}/{scheduler} {steps} steps",
                               {"node": node, "reuse_threshold": t, "start_percent": START_PERCENT,
                                "end_percent": END_PERCENT, "sampler": sampler, "scheduler": scheduler,
                                "steps": steps, "uncached_nfe": nfe}, None,
                               default=node == "EasyCache" and i == 0 and t == cfg.cache_core_threshold))
    return out


def run_cache(bench, regime, queries, setting: Setting) -> Output:
    p = setting.params
    model = cached_model(bench, p["node"], p["reuse_threshold"])
    out = bench.plain_run(model, queries.prompts, queries.seeds, p["sampler"], p["scheduler"], p["steps"], regime.cfg)
    return Output(out, claim={"large": np.full(len(queries), p["uncached_nfe"]), "small": np.zeros(len(queries), np.int64)},
                  claim_kind="at_most")


register(Method("easycache", "cache", lambda plan: cache_settings("EasyCache", plan), run_cache,
                description="ComfyUI's EasyCache node on the oracle's choice at T (and at the middle budget, and on "
                            "euler/normal at T)"))
register(Method("lazycache", "cache", lambda plan: cache_settings("LazyCache", plan), run_cache,
                description="ComfyUI's LazyCache node on the oracle's choice at T (and at the middle budget, and on "
                            "euler/normal at T)"))
