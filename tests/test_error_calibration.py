"""A KB that measures its own blend error, the model that predicts it, the error guard and the adaptive value step."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from kb_crash_helper import LATENT_SHAPE, SIGMAS, toy_latents, toy_settings

from kb_tools.calibration import blend_error, residuals
from kb_tools.calibration.blend_error import (
    MAX_VALUE_STEPS,
    check_error_model,
    choose_value_steps,
    fit_error_model,
    measure_blend_errors,
    predict_error,
    spearman,
    store_error_model,
    stored_error_model,
)
from kb_tools.core.errors import KBError
from kb_tools.calibration.guard import GUARD_AUTO, ErrorGuard, resolve_error_guard, resolve_guard
from kb_tools.store import KnowledgeBase
from kb_tools.store.format import MAX_CALIBRATION_BYTES
from kb_tools.calibration.residuals import calibrate
from kb_tools.core.weights import blend, solve_weights

faiss.omp_set_num_threads(1)
PACK_DIR = Path(__file__).resolve().parent.parent
FAMILY_STEPS = [2, 3, 4, 5, 6, 7, 8, 9]


def smooth_family(n: int, steps=FAMILY_STEPS, seed: int = 0) -> dict[int, np.ndarray]:
    """{step: float32 [n, 4, 8, 8]}: one shared noise plus smooth functions of a 2-D prompt parameter (one seed).

    x_t = sigma_t z + (1 + 0.2 t) phi(theta) B + 0.15 t psi(theta) C + 0.05 t e_i: neighbours in theta
    predict the later steps (psi is a different nonlinear function), up to an entry's own detail e_i.
    The parameter is dense near theta_2 = 0 and sparse near 1, so matches range from close to poor.
    """
    rng = np.random.default_rng(seed)
    d = int(np.prod(LATENT_SHAPE))
    basis = np.random.default_rng(100).standard_normal((12, d))
    z = np.random.default_rng(101).standard_normal(d)
    t1, t2 = (rng.uniform(0, 1, (n, 2)) ** np.array([1.0, 3.0])).T
    phi = np.stack([np.sin(3 * t1), np.cos(3 * t1), np.sin(2 * t2), np.cos(2 * t2), t1 * t2, t1**2], 1)
    psi = np.stack([np.sin(5 * t1 + t2), np.cos(4 * t2), t1**3, t2**2, np.sin(6 * t1 * t2), np.cos(2 * t1)], 1)
    detail = rng.standard_normal((n, d))
    out = {t: SIGMAS[t] * z + (1 + 0.2 * t) * phi @ basis[:6] + 0.15 * t * psi @ basis[6:] + 0.05 * t * detail
           for t in steps}
    return {t: x.reshape(n, *LATENT_SHAPE).astype(np.float32) for t, x in out.items()}


def make_kb(path, latents: dict[int, np.ndarray], prompts=None) -> KnowledgeBase:
    n = len(next(iter(latents.values())))
    kb = KnowledgeBase.create(path, toy_settings(stored_steps=sorted(latents)), dtype="float32")
    kb.append(latents, prompts or [f"prompt {i}" for i in range(n)], [0] * n)
    return kb


@pytest.fixture(scope="module")
def toy_kb(tmp_path_factory) -> KnowledgeBase:
    """The retrieval tests' toy KB (50 shared-seed entries, steps 2, 4, 6) plus an exact duplicate of entry 7."""
    pairs = [(f"prompt {i}", 0) for i in range(50)]
    latents = toy_latents(pairs)
    latents = {t: np.concatenate([x, x[7:8]]) for t, x in latents.items()}
    return make_kb(tmp_path_factory.mktemp("toy") / "kb", latents, [p for p, _ in pairs] + ["copy of prompt 7"])


@pytest.fixture(scope="module")
def family_kb(tmp_path_factory) -> KnowledgeBase:
    return make_kb(tmp_path_factory.mktemp("family") / "kb", smooth_family(200))


@pytest.fixture(scope="module")
def family_measured(family_kb) -> blend_error.BlendErrors:
    return measure_blend_errors(family_kb, 2, 3, sample=128)


@pytest.fixture(scope="module")
def family_model(family_measured) -> dict:
    return fit_error_model(family_measured)


# --------------------------------------------------------------------------- measuring


def test_a_stored_duplicate_has_no_blend_error(toy_kb):
    m = measure_blend_errors(toy_kb, 2, 3, sample=len(toy_kb))
    assert m.ids.tolist() == list(range(51)) and m.value_steps.tolist() == [4, 6] and m.neighbours.shape == (51, 3)
    dup = [7, 50]
    assert (m.centered_residual[dup] < 1e-5).all() and (m.error[dup] < 1e-5).all() and (m.rms[dup] < 1e-5).all()
    others = np.delete(np.arange(51), dup)
    assert (m.error[others] > 0.1).all()  # each of the others is missing from the KB it is retrieved from


def test_error_is_the_blend_minus_the_own_value_over_the_spread(toy_kb):
    m = measure_blend_errors(toy_kb, 2, 3, value_steps=[2, 6], sample=10, seed=3)
    # At the key step itself the blend error is the centered residual: both are ||key - sum w key_j|| / spread.
    np.testing.assert_allclose(m.error[:, 0], m.centered_residual, rtol=1e-4, atol=1e-6)
    i, nbr = m.ids[4], m.neighbours[4]
    assert i not in nbr
    w = solve_weights(toy_kb.keys_flat(2, [i])[0], toy_kb.keys_flat(2, nbr))
    diff = blend(toy_kb.latents(6, nbr), w) - toy_kb.latents(6, [i])[0]
    assert np.isclose(m.rms[4, 1], np.sqrt(np.mean(diff**2)), rtol=1e-4)
    assert np.isclose(m.error[4, 1], np.linalg.norm(diff) / toy_kb.key_spread(6), rtol=1e-4)
    assert m.spread.tolist() == [toy_kb.key_spread(2), toy_kb.key_spread(6)]


def test_entries_are_drawn_as_calibrate_draws_them(toy_kb):
    m = measure_blend_errors(toy_kb, 2, 3, sample=20, seed=1)
    cal = calibrate(toy_kb, 2, 3, sample=20, seed=1)
    assert np.isclose(np.percentile(m.centered_residual, 95), cal["centered_p95"])


# --------------------------------------------------------------------------- the model


def test_spearman_with_ties():
    assert np.isclose(spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]), 8 / np.sqrt(95))
    assert spearman([1, 2, 3], [3, 2, 1]) == -1.0 and spearman([1, 1, 1], [1, 2, 3]) == 0.0


def test_rank_correlation_is_positive_where_neighbours_predict_values(family_measured, family_model):
    rows = family_model["steps"]
    assert [r["value_step"] for r in rows] == FAMILY_STEPS[1:]
    assert all(r["spearman"] > 0.8 and r["slope"] > 0 for r in rows), rows
    assert all(r["predicted_median"] >= r["error_median"] for r in rows)  # an upper prediction
    json.dumps(family_model, allow_nan=False)  # JSON-able, finite numbers only
    # Control: the same errors paired with the wrong entries correlate with nothing, so the assertion above could fail.
    shuffled = dataclasses.replace(family_measured, error=np.random.default_rng(0).permutation(family_measured.error))
    assert all(abs(r["spearman"]) < 0.3 for r in fit_error_model(shuffled)["steps"])


def test_predicted_error_grows_with_the_residual(family_model):
    r = np.concatenate([[0.0], np.geomspace(1e-4, family_model["residual_max"], 50)])
    for v in FAMILY_STEPS[1:]:
        p = predict_error(family_model, r, v)
        assert p.dtype == np.float64 and p.shape == r.shape and np.isfinite(p).all()
        assert (np.diff(p) >= 0).all() and p[-1] > p[1]
    # Beyond the residuals it was measured on the model knows nothing: no blend is predicted good there.
    assert predict_error(family_model, [family_model["residual_max"] * 1.01, 6.0], 9).tolist() == [np.inf, np.inf]


def test_choose_value_steps_is_monotone_in_tolerance(family_model):
    r = np.concatenate([np.random.default_rng(0).uniform(0, 0.2, 200), [0.0, 100.0]])
    chosen = np.stack([choose_value_steps(family_model, r, t) for t in np.linspace(0, 0.5, 41)])
    assert chosen.dtype == np.int64 and chosen.shape == (41, len(r))
    assert (np.diff(chosen, axis=0) >= 0).all()  # a larger tolerance never gives a smaller step
    assert set(np.unique(chosen)) <= {2, *FAMILY_STEPS[1:]} and (chosen[0] == 2).all() and (chosen[-1, :-1] == 9).all()
    assert (chosen[:, -1] == 2).all()  # a residual far beyond the calibration never jumps
    assert len(np.unique(chosen[20])) > 1  # items of one batch resume at different steps
    # Per item, the largest qualifying step, even past a step that fails.
    model = {**family_model, "steps": [dict(row) for row in family_model["steps"]]}
    model["steps"][3]["intercept"] += 5.0  # value step 6 predicted far worse than 5 and 7
    assert (choose_value_steps(model, [0.05], 0.5) == 9).all()
    model["steps"] = model["steps"][:4]
    assert (choose_value_steps(model, [0.05], 0.5) == 5).all()


def test_model_round_trips_through_the_manifest(family_kb, family_model):
    cal = calibrate(family_kb, 2, 3, sample=64)
    family_kb.set_calibration(2, cal)
    store_error_model(family_kb, 2, family_model)
    again = KnowledgeBase.open(family_kb.path)
    assert stored_error_model(again, 2, 3) == family_model
    stored = again.calibration(2)
    assert {k: v for k, v in stored.items() if k != "blend_error"} == cal  # the residual percentiles are kept
    assert stored_error_model(again, 2, 4) is None and stored_error_model(again, 4, 3) is None
    assert resolve_guard(stored, 2, 3, GUARD_AUTO).source == "calibrated"  # the residual guard reads it as before
    assert len(json.dumps(stored)) < 16 * 2**10


def test_many_stored_steps_still_fit_in_the_manifest(tmp_path):
    steps = list(range(2, 200))
    settings = toy_settings(steps=200, stored_steps=steps, sigmas=list(np.linspace(14.6, 0.0, 201)),
                            latent_shape=(1, 4, 4))
    kb = KnowledgeBase.create(tmp_path / "kb", settings, dtype="float32")
    rng = np.random.default_rng(0)
    base = rng.standard_normal((20, 1, 4, 4))
    kb.append({t: (base + 0.01 * t * rng.standard_normal(base.shape)).astype(np.float32) for t in steps},
              [f"p{i}" for i in range(20)], [0] * 20)
    model = fit_error_model(measure_blend_errors(kb, 2, 3, sample=20))
    assert len(model["steps"]) == MAX_VALUE_STEPS and model["steps"][-1]["value_step"] == 199
    store_error_model(kb, 2, model)
    assert len(json.dumps(KnowledgeBase.open(kb.path).calibration(2))) < MAX_CALIBRATION_BYTES / 2
    with pytest.raises(KBError, match=rf"value_steps must name 1 to {MAX_VALUE_STEPS} stored steps, got 65.*Pass None"):
        measure_blend_errors(kb, 2, 3, value_steps=steps[1:66])


# --------------------------------------------------------------------------- guard


def test_error_guard_accepts_what_the_model_predicts_within_tolerance(family_kb, family_model):
    store_error_model(family_kb, 2, family_model)
    guard = resolve_error_guard(family_kb.calibration(2), 2, 3, 6, 0.12)
    assert isinstance(guard, ErrorGuard)
    r = np.array([0.0, 0.05, 0.1, 0.15, 10.0])
    np.testing.assert_array_equal(guard.accepts(r), predict_error(family_model, r, 6) <= 0.12)
    assert guard.accepts(r)[0] and not guard.accepts(r)[-1]
    assert "predicted blend error at step 6 <= 0.12" in guard.describe() and "H=3" in guard.describe()
    loose = resolve_error_guard(family_kb.calibration(2), 2, 3, 6, 0.5)
    assert (loose.accepts(r) >= guard.accepts(r)).all()  # a larger tolerance never accepts fewer items
    with pytest.raises(KBError, match=r"no blend-error model for key step 2 and H=5.*kb_tools calibrate KB --key-step 2 --neighbours 5"):
        resolve_error_guard(family_kb.calibration(2), 2, 5, 6, 0.1)
    with pytest.raises(KBError, match=r"has no value step 10; it holds \[3, 4, 5, 6, 7, 8, 9\]"):
        resolve_error_guard(family_kb.calibration(2), 2, 3, 10, 0.1)
    with pytest.raises(KBError, match=r"tolerance must be a finite number >= 0.*e\.g\. 0\.1"):
        resolve_error_guard(family_kb.calibration(2), 2, 3, 6, -0.1)


def test_predict_and_choose_only_read(family_kb, family_model, monkeypatch):
    store_error_model(family_kb, 2, family_model)
    kb = KnowledgeBase.open(family_kb.path)
    generation = kb.generation

    def refuse(*args, **kwargs):
        raise AssertionError("a calibration was computed while reading the model")

    for module, name in ((blend_error, "leave_one_out"), (blend_error, "blend_entries"), (blend_error, "measure_blend_errors"),
                         (residuals, "calibrate"), (residuals, "leave_one_out"), (KnowledgeBase, "set_calibration"),
                         (KnowledgeBase, "search"), (KnowledgeBase, "latents")):
        monkeypatch.setattr(module, name, refuse)
    model = stored_error_model(kb, 2, 3)
    r = np.array([0.01, 0.1, 1.0])
    predict_error(model, r, 4)
    choose_value_steps(model, r, 0.2)
    resolve_error_guard(kb.calibration(2), 2, 3, 4, 0.2).accepts(r)
    assert kb.generation == generation == KnowledgeBase.open(kb.path).generation


# --------------------------------------------------------------------------- bad input


def test_bad_input_names_the_fix(toy_kb, family_model, tmp_path):
    cases = [
        (lambda: measure_blend_errors(toy_kb, 4, 3, value_steps=[2]), r"value step 2 is before the key step 4.*Choose a value step >= the key step"),
        (lambda: measure_blend_errors(toy_kb, 2, 3, value_steps=[5]), r"has no value step 5; it stores steps \[2, 4, 6\]"),
        (lambda: measure_blend_errors(toy_kb, 2, 3, value_steps=6), r"value_steps must be a list of stored steps or None"),
        (lambda: measure_blend_errors(toy_kb, 6, 3), r"key step 6 is the last step the KB.*Choose an earlier key step"),
        (lambda: measure_blend_errors(toy_kb, 2, 3, mode="mean"), r"unknown weight mode 'mean'; valid modes are"),
        (lambda: measure_blend_errors(toy_kb, 2, 51), r"needs at least 52 entries, the KB at .* has 51\. Add entries, or lower H"),
        (lambda: measure_blend_errors(toy_kb, 2, 1, sample=2), r"needs at least 3 entries left out, got 2.*pass sample >= 3"),
        (lambda: measure_blend_errors(toy_kb, 2, 3, sample=0), r"sample must be an integer >= 1, got 0"),
        (lambda: fit_error_model({"steps": []}), r"needs what measure_blend_errors returns, got dict"),
        (lambda: predict_error(family_model, [0.1], 2), r"has no value step 2; it holds \[3, .*Choose one of them"),
        (lambda: predict_error(family_model, [[0.1]], 3), r"centered residuals must be numbers >= 0 of shape \[B\]"),
        (lambda: predict_error(family_model, [np.nan], 3), r"centered residuals must be numbers >= 0"),
        (lambda: choose_value_steps(family_model, [0.1], float("nan")), r"tolerance must be a finite number >= 0"),
        (lambda: choose_value_steps(family_model, [0.1], "0.1"), r"tolerance must be a finite number >= 0"),
        (lambda: check_error_model({**family_model, "version": 2}), r"not a version-1 blend-error model.*python -m kb_tools calibrate"),
        (lambda: check_error_model({**family_model, "z": "x"}), r"holds a non-number\. Recalibrate it: .*--key-step 2 --neighbours 3"),
        (lambda: check_error_model({**family_model, "steps": family_model["steps"][::-1]}), r"ascending value steps"),
        (lambda: store_error_model(toy_kb, 4, family_model), r"measured at key step 2, not 4\. Store it under key step 2"),
    ]
    for call, pattern in cases:
        with pytest.raises(KBError, match=pattern):
            call()
    tiny = make_kb(tmp_path / "tiny", {t: x[:2] for t, x in toy_latents([("a", 0), ("b", 0)]).items()})
    with pytest.raises(KBError, match=r"needs at least 3 entries left out, got 2 \(sample=128, the KB at .* has 2\)\. Add entries"):
        measure_blend_errors(tiny, 2, 1)


def test_a_damaged_stored_model_is_refused_with_the_command_that_recalibrates(family_kb, family_model):
    family_kb.set_calibration(4, {"blend_error": {**family_model, "key_step": 4, "steps": [{"value_step": 5}]}})
    with pytest.raises(KBError, match=r"steps must be 1 to 64 rows.*calibrate KB --key-step 4 --neighbours 3"):
        stored_error_model(KnowledgeBase.open(family_kb.path), 4, 3)
    family_kb.set_calibration(4, {"blend_error": family_model})  # measured at key step 2, stored under 4
    with pytest.raises(KBError, match=r"says it was measured at key step 2: the calibration is damaged"):
        stored_error_model(family_kb, 4, 3)


# --------------------------------------------------------------------------- the command


def kb_tools(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kb_tools", *args], cwd=PACK_DIR, env=env, capture_output=True,
                          text=True, timeout=1800)  # a safety net, not a speed check


def test_calibrate_command_stores_the_error_model(tmp_path):
    kb = make_kb(tmp_path / "kb", smooth_family(60))
    done = kb_tools("calibrate", kb.path, "--key-step", "3", "--neighbours", "3", "--sample", "40")
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("blend-error model for key step 3, H=3 (40 entries left out") and "v 9: rank corr +" in line
    again = KnowledgeBase.open(kb.path)
    model = stored_error_model(again, 3, 3)
    assert model["n"] == 40 and [r["value_step"] for r in model["steps"]] == FAMILY_STEPS[2:]
    assert again.calibration(3)["centered_p95"] > 0

    done = kb_tools("calibrate", kb.path, "--key-step", "3", "--neighbours", "2", "--sample", "40", "--skip-blend-error")
    assert done.returncode == 0, done.stderr
    assert "blend-error" not in done.stdout
    again = KnowledgeBase.open(kb.path)
    assert again.calibration(3)["h"] == 2 and "blend_error" not in again.calibration(3)

    done = kb_tools("calibrate", kb.path, "--key-step", "9", "--neighbours", "3")
    assert done.returncode == 2 and "Choose an earlier key step" in done.stderr and "Traceback" not in done.stderr
    assert KnowledgeBase.open(kb.path).calibration(9) is None  # a refusal stores nothing
