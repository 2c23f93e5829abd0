"""A knowledge base that learns from the user's own generations, on the embedded model.

    source scripts/env.sh
    OMP_NUM_THREADS=1 $REDI_PYTHON benchmarks/learning_kb.py                    # 500 generations per workload
    OMP_NUM_THREADS=1 $REDI_PYTHON benchmarks/learning_kb.py --generations 100  # a reduced run (sizes in the JSON)
    $REDI_PYTHON benchmarks/learning_kb.py --smoke --out /tmp/learning_kb.json  # tiny sizes (CI)

Writes benchmarks/results/learning_kb.json and learning_kb.md.

Each workload starts from an EMPTY learning KB and runs its generations one at a time, as a user
does: each generation is `kb_tools.samplers.redi_chain.generate_learning` (the ReDiLearningSampler node): ReDi
against the learning KB with the residual guard, then the items the guard refused (sampled in
full from noise) are appended. Workloads:
- iterate: an artist's loop, one fixed seed; sessions of `--session` generations, each a small
  change of the previous caption (benchmarks/h2h/workloads.artist_loop, the head-to-head "reuse"
  nudges: crop centre, size, sepia), each session starting from a new train caption;
- fresh: no repetition, every generation a new held-out caption from its own new seed.
Reported per generation: model evaluations (counted at the denoiser), whether the blend was
used, the KB's size; quality as per-sample MSE to the plain sampler's full-step output of the
same prompt and seed, beside the plain sampler at the same NFE as a jump (k + T - v).
"""
from __future__ import annotations

import argparse
import json
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
from benchmarks.h2h.workloads import artist_loop  # noqa: E402
from benchmarks.report import to_json  # noqa: E402
from embedded.captions import sample_captions  # noqa: E402
from embedded.models import setup_comfy  # noqa: E402

RESULTS = PACK / "benchmarks" / "results"
SCRATCH = PACK / ".scratch" / "learning_kb"
WINDOWS = ((1, 10), (11, 100), (101, 500))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generations", type=int, default=500, help="generations per workload (default 500)")
    p.add_argument("--session", type=int, default=10, help="iterate: generations per caption session (default 10)")
    p.add_argument("--key-step", type=int, default=None, help="default: the regime's (10%% of T)")
    p.add_argument("--value-step", type=int, default=10)
    p.add_argument("--neighbours", type=int, default=3)
    p.add_argument("--guard", type=float, default=-1.0, help="-1: auto (the KB's calibration, else 0.5)")
    p.add_argument("--max-entries", type=int, default=None, help="learning budget (default: none)")
    p.add_argument("--workloads", default="iterate,fresh")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--scratch", type=Path, default=None, help="folder for the learning KBs (default .scratch/learning_kb/<out name>)")
    return p


def iterate_workload(n: int, session: int, cfg: Config, seed: int) -> tuple[list[str], list[int]]:
    """Sessions of small caption changes from one fixed seed (the head-to-head artist's loop, from train captions)."""
    return [c.prompt() for c in artist_loop(n, session, cfg, "train")], [seed] * n


def fresh_workload(n: int, cfg: Config) -> tuple[list[str], list[int]]:
    """No repetition: a new held-out caption from a new seed each time."""
    return [c.prompt() for c in sample_captions(n, "heldout")], [cfg.foreign_seed_base + i for i in range(n)]


def run_workload(S, model, settings, path: Path, prompts, seeds, args, key_step: int, budget) -> dict:
    """Generations one at a time against a learning KB that starts empty; per-generation records."""
    shutil.rmtree(path, ignore_errors=True)
    rows = []
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        wall, cpu = time.perf_counter(), time.process_time()
        r = S.redi_learning(path, settings, model, [p], [s], key_step=key_step, value_step=args.value_step,
                            h=args.neighbours, guard=args.guard, budget=budget)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rows.append({"nfe": int(r.evaluations.per_item()[0]), "blended": bool(r.redi is not None and r.redi.accepted[0]),
                     "residual": None if r.redi is None else float(r.redi.centered_residual[0]),
                     "kb_entries": r.learned.count, "evicted": r.learned.evicted, "wall_s": wall, "cpu_s": cpu,
                     "latent": r.latent[0]})
        if (i + 1) % 50 == 0:
            print(f"  {i + 1}/{len(prompts)} generations, KB {r.learned.count} entries, "
                  f"{sum(x['blended'] for x in rows)} blended", flush=True)
    return {"rows": rows}


def summarize(rows: list[dict], mse: np.ndarray, mse_equal_nfe: np.ndarray, steps: int) -> dict:
    nfe = np.array([r["nfe"] for r in rows])
    blended = np.array([r["blended"] for r in rows])
    saved = steps - nfe
    curve = []
    for lo, hi in WINDOWS:
        if lo > len(rows):
            break
        sl = slice(lo - 1, min(hi, len(rows)))
        curve.append({"generations": f"{lo}-{min(hi, len(rows))}", "nfe_saved_mean": float(saved[sl].mean()),
                      "blended_fraction": float(blended[sl].mean()), "kb_entries_at_end": rows[sl.stop - 1]["kb_entries"]})
    cumulative = [{"first": n, "nfe_saved_mean": float(saved[:n].mean()), "blended": int(blended[:n].sum())}
                  for n in (10, 100, 500) if n <= len(rows)]
    b = blended
    return {
        "generations": len(rows), "nfe_plain": steps, "nfe_mean": float(nfe.mean()),
        "nfe_saved_mean": float(saved.mean()), "nfe_saved_fraction": float(saved.sum() / (steps * len(rows))),
        "blended": int(b.sum()), "curve": curve, "cumulative": cumulative,
        "kb_entries_final": rows[-1]["kb_entries"], "evicted_total": int(sum(r["evicted"] for r in rows)),
        "mse_to_plain_full": {"mean": float(mse.mean()), "p95": float(np.percentile(mse, 95)), "max": float(mse.max())},
        "blended_items": None if not b.any() else {
            "mse_to_plain_full": {"mean": float(mse[b].mean()), "p95": float(np.percentile(mse[b], 95)),
                                  "max": float(mse[b].max())},
            "plain_at_equal_nfe_mse": {"mean": float(mse_equal_nfe[b].mean()),
                                       "p95": float(np.percentile(mse_equal_nfe[b], 95)),
                                       "max": float(mse_equal_nfe[b].max())},
            "worse_than_plain_at_equal_nfe": int((mse[b] > mse_equal_nfe[b]).sum())},
        "wall_s_per_generation": float(np.mean([r["wall_s"] for r in rows])),
        "cpu_s_per_generation": float(np.mean([r["cpu_s"] for r in rows])),
        "per_generation": [{k: v for k, v in r.items() if k != "latent"} | {"mse_to_plain_full": float(m)}
                           for r, m in zip(rows, mse)],
    }


def plain_latents(S, model, prompts, seeds, recipe, batch: int = 50) -> torch.Tensor:
    return torch.cat([S.plain(model, prompts[i:i + batch], seeds[i:i + batch], recipe).latents
                      for i in range(0, len(prompts), batch)])


def markdown(out: dict) -> str:
    lines = ["# Learning KB: NFE saved as the KB learns from the user's own generations", "",
             f"Embedded model {out['regime']['model']}, T = {out['regime']['steps']}, cfg {out['regime']['cfg']}, "
             f"{out['regime']['sampler']}/{out['regime']['scheduler']}; ReDi k = {out['key_step']}, v = {out['value_step']}, "
             f"H = {out['neighbours']}, residual guard {out['guard']} (-1 = auto: the fallback 0.5, a learning KB stores "
             f"no calibration); budget {out['budget']}. Every workload starts from an empty KB.", ""]
    for name, w in out["workloads"].items():
        lines += [f"## {name}: {w['description']}", "",
                  "| generations | NFE saved per generation (mean) | blended | KB entries at end |", "|---|---|---|---|"]
        lines += [f"| {c['generations']} | {c['nfe_saved_mean']:.2f} of {w['nfe_plain']} | {c['blended_fraction']:.0%} | "
                  f"{c['kb_entries_at_end']} |" for c in w["curve"]]
        m = w["mse_to_plain_full"]
        lines += ["", f"All {w['generations']} generations: {w['nfe_saved_fraction']:.1%} of the plain NFE saved; per-sample "
                  f"MSE to the plain {w['nfe_plain']}-step output mean {m['mean']:.3g}, p95 {m['p95']:.3g}, max {m['max']:.3g}."]
        b = w["blended_items"]
        if b:
            lines += [f"Blended items ({w['blended']}): MSE mean {b['mse_to_plain_full']['mean']:.3g}, p95 "
                      f"{b['mse_to_plain_full']['p95']:.3g}; plain euler at the same NFE ({out['jump_nfe']}): mean "
                      f"{b['plain_at_equal_nfe_mse']['mean']:.3g}, p95 {b['plain_at_equal_nfe_mse']['p95']:.3g}; the blend "
                      f"was worse than plain at equal NFE for {b['worse_than_plain_at_equal_nfe']} of {w['blended']}."]
        lines += [f"Wall {w['wall_s_per_generation']:.2f} s / CPU {w['cpu_s_per_generation']:.2f} s per generation "
                  "(generation + learning, shared machine).", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    setup_comfy(threads=1)
    from embedded import sampling as S
    from embedded.models import load_model
    from kb_tools.store import KBBudget
    from kb_tools.core.records import Recipe
    from kb_tools.core.schedule import parse_steps

    cfg, regime = Config(), Regime("T20")
    if args.smoke:
        args.generations, args.session = 6, 3
    key_step = args.key_step if args.key_step is not None else regime.key_step
    recipe = Recipe(regime.sampler, regime.scheduler, regime.steps, regime.cfg)
    jump_nfe = key_step + regime.steps - args.value_step
    model = load_model("large")
    settings = S.learning_settings(model, recipe, parse_steps("auto", regime.steps))
    budget = KBBudget(max_entries=args.max_entries)
    workloads = {
        "iterate": (*iterate_workload(args.generations, args.session, cfg, regime.kb_seed),
                    f"sessions of {args.session} small prompt changes (head-to-head 'reuse' nudges: centre +-{cfg.reuse_shift}, "
                    f"size x exp(+-{cfg.reuse_log_size}), sepia +-{cfg.reuse_sepia}), one fixed seed {regime.kb_seed}"),
        "fresh": (*fresh_workload(args.generations, cfg), "no repetition: a new held-out caption from a new seed each time"),
    }
    out = {"regime": {"model": regime.model, "steps": regime.steps, "cfg": regime.cfg, "sampler": regime.sampler,
                      "scheduler": regime.scheduler},
           "key_step": key_step, "value_step": args.value_step, "neighbours": args.neighbours, "guard": args.guard,
           "stored_steps": list(settings.stored_steps), "budget": budget.describe(), "jump_nfe": jump_nfe,
           "smoke": args.smoke, "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
           "workloads": {}}
    path = args.out or RESULTS / "learning_kb.json"
    scratch = args.scratch or SCRATCH / path.stem  # one folder per output: runs with different settings never share a KB
    for name in args.workloads.split(","):
        prompts, seeds, description = workloads[name]
        print(f"{name}: {len(prompts)} generations", flush=True)
        run = run_workload(S, model, settings, scratch / name, prompts, seeds, args, key_step, budget)
        latents = torch.stack([r["latent"] for r in run["rows"]])
        ref = plain_latents(S, model, prompts, seeds, recipe)
        equal = plain_latents(S, model, prompts, seeds, Recipe(recipe.sampler, recipe.scheduler, jump_nfe, recipe.cfg))
        w = summarize(run["rows"], M.per_sample_mse(latents, ref), M.per_sample_mse(equal, ref), regime.steps)
        out["workloads"][name] = {"description": description, **w}
        print(json.dumps({k: v for k, v in w.items() if k != "per_generation"}, indent=1, default=str), flush=True)
        write(path, out)  # after each workload: a long run that is stopped keeps what it finished


def write(path: Path, out: dict, to_markdown=None) -> None:
    """The results as JSON at `path` and as Markdown beside it (`to_markdown(out)`, default this benchmark's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(out), indent=1) + "\n")
    path.with_suffix(".md").write_text((to_markdown or markdown)(out))
    print(f"wrote {path} and {path.with_suffix('.md')}", flush=True)


if __name__ == "__main__":
    main()
