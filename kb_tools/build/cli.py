"""`python -m kb_tools`: build, merge, inspect and verify ReDi knowledge bases offline.

`build` loads ComfyUI in-process (COMFYUI_PATH, or the ComfyUI above this pack) and runs the
same code as the BuildKnowledgeBase node (kb_tools.build.build_knowledge_base, which samples
through the one plain-sampler helper, kb_tools.plain.sample_prompts).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from ..core.errors import KBError


def _build(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .job import BuildJob
    from .prompts import read_prompts, shard_of

    prompts = shard_of(read_prompts(args.prompts), args.shard)
    if args.limit:
        prompts = prompts[: args.limit]
    if not prompts:
        raise KBError(f"{args.prompts} holds no prompts for this shard; check the file and --shard.")
    job = BuildJob(ckpt=args.ckpt, seeds=tuple(args.seed + i for i in range(args.seeds_per_prompt)), sampler=args.sampler,
                   scheduler=args.scheduler, steps=args.steps, cfg=args.cfg, store_steps=args.store_steps, width=args.width,
                   height=args.height, negative=args.negative, batch_size=args.batch_size, dtype=args.dtype,
                   index=args.index, cpu=args.cpu)
    with tqdm(total=len(prompts) * len(job.seeds), desc="trajectories", unit="traj") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()
        if args.ray:
            from .distributed import build_on_ray

            report = build_on_ray(args.out, job, prompts, address=args.ray, workers=args.workers,
                                  gpus_per_worker=args.gpus_per_worker, progress=progress)
        else:
            report = _build_here(args.out, job, prompts, progress)
    print(report.summary())
    return 0


def _build_here(out: str, job, prompts: list[str], progress):
    from ..comfy.env import choose_device, ensure_comfyui

    ensure_comfyui()
    choose_device(force_cpu=job.cpu)
    from .builder import build_knowledge_base
    from .job import load_checkpoint

    model, encode, channels = load_checkpoint(job.ckpt)
    return build_knowledge_base(out, model, encode, job.spec(channels, prompts), progress=progress)


def _merge(args: argparse.Namespace) -> int:
    from ..store import merge

    kb = merge(args.out, args.sources, exist_ok=args.exist_ok)
    print(f"merged {len(args.sources)} knowledge bases into {args.out}: {len(kb)} trajectories")
    return 0


def _info(args: argparse.Namespace) -> int:
    from ..store import KnowledgeBase

    kb = KnowledgeBase.open(args.kb, verify="size")
    print(json.dumps(kb.info(), indent=2, default=str))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from ..store import KnowledgeBase

    kb = KnowledgeBase.open(args.kb, verify="size")
    problems = kb.verify(full=not args.sample)
    if problems:
        for p in problems:
            print(f"PROBLEM: {p}")
        print(f"{args.kb}: {len(problems)} problem(s). Damaged indexes or stats: python -m kb_tools repair {args.kb}; "
              "damaged shards: restore them, or rebuild (build re-adds missing entries).")
        return 1
    what = "a sample of entries found by each index" if args.sample else "every entry found by each index as itself"
    print(f"{args.kb}: OK ({len(kb)} trajectories, every checksum matches, {what})")
    return 0


def _repair(args: argparse.Namespace) -> int:
    from ..store import repair

    kb = repair(args.kb)
    print(f"{args.kb}: repaired: indexes and stats rebuilt from the shards ({len(kb)} trajectories)")
    return 0


def _upgrade(args: argparse.Namespace) -> int:
    from ..store import FORMAT_VERSION, KnowledgeBase

    kb = KnowledgeBase.open(args.kb, verify="size")
    before = kb.info()["format_version"]
    if before == FORMAT_VERSION:
        print(f"{args.kb}: already format version {FORMAT_VERSION}")
        return 0
    kb.rebuild_indexes()  # rewrites indexes and stats from the stored latents, in this version's format
    print(f"{args.kb}: upgraded from format version {before} to {FORMAT_VERSION} ({len(kb)} trajectories)")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from ..calibration.blend_error import describe_error_model, fit_error_model, measure_blend_errors, store_error_model
    from ..calibration.residuals import calibrate
    from ..store import KnowledgeBase

    if args.ckpt and args.skip_blend_error:
        raise KBError("--ckpt measures the plain reference on top of the blend-error model; drop --skip-blend-error.")
    kb = KnowledgeBase.open(args.kb)
    result = calibrate(kb, args.key_step, args.neighbours, sample=args.sample)
    model = reference = None  # measured before anything is stored: a refusal stores nothing
    if not args.skip_blend_error:
        measured = measure_blend_errors(kb, args.key_step, args.neighbours, sample=args.sample)
        model = fit_error_model(measured)
        if args.ckpt:
            reference = _plain_reference(kb, measured, args)
    kb.set_calibration(args.key_step, result)
    print(json.dumps(result, indent=2))
    if model is not None:
        store_error_model(kb, args.key_step, model)
        print(describe_error_model(model))
    if reference is not None:
        from ..calibration.plain_reference import describe_plain_reference, store_plain_reference

        store_plain_reference(kb, args.key_step, reference)
        print(describe_plain_reference(reference))
    return 0


def _plain_reference(kb, measured, args: argparse.Namespace) -> dict:
    """Sample the plain reference with the KB's own checkpoint (ComfyUI in-process, as `build` does)."""
    from ..comfy.env import choose_device, ensure_comfyui

    ensure_comfyui()
    choose_device(force_cpu=args.cpu)
    from ..calibration.plain_reference import fit_plain_reference
    from ..calibration.reference_runs import measure_reference
    from .job import load_checkpoint

    model, encode, _ = load_checkpoint(args.ckpt)
    return fit_plain_reference(measure_reference(kb, model, encode, measured, items=args.reference_items,
                                                 progress=logging.getLogger("kb_tools").info))


def _calibrate_sampler(args: argparse.Namespace) -> int:
    """Calibrate the few-step sampler on a KB's teachers (or a prompt list) with the checkpoint, as the node does."""
    from tqdm import tqdm

    from ..comfy.env import choose_device, ensure_comfyui

    nfe = _numbers(args.nfe, int, "--nfe", "4,5,6,8,10")
    cfgs = _numbers(args.cfg, float, "--cfg", "3,7.5")
    if (args.width is None) != (args.height is None):
        raise KBError("give both --width and --height (the image size you sample at), or neither (the KB's size).")
    prompts = None
    if args.prompts:
        from .prompts import read_prompts

        prompts = read_prompts(args.prompts)
    ensure_comfyui()
    choose_device(force_cpu=args.cpu)
    from .job import load_checkpoint
    from .sampler_calibration import calibrate_sampler

    model, encode, channels = load_checkpoint(args.ckpt)
    shape = None if args.width is None else (channels, args.height // 8, args.width // 8)
    seeds = None if prompts is None else [args.seed + i for i in range(len(prompts))]
    extra = {}
    if args.samplers:
        extra["samplers"] = tuple(p.strip() for p in args.samplers.split(",") if p.strip())
    if args.schedules:
        extra["schedules"] = tuple(p.strip() for p in args.schedules.split(",") if p.strip())
    with tqdm(total=1, desc="calibration", unit="unit") as bar:
        def progress(done: int, total: int) -> None:
            bar.total, bar.n = total, done
            bar.refresh()
        calibration = calibrate_sampler(args.kb, model, encode, nfe=nfe, cfgs=cfgs, teachers=args.teachers,
                                        negative_prompt=args.negative, latent_shape=shape, prompts=prompts, seeds=seeds,
                                        progress=progress, log=logging.getLogger("kb_tools").info,
                                        fine_steps=args.fine_steps, search_sweeps=args.search_sweeps,
                                        refine_iterations=args.refine_iterations,
                                        chunk=args.batch_size, **extra)
    print(calibration.summary())
    return 0


def _numbers(text: str, kind, flag: str, example: str) -> tuple:
    try:
        values = tuple(kind(p) for p in text.replace(" ", "").split(",") if p)
    except ValueError:
        values = ()
    if not values:
        raise KBError(f"{flag} {text!r} is not a comma-separated list of numbers; write e.g. {flag} {example}.")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kb_tools", description="Build and manage ReDi knowledge bases.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="sample trajectories for a prompt list and store them (resumable)")
    b.add_argument("--ckpt", required=True, help="checkpoint file (model + CLIP) ComfyUI can load")
    b.add_argument("--prompts", required=True, help=".txt (one per line), .jsonl, or COCO captions .json")
    b.add_argument("--out", required=True, help="knowledge-base folder (created, or extended when it exists: entries already there are skipped, so rerunning resumes)")
    b.add_argument("--negative", default="", help="negative prompt for every trajectory")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--seeds-per-prompt", type=int, default=1)
    b.add_argument("--sampler", default="euler")
    b.add_argument("--scheduler", default="normal")
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--cfg", type=float, default=7.0)
    b.add_argument("--store-steps", default="auto", help="e.g. '4,8-12' or 'auto'")
    b.add_argument("--width", type=int, default=512)
    b.add_argument("--height", type=int, default=512)
    b.add_argument("--batch-size", type=int, default=4)
    b.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    b.add_argument("--index", choices=["auto", "flat", "ivf", "hnsw"], default="auto",
                   help="auto: flat (exact) for small KBs, HNSW above kb_tools.store.AUTO_FLAT_MAX_ENTRIES entries")
    b.add_argument("--shard", default=None, help="'i/N': build only every N-th prompt starting at the i-th (merge the parts later)")
    b.add_argument("--limit", type=int, default=0, help="only the first N prompts (0 = all)")
    b.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is available (default: the GPU torch sees, else the CPU)")
    b.add_argument("--ray", default=None, metavar="auto|ADDRESS|local",
                   help="build on a Ray cluster (needs Ray: the optional extra redi-sampling[ray]): 'auto' = the cluster started on this "
                        "machine with `ray start --head`, HOST:PORT = that cluster's head, 'local' = a private one here. "
                        "The checkpoint, --out and the pack must be at the same paths on every node.")
    b.add_argument("--workers", type=int, default=0, help="with --ray: workers (each loads the checkpoint once); 0 = one per CPU, or per --gpus-per-worker GPUs")
    b.add_argument("--gpus-per-worker", type=float, default=0.0, help="with --ray: GPUs each worker reserves (0 = CPU workers)")
    b.set_defaults(func=_build)

    m = sub.add_parser("merge", help="merge knowledge bases built with the same settings (e.g. --shard parts)")
    m.add_argument("--out", required=True)
    m.add_argument("--exist-ok", action="store_true")
    m.add_argument("sources", nargs="+")
    m.set_defaults(func=_merge)

    i = sub.add_parser("info", help="print a knowledge base's settings and size")
    i.add_argument("kb")
    i.set_defaults(func=_info)

    v = sub.add_parser("verify", help="check every file and checksum, scan latents for NaN/Inf and check that each "
                                      "index finds every entry as itself")
    v.add_argument("kb")
    v.add_argument("--sample", action="store_true",
                   help="fast: check the indexes on a sample of 16 entries per step (what opening a KB does)")
    v.set_defaults(func=_verify)

    r = sub.add_parser("repair", help="rebuild every index and the stats file from the shards (a truncated or corrupt "
                                      "index or stats file); refuses NaN/Inf latents, naming their entries")
    r.add_argument("kb")
    r.set_defaults(func=_repair)

    u = sub.add_parser("upgrade", help="rewrite an older knowledge base's indexes and manifest in this version's format")
    u.add_argument("kb")
    u.set_defaults(func=_upgrade)

    c = sub.add_parser("calibrate", help="store the leave-one-out residual percentiles the auto guard uses, and the "
                                         "blend-error model the error guard and the adaptive skip use")
    c.add_argument("kb")
    c.add_argument("--key-step", type=int, required=True)
    c.add_argument("--neighbours", type=int, default=3)
    c.add_argument("--sample", type=int, default=256, help="entries left out, one at a time")
    c.add_argument("--skip-blend-error", action="store_true",
                   help="store only the residual percentiles: skip measuring the blend error (one blend of H stored "
                        "latents per sampled entry and stored step after the key step)")
    c.add_argument("--ckpt", default=None,
                   help="the KB's checkpoint: also measure the plain reference (a few KB prompts sampled in full, with the "
                        "plain sampler at fewer steps and resumed from their blends) that makes the error guard's default "
                        "tolerance 'no worse than plain at equal NFE'")
    c.add_argument("--reference-items", type=int, default=8,
                   help="with --ckpt: KB entries sampled for the plain reference (each costs about T * (1 + stored steps "
                        "after the key step) model evaluations)")
    c.add_argument("--cpu", action="store_true", help="with --ckpt: run on the CPU even when a GPU is available")
    c.set_defaults(func=_calibrate)

    s = sub.add_parser("calibrate-sampler", help="fit a few-step sampler for the checkpoint on teacher trajectories of the "
                                                 "KB's prompts and seeds, check it on held-out teachers against every "
                                                 "built-in sampler x scheduler, and store the winner per step count")
    s.add_argument("kb", help="knowledge-base folder (created from --prompts when it holds no KB)")
    s.add_argument("--ckpt", required=True, help="checkpoint file (model + CLIP) ComfyUI can load")
    s.add_argument("--nfe", default="4,5,6,8,10", help="step counts (model evaluations) to calibrate, e.g. 4,5,6,8,10")
    s.add_argument("--cfg", default="3", help="guidance scales to calibrate, e.g. 3,7.5")
    s.add_argument("--teachers", type=int, default=128, help="(prompt, seed) items run as teachers; a quarter are held out")
    s.add_argument("--prompts", default=None, help="prompt file (.txt, .jsonl, COCO .json): teachers from these prompts "
                                                   "instead of the KB's entries; builds a KB when the folder has none")
    s.add_argument("--seed", type=int, default=0, help="with --prompts: prompt i gets seed SEED + i")
    s.add_argument("--negative", default="", help="negative prompt of every teacher")
    s.add_argument("--width", type=int, default=None, help="image width to calibrate for (default: the KB's)")
    s.add_argument("--height", type=int, default=None, help="image height to calibrate for (default: the KB's)")
    s.add_argument("--fine-steps", type=int, default=100, help="the teachers' dpmpp_2m/karras steps")
    s.add_argument("--samplers", default=None, help="built-in samplers to compare with (default: all of comfy's plain list)")
    s.add_argument("--schedules", default=None, help="built-in schedules to compare with and start from (default: all)")
    s.add_argument("--search-sweeps", type=int, default=2, help="sweeps of the schedule search (0: built-in and karras only)")
    s.add_argument("--refine-iterations", type=int, default=2,
                   help="refinement of each table for the final state alone (0: the stepwise rollout fit only)")
    s.add_argument("--batch-size", type=int, default=16, help="items per model call")
    s.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is available")
    s.set_defaults(func=_calibrate_sampler)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except KBError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
