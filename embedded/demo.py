"""ReDi, T-Stitch and the KB-calibrated sampler on the embedded crops models: build a knowledge base, query it, compare.

    bash scripts/demo.sh                 # full demo (a few minutes on 2 CPU cores)
    bash scripts/demo.sh --fresh         # rebuild the knowledge base from scratch
    bash scripts/demo.sh --captions 12 --seeds 2 --queries 2 --output /tmp/x   # tiny run

1. Builds (or resumes) a knowledge base in OUTPUT/demo_kb with the shipped large model through
   `kb_tools.build.builder.build_knowledge_base`, the code path of the BuildKnowledgeBase node: C train
   captions ("cat at 0.40 0.62 size 0.35 sepia 0.80", ...) x seeds 0..S-1, euler, normal
   schedule, 20 steps, cfg 3. Then stores the automatic guard's calibration for the key step and
   H, as a user does with `python -m kb_tools calibrate OUTPUT/demo_kb --key-step 4 --neighbours 3`
   (a generation never calibrates; without a stored calibration the guard uses its fallback).
2. Queries held-out captions with ReDi (`kb_tools.samplers.redi_chain.generate`, the ReDiSampler node: key step
   4, value step 10, H=3, lstsq, automatic guard) and samples the same noise with the plain
   sampler at full steps, with the plain sampler at ReDi's NFE, and with T-Stitch (small model
   for the first 40% of the steps, one sampler run), all through ComfyUI's sampling code.
   Two protocols:
   - "KB seed": query i starts from seed i mod S, a seed whose trajectories (for other,
     train captions) are in the knowledge base, as in the official ReDi setup;
   - "foreign seed": seeds the knowledge base never saw (expected: no usable neighbour, so the
     guard should send the items back to plain sampling).
3. Prints NFE, wall time, MSE to the full-step plain output from the same noise and the judge's
   source accuracy per method, and ReDi's summary line; writes OUTPUT/demo_results.json (with
   step 4's figures under "calibrated_sampler").
4. Calibrates a few-step sampler on the knowledge base (`kb_tools.calibrate_sampler`, the
   ReDiCalibrateSampler node: --teachers of its entries, a quarter held out; stored with the KB and
   reused by later runs), then samples the held-out captions from FRESH seeds (2000000 + i, never
   the KB's) at --calibrated-nfe model evaluations with what ReDiCalibratedSampler runs, with the
   calibration's held-out winner among the built-in sampler x schedule choices, and with
   euler/normal; prints their MSE to the converged solution (dpmpp_2m/karras, 100 steps, same noise)
   and the calibration's summary line ("best for this model at 8 steps: ...").
5. Writes OUTPUT/demo_grid.png: one row per held-out caption, columns = plain full steps | ReDi |
   plain at ReDi's NFE | T-Stitch | the H retrieved neighbours' final images (their source and
   blend weight in the corner), all from the row's KB seed; then, from the row's fresh seed,
   converged | calibrated | best built-in | euler at the same NFE (MSE to converged x 1e3 in the
   corner). A red frame marks a ReDi item the guard sent back.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from kb_tools.core.records import Recipe
from kb_tools.core.schedule import parse_steps, plan_redi

from . import judge
from .captions import parse_prompt, sample_captions
from .models import PACK_DIR, bf16_autocast, cpu_has_fast_bf16, load_models, setup_comfy
from .rendering import IMAGE_SIZE, to_pil

SAMPLER = "euler"
SCHEDULER = "normal"
FOREIGN_SEED_BASE = 1_000_000
#: Fresh seeds of the calibrated-sampler comparison: neither the KB's (0..S-1) nor the foreign protocol's.
FRESH_SEED_BASE = 2_000_000
#: The converged solution the calibrated comparison scores against: dpmpp_2m/karras at 100 steps moves by about 1e-6
#: (MSE) when doubled on this model at cfg 3 (benchmarks/results/converged_validity/validity.json).
CONVERGED = ("dpmpp_2m", "karras", 100)
CELL_SCALE = 4


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/demo.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=PACK_DIR / "output", help="folder for demo_kb/, demo_grid.png, demo_results.json")
    p.add_argument("--fresh", action="store_true", help="delete the knowledge base first")
    p.add_argument("--captions", type=int, default=400, help="train captions in the knowledge base")
    p.add_argument("--seeds", type=int, default=2, help="seeds per caption in the knowledge base (seeds 0..N-1)")
    p.add_argument("--queries", type=int, default=12, help="held-out captions queried (one batch)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--key", type=int, default=4, help="ReDi key step")
    p.add_argument("--value", type=int, default=10, help="ReDi value step")
    p.add_argument("--h", type=int, default=3, help="neighbours blended per query")
    p.add_argument("--store-steps", default="2-12", help="steps stored in the knowledge base, e.g. '2-12'")
    p.add_argument("--small-fraction", type=float, default=0.4, help="T-Stitch: share of the steps run by the small model")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16 runs both UNets under bfloat16 autocast: about 2x faster on CPUs with AMX / AVX512-BF16, "
                        "outputs within ~1e-5 MSE of fp32. auto: bf16 on such CPUs, else fp32")
    p.add_argument("--calibrated-nfe", type=int, default=8,
                   help="model evaluations at which the calibrated sampler, the best built-in choice and euler are compared")
    p.add_argument("--teachers", type=int, default=32, help="KB entries the sampler calibration learns from (a quarter held out)")
    p.add_argument("--teacher-steps", type=int, default=100,
                   help="fine dpmpp_2m/karras steps of each calibration teacher (its doubling check runs twice as many)")
    p.add_argument("--search-sweeps", type=int, default=0,
                   help="coordinate-descent sweeps of the calibration's schedule search (0: built-in and karras-rho schedules only)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) since `start`."""
    return time.perf_counter() - start[0], time.process_time() - start[1]


def _text_width(draw, text, font) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0]


def write_grid(path: Path, columns: list[tuple[str, list]], row_labels: list[str], *, corner: dict | None = None,
               frames: dict | None = None) -> None:
    """A PNG grid: a header row of column labels, then one row per item; cells are upscaled crops.

    columns: (label, [latent [3, 16, 16] per row]); corner: {(row, col): text} drawn in a cell's
    corner; frames: {(row, col): colour} drawn as a border.
    """
    font = ImageFont.load_default()
    cell = IMAGE_SIZE * CELL_SCALE
    gap, header, left = 4, 18, 72
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [max(cell, _text_width(probe, label, font) + 4) for label, _ in columns]
    width = left + sum(w + gap for w in widths)
    rows = len(row_labels)
    img = Image.new("RGB", (width, header + rows * (cell + gap)), (30, 30, 30))
    draw = ImageDraw.Draw(img)
    x = left
    xs = []
    for (label, _), w in zip(columns, widths):
        xs.append(x + (w - cell) // 2)
        draw.text((x + (w - _text_width(draw, label, font)) // 2, 3), label, fill=(230, 230, 230), font=font)
        x += w + gap
    for r, row_label in enumerate(row_labels):
        y = header + r * (cell + gap)
        draw.text((4, y + cell // 2 - 6), row_label, fill=(230, 230, 230), font=font)
        for c, (_, cells) in enumerate(columns):
            tile = to_pil(cells[r], scale=CELL_SCALE)[0].convert("RGB")
            img.paste(tile, (xs[c], y))
            if frames and (r, c) in frames:
                draw.rectangle([xs[c], y, xs[c] + cell - 1, y + cell - 1], outline=frames[(r, c)], width=2)
            if corner and (r, c) in corner:
                text = corner[(r, c)]
                draw.rectangle([xs[c], y, xs[c] + _text_width(draw, text, font) + 3, y + 11], fill=(0, 0, 0))
                draw.text((xs[c] + 2, y), text, fill=(255, 210, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def compare_calibrated(S, kb, model, queries, a) -> tuple[dict, list[tuple[str, torch.Tensor]]]:
    """The KB's calibrated sampler beside the best built-in choice and euler/normal at the same NFE, on fresh seeds.

    Calibrates on `a.teachers` KB entries (or reuses the calibration stored with the KB), then samples
    the held-out captions from seeds the KB never saw with what ReDiCalibratedSampler runs, with the
    calibration's held-out winner among the built-in sampler x schedule choices, and with euler/normal,
    each scored as per-item MSE to the converged solution (CONVERGED) from the same noise.
    Returns (the JSON block, [(grid column label, latents [n, 3, 16, 16])]).
    """
    from kb_tools import plain_sigmas, schedule_sigmas, steps_for_nfe

    from .rendering import LATENT_SHAPE

    n, nfe = len(queries), a.calibrated_nfe
    prompts, seeds = [c.prompt() for c in queries], [FRESH_SEED_BASE + i for i in range(n)]
    t = _clock()
    with tqdm(desc="sampler calibration", unit="step") as bar:
        def progress(done, todo):
            bar.total = todo
            bar.n = done
            bar.refresh()

        calibration, reused = S.calibrated_sampler(kb, model, nfe=nfe, cfg=a.cfg, teachers=a.teachers,
                                                   fine_steps=a.teacher_steps, search_sweeps=a.search_sweeps,
                                                   progress=progress)
    cal_seconds = _since(t)
    choice = calibration.choice(model, a.cfg, LATENT_SHAPE, nfe)
    held = choice.heldout
    best_sampler = held["best_builtin"].split("/")[0]
    truth, _ = S.sample_on(model, prompts, seeds, schedule_sigmas(model, *CONVERGED), a.cfg, CONVERGED[0])
    node = (f"calibrated ({choice.schedule})" if choice.kind == "calibrated"
            else f"calibrated node -> {choice.sampler_name}/{choice.schedule}")
    runs = [(node, "calibrated", choice.sigmas, choice),
            (f"best built-in {held['best_builtin']}", held["best_builtin"], held["best_builtin_sigmas"], best_sampler),
            ("euler/normal", "euler", plain_sigmas(model, "euler", "normal", steps_for_nfe("euler", nfe)), "euler")]
    methods, columns = {}, [("converged", truth)]
    for name, short, sigmas, sampler in runs:
        t = _clock()
        lat, evaluations = S.sample_on(model, prompts, seeds, sigmas, a.cfg, sampler)
        sec, cpu = _since(t)
        per_item = ((lat.float() - truth.float()) ** 2).flatten(1).mean(1).double().numpy()
        methods[name] = {"nfe": float(evaluations.mean()), "seconds": round(sec, 3), "cpu_seconds": round(cpu, 3),
                         "mse_to_converged": float(per_item.mean()),
                         "mse_se": float(per_item.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
                         "per_item": per_item.tolist(), "finite": bool(torch.isfinite(lat).all())}
        columns.append((f"{short} {nfe}", lat))
    info = {"nfe": nfe, "cfg": a.cfg, "seeds": seeds, "captions": "the held-out query captions",
            "reference": f"{CONVERGED[0]}/{CONVERGED[1]} {CONVERGED[2]} steps from the same noise",
            "choice": {"kind": choice.kind, "sampler": choice.sampler_name, "schedule": choice.schedule},
            "summary_line": choice.summary_line(),
            "calibration": {"reused": reused, "teachers": a.teachers, "teacher_steps": a.teacher_steps,
                            "search_sweeps": a.search_sweeps, "wall_seconds": round(cal_seconds[0], 1),
                            "cpu_seconds": round(cal_seconds[1], 1),
                            "heldout": {k: held.get(k) for k in ("n", "kind", "calibrated_mse", "best_builtin", "best_builtin_mse",
                                                                 "euler_normal_mse", "diff_se")}},
            "methods": methods}
    return info, columns


def main(argv: list[str] | None = None) -> dict:
    a = parser().parse_args(argv)
    if a.captions < 1 or a.seeds < 1 or a.queries < 1:
        raise SystemExit("--captions, --seeds and --queries must be at least 1")
    if a.captions < a.h + 1:
        raise SystemExit(f"the knowledge base would hold {a.captions} trajectories per seed; "
                         f"H={a.h} needs at least {a.h + 1}: raise --captions")
    t_start = time.perf_counter()
    setup_comfy(a.threads)
    from . import sampling as S  # imports ComfyUI, which setup_comfy has just configured

    recipe = Recipe(SAMPLER, SCHEDULER, a.steps, a.cfg)
    plan = plan_redi(a.steps, a.key, a.value)
    out_dir = Path(a.output)
    kb_path = out_dir / "demo_kb"
    if a.fresh and kb_path.exists():
        shutil.rmtree(kb_path)
    out_dir.mkdir(parents=True, exist_ok=True)

    large, small, _ = load_models()
    if a.precision == "auto":
        a.precision = "bf16" if cpu_has_fast_bf16() and not torch.cuda.is_available() else "fp32"
    if a.precision == "bf16":
        large, small = bf16_autocast(large), bf16_autocast(small)
    n_large = sum(p.numel() for p in large.model.diffusion_model.parameters())
    n_small = sum(p.numel() for p in small.model.diffusion_model.parameters())
    print(f"embedded crops models: large {n_large:,} / small {n_small:,} UNet parameters, {a.precision}, "
          f"{torch.get_num_threads()} threads", flush=True)

    # ------------------------------------------------------------------ 1. knowledge base
    kb_prompts = [c.prompt() for c in sample_captions(a.captions, "train")]
    queries = sample_captions(a.queries, "heldout")
    query_prompts = [c.prompt() for c in queries]
    store_steps = parse_steps(a.store_steps, a.steps)
    t0 = time.perf_counter()
    with tqdm(total=a.captions * a.seeds, desc="knowledge base", unit="traj") as bar:
        def progress(done, todo):  # trajectories sampled so far of those not yet in the KB
            bar.total = todo
            bar.n = done
            bar.refresh()

        report = S.build_kb(kb_path, large, kb_prompts, range(a.seeds), recipe, store_steps, batch_size=50,
                            commit_every=100, progress=progress)
    added = report.added
    kb = report.kb
    build_seconds = time.perf_counter() - t0
    print(f"ReDi KB {kb_path}: {len(kb)} trajectories ({added} added by this run) in {build_seconds:.1f} s", flush=True)
    stored = kb.calibration(a.key)
    if not stored or stored.get("h") != a.h or stored.get("kb_count") != len(kb):
        stored = S.calibrate_guard(kb, a.key, a.h)
        print(f"stored the guard calibration for key step {a.key}, H={a.h} (what `python -m kb_tools calibrate {kb_path} "
              f"--key-step {a.key} --neighbours {a.h}` does): 95% of stored keys rebuilt within centered residual "
              f"{stored['centered_p95']:.3f}", flush=True)

    # ------------------------------------------------------------------ 2. queries
    n = a.queries
    labels = np.array([c.source for c in queries])
    redi_nfe = plan.sampled_steps

    def plain(model, prompts, seeds, steps):
        t = _clock()
        out = S.plain(model, prompts, seeds, dataclasses.replace(recipe, steps=steps)).latents
        return out, _since(t)

    # warm-up (first calls load the models), so the timings below compare like with like
    for model in (large, small):
        plain(model, ["digit 0"], [0], 2)

    kb_seeds = [i % a.seeds for i in range(n)]
    protocols = [("KB seed", kb_seeds, []),
                 ("foreign seed", *S.foreign_seeds(kb, n, FOREIGN_SEED_BASE))]
    rows, results = [], {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                         "kb": {"path": str(kb_path), "entries": len(kb), "build_seconds": round(build_seconds, 1),
                                "added": added}, "protocols": {}}
    grid = None
    for name, seeds, warnings in tqdm(protocols, desc="queries", unit="protocol"):
        for w in warnings:
            print(f"[{name}] {w}", flush=True)
        ref, t_ref = plain(large, query_prompts, seeds, a.steps)

        t = _clock()
        rep = S.redi_sample(kb, large, query_prompts, seeds, key_step=a.key, value_step=a.value, h=a.h)
        t_redi = _since(t)
        nfe_redi = float(rep.evaluations.per_item().mean())

        eq, t_eq = plain(large, query_prompts, seeds, redi_nfe)

        t = _clock()
        ts_out, ts = S.tstitch(small, large, query_prompts, seeds, recipe, a.small_fraction)
        t_ts = _since(t)

        methods = [(f"plain {a.steps} steps", ref, t_ref, f"{a.steps}"),
                   (f"ReDi k{a.key} v{a.value} H{a.h}", rep.latent, t_redi, f"{nfe_redi:g}"),
                   (f"plain {redi_nfe} steps (=NFE)", eq, t_eq, f"{redi_nfe}"),
                   (f"T-Stitch {ts.small_steps}s+{ts.steps - ts.small_steps}L", ts_out, t_ts,
                    f"{ts.small_steps}s+{ts.steps - ts.small_steps}L")]
        info = {"seeds": [int(s) for s in seeds], "redi_summary": rep.summary(), "tstitch_summary": ts.summary,
                "accepted": rep.accepted.tolist(), "centered_residual": rep.centered_residual.tolist(),
                "guard": rep.guard.threshold, "guard_source": rep.guard.source,
                "neighbour_ids": rep.neighbour_ids.tolist(), "weight_mode": rep.weight_mode,
                "weights": rep.weights.tolist(), "methods": {}}
        for method, lat, (sec, cpu), nfe in methods:
            mse = float(((lat.float() - ref.float()) ** 2).mean())
            acc = float((judge.read(lat).source == labels).mean())
            rows.append((name, method, nfe, sec, cpu, 1000 * sec / n, mse, acc))
            info["methods"][method] = {"nfe": nfe, "seconds": round(sec, 3), "cpu_seconds": round(cpu, 3),
                                       "mse_to_full": mse, "accuracy": acc, "finite": bool(torch.isfinite(lat).all())}
        results["protocols"][name] = info
        if name == "KB seed":
            grid = (seeds, [m[1] for m in methods], [m[0] for m in methods], rep)

    print()
    print(f"{'protocol':<13} {'method':<24} {'NFE/img':>8} {'wall s':>7} {'CPU s':>7} {'ms/img':>7} {'MSE->full':>10} {'accuracy':>8}")
    for name, method, nfe, sec, cpu, ms, mse, acc in rows:
        print(f"{name:<13} {method:<24} {nfe:>8} {sec:>7.2f} {cpu:>7.2f} {ms:>7.0f} {mse:>10.5f} {acc:>8.2f}")
    print("(NFE = sampler steps on the large model per image, each one cond+uncond pass at cfg "
          f"{a.cfg:g}; T-Stitch: s = small-model steps, L = large-model steps. wall s / ms/img: wall time of the "
          "batch / per image; CPU s: this process's CPU time (steadier on a shared machine). MSE to the plain "
          f"{a.steps}-step "
          "output from the same noise; accuracy = the judge CNN names the caption's source picture.)")
    for name, info in results["protocols"].items():
        print(f"[{name}] {info['redi_summary']}")
    print(f"[T-Stitch] {results['protocols']['KB seed']['tstitch_summary']}")

    # ------------------------------------------------------------------ 4. calibrated sampler, fresh seeds
    calibrated, calibrated_columns = compare_calibrated(S, kb, large, queries, a)
    results["calibrated_sampler"] = calibrated
    cal = calibrated["calibration"]
    source = "stored with the KB, reused" if cal["reused"] else f"{cal['teachers']} teachers from the KB"
    print(f"\nsampler calibration ({source}: {cal['wall_seconds']:.0f} s wall, {cal['cpu_seconds']:.0f} s CPU); {n} held-out captions, fresh seeds "
          f"{FRESH_SEED_BASE}.., {calibrated['nfe']} NFE each, scored against {calibrated['reference']}:")
    print(f"{'method':<44} {'NFE/img':>8} {'wall s':>7} {'MSE->converged':>15} {'se':>9} {'x calibrated':>12}")
    first = next(iter(calibrated["methods"].values()))["mse_to_converged"]
    for method, m in calibrated["methods"].items():
        ratio = m["mse_to_converged"] / first if first > 0 else float("nan")
        print(f"{method:<44} {m['nfe']:>8g} {m['seconds']:>7.2f} {m['mse_to_converged']:>15.2e} {m['mse_se']:>9.1e} {ratio:>12.2f}")
    print(f"[calibrated] {calibrated['summary_line']}")

    # ------------------------------------------------------------------ 5. grid
    seeds, lats, names, rep = grid
    ids = rep.neighbour_ids
    entries = kb.entries
    nb_pairs = [entries[int(i)] for i in ids.reshape(-1)]
    nb_names = [parse_prompt(p).name.replace("digit ", "") for p, _ in nb_pairs]
    nb_final, _ = plain(large, [p for p, _ in nb_pairs], [s for _, s in nb_pairs], a.steps)
    nb_final = nb_final.reshape(n, a.h, *nb_final.shape[1:])
    short = [f"plain {a.steps}", "ReDi", f"plain {redi_nfe}", "T-Stitch"]
    columns = [(label, [lat[r] for r in range(n)]) for label, lat in zip(short, lats)]
    columns += [(f"nb {j + 1}", [nb_final[r, j] for r in range(n)]) for j in range(a.h)]
    corner = {(r, 4 + j): f"{nb_names[r * a.h + j][:5]} {rep.weights[r, j]:+.1f}"
              for r in range(n) for j in range(a.h)}
    base = len(columns)
    columns += [(label, [lat[r] for r in range(n)]) for label, lat in calibrated_columns]
    per_item = [m["per_item"] for m in calibrated["methods"].values()]
    corner.update({(r, base + 1 + j): f"{1e3 * v[r]:.1f}" for j, v in enumerate(per_item) for r in range(n)})
    frames = {(r, 1): (220, 40, 40) for r in range(n) if not rep.accepted[r]}
    grid_path = out_dir / "demo_grid.png"
    row_labels = [f"{c.name.replace('digit ', 'digit')[:8]} s{s}" for c, s in zip(queries, seeds)]
    write_grid(grid_path, columns, row_labels, corner=corner, frames=frames)
    results["grid"] = str(grid_path)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    (out_dir / "demo_results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {grid_path} and {out_dir / 'demo_results.json'}; demo took {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
