"""The paper-claims benchmark runs end to end at tiny sizes and writes a well-formed JSON.

Runs `python benchmarks/paper_claims.py --smoke --out <tmp>` in a subprocess with this
interpreter and environment (scripts/test.sh provides ComfyUI), then checks the structure
and that every number is finite. The numbers themselves mean nothing at this size. The smoke
runs every experiment at a fixed size (no wall-clock budget), about a minute on an idle
2-core machine; the subprocess timeout is only a safety net against a hung run.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parent.parent
SCRIPT = PACK / "benchmarks" / "paper_claims.py"
WEIGHTS = PACK / "embedded" / "weights"

pytestmark = [pytest.mark.comfy, pytest.mark.slow]


def _leaves(x, path="$"):
    """Every (path, leaf value) in a JSON value."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, x


def _numbers(x):
    """Every (path, number) in a JSON value."""
    return ((p, v) for p, v in _leaves(x) if isinstance(v, (int, float)) and not isinstance(v, bool))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, comfy_root):
    missing = [f for f in ("crops_large", "crops_small", "crops_judge") if not (WEIGHTS / f"{f}.safetensors").is_file()]
    if missing:
        pytest.fail(f"embedded weights missing: {missing} (restore them from git or run python -m embedded.train)")
    out = tmp_path_factory.mktemp("paper_claims") / "smoke.json"
    scratch = out.parent / "scratch"
    env = dict(os.environ, COMFYUI_PATH=str(comfy_root))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--scratch", str(scratch)],
                          cwd=PACK, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_smoke_structure(smoke):
    res = smoke
    assert res["smoke"] is True
    for key in ("setting", "kb", "experiments", "goals", "skipped", "wall_seconds", "machine", "sampling_cost"):
        assert key in res, key
    s = res["setting"]
    for key in ("conditions", "protocols", "schedule", "judge", "noise_floor", "precision", "torch_threads"):
        assert key in s, key
    assert set(s["protocols"]) == {"fixed", "foreign"}
    assert len(res["machine"]["loadavg_before"]) == 3 and len(res["machine"]["loadavg_after"]) == 3
    ex = res["experiments"]
    for key in ("setting_check", "equal_nfe", "condition_key", "ablations", "stylization", "tstitch", "guard",
                "wallclock", "regime_map"):
        assert key in ex, key
    assert not res["skipped"], res["skipped"]  # the smoke has no time budget: every experiment runs
    st = ex["stylization"]
    assert [r["method"] for r in st["rows"]][:2] == ["plain, content caption (unstyled reference)", "plain, styled caption (direct)"]
    assert any(r["method"].startswith("ReDi") for r in st["rows"])
    for r in st["rows"]:
        assert -1.0 <= r["layout_similarity"] <= 1.0 and r["sepia_err"] >= 0
    assert ex["setting_check"]["per_sampler"]["euler"]["rows"][-1]["mse_mean"] == 0.0  # the longest run is its own reference
    assert {r["sampler"] for r in ex["wallclock"]["rows"]} == {"euler"}
    rows = ex["equal_nfe"]["rows"]
    assert {r["method"] for r in rows} == {"plain", "redi"}
    assert {r["h"] for r in rows if r["method"] == "redi"} >= {1, 3}
    for r in rows:
        for metric in ("fd", "fd_sd", "acc", "geo_err", "sepia_err", "mse_mean", "mse_p95"):
            assert metric in r, (metric, r)
    for r in rows:
        if r["method"] == "redi":
            assert r["nfe"] == r["k"] + s["schedule"]["steps_T"] - r["v"]
            assert "d_xv_mean" in r and "residual_centered_mean" in r
    for name in ("equal_nfe_fd_acc_2_of_3", "half_nfe_vs_full_fd", "trajectory_vs_condition_keys", "guard_never_worse"):
        assert name in res["goals"] and "met" in res["goals"][name], name
    assert {r["protocol"] for r in ex["regime_map"]} == {"fixed", "foreign"}
    assert [r["small_fraction"] for r in ex["tstitch"]["rows"]][0] == 0.0
    assert ex["tstitch"]["rows"][0]["mse_mean"] == 0.0  # fraction 0 is the large-only reference itself


def test_smoke_numbers_finite(smoke):
    res = smoke
    bad = [(p, v) for p, v in _numbers(res) if not math.isfinite(v)]
    assert not bad, bad[:10]
    nulls = [p for p, v in _leaves(res) if v is None]
    # None only where the JSON writer replaced a non-finite float: there must be none
    assert not [p for p in nulls if ".rows[" in p and p.rsplit(".", 1)[-1] in ("fd", "acc", "mse_mean")], nulls[:10]



def test_smoke_refuses_a_time_budget(comfy_root):
    """What the smoke runs never depends on the clock: --budget-min is for full runs only."""
    env = dict(os.environ, COMFYUI_PATH=str(comfy_root))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--budget-min", "1"], cwd=PACK, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 2 and "--budget-min applies to full runs only" in proc.stderr, proc.stderr[-2000:]
