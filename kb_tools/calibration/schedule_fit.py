"""Per step count N: the schedule and the coefficient table of the calibrated sampler, chosen on the teacher items.

Every candidate schedule (schedule_search.candidate_schedules, then the coordinate-descent search
from the best of them) gets its table fitted by rollout least squares (sampler_fit.fit_coefficients)
on the FIT items and is scored by the calibrated sampler's final-state MSE to the teachers'
converged ends on the SELECT items, which did not fit it. The winner's table is then refitted on
fit + select items together and refined for the final state alone (refine_iterations; the held-out
items are never touched here).

Shapes: states [T, M + 1, C, H, W], denoised [T, M, C, H, W] for the session's T items (sampler
space); fine float64 [M + 1]; idx: indices into those T items.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..core.errors import KBError
from .live_model import CalibrationStopped, LiveBatch
from .sampler_fit import fit_coefficients, refine_for_final_state, rollout
from .schedule_search import KARRAS_RHOS, candidate_schedules, search_schedule
from .teacher import states_on

SEARCHED = "searched"


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


class ScheduleScorer:
    """fit on `fit` items, score on `select` items: one candidate schedule -> (MSE to the teachers' ends, table)."""

    def __init__(self, live: LiveBatch, states: torch.Tensor, denoised: torch.Tensor, fine: torch.Tensor,
                 fit: Sequence[int], select: Sequence[int]):
        self.live, self.states, self.denoised, self.fine = live, states, denoised, fine
        self.fit, self.select = list(fit), list(select)
        self.trials = 0

    def table(self, sigmas: torch.Tensor, items: Sequence[int]) -> torch.Tensor:
        """The rollout least-squares table float64 [N, 3] on `items`."""
        items = list(items)
        targets = states_on(self.states[items], self.denoised[items], self.fine, sigmas.tolist())
        return fit_coefficients(targets, sigmas, lambda z, s: self.live.denoise(z, s, items), sigmas).coeffs

    def final_mse(self, sigmas: torch.Tensor, coeffs: torch.Tensor, items: Sequence[int]) -> float:
        items = list(items)
        x0 = self.states[items, 0].to(self.live.kmodel.noise)
        out = rollout(lambda z, s: self.live.denoise(z, s, items), x0, sigmas, coeffs)
        return _mse(out.cpu(), self.states[items, -1])

    def __call__(self, sigmas: torch.Tensor) -> tuple[float, torch.Tensor]:
        self.trials += 1
        try:
            coeffs = self.table(sigmas, self.fit)
        except KBError:
            return float("inf"), torch.zeros(len(sigmas) - 1, 3, dtype=torch.float64)  # a degenerate schedule: no fit
        score = self.final_mse(sigmas, coeffs, self.select)
        return (score if score == score else float("inf")), coeffs


def calibrate_steps(live: LiveBatch, model, states: torch.Tensor, denoised: torch.Tensor, fine: torch.Tensor, nfe: int,
                    fit: Sequence[int], select: Sequence[int], *, schedules: Sequence[str], rhos=KARRAS_RHOS,
                    search_sweeps: int = 2, refine_iterations: int = 0,
                    should_stop: Callable[[], bool] | None = None) -> dict:
    """The calibrated sampler at `nfe` steps: {"schedule", "sigmas", "coeffs", "candidates": {name: select MSE},
    "select_mse", "trials", "refined"} (sampler-space MSEs; lists of floats, JSON-ready).

    refine_iterations: Levenberg-Marquardt iterations on the final table for the final state alone
    (sampler_fit.refine_for_final_state, the schedule kept), on every calibration item; "refined"
    holds their final MSE per iteration (empty when 0)."""
    scorer = ScheduleScorer(live, states, denoised, fine, fit, select)
    sigma_max, sigma_min = float(fine[0]), float(fine[-2])
    candidates = candidate_schedules(model, nfe, sigma_min, sigma_max, schedules, rhos)
    scores: dict[str, float] = {}
    for name, sig in candidates.items():
        if should_stop is not None and should_stop():
            raise CalibrationStopped
        scores[name] = scorer(sig)[0]
    best = min(scores, key=lambda k: (scores[k], k))
    if search_sweeps > 0 and nfe >= 2:
        found, found_score, _ = search_schedule(candidates[best], lambda s: scorer(s)[0], sweeps=search_sweeps,
                                                should_stop=should_stop, start_score=scores[best])
        if should_stop is not None and should_stop():
            raise CalibrationStopped
        candidates[SEARCHED], scores[SEARCHED] = found, found_score
        if found_score < scores[best]:
            best = SEARCHED
    sigmas = candidates[best]
    items = [*fit, *select]
    coeffs = scorer.table(sigmas, items)  # the final table: every calibration item, none held out
    refined: list[float] = []
    if refine_iterations > 0:
        # Landing each step on the teacher is not what the sampler is judged by: refine for where it ends.
        fitted = refine_for_final_state(
            lambda z, s: live.denoise(z, s, items), states[items, 0].to(live.kmodel.noise), states[items, -1], sigmas,
            coeffs, iterations=refine_iterations, should_stop=should_stop)
        coeffs, refined = fitted.coeffs, fitted.history
    return {"schedule": best, "sigmas": sigmas.tolist(), "coeffs": coeffs.tolist(),
            "candidates": {k: (v if v != float("inf") else None) for k, v in sorted(scores.items())},
            "select_mse": scores[best], "trials": scorer.trials, "refined": refined}
