"""Does refining the calibrated sampler for the final state alone beat the stored rollout fit on held-out items?

A stronger variant tried for the calibrated sampler (kb_tools.calibration.sampler_fit.refine_for_final_state:
Levenberg-Marquardt on the whole table and the schedule's knots for the teachers' converged ends, instead of
landing every step on the teacher). It reads a stored sampler calibration and its teachers (no teacher is rerun), refines each
N's table on the FIT items, on the schedule the calibration chose, and measures on the held-out items
(never fitted on) the per-item MSE to the converged end (LATENT space) of the stored table, the refined
table and, from the record, the best built-in sampler x schedule. Results per N are written as they
finish (a rerun skips the N already in the results file).

    python benchmarks/calibration_refinement.py [--kb .scratch/head_to_head/kb_...cfg3...] [--cfg 3] [--nfe 6,8]
        [--iterations 3] [--out benchmarks/results/sampler_calibration/refinement_cfg3.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


PACK = Path(__file__).resolve().parent.parent
if str(PACK) not in sys.path:
    sys.path.insert(0, str(PACK))

DEFAULT_KB = PACK / ".scratch" / "head_to_head" / "kb_crops16_euler-normal_T20_cfg3_seed7_n800"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kb", type=Path, default=DEFAULT_KB)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--nfe", default="", help="comma-separated N (default: every calibrated N)")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--knots", action=argparse.BooleanOptionalAction, default=False,
                   help="refine the schedule's interior knots with the table too (did not help at N = 4)")
    p.add_argument("--eval-shifts", action=argparse.BooleanOptionalAction, default=False,
                   help="refine each step's evaluation sigma too (LD3's decoupled timesteps; the node's format has no "
                        "place for them yet: an experiment)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=PACK / "benchmarks" / "results" / "sampler_calibration" / "refinement_cfg3.json")
    a = p.parse_args(argv)

    from embedded.models import setup_comfy

    setup_comfy(a.threads)
    import torch

    import kb_tools
    from embedded.models import load_models
    from kb_tools.calibration.heldout import paired_se
    from kb_tools.calibration.live_model import with_live_batch
    from kb_tools.calibration.sampler_calibration import cfg_key
    from kb_tools.calibration.sampler_fit import refine_for_final_state, rollout, shifted
    from kb_tools.calibration.teacher import fine_sigmas
    from kb_tools.store import sampler_calibration as stored

    t0, c0 = time.perf_counter(), time.process_time()
    large, _, encode = load_models()
    record = kb_tools.load_sampler_calibration(str(a.kb)).record
    block = record["cfgs"][cfg_key(a.cfg)]
    fine_steps = record["teacher"]["fine_steps"]
    teachers = block["teachers"]
    loaded = [stored.load_teacher(str(a.kb), stored.teacher_fields(record["model_fingerprint"], t["prompt"], t["seed"], a.cfg,
                                                                    record["negative_prompt"], record["latent_shape"],
                                                                    fine_steps), t["sha256"]) for t in teachers]
    states = torch.stack([s for s, _, _ in loaded])
    fine = fine_sigmas(large, fine_steps)
    split = block["split"]
    negative = encode(record["negative_prompt"])
    nfe = [int(n) for n in a.nfe.split(",")] if a.nfe else sorted(int(n) for n in block["nfe"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PACK, capture_output=True, text=True).stdout.strip()
    out = json.loads(a.out.read_text()) if a.out.is_file() else {}
    rows = out.get("rows", {})

    def live_on(items, job):
        return with_live_batch(large, [encode(teachers[i]["prompt"]) for i in items], negative,
                               [teachers[i]["seed"] for i in items], a.cfg, record["latent_shape"], fine, job)

    for n in nfe:
        if str(n) in rows:
            print(f"N={n}: in {a.out} already", flush=True)
            continue
        t_n, c_n = time.perf_counter(), time.process_time()
        res = block["nfe"][str(n)]
        sig = torch.tensor(res["sigmas"], dtype=torch.float64)
        stored_table = torch.tensor(res["coeffs"], dtype=torch.float64)
        fit = split["fit"]

        def refine(live):
            x0, target = states[fit, 0].to(live.kmodel.noise), states[fit, -1]
            return refine_for_final_state(lambda z, s: live.denoise(z, s), x0, target, sig, stored_table,
                                          knots=a.knots, eval_shifts=a.eval_shifts, iterations=a.iterations), \
                live.tally.total()

        (refined_sig, table, history, shifts), fit_evals = live_on(fit, refine)
        held = split["heldout"]

        def check(live):
            ends = live.to_latent(0.0, states[held, -1]).double()
            x0 = states[held, 0].to(live.kmodel.noise)

            def mse(sigmas, coeffs, eval_shifts=None):
                model = shifted(lambda z, s: live.denoise(z, s), sigmas, eval_shifts)
                x = live.to_latent(0.0, rollout(model, x0, sigmas, coeffs)).double()
                return ((x - ends) ** 2).flatten(1).mean(1).numpy()
            return mse(sig, stored_table), mse(refined_sig, table, shifts)

        before, after = live_on(held, check)
        h = res["heldout"]
        rows[str(n)] = {
            "nfe": n, "schedule": res["schedule"], "n_heldout": len(held), "n_fit": len(fit), "knots": a.knots,
            "eval_shifts": None if shifts is None else shifts.tolist(),
            "sigmas_stored": res["sigmas"], "sigmas_refined": refined_sig.tolist(),
            "fit_final_mse_per_iteration": history, "heldout_stored_table": float(before.mean()),
            "heldout_refined_table": float(after.mean()), "paired_se_refined_vs_stored": paired_se(after, before),
            "record_calibrated_mse": h["calibrated_mse"], "best_builtin": h["best_builtin"],
            "best_builtin_mse": h["best_builtin_mse"], "record_kind": h["kind"],
            "refined_over_best_builtin": float(after.mean()) / h["best_builtin_mse"],
            "fit_evaluations": fit_evals, "wall_seconds": round(time.perf_counter() - t_n, 1),
            "cpu_seconds": round(time.process_time() - c_n, 1), "commit": commit}
        print(json.dumps(rows[str(n)]), flush=True)
        out = {"benchmark": "calibration refinement (final-state Gauss-Newton) on a stored sampler calibration",
               "command": " ".join(["python", "benchmarks/calibration_refinement.py", *(argv or sys.argv[1:])]),
               "date": time.strftime("%Y-%m-%d"), "kb": a.kb.name, "cfg": a.cfg, "iterations": a.iterations,
               "machine": {"cores": os.cpu_count(), "threads": a.threads}, "rows": rows,
               "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "wall_seconds_this_run": round(time.perf_counter() - t0, 1),
               "cpu_seconds_this_run": round(time.process_time() - c0, 1)}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
