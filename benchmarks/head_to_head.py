"""Head to head: ReDi and T-Stitch against what a ComfyUI user already has, on the workloads users run.

    source scripts/env.sh
    $REDI_PYTHON benchmarks/head_to_head.py                      # the full T = 20 run
    $REDI_PYTHON benchmarks/head_to_head.py --queries 100 --kb-entries 1000   # a reduced run (sizes in the JSON)
    $REDI_PYTHON benchmarks/head_to_head.py --smoke --out /tmp/h2h.json       # every method once at tiny sizes (CI)

Writes benchmarks/results/head_to_head.json, head_to_head.md and head_to_head_<workload>.png.

Methods (benchmarks/h2h/methods/, one module each): plain euler/normal at NFE budgets of 25-100%
of T; the oracle (the best plain sampler x scheduler per budget, chosen on a separate selection
set); ReDi (Algorithm 2 in one sampler run) at several k, v, H, weight modes, guard off / auto,
on the KB seed and on foreign seeds; ComfyUI's EasyCache and LazyCache applied exactly as their
nodes apply them; T-Stitch at several small-model fractions; for stylization a plain prompt
switch with no retrieval; ReDi against a KB that learns from each generation in order, starting
empty (the ReDiLearningSampler node); retrieval for any seed (benchmarks.any_seed_sampler, an experiment);
the KB-corrected coarse Euler solver. NFE is counted at the diffusion model's forward pass
(kb_tools.comfy.counting), not computed, and checked against what each method claims.
Workloads (benchmarks/h2h/workloads.py): held-out captions from the KB seed (the paper's
protocol) and from foreign seeds, prompt reuse (KB captions nudged a little, from the KB seed),
stylization (content key, styled resume), and the artist's loop "iterate" (sessions of small
prompt changes, each session from the user's own fixed seed, never the KB's, in generation order).
Metrics (benchmarks/h2h/scoring.py): FD in the judge's features with its real-vs-real noise
floor and bootstrap sd, source accuracy and attribute errors, per-sample MSE to the plain full-step output from the same noise, wall and
CPU seconds per image.
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

from benchmarks.h2h.config import WORKLOADS, Config  # noqa: E402
from benchmarks.report import to_json  # noqa: E402
from embedded.models import cpu_has_fast_bf16, setup_comfy  # noqa: E402

RESULTS = PACK / "benchmarks" / "results"
SCRATCH = PACK / ".scratch" / "head_to_head"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: every method once on every workload (CI)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/head_to_head.json)")
    p.add_argument("--queries", type=int, default=None, help="a reduced run: evaluation queries per workload (default 200)")
    p.add_argument("--kb-entries", type=int, default=None, help="a reduced run: KB trajectories (default 2000)")
    p.add_argument("--oracle-captions", type=int, default=None, help="a reduced run: oracle selection captions (default 12)")
    p.add_argument("--cache-thresholds", default=None, help="a reduced run: EasyCache / LazyCache thresholds, comma-separated "
                   "(default 0.05,0.1,0.2,0.4)")
    p.add_argument("--error-tolerances", default=None, help="a reduced run: the error guard's tolerances, comma-separated "
                   "numbers (fractions of the KB's spread) or 'plain' (default plain,0.05,0.1,0.2,0.4)")
    p.add_argument("--workloads", default=None, help=f"a reduced run: comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--methods", default=None, help="a reduced run: comma-separated registry methods to run (default all; "
                   "e.g. plain,oracle,redi,redi_error_guard for the error-guard report)")
    p.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default 1: the machine is shared)")
    p.add_argument("--precision", choices=["bf16", "fp32", "auto"], default="auto",
                   help="bf16: both UNets under bfloat16 autocast; auto: bf16 on CPUs with AMX / AVX512-BF16, else fp32")
    p.add_argument("--scratch", type=Path, default=SCRATCH, help="cache folder for KBs and the oracle grid (gitignored)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON", help="only rewrite the report and plots from a JSON")
    p.add_argument("--merge", type=Path, nargs=2, default=None, metavar=("BASE", "ADDED"),
                   help="one report from two runs: the rows of --merge-methods from ADDED (run with plain and oracle beside "
                        "them, on the same KB and queries) added to BASE's workloads; writes --out and its report")
    p.add_argument("--merge-methods", default="", help="with --merge: comma-separated methods whose rows ADDED contributes")
    return p


def config_from(a) -> tuple[Config, bool]:
    """(the run's config, whether it is reduced from the full one)."""
    if a.smoke:
        return Config.smoke_config(), False
    cfg = Config()
    if a.queries is None and a.kb_entries is None and a.workloads is None and a.oracle_captions is None \
            and a.cache_thresholds is None and a.methods is None and a.error_tolerances is None:
        return cfg, False
    workloads = tuple(w for w in (a.workloads or ",".join(WORKLOADS)).split(",") if w)
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    cfg = cfg.reduced(a.queries or cfg.queries, a.kb_entries or cfg.regimes[0].kb_entries, workloads)
    if a.oracle_captions:
        cfg.oracle_captions = a.oracle_captions
    if a.cache_thresholds:
        cfg.cache_thresholds = tuple(float(x) for x in a.cache_thresholds.split(","))
    if a.methods:
        cfg.methods = tuple(m for m in a.methods.split(",") if m)
    if a.error_tolerances:
        cfg.redi_error_tolerances = tuple(x if x == "plain" else float(x) for x in a.error_tolerances.split(",") if x)
    return cfg, True


def write_json(res: dict, path: Path) -> dict:
    """The results as JSON at `path` (written after every workload, so a stopped run keeps what it measured)."""
    clean = json.loads(json.dumps(to_json(res)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean, indent=1))
    return clean


def render(res: dict, out_dir: Path, stem: str) -> None:
    """The markdown report and the plots of a results JSON."""
    from benchmarks.h2h import writers

    writers.write_markdown(res, out_dir / f"{stem}.md")
    writers.write_plots(res, out_dir, stem)


def main(argv=None) -> dict:
    a = parser().parse_args(argv)
    if a.render is not None:
        res = json.loads(a.render.read_text())
        render(res, a.render.parent, a.render.stem)
        return res
    if a.merge is not None:
        from benchmarks.h2h.merge import add_methods

        if a.out is None or not a.merge_methods:
            raise SystemExit("--merge needs --out and --merge-methods")
        base, added = (json.loads(p.read_text()) for p in a.merge)
        res = write_json(add_methods(base, added, [m for m in a.merge_methods.split(",") if m]), a.out)
        render(res, a.out.parent, a.out.stem)
        return res
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    cfg, reduced = config_from(a)
    precision = a.precision
    if precision == "auto":
        precision = "bf16" if cpu_has_fast_bf16() and not torch.cuda.is_available() else "fp32"
    out_path = a.out or (RESULTS / ("head_to_head_smoke.json" if a.smoke else "head_to_head.json"))
    setup_comfy(a.threads)
    threadpool_limits(a.threads, user_api="blas")
    # ComfyUI (through kb_tools) only from here on: setup_comfy has configured it.
    from benchmarks.h2h import oracle, workloads
    from benchmarks.h2h.bench import Bench
    from benchmarks.h2h.registry import Plan, all_methods
    from benchmarks.h2h.run import run_workload
    from benchmarks.h2h.summary import summarize

    unknown = sorted(set(cfg.methods or ()) - {m.name for m in all_methods()})
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {[m.name for m in all_methods()]}")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("ReDi").setLevel(logging.ERROR)
    log = print
    scratch = a.scratch / ("smoke" if a.smoke else "full")
    bench = Bench(cfg, scratch, precision, log)
    res: dict = {"benchmark": "head_to_head", "smoke": a.smoke, "reduced": reduced,
                 "sizes": {"queries_per_workload": cfg.queries, "reference_renders": cfg.reference_renders,
                           "floor_draws": cfg.floor_draws, "oracle_selection_captions": cfg.oracle_captions,
                           "kb_entries": cfg.regimes[0].kb_entries, "cache_thresholds": list(cfg.cache_thresholds),
                           "workloads": list(cfg.regimes[0].workloads),
                           "error_tolerances": list(cfg.redi_error_tolerances)},
                 "methods": {m.name: {"family": m.family, "description": m.description, "workloads": list(m.workloads)}
                             for m in all_methods() if cfg.methods is None or m.name in cfg.methods},
                 "setting": {"models": "embedded crops UNets (ComfyUI BaseModel, v-prediction, 3x16x16 latent), large 64 ch "
                                       "/ small 32 ch", "precision": precision, "torch_threads": a.threads,
                             "small_model_cost_in_large_nfe": bench.small_cost,
                             "nfe": "counted at the diffusion model's forward pass per item (kb_tools.comfy.counting); a "
                                    "small-model row costs small_model_cost_in_large_nfe large-model NFE (FLOP ratio)",
                             "decision_rule": "a difference counts only beyond 2 combined sd (bootstrap sd for FD, "
                                              "binomial se for accuracy, paired se for per-sample MSE)"},
                 "regimes": {}}
    for regime in cfg.regimes:
        log(f"regime {regime.name}: T = {regime.steps}, cfg {regime.cfg}, budgets {regime.budgets}", flush=True)
        kb = bench.kb(regime)
        chosen = oracle.select(bench, cfg, regime, regime.budgets, workloads.selection(cfg), scratch, log)
        reg = {"steps": regime.steps, "cfg": regime.cfg, "sampler": regime.sampler, "scheduler": regime.scheduler,
               "budgets": list(regime.budgets), "key_step": regime.key_step,
               "kb": {k: v for k, v in vars(kb).items() if k != "kb"},
               "oracle": {**{k: v for k, v in chosen.items() if k != "winners"},
                          "winners": {b: vars(c) for b, c in chosen["winners"].items()}},
               "workloads": {}}
        for workload in regime.workloads:
            t = time.perf_counter()
            log(f"  workload {workload}", flush=True)
            queries = workloads.make(cfg, regime, workload)
            plan = Plan(cfg, regime, workload, regime.budgets, regime.depth, chosen["winners"])
            got = run_workload(bench, regime, queries, plan, log)
            got["summary"] = summarize(got["rows"], regime.budgets)
            got["wall_seconds"] = round(time.perf_counter() - t, 1)
            reg["workloads"][workload] = got
            res["regimes"][regime.name] = reg
            write_json({**res, "complete": False}, out_path)
    res["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    res["machine"] = {"loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
                      "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                      "platform": platform.platform()}
    clean = write_json({**res, "complete": True}, out_path)
    render(clean, out_path.parent, out_path.stem)
    log(f"wrote {out_path} in {res['wall_seconds']:.0f} s", flush=True)
    return clean


if __name__ == "__main__":
    main()
