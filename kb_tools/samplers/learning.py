"""The KB-corrected coarse Euler solver against a learning KB: `generate_learning_corrected` (issue 12, sections 2 and 4).

A learning KB holds the user's own trajectories, mostly from the seed the artist keeps while
changing the prompt: where the corrected solver (`corrected_solver`) beats plain Euler at equal
NFE. Each item of a generation is either
- corrected: Euler on the coarse grid of `nfe` steps, each segment the KB stores corrected by
  its neighbours' blended truncation error (NFE = nfe), when the KB holds at least H entries and
  the residual guard accepts the fit of the item's neighbours at the first corrected segment's
  start a0 (the state after the grid's first, uncorrected step(s)); or
- sampled in full with the KB's recipe from its seed's noise, and learned (`learning.learn`).
  An item the guard refuses has spent the grid's steps before a0 already (1 evaluation on the
  default grid), so it costs T + 1; an item generated while the KB holds fewer than H entries
  costs T.
A corrected output is never stored: only trajectories sampled in full are.

The guard is `guard.resolve_guard` at step a0 and H: a given threshold, the KB's stored
calibration for that step and H, else FALLBACK_GUARD (half the KB's key spread); fixed before
the run, never measured during one. The KB must be sampled with Euler and store every step the
grid's corrected segments read (a, a + 1 and b): a learning KB storing steps 1..T-1 serves any
grid. Both are refused before anything is sampled, at the first generation.
Shapes: latents [B, C, H, W] in LATENT-dict space; B the batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import comfy.sample
import comfy.samplers
import numpy as np
import torch

from ..calibration.guard import GUARD_AUTO, Guard, resolve_guard
from ..comfy import model_facts as cs
from ..comfy.counted import CountedDenoiser, run_sampler, sample_counted
from ..comfy.guiders import batch_view, patcher_at
from ..comfy.plain import cfg_guider
from ..core.coarse_grid import learning_grid
from ..core.errors import KBError
from ..core.evaluations import Evaluations
from ..core.schedule import plan_redi
from ..store import KBBudget, KBSettings, open_or_create
from ..store.learning import LearnReport, learn
from .corrected import CorrectedRun, corrected_steps, key_fit, make_corrected_run
from .entry import check_latent, check_models, check_schedule
from .redi import generate, make_run
from .result import ReDiResult

log = logging.getLogger("ReDi")


@dataclass
class LearningCorrectedRun:
    """One generation's corrected run and its guard; the sampler leaves per-item outcomes behind."""

    corrected: CorrectedRun
    guard: Guard
    keep_steps: tuple[int, ...]                # the learning KB's stored steps, kept for the items sampled in full
    accepted: np.ndarray | None = None         # bool [B]: item ran the corrected grid
    centered_residual: np.ndarray | None = None  # float64 [B] at a0
    full_states: dict[int, torch.Tensor] | None = None  # {step: [n, C, H, W]} LATENT-dict, the refused items in order

    @property
    def guard_step(self) -> int:
        """a0: the start of the grid's first corrected segment, where the guard judges the fit."""
        return self.corrected.corrected[0][0]


@torch.no_grad()
def sample_learning_corrected(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
                              run: LearningCorrectedRun):
    """Coarse grid to a0; the guard; accepted items finish the corrected grid, refused ones restart from noise in full.

    model: the k-diffusion denoiser; x [B, C, H, W] the scaled starting noise; sigmas: the KB's schedule.
    """
    extra_args = {} if extra_args is None else extra_args
    cr, a0 = run.corrected, run.guard_step
    kb, base, batch = cr.kb, model.inner_model.inner_model, len(x)
    if extra_args.get("denoise_mask") is not None:
        raise KBError("the corrected solver does not support a latent noise mask (inpainting); remove SetLatentNoiseMask.")
    check_models(kb, lambda sigma: patcher_at(model, torch.tensor(sigma)))
    check_latent(kb, x.shape[1:])
    check_schedule(kb, sigmas)
    cr.evaluations, cr.centered_residual = Evaluations(batch), {}
    x_a0 = corrected_steps(cr, CountedDenoiser(model, cr.evaluations, range(batch)), base, x, sigmas, extra_args,
                           callback, last=a0)
    run.centered_residual = key_fit(cr, base, sigmas, x_a0, a0)[1].centered_residual
    run.accepted = run.guard.accepts(run.centered_residual)
    out = torch.empty_like(x)
    for accepted in (True, False):
        idx = np.flatnonzero(run.accepted == accepted)
        if not len(idx):
            continue
        view = model if len(idx) == batch else batch_view(model, idx, batch)  # per-item conditioning sliced to idx
        rows = torch.from_numpy(idx).to(x.device)
        if accepted:
            out[rows] = corrected_steps(cr, CountedDenoiser(view, cr.evaluations, idx), base, x_a0[rows], sigmas,
                                        extra_args, callback, first=a0)
            continue
        keep = {int(st): float(sigmas[st]) for st in run.keep_steps}
        counted = CountedDenoiser(view, cr.evaluations, idx, keep)
        out[rows] = run_sampler(comfy.samplers.sampler_object(kb.settings.sampler), counted, x[rows], sigmas,
                                extra_args, callback, disable)
        run.full_states = {st: cs.to_latent_space(base, sigmas[st], counted.states[st]).float().cpu() for st in keep}
    return out


@dataclass(frozen=True)
class LearningCorrectedResult:
    """One generation against a learning KB with the corrected solver: output, per-item path and NFE, what was learned."""

    latent: torch.Tensor            # [B, C, H, W] LATENT-dict space
    grid: tuple[int, ...]
    corrected: np.ndarray           # bool [B]: ran the corrected grid (never learned)
    centered_residual: np.ndarray   # float64 [B] at the guard step; NaN where the KB held fewer than H entries
    guard: Guard | None             # None: the KB held fewer than H entries, nothing was judged
    evaluations: Evaluations
    learned: LearnReport

    def summary(self) -> str:
        n, c = len(self.latent), int(self.corrected.sum())
        if self.guard is None:
            first = f"learning + corrected: the KB holds fewer than H entries, sampled all {n} item(s) in full"
        else:
            first = (f"learning + corrected: {c} of {n} item(s) on the corrected grid {list(self.grid)} "
                     f"({len(self.grid) - 1} evaluations), {n - c} refused and sampled in full ({self.guard.describe()})")
        return f"{first}; {self.evaluations.describe()}. {self.learned.summary()}"


def generate_learning_corrected(path: str, settings: KBSettings, model, positive, negative, latent: torch.Tensor,
                                prompts: Sequence[str], seeds: Sequence[int], *, nfe: int, neighbours: int = 3,
                                weight_mode: str = "lstsq", guard: float = GUARD_AUTO, budget: KBBudget = KBBudget(),
                                dtype: str = "float16", callback: Callable | None = None) -> LearningCorrectedResult:
    """Generate item i (prompts[i], the noise of seeds[i]) with the corrected solver at `nfe` where the learning KB at
    `path` fits it, else in full with the KB's recipe; then learn what was sampled in full.

    `settings` (from `redi.learning_settings`, sampler 'euler', stored steps 1..T-1) creates the KB on
    first use. H = `neighbours`: with fewer entries every item runs in full. guard: the residual
    guard at the grid's first corrected step (>= 0 a threshold; GUARD_AUTO the KB's calibration or
    FALLBACK_GUARD).
    """
    if len(prompts) != len(latent) or len(seeds) != len(latent):
        raise KBError(f"got {len(prompts)} prompts and {len(seeds)} seeds for a batch of {len(latent)}; give one each.")
    grid = learning_grid(settings.sampler, settings.steps, settings.stored_steps, nfe)  # refused now, not at the second generation
    kb = open_or_create(path, settings, dtype=dtype)
    if len(kb) < max(1, int(neighbours)):
        out, states, tally = sample_in_full(settings, model, positive, negative, latent, seeds, callback)
        corrected, residual, gate = np.zeros(len(out), bool), np.full(len(out), np.nan), None
    else:
        cr = make_corrected_run(kb, grid, neighbours, weight_mode)
        a0 = cr.corrected[0][0]
        run = LearningCorrectedRun(cr, resolve_guard(kb.calibration(a0), a0, int(neighbours), guard),
                                   tuple(settings.stored_steps))
        guider = cfg_guider(model, positive, negative, settings.cfg)
        latent = comfy.sample.fix_empty_latent_channels(guider.model_patcher, latent)
        sigmas = torch.tensor(settings.sigmas, dtype=torch.float32)
        sampler = comfy.samplers.KSAMPLER(sample_learning_corrected, extra_options={"run": run})
        with torch.no_grad():
            out = guider.sample(cs.seeded_noise(latent, seeds), latent, sampler, sigmas, callback=callback,
                                disable_pbar=True, seed=int(seeds[0])).detach().float().cpu()
        corrected, residual, gate, tally = run.accepted, run.centered_residual, run.guard, cr.evaluations
        states = run.full_states or {st: torch.zeros((0, *kb.latent_shape)) for st in settings.stored_steps}
    rows = np.flatnonzero(~corrected)
    learned = learn(path, settings, states, [prompts[i] for i in rows], [int(seeds[i]) for i in rows], budget, dtype=dtype)
    result = LearningCorrectedResult(out, grid, corrected, residual, gate, tally, learned)
    log.info(result.summary())
    return result


@dataclass(frozen=True)
class LearningResult:
    """One generation against a learning KB: its output, the ReDi run (None: the KB was empty, all plain), what was learned."""

    latent: torch.Tensor  # [B, C, H, W] LATENT-dict space
    redi: ReDiResult | None
    evaluations: Evaluations
    learned: LearnReport

    def summary(self) -> str:
        first = self.redi.summary() if self.redi is not None else (
            f"ReDi learning: the KB was empty, sampled all {len(self.latent)} item(s) in full; "
            f"{self.evaluations.describe()}")
        return f"{first}. {self.learned.summary()}"


def sample_in_full(settings: KBSettings, model, positive, negative, latent: torch.Tensor, seeds: Sequence[int],
                   callback: Callable | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor], Evaluations]:
    """Every item in full with a learning KB's recipe, keeping its stored steps: (latent, {step: latent}, evaluations)."""
    guider = cfg_guider(model, positive, negative, settings.cfg)
    sigmas = torch.tensor(settings.sigmas, dtype=torch.float32)
    return sample_counted(guider, latent, seeds, sigmas, settings.sampler, keep_steps=settings.stored_steps,
                          callback=callback)


def generate_learning(path: str, settings: KBSettings, model, positive, negative, latent: torch.Tensor,
                      prompts: Sequence[str], seeds: Sequence[int], *, key_step: int, value_step: int,
                      neighbours: int = 3, weight_mode: str = "lstsq", guard: float = GUARD_AUTO,
                      tolerance: float | None = None, adaptive: bool = False, budget: KBBudget = KBBudget(),
                      dtype: str = "float16", callback: Callable | None = None) -> LearningResult:
    """Generate item i (prompts[i], the noise of seeds[i]) with ReDi against the learning KB at `path`, then learn.

    First use (no KB, or an empty one): the KB is created with `settings` and every item runs
    the KB's recipe in full. Else a ReDi run (H = min(neighbours, entries)); the items its guard
    refused ran every step from noise and are learned, the blended ones never are. `settings`
    comes from `learning_settings` for the same model and recipe.
    """
    if len(prompts) != len(latent) or len(seeds) != len(latent):
        raise KBError(f"got {len(prompts)} prompts and {len(seeds)} seeds for a batch of {len(latent)}; give one each.")
    plan_redi(settings.steps, key_step, value_step, settings.stored_steps)  # refused now, not at the second generation
    kb = open_or_create(path, settings, dtype=dtype)
    if len(kb) == 0:
        out, states, tally = sample_in_full(settings, model, positive, negative, latent, seeds, callback)
        result, full = None, np.ones(len(out), bool)
    else:
        run = make_run(kb, key_step, value_step, min(int(neighbours), len(kb)), weight_mode, guard, tolerance, adaptive)
        run.keep_steps = tuple(settings.stored_steps)
        result = generate(kb, model, positive, negative, latent, seeds, run, callback=callback)
        out, tally, states, full = result.latent, result.evaluations, run.full_states, ~result.accepted
    rows = np.flatnonzero(full)
    learned = learn(path, settings, states, [prompts[i] for i in rows], [int(seeds[i]) for i in rows], budget, dtype=dtype)
    return LearningResult(out, result, tally, learned)
