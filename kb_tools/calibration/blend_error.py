"""A KB's blend error measured on itself, and a model that predicts a query's error from its residual.

The guard sees only the key residual ||q - sum w key|| (the observable term of ReDi's
Theorem 5.3); what costs quality is the error of the blended value at v. Leaving stored
trajectories out one at a time gives both for queries the KB did not contain: retrieve the
entry's key among the others, blend their values at every value step, compare with the
entry's own stored value. A per-value-step fit log(error) = a + b log(residual) then turns
a query's residual into an upper (95%) prediction of its value error, which the error guard
and the adaptive skip compare with a tolerance.

Errors are in spread units, ||blend - own|| / key_spread(v): the fraction of what varies
between the KB's entries at v (as the centered residual is at k). Plain numpy, no torch or
ComfyUI. Shapes: n measured entries, S value steps, B query items.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..core.errors import KBError
from ..core.weights import check_value_step
from ..store import KnowledgeBase
from ..store.retrieval import blend_entries
from .parts import part_of, store_part
from .residuals import leave_one_out

#: Version of the stored model dict; another version is refused with the command that recalibrates.
MODEL_VERSION = 1
#: Residuals and errors below this (0.1% of the spread) count as exact: an exact duplicate
#: scores ~1e-7, and its log would dominate the fit with a point that says nothing about the rest.
FLOOR = 1e-3
#: One-sided 95% normal quantile: the prediction is an upper bound for 95% of entries like the measured ones.
Z95 = 1.645
#: Value steps one model holds: 64 rows of ~250 bytes keep the stored calibration far below the
#: manifest's 64 KB per key step, whatever the number of stored steps.
MAX_VALUE_STEPS = 64
#: The fewest measured entries a fit with two parameters and a spread of its residuals needs.
MIN_ENTRIES = 3
#: Entries blended at once: bounds memory to CHUNK * H latents per value step.
CHUNK = 64
_ROW_KEYS = ("value_step", "intercept", "slope", "sd", "spearman", "error_median", "error_p95", "predicted_median")


def _recalibrate(key_step: object = "K", h: object = "H") -> str:
    return f"Recalibrate it: python -m kb_tools calibrate KB --key-step {key_step} --neighbours {h}"


@dataclass(frozen=True)
class BlendErrors:
    """Leave-one-out blend errors of `n` KB entries at each value step (what fit_error_model fits)."""

    key_step: int
    h: int
    mode: str
    kb_count: int
    ids: np.ndarray  # int64 [n], the entries left out, ascending
    neighbours: np.ndarray  # int64 [n, h], each entry's neighbours among the others
    weights: np.ndarray  # float64 [n, h], their least-squares weights on the keys (what each blend used)
    centered_residual: np.ndarray  # float64 [n], ||key - sum w key_j|| / key_spread(k)
    value_steps: np.ndarray  # int64 [S], ascending, each >= key_step
    error: np.ndarray  # float64 [n, S], ||blend - own|| / key_spread(v)
    rms: np.ndarray  # float64 [n, S], RMS over the latent's elements of blend - own (latent units)
    spread: np.ndarray  # float64 [S], key_spread(v)


# --------------------------------------------------------------------------- measuring


def _value_steps(kb: KnowledgeBase, key_step: int, value_steps) -> list[int]:
    """The stored steps to measure: those given (each >= key_step), or every stored step after the key step."""
    if value_steps is None:
        later = [s for s in kb.stored_steps if s > key_step]
        if not later:
            raise KBError(f"key step {key_step} is the last step the KB at {kb.path} stores ({kb.stored_steps}): no "
                          "value step follows it. Choose an earlier key step.")
        keep = np.unique(np.round(np.linspace(0, len(later) - 1, min(len(later), MAX_VALUE_STEPS))).astype(int))
        return [later[i] for i in keep]  # evenly thinned, first and last kept
    if isinstance(value_steps, (str, bytes)) or not hasattr(value_steps, "__iter__"):
        raise KBError(f"value_steps must be a list of stored steps or None (every step after the key step), got "
                      f"{value_steps!r}.")
    steps = sorted({kb.check_step(v, "value step") for v in value_steps})
    if not steps or len(steps) > MAX_VALUE_STEPS:
        raise KBError(f"value_steps must name 1 to {MAX_VALUE_STEPS} stored steps, got {len(steps)}. Pass None for "
                      f"every step after the key step (thinned to {MAX_VALUE_STEPS}), or fewer steps.")
    for v in steps:
        check_value_step(key_step, v)
    return steps


def _spread(kb: KnowledgeBase, step: int) -> float:
    spread = kb.key_spread(step)
    if not spread > 0:
        raise KBError(f"the KB's latents at step {step} do not vary between entries (spread 0): a blend error "
                      "relative to it means nothing. Build the KB from more than one distinct trajectory.")
    return spread


def measure_blend_errors(kb: KnowledgeBase, key_step: int, h: int, *, value_steps=None, sample: int = 128,
                         mode: str = "lstsq", seed: int = 0) -> BlendErrors:
    """Leave-one-out blend error of `sample` entries (drawn as retrieval.calibrate draws them) at each value step."""
    key_step = kb.check_step(key_step, "key step")
    steps = _value_steps(kb, key_step, value_steps)
    ids, nbr, fit = leave_one_out(kb, key_step, h, sample=sample, mode=mode, seed=seed)
    if len(ids) < MIN_ENTRIES:
        raise KBError(f"measuring the blend error needs at least {MIN_ENTRIES} entries left out, got {len(ids)} "
                      f"(sample={sample}, the KB at {kb.path} has {len(kb)}). Add entries, or pass sample >= {MIN_ENTRIES}.")
    _spread(kb, key_step)
    spread = np.array([_spread(kb, v) for v in steps])
    err, rms = np.empty((len(ids), len(steps))), np.empty((len(ids), len(steps)))
    dim = math.prod(kb.latent_shape)
    for j, v in enumerate(steps):
        for lo in range(0, len(ids), CHUNK):
            part = slice(lo, lo + CHUNK)
            blended = blend_entries(kb, nbr[part], fit.weights[part], v).reshape(-1, dim).astype(np.float64)
            diff = blended - kb.keys_flat(v, ids[part]).astype(np.float64)
            norm = np.sqrt(np.einsum("bd,bd->b", diff, diff))
            err[part, j], rms[part, j] = norm / spread[j], norm / math.sqrt(dim)
    return BlendErrors(key_step, int(h), mode, len(kb), ids, nbr, np.asarray(fit.weights, np.float64),
                       fit.centered_residual.copy(),
                       np.array(steps, np.int64), err, rms, spread)


# --------------------------------------------------------------------------- the model


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of x [n], ties given their mean rank."""
    order = np.argsort(x, kind="stable")
    rank = np.empty(len(x))
    rank[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=rank) / counts)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of x [n] and y [n]; 0 where either is constant."""
    rx, ry = _ranks(np.asarray(x, np.float64)), _ranks(np.asarray(y, np.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / den if den > 0 else 0.0


def _log_fit(log_r: np.ndarray, log_e: np.ndarray) -> tuple[float, float, float]:
    """(a, b, sd) of the least-squares line log_e = a + b log_r, slope held >= 0, sd of its residuals (n - 2 dof)."""
    var = float(np.var(log_r))
    b = float(np.mean((log_r - log_r.mean()) * (log_e - log_e.mean()))) / var if var > 0 else 0.0
    # A larger residual never predicts a smaller error: a negative slope fitted on noise would let
    # the guard accept far matches (foreign noise) that it should refuse.
    b = max(b, 0.0)
    a = float(log_e.mean() - b * log_r.mean())
    resid = log_e - (a + b * log_r)
    return a, b, math.sqrt(float(resid @ resid) / max(len(resid) - 2, 1))


def _sig(x: float) -> float:
    """x to 6 significant digits: the stored model stays small and reads the same wherever it is loaded."""
    return float(f"{x:.6g}")


def fit_error_model(measured: BlendErrors) -> dict:
    """Per value step: log(error) = a + b log(residual), its residual sd, the rank correlation; JSON-able."""
    if not isinstance(measured, BlendErrors):
        raise KBError(f"fit_error_model needs what measure_blend_errors returns, got {type(measured).__name__}.")
    r = measured.centered_residual
    log_r = np.log(np.maximum(r, FLOOR))
    model = {"version": MODEL_VERSION, "key_step": int(measured.key_step), "h": int(measured.h), "mode": measured.mode,
             "n": len(r), "kb_count": int(measured.kb_count), "floor": FLOOR, "z": Z95,
             "residual_max": float(r.max()), "steps": []}
    for j, v in enumerate(measured.value_steps):
        e = measured.error[:, j]
        a, b, sd = _log_fit(log_r, np.log(np.maximum(e, FLOOR)))
        row = {"value_step": int(v), "intercept": _sig(a), "slope": _sig(b), "sd": _sig(sd),
               "spearman": _sig(spearman(r, e)), "error_median": _sig(float(np.median(e))),
               "error_p95": _sig(float(np.percentile(e, 95))), "predicted_median": 0.0}
        model["steps"].append(row)
        row["predicted_median"] = _sig(float(np.median(predict_error(model, r, int(v)))))
    return model


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_error_model(model: object) -> dict:
    """`model` if it is a blend-error model this version reads (a stored one may be damaged), else a KBError."""
    if not isinstance(model, Mapping) or model.get("version") != MODEL_VERSION:
        raise KBError(f"not a version-{MODEL_VERSION} blend-error model (as fit_error_model returns). {_recalibrate()}.")
    k, h = model.get("key_step"), model.get("h")
    fix = _recalibrate(k, h) if isinstance(k, int) and isinstance(h, int) else _recalibrate()
    nums = ("floor", "z", "residual_max")
    if not (isinstance(k, int) and isinstance(h, int) and isinstance(model.get("mode"), str)
            and all(_finite(model.get(x)) for x in nums) and model["floor"] > 0):
        raise KBError(f"the blend-error model lacks key_step, h, mode or one of {list(nums)}, or holds a non-number. {fix}.")
    rows = model.get("steps")
    ok = isinstance(rows, (list, tuple)) and 1 <= len(rows) <= MAX_VALUE_STEPS and all(
        isinstance(row, Mapping) and all(_finite(row.get(x)) for x in _ROW_KEYS) and isinstance(row["value_step"], int)
        for row in rows)
    steps = [row["value_step"] for row in rows] if ok else []
    if not ok or steps != sorted(set(steps)) or steps[0] < k:
        raise KBError(f"the blend-error model's steps must be 1 to {MAX_VALUE_STEPS} rows of {list(_ROW_KEYS)} with "
                      f"ascending value steps >= the key step {k}. {fix}.")
    return model  # type: ignore[return-value]


def _residuals(centered_residual) -> np.ndarray:
    r = np.asarray(centered_residual, dtype=np.float64)
    if r.ndim != 1 or np.isnan(r).any() or (r < 0).any():
        raise KBError(f"centered residuals must be numbers >= 0 of shape [B], got shape {list(r.shape)}. Pass "
                      "WeightFit.centered_residual.")
    return r


def _upper(model: Mapping, row: Mapping, r: np.ndarray) -> np.ndarray:
    """exp(a + b log r + z sd) [B]: inf beyond the largest measured residual, where the model knows nothing."""
    log_r = np.log(np.maximum(r, model["floor"]))
    with np.errstate(over="ignore"):
        out = np.exp(row["intercept"] + row["slope"] * log_r + model["z"] * row["sd"])
    out[r > model["residual_max"]] = np.inf
    return out


def predict_error(model: Mapping, centered_residual, value_step: int) -> np.ndarray:
    """p95 upper prediction of each item's blend error at `value_step` (spread units) from residuals [B]: float64 [B]."""
    model = check_error_model(model)
    rows = {row["value_step"]: row for row in model["steps"]}
    if isinstance(value_step, bool) or not isinstance(value_step, (int, np.integer)) or value_step not in rows:
        raise KBError(f"the blend-error model of key step {model['key_step']} has no value step {value_step!r}; it "
                      f"holds {sorted(rows)}. Choose one of them, or measure that step on a KB that stores it "
                      f"(python -m kb_tools calibrate KB --key-step {model['key_step']} --neighbours {model['h']}).")
    return _upper(model, rows[value_step], _residuals(centered_residual))


def check_tolerance(tolerance: object) -> float:
    """`tolerance` as a float if it is a finite number >= 0 (spread units), else a KBError naming an example."""
    if not (isinstance(tolerance, (int, float, np.integer, np.floating)) and not isinstance(tolerance, bool)
            and math.isfinite(tolerance) and tolerance >= 0):
        raise KBError(f"tolerance must be a finite number >= 0 (a fraction of the KB's spread at the value step, "
                      f"e.g. 0.1), got {tolerance!r}.")
    return float(tolerance)


def _tolerance_at(tolerance: float | Mapping[int, float], step: int) -> float:
    """One tolerance for every step, or the per-step ones (plain_reference.tolerances); a step without one never qualifies."""
    if isinstance(tolerance, Mapping):
        return float(tolerance.get(step, -math.inf))
    return tolerance


def choose_value_steps(model: Mapping, centered_residual, tolerance: float | Mapping[int, float]) -> np.ndarray:
    """Per item, the largest value step whose predicted error is <= tolerance, else the key step (no jump): int64 [B].

    tolerance: spread units, one number for every step or {value step: tolerance}.
    """
    model = check_error_model(model)
    r = _residuals(centered_residual)
    if not isinstance(tolerance, Mapping):
        tolerance = check_tolerance(tolerance)
    out = np.full(len(r), model["key_step"], np.int64)
    for row in model["steps"]:  # ascending: a later step that qualifies overwrites an earlier one
        out[_upper(model, row, r) <= _tolerance_at(tolerance, row["value_step"])] = row["value_step"]
    return out


def describe_error_model(model: Mapping) -> str:
    """One line: per value step the rank correlation and the median predicted error."""
    model = check_error_model(model)
    steps = "; ".join(f"v {row['value_step']}: rank corr {row['spearman']:+.2f}, median predicted error "
                      f"{row['predicted_median']:.3g}" for row in model["steps"])
    return (f"blend-error model for key step {model['key_step']}, H={model['h']} ({model['n']} entries left out, "
            f"errors in units of the KB's spread): {steps}")


# --------------------------------------------------------------------------- storage


def error_model_of(calibration: Mapping | None, key_step: int, h: int) -> dict | None:
    """The blend-error model in a key step's stored calibration for this H, or None (absent, or for another H)."""
    return part_of(calibration, "blend_error", key_step, h, check_error_model, _recalibrate(key_step, h))


def store_error_model(kb: KnowledgeBase, key_step: int, model: Mapping) -> None:
    """Merge `model` into the key step's stored calibration under "blend_error" (one atomic manifest commit)."""
    model = check_error_model(model)
    key_step = kb.check_step(key_step, "key step")
    if model["key_step"] != key_step:
        raise KBError(f"this blend-error model was measured at key step {model['key_step']}, not {key_step}. Store it "
                      f"under key step {model['key_step']}.")
    store_part(kb, key_step, "blend_error", model)


def stored_error_model(kb: KnowledgeBase, key_step: int, h: int) -> dict | None:
    """The blend-error model the KB stores for key step and H, or None; reads only."""
    key_step = kb.check_step(key_step, "key step")
    return error_model_of(kb.calibration(key_step), key_step, h)
