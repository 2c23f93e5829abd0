"""The oracle a careful user would find: the best plain sampler x schedule for each NFE budget, against the converged solution.

Protocol (no selection bias): on held-out selection captions (never evaluation queries, each from
its own seed), every sampler of the grid (kb_tools' PLAIN_SAMPLERS) x every schedule (PLAIN_SCHEDULES:
KSampler's schedulers, AlignYourSteps SD1, GITS 1.2) runs at each budget with the most steps whose
counted NFE fits it (`steps_for_nfe`: Heun 2 per step, 1 on its last), scored by mean per-sample MSE
to the converged reference (converged.py). The grid is screened on the first `oracle_screen_captions`
selection captions; the `oracle_finalists` best of each budget then run on all `oracle_captions`, and
the lowest mean MSE wins. A choice that diverges (any non-finite output) or cannot run (a preset
schedule at one step) is excluded, with the reason kept. Only the winners run on evaluation queries.

Deterministic, so the result is cached in the scratch folder (keyed by everything it depends on) and
reused by every later run; its own cost is stored with it. The screening is saved after each budget,
so a selection that was stopped resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from benchmarks import metrics as M
from kb_tools.comfy.schedules import PLAIN_SAMPLERS, PLAIN_SCHEDULES, steps_for_nfe

from . import workloads
from .timing import Timer


@dataclasses.dataclass(frozen=True)
class Choice:
    """The winner of one budget: sampler, schedule, steps, its counted NFE and selection MSE to converged."""

    budget: int
    sampler: str
    scheduler: str      # a KSampler scheduler name or a preset schedule ("ays_sd1", "gits_1.2")
    steps: int
    nfe: int
    selection_mse: float

    def name(self) -> str:
        return f"{self.sampler}/{self.scheduler} {self.steps} steps"


def grid(cfg) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(samplers, schedules) the oracle walks."""
    return tuple(cfg.oracle_samplers or PLAIN_SAMPLERS), tuple(cfg.oracle_schedules or PLAIN_SCHEDULES)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _score(bench, regime, queries, truth, sampler: str, schedule: str, budget: int) -> dict:
    """One grid point on `queries`: counted NFE, mean MSE to `truth` [N, C, H, W], finiteness (or why it cannot run)."""
    steps = steps_for_nfe(sampler, budget)
    point = {"budget": budget, "sampler": sampler, "scheduler": schedule, "steps": steps}
    try:
        with bench.measure(len(queries)) as m:
            out = bench.plain_run(bench.models["large"], queries.prompts, queries.seeds, sampler, schedule, steps,
                                  regime.cfg)
    except Exception as e:  # a choice a user cannot run at this budget is excluded, with the reason
        return {**point, "excluded": f"{type(e).__name__}: {e}"}
    x = out.numpy()
    finite = bool(np.isfinite(x).all())
    nfe = int(m.nfe["large"].max())
    mse = M.per_sample_mse(np.nan_to_num(x, nan=1e6, posinf=1e6, neginf=-1e6), truth.numpy())
    point.update(nfe=nfe, fits_budget=nfe <= budget, finite=finite, mse_mean=float(mse.mean()) if finite else None)
    if not finite:
        point["excluded"] = "diverged (non-finite output)"
    elif nfe > budget:
        point["excluded"] = f"counted {nfe} NFE > budget {budget}"
    return point


def select(bench, cfg, regime, cache_dir: Path, log=print) -> dict:
    """{"winners": {budget: Choice}, "screen": [...], "final": [...], "protocol", "seconds"} for the regime."""
    samplers, schedules = grid(cfg)
    sel = workloads.selection(cfg)
    screen = sel.subset(range(min(cfg.oracle_screen_captions, len(sel))))
    key = {"model": regime.model, "cfg": regime.cfg, "steps_t": regime.steps, "samplers": samplers, "schedules": schedules,
           "budgets": sorted(regime.budgets), "prompts": sel.prompts, "seeds": sel.seeds, "screen": len(screen),
           "finalists": cfg.oracle_finalists, "converged": cfg.converged}
    path = cache_dir / f"oracle_{regime.name}_{_digest(key)}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        stored["winners"] = {int(b): Choice(**c) for b, c in stored["winners"].items()}
        return {**stored, "cached": True}
    log(f"  oracle {regime.name}: {len(samplers)} samplers x {len(schedules)} schedules x {len(regime.budgets)} budgets "
        f"on {len(screen)} screening / {len(sel)} selection captions", flush=True)
    partial = path.with_suffix(".partial.json")  # the screened points so far: a stopped selection resumes from them
    before = json.loads(partial.read_text()) if partial.is_file() else {"screen": [], "wall_seconds": 0.0, "cpu_seconds": 0.0}
    have = {(g["budget"], g["sampler"], g["scheduler"]): g for g in before["screen"]}
    with Timer() as total:
        truth = bench.converged(regime, sel).latents
        screened = []
        for b in sorted(regime.budgets):
            screened += [have.get((b, s, sch)) or _score(bench, regime, screen, truth[:len(screen)], s, sch, b)
                         for s in samplers for sch in schedules]
            now = total.elapsed()
            cache_dir.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"screen": screened, "wall_seconds": before["wall_seconds"] + now[0],
                                           "cpu_seconds": before["cpu_seconds"] + now[1]}))
        final, winners = [], {}
        for b in sorted(regime.budgets):
            ok = sorted((g for g in screened if g["budget"] == b and "excluded" not in g), key=lambda g: g["mse_mean"])
            runs = [_score(bench, regime, sel, truth, g["sampler"], g["scheduler"], b) for g in ok[:cfg.oracle_finalists]]
            final += runs
            good = [g for g in runs if "excluded" not in g]
            if not good:
                continue
            best = min(good, key=lambda g: g["mse_mean"])
            winners[b] = Choice(b, best["sampler"], best["scheduler"], best["steps"], best["nfe"], best["mse_mean"])
            log(f"    budget {b}: {winners[b].name()} ({best['nfe']} NFE), selection MSE {best['mse_mean']:.3g}", flush=True)
    result = {"protocol": (f"every sampler x schedule of the grid at each budget, screened on {len(screen)} selection "
                           f"captions, the {cfg.oracle_finalists} best per budget then on {len(sel)} ({sel.description}); "
                           "winner = lowest mean per-sample MSE to the converged reference among choices whose counted "
                           "NFE fits the budget and whose outputs are finite; only winners run on evaluation queries"),
              "samplers": list(samplers), "schedules": list(schedules), "selection_captions": len(sel),
              "screen_captions": len(screen), "screen": screened, "final": final,
              "winners": {b: dataclasses.asdict(c) for b, c in winners.items()},
              "wall_seconds": round(total.wall + before["wall_seconds"], 1), "cpu_seconds": round(total.cpu + before["cpu_seconds"], 1)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    partial.unlink(missing_ok=True)
    return {**result, "winners": winners, "cached": False}
