"""Fewer steps of a plain sampler: the user's own sampler (euler/normal) at each budget, and the oracle's winner for it."""
from __future__ import annotations

import numpy as np

from ..registry import Method, Output, Plan, Setting, register


def plain_setting(method: str, line: str, sampler: str, scheduler: str, steps: int, budget: int, nfe: int,
                  note: str = "") -> Setting:
    """One plain run claiming `nfe` per item; its run_key makes identical runs (the oracle picking the reference) run once."""
    return Setting(method, line, f"{sampler}/{scheduler} {steps} steps{note}",
                   {"sampler": sampler, "scheduler": scheduler, "steps": steps, "claimed_nfe": nfe}, budget,
                   run_key=("plain", sampler, scheduler, steps), default=True)


def run_plain(bench, regime, queries, setting: Setting) -> Output:
    p = setting.params
    out = bench.plain_run(bench.models["large"], queries.prompts, queries.seeds, p["sampler"], p["scheduler"],
                          p["steps"], regime.cfg)
    n = len(queries)
    return Output(out, claim={"large": np.full(n, p["claimed_nfe"]), "small": np.zeros(n, np.int64)})


def reference_settings(plan: Plan) -> list[Setting]:
    """The reference sampler (euler: one evaluation per step) at each budget."""
    r = plan.regime
    line = f"plain {r.sampler}/{r.scheduler}"
    return [plain_setting("plain", line, r.sampler, r.scheduler, b, b, b) for b in plan.budgets]


def oracle_settings(plan: Plan) -> list[Setting]:
    """Each budget's winner; it claims the NFE counted for it on the selection set."""
    out = []
    for b in plan.budgets:
        c = plan.oracle.get(b)
        if c is None:  # every choice diverged or could not run at this budget
            continue
        out.append(plain_setting("oracle", "oracle: best sampler x scheduler per budget", c.sampler, c.scheduler,
                                 c.steps, b, c.nfe, f" (best at {b} NFE)"))
    return out


register(Method("plain", "plain", reference_settings, run_plain,
                description="the user's own sampler (euler/normal) at fewer steps"))
register(Method("oracle", "oracle", oracle_settings, run_plain,
                description="the best plain sampler x schedule for each budget against the converged reference, chosen on "
                            "selection captions (never evaluation queries)"))
