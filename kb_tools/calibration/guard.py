"""The residual guard of a ReDi run: which items may jump to the value step. Plain numpy, no ComfyUI.

An item is accepted when the weighted keys of its neighbours rebuild its query well: its
centered residual ||q - sum w key|| / spread (see `retrieval.centered_residual`) is at most
the guard's threshold. A rejected item continues from its own key-step latent, so a poor
retrieval costs speed, never quality against the plain sampler.

The threshold is fixed before a run starts and never measured during one: it is given, or
read from the calibration stored in the KB (`python -m kb_tools calibrate`), or, when the KB
holds none for this key step and H, the documented fallback FALLBACK_GUARD, and the run's
summary line says which.

The error guard (`resolve_error_guard`) judges the same residual through the blend-error model
the KB stores (kb_tools.blend_error): it accepts an item when the predicted error of its blend
at the value step is within a tolerance given as a fraction of the KB's spread there, or, with
the tolerance "plain", within the state error whose output is as far off as the plain
sampler's at the same number of evaluations (kb_tools.plain_reference, measured at calibration).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import KBError
from .blend_error import check_tolerance, choose_value_steps, error_model_of, predict_error
from .plain_reference import PLAIN, plain_tolerances, reference_of

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


@dataclass(frozen=True)
class ErrorGuard:
    """Accepts an item when its predicted blend error (p95 upper, spread units) is <= the tolerance at its step.

    Fixed skip: at `value_step`. Adaptive (`adaptive`): at the largest measured step <= value_step
    where it is within the tolerance (blend_error.choose_value_steps), so a close neighbour earns a
    long jump and a poor one a short jump or none. The tolerance is one number the user gave, or
    (`reference` set) per step "no worse than plain at equal NFE" from the KB's plain reference.
    """

    model: dict  # blend_error.fit_error_model's dict, as the KB stores it
    value_step: int
    tolerance: float | dict[int, float]  # one for every step, or {value step: tolerance} (the plain reference)
    adaptive: bool = False
    reference: dict | None = None  # plain_reference.fit_plain_reference's dict when the tolerance is "plain"

    @property
    def candidate_steps(self) -> list[int]:
        """The measured value steps an item may jump to: the value step, or (adaptive) every measured step <= it."""
        if not self.adaptive:
            return [self.value_step]
        return [r["value_step"] for r in self.model["steps"] if r["value_step"] <= self.value_step]

    def tolerance_at(self, step: int) -> float:
        """The tolerance an item jumping to `step` is held to (spread units)."""
        if isinstance(self.tolerance, dict):
            return self.tolerance[int(step)]
        return self.tolerance

    def predicted(self, centered_residual: np.ndarray) -> np.ndarray:
        """float64 [B]: each item's predicted blend error at the value step (inf beyond the calibrated range)."""
        return predict_error(self.model, centered_residual, self.value_step)

    def accepts(self, centered_residual: np.ndarray) -> np.ndarray:
        """bool [B]: True where the item's predicted error at the value step is within the tolerance."""
        return self.predicted(centered_residual) <= self.tolerance_at(self.value_step)

    def start_steps(self, centered_residual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start step int64 [B], predicted error float64 [B]) of each item; the key step where nothing qualifies.

        The predicted error is the one at the item's start step, or, for an item that stays at the
        key step, at the shortest jump it was refused (for a fixed skip: the value step).
        """
        k, steps = self.model["key_step"], self.candidate_steps
        if not self.adaptive:
            predicted = self.predicted(centered_residual)
            return np.where(predicted <= self.tolerance_at(self.value_step), self.value_step, k).astype(np.int64), predicted
        allowed = {**self.model, "steps": [r for r in self.model["steps"] if r["value_step"] <= self.value_step]}
        start = choose_value_steps(allowed, centered_residual, self.tolerance)
        predicted = np.empty(len(start), np.float64)
        for step in set(start.tolist()):
            rows = start == step
            at = step if step != k or k in steps else steps[0]  # staying at k: report the shortest refused jump
            predicted[rows] = predict_error(self.model, np.asarray(centered_residual)[rows], at)
        return start, predicted

    def judged_at(self, start_steps: np.ndarray) -> np.ndarray:
        """int64 [B]: the step each item's predicted error was judged at (its start, or its shortest refused jump)."""
        k = self.model["key_step"]
        refused_at = self.value_step if not self.adaptive else self.candidate_steps[0]
        return np.where(np.asarray(start_steps) == k, refused_at, start_steps).astype(np.int64)

    def describe(self) -> str:
        """'error guard: predicted blend error at step 8 <= 0.1 of the KB's spread (KB calibration, ...)'."""
        source = f"KB calibration of key step {self.model['key_step']}, H={self.model['h']}, {self.model['n']} entries"
        if self.reference is not None:
            nfe = {r["value_step"]: r["plain_nfe"] for r in self.reference["rows"]}
            bound = "within the plain sampler's output error at equal NFE"
            where = (f"steps {self.candidate_steps[0]}..{self.candidate_steps[-1]}" if self.adaptive
                     else f"step {self.value_step} ({nfe[self.value_step]} NFE, tolerance "
                          f"{self.tolerance_at(self.value_step):.3g} of the KB's spread)")
            head = "adaptive error guard: each item jumps to the latest of" if self.adaptive else "error guard: jump to"
            return f"{head} {where} where its predicted blend error is {bound} ({source}, plain reference of " \
                   f"{self.reference['n']} entries)"
        if self.adaptive:
            steps = self.candidate_steps
            return (f"adaptive error guard: each item jumps to the latest of steps {steps[0]}..{steps[-1]} where its "
                    f"predicted blend error <= {self.tolerance:.3g} of the KB's spread ({source})")
        row = next(r for r in self.model["steps"] if r["value_step"] == self.value_step)
        return (f"error guard: predicted blend error at step {self.value_step} <= {self.tolerance:.3g} of the KB's spread "
                f"({source}, rank correlation {row['spearman']:+.2f})")


def default_tolerance(calibration: dict | None, key_step: int, h: int) -> str | None:
    """What a node's "auto" error tolerance means: PLAIN where the KB stores a plain reference for key step and H, else None.

    None leaves the residual guard in charge, as for every KB calibrated without a checkpoint.
    """
    return PLAIN if reference_of(calibration, key_step, h) is not None else None


def resolve_error_guard(calibration: dict | None, key_step: int, h: int, value_step: int, tolerance: float | str,
                        adaptive: bool = False) -> ErrorGuard:
    """The ErrorGuard of the blend-error model stored for `key_step` and H; reads only, never measures.

    calibration: what the KB stores for `key_step` (`KnowledgeBase.calibration(key_step)`), or None.
    tolerance: a number >= 0 (spread units), or PLAIN ("no worse than plain at equal NFE", the
    KB's stored plain reference). Adaptive: any measured step <= value_step may be chosen; else
    value_step must be a measured step.
    """
    model = error_model_of(calibration, key_step, h)
    if model is None:
        raise KBError(f"the KB stores no blend-error model for key step {key_step} and H={h}. Store one with "
                      f"`python -m kb_tools calibrate KB --key-step {key_step} --neighbours {h}`, or use the residual guard.")
    reference = None
    if tolerance == PLAIN:
        reference = reference_of(calibration, key_step, h)
        if reference is None:
            raise KBError(f"the error tolerance {PLAIN!r} needs the KB's plain reference for key step {key_step} and H={h}; "
                          f"store one with `python -m kb_tools calibrate KB --key-step {key_step} --neighbours {h} --ckpt "
                          "CHECKPOINT` (samples a few KB prompts with the plain sampler), or give a number.")
        tolerance = plain_tolerances(reference)
    else:
        tolerance = check_tolerance(tolerance)
    guard = ErrorGuard(model, int(value_step), tolerance, bool(adaptive), reference)
    if not guard.candidate_steps:
        raise KBError(f"the blend-error model of key step {key_step} measured no step <= the value step {value_step} "
                      f"(it holds {[r['value_step'] for r in model['steps']]}); choose a later value step.")
    for step in guard.candidate_steps:  # refuses a value step the model does not hold here, not mid-run
        predict_error(model, np.zeros(1), step)
        if reference is not None and step not in tolerance:
            raise KBError(f"the KB's plain reference for key step {key_step} measured no value step {step} (it holds "
                          f"{sorted(tolerance)}); recalibrate with --ckpt after changing the KB's stored steps.")
    return guard
