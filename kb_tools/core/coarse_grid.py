"""Coarse grids on a KB's schedule and the corrected solver's pure step math: which steps a coarse Euler run
evaluates, which segments the KB can correct, and the truncation error a stored fine step reveals."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .errors import KBError


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
    """The node's grid text: 'auto' (coarse_grid for `nfe`) or comma-separated steps such as '0,2,6,10,14,18,20'.

    An explicit grid fixes the number of evaluations itself (one per segment), so `nfe` must agree with
    it: a differing `nfe` would otherwise be silently ignored, and is refused with both ways out.
    """
    if text.strip().lower() in ("", "auto"):
        return coarse_grid(steps, nfe)
    try:
        steps_given = [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise KBError(f"could not read the coarse grid {text!r}: write 'auto' or steps separated by commas, "
                      f"e.g. '{','.join(map(str, coarse_grid(steps, min(6, steps))))}'.") from None
    grid = check_grid(steps_given, steps)
    segments = len(grid) - 1
    if int(nfe) != segments:
        raise KBError(f"the grid '{','.join(map(str, grid))}' has {segments} segment{'s' * (segments != 1)} "
                      f"({segments} evaluation{'s' * (segments != 1)}) but nfe is {nfe}: set nfe to {segments}, "
                      f"or set grid to 'auto' to spread nfe evaluations.")
    return grid


def learning_grid(sampler: str, steps: int, stored_steps: Sequence[int], nfe: int) -> tuple[int, ...]:
    """The coarse grid (`coarse_grid`) of `nfe` evaluations, checked against a KB's recipe and stored steps.

    Refuses a non-Euler recipe, a grid with no segment the KB could correct, and stored steps
    missing for a segment it should correct.
    """
    if sampler != "euler":
        raise KBError(f"the corrected solver reads Euler directions off the stored trajectories, but this learning KB "
                      f"samples with {sampler!r}; use sampler 'euler' for the learning KB (or the 'redi blend' solver).")
    grid = coarse_grid(steps, int(nfe))
    segments = skipping_segments(grid, steps)
    if not segments:
        usable = [n for n in range(1, steps + 1) if skipping_segments(coarse_grid(steps, n), steps)]
        raise KBError(f"{nfe} evaluations on the {steps}-step schedule give the grid {list(grid)}, which has no segment "
                      f"the KB can correct (the first starts at pure noise, the last ends at sigma 0); choose nfe "
                      f"{'from ' + str(usable[0]) + ' to ' + str(usable[-1]) if usable else 'on a longer schedule'}.")
    stored = set(int(s) for s in stored_steps)
    missing = sorted({s for a, b in segments for s in (a, a + 1, b)} - stored)
    if missing:
        raise KBError(f"the grid {list(grid)} needs the learning KB to store steps {missing}, which it does not (it stores "
                      f"{list(stored_steps)}); give the learning KB stored steps '1-{steps - 1}' (a new KB path).")
    return grid



def skipping_segments(grid: Sequence[int], steps: int) -> list[tuple[int, int]]:
    """The segments a -> b of `grid` that skip steps between stored ones (1 <= a, b <= steps - 1): those to correct."""
    return [(a, b) for a, b in zip(grid, grid[1:]) if b > a + 1 and a > 0 and b < steps]
