"""The residual guard of a ReDi run: which items may jump to the value step. Plain numpy, no ComfyUI.

An item is accepted when the weighted keys of its neighbours rebuild its query well: its
centered residual ||q - sum w key|| / spread (see `retrieval.centered_residual`) is at most
the guard's threshold. A rejected item continues from its own key-step latent, so a poor
retrieval costs speed, never quality against the plain sampler.

The threshold is fixed before a run starts and never measured during one: it is given, or
read from the calibration stored in the KB (`python -m kb_tools calibrate`), or, when the KB
holds none for this key step and H, the documented fallback FALLBACK_GUARD, and the run's
summary line says which.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Guard value meaning "use the KB's stored calibration" (the nodes' -1).
GUARD_AUTO = -1.0
#: Threshold (centered residual) when the KB stores no calibration for the key step and H: half
#: the KB's key spread. A stored trajectory scores ~0, a query the KB covers well below 1,
#: foreign noise far above 1 (retrieval.centered_residual).
FALLBACK_GUARD = 0.5
#: A calibrated threshold is capped here: a fit no better than the KB's mean key is no match at all.
MAX_AUTO_GUARD = 1.0


@dataclass(frozen=True)
class Guard:
    """The threshold one run uses and where it came from ("given", "calibrated" or "fallback")."""

    threshold: float
    source: str
    key_step: int
    h: int

    def accepts(self, centered_residual: np.ndarray) -> np.ndarray:
        """bool [B]: True where the item's centered residual is within the threshold."""
        return np.asarray(centered_residual, dtype=np.float64) <= self.threshold

    def describe(self) -> str:
        """'guard 0.412 (KB calibration)' or the fallback with the command that stores a calibration."""
        if self.source == "calibrated":
            return f"guard {self.threshold:.3f} (KB calibration)"
        if self.source == "fallback":
            return (f"guard {self.threshold:.3f} (fallback: the KB stores no calibration for key step {self.key_step} "
                    f"and H={self.h}; store one with `python -m kb_tools calibrate KB --key-step {self.key_step} "
                    f"--neighbours {self.h}`)")
        return f"guard {self.threshold:.3f}"


def resolve_guard(calibration: dict | None, key_step: int, h: int, guard: float) -> Guard:
    """The Guard for `guard` (>= 0: that threshold; GUARD_AUTO: the stored calibration or the fallback).

    calibration: what the KB stores for `key_step` (`KnowledgeBase.calibration(key_step)`), or None.
    """
    if guard >= 0:
        return Guard(float(guard), "given", int(key_step), int(h))
    if calibration and calibration.get("h") == h and "centered_p95" in calibration:
        return Guard(min(MAX_AUTO_GUARD, float(calibration["centered_p95"])), "calibrated", int(key_step), int(h))
    return Guard(FALLBACK_GUARD, "fallback", int(key_step), int(h))
