"""The learning-KB benchmark runs end to end at tiny sizes (`benchmarks/learning_kb.py --smoke`, 6 generations per
workload from an empty KB) in a subprocess: NFE counted per generation is what each path spends, only items sampled
in full are learned, and with no repetition the outputs are the plain sampler's. Nothing depends on the clock."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parent.parent
SCRIPT = PACK / "benchmarks" / "learning_kb.py"

pytestmark = [pytest.mark.comfy, pytest.mark.slow]


def test_learning_benchmark_smoke(tmp_path, comfy_root):
    out = tmp_path / "smoke.json"
    env = dict(os.environ, COMFYUI_PATH=str(comfy_root), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--scratch", str(tmp_path / "kbs")],
                          cwd=PACK, env=env, capture_output=True, text=True, timeout=1800)  # a safety net
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    steps, jump = result["regime"]["steps"], result["jump_nfe"]
    for name, w in result["workloads"].items():
        rows = w["per_generation"]
        assert len(rows) == w["generations"] == 6
        assert rows[0]["nfe"] == steps and not rows[0]["blended"]  # first use: the KB was empty
        for r in rows:
            assert r["nfe"] == (jump if r["blended"] else steps), (name, r)
        full = sum(not r["blended"] for r in rows)
        assert 1 <= w["kb_entries_final"] <= full  # blended items are never learned
    fresh = result["workloads"]["fresh"]
    assert fresh["blended"] == 0 and fresh["mse_to_plain_full"]["max"] < 1e-10
    assert (out.with_suffix(".md")).read_text().startswith("# Learning KB")
