"""Stylization without retrieval: one plain run that follows the content caption, then the styled caption (no step skipped)."""
from __future__ import annotations

import numpy as np

from kb_tools import comfy_sampling as cs
from kb_tools.guiders import SwitchGuider
from kb_tools.plain import cfg_guider, sample_counted
from kb_tools.schedule import Switch

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
    model = bench.models["large"]
    content, negative = bench.conditioning(queries.content_prompts)
    styled, _ = bench.conditioning(queries.prompts)
    guider = SwitchGuider(cfg_guider(model, content, negative, regime.cfg), cfg_guider(model, styled, negative, regime.cfg),
                          Switch("step", p["switch_step"]), names=("model", "model"))
    sigmas = cs.schedule_sigmas(model, p["sampler"], p["scheduler"], p["steps"])
    out, _, _ = sample_counted(guider, bench.zeros(len(queries)), list(queries.seeds), sigmas, p["sampler"])
    n = len(queries)
    return Output(out, claim={"large": np.full(n, p["steps"]), "small": np.zeros(n, np.int64)})


register(Method("prompt_switch", "style", switch_settings, run_switch, workloads=("style",),
                description="content caption up to the switch step, styled caption after, no retrieval"))
