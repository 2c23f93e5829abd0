"""The head-to-head benchmark runs end to end at tiny sizes: every method once on every workload, NFE as counted.

Runs `python benchmarks/head_to_head.py --smoke` in a subprocess with this interpreter and
environment (scripts/test.sh provides ComfyUI): T = 6, a 24-entry KB, 8 queries per workload,
two NFE budgets (3 and 6). Checks the JSON's structure, that every registered method produced
finite outputs on every workload it applies to, and that the NFE each row reports, counted at
the diffusion model's forward pass, is what that method's plan spends (computed here from its
parameters, independently of the benchmark's own claim check). The numbers themselves mean
nothing at this size; nothing here depends on the clock (the timeout is a safety net).
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
SCRIPT = PACK / "benchmarks" / "head_to_head.py"

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

WORKLOADS = {"heldout_fixed", "heldout_foreign", "reuse", "style", "iterate"}
METHODS = {"plain", "oracle", "easycache", "lazycache", "redi", "redi_error_guard", "tstitch", "redi_easycache",
           "tstitch_easycache", "prompt_switch", "kb_corrected", "coarse_euler", "learning_kb", "any_seed",
           "learning_corrected"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, comfy_root):
    out = tmp_path_factory.mktemp("head_to_head") / "smoke.json"
    env = dict(os.environ, COMFYUI_PATH=str(comfy_root), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--scratch", str(out.parent / "scratch")],
                          cwd=PACK, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads(out.read_text())


def rows(res):
    return [r for reg in res["regimes"].values() for w in reg["workloads"].values() for r in w["rows"]]


def test_structure(smoke):
    path, res = smoke
    assert res["benchmark"] == "head_to_head" and res["smoke"] is True and res["complete"] is True
    assert set(res["methods"]) == METHODS
    (name, reg), = res["regimes"].items()
    assert reg["budgets"] == [3, 6] and reg["steps"] == 6
    assert set(reg["workloads"]) == WORKLOADS
    assert set(reg["oracle"]["winners"]) == {"3", "6"}
    for b, c in reg["oracle"]["winners"].items():
        assert c["nfe"] <= int(b)  # the oracle never spends more than its budget (counted on the selection set)
    for wname, w in reg["workloads"].items():
        assert w["n"] == 8 and w["noise_floor"]["draws"] >= 2
        assert w["errors"] == [], w["errors"]
        applicable = {m for m, info in res["methods"].items() if wname in info["workloads"]}
        assert {r["method"] for r in w["rows"]} == applicable, wname
        s = w["summary"]
        assert [f["budget"] for f in s["frontier"]] == [3, 6]
        assert set(s["first_full_quality_nfe"]) == {r["line"] for r in w["rows"]}
        for r in w["rows"]:
            if r["family"] != "plain" and r["nfe"] >= min(reg["budgets"]):  # below every budget: no plain run spends less
                assert "vs_plain" in r, r["label"]
    assert path.with_suffix(".md").is_file()
    assert sorted(p.name for p in path.parent.glob("smoke_*.png")) == sorted(f"smoke_{name}_{w}.png" for w in WORKLOADS)


def test_every_output_finite_and_counted_nfe_is_what_the_plan_spends(smoke):
    _, res = smoke
    (reg,) = res["regimes"].values()
    T, k = reg["steps"], reg["key_step"]
    small_cost = res["setting"]["small_model_cost_in_large_nfe"]
    assert 0 < small_cost < 1  # the small UNet is cheaper per row than the large one
    for r in rows(res):
        where = (r["workload"], r["label"])
        assert r["finite"] is True and r["claim_ok"] is True, (where, r["claim_check"])
        for key in ("nfe", "fd", "fd_sd", "acc", "mse_mean", "wall_s_per_image", "cpu_s_per_image"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (where, key)
        p = r["params"]
        if r["family"] in ("plain", "oracle"):
            steps = p["steps"]
            assert r["nfe_large"] == (2 * steps - 1 if p["sampler"] == "heun" else steps), where
            assert r["nfe_large"] <= r["target_nfe"], where
        elif r["family"] == "redi":
            assert p["k"] == k and r["nfe_min"] >= k + T - p["v"] and r["nfe_max"] <= T, where
            if p["guard"] == "off":  # every blend used: every item skips v - k steps
                assert r["nfe_min"] == r["nfe_max"] == k + T - p["v"] and r["accepted"] == 1.0, where
        elif r["family"] == "cache":
            assert 1 <= r["nfe_large"] <= p["uncached_nfe"], where
        elif r["method"] == "redi_easycache":
            assert 1 <= r["nfe_min"] and r["nfe_max"] <= k + T - p["v"], where
        elif r["method"] == "tstitch_easycache":
            s = round(p["small_fraction"] * T)
            assert r["nfe_small"] == s and 1 <= r["nfe_large"] <= T - s, where
        elif r["family"] == "tstitch":
            s = round(p["small_fraction"] * T)
            assert (r["nfe_small"], r["nfe_large"]) == (s, T - s), where
            assert r["nfe"] == pytest.approx(T - s + s * small_cost, rel=1e-3), where
        elif r["family"] == "style":
            assert r["nfe_large"] == T, where
        elif r["family"] == "any_seed":  # every item: k steps, the blend, T - v steps (the "previous" key is free)
            assert p["key_source"] == "previous" and 2 <= p["k"] < p["v"] <= T - 2, where
            assert r["nfe_min"] == r["nfe_max"] == p["k"] + T - p["v"] == r["target_nfe"], where
        elif r["family"] in ("corrected", "coarse"):  # one evaluation per grid segment, the correction evaluates nothing
            assert p["grid"][0] == 0 and p["grid"][-1] == T, where
            assert r["nfe_min"] == r["nfe_max"] == len(p["grid"]) - 1, where
            if r["family"] == "corrected":
                assert "vs_coarse" in r and r["segments_corrected"] >= 1, where
        if r["method"] == "learning_corrected":  # the budget where corrected, else T (+ the grid's steps before the guard)
            g = p["grid"]
            before_guard = next(i for i, (a, b) in enumerate(zip(g, g[1:])) if a > 0 and b > a + 1)
            assert p["budget"] <= r["nfe_min"] and r["nfe_max"] <= T + before_guard, where
        assert r["nfe_small"] == 0 or "tstitch" in r["method"], where
    caches = [r for r in rows(res) if r["family"] == "cache"]
    assert any(r["nfe_large"] < r["params"]["uncached_nfe"] for r in caches)  # the counter sees the steps a cache skips
    plain_full = [r for r in rows(res) if r["family"] == "plain" and r["nfe"] == T]
    assert plain_full and all(r["mse_mean"] == 0.0 for r in plain_full)  # the full-step run is its own reference


def test_learning_kb_starts_empty_learns_in_order_and_counts_each_item(smoke):
    """Generated one at a time from an empty KB: the first item runs all T steps, later ones jump (k + T - v, counted for
    that item) or run in full, exactly as the plain sampler then, and only the full ones are learned."""
    _, res = smoke
    (reg,) = res["regimes"].values()
    T, k = reg["steps"], reg["key_step"]
    assert set(res["methods"]["learning_kb"]["workloads"]) == {"iterate", "heldout_fixed", "reuse"}
    assert res["methods"]["learning_kb"]["family"] == "learning"
    learning = [r for r in rows(res) if r["method"] == "learning_kb"]
    assert {r["workload"] for r in learning} == {"iterate", "heldout_fixed", "reuse"}
    for r in learning:
        where, p, items = (r["workload"], r["label"]), r["params"], r["per_item"]
        jump = k + T - p["v"]
        nfe, blended = items["nfe"], [bool(b) for b in items["accepted"]]
        assert nfe[0] == T and not blended[0] and items["kb_entries"][0] == 1, where  # first use: the KB was empty
        assert all(n == (jump if b else T) for n, b in zip(nfe, blended)), where
        assert r["claim_ok"] and r["nfe"] == pytest.approx(sum(nfe) / len(nfe)) and r["nfe_max"] == T, where
        full = [i for i, b in enumerate(blended) if not b]
        assert 1 <= r["kb_entries_at_end"] <= len(full) and items["kb_entries"] == sorted(items["kb_entries"]), where
        assert all(items["mse"][i] < 1e-10 for i in full), where  # sampled in full: the plain sampler's own output
        assert r["blended"] == pytest.approx(sum(blended) / len(blended)) and r["nfe_curve"][0]["generations"] == "1-8"
        if p["guard"] >= 1e3:  # a guard no residual reaches: items after the first ones jump, and cost less
            assert sum(blended) >= len(blended) - 2 and r["nfe_min"] == jump < T, where
            assert r["blended_vs_plain"]["items"] == sum(blended), where
    assert any(r["params"]["guard"] == 0.1 for r in learning)  # the node's default guard
    for wname, w in reg["workloads"].items():
        verdicts = w["summary"]["family_verdicts"]
        assert ("learning" in verdicts) == (wname in ("iterate", "heldout_fixed", "reuse")), wname
        assert ("any_seed" in verdicts) == (wname in ("iterate", "heldout_fixed", "heldout_foreign")), wname
        for fam, v in verdicts.items():
            for base in ("plain", "oracle"):
                assert v[base]["rows_won"] + v[base]["rows_lost"] <= v[base]["compared"] <= v["rows"], (wname, fam)
            assert len(w["summary"][f"{fam}_losses"]) >= v["plain"]["rows_lost"], (wname, fam)


def test_error_guard_rows_report_nfe_distribution_rank_correlation_and_verdicts(smoke):
    _, res = smoke
    (reg,) = res["regimes"].values()
    T, k = reg["steps"], reg["key_step"]
    tolerances = res["sizes"]["error_tolerances"]
    for wname, w in reg["workloads"].items():
        if wname == "style":
            assert not any(r["method"] == "redi_error_guard" for r in w["rows"])
            continue
        eg = w["summary"]["error_guard"]
        # every tolerance once with the fixed skip (the one budget below T) and once with the adaptive skip
        assert sorted((str(e["tolerance"]), e["skip"]) for e in eg["rows"]) == sorted(
            (str(t), s) for t in tolerances for s in ("fixed", "adaptive")), wname
        for e in eg["rows"]:
            assert sum(e["nfe_histogram"].values()) == w["n"], e["label"]
            assert e["nfe_min"] <= e["nfe_median"] <= e["nfe_max"] <= T
            nfes = {int(n) for n in e["nfe_histogram"]}
            # fixed: an item jumps to v or stays at k (T NFE); adaptive: anywhere from k + T - v up to T
            allowed = {k + T - e["v"], T} if e["skip"] == "fixed" else set(range(k + T - e["v"], T + 1))
            assert nfes <= allowed, (e["label"], nfes)
            rc = e["rank_correlation"]
            assert rc is not None and 0 <= rc["n_jumped"] <= rc["n"] <= w["n"], e["label"]  # n: items inside the calibrated range
            assert rc["all"] is None or -1.0 <= rc["all"] <= 1.0
            off = e["guard_off"]  # the same nominal setting with the guard off: every item jumps, and its own correlation
            assert off is not None and off["nfe"] == k + T - e["v"], e["label"]
            assert off["rank_correlation"]["n"] <= w["n"] and (off["rank_correlation"]["all"] is None
                                                              or -1.0 <= off["rank_correlation"]["all"] <= 1.0)
            if e["nfe_mean"] >= min(reg["budgets"]):  # below every budget no plain run spends less
                assert e["vs_plain"]["mean_verdict"] in ("win", "tie", "loss")
                assert isinstance(e["vs_plain"]["p95_not_worse"], bool)
        assert set(eg["never_worse_than"]) == {"plain", "oracle"}
        # the default tolerance "no worse than plain at equal NFE" gets its own verdict beside every number's
        assert set(eg["never_worse_by_tolerance"]) == {str(t) for t in tolerances} and "plain" in tolerances
        ref = reg["kb"]["calibration"]["plain_reference"]  # measured once, before any method ran, and reported
        assert [r["plain_nfe"] for r in ref["rows"]] == [k + T - r["value_step"] for r in ref["rows"]]
        numbers = [t for t in tolerances if t != "plain"]
        big = [e for e in eg["rows"] if e["tolerance"] == max(numbers) and e["skip"] == "fixed"]
        small = [e for e in eg["rows"] if e["tolerance"] == min(numbers) and e["skip"] == "fixed"]
        assert big[0]["accepted"] >= small[0]["accepted"]  # a larger tolerance never lets fewer items jump


def test_merge_adds_a_later_runs_methods_only_where_plain_and_oracle_agree(smoke, tmp_path):
    """--merge: a method run later (with plain and the oracle beside it) joins the base report; runs that sampled
    other queries are refused."""
    path, res = smoke
    base = json.loads(json.dumps(res))
    for reg in base["regimes"].values():  # the base run without any_seed, as if it were run later
        for w in reg["workloads"].values():
            w["rows"] = [r for r in w["rows"] if r["method"] != "any_seed"]
    base_path = tmp_path / "base.json"
    base_path.write_text(json.dumps(base))
    out = tmp_path / "merged.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--merge", str(base_path), str(path), "--merge-methods", "any_seed",
                           "--out", str(out)], cwd=PACK, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads(out.read_text())
    assert sorted(r["label"] for r in rows(merged)) == sorted(r["label"] for r in rows(res))
    assert "any_seed" in out.with_suffix(".md").read_text()
    for reg in base["regimes"].values():  # another query set: the plain rows no longer agree
        for w in reg["workloads"].values():
            for r in w["rows"]:
                if r["family"] == "plain":
                    r["mse_mean"] += 1.0
    base_path.write_text(json.dumps(base))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--merge", str(base_path), str(path), "--merge-methods", "any_seed",
                           "--out", str(out)], cwd=PACK, capture_output=True, text=True, timeout=1800)
    assert proc.returncode != 0 and "did not sample the same queries" in proc.stderr
