"""Teacher trajectories: DPM-Solver++(2M) on a fine karras grid, keeping the state and the prediction at every point.

A teacher of item i is the run of ComfyUI's dpmpp_2m (Lu et al. 2022, DPM-Solver++(2M); here
core.multistep with its exact coefficient table) on karras at M steps from the item's seeded
noise: states [M + 1] (the last one the converged end at sigma 0) and predictions D [M]. The
state at ANY sigma between two fine points comes without new model evaluations: one
DPM-Solver++(2M) step from the fine point just above it with the stored predictions
(`state_at`), so the calibration can fit on any candidate schedule.

Shapes: states [B, M + 1, C, H, W], denoised [B, M, C, H, W] (sampler space), fine sigmas float64 [M + 1].
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..comfy import model_facts as facts
from ..core.errors import KBError
from ..core.multistep import calibrated_step, dpmpp_2m_coefficients
from .live_model import LiveBatch

#: The teacher's solver and schedule (ComfyUI names) and its default number of fine steps.
TEACHER_SAMPLER, TEACHER_SCHEDULE, DEFAULT_FINE_STEPS = "dpmpp_2m", "karras", 100


def fine_sigmas(model, steps: int) -> torch.Tensor:
    """The teacher's grid: karras at `steps` steps as KSampler builds it, float64 [steps + 1]."""
    if not 8 <= int(steps) <= 4000:
        raise KBError(f"the teacher's fine grid needs 8 to 4000 steps, got {steps}; the default is {DEFAULT_FINE_STEPS}.")
    return facts.schedule_sigmas(model, TEACHER_SAMPLER, TEACHER_SCHEDULE, int(steps)).double()


def run_teacher(live: LiveBatch, sigmas: torch.Tensor, idx: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(states [B, M + 1, C, H, W], denoised [B, M, C, H, W]) float32 CPU of items `idx` on `sigmas` (M steps)."""
    table = dpmpp_2m_coefficients(sigmas)
    x = live.start(float(sigmas[0]), idx)
    states, preds, history = [x.float().cpu()], [], []
    for i in range(len(sigmas) - 1):
        d = live.denoise(x, float(sigmas[i]), idx)
        if not torch.isfinite(d).all():
            raise KBError(f"the model's prediction at sigma {float(sigmas[i]):.4g} holds NaN or infinite values during a "
                          "teacher run; check the model (and its precision) before calibrating.")
        x = calibrated_step(x, d, history, float(sigmas[i]), float(sigmas[i + 1]), table[i])
        history = [d, *history[:1]]
        preds.append(d.float().cpu())
        states.append(x.float().cpu())
    return torch.stack(states, 1), torch.stack(preds, 1)


def state_at(states: torch.Tensor, denoised: torch.Tensor, fine: torch.Tensor, sigma: float) -> torch.Tensor:
    """The teacher's state [B, C, H, W] at `sigma`: a fine point's, or one DPM-Solver++(2M) step from the point above."""
    fine = torch.as_tensor(fine, dtype=torch.float64)
    sigma = float(sigma)
    if not float(fine[-1]) <= sigma <= float(fine[0]) * (1 + 1e-6):
        raise KBError(f"sigma {sigma:.6g} lies outside the teacher's grid [{float(fine[-1]):.6g}, {float(fine[0]):.6g}]; "
                      "candidate schedules must start at most at the model's sigma_max.")
    close = torch.nonzero((fine - sigma).abs() <= 1e-6 * max(sigma, 1e-12)).flatten()
    if len(close):
        return states[:, int(close[0])].float()
    j = int(torch.nonzero(fine > sigma).flatten()[-1])  # the fine point just above sigma
    s_j = float(fine[j])
    c1 = 0.0
    if j > 0 and sigma > 0:
        h, h_last = math.log(s_j / sigma), math.log(float(fine[j - 1]) / s_j)
        c1 = h / (2.0 * h_last)
    history = [denoised[:, j - 1].float()] if j > 0 else []
    return calibrated_step(states[:, j].float(), denoised[:, j].float(), history, s_j, sigma, (c1, 0.0, 0.0))


def states_on(states: torch.Tensor, denoised: torch.Tensor, fine: torch.Tensor, sigmas: Sequence[float]) -> list[torch.Tensor]:
    """The teacher's states at each of `sigmas` ([B, C, H, W] each), for fit_coefficients."""
    return [state_at(states, denoised, fine, float(s)) for s in sigmas]


def doubling_gap(live: LiveBatch, doubled: torch.Tensor, end: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
    """float64 [len(idx)]: per-item MSE (LATENT space) between the teacher's end and a run on the doubled grid."""
    states, _ = run_teacher(live, doubled, idx)
    a = live.to_latent(0.0, states[:, -1]).double()
    b = live.to_latent(0.0, end).double()
    return ((a - b) ** 2).flatten(1).mean(1)
