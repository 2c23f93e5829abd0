"""The plain parts of a ReDi run (no ComfyUI): the guard, evaluation counts, the result's summary, the switch."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import PACK_DIR
from kb_tools.core.errors import KBError
from kb_tools.calibration.guard import FALLBACK_GUARD, GUARD_AUTO, MAX_AUTO_GUARD, resolve_guard
from kb_tools.core.evaluations import Evaluations
from kb_tools.samplers.result import ReDiResult
from kb_tools.core.schedule import Switch, plan_redi


def test_guard_is_given_calibrated_or_the_stated_fallback():
    assert resolve_guard(None, 3, 2, 0.7).threshold == 0.7
    calibrated = resolve_guard({"h": 2, "centered_p95": 0.41}, 3, 2, GUARD_AUTO)
    assert (calibrated.threshold, calibrated.source) == (0.41, "calibrated")
    assert resolve_guard({"h": 2, "centered_p95": 7.0}, 3, 2, GUARD_AUTO).threshold == MAX_AUTO_GUARD
    other_h = resolve_guard({"h": 5, "centered_p95": 0.41}, 3, 2, GUARD_AUTO)  # calibrated for another H
    assert (other_h.threshold, other_h.source) == (FALLBACK_GUARD, "fallback")
    assert "--key-step 3 --neighbours 2" in other_h.describe()
    assert other_h.accepts(np.array([0.1, 0.5, 0.51])).tolist() == [True, True, False]


def test_evaluations_per_model_and_item():
    e = Evaluations(3)
    e.add("small_model", [0, 1, 2])
    e.add("model", np.array([0, 2]))
    e.add("model", [0])
    assert e.of("model").tolist() == [2, 0, 1] and e.per_item().tolist() == [3, 1, 2]
    assert e.total() == 6 and e.total("small_model") == 3 and e.of("large_model").tolist() == [0, 0, 0]
    both = e.concat(Evaluations(1, {"model": np.array([4])}))
    assert both.per_item().tolist() == [3, 1, 2, 4] and both.of("small_model").tolist() == [1, 1, 1, 0]
    assert e.describe() == "1-3 evaluations per item (mean 2)"


def _result(start, centered):
    b = len(start)
    return ReDiResult(latent=None, plan=plan_redi(10, 3, 7), accepted=np.array(start) == 7, start_steps=np.array(start), neighbour_ids=np.zeros((b, 2), int),
                      distances=np.zeros((b, 2)), weights=np.zeros((b, 2)), weight_mode="lstsq", residual=np.zeros(b),
                      centered_residual=np.array(centered), guard=resolve_guard(None, 3, 2, GUARD_AUTO),
                      evaluations=Evaluations(b, {"model": np.array([10 - 4 if s == 7 else 10 for s in start])}))


def test_result_summary_says_what_each_item_did():
    assert _result([7, 7], [0.1, 0.2]).summary().startswith("ReDi: skipped 4 steps for all 2 item(s)")
    mixed = _result([7, 3], [0.1, 3.0])
    assert mixed.accepted.tolist() == [True, False] and mixed.skipped_steps.tolist() == [4, 0]
    assert "skipped 4 steps for 1 of 2 items" in mixed.summary() and "6-10 evaluations per item" in mixed.summary()
    fell = _result([3], [3.0]).summary()
    assert "guard fell back to plain sampling" in fell and "fallback: the KB stores no calibration" in fell


def test_switch_resolves_against_the_schedule():
    sigmas = [14.6, 7.0, 3.0, 1.0, 0.3, 0.0]
    assert Switch("fraction", 0.4).step_in(sigmas) == 2 and Switch("fraction", 0.4).sigma_in(sigmas) == 3.0
    assert Switch("step", 9).step_in(sigmas) == 5
    assert Switch("sigma", 2.0).step_in(sigmas) == 3 and Switch("sigma", 2.0).sigma_in(sigmas) == 2.0
    for bad in (("fraction", 1.5), ("sigma", -1.0), ("halfway", 0.5)):
        with pytest.raises(KBError):
            Switch(*bad)


def test_plain_modules_import_without_comfyui(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMFYUI_PATH")}
    code = ("import sys; sys.path.insert(0, %r); import kb_tools.calibration.guard, kb_tools.samplers.result, kb_tools.core.weights, "
            "kb_tools.core.schedule, kb_tools.core.records; assert 'comfy' not in sys.modules, 'comfy imported'") % str(PACK_DIR)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
