"""ReDi inference (Algorithm 2 of Zhang et al., 2023) as a k-diffusion sampler: `sample_redi`.

`sample_redi` has the signature of every k-diffusion sampler, so ComfyUI's KSAMPLER wraps it
(`redi_ksampler`) into a SAMPLER that runs with SamplerCustomAdvanced and any GUIDER. The
ReDiSampler node, the four-node chain, the offline command, the demo and the benchmarks run
the same function or its documented parts (`retrieval.nearest_keys`, `fit_weights`,
`blend_entries`, `guard.Guard`, `resume_items`).

Inside a sampler function `x` is in the sampler's own space (KSAMPLER scaled the noise before
and unscales the output after). The knowledge base stores LATENT-dict latents, so the query
and the blended value cross between the two with `comfy_sampling.to_latent_space` /
`from_latent_space`, exactly as a LATENT leaves and re-enters ComfyUI's samplers.

Steps count from the start (0 = pure noise); the paper counts down (x_T is noise).
Shapes: B batch items, H neighbours, D = C*H*W.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

import comfy.samplers

from . import comfy_sampling as cs
from .errors import KBError, KBMismatchError
from .guard import GUARD_AUTO, ErrorGuard, Guard, resolve_error_guard, resolve_guard
from .guiders import CountedDenoiser, batch_view, patcher_at, run_sampler
from .kb import KnowledgeBase
from .records import describe_differences, differences
from .results import Evaluations, ReDiResult
from .retrieval import WEIGHT_MODES, WeightFit, blend_entries, fit_weights, nearest_keys
from .schedule import ReDiPlan, plan_redi

log = logging.getLogger("ReDi")

#: How close a run's SIGMAS must be to the KB's schedule (float32 schedules from one formula agree exactly).
SIGMA_TOLERANCE = (1e-5, 1e-7)


@dataclass
class ReDiRun:
    """One ReDi configuration, validated once by `make_run`; `sample_redi` leaves its ReDiResult in `result`."""

    kb: KnowledgeBase
    plan: ReDiPlan
    neighbours: int
    weight_mode: str
    guard: Guard | ErrorGuard  # residual guard, or (an error tolerance given) the error guard, fixed or adaptive
    ridge: float = 1e-2
    result: ReDiResult | None = None
    #: Called with each run's ReDiResult (the SamplerReDi node shows it on the canvas); None: log only.
    on_result: Callable[[ReDiResult], None] | None = None
    #: Steps whose states to keep for the items sampled in full (a learning KB's stored steps); () keeps none.
    keep_steps: tuple[int, ...] = ()
    #: After a run with keep_steps: {step: [n, C, H, W]} LATENT-dict space, the states of the n items the
    #: guard refused (accepted False, in batch order), which ran every step from noise; never a blended state.
    full_states: dict[int, torch.Tensor] | None = None


def make_run(kb: KnowledgeBase, key_step: int, value_step: int, neighbours: int = 3, weight_mode: str = "lstsq",
             guard: float = GUARD_AUTO, tolerance: float | str | None = None, adaptive: bool = False) -> ReDiRun:
    """Check every choice against the KB once, before anything is sampled.

    tolerance None: the residual guard `guard`. A number >= 0: the error guard replaces it, accepting
    an item when its predicted blend error (in units of the KB's spread there, read from the KB's
    stored blend-error model) is within it; "plain" (plain_reference.PLAIN): within the plain
    sampler's output error at equal NFE, per step from the KB's stored plain reference. `adaptive`
    lets each item jump to the latest step <= the value step that qualifies.
    """
    s = kb.settings
    plan = plan_redi(s.steps, key_step, value_step, s.stored_steps)
    check_neighbours(kb, neighbours, weight_mode)
    if tolerance is None:
        if adaptive:
            raise KBError("the adaptive skip needs the error guard: give an error tolerance >= 0 (error_tolerance on "
                          "the node, e.g. 0.1 of the KB's spread), or calibrate the KB with a checkpoint (`python -m "
                          "kb_tools calibrate KB --key-step K --neighbours H --ckpt CHECKPOINT`) so that auto means "
                          "'no worse than plain', or turn adaptive_skip off.")
        return ReDiRun(kb, plan, int(neighbours), weight_mode, resolve_guard(kb.calibration(key_step), key_step,
                                                                                int(neighbours), guard))
    gate = resolve_error_guard(kb.calibration(key_step), key_step, int(neighbours), value_step, tolerance, adaptive)
    return ReDiRun(kb, plan, int(neighbours), weight_mode, gate)


def check_neighbours(kb: KnowledgeBase, neighbours: int, weight_mode: str) -> None:
    """Refuse an empty KB, an H it cannot supply and an unknown weight mode (every retrieval run checks these once)."""
    if len(kb) == 0:
        raise KBError(f"the knowledge base at {kb.path} is empty; build it (BuildKnowledgeBase) before querying it.")
    if not 1 <= int(neighbours) <= len(kb):
        raise KBError(f"H = {neighbours} neighbours, but the knowledge base at {kb.path} holds {len(kb)} trajectories; "
                      f"choose H between 1 and {len(kb)}.")
    if weight_mode not in WEIGHT_MODES:
        raise KBError(f"unknown weight mode {weight_mode!r}; valid modes are {list(WEIGHT_MODES)}.")


def start_steps(guard: Guard | ErrorGuard, fit: WeightFit, plan: ReDiPlan
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per item (start step int64 [B], accepted bool [B], predicted error float64 [B] or None for the residual guard).

    An accepted item resumes from its blend at its start step; the others continue from x_k (start = key step).
    """
    if isinstance(guard, ErrorGuard):
        start, predicted = guard.start_steps(fit.centered_residual)
        return start, start != plan.key_step, predicted
    accepted = guard.accepts(fit.centered_residual)
    return np.where(accepted, plan.value_step, plan.key_step).astype(np.int64), accepted, None


def redi_ksampler(run: ReDiRun) -> comfy.samplers.KSAMPLER:
    """The SAMPLER (for SamplerCustomAdvanced, guider.sample or comfy.sample.sample_custom) that runs `run`."""
    return comfy.samplers.KSAMPLER(sample_redi, extra_options={"run": run})


@torch.no_grad()
def sample_redi(model, x, sigmas, extra_args=None, callback=None, disable=None, *, run: ReDiRun):
    """ReDi inference, Algorithm 2 of Zhang et al. (2023), with a per-item guard and start step.

    model: the k-diffusion denoiser (ComfyUI's KSamplerX0Inpaint around a GUIDER); x [B, C, H, W]:
    the scaled starting noise; sigmas: the KB's schedule. Returns x at sigmas[-1] and leaves a
    ReDiResult in run.result.
    """
    extra_args = {} if extra_args is None else extra_args
    run.result = run.full_states = None  # a failed run leaves no stale result behind
    kb, plan = run.kb, run.plan
    k = plan.key_step
    base = model.inner_model.inner_model  # the BaseModel: latent format and noise scaling
    warnings = check_sampling(run, model, x, sigmas, extra_args)
    sampler = comfy.samplers.sampler_object(kb.settings.sampler)  # the KB's own sampler
    tally = Evaluations(len(x))
    keep = {int(st): float(sigmas[st]) for st in run.keep_steps}
    # Lines 1-4: x_T ~ p(x_T) (KSAMPLER scaled the noise into x); sample x_T -> x_k, steps 0..k.
    first = CountedDenoiser(model, tally, range(len(x)), {st: s for st, s in keep.items() if st < k})
    x_k = run_sampler(sampler, first, x, sigmas[:k + 1], extra_args, callback, disable)
    # Line 5: the query q = x_k, in the KB's latent space: float32 [B, D], converted once.
    query = kb.as_queries(cs.to_latent_space(base, sigmas[k], x_k).float().cpu())
    # Line 6: the top-H neighbours j_1..j_H whose keys are nearest q.
    near = nearest_keys(kb, query, k, run.neighbours)
    # Line 7: w* = argmin_w d(q, sum_i w_i key^(j_i)), solved once, in the chosen mode.
    fit = fit_weights(query, near.keys, kb.key_spread(k), run.weight_mode, run.ridge)
    # The guard (not in the paper): per item its start step, the value step (or, adaptive, the latest
    # step whose predicted error is within the tolerance); an item the guard refuses continues from x_k.
    start, accepted, predicted = start_steps(run.guard, fit, plan)
    # Line 8: x_v_hat = sum_i w*_i val^(j_i), at each accepted item's own start step, in its own sigma.
    states = x_k.clone()
    for step in sorted(set(start[accepted].tolist())):
        rows = np.flatnonzero(accepted & (start == step))
        x_v = torch.from_numpy(blend_entries(kb, near.ids[rows], fit.weights[rows], step)).to(x_k)
        states[torch.from_numpy(rows).to(x_k.device)] = cs.from_latent_space(base, sigmas[step], x_v)
    # Lines 9-11: sample x_v_hat -> x_0 (each item from its own start step).
    kept: dict[int, torch.Tensor] = {}
    out = resume_items(model, states, start, sigmas, extra_args, callback, disable, sampler, tally, keep, kept)
    if keep:
        run.full_states = _full_states(base, sigmas, ~accepted, first.states, kept, keep) if not accepted.all() else \
            {st: torch.zeros((0, *kb.latent_shape)) for st in keep}
    run.result = ReDiResult(cs.to_latent_space(base, sigmas[-1], out).float().cpu(), plan, accepted, start, near.ids,
                            near.distances, fit.weights, fit.mode, fit.residual, fit.centered_residual, run.guard,
                            tally, tuple(warnings), predicted)
    log.info(run.result.summary())
    if run.on_result is not None:
        run.on_result(run.result)
    return out


def resume_items(model, states: torch.Tensor, start_steps: np.ndarray, sigmas: torch.Tensor, extra_args: dict,
                 callback, disable, sampler, tally: Evaluations, keep: dict[int, float] | None = None,
                 kept: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Sample each item from its own start step to the end (lines 9-11); items that share a step run together.

    states [B, C, H, W]: item i's state at sigmas[start_steps[i]], in the sampler's space. A
    subset of the batch runs on a view of the denoiser whose per-item conditioning is sliced to
    it (guiders.batch_view), so items with different prompts keep their own. keep {step: sigma}:
    the states the model is evaluated at there go into `kept[step]` [B, C, H, W] (sampler space,
    NaN for items that never passed that step).
    """
    batch = len(states)
    out = torch.empty_like(states)
    for step in sorted(set(int(s) for s in start_steps)):
        idx = np.flatnonzero(start_steps == step)
        denoiser = model if len(idx) == batch else batch_view(model, idx, batch)
        rows = torch.from_numpy(idx).to(states.device)
        counted = CountedDenoiser(denoiser, tally, idx, keep)
        out[rows] = run_sampler(sampler, counted, states[rows], sigmas[step:], extra_args, callback, disable, first_step=step)
        for st, state in counted.states.items() if kept is not None else ():
            kept.setdefault(st, torch.full_like(states, float("nan")))[rows] = state
    return out


def _full_states(base, sigmas: torch.Tensor, full: np.ndarray, before_key: dict[int, torch.Tensor],
                 resumed: dict[int, torch.Tensor], keep: dict[int, float]) -> dict[int, torch.Tensor]:
    """{step: [n, C, H, W]} LATENT-dict space of the `full` items (bool [B]): steps before the key step from the
    shared first part, the rest from their own resumed run (which started at the key step, so none is blended)."""
    rows = torch.from_numpy(np.flatnonzero(full))
    out = {}
    for st in keep:
        source = before_key if st in before_key else resumed
        if st not in source:
            raise KBError(f"the sampler never evaluated the model at step {st}, so its state cannot be kept; keep other "
                          "steps or use a sampler such as 'euler'.")
        out[st] = cs.to_latent_space(base, sigmas[st], source[st][rows.to(source[st].device)]).float().cpu()
    return out


# --------------------------------------------------------------------------- validation at the entry


def check_schedule(kb: KnowledgeBase, sigmas) -> None:
    """Refuse SIGMAS that are not the KB's schedule, naming each difference."""
    stored = {"steps": kb.settings.steps, "sigmas": kb.settings.sigmas}
    given = [float(s) for s in sigmas]
    diffs = differences(stored, {"steps": len(given) - 1, "sigmas": given}, tolerances={"sigmas": SIGMA_TOLERANCE})
    if diffs:
        r = kb.settings.recipe
        raise KBMismatchError(
            f"the SIGMAS are not the knowledge base's schedule: {describe_differences(diffs, 'knowledge base', 'SIGMAS')}. "
            f"Connect a BasicScheduler with scheduler '{r.scheduler}', {r.steps} steps and denoise 1.0 on the model the KB "
            f"was built with ({r.describe()}), or use the ReDiSampler node, which takes the schedule from the KB.")


def check_models(kb: KnowledgeBase, model_at: Callable[[float], object]) -> list[str]:
    """Refuse models the KB was not built with; `model_at(sigma)` is the ModelPatcher evaluating that sigma.

    Returns warnings (weight patches such as LoRAs differ). The KB's main model must evaluate
    the late steps; a KB whose keys a small model made (T-Stitch keys) needs that model for
    steps before its stitch step and the main model after.
    """
    s = kb.settings
    sigmas = s.sigmas
    main = model_at(sigmas[s.steps - 1])
    if cs.sampling_type(main) != s.sampling_type:
        raise KBMismatchError(f"sampling type: knowledge base has {s.sampling_type!r}, connected model has "
                              f"{cs.sampling_type(main)!r}. Connect the model the KB was built with.")
    warnings = cs.check_model_matches(s.model_fingerprint, main)
    stitch = int(s.extra.get("stitch_step", 0)) if s.key_model_fingerprint is not None else 0
    if stitch:
        small, after = model_at(sigmas[0]), model_at(sigmas[stitch])
        if small is main or small.is_clone(main):
            raise KBMismatchError(
                f"this knowledge base's keys were made by a small (T-Stitch) model for the first {stitch} steps; "
                "connect that model to the small_model input (ReDiSampler, ReDiPartialSample), or give SamplerReDi a "
                "TStitchGuider with it, or use a KB built without one.")
        warnings += cs.check_model_matches(s.key_model_fingerprint, small, what="small model")
        if not (after is main or after.is_clone(main)) or model_at(sigmas[stitch - 1]) is not small:
            raise KBMismatchError(f"the small model must run exactly the first {stitch} steps, as when the knowledge "
                                  f"base was built; set the TStitchGuider's switch to step {stitch} (fraction "
                                  f"{stitch / s.steps:g}).")
    else:
        first = model_at(sigmas[0])
        if not (first is main or first.is_clone(main)):
            warnings += cs.check_model_matches(s.model_fingerprint, first, what="early-step model")
    return warnings


def check_latent(kb: KnowledgeBase, shape) -> None:
    """Refuse a latent whose size the KB was not built for."""
    s = kb.settings
    shape = tuple(int(d) for d in shape)
    if shape != tuple(s.latent_shape):
        raise KBMismatchError(
            f"latent size: knowledge base has {list(s.latent_shape)} (C, H, W), the input latent is {list(shape)}. "
            f"Use an empty latent of {s.latent_shape[2] * 8}x{s.latent_shape[1] * 8} pixels (for 8x-downscaling VAEs) "
            "or a KB built for this size.")


def check_sampling(run: ReDiRun, model, x, sigmas, extra_args: dict) -> list[str]:
    """Everything sample_redi needs, checked before the first model evaluation; returns warnings."""
    if extra_args.get("denoise_mask") is not None:
        raise KBError("ReDi does not support a latent noise mask (inpainting): the stored trajectories start from an "
                      "empty latent. Remove the mask (SetLatentNoiseMask) or sample the masked latent with KSampler.")
    warnings = check_models(run.kb, lambda sigma: patcher_at(model, torch.tensor(sigma)))
    check_latent(run.kb, x.shape[1:])
    check_schedule(run.kb, sigmas)
    return warnings
