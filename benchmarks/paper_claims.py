"""Evidence benchmark: which claims of the ReDi and T-Stitch papers hold on the embedded crops models.

    source scripts/env.sh
    $REDI_PYTHON benchmarks/paper_claims.py              # full run (about 45 min on 2 CPU cores)
    $REDI_PYTHON benchmarks/paper_claims.py --smoke --out /tmp/pc.json   # every experiment at tiny sizes (~1 min)

Writes benchmarks/results/paper_claims.json, paper_claims.md and paper_claims_*.png (full run).

Every sample goes through the pack's own code (`embedded/sampling.py` over kb_tools: knowledge
base build and guard calibration, Algorithm 2 in one sampler run or, where a sweep shares one
query across H and v, its four documented parts, T-Stitch in one sampler run) on the two
caption-conditional crops UNets of `embedded/` (ComfyUI's own UNet, v-prediction).

Conditions: captions "<source> at <cx> <cy> size <z> [sepia <t>]" (18 sources: 8 photographs
and 10 digit classes, continuous crop geometry and sepia strength). The KB comes from train
captions, queries from held-out captions (disjoint random draws, as COCO train / val).

Metrics (`benchmarks/metrics.py`): Frechet distance in the 128-d hidden layer of the shipped
judge CNN against real crops rendered for the query captions, with its real-vs-real noise
floor at the same sample count; condition faithfulness from the same judge (source accuracy,
crop-geometry and sepia regression errors); per-sample MSE to the full-step plain output from
the same noise and condition, and d(x_v, x_v_hat) (paper Table 3) with the retrieval residual
beside it. The experiments are in `benchmarks/claims/`.

The run is sized by its config (Config, or Config.smoke_config with --smoke) and runs every
experiment in it; --budget-min (full runs only) leaves out the experiments that would end the
run past a time budget and lists them under "skipped".
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

PACK = Path(__file__).resolve().parent.parent
if str(PACK) not in sys.path:  # run as a script: benchmarks/ and embedded/ are packages of the pack root
    sys.path.insert(0, str(PACK))

from benchmarks.claims import writers  # noqa: E402
from benchmarks.claims.config import Config  # noqa: E402
from benchmarks.report import to_json  # noqa: E402
from embedded.models import cpu_has_fast_bf16, read_weights, setup_comfy  # noqa: E402

RESULTS = PACK / "benchmarks" / "results"
SCRATCH = PACK / ".scratch" / "paper_claims"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: every experiment once, a structure check for CI")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/paper_claims.json; required-by-convention for --smoke)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads; 0 = auto: 2 on an idle machine, 1 when other jobs already load the 2 cores")
    p.add_argument("--precision", choices=["bf16", "fp32", "auto"], default=None,
                   help="bf16: both UNets under bfloat16 autocast (embedded.models.bf16_autocast), ~2.5x faster on CPUs "
                        "with AMX / AVX512-BF16 and ~2x slower on CPUs without; auto: bf16 on such CPUs, else fp32. "
                        "Default: bf16 for full runs (the published results), auto for --smoke")
    p.add_argument("--scratch", type=Path, default=SCRATCH, help="cache folder for knowledge bases (gitignored)")
    p.add_argument("--fresh", action="store_true", help="delete the cached knowledge bases first (honest build times)")
    p.add_argument("--budget-min", type=float, default=None,
                   help="full runs only: a soft time budget in minutes; experiments that would end the run past it "
                        "are skipped and listed (default: none, run everything the config asks for)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only rewrite paper_claims.md and the plots from an existing results JSON")
    return p


def render(res: dict) -> None:
    """paper_claims.md, the block in benchmarks/README.md and the plots from a results JSON."""
    writers.write_markdown(res, RESULTS / "paper_claims.md")
    writers.update_readme(RESULTS / "paper_claims.md", PACK / "benchmarks" / "README.md")
    writers.write_plots(res, RESULTS)


def main(argv=None) -> dict:
    p = parser()
    a = p.parse_args(argv)
    if a.render is not None:
        res = json.loads(a.render.read_text())
        render(res)
        return res
    if a.smoke and a.budget_min is not None:
        p.error("--budget-min applies to full runs only: the smoke runs every experiment at its fixed tiny size")
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    cfg = Config.smoke_config() if a.smoke else Config()
    if a.budget_min is not None:
        cfg.soft_budget_s = 60.0 * a.budget_min
    threads = a.threads or (1 if load_before[0] > 1.0 else 2)
    precision = a.precision or ("auto" if a.smoke else "bf16")
    if precision == "auto":
        precision = "bf16" if cpu_has_fast_bf16() and not torch.cuda.is_available() else "fp32"
    out_path = a.out or (RESULTS / ("paper_claims_smoke.json" if a.smoke else "paper_claims.json"))
    scratch = a.scratch / ("smoke" if a.smoke else "full")
    setup_comfy(threads)
    # numpy's BLAS (the FD's eigendecompositions) gets the same threads as torch: its default of
    # one thread per core slows it several times over on a machine other jobs already load.
    threadpool_limits(threads, user_api="blas")
    # The run itself imports ComfyUI (through kb_tools), which setup_comfy has just configured.
    from benchmarks.claims import experiments as E
    from benchmarks.claims import goals as G
    from benchmarks.claims.bench import Bench, Skip
    from benchmarks.claims.rows import Table

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("ReDi").setLevel(logging.ERROR)

    b = Bench(cfg, precision, scratch, a.fresh, t_start)
    log = print if not a.smoke else (lambda *x, **k: None)
    res: dict = {"benchmark": "paper_claims", "smoke": a.smoke, "skipped": [], "experiments": {}}
    judge_meta = json.loads(read_weights("judge")[1].get("embedded_crops_judge", "{}"))
    res["setting"] = {
        "models": "embedded crops UNets (ComfyUI BaseModel, v-prediction, 3x16x16 latent = RGB image), large 64 ch / small 32 ch",
        "conditions": ("captions '<source> at <cx> <cy> size <z> [sepia <t>]': 18 sources (8 photographs, 10 digit "
                       "classes), continuous crop geometry and sepia strength; KB captions from the train split, queries "
                       f"from the held-out split ({cfg.queries} captions), drawn independently from one distribution"),
        "protocols": {"fixed": f"every KB trajectory and every query starts from seed {cfg.kb_seed} (official ReDi setup)",
                      "foreign": f"queries start from seeds {cfg.foreign_seed_base}+i, not in the KB (the KB is the fixed-seed one)"},
        "guard_auto": (f"the KB's stored calibration: the leave-one-out 95th percentile of the centered residual at k = "
                       f"{cfg.key_step}, H = {cfg.h_claim} over 64 entries, stored after each build (what `python -m kb_tools "
                       "calibrate KB --key-step k --neighbours H --sample 64` does; a generation never calibrates)"),
        "schedule": {"steps_T": cfg.steps, "scheduler": cfg.scheduler, "cfg": cfg.cfg, "key_step_k": cfg.key_step,
                     "nfe_budgets": list(cfg.budgets), "value_step_for_budget": {n: cfg.value_step(n) for n in cfg.budgets},
                     "redi_nfe": "k + (T - v); a guard-rejected item costs T", "half_nfe": cfg.half_nfe},
        "queries_per_set": cfg.queries, "samplers": list(cfg.samplers), "h_for_claims": cfg.h_claim,
        "precision": precision, "torch_threads": threads, "kb_sizes": cfg.kb_sizes,
        "judge": {"kind": "CNN (embedded.judge.JudgeNet) trained on rendered real crops of train captions / train digits",
                  "heldout": judge_meta.get("heldout"),
                  "fd_reference": f"{len(b.real_features)} real crops: {cfg.reference_renders} renderings of each query caption "
                                  "(held-out digits, jittered geometry)"},
        "noise_floor": {"fd_real_vs_real": b.fd_noise_floor(),
                        "decision_rule": "a difference counts only beyond 2 combined sd (bootstrap sd for FD, binomial "
                                         "se for accuracy, paired se for per-sample MSE, paired bootstrap for p95)"},
    }
    exps = res["experiments"]
    table = Table()

    def attempt(name: str, fn):
        t = time.perf_counter()
        try:
            value = fn()
            log(f"[{b.elapsed():6.0f} s] {name} done in {time.perf_counter() - t:.0f} s", flush=True)
            return value
        except Skip as e:
            res["skipped"].append({"experiment": name, "reason": str(e)})
            log(f"[{b.elapsed():6.0f} s] {name} SKIPPED: {e}", flush=True)
            return None

    # 0. is the question real: plain quality against steps
    exps["setting_check"] = {"per_sampler": {}}
    for sampler in cfg.samplers:
        got = attempt(f"0. setting check {sampler}", lambda s=sampler: E.setting_check(b, s))
        if got:
            exps["setting_check"]["per_sampler"][sampler] = got
    # 1. equal NFE, fixed seed, per sampler (KB first)
    kb_info = {}
    for sampler in cfg.samplers:
        def run1(sampler=sampler):
            n = cfg.kb_sizes[sampler]
            if not b.kb_path(sampler).exists():
                b.afford(n * cfg.steps, f"KB {sampler}")
            kb_info[sampler] = b.knowledge_base(sampler, n)
            return E.equal_nfe(b, sampler, "fixed", cfg.h_main) + E.extra_h(b, sampler)
        got = attempt(f"1. equal NFE {sampler} (fixed seed)", run1)
        if got:
            table.add(got)
    res["kb"] = kb_info
    first = cfg.samplers[0]
    have_kb = first in b.kbs
    # 2. trajectory vs condition key
    cond = attempt("2. trajectory vs condition key", lambda: E.condition_key(b, first)) if have_kb else None
    exps["condition_key"] = cond
    # 3. ablations
    abl = attempt("3. ablations", lambda: E.ablations(b, first, table)) if have_kb else None
    if abl:
        table.add(abl.new_rows())
    exps["ablations"] = abl
    # 4. stylization
    exps["stylization"] = attempt("4. stylization", lambda: E.stylization(b, first)) if have_kb else None
    # 5. T-Stitch
    exps["tstitch"] = attempt("5. T-Stitch", lambda: E.tstitch(b, first))
    # 6. guard and wall clock (the first sampler; the guard needs the foreign protocol)
    guard = None
    if have_kb:
        def run6():
            table.add(E.equal_nfe(b, first, "foreign", (cfg.h_claim,)))
            return E.guard(b, first, table)
        guard = attempt("6. guard (+ foreign-seed equal NFE)", run6)
        exps["wallclock"] = E.wallclock(b, table, [x for x in cfg.samplers if x in b.kbs])
    exps["guard"] = guard
    # 7. regime map: foreign protocol for the other samplers
    for sampler in cfg.samplers[1:]:
        if sampler in b.kbs:
            got = attempt(f"7. equal NFE {sampler} (foreign seed)",
                          lambda s=sampler: E.equal_nfe(b, s, "foreign", (cfg.h_claim,)))
            if got:
                table.add(got)
    exps["regime_map"] = G.regime_map(cfg, table)
    res["goals"] = G.goals(cfg, table, cond, guard)
    exps["equal_nfe"] = {"rows": table.equal_nfe_rows()}
    res["sampling_cost"] = {"image_steps": b.image_steps, "model_seconds": round(b.model_seconds, 1),
                            "ms_per_image_step": round(1000 * b.rate(), 2)}
    res["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    res["machine"] = {"loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
                      "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                      "platform": platform.platform()}
    clean = json.loads(json.dumps(to_json(res)))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(clean, indent=1))
    if not a.smoke:
        render(clean)
    log(f"wrote {out_path} in {res['wall_seconds']:.0f} s", flush=True)
    return clean


if __name__ == "__main__":
    main()
