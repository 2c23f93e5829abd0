"""T-Stitch (`kb_tools.samplers.tstitch.tstitch_sample` through `embedded.sampling.tstitch`): the small model runs the first fraction of the T steps, the large one the rest.

One sampler run; its cost in large-model NFE counts each small-model row at the FLOP ratio of
the two networks (Bench.small_cost).
"""
from __future__ import annotations

import numpy as np

from embedded import sampling as S
from kb_tools.core.records import Recipe

from ..registry import Method, Output, Plan, Setting, register


def fractions(plan: Plan) -> tuple:
    """The core fraction (the default: 40%, T-Stitch's DiT setting) first, the others after."""
    core = plan.cfg.tstitch_core_fraction
    return (core, *(f for f in plan.cfg.tstitch_fractions if f != core))


def tstitch_settings(plan: Plan) -> list[Setting]:
    r = plan.regime
    return [Setting("tstitch", f"T-Stitch {r.sampler}/{r.scheduler}", f"T-Stitch small model on the first {f:.0%} of {r.steps} steps",
                    {"small_fraction": f, "sampler": r.sampler, "scheduler": r.scheduler, "steps": r.steps}, None,
                    default=f == plan.cfg.tstitch_core_fraction)
            for f in fractions(plan)]


def run_tstitch(bench, regime, queries, setting: Setting, large=None) -> Output:
    """T-Stitch with `large` as the large model (default: the counted large model; stacks pass a cached one)."""
    p = setting.params
    out, result = S.tstitch(bench.models["small"], bench.models["large"] if large is None else large, list(queries.prompts), list(queries.seeds),
                            Recipe(p["sampler"], p["scheduler"], p["steps"], regime.cfg), p["small_fraction"])
    n, s = len(queries), result.small_steps
    return Output(out, claim={"large": np.full(n, p["steps"] - s), "small": np.full(n, s)},
                  extras={"small_steps": s, "small_cost_per_row": bench.small_cost})


register(Method("tstitch", "tstitch", tstitch_settings, run_tstitch,
                description="T-Stitch: the small model first, the large model after, one sampler run"))
