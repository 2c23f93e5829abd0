"""The held-out check: the calibrated sampler against every built-in sampler x schedule at the same NFE.

On the held-out teacher items (never used to fit or choose), each choice's per-item MSE to the
teacher's converged end (LATENT space) is measured; the winner at N is the calibrated sampler
where it beats the best built-in choice by more than 2 paired standard errors on at least 4
items, else that built-in choice (`choose_winner`, a pure function). Built-in samplers run ComfyUI's own sampler
functions at steps_for_nfe(N) steps (Heun spends 2 per step), stochastic ones item by item
with the item's seed.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from ..comfy.schedules import PLAIN_SAMPLERS, PLAIN_SCHEDULES, nfe_for_steps, plain_sigmas, steps_for_nfe
from ..core.errors import KBError
from .live_model import CalibrationStopped, LiveBatch
from .sampler_fit import rollout

#: How many paired standard errors the calibrated sampler must win by.
WIN_MARGIN_SE = 2.0
#: Held-out items a win needs: with fewer, the paired SE says nothing (one item has none), so a built-in choice stays.
MIN_ITEMS_FOR_WIN = 4
#: The common default every summary compares with.
EULER_NORMAL = "euler/normal"


def paired_se(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of mean(a - b) over paired items (0 for a single item)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0


def choose_winner(calibrated: np.ndarray, builtin: dict[str, np.ndarray], margin: float = WIN_MARGIN_SE) -> dict:
    """The held-out verdict at one N from per-item MSEs: calibrated [n] and builtin {"sampler/schedule": [n]}.

    Returns {"kind": "calibrated" | "builtin", "best_builtin": name, "calibrated_mse", "best_builtin_mse",
    "diff_se": paired SE of best_builtin - calibrated, "n"}; under MIN_ITEMS_FOR_WIN items the kind is "builtin"."""
    if not builtin:
        raise KBError("the held-out check has no built-in choice to compare with; give at least one sampler and schedule.")
    cal = np.asarray(calibrated, np.float64)
    if cal.size == 0 or any(np.asarray(v).shape != cal.shape for v in builtin.values()):
        raise KBError("the held-out MSEs must be one value per held-out item for every choice; rerun the held-out check.")
    means = {k: float(np.mean(v)) for k, v in builtin.items() if np.isfinite(v).all()}
    if not means:
        raise KBError("every built-in choice diverged on the held-out items (non-finite MSE); check the model.")
    best = min(means, key=lambda k: (means[k], k))
    se = paired_se(builtin[best], cal)
    gain = means[best] - float(cal.mean()) if np.isfinite(cal).all() else -math.inf
    kind = "calibrated" if gain > margin * se and gain > 0 and cal.size >= MIN_ITEMS_FOR_WIN else "builtin"
    return {"kind": kind, "best_builtin": best, "calibrated_mse": float(cal.mean()) if np.isfinite(cal).all() else None,
            "best_builtin_mse": means[best], "diff_se": se, "n": int(cal.size)}


def builtin_grid(model, nfe: int, samplers: Sequence[str] = PLAIN_SAMPLERS,
                 schedules: Sequence[str] = PLAIN_SCHEDULES) -> dict[str, torch.Tensor]:
    """"sampler/schedule" -> the sigmas a user's choice walks at `nfe` model evaluations (choices that cannot: left out)."""
    out = {}
    for sampler in samplers:
        steps = steps_for_nfe(sampler, nfe)
        if nfe_for_steps(sampler, steps) != nfe:
            continue  # e.g. Heun at an even NFE spends fewer: compared at its own NFE elsewhere, not here
        for schedule in schedules:
            try:
                out[f"{sampler}/{schedule}"] = plain_sigmas(model, sampler, schedule, steps)
            except KBError:
                continue  # a preset schedule that cannot make this many steps
    return out


def heldout_mse(live: LiveBatch, ends: torch.Tensor, nfe: int, calibrated: tuple[torch.Tensor, torch.Tensor],
                grid: dict[str, torch.Tensor], should_stop: Callable[[], bool] | None = None) -> tuple[np.ndarray, dict]:
    """(calibrated [n], {"sampler/schedule": [n]}): per-item MSE (LATENT space) to `ends` [n, C, H, W] (LATENT space).

    calibrated: (sigmas float64 [N + 1], coeffs float64 [N, 3]); grid: builtin_grid's choices."""
    target = ends.double()

    def mse(x: torch.Tensor, last_sigma: float) -> np.ndarray:
        out = live.to_latent(last_sigma, x).double()
        return ((out - target) ** 2).flatten(1).mean(1).numpy()

    sigmas, coeffs = calibrated
    x0 = live.start(float(sigmas[0]))
    cal = mse(rollout(live.denoise, x0, sigmas, coeffs), float(sigmas[-1]))
    builtin = {}
    for name, sig in grid.items():
        if should_stop is not None and should_stop():
            raise CalibrationStopped
        builtin[name] = mse(live.run_builtin(name.split("/")[0], sig), float(sig[-1]))
    return cal, builtin
