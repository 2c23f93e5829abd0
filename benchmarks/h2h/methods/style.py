"""Stylization without retrieval: one plain run that follows the content caption, then the styled caption (no step skipped)."""
from __future__ import annotations

import numpy as np

from embedded import sampling as S
from kb_tools.core.records import Recipe

from ..registry import Method, Output, Plan, Setting, register
from .redi import budgets_for


def switch_settings(plan: Plan) -> list[Setting]:
    """A prompt switch at each value step ReDi's stylization resumes from (v = k + T - budget)."""
    r = plan.regime
    k = r.key_step
    return [Setting("prompt_switch", "prompt switch, no retrieval", f"content caption for {k + r.steps - b} steps, then styled",
                    {"switch_step": k + r.steps - b, "sampler": r.sampler, "scheduler": r.scheduler, "steps": r.steps},
                    r.steps) for b in budgets_for(plan, k)]


def run_switch(bench, regime, queries, setting: Setting) -> Output:
    p = setting.params
    out = S.prompt_switch(bench.models["large"], list(queries.content_prompts), list(queries.prompts), list(queries.seeds),
                          Recipe(p["sampler"], p["scheduler"], p["steps"], regime.cfg), p["switch_step"])
    n = len(queries)
    return Output(out, claim={"large": np.full(n, p["steps"]), "small": np.zeros(n, np.int64)})


register(Method("prompt_switch", "style", switch_settings, run_switch, workloads=("style",),
                description="content caption up to the switch step, styled caption after, no retrieval"))
