"""ReDi against a knowledge base that learns from the user's own generations (the ReDiLearningSampler node).

The learning KB starts EMPTY at the workload's first item, in a folder of the run's scratch folder
that lives across runs (Bench.learning_folder; run.py keeps it consistent with the items stored,
rebuilding it deterministically where a run stopped between the two). The queries are
generated one at a time in the workload's order (`embedded.sampling.redi_learning`, i.e.
`kb_tools.samplers.redi_chain.generate_learning`): ReDi against what the KB holds so far with the residual
guard; the items the guard refused, and the first one while the KB is empty, ran every step
from noise and are learned, the blended ones never are. An item costs k + T - v NFE when it
blends and T when it does not, claimed exactly from the sampler's own count.

Settings, fixed in advance: the node's defaults (nodes/learning.py) on the regime's recipe:
key step 2 of 20 (the regime's, 10% of T), H 3, lstsq weights, guard 0.1 (a learning KB
stores no calibration), store steps "auto" (10% to 80% of T), a budget of 10000 entries; value
steps: the node's 10 of 20 (half of T, the default) and the one that costs the middle budget when it blends.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from embedded import sampling as S
from kb_tools.store import KBBudget
from kb_tools.core.records import Recipe
from kb_tools.core.schedule import parse_steps

from ..registry import Method, Output, Plan, Setting, register

WORKLOADS = ("heldout_foreign", "iterate", "reuse", "heldout_fixed")  # every workload: a fresh seed meets few earlier ones
def value_steps(plan: Plan) -> list[int]:
    """The node's default value step (10 of 20: half of T) and the middle budget's, among the stored steps after k."""
    r = plan.regime
    stored = parse_steps("auto", r.steps)
    steps = {r.steps // 2, r.key_step + r.steps - plan.middle_budget}
    return sorted(v for v in steps if v > r.key_step and v in stored)


def learning_settings(plan: Plan) -> list[Setting]:
    k, h = plan.regime.key_step, 3
    out = []
    for guard in plan.cfg.learning_guards:
        line = f"learning KB (starts empty) k{k} H{h} lstsq, guard {guard:g}"
        for v in value_steps(plan):
            jump = k + plan.regime.steps - v
            s = Setting("learning_kb", line, f"{line}, v{v} ({jump} NFE when it blends)",
                        {"k": k, "v": v, "h": h, "mode": "lstsq", "guard": guard, "store_steps": "auto",
                         "max_entries": plan.cfg.learning_max_entries}, None)
            out.append(dataclasses.replace(s, default=guard == 0.1 and v == plan.regime.default_value_step))
    return out


def run_learning(bench, regime, queries, setting: Setting) -> Output:
    """The queries in order, one at a time, against the setting's learning KB (empty before the workload's first item)."""
    p = setting.params
    recipe = Recipe(regime.sampler, regime.scheduler, regime.steps, regime.cfg)
    model = bench.models["large"]
    settings = S.learning_settings(model, recipe, parse_steps(p["store_steps"], regime.steps))
    budget = KBBudget(max_entries=p["max_entries"])
    folder = bench.learning_folder(regime, queries.workload, setting.method, setting.label)
    latents, nfe, blended, residual, entries = [], [], [], [], []
    for i, (prompt, seed) in enumerate(zip(queries.prompts, queries.seeds)):
        with bench.one_item(i):
            r = S.redi_learning(folder / "kb", settings, model, [prompt], [seed], key_step=p["k"],
                                value_step=p["v"], h=p["h"], guard=p["guard"], budget=budget)
        latents.append(r.latent)
        nfe.append(int(r.evaluations.per_item()[0]))
        blended.append(bool(r.redi is not None and r.redi.accepted[0]))
        residual.append(None if r.redi is None else round(float(r.redi.centered_residual[0]), 4))
        entries.append(r.learned.count)
    nfe_a, blended_a = np.array(nfe, np.int64), np.array(blended, bool)
    extras = {"blended": float(blended_a.mean()), "kb_entries_at_end": entries[-1]}
    items = {"nfe": nfe, "accepted": blended_a.astype(int).tolist(), "kb_entries": entries, "centered_residual": residual}
    n = len(queries)
    return Output(torch.cat(latents).float(), claim={"large": nfe_a, "small": np.zeros(n, np.int64)}, extras=extras, items=items)


register(Method("learning_kb", "learning", learning_settings, run_learning, WORKLOADS, sequential=True,
                description="ReDi against a KB that starts empty and learns every fully sampled generation in the "
                            "workload's order (the ReDiLearningSampler node at its defaults)"))
