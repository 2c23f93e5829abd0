"""What a run did, as typed values: model evaluations counted per model and item, and ReDi's result.

Plain Python and numpy (tensors are only carried), so benchmarks and tests read them without
ComfyUI. Every count here was counted at the denoiser while sampling, never computed from a plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..calibration.guard import ErrorGuard, Guard
from ..core.evaluations import Evaluations
from ..core.schedule import ReDiPlan

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ReDiResult:
    """One ReDi run (Algorithm 2), per batch item: where it resumed, whom it blended, what it cost.

    Shapes: B batch items, H neighbours. `accepted[i]`: the guard let item i resume from its
    blended value, at `start_steps[i]` (the value step, or with the adaptive error guard the
    item's own step); otherwise it continued from its own query latent at the key step (nothing
    skipped). `predicted_error[i]` (error guard only): the predicted blend error at the item's
    start step, or for an item sent back at the shortest jump it was refused.
    """

    latent: torch.Tensor  # [B, C, H, W] float32, LATENT-dict space
    plan: ReDiPlan
    accepted: np.ndarray  # bool [B]
    start_steps: np.ndarray  # int64 [B]
    neighbour_ids: np.ndarray  # int64 [B, H], nearest first
    distances: np.ndarray  # float32 [B, H], Euclidean, of the full keys
    weights: np.ndarray  # float64 [B, H], the weights the blend used (weight_mode)
    weight_mode: str
    residual: np.ndarray  # float64 [B], ||q - sum w key|| / ||q||
    centered_residual: np.ndarray  # float64 [B], ||q - sum w key|| / KB key spread
    guard: Guard | ErrorGuard
    evaluations: Evaluations
    warnings: tuple[str, ...] = ()
    predicted_error: np.ndarray | None = None  # float64 [B], spread units; None for the residual guard

    @property
    def skipped_steps(self) -> np.ndarray:
        """int64 [B]: sampler steps each item skipped."""
        return self.start_steps - self.plan.key_step

    def summary(self) -> str:
        """The one line a user can act on."""
        if isinstance(self.guard, ErrorGuard):
            return self._error_guard_summary()
        total = len(self.start_steps)
        used = int(self.accepted.sum())
        res = ", ".join(f"{r:.3f}" for r in self.centered_residual[:4]) + ("..." if total > 4 else "")
        cost = self.evaluations.describe()
        guard = self.guard.describe()
        if used == total:
            return f"ReDi: skipped {self.plan.skipped_steps} steps for all {total} item(s) (residual {res} <= {guard}); {cost}"
        if used == 0:
            return (f"ReDi: guard fell back to plain sampling for all {total} item(s) (residual {res} > {guard}): "
                    "no stored trajectory is near this query; use a KB seed (seed_mode 'kb' or ReDiKBNoise), add similar "
                    f"prompts to the KB, or raise the guard; {cost}")
        return (f"ReDi: skipped {self.plan.skipped_steps} steps for {used} of {total} items; the guard sent the rest back "
                f"to plain sampling (residual {res}, {guard}); {cost}")

    def _error_guard_summary(self) -> str:
        """'ReDi: 3 of 4 items jumped 8 steps, 1 item 2 steps (error guard: ...); ...; N model evaluations (...)'."""
        total, used = len(self.start_steps), int(self.accepted.sum())
        cost = f"{self.evaluations.total()} model evaluations ({self.evaluations.describe()})"
        refused = ~self.accepted
        judged = self.guard.judged_at(self.start_steps)
        bound = np.array([self.guard.tolerance_at(int(s)) for s in judged])
        errors = ", ".join(_relative(e, b, self.guard.reference is not None)
                           for e, b in zip(self.predicted_error[refused][:4], bound[refused][:4]))
        errors += "..." if refused.sum() > 4 else ""
        limit = "plain at equal NFE" if self.guard.reference is not None else f"{self.guard.tolerance_at(int(judged[0])):.3g}"
        why = f"predicted error {errors} > {limit}" + (
            "; inf: residual beyond the KB's calibrated range" if np.isinf(self.predicted_error[refused]).any() else "")
        if used == 0:
            return (f"ReDi: the error guard sent all {total} item(s) back to plain sampling ({why}; "
                    f"{self.guard.describe()}): raise error_tolerance, use a KB seed (seed_mode 'kb' or ReDiKBNoise), "
                    f"or add similar prompts to the KB; {cost}")
        steps, counts = np.unique(self.skipped_steps[self.accepted], return_counts=True)
        jumps = [f"{_items(int(n))} {int(s)} steps" for s, n in zip(steps[::-1], counts[::-1])]  # longest first
        first = int(counts[-1])
        jumps[0] = f"{first} of {total} item{'s' if total > 1 else ''} jumped {int(steps[-1])} steps"
        if self.guard.reference is not None:  # how close the jumps came to the bound, in plain's terms
            ratio = self.predicted_error[self.accepted] / bound[self.accepted]
            jumps[-1] += f" (predicted error {float(ratio.max()):.2g}x plain at equal NFE at most)"
        line = f"ReDi: {', '.join(jumps)} ({self.guard.describe()})"
        if used < total:
            line += f"; {_items(total - used)} continued from the key step ({why})"
        return f"{line}; {cost}"


def _relative(error: float, bound: float, plain: bool) -> str:
    """A refused item's predicted error: as a multiple of plain's at equal NFE, or as the number itself."""
    if not plain:
        return f"{error:.3g}"
    return "inf" if np.isinf(error) else f"{error / bound:.2g}x" if bound > 0 else f"{error:.3g} (plain: 0)"


def _items(n: int) -> str:
    return f"{n} item" if n == 1 else f"{n} items"
