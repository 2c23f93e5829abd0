"""Schedule bookkeeping for ReDi and T-Stitch: plain functions over sigma lists, no ComfyUI.

Step indices count from the start of sampling: step 0 is pure noise (sigmas[0]) and step
`steps` is the finished sample (sigmas[steps], usually 0). A latent "at step i" is the state
after i sampler steps, sitting at noise level sigmas[i].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .errors import KBError


@dataclass(frozen=True)
class ReDiPlan:
    """Where a ReDi run stops, jumps and resumes (paper Algorithm 2)."""

    steps: int
    key_step: int
    value_step: int

    @property
    def skipped_steps(self) -> int:
        """Sampler steps replaced by retrieval: v - k (the speed-up of Algorithm 2)."""
        return self.value_step - self.key_step

    @property
    def sampled_steps(self) -> int:
        """Sampler steps still run: k before retrieval plus steps - v after it."""
        return self.key_step + (self.steps - self.value_step)


def plan_redi(steps: int, key_step: int, value_step: int, stored_steps: Sequence[int] | None = None) -> ReDiPlan:
    """Check a (key step, value step) choice against the schedule and the KB's stored steps."""
    if steps < 1:
        raise KBError(f"steps must be at least 1, got {steps}.")
    if not 0 < key_step < steps:
        raise KBError(f"key step {key_step} is outside 1..{steps - 1}; the key must be a partly denoised latent of the {steps}-step schedule.")
    if not key_step <= value_step < steps:
        raise KBError(
            f"value step {value_step} must lie in {key_step}..{steps - 1} (at or after the key step {key_step}, before the last step); "
            "resuming earlier than the key would repeat steps, resuming at the end would skip the whole remaining schedule."
        )
    if stored_steps is not None:
        for name, step in (("key", key_step), ("value", value_step)):
            if step not in stored_steps:
                raise KBError(
                    f"the knowledge base stores no latents at {name} step {step}; it stores steps {sorted(stored_steps)}. "
                    f"Choose a {name} step from that list, or rebuild the knowledge base with step {step} among the stored steps."
                )
    return ReDiPlan(steps, key_step, value_step)


def default_store_steps(steps: int) -> list[int]:
    """Stored steps for a new KB: every step from 10% to 80% of the schedule, so key and value can be chosen later."""
    lo = max(1, round(0.1 * steps))
    hi = max(lo, min(steps - 1, round(0.8 * steps)))
    return list(range(lo, hi + 1))


def parse_steps(text: str, steps: int) -> list[int]:
    """Parse "3,5,8-12" or "auto" into sorted unique step indices inside 1..steps-1."""
    text = (text or "").strip().lower()
    if text in ("", "auto"):
        return default_store_steps(steps)
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(p) for p in part.split("-", 1))
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise KBError(f"cannot read the step list {text!r}: write step numbers and ranges like '5,10,15-20', or 'auto'.") from None
    bad = sorted(s for s in out if not 0 < s < steps)
    if bad:
        raise KBError(f"stored steps {bad} are outside 1..{steps - 1} for a {steps}-step schedule; remove them.")
    if not out:
        raise KBError(f"the step list {text!r} names no step; write e.g. '5,10' or 'auto'.")
    return sorted(out)


def stitch_switch_step(sigmas: Sequence[float], fraction: float | None = None, switch_sigma: float | None = None) -> int:
    """Number of early steps the small model runs in T-Stitch, from a fraction of steps or a sigma."""
    steps = len(sigmas) - 1
    if (fraction is None) == (switch_sigma is None):
        raise KBError("give the T-Stitch switch point either as a fraction of steps or as a sigma, not both.")
    if fraction is not None:
        if not 0.0 <= fraction <= 1.0:
            raise KBError(f"small-model fraction {fraction} must lie in 0..1 (0 = large model only, 1 = small model only).")
        return int(round(fraction * steps))
    if switch_sigma < 0:
        raise KBError(f"switch sigma {switch_sigma} must be >= 0.")
    # The small model runs every step whose starting noise level is above the switch sigma.
    return sum(1 for i in range(steps) if float(sigmas[i]) > switch_sigma)


SWITCH_MODES = ("fraction", "sigma", "step")


@dataclass(frozen=True)
class Switch:
    """Where a two-model run hands over: the early model evaluates every sigma above `sigma_in(sigmas)`.

    mode "fraction": after round(value * steps) steps of the schedule; "step": after `value`
    steps; "sigma": at that noise level. Fraction and step are resolved against the schedule
    the run is given, so one Switch serves any number of steps.
    """

    mode: str
    value: float

    def __post_init__(self) -> None:
        if self.mode not in SWITCH_MODES:
            raise KBError(f"unknown switch mode {self.mode!r}; choose one of {list(SWITCH_MODES)}.")
        if self.mode == "fraction" and not 0.0 <= self.value <= 1.0:
            raise KBError(f"small-model fraction {self.value} must lie in 0..1 (0 = large model only, 1 = small model only).")
        if self.value < 0 or not math.isfinite(self.value):
            raise KBError(f"switch {self.mode} {self.value} must be a finite number >= 0.")

    def step_in(self, sigmas: Sequence[float]) -> int:
        """Steps of `sigmas` whose starting noise level is above the switch (the early model's steps)."""
        steps = len(sigmas) - 1
        if self.mode == "fraction":
            return int(round(self.value * steps))
        if self.mode == "step":
            return min(int(self.value), steps)
        return stitch_switch_step(sigmas, switch_sigma=self.value)

    def sigma_in(self, sigmas: Sequence[float]) -> float:
        """The hand-over noise level: evaluations above it go to the early model, the rest to the late one."""
        if self.mode == "sigma":
            return float(self.value)
        return float(sigmas[self.step_in(sigmas)])
