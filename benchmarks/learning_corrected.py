"""The KB-corrected solver against a learning KB, on the embedded model.

    source scripts/env.sh
    OMP_NUM_THREADS=1 $REDI_PYTHON benchmarks/learning_corrected.py                        # 200 iterate + 50 fresh
    OMP_NUM_THREADS=1 $REDI_PYTHON benchmarks/learning_corrected.py --iterate 500 --fresh 100
    $REDI_PYTHON benchmarks/learning_corrected.py --smoke --out /tmp/learning_corrected.json  # tiny sizes

Writes benchmarks/results/learning_corrected.json and .md.

The workloads of benchmarks/learning_kb.py ("iterate": sessions of small prompt changes from one
fixed seed; "fresh": a new held-out caption from a new seed each time), each from an EMPTY learning
KB (euler, T = 20, stored steps 1..19), generations one at a time, each
`kb_tools.samplers.learning.generate_learning_corrected` at each NFE budget (the coarse_grid rule):
corrected where the KB holds >= H entries and the residual guard accepts, else sampled in full and
learned. Quality: per-sample MSE to plain euler at T full steps, beside plain euler at the same NFE
(the budget) and the oracle sampler an earlier head-to-head run chose at that NFE (ORACLE below),
paired on the corrected items.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

PACK = Path(__file__).resolve().parent.parent
if str(PACK) not in sys.path:  # run as a script: benchmarks/ and embedded/ are packages of the pack root
    sys.path.insert(0, str(PACK))

from benchmarks import metrics as M  # noqa: E402
from benchmarks.h2h.config import Config, Regime  # noqa: E402
from benchmarks.learning_kb import fresh_workload, iterate_workload, plain_latents, write  # noqa: E402
from embedded.models import setup_comfy  # noqa: E402

RESULTS = PACK / "benchmarks" / "results"
SCRATCH = PACK / ".scratch" / "learning_corrected"
#: The oracle (best sampler x scheduler on the selection captions) per budget at T = 20, from
#: an earlier head-to-head run (euler-20-referenced, since retired; benchmarks/README.md keeps its history).
ORACLE = {5: ("res_multistep", "sgm_uniform"), 10: ("deis", "karras")}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterate", type=int, default=200, help="iterate generations (default 200)")
    p.add_argument("--fresh", type=int, default=50, help="fresh generations (default 50)")
    p.add_argument("--session", type=int, default=10, help="iterate: generations per caption session (default 10)")
    p.add_argument("--nfe", default="5,10", help="budgets (default 5,10)")
    p.add_argument("--neighbours", type=int, default=3)
    p.add_argument("--guard", type=float, default=-1.0, help="-1: auto (the KB's calibration, else 0.5)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes")
    p.add_argument("--out", type=Path, default=None)
    return p


def windows(n: int) -> list[tuple[int, int]]:
    return [(lo, min(hi, n)) for lo, hi in ((1, 10), (11, 100), (101, n)) if lo <= n and hi >= lo]


def run_workload(S, model, settings, path: Path, prompts, seeds, nfe: int, args) -> list[dict]:
    """Generations one at a time against a learning KB that starts empty."""
    shutil.rmtree(path, ignore_errors=True)
    rows = []
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        wall, cpu = time.perf_counter(), time.process_time()
        r = S.corrected_learning(path, settings, model, [p], [s], nfe=nfe, h=args.neighbours, guard=args.guard)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rows.append({"nfe": int(r.evaluations.per_item()[0]), "corrected": bool(r.corrected[0]),
                     "residual": None if np.isnan(r.centered_residual[0]) else float(r.centered_residual[0]),
                     "kb_entries": r.learned.count, "wall_s": wall, "cpu_s": cpu, "latent": r.latent[0]})
        if (i + 1) % 50 == 0:
            print(f"  {i + 1}/{len(prompts)}, KB {r.learned.count} entries, "
                  f"{sum(x['corrected'] for x in rows)} corrected", flush=True)
    shutil.rmtree(path, ignore_errors=True)
    return rows


def stats(x: np.ndarray) -> dict:
    return {"mean": float(x.mean()), "p95": float(np.percentile(x, 95)), "max": float(x.max())} if len(x) else None


def summarize(rows: list[dict], mse: np.ndarray, plain_eq: np.ndarray, oracle_eq: np.ndarray, steps: int) -> dict:
    nfe = np.array([r["nfe"] for r in rows])
    c = np.array([r["corrected"] for r in rows])
    saved = steps - nfe
    curve = [{"generations": f"{lo}-{hi}", "nfe_saved_mean": float(saved[lo - 1:hi].mean()),
              "corrected_fraction": float(c[lo - 1:hi].mean()), "kb_entries_at_end": rows[hi - 1]["kb_entries"]}
             for lo, hi in windows(len(rows))]
    paired = None
    if c.any():
        d_plain, d_oracle = mse[c] - plain_eq[c], mse[c] - oracle_eq[c]
        paired = {"mse_to_plain_full": stats(mse[c]), "plain_euler_equal_nfe": stats(plain_eq[c]),
                  "oracle_equal_nfe": stats(oracle_eq[c]),
                  "worse_than_plain_equal_nfe": int((d_plain > 0).sum()), "worse_than_oracle_equal_nfe": int((d_oracle > 0).sum()),
                  "paired_diff_vs_plain": {"mean": float(d_plain.mean()),
                                           "se": float(d_plain.std(ddof=1) / np.sqrt(len(d_plain))) if len(d_plain) > 1 else None},
                  "paired_diff_vs_oracle": {"mean": float(d_oracle.mean()),
                                            "se": float(d_oracle.std(ddof=1) / np.sqrt(len(d_oracle))) if len(d_oracle) > 1 else None}}
    return {"generations": len(rows), "nfe_plain": steps, "nfe_mean": float(nfe.mean()),
            "nfe_saved_mean": float(saved.mean()), "nfe_saved_fraction": float(saved.sum() / (steps * len(rows))),
            "corrected": int(c.sum()), "refused_after_guard": int(((nfe > steps)).sum()), "curve": curve,
            "kb_entries_final": rows[-1]["kb_entries"], "mse_to_plain_full": stats(mse), "corrected_items": paired,
            "wall_s_per_generation": float(np.mean([r["wall_s"] for r in rows])),
            "cpu_s_per_generation": float(np.mean([r["cpu_s"] for r in rows])),
            "per_generation": [{k: v for k, v in r.items() if k != "latent"} | {"mse_to_plain_full": float(m)}
                               for r, m in zip(rows, mse)]}


def markdown(out: dict) -> str:
    r = out["regime"]
    lines = ["# Learning KB + KB-corrected euler: NFE saved and quality at equal NFE", "",
             f"Embedded model {r['model']}, T = {r['steps']}, cfg {r['cfg']}, euler/{r['scheduler']}; learning KB storing steps "
             f"1..{r['steps'] - 1}, H = {out['neighbours']}, residual guard {out['guard']} (-1 = auto: the fallback 0.5 at the "
             "first corrected step, a learning KB stores no calibration). Every workload starts from an empty KB; generations "
             "one at a time. A corrected item costs the budget; a refused one the grid's first step plus T; one made while "
             "the KB holds < H entries T.", "",
             f"Machine: {out['machine']['platform']}, {out['machine']['cpus']} CPUs, torch threads "
             f"{out['machine']['torch_threads']}; load average before / after {out['load_before']} / {out['load_after']}; "
             f"total {out['total_wall_s']:.0f} s wall / {out['total_cpu_s']:.0f} s CPU.", ""]
    for key, w in out["runs"].items():
        lines += [f"## {key}: {w['description']}", "", f"Grid {w['grid']}.", "",
                  "| generations | NFE saved per generation (mean) | corrected | KB entries at end |", "|---|---|---|---|"]
        lines += [f"| {c['generations']} | {c['nfe_saved_mean']:+.2f} of {w['nfe_plain']} | {c['corrected_fraction']:.0%} | "
                  f"{c['kb_entries_at_end']} |" for c in w["curve"]]
        m = w["mse_to_plain_full"]
        lines += ["", f"All {w['generations']} generations: mean NFE {w['nfe_mean']:.2f} ({w['nfe_saved_fraction']:+.1%} of "
                  f"plain's saved; {w['refused_after_guard']} refused by the guard at T + 1); per-sample MSE to plain euler "
                  f"{w['nfe_plain']} steps mean {m['mean']:.3g}, p95 {m['p95']:.3g}, max {m['max']:.3g}."]
        p = w["corrected_items"]
        if p:
            lines += [f"Corrected items ({w['corrected']}) at {w['budget']} NFE: MSE mean {p['mse_to_plain_full']['mean']:.3g}, "
                      f"p95 {p['mse_to_plain_full']['p95']:.3g}; plain euler at {w['budget']} NFE mean "
                      f"{p['plain_euler_equal_nfe']['mean']:.3g}, p95 {p['plain_euler_equal_nfe']['p95']:.3g} (worse than it for "
                      f"{p['worse_than_plain_equal_nfe']} of {w['corrected']}); oracle {w['oracle']} mean "
                      f"{p['oracle_equal_nfe']['mean']:.3g}, p95 {p['oracle_equal_nfe']['p95']:.3g} (worse for "
                      f"{p['worse_than_oracle_equal_nfe']})."]
        lines += [f"Wall {w['wall_s_per_generation']:.2f} s / CPU {w['cpu_s_per_generation']:.2f} s per generation "
                  "(generation + learning, shared machine).", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    setup_comfy(threads=1)
    from embedded import sampling as S
    from embedded.models import load_model
    from kb_tools.core.coarse_grid import coarse_grid
    from kb_tools.core.records import Recipe
    from kb_tools.core.schedule import parse_steps

    t0, c0 = time.perf_counter(), time.process_time()
    cfg, regime = Config(), Regime("T20")
    if args.smoke:
        args.iterate, args.fresh, args.session = 6, 3, 3
    recipe = Recipe(regime.sampler, regime.scheduler, regime.steps, regime.cfg)
    model = load_model("large")
    settings = S.learning_settings(model, recipe, parse_steps(f"1-{regime.steps - 1}", regime.steps))
    workloads = {
        "iterate": (*iterate_workload(args.iterate, args.session, cfg, regime.kb_seed),
                    f"sessions of {args.session} small prompt changes (head-to-head 'reuse' nudges), one fixed seed "
                    f"{regime.kb_seed}"),
        "fresh": (*fresh_workload(args.fresh, cfg), "no repetition: a new held-out caption from a new seed each time"),
    }
    out = {"regime": {"model": regime.model, "steps": regime.steps, "cfg": regime.cfg, "sampler": regime.sampler,
                      "scheduler": regime.scheduler}, "neighbours": args.neighbours, "guard": args.guard,
           "smoke": args.smoke, "load_before": [round(v, 2) for v in os.getloadavg()],
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
           "runs": {}}
    path = args.out or RESULTS / "learning_corrected.json"
    for name, (prompts, seeds, description) in workloads.items():
        if not prompts:
            continue
        ref = plain_latents(S, model, prompts, seeds, recipe)
        for nfe in (int(v) for v in args.nfe.split(",")):
            print(f"{name} @ {nfe} NFE: {len(prompts)} generations", flush=True)
            rows = run_workload(S, model, settings, SCRATCH / path.stem / f"{name}_{nfe}", prompts, seeds, nfe, args)
            latents = torch.stack([r["latent"] for r in rows])
            plain_eq = plain_latents(S, model, prompts, seeds, Recipe(recipe.sampler, recipe.scheduler, nfe, recipe.cfg))
            sampler, scheduler = ORACLE[nfe]
            oracle_eq = plain_latents(S, model, prompts, seeds, Recipe(sampler, scheduler, nfe, recipe.cfg))
            w = summarize(rows, M.per_sample_mse(latents, ref), M.per_sample_mse(plain_eq, ref),
                          M.per_sample_mse(oracle_eq, ref), regime.steps)
            out["runs"][f"{name} {nfe} NFE"] = {"workload": name, "description": description, "budget": nfe,
                                                "grid": list(coarse_grid(regime.steps, nfe)),
                                                "oracle": f"{sampler}/{scheduler} {nfe} steps", **w}
            print(json.dumps({k: v for k, v in w.items() if k != "per_generation"}, indent=1, default=str), flush=True)
            out["load_after"] = [round(v, 2) for v in os.getloadavg()]
            out["total_wall_s"], out["total_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
            write(path, out, markdown)  # after each run: a long run that is stopped keeps what it finished


if __name__ == "__main__":
    main()
