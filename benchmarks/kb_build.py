"""KB build throughput against plain sampling of the same prompts, sampler and batch size.

    python benchmarks/kb_build.py                 # tiny SD1.5-format checkpoint, 128x128, 6 steps
    python benchmarks/kb_build.py --quick         # smoke run

Model: the tiny SD1.5-format test checkpoint (tests/make_checkpoint.py: SD1.5's layout and widths,
one UNet level, random weights) on the CPU, loaded through ComfyUI's checkpoint loader. Its model
step is far cheaper than a real SD1.5 step, so the share of time the build spends outside the
model (recording, conversion to the stored space, commits) is an upper bound of what a real
model sees.

Rows, measured alternately in one process (repeats interleaved so machine load hits all alike):
  plain_full        plain.sample_prompts over the whole schedule (what a user's generation runs)
  plain_same_steps  plain.sample_prompts stopped where the build stops (the build samples only up
                    to its last stored step): the like-for-like reference of the 95% goal
  plain_recording   the same, also keeping the latents of the stored steps (the build's sampling call)
  build             build.build_knowledge_base into a new KB (the node's and the CLI's function)
  commit_only       the store's share: appending the same entries to a new KB in the build's commits
Then the distributed build (distributed.build_on_ray) on a private local Ray cluster with 1 and 2
CPU workers (one thread each): wall time including cluster start and each worker's checkpoint
load, and the steady rate from the first to the last trajectory. Torch runs on one thread in
every row. CPU seconds are recorded beside wall seconds (this machine is shared; for Ray rows the
workers' CPU is sampled from the process tree while they run). Results:
benchmarks/results/kb_build.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
# A private token for the benchmark's own Ray cluster: nothing read from or written to ~/.ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PROMPTS = ["a cat on a sofa", "a dog in the snow", "a red car on a street", "a lighthouse at dusk", "a bowl of fruit",
           "a mountain lake at dawn", "a city skyline at night", "a bicycle against a wall", "a plate of pasta",
           "a sailing boat on the sea", "a forest path in autumn", "a cup of coffee on a table"]


def tree_cpu_s() -> float:
    """User + system CPU seconds of this process's descendants alive now (Ray's workers)."""
    import psutil

    total = 0.0
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def timed(fn) -> tuple[object, float, float]:
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--size", type=int, default=128, help="image width = height (latent = size / 8)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ray-workers", default="1,2", help="Ray rows ('' to skip)")
    p.add_argument("--out", default=str(HERE / "benchmarks" / "results" / "kb_build.json"))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.prompts, args.seeds, args.steps, args.size, args.repeats = 4, 1, 4, 64, 1

    from kb_tools.comfy.env import choose_device, ensure_comfyui

    ensure_comfyui()
    choose_device(force_cpu=True)
    import torch
    from make_checkpoint import make_sd15_checkpoint

    from kb_tools.build.builder import build_knowledge_base
    from kb_tools.build.job import BuildJob, load_checkpoint
    from kb_tools.store import KnowledgeBase
    from kb_tools.comfy.plain import sample_prompts

    torch.set_num_threads(1)
    ckpt = str(make_sd15_checkpoint())
    prompts = PROMPTS[: args.prompts]
    job = BuildJob(ckpt=ckpt, seeds=tuple(range(args.seeds)), steps=args.steps, cfg=7.0, width=args.size, height=args.size,
                   batch_size=args.batch_size, cpu=True)
    (model, encode, channels), load_s, _ = timed(lambda: load_checkpoint(ckpt))
    spec = job.spec(channels, prompts)
    pairs = [(pr, s) for pr in prompts for s in job.seeds]
    n = len(pairs)
    stop = max(spec.store_steps) + 1
    plain = dict(model=model, encode=encode, prompts=[pr for pr, _ in pairs], seeds=[s for _, s in pairs], recipe=spec.recipe,
                 latent_shape=spec.latent_shape, batch_size=args.batch_size)
    root = Path(tempfile.mkdtemp(prefix="kb-build-bench-"))
    rows: dict[str, list[dict]] = {k: [] for k in ("plain_full", "plain_same_steps", "plain_recording", "build", "commit_only")}
    try:
        sample_prompts(**{**plain, "prompts": plain["prompts"][:1], "seeds": plain["seeds"][:1]}, stop_step=2)  # warm-up
        for r in range(args.repeats):
            print(f"repeat {r + 1}/{args.repeats}", flush=True)
            _, w, c = timed(lambda: sample_prompts(**plain))
            rows["plain_full"].append({"wall_s": w, "cpu_s": c})
            _, w, c = timed(lambda: sample_prompts(**plain, stop_step=stop))
            rows["plain_same_steps"].append({"wall_s": w, "cpu_s": c})
            _, w, c = timed(lambda: sample_prompts(**plain, stop_step=stop, keep_steps=spec.store_steps))
            rows["plain_recording"].append({"wall_s": w, "cpu_s": c})
            report, w, c = timed(lambda: build_knowledge_base(str(root / f"kb-{r}"), model, encode, spec))
            rows["build"].append({"wall_s": w, "cpu_s": c, "evaluations": report.evaluations})
            built = KnowledgeBase.open(str(root / f"kb-{r}"))

            def commit_only():
                kb = KnowledgeBase.create(str(root / f"commit-{r}"), built.settings, dtype=built.dtype)
                for lo in range(0, n, spec.commit_every):
                    ids = list(range(lo, min(n, lo + spec.commit_every)))
                    kb.append({st: built.latents(st, ids) for st in built.stored_steps}, [built.entries[i][0] for i in ids],
                              [built.entries[i][1] for i in ids])
            _, w, c = timed(commit_only)
            rows["commit_only"].append({"wall_s": w, "cpu_s": c})
        model = plain = None  # free this process's copy before the Ray workers load theirs
        ray_rows = []
        for workers in (int(w) for w in args.ray_workers.split(",") if w):
            from kb_tools.build.distributed import build_on_ray

            marks: list[tuple[float, int, float]] = []
            t0 = time.perf_counter()
            progress = lambda done, total: marks.append((time.perf_counter() - t0, done, tree_cpu_s()))  # noqa: E731
            report, w, c = timed(lambda: build_on_ray(str(root / f"ray-{workers}"), job, prompts, address="local",
                                                      workers=workers, local_cpus=2, progress=progress))
            first = next(((t, d) for t, d, _ in marks if d > 0), (w, 0))
            last = max((t for t, d, _ in marks if d < n), default=first[0])
            done_at = next((t for t, d, _ in marks if d >= n), w)
            steady = (n - first[1]) / (done_at - first[0]) if done_at > first[0] else None
            ray_rows.append({"workers": workers, "wall_s": w, "driver_cpu_s": c,
                             "workers_cpu_s_sampled": max((x for _, _, x in marks), default=0.0),
                             "first_trajectory_after_s": first[0], "last_progress_before_done_s": last,
                             "steady_trajectories_per_s": steady, "trajectories_per_s_incl_startup": n / w,
                             "kb_count": len(report.kb)})
            print(f"ray {workers} workers: {w:.1f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def best(name):
        return min(rows[name], key=lambda x: x["wall_s"])

    def rate(name):
        return n / best(name)["wall_s"]

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_at_end": os.getloadavg(),
                    "torch_threads": 1},
        "model": "tiny SD1.5-format test checkpoint (tests/make_checkpoint.py), CPU",
        "setup": {"prompts": len(prompts), "seeds": args.seeds, "trajectories": n, "steps": args.steps,
                  "stored_steps": list(spec.store_steps), "build_samples_to_step": stop, "size": args.size,
                  "latent_shape": list(spec.latent_shape), "batch_size": args.batch_size, "sampler": spec.recipe.sampler,
                  "commit_every": spec.commit_every, "checkpoint_load_s": load_s, "repeats": args.repeats},
        "rows": rows,
        "ray": ray_rows,
        "trajectories_per_s": {k: rate(k) for k in ("plain_full", "plain_same_steps", "build")},
        "build_vs_plain_same_steps": rate("build") / rate("plain_same_steps"),
        "build_vs_plain_full": rate("build") / rate("plain_full"),
        "commit_share_of_build": best("commit_only")["wall_s"] / best("build")["wall_s"],
        "where_the_time_goes_s": {
            "sampling (plain_same_steps)": best("plain_same_steps")["wall_s"],
            "recording the stored steps (plain_recording - plain_same_steps)": best("plain_recording")["wall_s"] - best("plain_same_steps")["wall_s"],
            "storing: KB create, commits, indexes (build - plain_recording)": best("build")["wall_s"] - best("plain_recording")["wall_s"],
            "of which the appends alone (commit_only)": best("commit_only")["wall_s"]},
    }
    result["goal"] = {"goal": "single-process build >= 95% of plain sampling throughput (same steps)",
                      "value": result["build_vs_plain_same_steps"], "met": result["build_vs_plain_same_steps"] >= 0.95}
    for row in ray_rows:
        if row["steady_trajectories_per_s"]:
            row["steady_vs_single_process_build"] = row["steady_trajectories_per_s"] / rate("build")
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("trajectories_per_s", "build_vs_plain_same_steps", "where_the_time_goes_s", "goal", "ray")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
