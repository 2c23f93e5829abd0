"""The KB-corrected solver on a learning KB (`kb_tools.samplers.learning`).

No prebuilt KB: the queries run one at a time, in order, as a user generates, against a learning
KB that starts empty at the workload's first item, in a folder under the bench's scratch directory
that lives across runs (run.py keeps it consistent with the items stored). The default (the
learning node's solver option at its nfe 10 of 20) is the budget at half of T.
Item i is corrected at the budget's coarse grid (`corrected_solver.coarse_grid`) when the KB holds
>= H entries and the residual guard at the grid's first corrected step accepts (auto: the
fallback 0.5, a learning KB stores no calibration); else it is sampled in full with the regime's
euler recipe and learned. NFE per item, claimed exactly from that plan: the budget for a corrected
item, T for one made while the KB held < H entries, the grid's steps before its first corrected
step + T for one the guard refused.
"""
from __future__ import annotations

import numpy as np
import torch

from embedded import sampling as S
from kb_tools.core.coarse_grid import coarse_grid
from kb_tools.core.errors import KBError
from kb_tools.core.coarse_grid import learning_grid, skipping_segments
from kb_tools.core.records import Recipe

from ..registry import Method, Output, Plan, Setting, register

WORKLOADS = ("heldout_foreign", "iterate", "reuse", "heldout_fixed")  # every workload: a fresh seed meets few earlier ones
H = 3


def usable(steps: int, budget: int) -> bool:
    """The budget's coarse grid has a segment a learning KB corrects."""
    return budget < steps and bool(skipping_segments(coarse_grid(steps, budget), steps))


def settings(plan: Plan) -> list[Setting]:
    steps = plan.regime.steps
    out = []
    for b in (b for b in plan.budgets if usable(steps, b)):
        grid = coarse_grid(steps, b)
        line = f"learning KB + corrected euler H{H}, guard auto"
        out.append(Setting("learning_corrected", line, f"{line}, grid {','.join(map(str, grid))} ({b} NFE where corrected)",
                           {"grid": list(grid), "budget": b, "h": H}, b, default=b == plan.regime.default_value_step))
    return out


def run(bench, regime, queries, setting: Setting) -> Output:
    p, model, steps = setting.params, bench.models["large"], regime.steps
    if regime.sampler != "euler":
        raise KBError(f"the corrected solver needs an euler recipe; regime {regime.name} samples with {regime.sampler}")
    learn = S.learning_settings(model, Recipe(regime.sampler, regime.scheduler, steps, regime.cfg), range(1, steps))
    grid = learning_grid(learn.sampler, learn.steps, learn.stored_steps, p["budget"])
    before_guard = grid.index(skipping_segments(grid, steps)[0][0])  # evaluations spent before the guard's verdict
    folder = bench.learning_folder(regime, queries.workload, setting.method, setting.label)
    results = []
    for i, (prompt, seed) in enumerate(zip(queries.prompts, queries.seeds)):
        with bench.one_item(i):  # this generation's forward calls are query i's
            results.append(S.corrected_learning(folder / "kb", learn, model, [prompt], [seed], nfe=p["budget"], h=p["h"]))
    corrected = np.array([bool(r.corrected[0]) for r in results])
    judged = np.array([r.guard is not None for r in results])
    claim = np.where(corrected, p["budget"], np.where(judged, before_guard + steps, steps)).astype(np.int64)
    entries = [int(r.learned.count) for r in results]
    extras = {"corrected_share": float(corrected.mean()), "refused_by_guard": int((judged & ~corrected).sum()),
              "kb_entries_at_end": entries[-1] if entries else 0}
    # "accepted": the corrected items, which the report judges by themselves as it judges a learning KB's blends
    items = {"accepted": corrected.astype(int).tolist(), "nfe": claim.tolist(), "kb_entries": entries}
    return Output(torch.cat([r.latent for r in results]), claim={"large": claim, "small": np.zeros(len(claim), np.int64)},
                  extras=extras, items=items)


register(Method("learning_corrected", "learning", settings, run, WORKLOADS, sequential=True,
                description="queries in order against a learning KB that starts empty: the KB-corrected coarse euler where "
                            "the KB holds >= H entries and the residual guard accepts, else sampled in full and learned"))
