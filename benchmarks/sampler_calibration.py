"""The sampler calibration on the shipped large model: its held-out table per N, evaluations and wall seconds.

Calls kb_tools.calibrate_sampler (the same code as `python -m kb_tools calibrate-sampler` and the
ReDiCalibrateSampler node) on teachers from train captions with their own seeds, in a scratch KB
folder built from those prompts, and writes the record's figures per N: the calibrated sampler's
held-out MSE to the converged end, the best built-in sampler x schedule's, euler/normal's, the
paired standard errors, n, the winner; the doubling figure; evaluations and seconds.

    python benchmarks/sampler_calibration.py [--teachers 64] [--nfe 4,5,6,8,10] [--cfg 3] [--fine-steps 100]
        [--samplers ...] [--schedules ...] [--out benchmarks/results/sampler_calibration/embedded_cfg3.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent
if str(PACK) not in sys.path:
    sys.path.insert(0, str(PACK))

SEED_BASE = 5_000_000
DEFAULT_OUT = PACK / "benchmarks" / "results" / "sampler_calibration" / "embedded_cfg3.json"


def builtin_nfe_at(rows: list[dict], mse: float | None) -> float | None:
    """The NFE at which the best built-in choice per N (on the same held-out items) reaches `mse`, log-MSE linear
    between calibrated N; None outside the measured range (better than its best, or worse than its cheapest)."""
    from benchmarks.h2h.summary import nfe_at_quality  # the head-to-head benchmark's reading of the oracle's frontier

    best, front = float("inf"), []
    for n, e in sorted((r["nfe"], r["best_builtin_mse"]) for r in rows):  # lower envelope: more NFE never reads worse
        best = min(best, e)
        front.append((n, best))
    return None if mse is None else nfe_at_quality(front, mse)


def table(record: dict) -> dict:
    """The figures per cfg and N from a calibration record (JSON-ready), with the NFE ratio at equal quality: the NFE
    at which the best built-in choice per N reaches the calibrated sampler's held-out MSE, over N (optimistic for the
    built-in side: its best choice per N is picked on the held-out items themselves)."""
    out = {}
    for key, block in record["cfgs"].items():
        rows = []
        for n, res in sorted(block["nfe"].items(), key=lambda kv: int(kv[0])):
            h = res["heldout"]
            rows.append({"nfe": int(n), "winner": h["kind"], "schedule": res["schedule"], "n": h["n"],
                         "calibrated_mse": h["calibrated_mse"], "best_builtin": h["best_builtin"],
                         "best_builtin_mse": h["best_builtin_mse"], "paired_se": h["diff_se"],
                         "euler_normal_mse": h["euler_normal_mse"], "euler_normal_paired_se": h["euler_normal_diff_se"],
                         "select_mse": res["select_mse"], "candidates_fitted": res["trials"]})
        for r in rows:
            at = builtin_nfe_at(rows, r["calibrated_mse"])
            r["builtin_nfe_at_equal_mse"] = at
            r["nfe_ratio_at_equal_quality"] = None if at is None else at / r["nfe"]
        out[key] = {"rows": rows, "doubling": block["doubling"], "cost": block["cost"], "split_sizes":
                    {k: len(v) for k, v in block["split"].items()}}
    return out


def summarise(a, argv) -> int:
    """The figures of a calibration already stored with a KB (the head-to-head benchmark's, say), as a results file."""
    import subprocess

    from embedded.models import setup_comfy

    setup_comfy(1)  # puts ComfyUI on the path: the record is checked by kb_tools' loader
    import kb_tools

    cal = kb_tools.load_sampler_calibration(a.from_kb)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PACK, capture_output=True, text=True).stdout.strip()
    result = {"benchmark": "sampler calibration on the embedded large model (summary of a stored calibration)",
              "command": " ".join(["python", "benchmarks/sampler_calibration.py", *(argv or sys.argv[1:])]),
              "commit": commit, "date": time.strftime("%Y-%m-%d"), "kb": Path(a.from_kb).name,
              "teacher": cal.record["teacher"], "settings": {k: b.get("settings") for k, b in cal.record["cfgs"].items()},
              "cfgs": table(cal.record), "summary": cal.summary().splitlines()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(result["summary"]))
    print(f"wrote {a.out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teachers", type=int, default=64)
    p.add_argument("--nfe", default="4,5,6,8,10")
    p.add_argument("--cfg", default="3")
    p.add_argument("--fine-steps", type=int, default=100)
    p.add_argument("--samplers", default=None, help="comma list (default: kb_tools.PLAIN_SAMPLERS)")
    p.add_argument("--schedules", default=None, help="comma list (default: kb_tools.PLAIN_SCHEDULES)")
    p.add_argument("--search-sweeps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scratch", default=str(PACK / "benchmarks" / ".cache" / "sampler_calibration_kb"))
    p.add_argument("--fresh", action="store_true", help="delete the scratch KB first (else stored teachers are reused)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--from-kb", default=None, help="summarise the calibration stored with this KB (no sampling)")
    a = p.parse_args(argv)
    if a.from_kb:
        return summarise(a, argv)

    from embedded.models import setup_comfy

    setup_comfy(a.threads)
    import kb_tools
    from embedded.captions import sample_captions
    from embedded.models import load_models
    from embedded.rendering import LATENT_SHAPE

    large, _, encode = load_models()
    prompts = [c.prompt() for c in sample_captions(a.teachers, "train")]
    extra = {}
    if a.samplers:
        extra["samplers"] = tuple(a.samplers.split(","))
    if a.schedules:
        extra["schedules"] = tuple(a.schedules.split(","))
    if a.fresh:
        shutil.rmtree(a.scratch, ignore_errors=True)
    start = time.perf_counter()
    cal = kb_tools.calibrate_sampler(a.scratch, large, encode, nfe=tuple(int(n) for n in a.nfe.split(",")),
                                     cfgs=tuple(float(c) for c in a.cfg.split(",")), teachers=a.teachers,
                                     latent_shape=LATENT_SHAPE, prompts=prompts,
                                     seeds=[SEED_BASE + i for i in range(len(prompts))], fine_steps=a.fine_steps,
                                     search_sweeps=a.search_sweeps, chunk=a.batch_size, log=print, **extra)
    result = {"benchmark": "sampler calibration on the embedded large model",
              "settings": {"teachers": a.teachers, "nfe": a.nfe, "cfg": a.cfg, "fine_steps": a.fine_steps,
                           "samplers": extra.get("samplers", list(kb_tools.PLAIN_SAMPLERS)),
                           "schedules": extra.get("schedules", list(kb_tools.PLAIN_SCHEDULES)),
                           "search_sweeps": a.search_sweeps, "teacher_captions": "train split, seeds 5000000 + i",
                           "threads": a.threads},
              "wall_seconds_total": time.perf_counter() - start, "cfgs": table(cal.record),
              "summary": cal.summary().splitlines()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(cal.summary())
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
