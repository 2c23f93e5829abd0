"""ReDi and T-Stitch on the embedded digits models: build a knowledge base, query it, compare.

    bash scripts/demo.sh                 # full demo (a few minutes on 2 CPU cores)
    bash scripts/demo.sh --fresh         # rebuild the knowledge base from scratch
    bash scripts/demo.sh --prompts 3 --seeds 4 --queries 2 --output /tmp/x   # tiny run

1. Builds (or resumes) a knowledge base in OUTPUT/demo_kb with the shipped large model through
   `kb_tools.redi.build_knowledge_base`, the code path of the BuildKnowledgeBase node: prompts
   "digit 0".."digit P-1" x seeds 0..S-1, euler, normal schedule, 20 steps, cfg 2.5.
2. Queries a batch with ReDi (partial_sample -> retrieve_neighbours -> blend_value -> resume_sample:
   key step 5, value step 10, H=3, lstsq, automatic guard) and samples the same noise with the
   plain sampler at full steps, with the plain sampler at ReDi's NFE, and with T-Stitch (small
   model for the first 40% of the steps), all through ComfyUI's sampling code. Two protocols:
   - "KB seed": item i is "digit (i mod P)" with seed i. The seed IS in the knowledge base (its
     trajectories for the other digits are stored) but the pair itself is held out of the build,
     so no query finds its own trajectory;
   - "foreign seed": seeds the knowledge base never saw (expected: no usable neighbour, so the
     guard should send the items back to plain sampling).
3. Prints NFE, wall time, MSE to the full-step plain output from the same noise and the judge
   classifier's accuracy per method, and ReDi's summary line; writes OUTPUT/demo_results.json.
4. Writes OUTPUT/demo_grid.png: one row per KB-seed query, columns = plain full steps | ReDi |
   plain at ReDi's NFE | T-Stitch | the H retrieved neighbours' final images (their digit and
   blend weight in the corner). A red frame marks a ReDi item the guard sent back.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from . import digits as D

SAMPLER = "euler"
SCHEDULER = "normal"
FOREIGN_SEED_BASE = 1_000_000
CELL_SCALE = 4


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/demo.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=D.PACK_DIR / "output", help="folder for demo_kb/, demo_grid.png, demo_results.json")
    p.add_argument("--fresh", action="store_true", help="delete the knowledge base first")
    p.add_argument("--prompts", type=int, default=10, help="digits 0..N-1 in the knowledge base (1..10)")
    p.add_argument("--seeds", type=int, default=24, help="seeds per digit in the knowledge base (seeds 0..N-1)")
    p.add_argument("--queries", type=int, default=16, help="query batch size (1..--seeds)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=2.5)
    p.add_argument("--key", type=int, default=5, help="ReDi key step")
    p.add_argument("--value", type=int, default=10, help="ReDi value step")
    p.add_argument("--h", type=int, default=3, help="neighbours blended per query")
    p.add_argument("--store-steps", default="3-14", help="steps stored in the knowledge base, e.g. '3-14'")
    p.add_argument("--small-fraction", type=float, default=0.4, help="T-Stitch: share of the steps run by the small model")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16 runs both UNets under bfloat16 autocast: about 2x faster on CPUs with AMX / AVX512-BF16, "
                        "outputs within ~1e-5 MSE of fp32. auto: bf16 on such CPUs, else fp32")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) since `start`."""
    return time.perf_counter() - start[0], time.process_time() - start[1]


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16 (Linux /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _bf16_wrapper(apply_model, args):
    """ComfyUI unet function wrapper: evaluate the UNet under bfloat16 autocast."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16):
        return apply_model(args["input"], args["timestep"], **args["c"]).float()


def _text_width(draw, text, font) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0]


def write_grid(path: Path, columns: list[tuple[str, list]], row_labels: list[str], *, corner: dict | None = None,
               frames: dict | None = None) -> None:
    """A PNG grid: a header row of column labels, then one row per item; cells are upscaled digits.

    columns: (label, [latent [1, 16, 16] per row]); corner: {(row, col): text} drawn in a cell's
    corner; frames: {(row, col): colour} drawn as a border.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    cell = D.IMAGE_SIZE * CELL_SCALE
    gap, header, left = 4, 18, 60
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
            tile = D.to_pil(cells[r], scale=CELL_SCALE)[0].convert("RGB")
            img.paste(tile, (xs[c], y))
            if frames and (r, c) in frames:
                draw.rectangle([xs[c], y, xs[c] + cell - 1, y + cell - 1], outline=frames[(r, c)], width=2)
            if corner and (r, c) in corner:
                text = corner[(r, c)]
                draw.rectangle([xs[c], y, xs[c] + _text_width(draw, text, font) + 3, y + 11], fill=(0, 0, 0))
                draw.text((xs[c] + 2, y), text, fill=(255, 210, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main(argv: list[str] | None = None) -> dict:
    a = parser().parse_args(argv)
    if not 1 <= a.prompts <= 10:
        raise SystemExit("--prompts must be 1..10 (the models know digits 0..9)")
    if not 1 <= a.queries <= a.seeds:
        raise SystemExit("--queries must be 1..--seeds: query i uses KB seed i, with its own (digit, seed) pair held out")
    if a.prompts * a.seeds - a.queries < a.h + 1:
        raise SystemExit(f"the knowledge base would hold {a.prompts * a.seeds - a.queries} trajectories; "
                         f"H={a.h} needs at least {a.h + 1}: raise --seeds or --prompts")
    t_start = time.perf_counter()
    D.setup_comfy(a.threads)
    import numpy as np
    import torch
    from tqdm import tqdm

    from kb_tools import comfy_sampling as cs
    from kb_tools import redi
    from kb_tools.schedule import parse_steps, plan_redi
    from kb_tools.tstitch import tstitch_sample

    plan = plan_redi(a.steps, a.key, a.value)
    out_dir = Path(a.output)
    kb_path = out_dir / "demo_kb"
    if a.fresh and kb_path.exists():
        shutil.rmtree(kb_path)
    out_dir.mkdir(parents=True, exist_ok=True)

    large, small, encode = D.load_models()
    if a.precision == "auto":
        a.precision = "bf16" if cpu_has_fast_bf16() and not torch.cuda.is_available() else "fp32"
    if a.precision == "bf16":
        large, small = large.clone(), small.clone()
        large.set_model_unet_function_wrapper(_bf16_wrapper)
        small.set_model_unet_function_wrapper(_bf16_wrapper)
    n_large = sum(p.numel() for p in large.model.diffusion_model.parameters())
    n_small = sum(p.numel() for p in small.model.diffusion_model.parameters())
    print(f"embedded digits models: large {n_large:,} / small {n_small:,} UNet parameters, {a.precision}, "
          f"{torch.get_num_threads()} threads", flush=True)

    # ------------------------------------------------------------------ 1. knowledge base
    query_digits = [i % a.prompts for i in range(a.queries)]
    held_out = {(f"digit {d}", i) for i, d in enumerate(query_digits)}
    store_steps = parse_steps(a.store_steps, a.steps)
    t0 = time.perf_counter()
    added = 0
    report = None
    with tqdm(total=a.prompts * a.seeds - len(held_out), desc="knowledge base", unit="traj") as bar:
        for d in range(a.prompts):
            prompt = f"digit {d}"
            seeds = [s for s in range(a.seeds) if (prompt, s) not in held_out]
            if not seeds:
                continue
            spec = redi.BuildSpec(prompts=[prompt], seeds=seeds, sampler=SAMPLER, scheduler=SCHEDULER, steps=a.steps,
                                  cfg=a.cfg, store_steps=store_steps, latent_shape=D.LATENT_SHAPE, batch_size=40,
                                  dtype="float32", commit_every=40)
            base = bar.n

            def progress(done, _total, base=base):
                bar.n = base + done
                bar.refresh()

            report = redi.build_knowledge_base(str(kb_path), large, encode, spec, progress=progress)
            added += report.added
            bar.n = base + len(seeds)
            bar.refresh()
    kb = report.kb
    build_seconds = time.perf_counter() - t0
    leaked = sorted(p for p in held_out if kb.has_entry(*p))
    if leaked:
        raise SystemExit(f"the knowledge base at {kb_path} holds query pairs {leaked[:3]} (it was built with other "
                         "--queries); rerun with --fresh so that no query can find its own trajectory.")
    print(f"ReDi KB {kb_path}: {len(kb)} trajectories ({added} added by this run) in {build_seconds:.1f} s", flush=True)

    # ------------------------------------------------------------------ 2. queries
    n = a.queries
    labels = np.array(query_digits)
    positive = redi.batch_conditioning([encode(f"digit {d}") for d in query_digits])
    negative = redi.batch_conditioning([encode("")] * n)
    zeros = torch.zeros((n, *D.LATENT_SHAPE))
    full_sigmas = cs.schedule_sigmas(large, SAMPLER, SCHEDULER, a.steps)
    redi_nfe = plan.sampled_steps

    def plain(model, seeds, steps, pos=positive, neg=negative):
        latent = torch.zeros((len(seeds), *D.LATENT_SHAPE))
        sigmas = full_sigmas if steps == a.steps else cs.schedule_sigmas(model, SAMPLER, SCHEDULER, steps)
        t = _clock()
        out = cs.sample_sigmas(model, latent=latent, noise=cs.seeded_noise(latent, seeds), positive=pos,
                               negative=neg, cfg=a.cfg, sampler_name=SAMPLER, sigmas=sigmas, seed=int(seeds[0]))
        return out, _since(t)

    # warm-up (first calls load the models), so the timings below compare like with like
    for model in (large, small):
        plain(model, [0], 2, encode("digit 0"), encode(""))

    protocols = [("KB seed", *redi.query_seeds(kb, n, "custom", 0)),
                 ("foreign seed", *redi.query_seeds(kb, n, "custom", FOREIGN_SEED_BASE))]
    rows, results = [], {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                         "kb": {"path": str(kb_path), "entries": len(kb), "build_seconds": round(build_seconds, 1),
                                "added": added}, "protocols": {}}
    grid = None
    for name, seeds, warnings in tqdm(protocols, desc="queries", unit="protocol"):
        for w in warnings:
            print(f"[{name}] {w}", flush=True)
        ref, t_ref = plain(large, seeds, a.steps)

        t = _clock()
        state = redi.partial_sample(kb, large, positive, negative, zeros, list(seeds), a.key)
        state = redi.retrieve_neighbours(state, a.h)
        blended, state = redi.blend_value(state, a.value, "lstsq")
        rep = redi.resume_sample(state, blended, large, positive, negative, h=a.h)
        t_redi = _since(t)
        used = sum(rep.accepted)
        nfe_redi = a.key + (used * (a.steps - a.value) + (n - used) * (a.steps - a.key)) / n

        eq, t_eq = plain(large, seeds, redi_nfe)

        t = _clock()
        ts_out, ts = tstitch_sample(small, large, small_positive=positive, small_negative=negative,
                                    large_positive=positive, large_negative=negative, latent={"samples": zeros.clone()},
                                    seed=int(seeds[0]), sampler_name=SAMPLER, scheduler=SCHEDULER, steps=a.steps,
                                    cfg=a.cfg, small_fraction=a.small_fraction)
        t_ts = _since(t)

        methods = [(f"plain {a.steps} steps", ref, t_ref, f"{a.steps}"),
                   (f"ReDi k{a.key} v{a.value} H{a.h}", rep.latent, t_redi, f"{nfe_redi:g}"),
                   (f"plain {redi_nfe} steps (=NFE)", eq, t_eq, f"{redi_nfe}"),
                   (f"T-Stitch {ts.small_steps}s+{ts.steps - ts.small_steps}L", ts_out["samples"], t_ts,
                    f"{ts.small_steps}s+{ts.steps - ts.small_steps}L")]
        info = {"seeds": [int(s) for s in seeds], "redi_summary": rep.summary(), "tstitch_summary": ts.summary,
                "accepted": rep.accepted, "centered_residual": rep.centered_residual, "guard": rep.threshold,
                "neighbour_ids": state.neighbours.ids.tolist(), "weights": state.neighbours.weights.tolist(),
                "methods": {}}
        for method, lat, (sec, cpu), nfe in methods:
            mse = float(((lat.float() - ref.float()) ** 2).mean())
            acc = float((D.classify(lat) == labels).mean())
            rows.append((name, method, nfe, sec, cpu, 1000 * sec / n, mse, acc))
            info["methods"][method] = {"nfe": nfe, "seconds": round(sec, 3), "cpu_seconds": round(cpu, 3),
                                       "mse_to_full": mse, "accuracy": acc, "finite": bool(torch.isfinite(lat).all())}
        results["protocols"][name] = info
        if name == "KB seed":
            grid = (seeds, [m[1] for m in methods], [m[0] for m in methods], state, rep)

    print()
    print(f"{'protocol':<13} {'method':<24} {'NFE/img':>8} {'wall s':>7} {'CPU s':>7} {'ms/img':>7} {'MSE->full':>10} {'accuracy':>8}")
    for name, method, nfe, sec, cpu, ms, mse, acc in rows:
        print(f"{name:<13} {method:<24} {nfe:>8} {sec:>7.2f} {cpu:>7.2f} {ms:>7.0f} {mse:>10.5f} {acc:>8.2f}")
    print("(NFE = sampler steps on the large model per image, each one cond+uncond pass at cfg "
          f"{a.cfg:g}; T-Stitch: s = small-model steps, L = large-model steps. wall s / ms/img: wall time of the "
          "batch / per image; CPU s: this process's CPU time (steadier on a shared machine). MSE to the plain "
          f"{a.steps}-step "
          "output from the same noise; accuracy = judge classifier says the prompted digit.)")
    for name, info in results["protocols"].items():
        print(f"[{name}] {info['redi_summary']}")
    print(f"[T-Stitch] {results['protocols']['KB seed']['tstitch_summary']}")

    # ------------------------------------------------------------------ 4. grid
    seeds, lats, names, state, rep = grid
    ids = state.neighbours.ids
    entries = kb.entries
    nb_pairs = [entries[int(i)] for i in ids.reshape(-1)]
    nb_digits = [D.parse_prompt(p) for p, _ in nb_pairs]
    nb_final, _ = plain(large, [s for _, s in nb_pairs], a.steps,
                        redi.batch_conditioning([encode(p) for p, _ in nb_pairs]),
                        redi.batch_conditioning([encode("")] * len(nb_pairs)))
    nb_final = nb_final.reshape(n, a.h, *D.LATENT_SHAPE)
    short = [f"plain {a.steps}", "ReDi", f"plain {redi_nfe}", "T-Stitch"]
    columns = [(label, [lat[r] for r in range(n)]) for label, lat in zip(short, lats)]
    columns += [(f"nb {j + 1}", [nb_final[r, j] for r in range(n)]) for j in range(a.h)]
    corner = {(r, 4 + j): f"{nb_digits[r * a.h + j]} w{state.neighbours.weights[r, j]:+.2f}"
              for r in range(n) for j in range(a.h)}
    frames = {(r, 1): (220, 40, 40) for r in range(n) if not rep.accepted[r]}
    grid_path = out_dir / "demo_grid.png"
    write_grid(grid_path, columns, [f"{d} s{s}" for d, s in zip(query_digits, seeds)], corner=corner, frames=frames)
    results["grid"] = str(grid_path)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    (out_dir / "demo_results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {grid_path} and {out_dir / 'demo_results.json'}; demo took {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
