"""A retrieval-corrected coarse Euler solver: `sample_kb_corrected_euler`.

A coarse Euler step from step a to step b of the KB's schedule lands away from the fine
trajectory by a truncation error that depends on the prompt and on the state. The KB knows that
error for its own trajectories: their fine state at b minus the coarse step from their own state
at a. Each coarse step of a query takes its own Euler step (one model evaluation) and adds the
blend of its neighbours' errors, with the weights of Algorithm 2's line 7 fitted on the keys at
a. The correction costs no model evaluation: the NFE is the coarse grid's.

The neighbours' coarse step needs their denoised prediction at a. A KB sampled with Euler holds
it implicitly: its fine step is x_{a+1} = x_a + (s_{a+1} - s_a) (x_a - D_a) / s_a, so their
coarse step is x_a + (s_b - s_a) / (s_{a+1} - s_a) (x_{a+1} - x_a), and a segment can be
corrected when the KB stores a, a + 1 and b (no format change). The KB never stores the last
step (sigma 0), so a segment that ends at T runs uncorrected; `coarse_grid` ends with the
schedule's own last step.

Steps count from the start (0 = pure noise). Shapes: B batch items, H neighbours, D = C*H*W.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import comfy.sample
import comfy.samplers
import numpy as np
import torch

from ..comfy import model_facts as cs
from ..comfy.counted import CountedDenoiser
from ..comfy.plain import cfg_guider
from ..core.coarse_grid import check_grid, coarse_errors, correctable, euler_step
from ..core.errors import KBError
from ..core.evaluations import Evaluations
from ..core.weights import WeightFit, fit_weights
from ..store import KnowledgeBase
from ..store.retrieval import NearestKeys, nearest_keys
from .entry import check_neighbours, check_sampling

log = logging.getLogger("ReDi")


@dataclass
class CorrectedOutcome:
    """What one corrected-solver call left behind; a fresh one replaces the last at the start of every call."""

    evaluations: Evaluations | None = None                  # None until the call's checks passed
    centered_residual: dict[int, np.ndarray] | None = None  # per corrected segment start a: float64 [B]


@dataclass
class CorrectedRun:
    """One corrected-solver configuration, validated once by `make_corrected_run`; each call leaves its CorrectedOutcome
    (tally, fits) in `outcome`."""

    kb: KnowledgeBase
    grid: tuple[int, ...]                      # coarse steps 0 .. T; NFE = len(grid) - 1
    neighbours: int
    weight_mode: str
    corrected: tuple[tuple[int, int], ...]     # the segments a -> b the KB corrects
    ridge: float = 1e-2
    #: Called with the run after it finished (the node shows its summary); None: log only.
    on_result: Callable[[CorrectedRun], None] | None = None
    #: The last call's outputs (written by the samplers only).
    outcome: CorrectedOutcome = field(default_factory=CorrectedOutcome, repr=False, compare=False)

    @property
    def evaluations(self) -> Evaluations | None:
        """The last call's model evaluations per item (None before one ran)."""
        return self.outcome.evaluations

    @property
    def centered_residual(self) -> dict[int, np.ndarray] | None:
        """The last call's centered residual per corrected segment start a: float64 [B] (None before one ran)."""
        return self.outcome.centered_residual

    def summary(self) -> str:
        """One line: what the run spent and which segments the KB corrected."""
        nfe = len(self.grid) - 1
        fits = "" if not self.centered_residual else \
            f", median centered residual {float(np.median(np.concatenate(list(self.centered_residual.values())))):.3g}"
        return (f"KB-corrected Euler: {nfe} model evaluations per item on grid {list(self.grid)}, {len(self.corrected)} of "
                f"{nfe} segments corrected by H={self.neighbours} neighbours{fits}")


def make_corrected_run(kb: KnowledgeBase, grid: Sequence[int], neighbours: int = 3,
                       weight_mode: str = "lstsq") -> CorrectedRun:
    """Check the KB (Euler, not empty), the grid and H once, before anything is sampled."""
    s = kb.settings
    if s.sampler != "euler":
        raise KBError(f"the corrected solver reads Euler directions off the stored trajectories, but the KB at {kb.path} "
                      f"was sampled with {s.sampler!r}; use a KB built with sampler 'euler'.")
    check_neighbours(kb, neighbours, weight_mode)
    g = check_grid(grid, s.steps)
    segments = tuple((a, b) for a, b in zip(g, g[1:]) if correctable(s.stored_steps, a, b))
    return CorrectedRun(kb, g, int(neighbours), weight_mode, segments)


def corrected_ksampler(run: CorrectedRun) -> comfy.samplers.KSAMPLER:
    """The SAMPLER (SamplerCustomAdvanced with the KB's SIGMAS, or guider.sample) that runs `run`."""
    return comfy.samplers.KSAMPLER(sample_kb_corrected_euler, extra_options={"run": run})


def _stored_states(kb: KnowledgeBase, base, sigmas: torch.Tensor, step: int, ids: np.ndarray) -> torch.Tensor:
    """Stored latents of ids [B, H] at `step` in the sampler's space: float32 [B, H, D]."""
    latent = torch.from_numpy(kb.latents(step, ids.reshape(-1)).astype(np.float32, copy=False))
    return cs.from_latent_space(base, sigmas[step], latent).reshape(*ids.shape, -1)


def key_fit(run: CorrectedRun, base, sigmas: torch.Tensor, x: torch.Tensor, a: int) -> tuple[NearestKeys, WeightFit]:
    """The query's H nearest stored keys at step a and the weights fitted on them (Algorithm 2, lines 5-7)."""
    kb = run.kb
    query = kb.as_queries(cs.to_latent_space(base, sigmas[a], x).float().cpu())
    near = nearest_keys(kb, query, a, run.neighbours)
    return near, fit_weights(query, near.keys, kb.key_spread(a), run.weight_mode, run.ridge)


def neighbour_correction(run: CorrectedRun, base, sigmas: torch.Tensor, x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """The blended truncation error of the query's neighbours for segment a -> b: [B, C, H, W] in the sampler's space."""
    kb = run.kb
    near, fit = key_fit(run, base, sigmas, x, a)
    run.outcome.centered_residual[a] = fit.centered_residual
    sig = [float(s) for s in sigmas]
    errors = coarse_errors(*(_stored_states(kb, base, sigmas, s, near.ids) for s in (a, a + 1, b)), sig, a, b)
    return torch.einsum("bh,bhd->bd", torch.from_numpy(fit.weights).to(errors), errors).reshape(x.shape).to(x)


def corrected_steps(run: CorrectedRun, denoiser, base, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict, callback,
                    first: int = 0, last: int | None = None) -> torch.Tensor:
    """The grid's Euler steps from step `first` to step `last` (default: the end), the stored segments corrected.

    x [B, C, H, W]: the state at sigmas[first] in the sampler's space; one evaluation of `denoiser`
    per segment. A caller that decides between segments (a guard) runs the grid in pieces.
    """
    last = run.grid[-1] if last is None else last
    s_in = x.new_ones([x.shape[0]])
    corrected = set(run.corrected)
    for a, b in zip(run.grid, run.grid[1:]):
        if a < first or b > last:
            continue
        denoised = denoiser(x, sigmas[a] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": a, "sigma": sigmas[a], "sigma_hat": sigmas[a], "denoised": denoised})
        x_b = euler_step(x, denoised, float(sigmas[a]), float(sigmas[b]))
        if (a, b) in corrected:
            x_b = x_b + neighbour_correction(run, base, sigmas, x, a, b)
        x = x_b
    return x


@torch.no_grad()
def sample_kb_corrected_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, *, run: CorrectedRun):
    """Euler on the coarse grid, each stored segment corrected by its neighbours' blended truncation error.

    model: the k-diffusion denoiser; x [B, C, H, W] the scaled starting noise; sigmas: the KB's
    full schedule (T + 1 values), evaluated only at the grid's steps.
    """
    extra_args = {} if extra_args is None else extra_args
    run.outcome = CorrectedOutcome()  # a failed call leaves no stale tally behind
    kb = run.kb
    base = model.inner_model.inner_model
    check_sampling(kb, model, x, sigmas, extra_args, "the corrected solver")
    run.outcome = CorrectedOutcome(Evaluations(len(x)), {})
    x = corrected_steps(run, CountedDenoiser(model, run.outcome.evaluations, range(len(x))), base, x, sigmas, extra_args,
                        callback)
    log.info(run.summary())
    if run.on_result is not None:
        run.on_result(run)
    return x


def generate(kb: KnowledgeBase, model, positive, negative, latent: torch.Tensor, seeds: Sequence[int],
             run: CorrectedRun) -> torch.Tensor:
    """One batch (item i from the noise of seeds[i]) with the KB's cfg: SamplerCustomAdvanced(CFGGuider, this SAMPLER,
    the KB's SIGMAS). Returns the LATENT-dict latents [B, C, H, W]."""
    guider = cfg_guider(model, positive, negative, kb.settings.cfg)
    latent = comfy.sample.fix_empty_latent_channels(guider.model_patcher, latent)
    sigmas = torch.tensor(kb.settings.sigmas, dtype=torch.float32)
    with torch.no_grad():
        out = guider.sample(cs.seeded_noise(latent, seeds), latent, corrected_ksampler(run), sigmas, disable_pbar=True,
                            seed=int(seeds[0]))
    return out.float().cpu()
