"""The calibrated multistep update: Euler in data-prediction form plus three learned history corrections.

On a schedule sigmas[0 .. N] (sigmas[N] may be 0), with D_i the model's denoised prediction at
x_i and r = sigma_{i+1} / sigma_i, step i is

    x_{i+1} = r x_i + (1 - r) D_i
              + c1 (1 - r) (D_i - D_{i-1}) + c2 (1 - r) (D_i - x_i) + c3 (1 - r) (D_{i-1} - D_{i-2})

with (c1, c2, c3) = coeffs[i] (cf. the data-prediction multistep solvers of Lu et al. 2022,
DPM-Solver++, and the learned-coefficient solvers of Zhou et al. 2024, AMED / Zheng et al. 2023,
DPM-Solver-v3). coeffs = 0 is Euler (Karras et al. 2022, Algorithm 2). A term whose history does
not exist yet (step 0: no D_{i-1}; step 1: no D_{i-2}) is dropped, so its coefficient does not
matter there. The last step to sigma 0 has r = 0: it lands on D + the corrections.

Shapes: x, D [B, C, H, W] (any shape; all the same); coeffs: the coefficient table, float64
[N, 3], one row per step. Pure torch; no ComfyUI.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .errors import KBError

#: columns of the coefficient table
TERMS = ("c1: D - D_prev", "c2: D - x", "c3: D_prev - D_prev2")


def zero_coefficients(steps: int) -> torch.Tensor:
    """The Euler setting: float64 [steps, 3] zeros."""
    return torch.zeros(steps, 3, dtype=torch.float64)


def check_sigmas(sigmas) -> torch.Tensor:
    """The schedule as float64 [N + 1]: finite, positive, strictly decreasing, only the last may be 0; or a KBError."""
    sig = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().reshape(-1)
    if len(sig) < 2:
        raise KBError(f"the schedule has {len(sig)} sigma(s); the calibrated sampler needs at least 2 (one step).")
    if not torch.isfinite(sig).all() or (sig[:-1] <= 0).any() or sig[-1] < 0 or (sig[1:] >= sig[:-1]).any():
        raise KBError(f"the schedule {sig.tolist()} is not a finite, strictly decreasing list of positive sigmas (only the "
                      "last may be 0); pass SIGMAS from a scheduler with denoise 1 and no repeated values.")
    return sig


def check_coefficients(coeffs, sigmas) -> torch.Tensor:
    """The table as float64 [N, 3] for a schedule of N + 1 sigmas, or a KBError naming the fix."""
    n = len(check_sigmas(sigmas)) - 1
    table = torch.as_tensor(coeffs, dtype=torch.float64).detach().cpu()
    if table.ndim != 2 or table.shape[1] != 3:
        raise KBError(f"the coefficient table has shape {tuple(table.shape)}; it must be [steps, 3] (c1, c2, c3 per step).")
    if table.shape[0] != n:
        raise KBError(f"the coefficient table has {table.shape[0]} rows but the schedule has {n} steps; fit the coefficients "
                      f"on this schedule (same steps and scheduler) or pass sigmas with {table.shape[0] + 1} values.")
    if not torch.isfinite(table).all():
        raise KBError("the coefficient table holds NaN or infinite values; refit it.")
    return table


def step_ratio(sigma: float, sigma_next: float) -> float:
    """r = sigma_next / sigma: how much of x a data-prediction step keeps (0 on the step to sigma 0)."""
    return float(sigma_next) / float(sigma)


def correction_terms(x: torch.Tensor, denoised: torch.Tensor, history: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """[D - D_prev, D - x, D_prev - D_prev2], None where the history is too short; history: newest first."""
    prev = history[0] if len(history) > 0 else None
    prev2 = history[1] if len(history) > 1 else None
    return [None if prev is None else denoised - prev, denoised - x, None if prev2 is None else prev - prev2]


def calibrated_step(x: torch.Tensor, denoised: torch.Tensor, history: Sequence[torch.Tensor], sigma: float,
                    sigma_next: float, coeffs) -> torch.Tensor:
    """One calibrated step from sigma to sigma_next: x, denoised [B, C, H, W]; history: earlier D's, newest first
    (D_{i-1}, D_{i-2}; shorter at the first steps); coeffs: this step's (c1, c2, c3)."""
    r = step_ratio(sigma, sigma_next)
    out = r * x + (1.0 - r) * denoised
    for c, term in zip((float(v) for v in coeffs), correction_terms(x, denoised, history)):
        if term is not None and c != 0.0:
            out = out + (c * (1.0 - r)) * term
    return out


def dpmpp_2m_coefficients(sigmas) -> torch.Tensor:
    """The table that reproduces DPM-Solver++(2M) (Lu et al. 2022) on `sigmas`: float64 [N, 3].

    ComfyUI's sample_dpmpp_2m steps x_{i+1} = r x + (1 - r) D' with r = sigma_{i+1} / sigma_i
    (its sigma_fn(t_next) / sigma_fn(t), and -expm1(-h) = 1 - r), where D' = D for the first step
    and the step to sigma 0, and otherwise D' = (1 + 1/(2 q)) D - 1/(2 q) D_prev with
    q = h_{i-1} / h_i, h_i = log(sigma_i / sigma_{i+1}). So it is exactly c1 = h_i / (2 h_{i-1}),
    c2 = c3 = 0, on those steps, and 0 on the others.
    """
    sig = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    table = zero_coefficients(len(sig) - 1)
    for i in range(1, len(sig) - 1):
        if sig[i + 1] > 0:
            h, h_last = torch.log(sig[i] / sig[i + 1]), torch.log(sig[i - 1] / sig[i])
            table[i, 0] = h / (2.0 * h_last)
    return table
