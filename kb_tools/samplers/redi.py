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
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import comfy.samplers
import numpy as np
import torch

from ..calibration.guard import GUARD_AUTO, ErrorGuard, Guard, resolve_error_guard, resolve_guard
from ..comfy import model_facts as cs
from ..comfy.counted import CountedDenoiser, resume_items, run_sampler
from ..core.errors import KBError
from ..core.evaluations import Evaluations
from ..core.schedule import ReDiPlan, plan_redi
from ..core.weights import WeightFit, fit_weights
from ..store import KnowledgeBase
from ..store.retrieval import blend_entries, nearest_keys
from .entry import _empty_latent_warning, check_neighbours, check_sampling, redi_guider
from .result import ReDiResult

log = logging.getLogger("ReDi")


@dataclass
class ReDiOutcome:
    """What one `sample_redi` call left behind; a fresh one replaces the last at the start of every call."""

    result: ReDiResult | None = None  # None until the call finished: a failed call leaves no stale result behind
    #: With the run's keep_steps: {step: [n, C, H, W]} LATENT-dict space, the states of the n items the guard
    #: refused (accepted False, in batch order), which ran every step from noise; never a blended state.
    full_states: dict[int, torch.Tensor] | None = None


@dataclass
class ReDiRun:
    """One ReDi configuration, validated once by `make_run`; each `sample_redi` call leaves its ReDiOutcome in `outcome`."""

    kb: KnowledgeBase
    plan: ReDiPlan
    neighbours: int
    weight_mode: str
    guard: Guard | ErrorGuard  # residual guard, or (an error tolerance given) the error guard, fixed or adaptive
    ridge: float = 1e-2
    #: Called with each run's ReDiResult (the SamplerReDi node shows it on the canvas); None: log only.
    on_result: Callable[[ReDiResult], None] | None = None
    #: Steps whose states to keep for the items sampled in full (a learning KB's stored steps); () keeps none.
    keep_steps: tuple[int, ...] = ()
    #: The last sample_redi call's outputs (written by sample_redi only).
    outcome: ReDiOutcome = field(default_factory=ReDiOutcome, repr=False, compare=False)

    @property
    def result(self) -> ReDiResult | None:
        """The last run's ReDiResult (None before one finished)."""
        return self.outcome.result

    @property
    def full_states(self) -> dict[int, torch.Tensor] | None:
        """The last run's kept states of the items sampled in full (see ReDiOutcome.full_states)."""
        return self.outcome.full_states


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
    ReDiResult in run.outcome (run.result).
    """
    extra_args = {} if extra_args is None else extra_args
    run.outcome = outcome = ReDiOutcome()  # a failed run leaves no stale result behind
    kb, plan = run.kb, run.plan
    k = plan.key_step
    base = model.inner_model.inner_model  # the BaseModel: latent format and noise scaling
    warnings = check_sampling(run.kb, model, x, sigmas, extra_args)
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
        outcome.full_states = _full_states(base, sigmas, ~accepted, first.states, kept, keep) if not accepted.all() else \
            {st: torch.zeros((0, *kb.latent_shape)) for st in keep}
    outcome.result = ReDiResult(cs.to_latent_space(base, sigmas[-1], out).float().cpu(), plan, accepted, start, near.ids,
                                near.distances, fit.weights, fit.mode, fit.residual, fit.centered_residual, run.guard,
                                tally, tuple(warnings), predicted)
    log.info(outcome.result.summary())
    if run.on_result is not None:
        run.on_result(outcome.result)
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


def generate(kb: KnowledgeBase, model, positive, negative, latent: torch.Tensor, seeds: Sequence[int], run: ReDiRun, *,
             resume_positive=None, small_model=None, small_positive=None, small_negative=None,
             callback: Callable | None = None) -> ReDiResult:
    """One ReDi generation of a batch (item i from the noise of seeds[i]); the ReDiSampler node.

    The same run as SamplerCustomAdvanced(ReDiKBNoise, CFGGuider, SamplerReDi, the KB's SIGMAS).
    """
    warnings = _empty_latent_warning(latent)
    guider = redi_guider(kb, model, positive, negative, key_step=run.plan.key_step, resume_positive=resume_positive,
                         small_model=small_model, small_positive=small_positive, small_negative=small_negative)
    latent = comfy.sample.fix_empty_latent_channels(guider.model_patcher, latent)
    sigmas = torch.tensor(kb.settings.sigmas, dtype=torch.float32)
    with torch.no_grad():
        guider.sample(cs.seeded_noise(latent, seeds), latent, redi_ksampler(run), sigmas, callback=callback,
                      disable_pbar=True, seed=int(seeds[0]))
    result = run.outcome.result
    return replace(result, warnings=tuple(warnings) + result.warnings) if warnings else result
