"""Is the converged reference converged enough, and is acceleration a real question at cfg 3 and 7.5?

Per regime (the shipped large model, T = 20, cfg 3 and 7.5) it writes the validity figures the
head-to-head benchmark needs before any verdict, each against the converged reference
(benchmarks/h2h/converged.py: dpmpp_2m/karras at N and 2N, cached; the reference is the 2N output):
- euler10_over_euler40: euler/normal at 10 NFE at least 5x further from converged (mean per-sample MSE) than at 40;
- oracle10_over_gap: the oracle at 10 NFE at least 20x further from converged than the reference's own doubling
  gap (largest per-item MSE between the N- and 2N-step outputs). The oracle is the best of every built-in
  sampler x schedule (`kb_tools.PLAIN_SAMPLERS` x `PLAIN_SCHEDULES`, the AYS SD1 and GITS 1.2 presets included)
  whose counted NFE fits 10 (Heun: 2 per step, 1 on its last), non-finite results excluded, chosen on the
  selection captions, which are never evaluation queries;
- kid_separation_sd: the distribution figure. KID (the kernel distance, `metrics.paired_kid`) in the judge's
  features (embedded/judge.py) between euler/normal at 6 NFE and the converged samples of the same items, over
  its bootstrap sd: at least 3. Its U-statistic is unbiased whatever ties an item's two samples together, so it
  keeps the shared seeds' pairing (which cancels the spread between captions) without FD's small-sample bias;
- fd_separation_sd (reported, not a threshold): Frechet distance between euler/normal at 6 NFE on half the items
  and the converged samples of the other half, minus the converged-vs-converged floor (the same halves,
  converged on both sides: FD's small-sample bias, `split_fd_separation`), in units of the difference's
  bootstrap sd. It cannot use the pairing, so it needs far more items (cfg 3: 0.4 sd at 256 where KID gives
  3.9). The real-vs-real floor (two renderings of the same captions, `metrics.fd_noise_floor`) and the paired FD
  are reported beside it;
- gap_share_of_smallest_error: the doubling gap below 1/20 of the smallest error compared (`gap_ok`).
Selection captions: held-out captions 30000.. with fresh seeds 3000000 + i; the FD set is the first
--fd-items of them (the selection captions are its first --captions). Nothing here is tuned to pass.

    python benchmarks/converged_validity.py [--captions 16] [--fd-items 256] [--cfg 3,7.5] [--steps 25,50,100]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

PACK = Path(__file__).resolve().parent.parent
if str(PACK) not in sys.path:
    sys.path.insert(0, str(PACK))

from benchmarks import metrics as M  # noqa: E402

CAPTION_OFFSET = 30000
SEED_BASE = 3_000_000
ORACLE_NFE = 10
EULER_NFE = (6, 10, 40)
#: The validity rule: figure -> the least value that passes.
THRESHOLDS = {"euler10_over_euler40": 5.0, "oracle10_over_gap": 20.0, "kid_separation_sd": 3.0}
GAP_SHARE = 1 / 20


# --------------------------------------------------------------------------- pure parts (numpy only)

def oracle_winner(grid: Sequence[dict], budget: int) -> dict | None:
    """The grid row {sampler, schedule, nfe, mse, ...} with the lowest finite mean MSE whose counted NFE fits `budget`."""
    ok = [g for g in grid if g["nfe"] <= budget and g["mse"] is not None and math.isfinite(g["mse"])]
    return min(ok, key=lambda g: g["mse"]) if ok else None


def paired_fd_bootstrap_sd(features: np.ndarray, reference: np.ndarray, draws: int = 20, seed: int = 0) -> float:
    """Bootstrap sd of FD(features, reference) [N, d] x2 where row i of both belongs to item i: items resampled together."""
    if len(features) != len(reference):
        raise ValueError(f"paired feature sets need the same items: {len(features)} vs {len(reference)}")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(draws):
        idx = rng.integers(0, len(features), len(features))
        vals.append(M.frechet_distance(features[idx], reference[idx]))
    return float(np.std(vals, ddof=1))


def split_fd_separation(test: np.ndarray, reference: np.ndarray, draws: int = 50, seed: int = 0) -> dict:
    """Does `test` [N, d] come from another distribution than `reference` [N, d] (row i of both: item i's seed)?

    Items split into halves A (even rows) and B (odd rows): FD(test[A], reference[B]) against the
    converged-vs-converged floor FD(reference[A], reference[B]), both between independent seeds
    and of equal sizes, so the floor holds FD's small-sample bias and the difference is 0 in
    expectation when the distributions agree. FD(test, reference) over the same items is not a
    fair test against any independent floor: samples from shared seeds nearly coincide, so it
    lacks that bias. sd: bootstrap over items, A's rows resampled together in both sets.
    Returns {"fd", "floor", "diff", "sd", "draws", "n_half"}.
    """
    if len(test) != len(reference) or len(test) < 4:
        raise ValueError(f"need the same items (at least 4) in both sets: {len(test)} vs {len(reference)}")
    a, b = np.arange(0, len(test), 2), np.arange(1, len(test), 2)

    def diff(ia, ib):
        fd = M.frechet_distance(test[ia], reference[ib])
        floor = M.frechet_distance(reference[ia], reference[ib])
        return fd, floor

    fd, floor = diff(a, b)
    rng = np.random.default_rng(seed)
    boot = [np.subtract(*diff(rng.choice(a, len(a)), rng.choice(b, len(b)))) for _ in range(draws)]
    return {"fd": float(fd), "floor": float(floor), "diff": float(fd - floor), "sd": float(np.std(boot, ddof=1)),
            "draws": draws, "n_half": len(b)}


def separation_sd(fd: float, fd_sd: float, floor: float, floor_sd: float) -> float:
    """How many combined sd an FD lies above the floor: (fd - floor) / sqrt(fd_sd^2 + floor_sd^2)."""
    sd = math.hypot(fd_sd, floor_sd)
    return (fd - floor) / sd if sd > 0 else (math.inf if fd > floor else 0.0)


def validity_figures(mse: dict[int, float], oracle10: float, gap: float, fd: dict, kid: dict) -> dict:
    """The regime's validity object from mean MSEs to converged (euler/normal by NFE), the oracle's, the gap, FD and KID.

    fd: {"euler6", "euler6_sd", "floor", "floor_sd"}; kid: `metrics.paired_kid`'s {"kid", "sd"}. `passed`: every
    figure of THRESHOLDS at its threshold and the gap rule held (FD is reported beside them).
    """
    smallest = min([*mse.values(), oracle10])
    out = {"euler10_over_euler40": mse[10] / mse[40] if mse[40] > 0 else math.inf,
           "oracle10": oracle10,
           "oracle10_over_gap": oracle10 / gap if gap > 0 else math.inf,
           "fd_euler6": fd["euler6"], "fd_euler6_sd": fd["euler6_sd"], "fd_floor": fd["floor"],
           "fd_separation_sd": separation_sd(fd["euler6"], fd["euler6_sd"], fd["floor"], fd["floor_sd"]),
           "kid_euler6": kid["kid"], "kid_euler6_sd": kid["sd"],
           "kid_separation_sd": separation_sd(kid["kid"], kid["sd"], 0.0, 0.0),
           "gap_share_of_smallest_error": gap / smallest if smallest > 0 else math.inf}
    out["passed"] = not shortfalls(out)
    return out


def shortfalls(validity: dict) -> dict[str, str]:
    """figure -> how far it misses its threshold (empty where every figure passes)."""
    missed = {}
    for name, least in THRESHOLDS.items():
        value = validity[name]
        if not (isinstance(value, (int, float)) and value >= least):
            missed[name] = f"{value:.3g} < {least:g} (short by {least / value:.2f}x)" if value and value > 0 else f"{value} < {least:g}"
    share = validity["gap_share_of_smallest_error"]
    if not (math.isfinite(share) and share < GAP_SHARE):
        missed["gap_share_of_smallest_error"] = f"{share:.3g} >= {GAP_SHARE:g} ({share / GAP_SHARE:.2f}x the allowed share)"
    return missed


def _json_safe(value):
    """inf/nan -> None (JSON has neither), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------- sampling

def sample_choice(model, prompts, seeds, sampler: str, schedule: str, steps: int, cfg: float, batch: int):
    """(latents [N, C, H, W], counted NFE per item [N]) of one plain choice over its own sigmas (`plain_sigmas`)."""
    import torch

    from embedded import sampling as S
    from kb_tools import plain_sigmas
    from kb_tools.comfy.counted import sample_counted
    from kb_tools.comfy.plain import cfg_guider

    sigmas = plain_sigmas(model, sampler, schedule, steps)
    outs, nfe = [], []
    for b in range(0, len(prompts), batch):
        positive, negative = S.conditioning(prompts[b:b + batch])
        out, _, tally = sample_counted(cfg_guider(model, positive, negative, cfg), S.empty_latents(len(prompts[b:b + batch])),
                                       list(seeds[b:b + batch]), sigmas, sampler)
        outs.append(out)
        nfe.append(tally.per_item())
    return torch.cat(outs), np.concatenate(nfe)


def oracle_grid(model, prompts, seeds, cfg: float, truth, budget: int, batch: int, cache: Path | None = None,
                reverse: bool = False, log=print) -> list[dict]:
    """Every built-in sampler x schedule at `budget` NFE: one row each with its counted NFE and mean MSE to `truth`.

    cache: a folder where each finished row is kept (named by the digest of the model, items, cfg and
    choice), so a stopped run resumes without sampling a finished choice again. reverse: walk the
    samplers from the last (a second run beside a first shares the grid through the cache).
    """
    from benchmarks.h2h.converged import digest, ignore_cache, model_id
    from kb_tools import PLAIN_SAMPLERS, PLAIN_SCHEDULES, steps_for_nfe

    if cache is not None:
        ignore_cache(cache)
    fingerprint = model_id(model)
    rows = []
    for sampler in (PLAIN_SAMPLERS[::-1] if reverse else PLAIN_SAMPLERS):
        steps = steps_for_nfe(sampler, budget)
        for schedule in PLAIN_SCHEDULES:
            key = {"model": fingerprint, "prompts": list(prompts), "seeds": [int(v) for v in seeds], "cfg": float(cfg),
                   "sampler": sampler, "schedule": schedule, "steps": steps, "truth": float(truth.double().sum())}
            path = cache / f"oracle-{digest(key)}.json" if cache is not None else None
            if path is not None and path.is_file():
                rows.append(json.loads(path.read_text()))
                continue
            lat, nfe = sample_choice(model, prompts, seeds, sampler, schedule, steps, cfg, batch)
            finite = bool(np.isfinite(lat.numpy()).all())
            mse = float(M.per_sample_mse(lat.numpy(), truth.numpy()).mean()) if finite else None
            rows.append({"sampler": sampler, "schedule": schedule, "steps": steps, "nfe": int(nfe.max()), "mse": mse})
            if path is not None:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(rows[-1]))
                os.replace(tmp, path)
        log(f"  oracle grid cfg {cfg:g}: {sampler} done", flush=True)
    return rows


def machine() -> dict:
    from embedded.models import cpu_has_fast_bf16

    return {"cores": os.cpu_count(), "bf16": cpu_has_fast_bf16(), "gpu": False}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", type=int, default=16, help="selection captions: MSE figures and the oracle's choice")
    p.add_argument("--fd-items", type=int, default=256, help="items of the FD figure (captions and seeds as above)")
    p.add_argument("--fd-floor-draws", type=int, default=10)
    p.add_argument("--cfg", default="3,7.5")
    p.add_argument("--steps", default="25,50,100", help="N of the reference solver (the reference is the 2N output)")
    p.add_argument("--fd-steps", type=int, default=25,
                   help="N of the FD set's reference (the 2N output): its doubling gap is three orders below euler-6's "
                        "error, far below what FD resolves, and it costs a quarter of the N = 100 reference")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reverse-grid", action="store_true", help="walk the oracle grid from its last sampler (a second run "
                                                               "beside a first shares the grid through the row cache)")
    p.add_argument("--out", type=Path, default=PACK / "benchmarks" / "results" / "converged_validity" / "validity.json")
    a = p.parse_args(argv)
    if a.fd_items < a.captions:
        raise SystemExit("--fd-items must be at least --captions (the selection captions are the FD set's first items)")
    from embedded.models import setup_comfy

    setup_comfy(a.threads)
    from benchmarks.h2h.converged import converged
    from embedded import judge as J
    from embedded import sampling as S
    from embedded.captions import sample_captions
    from embedded.models import load_models
    from embedded.text_encoder import encode
    from kb_tools.comfy.plain import sample_prompts
    from kb_tools.core.records import Recipe

    t0, c0 = time.perf_counter(), time.process_time()
    # The commit whose code runs (HEAD may move while a long run is under way).
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PACK, capture_output=True, text=True).stdout.strip()
    large, _, _ = load_models()
    captions = sample_captions(a.fd_items, "heldout", offset=CAPTION_OFFSET)
    prompts = [c.prompt() for c in captions]
    seeds = [SEED_BASE + i for i in range(len(prompts))]
    sel = slice(0, a.captions)
    judge = J.Judge()
    # Real-vs-real floor: FD between fresh renderings of the FD set's captions and one fixed rendering of them.
    real_ref = judge.real_features(captions)
    floor = M.fd_noise_floor(lambda: judge.real_features(captions), real_ref, draws=a.fd_floor_draws)
    regimes = {}
    for cfg in (float(v) for v in a.cfg.split(",")):
        t_regime = time.perf_counter()
        ref_args = dict(cfg=cfg, latent_shape=S.LATENT_SHAPE, batch_size=a.batch)
        steps = sorted(int(v) for v in a.steps.split(","))
        refs = {n: converged(large, encode, prompts[sel], seeds[sel], solver=("dpmpp_2m", "karras", n), **ref_args) for n in steps}
        best_n = steps[-1]
        truth = refs[best_n].latents  # the selection captions' reference: every MSE figure and the oracle's choice
        full = converged(large, encode, prompts, seeds, solver=("dpmpp_2m", "karras", a.fd_steps), **ref_args)
        print(f"cfg {cfg:g}: converged references ready ({len(full.computed)} sampled now), {time.perf_counter() - t_regime:.0f} s",
              flush=True)
        euler = {n: sample_prompts(large, encode, prompts if n == 6 else prompts[sel], seeds if n == 6 else seeds[sel],
                                     Recipe("euler", "normal", n, cfg), latent_shape=S.LATENT_SHAPE, batch_size=a.batch).latents
                 for n in EULER_NFE}
        mse = {n: float(M.per_sample_mse(euler[n][sel].numpy(), truth[sel].numpy()).mean()) for n in EULER_NFE}
        grid = oracle_grid(large, prompts[sel], seeds[sel], cfg, truth[sel], ORACLE_NFE, a.batch,
                           cache=PACK / "benchmarks" / ".cache" / "converged_validity", reverse=a.reverse_grid)
        winner = oracle_winner(grid, ORACLE_NFE)
        e6_feat, conv_feat = judge.features(euler[6]), judge.features(full.latents)
        split = split_fd_separation(e6_feat, conv_feat)
        # The separation's floor is converged vs converged on independent seeds; the difference's bootstrap sd holds
        # both sets' spread, so floor_sd is 0 here. The real-vs-real floor and the paired FD are reported beside it.
        fd = {"euler6": split["fd"], "euler6_sd": split["sd"], "floor": split["floor"], "floor_sd": 0.0}
        paired = {"fd": M.frechet_distance(e6_feat, conv_feat), "sd": paired_fd_bootstrap_sd(e6_feat, conv_feat)}
        kid = M.paired_kid(e6_feat, conv_feat)
        gap = float(refs[best_n].max_gap)
        validity = validity_figures(mse, winner["mse"], gap, fd, kid)
        name = f"cfg{cfg:g}"
        regimes[name] = {
            "cfg": cfg, "model": "embedded large (16x16)", "T": 20, "reference": f"dpmpp_2m/karras {2 * best_n} steps",
            "n_selection": a.captions, "n_fd": a.fd_items,
            "doubling_gap": {str(n): {"mean": float(np.mean(r.gaps)), "max": float(r.max_gap)} for n, r in refs.items()},
            "fd_reference": f"dpmpp_2m/karras {2 * a.fd_steps} steps",
            "doubling_gap_fd_items": {"mean": float(np.mean(full.gaps)), "max": float(full.max_gap), "n": len(full.gaps),
                                      "steps": 2 * a.fd_steps},
            "mse_to_converged": {f"euler/normal {n}": v for n, v in mse.items()},
            "oracle10": {**winner, "chosen_on": f"{a.captions} selection captions"},
            "oracle_grid": sorted(grid, key=lambda g: (g["mse"] is None, g["mse"] or 0.0)),
            "fd": {**fd, "floor_kind": "converged vs converged, independent seeds (FD(euler6[A], conv[B]) against "
                                 "FD(conv[A], conv[B]), A/B the even/odd items)",
                   "euler6_sd_kind": f"bootstrap sd of the difference over items, {split['draws']} draws",
                   "n_half": split["n_half"], "paired_fd_euler6": paired["fd"], "paired_fd_euler6_sd": paired["sd"],
                   "real_vs_real_floor": floor["mean"], "real_vs_real_floor_sd": floor["sd"],
                   "real_vs_real_floor_kind": "fresh renderings of the same captions vs one fixed rendering",
                   "real_vs_real_floor_draws": floor["draws"], "features": "judge 128-d hidden layer", "n": a.fd_items},
            "kid": {"euler6": kid["kid"], "euler6_sd": kid["sd"], "n": kid["n"], "features": "judge 128-d hidden layer",
                    "kind": "unbiased U-statistic over items, cubic kernel (x.y/d + 1)^3, euler6 and converged of the "
                            "same seeds paired; 0 in expectation when the distributions agree",
                    "sd_kind": f"bootstrap sd over items, {kid['draws']} draws, pairs of one item drawn twice left out"},
            "validity": validity, "shortfalls": shortfalls(validity),
            "wall_seconds": round(time.perf_counter() - t_regime, 1)}
        print(json.dumps(_json_safe({k: v for k, v in regimes[name].items() if k != "oracle_grid"})), flush=True)
        write(a, argv, commit, regimes, t0, c0)  # each finished regime is on disk at once
    return write(a, argv, commit, regimes, t0, c0)


def settings(a) -> dict:
    return {"captions": a.captions, "fd_items": a.fd_items, "caption_offset": CAPTION_OFFSET, "seeds": f"{SEED_BASE} + i (fresh)",
            "T": 20, "oracle_nfe": ORACLE_NFE, "euler_nfe": list(EULER_NFE), "thresholds": THRESHOLDS, "gap_share": GAP_SHARE,
            "reference_steps": a.steps, "fd_reference_steps": 2 * a.fd_steps}


def write(a, argv, commit: str, regimes: dict, t0: float, c0: float) -> dict:
    """The results file with the regimes finished so far, keeping the other regimes earlier runs wrote there (one run
    per cfg may run side by side, or with more FD items; each regime records its own settings, command, commit and
    times)."""
    command = " ".join(["python", "benchmarks/converged_validity.py", *(argv if argv is not None else sys.argv[1:])])
    for r in regimes.values():
        r.setdefault("settings", _json_safe(settings(a)))
        r.setdefault("command", command)
        r.setdefault("commit", commit)
        r.setdefault("cpu_seconds_of_run_so_far", round(time.process_time() - c0, 1))
    kept = {}
    if a.out.is_file():
        try:
            old = json.loads(a.out.read_text())
            kept = {k: {"settings": old.get("settings"), **v} for k, v in old.get("regimes", {}).items() if k not in regimes}
        except (OSError, ValueError):
            kept = {}
    res = {"benchmark": "converged_validity",
           "command": " ".join(["python", "benchmarks/converged_validity.py", *(argv if argv is not None else sys.argv[1:])]),
           "commit": commit, "date": time.strftime("%Y-%m-%d"), "machine": machine(), "threads": a.threads,
           "settings": settings(a), "regimes": {**kept, **regimes},
           "wall_seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
           "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_json_safe(res), indent=1))
    os.replace(tmp, a.out)
    return res


if __name__ == "__main__":
    main()
