"""Retrieval for any seed (an experiment kept out of the nodes): ReDi keyed on the denoised estimate.

`benchmarks.any_seed_sampler` on the regime's KB: Euler to x_k, the nearest stored clean-image
predictions to the query's own, their blend at the value step v re-noised with the query's own
noise estimate, Euler from v (`benchmarks.any_seed_sampler.any_seed_sample`). One configuration, fixed in
advance: the best on foreign seeds in benchmarks/results/any_seed.md (32 held-out queries, the
800-entry KB, T = 20) at each of its budgets where the key is free: key source "previous" (the
sampler's own prediction at k - 1, no extra evaluation), value "blend+residual", lstsq weights,
H 3, k 2; its value steps 6, 10, 14 of T = 20, here as fractions of T (config.any_seed_value_fractions).
NFE = k + T - v per item, claimed exactly from the sampler's own count.
"""
from __future__ import annotations

import numpy as np

from embedded.captions import parse_prompt
from benchmarks.any_seed_sampler import AnySeedRun, any_seed_sample

from ..registry import Method, Output, Plan, Setting, register

WORKLOADS = ("heldout_foreign", "heldout_fixed", "iterate")
KEY_SOURCE, VALUE_MODE, WEIGHTS = "previous", "blend+residual", "lstsq"


def key_step(regime) -> int:
    """The regime's key step, at least 2: the "previous" key is the prediction at k - 1, a stored step >= 1."""
    return max(2, regime.key_step)


def any_seed_settings(plan: Plan) -> list[Setting]:
    r, h = plan.regime, plan.cfg.any_seed_h
    k = key_step(r)
    # v and v + 1 stored (the KB stores 1..T-1): D at v comes from the stored Euler step v -> v + 1.
    values = sorted({round(f * r.steps) for f in plan.cfg.any_seed_value_fractions} & set(range(k + 1, r.steps - 1)))
    line = f"any-seed k{k} H{h} {WEIGHTS}, {KEY_SOURCE} key, {VALUE_MODE}"
    return [Setting("any_seed", line, f"{line}, v{v} ({k + r.steps - v} NFE)",
                    {"k": k, "v": v, "h": h, "mode": WEIGHTS, "key_source": KEY_SOURCE, "value_mode": VALUE_MODE},
                    k + r.steps - v) for v in values]


def run_any_seed(bench, regime, queries, setting: Setting) -> Output:
    p = setting.params
    kb = bench.kb(regime).kb
    run = AnySeedRun(kb, p["k"], p["v"], p["h"], p["mode"], p["key_source"], p["value_mode"])
    out = any_seed_sample(kb, bench.models["large"], list(queries.prompts), list(queries.seeds), run)
    n = len(queries)
    entries = kb.entries
    same = np.array([[parse_prompt(entries[int(j)][0]).source == c.source for j in row]
                     for row, c in zip(run.ids, queries.captions)], float)
    residual = run.fit.centered_residual
    extras = {"centered_residual_median": float(np.median(residual)), "neighbours_same_source": float(same.mean()),
              "kb_entries": len(kb)}
    items = {"nfe": run.evaluations.per_item().tolist(), "centered_residual": [round(float(x), 4) for x in residual]}
    return Output(out, claim={"large": run.evaluations.per_item(), "small": np.zeros(n, np.int64)}, extras=extras,
                  items=items)


register(Method("any_seed", "any_seed", any_seed_settings, run_any_seed, WORKLOADS,
                description="retrieval for any seed (an experiment, in no node): neighbours found on the denoised "
                            "estimate, their blended clean image at v re-noised with the query's own noise"))
