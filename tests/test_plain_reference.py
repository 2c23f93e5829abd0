"""The error guard's default tolerance "no worse than plain at equal NFE" (kb_tools.calibration.plain_reference):
its fit, its storage beside the blend-error model, the guard that reads it (fixed and adaptive),
and, on the real ComfyUI with a tiny model, the reference runs and the calibrate command that
measure it once (never during a generation)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from test_error_calibration import make_kb, smooth_family

from kb_tools.calibration.blend_error import choose_value_steps, fit_error_model, measure_blend_errors, predict_error, store_error_model
from kb_tools.core.errors import KBError
from kb_tools.calibration.guard import default_tolerance, resolve_error_guard
from kb_tools.store import KnowledgeBase
from kb_tools.calibration.plain_reference import (
    PLAIN, ReferenceErrors, check_plain_reference, describe_plain_reference, fit_plain_reference, plain_tolerances,
    reference_of, store_plain_reference,
)

KEY, H = 2, 3


def reference_errors(value_steps=(3, 5, 7), plain=(0.02, 0.04, 0.08), gain=(0.2, 0.5, 0.9), spread=(4.0, 4.0, 5.0),
                     n: int = 5, dim: int = 256) -> ReferenceErrors:
    """n items whose RMS errors have the given medians per value step (T = 10)."""
    scale = np.linspace(0.5, 1.5, n)[:, None]  # median 1: the medians are the numbers given
    state = 0.1 * scale * np.ones((n, len(value_steps)))
    return ReferenceErrors(KEY, H, 10, np.arange(n, dtype=np.int64), np.array(value_steps, np.int64),
                           np.array(plain) * scale, state, state * np.array(gain), np.array(spread), dim)


@pytest.fixture(scope="module")
def family_kb(tmp_path_factory) -> KnowledgeBase:
    kb = make_kb(tmp_path_factory.mktemp("family") / "kb", smooth_family(120))
    store_error_model(kb, KEY, fit_error_model(measure_blend_errors(kb, KEY, H, sample=64)))
    return kb


def reference_for(kb: KnowledgeBase, tolerances: dict[int, float]) -> dict:
    """A stored-form plain reference for the family KB (T = 10) with these tolerances per value step."""
    rows = [{"value_step": v, "plain_nfe": KEY + 10 - v, "plain_rms": 0.01, "gain": 0.5, "tolerance": t}
            for v, t in sorted(tolerances.items())]
    return check_plain_reference({"version": 1, "key_step": KEY, "h": H, "steps": kb.settings.steps, "n": 4, "rows": rows})


def test_fit_turns_plains_output_error_into_a_state_tolerance():
    ref = fit_plain_reference(reference_errors())
    assert [r["value_step"] for r in ref["rows"]] == [3, 5, 7] and [r["plain_nfe"] for r in ref["rows"]] == [9, 7, 5]
    for row, plain, gain, spread in zip(ref["rows"], (0.02, 0.04, 0.08), (0.2, 0.5, 0.9), (4.0, 4.0, 5.0)):
        assert row["gain"] == pytest.approx(gain, rel=1e-5) and row["plain_rms"] == pytest.approx(plain, rel=1e-5)
        # the state error (spread units) whose output lands as far off as plain's: plain / gain * sqrt(D) / spread
        assert row["tolerance"] == pytest.approx(plain / gain * math.sqrt(256) / spread, rel=1e-5)
    assert "v 5 (7 NFE): plain RMS 0.04, gain 0.5, tolerance 0.32" in describe_plain_reference(ref)


def test_exact_blends_assume_errors_carry_unchanged():
    m = reference_errors()
    m = ReferenceErrors(**{**m.__dict__, "state_rms": np.zeros_like(m.state_rms)})  # every blend was its entry's own
    assert [r["gain"] for r in fit_plain_reference(m)["rows"]] == [1.0, 1.0, 1.0]


def test_stored_beside_the_error_model_and_read_per_h(family_kb):
    ref = reference_for(family_kb, {3: 0.1, 5: 0.2})
    store_plain_reference(family_kb, KEY, ref)
    again = KnowledgeBase.open(family_kb.path).calibration(KEY)
    assert reference_of(again, KEY, H) == ref and "blend_error" in again  # the error model is kept
    assert reference_of(again, KEY, H + 1) is None and default_tolerance(again, KEY, H + 1) is None
    assert default_tolerance(again, KEY, H) == PLAIN and plain_tolerances(ref) == {3: 0.1, 5: 0.2}


def test_plain_guard_holds_each_step_to_its_own_tolerance(family_kb):
    tolerances = {3: 0.05, 4: 0.05, 5: 0.3, 6: 0.3, 7: 0.3}
    store_plain_reference(family_kb, KEY, reference_for(family_kb, tolerances))
    model = fit_error_model(measure_blend_errors(family_kb, KEY, H, sample=64))
    store_error_model(family_kb, KEY, model)
    r = np.array([0.0, 0.02, 0.05, 0.1, 0.3, 10.0])
    guard = resolve_error_guard(family_kb.calibration(KEY), KEY, H, 5, PLAIN)
    np.testing.assert_array_equal(guard.accepts(r), predict_error(model, r, 5) <= 0.3)
    assert "within the plain sampler's output error at equal NFE" in guard.describe() and "7 NFE" in guard.describe()
    adaptive = resolve_error_guard(family_kb.calibration(KEY), KEY, H, 7, PLAIN, adaptive=True)
    start, _ = adaptive.start_steps(r)
    expected = np.full(len(r), KEY)
    for v, tol in tolerances.items():
        expected[predict_error(model, r, v) <= tol] = v
    np.testing.assert_array_equal(start, expected)
    # a larger tolerance at every step never accepts fewer items nor shorter jumps (monotone)
    looser = choose_value_steps({**model, "steps": [s for s in model["steps"] if s["value_step"] <= 7]}, r,
                                {v: 2 * t for v, t in tolerances.items()})
    assert (looser >= start).all()


def test_plain_without_a_reference_names_the_command(tmp_path):
    kb = make_kb(tmp_path / "kb", smooth_family(40))
    store_error_model(kb, KEY, fit_error_model(measure_blend_errors(kb, KEY, H, sample=20)))
    with pytest.raises(KBError, match=r"needs the KB's plain reference.*calibrate KB --key-step 2 --neighbours 3 --ckpt"):
        resolve_error_guard(kb.calibration(KEY), KEY, H, 5, PLAIN)
    store_plain_reference(kb, KEY, reference_for(kb, {3: 0.1}))  # measured at step 3 only
    with pytest.raises(KBError, match=r"plain reference for key step 2 measured no value step 5"):
        resolve_error_guard(kb.calibration(KEY), KEY, H, 5, PLAIN)


@pytest.mark.parametrize("damage, match", [
    (lambda r: {**r, "version": 9}, r"not a version-1 plain reference.*--ckpt CHECKPOINT"),
    (lambda r: {**r, "rows": [{**r["rows"][0], "tolerance": -1.0}]}, r"tolerance >= 0"),
    (lambda r: {**r, "rows": [{**r["rows"][0], "tolerance": float("nan")}]}, r"must hold key_step, h, steps and rows"),
    (lambda r: {**r, "rows": [{**r["rows"][0], "value_step": 1}]}, r"value steps after the key step"),
    (lambda r: {**r, "rows": "x"}, r"must hold key_step"),
])
def test_a_damaged_reference_is_refused_with_the_fix(family_kb, damage, match):
    ref = reference_for(family_kb, {3: 0.1, 5: 0.2})
    with pytest.raises(KBError, match=match):
        check_plain_reference(damage(ref))
    with pytest.raises(KBError, match=match):
        reference_of({"plain_reference": damage(ref)}, KEY, H)
    with pytest.raises(KBError, match=r"measured at key step 2 of 10 steps, not key step 4"):
        store_plain_reference(family_kb, 4, ref)
