"""The error guard's default tolerance: "no worse than the plain sampler at the same number of evaluations".

An item that jumps from key step k to value step v costs k + (T - v) model evaluations; the
plain sampler at that many steps is what its user would otherwise run. Calibration samples a
few of the entries the blend-error measurement left out, three ways (`reference_runs`): the
KB's recipe in full (T steps, the reference), the recipe at N_v = k + T - v steps (plain at
equal NFE), and their leave-one-out blend at v resumed to the end. Per value step v:

    plain_rms = median_i RMS(plain at N_v steps - full)       what plain at equal NFE costs at the output
    gain      = median_i RMS(resumed blend - full) / RMS(blend - own state at v)
                                                               how a state error at v carries to the output
    tolerance = plain_rms / gain * sqrt(D) / spread(v)         the state error, in the blend-error model's
                                                               spread units, whose output is as far off as plain's

The error guard accepts an item when its predicted (p95 upper) blend error at v is within it:
an accepted item is predicted to land no further from the full-step output than the plain
sampler's typical item at the same cost. Plain numpy; stored in the key step's calibration
under "plain_reference", beside the blend-error model it is read with. Shapes: n items, S value steps.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..core.errors import KBError
from ..store import KnowledgeBase
from .parts import part_of, store_part

#: Version of the stored dict; another version is refused with the command that recalibrates.
REFERENCE_VERSION = 1
#: The tolerance value the guard, make_run and the benchmarks take for "no worse than plain at equal NFE".
PLAIN = "plain"
#: An RMS below this counts as no error: an exact duplicate's blend says nothing about how errors carry.
RMS_FLOOR = 1e-12
_ROW_KEYS = ("value_step", "plain_nfe", "plain_rms", "gain", "tolerance")


def _recalibrate(key_step: object = "K", h: object = "H") -> str:
    return f"Recalibrate it: python -m kb_tools calibrate KB --key-step {key_step} --neighbours {h} --ckpt CHECKPOINT"


@dataclass(frozen=True)
class ReferenceErrors:
    """What the reference runs measured (reference_runs.measure_reference): RMS errors in latent units."""

    key_step: int
    h: int
    steps: int  # T of the KB's recipe
    ids: np.ndarray  # int64 [n], the entries sampled
    value_steps: np.ndarray  # int64 [S], ascending
    plain_rms: np.ndarray  # float64 [n, S], plain at k + T - v steps against the full run
    state_rms: np.ndarray  # float64 [n, S], the leave-one-out blend at v against the entry's own state there
    final_rms: np.ndarray  # float64 [n, S], that blend resumed to the end against the full run
    spread: np.ndarray  # float64 [S], the KB's key spread at each value step
    dim: int  # D = C*H*W of one latent

    @property
    def plain_nfe(self) -> np.ndarray:
        """int64 [S]: the evaluations an item jumping to each value step costs, and plain is run with."""
        return self.key_step + self.steps - self.value_steps


def _sig(x: float) -> float:
    return float(f"{x:.6g}")


def fit_plain_reference(measured: ReferenceErrors) -> dict:
    """Per value step: plain's median output error at equal NFE, the state-to-output gain, the tolerance; JSON-able."""
    if not isinstance(measured, ReferenceErrors):
        raise KBError(f"fit_plain_reference needs what reference_runs.measure_reference returns, got "
                      f"{type(measured).__name__}.")
    rows = []
    for j, v in enumerate(measured.value_steps):
        differs = measured.state_rms[:, j] > RMS_FLOOR
        # No blend differed from its entry (exact duplicates): nothing says how errors carry, so
        # assume they carry unchanged (gain 1) rather than invent a number.
        gain = float(np.median(measured.final_rms[differs, j] / measured.state_rms[differs, j])) if differs.any() else 1.0
        plain = float(np.median(measured.plain_rms[:, j]))
        tolerance = plain / max(gain, RMS_FLOOR) * math.sqrt(measured.dim) / float(measured.spread[j])
        rows.append({"value_step": int(v), "plain_nfe": int(measured.plain_nfe[j]), "plain_rms": _sig(plain),
                     "gain": _sig(gain), "tolerance": _sig(min(tolerance, 1e6))})
    return {"version": REFERENCE_VERSION, "key_step": int(measured.key_step), "h": int(measured.h),
            "steps": int(measured.steps), "n": len(measured.ids), "rows": rows}


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_plain_reference(reference: object) -> dict:
    """`reference` if it is a plain reference this version reads (a stored one may be damaged), else a KBError."""
    if not isinstance(reference, Mapping) or reference.get("version") != REFERENCE_VERSION:
        raise KBError(f"not a version-{REFERENCE_VERSION} plain reference (as fit_plain_reference returns). {_recalibrate()}.")
    k, h = reference.get("key_step"), reference.get("h")
    fix = _recalibrate(k, h) if isinstance(k, int) and isinstance(h, int) else _recalibrate()
    rows = reference.get("rows")
    ok = (isinstance(k, int) and isinstance(h, int) and isinstance(reference.get("steps"), int)
          and isinstance(rows, (list, tuple)) and len(rows) >= 1
          and all(isinstance(r, Mapping) and all(_finite(r.get(x)) for x in _ROW_KEYS) and isinstance(r["value_step"], int)
                  and r["tolerance"] >= 0 for r in rows))
    steps = [r["value_step"] for r in rows] if ok else []
    if not ok or steps != sorted(set(steps)) or steps[0] <= k:
        raise KBError(f"the plain reference must hold key_step, h, steps and rows of {list(_ROW_KEYS)} (tolerance >= 0) "
                      f"with ascending value steps after the key step. {fix}.")
    return reference  # type: ignore[return-value]


def plain_tolerances(reference: Mapping) -> dict[int, float]:
    """{value step: tolerance in spread units}: what the error guard compares each predicted error with."""
    return {r["value_step"]: float(r["tolerance"]) for r in check_plain_reference(reference)["rows"]}


def reference_of(calibration: Mapping | None, key_step: int, h: int) -> dict | None:
    """The plain reference in a key step's stored calibration for this H, or None (absent, or for another H)."""
    return part_of(calibration, "plain_reference", key_step, h, check_plain_reference, _recalibrate(key_step, h))


def store_plain_reference(kb: KnowledgeBase, key_step: int, reference: Mapping) -> None:
    """Merge `reference` into the key step's stored calibration under "plain_reference" (one atomic manifest commit)."""
    reference = check_plain_reference(reference)
    key_step = kb.check_step(key_step, "key step")
    if reference["key_step"] != key_step or reference["steps"] != kb.settings.steps:
        raise KBError(f"this plain reference was measured at key step {reference['key_step']} of {reference['steps']} "
                      f"steps, not key step {key_step} of this KB's {kb.settings.steps}. Measure it on this KB.")
    store_part(kb, key_step, "plain_reference", reference)


def describe_plain_reference(reference: Mapping) -> str:
    """One line: per value step the NFE, plain's output error there and the tolerance it gives."""
    reference = check_plain_reference(reference)
    rows = "; ".join(f"v {r['value_step']} ({r['plain_nfe']} NFE): plain RMS {r['plain_rms']:.3g}, gain {r['gain']:.3g}, "
                     f"tolerance {r['tolerance']:.3g}" for r in reference["rows"])
    return (f"plain reference for key step {reference['key_step']}, H={reference['h']} ({reference['n']} KB entries "
            f"sampled in full, at equal NFE and resumed from their blends): {rows}")
