"""The KB-calibrated sampler (`kb_tools.calibrate_sampler`): per NFE, the calibrated multistep table on its schedule or
the built-in choice that beat it on held-out teachers, as the calibrated sampler node runs it.

The calibration's teachers are the regime KB's own entries (train captions from the KB seed, never
evaluation queries); it is computed once per regime with the regime's cfg, N = 4, 5, 6, 8, 10
(Config.calibrated_nfe), by its own resumable command (`head_to_head.py calibrate`: it takes
far longer than a run's chunk), and stored with the KB, committed N by N; the runner skips the
cells of an N not stored yet. The default (the node's steps 8) is the headline cell; the other N and the stack with ComfyUI's EasyCache are wider.
NFE: N for the calibrated table (one evaluation per step), the built-in sampler's own count on its
sigmas otherwise, claimed exactly (at most, under EasyCache).

HOOK: this module registers its methods only when `kb_tools` exports `calibrate_sampler`; without
it the benchmark runs every other method.
"""
from __future__ import annotations

import numpy as np
import torch

import kb_tools
from embedded import sampling as S
from embedded.rendering import LATENT_SHAPE
from embedded.text_encoder import encode
from kb_tools.comfy.model_facts import seeded_noise

from ..oracle import grid
from ..registry import Method, Output, Pending, Plan, Setting, register
from .caches import END_PERCENT, START_PERCENT, cached_model

AVAILABLE = "calibrate_sampler" in getattr(kb_tools, "_PUBLIC", {})
#: The calibrated sampler node's default steps.
DEFAULT_NFE = 8


def settings(plan: Plan, stack: bool = False) -> list[Setting]:
    nfe = plan.cfg.calibrated_nfe
    default = DEFAULT_NFE if DEFAULT_NFE in nfe else nfe[len(nfe) // 2]
    out = []
    for n in ([default] if stack else nfe):
        refine = plan.cfg.calibrated_refine_iterations
        line = "calibrated sampler" + (f" (refined x{refine})" if refine else "") + (" + EasyCache" if stack else "")
        params = {"nfe": n, "teachers": plan.cfg.calibrated_teachers, "refine_iterations": refine}
        if stack:
            params.update(node="EasyCache", reuse_threshold=plan.cfg.cache_core_threshold, start_percent=START_PERCENT,
                          end_percent=END_PERCENT)
        out.append(Setting("calibrated_easycache" if stack else "calibrated", line, f"{line}, N {n}", params, n,
                           default=not stack and n == default))
    return out


def calibration(bench, regime, teachers: int, compute: bool = False, should_stop=None):
    """The regime KB's stored sampler calibration for its cfg and every N. Missing: Pending, or with `compute` computed
    (`head_to_head.py calibrate`; resumable: should_stop() stops it with the finished teachers stored, and it returns
    None)."""
    key = ("calibration", regime.name)
    if key in bench.kbs:
        return bench.kbs[key]
    kb = bench.kb(regime).kb
    try:
        cal = kb_tools.load_sampler_calibration(kb.path)
        if regime.cfg not in cal.cfgs:
            cal = None
    except kb_tools.KBError:
        cal = None
    complete = cal is not None and set(bench.cfg.calibrated_nfe) <= set(cal.nfe_values)
    if cal is None and not compute:
        raise Pending(f"no sampler calibration stored with {regime.name}'s KB yet: run "
                      f"`benchmarks/head_to_head.py calibrate --regimes {regime.name}` first")
    if not compute and not complete:
        return cal  # the N committed so far run; the others stay pending (the calibration commits N by N)
    if not complete:
        bench.log(f"  calibrating the sampler on {regime.name}'s KB ({teachers} teachers from its entries)", flush=True)
        samplers, schedules = grid(bench.cfg)  # the oracle's grid: the built-in choices it must beat on held-out items
        cal = kb_tools.calibrate_sampler(kb.path, bench.plain_models["large"], encode, nfe=bench.cfg.calibrated_nfe,
                                         cfgs=(regime.cfg,), teachers=teachers, latent_shape=LATENT_SHAPE,
                                         samplers=samplers, schedules=schedules,
                                         refine_iterations=bench.cfg.calibrated_refine_iterations,
                                         should_stop=should_stop, log=lambda m: bench.log("    " + m, flush=True))
        if cal is None:
            return None
    bench.kbs[key] = cal
    return cal


def run_calibrated(bench, regime, queries, setting: Setting) -> Output:
    p = setting.params
    cal = calibration(bench, regime, p["teachers"])
    if p["nfe"] not in cal.nfe_values:
        raise Pending(f"N = {p['nfe']} is not calibrated yet (stored: {cal.nfe_values}): let "
                      f"`benchmarks/head_to_head.py calibrate --regimes {regime.name}` finish")
    block = next(b for b in cal.record["cfgs"].values() if abs(float(b["cfg"]) - regime.cfg) <= 1e-6)
    made_with = (block.get("settings") or {}).get("refine_iterations", 0)
    if made_with != p.get("refine_iterations", 0):  # another version of the method: its cells must not mix
        raise Pending(f"{regime.name}'s calibration was refined x{made_with}, this cell measures x{p['refine_iterations']}: "
                      f"run `benchmarks/head_to_head.py calibrate --regimes {regime.name}` with this config")
    choice = cal.choice(bench.plain_models["large"], regime.cfg, LATENT_SHAPE, p["nfe"])
    stacked = "node" in p
    model = cached_model(bench, p["node"], p["reuse_threshold"]) if stacked else bench.models["large"]
    positive, negative = S.conditioning(list(queries.prompts))
    guider = kb_tools.cfg_guider(model, positive, negative, regime.cfg)
    latent = S.empty_latents(len(queries))
    with torch.no_grad():
        out = guider.sample(seeded_noise(latent, list(queries.seeds)), latent, choice.ksampler(), choice.sigmas,
                            disable_pbar=True, seed=int(queries.seeds[0]))
    steps = choice.steps
    claim = steps if choice.kind == "calibrated" else kb_tools.nfe_for_steps(choice.sampler_name, steps)
    n = len(queries)
    return Output(out.detach().float().cpu(), claim={"large": np.full(n, claim), "small": np.zeros(n, np.int64)},
                  claim_kind="at_most" if stacked else "exact", extras={"choice": choice.summary_line()})


if AVAILABLE:
    register(Method("calibrated", "calibrated", settings, run_calibrated,
                    description="the KB-calibrated sampler: per N the calibrated multistep table on its schedule, or the "
                                "built-in choice that beat it on held-out teachers"))
    register(Method("calibrated_easycache", "stack", lambda plan: settings(plan, stack=True), run_calibrated,
                    workloads=("heldout_foreign", "heldout_fixed"),
                    description="the calibrated sampler (the node's default N) with ComfyUI's EasyCache"))
