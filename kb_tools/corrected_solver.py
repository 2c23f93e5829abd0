"""A retrieval-corrected coarse Euler solver: `sample_kb_corrected_euler` (issue 12, section 4).

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
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

import comfy.sample
import comfy.samplers

from . import comfy_sampling as cs
from .errors import KBError
from .guiders import CountedDenoiser, patcher_at
from .kb import KnowledgeBase
from .plain import cfg_guider
from .redi_sampler import check_latent, check_models, check_neighbours, check_schedule
from .results import Evaluations
from .retrieval import NearestKeys, WeightFit, fit_weights, nearest_keys

log = logging.getLogger("ReDi")


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma_a: float, sigma_b: float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from sigma_a to sigma_b (Karras et al. 2022, Alg. 1 without churn)."""
    return x + (x - denoised) * ((sigma_b - sigma_a) / sigma_a)


def coarse_errors(x_a: torch.Tensor, x_next: torch.Tensor, x_b: torch.Tensor, sigmas: Sequence[float], a: int,
                  b: int) -> torch.Tensor:
    """Fine state at b minus the coarse Euler step a -> b, for Euler trajectories known at a, a + 1 and b.

    x_a, x_next, x_b: [..., D] states at steps a, a + 1, b in the sampler's space; the Euler
    direction at a is read off the fine step a -> a + 1 (no model evaluation).
    """
    ratio = (sigmas[b] - sigmas[a]) / (sigmas[a + 1] - sigmas[a])
    return x_b - x_a - ratio * (x_next - x_a)


def correctable(stored: Sequence[int], a: int, b: int) -> bool:
    """A segment a -> b has an error to correct when it skips steps, and the KB can correct it when it stores a, a + 1, b."""
    return b > a + 1 and {a, a + 1, b} <= {int(s) for s in stored}


def coarse_grid(steps: int, nfe: int) -> tuple[int, ...]:
    """The default coarse grid for `nfe` evaluations on a `steps`-step schedule.

    A short first step 0 -> round(0.1 T) (the KB stores no pure noise, so it is never
    corrected), the schedule's own last step T - 1 -> T (sigma_min to 0: the KB stores no sigma
    0, so that step is taken exactly, as the fine run takes it), the steps between evenly spread.
    Chosen among three rules on 24 held-out selection captions that are never evaluation queries
    (benchmarks/corrected_grid_selection.py -> results/corrected_grid_selection.json says which won where).
    """
    if not 1 <= nfe <= steps:
        raise KBError(f"the corrected solver needs between 1 and {steps} evaluations on this {steps}-step schedule, got {nfe}.")
    first, last = max(1, math.floor(0.1 * steps + 0.5)), steps - 1
    if nfe < 3 or last - first < nfe - 2:
        return tuple(sorted({math.floor(i * steps / nfe + 0.5) for i in range(nfe + 1)}))
    inner = [first + math.floor(i * (last - first) / (nfe - 2) + 0.5) for i in range(nfe - 1)]
    return (0, *inner, steps)


def check_grid(grid: Sequence[int], steps: int) -> tuple[int, ...]:
    """A coarse grid: step numbers rising strictly from 0 to `steps` (its NFE is its length - 1)."""
    try:
        g = tuple(int(s) for s in grid)
    except (TypeError, ValueError):
        raise KBError(f"the coarse grid must be a list of step numbers, got {grid!r}; e.g. [0, 2, 6, 10, 14, 18, 20].") from None
    if len(g) < 2 or g[0] != 0 or g[-1] != steps or any(b <= a for a, b in zip(g, g[1:])):
        raise KBError(f"the coarse grid {list(g)} must rise strictly from 0 to the KB's {steps} steps; "
                      f"e.g. {list(coarse_grid(steps, min(6, steps)))}.")
    return g


def parse_grid(text: str, steps: int, nfe: int) -> tuple[int, ...]:
    """The node's grid text: 'auto' (coarse_grid for `nfe`) or comma-separated steps such as '0,2,6,10,14,18,20'."""
    if text.strip().lower() in ("", "auto"):
        return coarse_grid(steps, nfe)
    try:
        steps_given = [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise KBError(f"could not read the coarse grid {text!r}: write 'auto' or steps separated by commas, "
                      f"e.g. '{','.join(map(str, coarse_grid(steps, min(6, steps))))}'.") from None
    return check_grid(steps_given, steps)


@dataclass
class CorrectedRun:
    """One corrected-solver configuration, validated once by `make_corrected_run`; a run leaves its tally behind."""

    kb: KnowledgeBase
    grid: tuple[int, ...]                      # coarse steps 0 .. T; NFE = len(grid) - 1
    neighbours: int
    weight_mode: str
    corrected: tuple[tuple[int, int], ...]     # the segments a -> b the KB corrects
    ridge: float = 1e-2
    evaluations: Evaluations | None = None
    centered_residual: dict[int, np.ndarray] | None = None  # per corrected segment start a: float64 [B]
    #: Called with the run after it finished (the node shows its summary); None: log only.
    on_result: Callable[[CorrectedRun], None] | None = None

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
    run.centered_residual[a] = fit.centered_residual
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
    kb = run.kb
    base = model.inner_model.inner_model
    if extra_args.get("denoise_mask") is not None:
        raise KBError("the corrected solver does not support a latent noise mask (inpainting); remove SetLatentNoiseMask.")
    check_models(kb, lambda sigma: patcher_at(model, torch.tensor(sigma)))
    check_latent(kb, x.shape[1:])
    check_schedule(kb, sigmas)
    run.evaluations, run.centered_residual = Evaluations(len(x)), {}
    x = corrected_steps(run, CountedDenoiser(model, run.evaluations, range(len(x))), base, x, sigmas, extra_args, callback)
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
