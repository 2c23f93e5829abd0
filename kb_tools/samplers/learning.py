"""Generating against a learning KB, then learning what was sampled in full: `generate_learning` (ReDi's blend) and
`generate_learning_corrected` (the KB-corrected coarse Euler solver), both thin wrappers
around one loop (`generate_and_learn`) that takes the solver as a parameter (`LearningSolver`).

The loop: check the batch and the solver's choices, open (or create) the KB, sample every item in
full with the KB's recipe while the KB cannot serve the solver, else run the solver, then
`learning.learn` the items sampled in full (never a blended or corrected output).

The corrected solver. A learning KB holds the user's own trajectories, mostly from the seed the artist keeps while
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
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import comfy.sample
import comfy.samplers
import numpy as np
import torch

from ..calibration.guard import GUARD_AUTO, Guard, resolve_guard
from ..comfy import model_facts as cs
from ..comfy.counted import CountedDenoiser, run_sampler, sample_counted
from ..comfy.guiders import batch_view
from ..comfy.plain import cfg_guider
from ..core.coarse_grid import learning_grid
from ..core.errors import KBError
from ..core.evaluations import Evaluations
from ..core.schedule import plan_redi
from ..store import KBBudget, KBSettings, KnowledgeBase, open_or_create
from ..store.learning import LearnReport, learn
from .corrected import CorrectedOutcome, CorrectedRun, corrected_steps, key_fit, make_corrected_run
from .entry import check_sampling
from .redi import generate, make_run
from .result import ReDiResult

log = logging.getLogger("ReDi")


@dataclass
class LearningCorrectedOutcome:
    """What one `sample_learning_corrected` call left behind per item; a fresh one replaces the last at every call."""

    accepted: np.ndarray | None = None           # bool [B]: item ran the corrected grid
    centered_residual: np.ndarray | None = None  # float64 [B] at a0
    full_states: dict[int, torch.Tensor] | None = None  # {step: [n, C, H, W]} LATENT-dict, the refused items in order


@dataclass
class LearningCorrectedRun:
    """One generation's corrected run and its guard; each sampler call leaves its per-item outcome in `outcome`."""

    corrected: CorrectedRun
    guard: Guard
    keep_steps: tuple[int, ...]                # the learning KB's stored steps, kept for the items sampled in full
    outcome: LearningCorrectedOutcome = field(default_factory=LearningCorrectedOutcome, repr=False, compare=False)

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
    run.outcome = outcome = LearningCorrectedOutcome()  # a failed call leaves no stale outcome behind
    cr, a0 = run.corrected, run.guard_step
    cr.outcome = CorrectedOutcome()
    kb, base, batch = cr.kb, model.inner_model.inner_model, len(x)
    check_sampling(kb, model, x, sigmas, extra_args, "the corrected solver")
    cr.outcome = CorrectedOutcome(Evaluations(batch), {})
    x_a0 = corrected_steps(cr, CountedDenoiser(model, cr.evaluations, range(batch)), base, x, sigmas, extra_args,
                           callback, last=a0)
    outcome.centered_residual = key_fit(cr, base, sigmas, x_a0, a0)[1].centered_residual
    outcome.accepted = run.guard.accepts(outcome.centered_residual)
    out = torch.empty_like(x)
    for accepted in (True, False):
        idx = np.flatnonzero(outcome.accepted == accepted)
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
        outcome.full_states = {st: cs.to_latent_space(base, sigmas[st], counted.states[st]).float().cpu() for st in keep}
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
    solver = CorrectedLearningSolver(nfe, neighbours, weight_mode, guard)
    sampled, learned = generate_and_learn(path, settings, model, positive, negative, latent, prompts, seeds, solver,
                                          budget=budget, dtype=dtype, callback=callback)
    run: LearningCorrectedRun | None = sampled.record
    if run is None:  # the KB held fewer than H entries: nothing was judged
        n = len(sampled.latent)
        corrected, residual, gate = np.zeros(n, bool), np.full(n, np.nan), None
    else:
        corrected, residual, gate = run.outcome.accepted, run.outcome.centered_residual, run.guard
    result = LearningCorrectedResult(sampled.latent, solver.grid, corrected, residual, gate, sampled.evaluations, learned)
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
    solver = ReDiLearningSolver(key_step, value_step, neighbours, weight_mode, guard, tolerance, adaptive)
    sampled, learned = generate_and_learn(path, settings, model, positive, negative, latent, prompts, seeds, solver,
                                          budget=budget, dtype=dtype, callback=callback)
    return LearningResult(sampled.latent, sampled.record, sampled.evaluations, learned)


# --------------------------------------------------------------------------- the loop, and its two solvers


@dataclass(frozen=True)
class Sampled:
    """One learning generation's sampling, whichever path it took: the loop learns `full_states` (the `in_full` items)."""

    latent: torch.Tensor                  # [B, C, H, W] LATENT-dict space
    evaluations: Evaluations
    full_states: dict[int, torch.Tensor]  # {step: [n, C, H, W]} LATENT-dict, the n items sampled in full, in batch order
    in_full: np.ndarray                   # bool [B]: the item ran every step from its seed's noise (learned)
    record: object = None                 # the solver's own record of the run; None: the KB could not serve it


class LearningSolver(Protocol):
    """A solver against a learning KB, as `generate_and_learn` runs it."""

    def check(self, settings: KBSettings) -> None:
        """Refuse a choice that the KB's settings can never serve: at the first generation, before anything is sampled."""

    def serves(self, kb: KnowledgeBase) -> bool:
        """Whether the KB holds enough entries for the solver; if not, every item is sampled in full."""

    def solve(self, kb: KnowledgeBase, settings: KBSettings, model, positive, negative, latent: torch.Tensor,
              seeds: Sequence[int], callback: Callable | None) -> Sampled:
        """Sample the batch against the opened KB, keeping the stored steps of the items sampled in full."""


def generate_and_learn(path: str, settings: KBSettings, model, positive, negative, latent: torch.Tensor,
                       prompts: Sequence[str], seeds: Sequence[int], solver: LearningSolver, *, budget: KBBudget,
                       dtype: str, callback: Callable | None) -> tuple[Sampled, LearnReport]:
    """One generation against the learning KB at `path` (created with `settings` on first use) with `solver`, or every
    item in full while the KB cannot serve it; then learn the items sampled in full. Returns (sampled, learned)."""
    if len(prompts) != len(latent) or len(seeds) != len(latent):
        raise KBError(f"got {len(prompts)} prompts and {len(seeds)} seeds for a batch of {len(latent)}; give one each.")
    solver.check(settings)  # refused now, not at the second generation
    kb = open_or_create(path, settings, dtype=dtype)
    if solver.serves(kb):
        sampled = solver.solve(kb, settings, model, positive, negative, latent, seeds, callback)
    else:
        out, states, tally = sample_in_full(settings, model, positive, negative, latent, seeds, callback)
        sampled = Sampled(out, tally, states, np.ones(len(out), bool))
    rows = np.flatnonzero(sampled.in_full)
    learned = learn(path, settings, sampled.full_states, [prompts[i] for i in rows], [int(seeds[i]) for i in rows],
                    budget, dtype=dtype)
    return sampled, learned


@dataclass(frozen=True)
class ReDiLearningSolver:
    """ReDi's blend (`redi.generate`, H = min(neighbours, entries)); its record is the ReDiResult. Serves a non-empty KB."""

    key_step: int
    value_step: int
    neighbours: int
    weight_mode: str
    guard: float
    tolerance: float | None
    adaptive: bool

    def check(self, settings: KBSettings) -> None:
        plan_redi(settings.steps, self.key_step, self.value_step, settings.stored_steps)

    def serves(self, kb: KnowledgeBase) -> bool:
        return len(kb) > 0

    def solve(self, kb, settings, model, positive, negative, latent, seeds, callback) -> Sampled:
        run = make_run(kb, self.key_step, self.value_step, min(int(self.neighbours), len(kb)), self.weight_mode,
                       self.guard, self.tolerance, self.adaptive)
        run.keep_steps = tuple(settings.stored_steps)
        result = generate(kb, model, positive, negative, latent, seeds, run, callback=callback)
        return Sampled(result.latent, result.evaluations, run.outcome.full_states, ~result.accepted, result)


@dataclass
class CorrectedLearningSolver:
    """The corrected solver with its guard (`sample_learning_corrected`); its record is the LearningCorrectedRun.
    Serves a KB of at least H entries."""

    nfe: int
    neighbours: int
    weight_mode: str
    guard: float
    grid: tuple[int, ...] = ()  # the coarse grid, set by `check`

    def check(self, settings: KBSettings) -> None:
        self.grid = learning_grid(settings.sampler, settings.steps, settings.stored_steps, self.nfe)

    def serves(self, kb: KnowledgeBase) -> bool:
        return len(kb) >= max(1, int(self.neighbours))

    def solve(self, kb, settings, model, positive, negative, latent, seeds, callback) -> Sampled:
        cr = make_corrected_run(kb, self.grid, self.neighbours, self.weight_mode)
        a0 = cr.corrected[0][0]
        run = LearningCorrectedRun(cr, resolve_guard(kb.calibration(a0), a0, int(self.neighbours), self.guard),
                                   tuple(settings.stored_steps))
        guider = cfg_guider(model, positive, negative, settings.cfg)
        latent = comfy.sample.fix_empty_latent_channels(guider.model_patcher, latent)
        sigmas = torch.tensor(settings.sigmas, dtype=torch.float32)
        sampler = comfy.samplers.KSAMPLER(sample_learning_corrected, extra_options={"run": run})
        with torch.no_grad():
            out = guider.sample(cs.seeded_noise(latent, seeds), latent, sampler, sigmas, callback=callback,
                                disable_pbar=True, seed=int(seeds[0])).detach().float().cpu()
        states = run.outcome.full_states or {st: torch.zeros((0, *kb.latent_shape)) for st in settings.stored_steps}
        return Sampled(out, cr.evaluations, states, ~run.outcome.accepted, run)
