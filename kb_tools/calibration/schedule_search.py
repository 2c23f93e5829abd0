"""Candidate schedules for the calibrated sampler at N steps, and a search for its own error along the teachers.

Candidates: ComfyUI's schedules (comfy.schedules.PLAIN_SCHEDULES, as a user's KSampler or preset
node builds them), Karras et al. (2022) schedules with other rho, and `search_schedule`: coordinate
descent on the log-sigma knots of a start schedule, each trial scored by the caller (fit the
coefficients on it, roll the sampler out, compare with the teachers' ends), as schedule searches
fitted to the solver that uses them do (cf. GITS, Chen et al. 2024; OSS, Pei et al. 2025; S4S-Alt,
Frankel et al. 2025). Not Euler's truncation cost, which lost in the prototype.

A candidate starts at the model's sigma_max (the teachers' first state is the sampler's first
state) and ends at 0. Schedules are float64 [N + 1].
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..comfy.schedules import PLAIN_SCHEDULES, plain_sigmas
from ..core.errors import KBError
from ..core.multistep import check_sigmas

#: Karras rho values tried besides the built-in karras schedule's 7.
KARRAS_RHOS = (2.0, 3.0, 4.0, 5.0, 9.0)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """Karras et al. (2022) eq. 5 at `steps` steps, then 0: float64 [steps + 1]."""
    ramp = torch.linspace(0, 1, int(steps), dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def usable(sigmas, sigma_max: float) -> torch.Tensor | None:
    """The schedule float64 if the calibrated sampler can use it on the teachers (starts at sigma_max, ends at 0)."""
    try:
        sig = check_sigmas(sigmas)
    except KBError:
        return None  # e.g. a schedule with repeated sigmas at this N
    if not math.isclose(float(sig[0]), sigma_max, rel_tol=1e-4) or float(sig[-1]) != 0.0:
        return None
    sig = sig.clone()
    sig[0] = sigma_max  # the teacher's own first sigma: float32 rounding of a scheduler is not a new start
    return sig


def candidate_schedules(model, steps: int, sigma_min: float, sigma_max: float,
                        schedules=PLAIN_SCHEDULES, rhos=KARRAS_RHOS) -> dict[str, torch.Tensor]:
    """name -> float64 [steps + 1]: the built-in schedules the calibrated sampler can use, then karras_rho<r>."""
    out = {}
    for name in schedules:
        try:
            sig = usable(plain_sigmas(model, "euler", name, steps), sigma_max)
        except KBError:
            sig = None  # a preset that cannot make this N (e.g. one step)
        if sig is not None:
            out[name] = sig
    for rho in rhos:
        sig = usable(karras_sigmas(steps, sigma_min, sigma_max, rho), sigma_max)
        if sig is not None:
            out[f"karras_rho{rho:g}"] = sig
    if not out:
        raise KBError(f"no candidate schedule at {steps} steps starts at the model's sigma_max {sigma_max:.4g} and ends "
                      "at 0; calibrate at another number of steps.")
    return out


def search_schedule(start: torch.Tensor, score: Callable[[torch.Tensor], float], *, sweeps: int = 2,
                    step: float = 0.35, should_stop: Callable[[], bool] | None = None,
                    start_score: float | None = None) -> tuple[torch.Tensor, float, int]:
    """Coordinate descent on the interior knots' log sigma from `start` (float64 [N + 1]): (best, its score, trials).

    Each sweep moves every interior knot up and down by `step` of the log gap to its neighbours and
    keeps a move that lowers `score`; the step halves after each sweep. start_score: `start`'s score
    when the caller has it (saves one evaluation). The first sigma (sigma_max)
    and the last (0) stay; the order of the knots is kept.
    """
    best = check_sigmas(start).clone()
    best_score, trials = (float(score(best)), 1) if start_score is None else (float(start_score), 0)
    n = len(best) - 1
    for _ in range(int(sweeps)):
        for k in range(1, n):
            if should_stop is not None and should_stop():
                return best, best_score, trials
            hi = math.log(float(best[k - 1]))
            lo = math.log(float(best[k + 1])) if float(best[k + 1]) > 0 else math.log(float(best[k])) - 2.0
            here = math.log(float(best[k]))
            for target in (here + step * (hi - here), here - step * (here - lo)):
                trial = best.clone()
                trial[k] = math.exp(target)
                if not (trial[k - 1] > trial[k] > trial[k + 1]):
                    continue
                s = float(score(trial))
                trials += 1
                if s < best_score:
                    best, best_score = trial, s
                    break
        step /= 2.0
    return best, best_score, trials
