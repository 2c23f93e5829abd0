"""The head-to-head benchmark runs, stops, resumes and reports at tiny sizes, with every method's NFE as counted.

Runs `python benchmarks/head_to_head.py run --smoke` in subprocesses with this interpreter and
environment (scripts/test.sh provides ComfyUI): one T = 6 regime, a 24-entry KB, 4 items per cell
in chunks of 2, budgets 3, 4, 6, a 3 x 3 oracle grid. The resume path: a run of the learning KB
stopped after one chunk (`--minutes 0`) whose progress file is then marked as stopped mid-chunk
(its state must be rebuilt), a run of everything stopped after one chunk, then a run to the end:
nothing stored is computed twice, and the stored items equal an uninterrupted run's. Then the
report's summary.json structure, and the counted NFE of each method against its plan (computed
here from its parameters, apart from the runner's own claim check). Nothing depends on the clock
(the timeouts are safety nets).
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parent.parent
SCRIPT = PACK / "benchmarks" / "head_to_head.py"

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

METHODS = {"plain", "oracle", "easycache", "lazycache", "redi", "redi_error_guard", "tstitch", "redi_easycache",
           "tstitch_easycache", "kb_corrected", "coarse_euler", "learning_kb", "any_seed", "learning_corrected"}
#: The KB-calibrated sampler's cells, where this kb_tools has calibrate_sampler (its calibration runs first).
CALIBRATED = {"calibrated", "calibrated_easycache"}
SUBSET = ["--methods", "plain,oracle,redi,learning_kb", "--workloads", "iterate"]
CELL_FIELDS = {"regime", "workload", "method", "setting", "nfe", "n", "reference", "mse_converged_mean",
               "mse_converged_p95", "paired_se_vs_oracle", "verdict_vs_oracle"}


def run(env, out: Path, scratch: Path, conv: Path, *args) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "run", "--smoke", "--out", str(out), "--scratch", str(scratch),
                           "--converged-cache", str(conv), *args], cwd=PACK, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines()[::-1] if x.startswith("RUN "))
    return json.loads(line[4:]), proc.stdout


def rows(out: Path) -> dict[tuple, tuple]:
    with sqlite3.connect(out / "results.sqlite") as db:
        got = db.execute("SELECT regime, workload, method, setting, item, nfe, mse_converged, mse_full_step, "
                         "feature_distance, run_id FROM results").fetchall()
    return {r[:5]: r[5:] for r in got}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, comfy_root):
    tmp = tmp_path_factory.mktemp("head_to_head")
    env = dict(os.environ, COMFYUI_PATH=str(comfy_root), OMP_NUM_THREADS="1")
    out, scratch, conv = tmp / "resumed", tmp / "scratch", tmp / "converged"
    import kb_tools

    methods = METHODS | (CALIBRATED if "calibrate_sampler" in kb_tools._PUBLIC else set())
    if methods != METHODS:  # the calibration has its own command; until it has run, the runner skips those cells
        proc = subprocess.run([sys.executable, str(SCRIPT), "calibrate", "--smoke", "--out", str(out), "--scratch",
                               str(scratch), "--converged-cache", str(conv)], cwd=PACK, env=env, capture_output=True, text=True,
                              timeout=1800)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first, _ = run(env, out, scratch, conv, "--methods", "learning_kb", "--workloads", "iterate", "--minutes", "0")
    progress = list((scratch / "smoke" / "learning").glob("*iterate-learning-kb/*/progress.json"))
    assert len(progress) == 1 and json.loads(progress[0].read_text()) == {"items": 2, "clean": True}
    progress[0].write_text(json.dumps({"items": 2, "clean": False}))  # as if killed with a chunk in flight
    second, _ = run(env, out, scratch, conv, "--minutes", "0")
    stopped = report(env, out)
    third, log = run(env, out, scratch, conv)
    whole = tmp / "uninterrupted"
    ref, _ = run(env, whole, tmp / "scratch_uninterrupted", conv, *SUBSET)
    return {"runs": (first, second, third), "log": log, "out": out, "whole": whole, "ref": ref, "methods": methods,
            "stopped_summary": stopped, "summary": report(env, out)}


def report(env, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), "report", "--out", str(out)], cwd=PACK, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def test_a_stopped_run_resumes_without_recomputing_and_equals_an_uninterrupted_one(runs):
    first, second, third = runs["runs"]
    assert first["chunks"] == 1 and first["stopped_by_deadline"] and second["chunks"] == 1 and second["stopped_by_deadline"]
    assert not third["stopped_by_deadline"] and third["failed_cells"] == []
    got = rows(runs["out"])
    assert first["items_computed"] + second["items_computed"] + third["items_computed"] == len(got)
    by_run = [sum(1 for v in got.values() if v[-1] == i) for i in (1, 2, 3)]
    assert by_run == [first["items_computed"], second["items_computed"], third["items_computed"]]
    assert "rebuilding its state from the 2 stored items" in runs["log"]  # the learning KB's state was stale
    whole = rows(runs["whole"])
    assert runs["ref"]["items_computed"] == len(whole) > 0
    for key, value in whole.items():
        assert key in got, key
        assert got[key][:4] == pytest.approx(value[:4], rel=1e-6, abs=1e-12), key


def test_every_method_ran_and_its_counted_nfe_is_what_its_plan_spends(runs):
    out = runs["out"]
    with sqlite3.connect(out / "results.sqlite") as db:
        params = {r[:4]: (r[4], json.loads(r[5])) for r in db.execute(
            "SELECT regime, workload, method, setting, family, params FROM settings")}
        assert db.execute("SELECT COUNT(*) FROM failures").fetchone()[0] == 0
    got = rows(out)
    assert {k[2] for k in got} == runs["methods"]
    T = 6
    for key, value in got.items():
        nfe = value[0]
        family, p = params[key[:4]]
        if key[2] == "plain":
            assert nfe == p["steps"], key
        elif key[2] == "oracle":
            steps = p["steps"]
            assert nfe == (2 * steps - 1 if p["sampler"] == "heun" else steps) == p["claimed_nfe"], key
        elif family == "cache" or key[2] in ("redi_easycache", "tstitch_easycache", "calibrated_easycache"):
            assert 1 <= nfe <= p.get("uncached_nfe", T), key
        elif key[2] in ("redi", "redi_error_guard"):
            jump = p["k"] + T - p["v"]
            allowed = {jump} if p["guard"] == "off" else set(range(jump, T + 1))
            assert nfe in allowed, (key, nfe)
        elif key[2] in ("kb_corrected", "coarse_euler"):
            assert nfe == len(p["grid"]) - 1, key
        elif key[2] == "any_seed":
            assert nfe == p["k"] + T - p["v"], key
        elif key[2] == "learning_kb":
            assert nfe in {p["k"] + T - p["v"], T} and (key[4] > 0 or nfe == T), key  # the first item: an empty KB
        elif key[2] == "learning_corrected":
            assert p["budget"] <= nfe <= 2 * T, key
        elif key[2] == "calibrated":  # the calibrated table: one evaluation per step; a built-in: its own count
            assert nfe <= p["nfe"], key
        elif key[2] == "tstitch":
            assert T - round(p["small_fraction"] * T) < nfe < T, key  # small-model rows cost less than large ones
    caches = [v[0] for k, v in got.items() if k[2] in ("easycache", "lazycache")]
    assert min(caches) < max(caches)  # the counter sees the steps a cache skips


def test_summary_has_the_fields_the_verdicts_need(runs):
    res, out = runs["summary"], runs["out"]
    assert set(res["regimes"]) == {"smoke"} and "validity" in res["regimes"]["smoke"]
    assert res["regimes"]["smoke"]["steps"] == 6 and res["regimes"]["smoke"]["budgets"] == [3, 4, 6]
    cells = res["cells"]
    assert {c["method"] for c in cells} == runs["methods"]
    for c in cells:
        assert CELL_FIELDS <= set(c), c
        assert c["reference"] == "converged" and c["n"] == 4, c
        assert c["verdict_vs_oracle"] in ("win", "tie", "loss", None)
        assert c["reference_resolves"] in ((None,) if c["verdict_vs_oracle"] is None else (True, False))
        if c["method"] == "oracle":
            assert c["verdict_vs_oracle"] is None
        if c["family"] not in ("plain", "oracle", "cache", "coarse"):
            assert "nfe_ratio_at_equal_quality" in c
            r, fair = c["nfe_ratio_at_equal_quality"], c["nfe_ratio_vs_oracle_or_plain"]
            assert r is None or r > 0
            assert fair is None or r is None or fair <= r + 1e-9  # the smaller of two readings, one of them r
    assert {r["run_id"] for r in res["runs"]} == {1, 2, 3} and all(r["cpu_seconds"] is not None for r in res["runs"])
    assert all(r["machine"]["cores"] >= 1 and isinstance(r["machine"]["bf16"], bool) for r in res["runs"])
    assert res["progress"]["headline"]["least_n"] == 4
    stopped = runs["stopped_summary"]["progress"]  # after one chunk: the cells not started yet count as missing
    for phase in ("headline", "wider"):
        assert stopped[phase]["cells"] == res["progress"][phase]["cells"] > 0
        assert stopped[phase]["least_n"] == 0 and stopped[phase]["items_missing"] > 0
    assert (out / "head_to_head.md").is_file() and (out / "frontier_smoke.png").is_file()
    assert "n" in (out / "head_to_head.md").read_text()
